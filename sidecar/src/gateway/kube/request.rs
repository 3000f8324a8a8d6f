//! What a Kubernetes API request asks for, read from its method, path and query the way the
//! API server's own request-info resolver reads them: verb, API group, version, resource,
//! subresource, namespace and name.

/// One request, as authorization sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInfo {
    /// `true` for a resource request; `false` for discovery, `/version`, `/openapi`, … .
    pub resource_request: bool,
    /// The path (without the query) of a non-resource request.
    pub path: String,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`;
    /// or the HTTP method in lower case for a non-resource request.
    pub verb: String,
    /// The API group, `""` for the core group.
    pub group: String,
    /// The API version.
    pub version: String,
    /// The resource, e.g. `pods`.
    pub resource: String,
    /// The subresource, e.g. `exec`, `log`, `status`.
    pub subresource: String,
    /// The namespace, `""` for cluster-scoped requests and lists across namespaces.
    pub namespace: String,
    /// The object's name, `""` for lists and creates.
    pub name: String,
    /// What follows a `proxy` subresource (the path proxied to the pod, service or node).
    pub subpath: String,
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The path is not one the API server serves in this shape.
    #[error("the path {0:?} is not a Kubernetes API path")]
    BadPath(String),
    /// The path has an encoded character that could change its meaning.
    #[error(
        "the path {0:?} has encoded characters, dot segments or empty segments, which are refused (send the path as the API server names it)"
    )]
    Encoded(String),
    /// A query parameter agentgate cannot read as the API server does.
    #[error(
        "the query parameter {0:?} is refused: parameter names must be plain (no encoding, no `;`)"
    )]
    Query(String),
}

impl RequestInfo {
    /// `resource` or `resource/subresource`, as RBAC names it.
    pub fn rbac_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }

    /// A short text for records and messages: `get pods/log -n default web-1`.
    pub fn describe(&self) -> String {
        if !self.resource_request {
            return format!("{} {}", self.verb, self.path);
        }
        let mut s = self.verb.clone();
        s.push(' ');
        s.push_str(&self.rbac_resource());
        if !self.group.is_empty() {
            s.push('.');
            s.push_str(&self.group);
        }
        if !self.name.is_empty() {
            s.push(' ');
            s.push_str(&self.name);
        }
        if !self.namespace.is_empty() {
            s.push_str(" -n ");
            s.push_str(&self.namespace);
        }
        if !self.subpath.is_empty() {
            s.push_str(" path ");
            s.push_str(&self.subpath);
        }
        s
    }
}

/// Whether the query string sets `name` to true as the API server reads it: its first value
/// counts, percent-decoded, and anything but `0` or `false` (any case) is true, including an
/// empty value (apimachinery's `Convert_Slice_string_To_bool`).
pub fn query_flag(query: &str, name: &str) -> bool {
    query
        .split('&')
        .find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| decode_query_value(v))
        })
        .is_some_and(|v| match v {
            Some(v) => v != "0" && !v.eq_ignore_ascii_case("false"),
            // Not decodable: taken as set (the stricter reading for watch and follow).
            None => true,
        })
}

/// A query value as the API server decodes it (`+` is a space, `%XX` a byte); `None` when it
/// is not valid.
fn decode_query_value(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let s = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(s, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Where a `proxy` subresource starts in a path's segments (`…/<resource>/<name>/proxy`), if
/// the path has one: only there, not wherever a segment happens to be called `proxy` (an
/// object or a namespace may be).
fn proxy_segment(segs: &[&str]) -> Option<usize> {
    let mut i = match segs {
        ["api", _, ..] => 2,
        ["apis", _, _, ..] => 3,
        _ => return None,
    };
    if segs.get(i) == Some(&"watch") {
        i += 1;
    }
    if segs.get(i) == Some(&"namespaces")
        && segs.len() >= i + 3
        && !matches!(segs[i + 2], "status" | "finalize")
    {
        i += 2;
    }
    (segs.get(i + 2) == Some(&"proxy")).then_some(i + 2)
}

/// Checks a query string the API server will decode: keys must be plain words (an encoded
/// key such as `%63ommand` would be `command` upstream but not here), and `;` is refused.
pub fn check_query(query: &str) -> Result<(), RequestError> {
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let key = kv.split_once('=').map_or(kv, |(k, _)| k);
        if kv.contains(';')
            || key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(RequestError::Query(key.to_owned()));
        }
    }
    Ok(())
}

/// Reads a request. `query` is the raw query string (without `?`).
pub fn parse(method: &str, path: &str, query: &str) -> Result<RequestInfo, RequestError> {
    // The API server decodes the path before routing, so an encoded character would be read
    // one way here and another way there (`%73ecrets` is `secrets` upstream). No group,
    // version, resource, namespace or name contains one: any `%` is refused, except in what
    // follows a `proxy` subresource (the proxied path, kept whole in the request's text).
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (checked, proxied) = match proxy_segment(&segs) {
        Some(i) if segs.len() > i + 1 => (
            format!("/{}", segs[..=i].join("/")),
            format!("/{}", segs[i + 1..].join("/")),
        ),
        _ => (path.to_owned(), String::new()),
    };
    let checked = checked.as_str();
    if checked.contains('%') || checked.contains('\\') {
        return Err(RequestError::Encoded(path.to_owned()));
    }
    let parts: Vec<&str> = checked.trim_matches('/').split('/').collect();
    if path.split('/').any(|p| p == "." || p == "..") || path.contains("//") {
        return Err(RequestError::Encoded(path.to_owned()));
    }
    let method_verb = method.to_ascii_lowercase();
    let non_resource = || RequestInfo {
        resource_request: false,
        path: path.to_owned(),
        verb: method_verb.clone(),
        ..Default::default()
    };
    // `/api/v1/...` (core) or `/apis/<group>/<version>/...`.
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Ok(non_resource()),
    };
    if rest.is_empty() {
        // Discovery of one group version.
        return Ok(non_resource());
    }
    let mut rest: &[&str] = rest;
    let mut watch_path = false;
    if rest.first() == Some(&"watch") {
        // The deprecated `/watch/` prefix.
        watch_path = true;
        rest = &rest[1..];
    }
    let mut info = RequestInfo {
        resource_request: true,
        group: group.to_owned(),
        version: version.to_owned(),
        ..Default::default()
    };
    // `namespaces/<ns>/<resource>…`, except `namespaces/<name>` and its subresources (the
    // namespace object itself).
    // (`status` and `finalize` are the namespace's own subresources.)
    if rest.first() == Some(&"namespaces")
        && rest.len() >= 3
        && !matches!(rest[2], "status" | "finalize")
    {
        info.namespace = rest[1].to_owned();
        rest = &rest[2..];
    }
    match rest {
        [resource] => info.resource = (*resource).to_owned(),
        [resource, name] => {
            info.resource = (*resource).to_owned();
            info.name = (*name).to_owned();
        }
        [resource, name, sub, rest @ ..] => {
            info.resource = (*resource).to_owned();
            info.name = (*name).to_owned();
            info.subresource = (*sub).to_owned();
            if !rest.is_empty() {
                // Only a proxy subresource has a path of its own.
                if *sub != "proxy" {
                    return Err(RequestError::BadPath(path.to_owned()));
                }
            }
            info.subpath = proxied.clone();
        }
        [] => return Err(RequestError::BadPath(path.to_owned())),
    }
    if info.resource.is_empty() {
        return Err(RequestError::BadPath(path.to_owned()));
    }
    // `namespaces/<name>` names the namespace, which is cluster-scoped.
    if info.resource == "namespaces" {
        info.namespace = if rest.len() >= 2 {
            info.name.clone()
        } else {
            String::new()
        };
    }
    let has_name = !info.name.is_empty();
    info.verb = match method_verb.as_str() {
        "get" | "head" if watch_path || query_flag(query, "watch") => "watch".into(),
        "get" | "head" if has_name => "get".into(),
        "get" | "head" => "list".into(),
        "post" => "create".into(),
        "put" => "update".into(),
        "patch" => "patch".into(),
        "delete" if has_name => "delete".into(),
        "delete" => "deletecollection".into(),
        // `connect` subresources (exec, attach, portforward, proxy) over other methods.
        "options" | "connect" => "connect".into(),
        other => other.to_owned(),
    };
    // Exec, attach and port-forward are `create` whatever the method (a WebSocket upgrade
    // is a GET): as the API server authorizes them, and so one approval covers both.
    if matches!(info.subresource.as_str(), "exec" | "attach" | "portforward") {
        info.verb = "create".into();
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn p(method: &str, path: &str, query: &str) -> RequestInfo {
        parse(method, path, query).unwrap()
    }

    #[test]
    fn core_and_group_resources() {
        let r = p("GET", "/api/v1/namespaces/default/pods", "");
        assert_eq!(
            (r.verb.as_str(), r.group.as_str(), r.resource.as_str()),
            ("list", "", "pods")
        );
        assert_eq!(r.namespace, "default");
        let r = p("GET", "/apis/apps/v1/namespaces/web/deployments/api", "");
        assert_eq!(
            (r.verb.as_str(), r.group.as_str(), r.name.as_str()),
            ("get", "apps", "api")
        );
        let r = p("GET", "/api/v1/secrets", "watch=true");
        assert_eq!((r.verb.as_str(), r.namespace.as_str()), ("watch", ""));
        let r = p("GET", "/api/v1/watch/namespaces/a/configmaps", "");
        assert_eq!((r.verb.as_str(), r.namespace.as_str()), ("watch", "a"));
        let r = p("DELETE", "/api/v1/namespaces/prod", "");
        assert_eq!(
            (r.verb.as_str(), r.resource.as_str(), r.name.as_str()),
            ("delete", "namespaces", "prod")
        );
        assert_eq!(r.namespace, "prod");
        let r = p("DELETE", "/api/v1/namespaces/a/pods", "");
        assert_eq!(r.verb, "deletecollection");
        let r = p("POST", "/api/v1/namespaces/a/pods/web/exec", "command=ls");
        assert_eq!(r.rbac_resource(), "pods/exec");
        assert_eq!(r.describe(), "create pods/exec web -n a");
        let r = p("GET", "/api/v1/namespaces/a/pods/web/exec", "command=ls");
        assert_eq!(r.verb, "create");
        let r = p("GET", "/api/v1/namespaces/a/pods/web/log", "follow=true");
        assert_eq!((r.verb.as_str(), r.subresource.as_str()), ("get", "log"));
        let r = p("PATCH", "/api/v1/namespaces/a/status", "");
        assert_eq!(
            (r.resource.as_str(), r.name.as_str(), r.namespace.as_str()),
            ("namespaces", "a", "a")
        );
        let r = p("GET", "/api/v1/namespaces/a/finalize", "");
        assert_eq!(r.resource, "namespaces");
    }

    #[test]
    fn proxied_paths_and_queries() {
        let r = p("GET", "/api/v1/nodes/n1/proxy/run/ns/pod/c%20x", "cmd=cat");
        assert_eq!(
            (r.resource.as_str(), r.subresource.as_str()),
            ("nodes", "proxy")
        );
        assert_eq!(r.subpath, "/run/ns/pod/c%20x");
        assert!(r.describe().ends_with("path /run/ns/pod/c%20x"));
        assert!(check_query("command=ls&container=app&stdin=true").is_ok());
        for q in ["%63ommand=sh", "command=ls;x=1", "=x", "a+b=1"] {
            assert!(check_query(q).is_err(), "{q}");
        }
        for (q, want) in [
            ("watch=yes", true),
            ("watch", true),
            ("watch=0", false),
            ("watch=False", false),
            // As the API server reads it: only `0` and `false`, decoded, are false.
            ("watch=no", true),
            ("watch=f", true),
            ("watch=%66alse", false),
            ("watch=FALSE&watch=1", false),
            ("watch=%zz", true),
            ("follow=1", false),
        ] {
            assert_eq!(query_flag(q, "watch"), want, "{q}");
        }
    }

    #[test]
    fn objects_and_namespaces_named_proxy_are_not_the_proxy_subresource() {
        let r = p(
            "PUT",
            "/apis/certificates.k8s.io/v1/certificatesigningrequests/proxy/approval",
            "",
        );
        assert_eq!(
            (r.resource.as_str(), r.name.as_str(), r.subresource.as_str()),
            ("certificatesigningrequests", "proxy", "approval")
        );
        let r = p(
            "POST",
            "/api/v1/namespaces/agents/serviceaccounts/proxy/token",
            "",
        );
        assert_eq!(
            (r.name.as_str(), r.subresource.as_str()),
            ("proxy", "token")
        );
        let r = p("GET", "/api/v1/namespaces/agents/pods/proxy/proxy/x/y", "");
        assert_eq!(
            (r.name.as_str(), r.subresource.as_str(), r.subpath.as_str()),
            ("proxy", "proxy", "/x/y")
        );
        let r = p(
            "PATCH",
            "/api/v1/namespaces/agents/pods/proxy/ephemeralcontainers",
            "",
        );
        assert_eq!(r.subresource, "ephemeralcontainers");
        let r = p("GET", "/api/v1/namespaces/proxy/secrets", "");
        assert_eq!(
            (r.namespace.as_str(), r.resource.as_str(), r.verb.as_str()),
            ("proxy", "secrets", "list")
        );
        let r = p("GET", "/api/v1/namespaces/proxy/secrets/proxy", "");
        assert_eq!((r.resource.as_str(), r.name.as_str()), ("secrets", "proxy"));
        // A `%` before the proxied path is still refused.
        assert!(parse("GET", "/api/v1/namespaces/a/pods/p%72oxy/proxy/x", "").is_err());
        assert!(parse("GET", "/api/v1/namespaces/a/%70ods/proxy/proxy/x", "").is_err());
    }

    #[test]
    fn non_resource_requests() {
        for path in [
            "/version",
            "/api",
            "/apis",
            "/apis/apps/v1",
            "/openapi/v3",
            "/api/v1",
        ] {
            let r = p("GET", path, "");
            assert!(!r.resource_request, "{path}");
            assert_eq!(r.verb, "get");
        }
    }

    #[test]
    fn encoded_tricks_are_refused() {
        for path in [
            "/api/v1/namespaces/a/secrets%2Fx",
            "/api/v1/namespaces/a/pods/../secrets/x",
            "/api/v1/namespaces/a/%2e%2e/secrets",
            "/api/v1//secrets",
            "/api/v1/namespaces/a/%73ecrets/db",
            "/api/v1/%77atch/secrets",
            "/api/v1/namespaces/a/pods/web/%65xec",
            "/apis/%72bac.authorization.k8s.io/v1/clusterrolebindings",
            "/api/v1/namespaces/a/pods/web/exec/more",
            "/api/v1/nodes/n/proxy/../../secrets",
        ] {
            assert!(parse("GET", path, "").is_err(), "{path}");
        }
    }
}
