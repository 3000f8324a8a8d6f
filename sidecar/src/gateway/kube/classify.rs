//! A Kubernetes API request as the policy sees it: its operation class, the keys guardrails
//! match (`delete namespaces`, `get secrets`, `create pods/exec`), and the exact-command
//! fingerprint that a grant bound to it carries.

use std::collections::BTreeSet;

use agentgate_crds::OperationClass;
use serde_json::Value;

use super::request::RequestInfo;
use crate::policy::{Command, KubeAccess};
use crate::sql::Fingerprint;

/// The API group of agentgate's own resources: an agent never changes them.
pub const OWN_GROUP: &str = "agentgate.dev";

/// Subresources that run code or open a channel into a container or node.
const CONNECT: [&str; 4] = ["exec", "attach", "portforward", "proxy"];

/// The keys of a request: `verb resource` and `verb resource.group`.
fn keys(info: &RequestInfo) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    if !info.resource_request {
        keys.insert(format!("{} {}", info.verb, info.path));
        return keys;
    }
    let resource = info.rbac_resource();
    keys.insert(format!("{} {resource}", info.verb));
    if !info.group.is_empty() {
        keys.insert(format!("{} {resource}.{}", info.verb, info.group));
    }
    keys
}

/// Whether an RBAC object (or patch) grants everything or binds a cluster-wide admin role:
/// any `*` among rules' verbs, resources or groups, the `escalate`, `bind` or `impersonate`
/// verbs, or a binding to `cluster-admin`/`admin`. Anything unreadable counts as escalation.
fn rbac_escalation(body: Option<&[u8]>) -> Option<&'static str> {
    let body = body.filter(|b| !b.is_empty())?;
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Some("an RBAC change agentgate cannot read");
    };
    fn walk(v: &Value) -> Option<&'static str> {
        match v {
            Value::String(s) if s == "*" || s.ends_with("/*") => {
                Some("an RBAC rule with a wildcard")
            }
            Value::String(s) if s.starts_with("system:") => {
                Some("a binding to or rule about a system role or user")
            }
            Value::String(s) if s == "edit" => Some("a binding to the edit role"),
            Value::String(s) if matches!(s.as_str(), "escalate" | "bind" | "impersonate") => {
                Some("an RBAC rule with the escalate, bind or impersonate verb")
            }
            Value::String(s) if matches!(s.as_str(), "cluster-admin" | "admin") => {
                Some("a binding to an admin role")
            }
            Value::Array(a) => a.iter().find_map(walk),
            Value::Object(o) => o.values().find_map(walk),
            _ => None,
        }
    }
    walk(&v)
}

/// Whether `key` is a key of any object in `v` (a patch may set it at any depth).
fn has_key(v: &Value, key: &str) -> bool {
    match v {
        Value::Object(o) => o.iter().any(|(k, v)| {
            k == key
                // A JSON patch names it in an operation's path.
                || (matches!(k.as_str(), "path" | "from")
                    && v.as_str()
                        .is_some_and(|p| p.split('/').any(|seg| seg == key)))
                || has_key(v, key)
        }),
        Value::Array(a) => a.iter().any(|v| has_key(v, key)),
        _ => false,
    }
}

/// Resources whose objects are or make pods.
const POD_MAKERS: [&str; 9] = [
    "pods",
    "deployments",
    "replicasets",
    "statefulsets",
    "daemonsets",
    "jobs",
    "cronjobs",
    "replicationcontrollers",
    "podtemplates",
];

/// Why a write of a pod, or of what makes pods, reaches around the gateway, if it does, and
/// its class. A pod runs as whatever identity and with whatever it mounts, and its logs are
/// only a read away:
/// - Admin: the node itself (privileged, host namespaces, hostPath, added capabilities);
/// - Exec (held for approval): a service account (its token is the pod's credential, and an
///   agent's own is the sidecar's) or Secrets (as env or volumes), which would reach the
///   agent unmasked.
///
/// Keys are looked for at any depth, and in JSON patch paths; a body that cannot be read is
/// Admin.
fn pod_spec_risk(
    info: &RequestInfo,
    body: Option<&[u8]>,
) -> Option<(OperationClass, &'static str)> {
    if !POD_MAKERS.contains(&info.resource.as_str())
        || !info.subresource.is_empty()
        || !matches!(info.verb.as_str(), "create" | "update" | "patch")
    {
        return None;
    }
    let body = body.filter(|b| !b.is_empty())?;
    let Some(v) = body_value(body) else {
        return Some((OperationClass::Admin, "a pod body agentgate cannot read"));
    };
    let node = [
        "privileged",
        "hostPID",
        "hostNetwork",
        "hostIPC",
        "hostUsers",
        "hostPath",
        "hostPort",
        "capabilities",
        "procMount",
    ];
    if let Some(k) = node.iter().find(|k| has_key(&v, k)) {
        return Some((
            OperationClass::Admin,
            match *k {
                "privileged" => "a privileged container",
                "hostPath" => "a hostPath volume",
                "capabilities" => "container capabilities",
                _ => "the node's namespaces or ports",
            },
        ));
    }
    let credentials = [
        "serviceAccountName",
        "serviceAccount",
        "automountServiceAccountToken",
        "serviceAccountToken",
        "secretKeyRef",
        "secretRef",
        "secret",
        "secretName",
    ];
    if credentials.iter().any(|k| has_key(&v, k)) {
        return Some((
            OperationClass::Exec,
            "a service account or Secrets mounted into a pod",
        ));
    }
    None
}

/// Why a write of a PersistentVolume reaches the node, if it does: a volume on the node's own
/// filesystem (`hostPath`, `local`) gives any pod that claims it the node's files, other
/// pods' Secrets among them. A body that cannot be read counts.
fn volume_risk(info: &RequestInfo, body: Option<&[u8]>) -> Option<&'static str> {
    if info.resource != "persistentvolumes"
        || !matches!(info.verb.as_str(), "create" | "update" | "patch")
    {
        return None;
    }
    let body = body.filter(|b| !b.is_empty())?;
    let Some(v) = body_value(body) else {
        return Some("a volume body agentgate cannot read");
    };
    ["hostPath", "local"]
        .iter()
        .any(|k| has_key(&v, k))
        .then_some("a volume on the node's filesystem")
}

/// Whether a write's body sets owner references: in JSON or YAML anywhere (also a JSON
/// patch's path), in protobuf (what kubectl sends for built-in kinds) in the object's
/// metadata. A body that cannot be read counts.
fn sets_owners(body: &[u8]) -> bool {
    if body.is_empty() {
        return false;
    }
    if let Some(v) = body_value(body) {
        return has_key(&v, "ownerReferences");
    }
    protobuf_owner_references(body).unwrap_or(true)
}

/// Whether a Kubernetes protobuf body (`k8s\0` and a `runtime.Unknown` whose `raw` is the
/// object) sets `metadata.ownerReferences` (field 1 of the object, field 13 of ObjectMeta).
/// `None` when it is not such a body.
fn protobuf_owner_references(body: &[u8]) -> Option<bool> {
    let unknown = body.strip_prefix(b"k8s\0")?;
    // `raw` is bytes (the last one counts); ObjectMeta is a message, which the decoder
    // merges from every occurrence: owner references in any of them count.
    let raw = proto_field(unknown, 2)?.unwrap_or_default();
    let mut any = false;
    for meta in proto_fields(raw, 1)? {
        any |= proto_field(meta, 13)?.is_some();
    }
    Some(any)
}

/// Every length-delimited field `number` of a protobuf message, in order, or `None` when
/// the message does not parse.
fn proto_fields(mut msg: &[u8], number: u64) -> Option<Vec<&[u8]>> {
    use prost::encoding::decode_varint;
    let mut found = Vec::new();
    while !msg.is_empty() {
        let key = decode_varint(&mut msg).ok()?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                decode_varint(&mut msg).ok()?;
            }
            1 => msg = msg.get(8..)?,
            5 => msg = msg.get(4..)?,
            2 => {
                let len = usize::try_from(decode_varint(&mut msg).ok()?).ok()?;
                let value = msg.get(..len)?;
                if field == number {
                    found.push(value);
                }
                msg = msg.get(len..)?;
            }
            _ => return None,
        }
    }
    Some(found)
}

/// The last length-delimited field `number` of a protobuf message (`Some(None)`: absent),
/// or `None` when the message does not parse.
fn proto_field(msg: &[u8], number: u64) -> Option<Option<&[u8]>> {
    Some(proto_fields(msg, number)?.last().copied())
}

/// A Kubernetes protobuf body (`k8s\0` and a `runtime.Unknown`) as text an approver can
/// read: every field by its number, nested messages in braces, text quoted, other bytes
/// counted (field names are not in the wire format). The flag says whether everything was
/// shown (no bytes only counted). `None` when it is not such a body.
pub fn protobuf_text(body: &[u8]) -> Option<(String, bool)> {
    let unknown = body.strip_prefix(b"k8s\0")?;
    let mut out = String::new();
    let mut whole = true;
    proto_render(unknown, 0, &mut out, &mut whole)?;
    Some((out, whole))
}

fn proto_render(mut msg: &[u8], depth: usize, out: &mut String, whole: &mut bool) -> Option<()> {
    use prost::encoding::decode_varint;
    out.push('{');
    let mut first = true;
    while !msg.is_empty() {
        let key = decode_varint(&mut msg).ok()?;
        let (field, wire) = (key >> 3, key & 7);
        if !std::mem::take(&mut first) {
            out.push_str(", ");
        }
        out.push_str(&format!("{field}: "));
        match wire {
            0 => out.push_str(&decode_varint(&mut msg).ok()?.to_string()),
            1 => {
                let b: [u8; 8] = msg.get(..8)?.try_into().ok()?;
                out.push_str(&u64::from_le_bytes(b).to_string());
                msg = msg.get(8..)?;
            }
            5 => {
                let b: [u8; 4] = msg.get(..4)?.try_into().ok()?;
                out.push_str(&u32::from_le_bytes(b).to_string());
                msg = msg.get(4..)?;
            }
            2 => {
                let len = usize::try_from(decode_varint(&mut msg).ok()?).ok()?;
                let value = msg.get(..len)?;
                msg = msg.get(len..)?;
                // A nested message when it reads as one; else text; else bytes.
                let mut nested = String::new();
                let mut nested_whole = true;
                if depth < 16
                    && !value.is_empty()
                    && proto_render(value, depth + 1, &mut nested, &mut nested_whole).is_some()
                    && !value.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
                {
                    out.push_str(&nested);
                    *whole &= nested_whole;
                } else if let Ok(t) = std::str::from_utf8(value) {
                    out.push_str(&serde_json::Value::String(t.to_owned()).to_string());
                } else {
                    out.push_str(&format!("({len} bytes)"));
                    *whole = false;
                }
            }
            _ => return None,
        }
    }
    out.push('}');
    Some(())
}

/// A request body as the API server reads it: JSON (a YAML body was made JSON before, and
/// one that is neither JSON nor protobuf is refused before).
fn body_value(body: &[u8]) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

/// Why a write to a Secret reaches around the gateway, if it does:
/// - it makes a service-account token Secret (the token controller fills in a long-lived
///   token), by any spelling: every string of the body is compared once decoded;
/// - it is a JSON patch that copies, moves or tests values (`copy` from `/data/password` to
///   an annotation, or a 422 quoting the value, reads a Secret without a grant);
/// - its body cannot be read.
fn secret_write_risk(info: &RequestInfo, body: Option<&[u8]>) -> Option<&'static str> {
    if info.resource != "secrets" || matches!(info.verb.as_str(), "get" | "list" | "watch") {
        return None;
    }
    let body = body.filter(|b| !b.is_empty())?;
    let Some(v) = body_value(body) else {
        return Some("a Secret body agentgate cannot read");
    };
    fn token_type(v: &Value) -> bool {
        match v {
            Value::String(s) => s.trim() == "kubernetes.io/service-account-token",
            Value::Array(a) => a.iter().any(token_type),
            Value::Object(o) => o.values().any(token_type),
            _ => false,
        }
    }
    if token_type(&v) {
        return Some("a service-account token Secret");
    }
    if let Value::Array(ops) = &v
        && ops.iter().any(|op| {
            op.get("op")
                .and_then(Value::as_str)
                .is_some_and(|o| matches!(o, "copy" | "move" | "test"))
        })
    {
        return Some("a JSON patch that copies, moves or tests a Secret's values");
    }
    None
}

/// Classifies a request. `body` is the request body of a create, update or patch (JSON).
pub fn classify(info: &RequestInfo, query: &str, body: Option<&[u8]>) -> Command {
    let mut keys = keys(info);
    // Setting owners on an object hands it to the garbage collector, which deletes it when
    // the owner is gone (or never existed): it counts as the delete, so the guardrails on
    // deleting it hold it too.
    if info.resource_request
        && matches!(info.verb.as_str(), "update" | "patch" | "create")
        // (`/status` and `/finalize` keep what a body sets in metadata too.)
        && body.is_some_and(sets_owners)
    {
        let mut as_delete = info.clone();
        as_delete.verb = "delete".into();
        as_delete.subresource.clear();
        keys.extend(super::classify::keys(&as_delete));
    }
    let class = if !info.resource_request {
        match info.verb.as_str() {
            "get" | "head" | "options" => OperationClass::Read,
            _ => OperationClass::Write,
        }
    } else if info.resource == "nodes" && info.subresource == "proxy" {
        // The kubelet's API: running commands in any container of the node.
        OperationClass::Admin
    } else if CONNECT.contains(&info.subresource.as_str())
        || (info.subresource == "ephemeralcontainers" && info.verb != "get")
    {
        // (An ephemeral container runs a command of the agent's inside the pod.)
        OperationClass::Exec
    } else if matches!(info.verb.as_str(), "get" | "list" | "watch") {
        OperationClass::Read
    } else if info.group == "rbac.authorization.k8s.io" {
        match rbac_escalation(body) {
            Some(what) => {
                keys.insert(format!("escalate: {what}"));
                OperationClass::Admin
            }
            // Deleting RBAC objects is a change of privileges too.
            None => OperationClass::Privilege,
        }
    } else if let Some(what) = volume_risk(info, body) {
        keys.insert(format!("persistent volume: {what}"));
        OperationClass::Admin
    } else if let Some((class, what)) = pod_spec_risk(info, body) {
        keys.insert(format!("pod spec: {what}"));
        class
    } else if let Some(what) = secret_write_risk(info, body) {
        keys.insert(format!("secret: {what}"));
        OperationClass::Admin
    } else if info.group == "apiextensions.k8s.io" && info.name.ends_with(".agentgate.dev") {
        // agentgate's own CRDs: a new version or a conversion webhook would change what the
        // sidecar reads as grants.
        keys.insert("change agentgate's own resource definitions".into());
        OperationClass::Admin
    } else if (info.resource == "serviceaccounts" && info.subresource == "token")
        || (info.resource == "certificatesigningrequests" && info.subresource == "approval")
        || info.group == "admissionregistration.k8s.io"
        // An APIService sends a whole API group's requests, and their callers' identities,
        // to the Service it names.
        || info.group == "apiregistration.k8s.io"
    {
        // Minting tokens (also as a Secret of type service-account-token), approving
        // certificates and changing admission webhooks reach around every other control.
        OperationClass::Admin
    } else if info.group == "apiextensions.k8s.io"
        && body.is_some_and(|b| body_value(b).is_none_or(|v| has_key(&v, "webhook")))
    {
        // A conversion webhook receives every object of the resource, and rewrites them.
        keys.insert("a conversion webhook".into());
        OperationClass::Admin
    } else if info.group == "apiextensions.k8s.io" {
        OperationClass::Ddl
    } else {
        OperationClass::Write
    };
    Command {
        class,
        fingerprint: Fingerprint::known(fingerprint(info, query, body)),
        keys,
        tables: BTreeSet::new(),
        unresolved: None,
        parts: Vec::new(),
        kube: info.resource_request.then(|| KubeAccess {
            verb: info.verb.clone(),
            group: info.group.clone(),
            resource: info.rbac_resource(),
            namespace: info.namespace.clone(),
            name: info.name.clone(),
        }),
        ssh: None,
    }
}

/// The exact request a grant can be bound to: the request, the parameters that choose what
/// runs (an exec's command and container), and the body.
fn fingerprint(info: &RequestInfo, query: &str, body: Option<&[u8]>) -> String {
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    h.update(info.describe().as_bytes());
    h.update(b"\n");
    for (k, v) in all_params(query) {
        h.update(k.as_bytes());
        h.update(b"=");
        h.update(v.as_bytes());
        h.update(b"\n");
    }
    if let Some(b) = body {
        h.update(b);
    }
    agentgate_crds::audit::chain::hex(h.finish().as_ref())
}

/// Every query parameter, decoded, sorted by name (values of one name in order), except
/// those that only page or time a request.
pub fn all_params(query: &str) -> Vec<(String, String)> {
    let mut params: Vec<(String, String)> = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), percent_decode(v))
        })
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "timeout"
                    | "timeoutSeconds"
                    | "resourceVersion"
                    | "resourceVersionMatch"
                    | "allowWatchBookmarks"
                    | "limit"
                    | "continue"
                    | "sendInitialEvents"
            )
        })
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// The query parameters of a connect request that choose what runs, decoded, in order:
/// `command`, `container`, `stdin`, `tty`, `ports`.
pub fn connect_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            matches!(k, "command" | "container" | "stdin" | "tty" | "ports")
                .then(|| (k.to_owned(), percent_decode(v)))
        })
        .collect()
}

/// Decodes `%XX` and `+` in a query value (invalid escapes stay as they are).
pub fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The text a record and an approver see: the request, for an exec the command, and for
/// other requests the parameters that choose what they reach (selectors, dry runs, …).
pub fn text(info: &RequestInfo, query: &str) -> String {
    let mut s = info.describe();
    if !CONNECT.contains(&info.subresource.as_str()) {
        let params: Vec<String> = all_params(query)
            .into_iter()
            .filter(|(k, _)| k != "watch" && k != "follow" && k != "fieldManager")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !params.is_empty() {
            s.push_str(" ?");
            s.push_str(&params.join("&"));
        }
    }
    if CONNECT.contains(&info.subresource.as_str()) {
        let params = connect_params(query);
        let command: Vec<&str> = params
            .iter()
            .filter(|(k, _)| k == "command")
            .map(|(_, v)| v.as_str())
            .collect();
        if !command.is_empty() {
            s.push_str(": ");
            s.push_str(&command.join(" "));
        }
        if let Some((_, c)) = params.iter().find(|(k, _)| k == "container") {
            s.push_str(&format!(" (container {c})"));
        }
        if let Some((_, p)) = params.iter().find(|(k, _)| k == "ports") {
            s.push_str(&format!(" (ports {p})"));
        }
        // A proxy passes its query to the pod or service: it is part of what runs.
        if info.subresource == "proxy" && !query.is_empty() {
            s.push_str(" ?");
            s.push_str(&percent_decode(query));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::request::parse;
    use super::*;

    #[test]
    fn owner_references_in_any_repeated_protobuf_metadata_count() {
        let owner = [0x0a, 0x01, b'x'];
        let meta_with_owner = [&[0x6a, 0x03][..], &owner[..]].concat();
        let meta_plain = [0x0a, 0x01, b'n'];
        let raw = [
            &[0x0a, 0x05][..],
            &meta_with_owner[..],
            &[0x0a, 0x03][..],
            &meta_plain[..],
        ]
        .concat();
        let body = [&b"k8s\0"[..], &[0x12, raw.len() as u8][..], &raw[..]].concat();
        assert_eq!(protobuf_owner_references(&body), Some(true));
        let shown = protobuf_text(&body).unwrap();
        assert!(shown.1 && shown.0.contains(r#"13: {1: "x"}"#), "{shown:?}");
    }

    fn class(method: &str, path: &str, body: &str) -> (OperationClass, BTreeSet<String>) {
        let info = parse(method, path, "").unwrap();
        // A YAML body reaches the classifier as the JSON the gateway read from it.
        let json = (!body.is_empty() && serde_json::from_str::<Value>(body).is_err())
            .then(|| super::super::yaml_as_json(body.as_bytes()))
            .flatten()
            .filter(|j| j.first().is_some_and(|c| *c == b'{' || *c == b'['));
        let body = json.as_deref().unwrap_or(body.as_bytes());
        let c = classify(&info, "", (!body.is_empty()).then_some(body));
        (c.class, c.keys)
    }

    #[test]
    fn classes() {
        assert_eq!(class("GET", "/api/v1/pods", "").0, OperationClass::Read);
        assert_eq!(
            class("GET", "/api/v1/namespaces/a/pods/x/exec", "").0,
            OperationClass::Exec
        );
        assert_eq!(
            class("POST", "/api/v1/namespaces/a/pods/x/portforward", "").0,
            OperationClass::Exec
        );
        assert_eq!(
            class("POST", "/api/v1/namespaces/a/configmaps", "{}").0,
            OperationClass::Write
        );
        let (c, keys) = class("DELETE", "/api/v1/namespaces/prod", "");
        assert_eq!(c, OperationClass::Write);
        assert!(keys.contains("delete namespaces"));
        let (c, keys) = class(
            "DELETE",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/x.example.com",
            "",
        );
        assert_eq!(c, OperationClass::Ddl);
        assert!(keys.contains("delete customresourcedefinitions.apiextensions.k8s.io"));
        assert_eq!(
            class(
                "POST",
                "/apis/rbac.authorization.k8s.io/v1/namespaces/a/rolebindings",
                r#"{"roleRef":{"kind":"Role","name":"reader"},"subjects":[]}"#
            )
            .0,
            OperationClass::Privilege
        );
        for body in [
            r#"{"roleRef":{"kind":"ClusterRole","name":"cluster-admin"}}"#,
            r#"{"rules":[{"apiGroups":[""],"resources":["*"],"verbs":["get"]}]}"#,
            r#"{"rules":[{"apiGroups":[""],"resources":["users"],"verbs":["impersonate"]}]}"#,
            "not json",
        ] {
            assert_eq!(
                class(
                    "POST",
                    "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                    body
                )
                .0,
                OperationClass::Admin,
                "{body}"
            );
        }
        assert_eq!(
            class("POST", "/api/v1/namespaces/a/serviceaccounts/x/token", "{}").0,
            OperationClass::Admin
        );
        assert_eq!(
            class(
                "POST",
                "/api/v1/namespaces/a/secrets",
                r#"{"type":"kubernetes.io/service-account-token","metadata":{"name":"t"}}"#
            )
            .0,
            OperationClass::Admin
        );
        assert_eq!(
            class(
                "PATCH",
                "/api/v1/namespaces/a/pods/web/ephemeralcontainers",
                "{}"
            )
            .0,
            OperationClass::Exec
        );
        assert_eq!(
            class("GET", "/api/v1/nodes/n1/proxy/run/a/b/c", "").0,
            OperationClass::Admin
        );
    }

    #[test]
    fn secret_writes_that_read_or_mint_tokens_are_admin() {
        for (method, body) in [
            // The type spelled with an escape, or in YAML.
            (
                "POST",
                r#"{"kind":"Secret","metadata":{"name":"t"},"type":"kubernetes.io/service-account-\u0074oken"}"#,
            ),
            (
                "POST",
                "kind: Secret\nmetadata: {name: t}\ntype: \"kubernetes.io/service-account-\\x74oken\"\n",
            ),
            // A JSON patch that copies a value where it is not masked, or tests a guess.
            (
                "PATCH",
                r#"[{"op":"add","path":"/metadata/annotations","value":{}},{"op":"copy","from":"/data/password","path":"/metadata/annotations/x"}]"#,
            ),
            (
                "PATCH",
                r#"[{"op":"move","from":"/data/password","path":"/type"}]"#,
            ),
            (
                "PATCH",
                r#"[{"op":"test","path":"/data/password","value":"aHVudGVy"}]"#,
            ),
            (
                "PATCH",
                r#"[{"op":"replace","path":"/type","value":"kubernetes.io/service-account-token"}]"#,
            ),
            // Unreadable.
            ("PUT", "\u{0}\u{1}binary"),
        ] {
            let (c, keys) = class(method, "/api/v1/namespaces/a/secrets/db", body);
            assert_eq!(c, OperationClass::Admin, "{body}");
            assert!(keys.iter().any(|k| k.starts_with("secret: ")), "{keys:?}");
        }
        // Pods, and what makes them, that mount credentials or reach the node.
        for (path, body, want) in [
            (
                "/apis/apps/v1/namespaces/a/deployments/orders",
                r#"{"spec":{"template":{"spec":{"serviceAccountName":"claude","containers":[{"name":"c","image":"x"}]}}}}"#,
                OperationClass::Exec,
            ),
            (
                "/api/v1/namespaces/a/pods/p",
                r#"{"spec":{"containers":[{"name":"c","env":[{"name":"P","valueFrom":{"secretKeyRef":{"name":"db","key":"password"}}}]}]}}"#,
                OperationClass::Exec,
            ),
            (
                "/apis/batch/v1/namespaces/a/cronjobs/c",
                "spec:\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          volumes: [{name: s, secret: {secretName: db}}]\n",
                OperationClass::Exec,
            ),
            (
                "/apis/apps/v1/namespaces/a/daemonsets/d",
                r#"[{"op":"add","path":"/spec/template/spec/automountServiceAccountToken","value":true}]"#,
                OperationClass::Exec,
            ),
            (
                "/api/v1/namespaces/a/pods/p",
                r#"{"spec":{"containers":[{"name":"c","securityContext":{"privileged":true}}]}}"#,
                OperationClass::Admin,
            ),
            (
                "/apis/apps/v1/namespaces/a/deployments/orders",
                r#"{"spec":{"template":{"spec":{"volumes":[{"name":"r","hostPath":{"path":"/"}}]}}}}"#,
                OperationClass::Admin,
            ),
            (
                "/apis/apps/v1/namespaces/a/deployments/orders",
                r#"{"spec":{"replicas":3}}"#,
                OperationClass::Write,
            ),
            (
                "/apis/apps/v1/namespaces/a/deployments/orders",
                r#"{"spec":{"template":{"spec":{"containers":[{"name":"c","image":"orders:2","env":[{"name":"LOG","value":"secret"}]}]}}}}"#,
                OperationClass::Write,
            ),
        ] {
            assert_eq!(class("PATCH", path, body).0, want, "{path} {body}");
        }
        // Owners on any object: the garbage collector would delete it.
        for (path, key) in [
            (
                "/apis/apps/v1/namespaces/prod/deployments/db",
                "delete deployments.apps",
            ),
            ("/api/v1/namespaces/prod", "delete namespaces"),
        ] {
            let (_, keys) = class(
                "PATCH",
                path,
                r#"{"metadata":{"ownerReferences":[{"apiVersion":"v1","kind":"Node","name":"ghost","uid":"3f1c1f9e-0000-4000-8000-000000000000"}]}}"#,
            );
            assert!(keys.contains(key), "{path}: {keys:?}");
        }
        let (c, _) = class(
            "PATCH",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/x.example.com",
            r#"{"spec":{"conversion":{"strategy":"Webhook","webhook":{"clientConfig":{"url":"https://evil.example"}}}}}"#,
        );
        assert_eq!(c, OperationClass::Admin);
        let (_, keys) = class(
            "PATCH",
            "/api/v1/namespaces/prod",
            r#"{"metadata":{"labels":{"a":"b"}}}"#,
        );
        assert!(!keys.contains("delete namespaces"), "{keys:?}");
        // In protobuf, as kubectl sends built-in kinds: only metadata.ownerReferences counts.
        let proto = |meta: &[u8]| {
            let mut object = vec![0x0a, u8::try_from(meta.len()).unwrap()];
            object.extend_from_slice(meta);
            let mut unknown = vec![0x12, u8::try_from(object.len()).unwrap()];
            unknown.extend_from_slice(&object);
            let mut body = b"k8s\0".to_vec();
            body.extend_from_slice(&unknown);
            body
        };
        let with_owner = proto(&[0x0a, 0x01, b'x', 0x6a, 0x02, 0x0a, 0x00]);
        let without = proto(&[0x0a, 0x01, b'x']);
        let info = parse("POST", "/api/v1/namespaces/a/configmaps", "").unwrap();
        assert!(
            classify(&info, "", Some(&with_owner))
                .keys
                .contains("delete configmaps")
        );
        assert!(
            !classify(&info, "", Some(&without))
                .keys
                .contains("delete configmaps")
        );
        assert!(
            classify(&info, "", Some(b"k8s\0\x12\xff"))
                .keys
                .contains("delete configmaps")
        );
        // ... also through the subresources that keep metadata.
        for (method, path) in [
            ("PATCH", "/api/v1/namespaces/prod/status"),
            ("PUT", "/api/v1/namespaces/prod/finalize"),
            ("PATCH", "/api/v1/nodes/n1/status"),
        ] {
            let (_, keys) = class(
                method,
                path,
                r#"{"metadata":{"ownerReferences":[{"apiVersion":"v1","kind":"Node","name":"ghost","uid":"3f1c1f9e-0000-4000-8000-000000000000"}]}}"#,
            );
            assert!(
                keys.contains("delete namespaces") || keys.contains("delete nodes"),
                "{path}: {keys:?}"
            );
        }
        // Volumes on the node's filesystem; API services.
        for (method, path, body, want) in [
            (
                "POST",
                "/api/v1/persistentvolumes",
                r#"{"spec":{"hostPath":{"path":"/"},"capacity":{"storage":"1Gi"}}}"#,
                OperationClass::Admin,
            ),
            (
                "PATCH",
                "/api/v1/persistentvolumes/pv1",
                r#"{"spec":{"local":{"path":"/var/lib/kubelet"}}}"#,
                OperationClass::Admin,
            ),
            (
                "POST",
                "/api/v1/persistentvolumes",
                r#"{"spec":{"nfs":{"server":"n","path":"/x"}}}"#,
                OperationClass::Write,
            ),
            (
                "POST",
                "/apis/apiregistration.k8s.io/v1/apiservices",
                r#"{"spec":{"service":{"name":"evil","namespace":"a"},"insecureSkipTLSVerify":true}}"#,
                OperationClass::Admin,
            ),
        ] {
            assert_eq!(class(method, path, body).0, want, "{path} {body}");
        }
        // Ordinary Secret writes stay writes.
        for (method, body) in [
            ("PATCH", r#"{"stringData":{"password":"new"}}"#),
            (
                "PATCH",
                r#"[{"op":"replace","path":"/data/password","value":"bmV3"}]"#,
            ),
            (
                "PUT",
                r#"{"kind":"Secret","type":"Opaque","data":{"a":"Yg=="}}"#,
            ),
        ] {
            let (c, _) = class(method, "/api/v1/namespaces/a/secrets/db", body);
            assert_eq!(c, OperationClass::Write, "{body}");
        }
        // agentgate's own CRDs.
        let (c, _) = class(
            "PATCH",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/accessgrants.agentgate.dev",
            "{}",
        );
        assert_eq!(c, OperationClass::Admin);
    }

    #[test]
    fn exec_text_and_fingerprint_follow_the_command() {
        let info = parse("POST", "/api/v1/namespaces/a/pods/web/exec", "").unwrap();
        let q1 = "command=rm&command=-rf&command=%2Fdata&container=app&stdin=true";
        let q2 = "command=ls&container=app&stdin=true";
        assert_eq!(
            text(&info, q1),
            "create pods/exec web -n a: rm -rf /data (container app)"
        );
        let f1 = classify(&info, q1, None).fingerprint;
        let f2 = classify(&info, q2, None).fingerprint;
        assert_ne!(f1.get(), f2.get());
        assert_eq!(f1.get(), classify(&info, q1, None).fingerprint.get());
    }
}
