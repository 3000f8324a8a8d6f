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
    /// The media type of the body the gateway judged and forwards (`application/json`, a
    /// patch type, protobuf), without parameters; `""` when the request has no body.
    pub media_type: String,
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
    /// A query value the API server would drop (an invalid `%` escape) or read otherwise
    /// than agentgate shows it (not UTF-8 once decoded).
    #[error(
        "the value of the query parameter {0:?} is refused: it has an invalid percent escape (`%` must be followed by two hex digits; send a literal `%` as `%25`) or is not UTF-8 once decoded, and the API server would drop or read it otherwise than agentgate shows it"
    )]
    QueryValue(String),
    /// A parameter the API server reads once (the first value), given more than once.
    #[error(
        "the query parameter {0:?} is given more than once; the API server reads only the first, so agentgate refuses it rather than show values that are not used: give it once"
    )]
    Repeated(String),
    /// More query parameters than agentgate reads.
    #[error(
        "the query has more than {MAX_QUERY_PARAMS} parameters, which agentgate does not read: send fewer"
    )]
    TooManyParams,
    /// A parameter the API server does not read for an exec, attach or port-forward: it
    /// would change nothing that runs, only what is hashed and shown.
    #[error(
        "the query parameter {param:?} is refused: the API server does not read it for pods/{subresource} (it reads {known}), so it would change nothing but what an approver is shown; drop it"
    )]
    Unknown {
        /// The parameter's name.
        param: String,
        /// `exec`, `attach` or `portforward`.
        subresource: String,
        /// The parameters the API server reads there, for the message.
        known: String,
    },
    /// A delete's option given in the query of a delete that has a body: the API server
    /// reads a delete's options from its body when it has one, and ignores the query's.
    #[error(
        "the query parameter {0:?} is refused: this delete has a body (DeleteOptions), and the API server then reads the delete's options from the body only and ignores them in the query (a dry run there would not be one); put {0} in the body's DeleteOptions, or send the delete without a body"
    )]
    DeleteOptionInQuery(String),
}

/// The most query parameters a request may have: a bound on what agentgate reads and shows
/// (recent Go releases bound what `url.ParseQuery` reads too, and past such a bound the API
/// server would read less than agentgate shows; this stays well under it).
pub const MAX_QUERY_PARAMS: usize = 1000;

/// Query parameters the API server reads as lists, whose every value counts: an exec's or
/// attach's `command`, a port-forward's `ports`, and `dryRun`. Any other parameter of a
/// Kubernetes API request is read once (its first value), and is refused when repeated.
const REPEATABLE: [&str; 3] = ["command", "ports", "dryRun"];

impl RequestInfo {
    /// `resource` or `resource/subresource`, as RBAC names it.
    pub fn rbac_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }

    /// `group/version`, or `version` for the core group (an object's `apiVersion`).
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// A short text for records and messages: `get pods/log -n default web-1`. A request
    /// with a body also names the API version and the body's media type, which choose how
    /// the API server reads it (a strategic merge patch and a merge patch of the same body
    /// are different changes): `patch deployments.apps web -n a (apps/v1,
    /// application/strategic-merge-patch+json)`.
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
        if !self.media_type.is_empty() {
            s.push_str(&format!(" ({}, {})", self.api_version(), self.media_type));
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

/// A query key or value as the API server decodes it (`+` is a space, `%XX` a byte); `None`
/// when it is not valid: an invalid escape (Go's `url.ParseQuery` drops the whole pair) or
/// bytes that are not UTF-8 once decoded.
pub fn decode_query_value(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                // Two hex digits, as Go reads them (`from_str_radix` alone would take `+1`).
                let hex = b.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
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

/// Checks a query string the API server will decode, so that what agentgate shows and
/// judges is what the API server reads (Go's `url.ParseQuery`, which drops a pair it cannot
/// decode instead of failing): keys must be plain words (an encoded key such as `%63ommand`
/// would be `command` upstream but not here), `;` is refused, every value must decode (a
/// valid `%XX` escape, UTF-8), and there are at most [`MAX_QUERY_PARAMS`] parameters.
pub fn check_query(query: &str) -> Result<(), RequestError> {
    let mut count = 0;
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        count += 1;
        if count > MAX_QUERY_PARAMS {
            return Err(RequestError::TooManyParams);
        }
        let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
        if kv.contains(';')
            || key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(RequestError::Query(key.to_owned()));
        }
        if decode_query_value(value).is_none() {
            return Err(RequestError::QueryValue(key.to_owned()));
        }
    }
    Ok(())
}

/// Checks that a request gives each parameter the API server reads once (its first value)
/// only once: `container=app&container=agentgate-sidecar` would be shown with both and run
/// in `app`. Lists ([`REPEATABLE`]) may repeat, and so may the query of a `proxy`
/// subresource, which is the proxied server's (and shown whole).
pub fn check_repeated(info: &RequestInfo, query: &str) -> Result<(), RequestError> {
    if info.subresource == "proxy" {
        return Ok(());
    }
    let mut seen = std::collections::BTreeSet::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let key = kv.split_once('=').map_or(kv, |(k, _)| k);
        if !REPEATABLE.contains(&key) && !seen.insert(key) {
            return Err(RequestError::Repeated(key.to_owned()));
        }
    }
    Ok(())
}

/// The query parameters the API server reads for a pod's connect subresource (its
/// `PodExecOptions`, `PodAttachOptions`, `PodPortForwardOptions`), and `timeout` (read for
/// every request); `None` for any other request.
pub fn connect_params_read(info: &RequestInfo) -> Option<&'static [&'static str]> {
    if !info.resource_request || info.resource != "pods" {
        return None;
    }
    match info.subresource.as_str() {
        "exec" => Some(&[
            "command",
            "container",
            "stdin",
            "stdout",
            "stderr",
            "tty",
            "timeout",
        ]),
        "attach" => Some(&["container", "stdin", "stdout", "stderr", "tty", "timeout"]),
        "portforward" => Some(&["ports", "timeout"]),
        _ => None,
    }
}

/// Checks that an exec, attach or port-forward gives only the parameters the API server
/// reads for it ([`connect_params_read`]): any other is ignored upstream, and would only be
/// hashed into the request's fingerprint and shown to an approver beside the command, a
/// channel for confusion and nothing else. Other requests pass (every parameter they give is
/// shown).
pub fn check_known(info: &RequestInfo, query: &str) -> Result<(), RequestError> {
    let Some(known) = connect_params_read(info) else {
        return Ok(());
    };
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let key = kv.split_once('=').map_or(kv, |(k, _)| k);
        if !known.contains(&key) {
            return Err(RequestError::Unknown {
                param: key.to_owned(),
                subresource: info.subresource.clone(),
                known: known.join(", "),
            });
        }
    }
    Ok(())
}

/// The query parameters the API server decodes into a delete's `DeleteOptions` when the
/// delete has no body.
const DELETE_OPTIONS: [&str; 6] = [
    "dryRun",
    "gracePeriodSeconds",
    "propagationPolicy",
    "orphanDependents",
    "preconditions",
    "ignoreStoreReadErrorWithClusterBreakingPotential",
];

/// Checks that a delete (or deletecollection) with a body gives none of its options in the
/// query: the API server decodes `DeleteOptions` from the body when there is one and from the
/// query only when there is none, so `?dryRun=All` beside a body would be shown as a dry run
/// and delete for real. (A proxied request's query is the proxied server's.)
pub fn check_delete_options(
    info: &RequestInfo,
    query: &str,
    has_body: bool,
) -> Result<(), RequestError> {
    if !has_body
        || !info.resource_request
        || info.subresource == "proxy"
        || !matches!(info.verb.as_str(), "delete" | "deletecollection")
    {
        return Ok(());
    }
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let key = kv.split_once('=').map_or(kv, |(k, _)| k);
        if DELETE_OPTIONS
            .iter()
            .any(|o| key == *o || key.strip_prefix(o).is_some_and(|r| r.starts_with('.')))
        {
            return Err(RequestError::DeleteOptionInQuery(key.to_owned()));
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
        assert!(check_query("command=echo+100%25&command=%E2%9C%93&&x").is_ok());
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
    fn query_values_the_api_server_would_drop_are_refused() {
        // Go's url.ParseQuery drops a pair whose value has an invalid escape: the request
        // would run in agentgate-sidecar while reading as `container app%`, and a dry run
        // would run for real.
        for (q, key) in [
            (
                "command=sh&container=app%&container=agentgate-sidecar",
                "container",
            ),
            ("dryRun=All%", "dryRun"),
            ("dryRun=All%2", "dryRun"),
            ("labelSelector=app%3Gweb", "labelSelector"),
            // Not UTF-8 once decoded (shown with replacement characters, run as bytes).
            ("command=%FF%FE", "command"),
            ("container=%C3", "container"),
        ] {
            let err = check_query(q).unwrap_err();
            assert_eq!(err, RequestError::QueryValue(key.into()), "{q}");
            assert!(err.to_string().contains("invalid percent escape"), "{err}");
        }
        let many = vec!["a=1"; MAX_QUERY_PARAMS + 1].join("&");
        assert_eq!(check_query(&many), Err(RequestError::TooManyParams));
        assert!(check_query(&vec!["a=1"; MAX_QUERY_PARAMS].join("&")).is_ok());
    }

    #[test]
    fn parameters_read_once_may_not_repeat() {
        let exec = p("POST", "/api/v1/namespaces/a/pods/web/exec", "");
        for q in [
            "command=ls&container=app&container=agentgate-sidecar",
            "command=ls&stdin=false&stdin=true",
            "command=ls&tty=0&tty=1",
        ] {
            let err = check_repeated(&exec, q).unwrap_err();
            assert!(matches!(err, RequestError::Repeated(_)), "{q}");
            assert!(err.to_string().contains("give it once"), "{err}");
        }
        assert!(check_repeated(&exec, "command=rm&command=-rf&command=x&container=app").is_ok());
        let pf = p("POST", "/api/v1/namespaces/a/pods/web/portforward", "");
        assert!(check_repeated(&pf, "ports=80&ports=443").is_ok());
        let delete = p("DELETE", "/api/v1/namespaces/a/pods/web", "");
        assert!(check_repeated(&delete, "dryRun=All&dryRun=All").is_ok());
        assert!(check_repeated(&delete, "gracePeriodSeconds=30&gracePeriodSeconds=0").is_err());
        // A proxied server's query is its own.
        let proxy = p("GET", "/api/v1/namespaces/a/services/web:80/proxy/x", "");
        assert!(check_repeated(&proxy, "a=1&a=2").is_ok());
    }

    #[test]
    fn a_connect_request_gives_only_what_the_api_server_reads() {
        let exec = p("POST", "/api/v1/namespaces/a/pods/web/exec", "");
        // The reviewer's query: `a` would hold a second command, hashed and shown, not run.
        let q = "a=1%0Acommand%3Dsh&command=ls&container=app";
        let err = check_known(&exec, q).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the query parameter \"a\" is refused: the API server does not read it for pods/exec (it reads command, container, stdin, stdout, stderr, tty, timeout), so it would change nothing but what an approver is shown; drop it"
        );
        assert!(
            check_known(
                &exec,
                "command=ls&container=app&stdin=true&stdout=true&stderr=true&tty=false"
            )
            .is_ok()
        );
        let attach = p("GET", "/api/v1/namespaces/a/pods/web/attach", "");
        assert!(check_known(&attach, "container=app&stdin=1").is_ok());
        assert!(check_known(&attach, "container=app&command=sh").is_err());
        let pf = p("POST", "/api/v1/namespaces/a/pods/web/portforward", "");
        assert!(check_known(&pf, "ports=80&ports=443").is_ok());
        assert!(check_known(&pf, "ports=80&container=app").is_err());
        // Elsewhere every parameter is shown instead.
        for (method, path) in [
            ("GET", "/api/v1/namespaces/a/pods/web/log"),
            ("DELETE", "/api/v1/namespaces/a/configmaps/c"),
            ("GET", "/api/v1/namespaces/a/pods/web/proxy/x"),
        ] {
            assert!(check_known(&p(method, path, ""), "a=1").is_ok(), "{path}");
        }
    }

    #[test]
    fn a_delete_with_a_body_takes_no_options_from_its_query() {
        let del = p("DELETE", "/api/v1/namespaces/a/configmaps/c", "");
        let all = p("DELETE", "/api/v1/namespaces/a/configmaps", "");
        for q in [
            "dryRun=All",
            "gracePeriodSeconds=0",
            "propagationPolicy=Orphan",
            "orphanDependents=true",
            "preconditions.uid=x",
            "labelSelector=a%3Db&dryRun=All",
        ] {
            let err = check_delete_options(&del, q, true).unwrap_err();
            assert!(matches!(err, RequestError::DeleteOptionInQuery(_)), "{q}");
            assert!(
                err.to_string().contains("in the body's DeleteOptions"),
                "{err}"
            );
            assert!(check_delete_options(&all, q, true).is_err(), "{q}");
            // Without a body, the API server reads them from the query.
            assert!(check_delete_options(&del, q, false).is_ok(), "{q}");
        }
        assert!(check_delete_options(&all, "labelSelector=a%3Db", true).is_ok());
        // A proxied server's query is its own; other verbs take no DeleteOptions.
        let proxy = p("DELETE", "/api/v1/namespaces/a/services/web/proxy/x", "");
        assert!(check_delete_options(&proxy, "dryRun=All", true).is_ok());
        let patch = p("PATCH", "/api/v1/namespaces/a/configmaps/c", "");
        assert!(check_delete_options(&patch, "dryRun=All", true).is_ok());
    }

    #[test]
    fn a_write_names_its_api_version_and_media_type() {
        let mut r = p("PATCH", "/apis/apps/v1/namespaces/a/deployments/web", "");
        assert_eq!(r.describe(), "patch deployments.apps web -n a");
        r.media_type = "application/strategic-merge-patch+json".into();
        let strategic = r.describe();
        assert_eq!(
            strategic,
            "patch deployments.apps web -n a (apps/v1, application/strategic-merge-patch+json)"
        );
        r.media_type = "application/merge-patch+json".into();
        assert_ne!(r.describe(), strategic);
        let mut r = p("POST", "/api/v1/namespaces/a/configmaps", "");
        r.media_type = "application/json".into();
        assert_eq!(
            r.describe(),
            "create configmaps -n a (v1, application/json)"
        );
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
