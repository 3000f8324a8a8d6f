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

/// Resources whose objects are or make pods (built-in kinds, which kubectl may send in
/// protobuf: a body of theirs that cannot be read counts as the worst).
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

/// The name of the container agentgate injects into an agent's pod (the operator's
/// `webhook::pod::SIDECAR`): the gateway itself, which holds the Targets' credentials and
/// the records' signing key, and whose listeners on the pod's loopback act as the pod's
/// agent.
pub const SIDECAR_CONTAINER: &str = "agentgate-sidecar";

/// The pod-spec field that turns the service-account token off (or on).
const AUTOMOUNT: &str = "automountServiceAccountToken";

/// Keys whose array value is a list of containers: an object with one is a pod spec, in
/// whatever resource it is (Kubernetes' own kinds, Knative's and Argo's `containerSet`
/// templates, any custom resource that embeds one).
const CONTAINER_LISTS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];

/// Whether an object says what runs in a pod: a container list ([`CONTAINER_LISTS`]), an
/// Argo Workflows template's `container` or `script` (an object with an `image`), or a
/// Tekton Task's `steps` or `sidecars` (a list of objects with an `image`).
fn is_pod_spec(o: &serde_json::Map<String, Value>) -> bool {
    let image = |v: &Value| v.get("image").is_some();
    o.iter().any(|(k, v)| match k.as_str() {
        "containers" | "initContainers" | "ephemeralContainers" => v.is_array(),
        "container" | "script" => image(v),
        "steps" | "sidecars" => v.as_array().is_some_and(|a| a.iter().any(image)),
        _ => false,
    })
}

/// Whether an object is a KubeVirt virtual machine's spec (`domain` with `devices`): not a
/// pod, but its volumes reach the same Secrets, service accounts and node disks.
fn is_vm_spec(o: &serde_json::Map<String, Value>) -> bool {
    o.get("domain").is_some_and(|d| d.get("devices").is_some())
}

/// Path segments of a JSON patch that reach into what runs in a pod.
const POD_PATH_SEGMENTS: [&str; 7] = [
    "containers",
    "initContainers",
    "ephemeralContainers",
    "container",
    "script",
    "steps",
    "sidecars",
];

/// A JSON patch's operations, when a body is one (an array of objects with an `op`).
fn json_patch_ops(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(ops) if !ops.is_empty() && ops.iter().all(|op| op.get("op").is_some()) => {
            Some(ops)
        }
        _ => None,
    }
}

/// Whether a body holds, at any depth, what pods (or virtual machines) run from; or, a JSON
/// patch, changes it (an operation's `path` or `from` goes through [`POD_PATH_SEGMENTS`]).
fn has_pod_shape(v: &Value) -> bool {
    fn holds(v: &Value) -> bool {
        match v {
            Value::Object(o) => is_pod_spec(o) || is_vm_spec(o) || o.values().any(holds),
            Value::Array(a) => a.iter().any(holds),
            _ => false,
        }
    }
    let patched = json_patch_ops(v).is_some_and(|ops| {
        ops.iter().any(|op| {
            ["path", "from"].iter().any(|k| {
                op.get(*k)
                    .and_then(Value::as_str)
                    .is_some_and(|p| p.split('/').any(|s| POD_PATH_SEGMENTS.contains(&s)))
            })
        })
    });
    patched || holds(v)
}

/// Whether a body gives a pod its service account's token: it sets
/// `automountServiceAccountToken` to anything but `false` at any depth, or holds a pod spec
/// where neither it nor an object around it sets `automountServiceAccountToken: false` (the
/// default mounts the token of the pod's service account, the namespace's `default` when it
/// names none, and the ServiceAccount's own setting cannot be seen from here). A JSON patch
/// does when it touches a pod's containers without setting the field to `false`, or removes,
/// moves or copies the field.
fn mounts_token(v: &Value) -> bool {
    fn walk(v: &Value, off: bool) -> bool {
        match v {
            Value::Object(o) => {
                let off = match o.get(AUTOMOUNT) {
                    Some(Value::Bool(false)) => true,
                    Some(_) => return true,
                    None => off,
                };
                (is_pod_spec(o) && !off) || o.values().any(|x| walk(x, off))
            }
            Value::Array(a) => a.iter().any(|x| walk(x, off)),
            _ => false,
        }
    }
    let Some(ops) = json_patch_ops(v) else {
        return walk(v, false);
    };
    let (mut off, mut on, mut touches) = (false, false, false);
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = op.get("path").and_then(Value::as_str).unwrap_or("");
        let from = op.get("from").and_then(Value::as_str).unwrap_or("");
        let names = |p: &str, keys: &[&str]| p.split('/').any(|s| keys.contains(&s));
        if matches!(kind, "add" | "replace")
            && path.rsplit('/').next() == Some(AUTOMOUNT)
            && op.get("value") == Some(&Value::Bool(false))
        {
            off = true;
            continue;
        }
        if kind == "test" {
            continue;
        }
        on |= names(path, &[AUTOMOUNT]) || names(from, &[AUTOMOUNT]);
        // (A value that is a pod spec counts as touching one: another operation may turn
        // the token off.)
        touches |= names(path, &POD_PATH_SEGMENTS)
            || names(from, &POD_PATH_SEGMENTS)
            || op.get("value").is_some_and(|x| walk(x, false));
    }
    on || (touches && !off)
}

/// Why a write of a pod, or of anything pods run from, reaches around the gateway, if it
/// does, and its class. A pod runs as whatever identity and with whatever it mounts, and its
/// logs are only a read away:
/// - Admin: the node itself (privileged, host namespaces, hostPath or gitRepo volumes
///   (which run git on the node), added capabilities);
/// - Exec (held for approval): a service account (its token is the pod's credential, and an
///   agent's own is the sidecar's), which every pod mounts unless its spec sets
///   `automountServiceAccountToken: false`, or Secrets (as env, volumes or a CSI driver's
///   secret), which would reach the agent unmasked.
///
/// Which writes: the pod-making kinds ([`POD_MAKERS`]) by name, and any other resource in
/// any group (custom resources: Argo Workflows, Knative, Tekton, KubeVirt, …) whose body
/// holds a pod spec's shape at any depth ([`has_pod_shape`]). Keys are looked for at any
/// depth, and in JSON patch paths; a pod-making kind's body that cannot be read is Admin.
fn pod_spec_risk(
    info: &RequestInfo,
    body: Option<&[u8]>,
) -> Option<(OperationClass, &'static str)> {
    if !info.subresource.is_empty() || !matches!(info.verb.as_str(), "create" | "update" | "patch")
    {
        return None;
    }
    let pod_maker = POD_MAKERS.contains(&info.resource.as_str());
    let body = body.filter(|b| !b.is_empty())?;
    let v = match body_value(body) {
        Some(v) => v,
        None if pod_maker => {
            return Some((OperationClass::Admin, "a pod body agentgate cannot read"));
        }
        // (Only built-in kinds come in protobuf, and the others hold no pod.)
        None => return None,
    };
    if !pod_maker && !has_pod_shape(&v) {
        return None;
    }
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
        "gitRepo",
        "hostDisk",
    ];
    if let Some(k) = node.iter().find(|k| has_key(&v, k)) {
        return Some((
            OperationClass::Admin,
            match *k {
                "privileged" => "a privileged container",
                "hostPath" | "hostDisk" => "a hostPath volume",
                "gitRepo" => "a gitRepo volume (git runs on the node)",
                "capabilities" => "container capabilities",
                _ => "the node's namespaces or ports",
            },
        ));
    }
    let credentials = [
        "serviceAccountName",
        "serviceAccount",
        "serviceAccountToken",
        "secretKeyRef",
        "secretRef",
        "secret",
        "secretName",
        // A CSI driver mounts what it is told to (a cloud secret store's values), with
        // a Secret of its own; flexVolume drivers likewise.
        "csi",
        "nodePublishSecretRef",
        "flexVolume",
    ];
    if credentials.iter().any(|k| has_key(&v, k)) {
        return Some((
            OperationClass::Exec,
            "a service account or Secrets mounted into a pod",
        ));
    }
    if mounts_token(&v) {
        return Some((
            OperationClass::Exec,
            "a pod that mounts a service-account token (its spec does not set automountServiceAccountToken: false)",
        ));
    }
    None
}

/// Why a request reaches into agentgate's own container ([`SIDECAR_CONTAINER`]), if it
/// does: an exec or attach naming it as its `container` (any value given), or a debug
/// container that targets it or is named after it. Refused whatever a policy or an approver
/// says. (Without a `container`, the API server picks the pod's only app container, never
/// an init container, which is where the sidecar is injected. Any exec, attach or
/// port-forward into a pod that carries the sidecar is refused too, once the gateway has
/// read the pod: [`pod_carries_sidecar`].)
pub fn reaches_sidecar(info: &RequestInfo, query: &str, body: Option<&[u8]>) -> Option<String> {
    if !info.resource_request || info.resource != "pods" {
        return None;
    }
    match info.subresource.as_str() {
        "exec" | "attach"
            if connect_params(query)
                .iter()
                .any(|(k, v)| k == "container" && v == SIDECAR_CONTAINER) =>
        {
            Some(format!(
                "{SIDECAR_CONTAINER} is agentgate's own container (it holds the Targets' credentials and the records' signing key): nobody may exec, attach or port-forward into it through agentgate, whatever a grant or an approver says; name the agent's own container (kubectl exec -c <container>)"
            ))
        }
        "ephemeralcontainers" if info.verb != "get" => {
            let body = body.filter(|b| !b.is_empty())?;
            let names_it = match body_value(body) {
                Some(v) => {
                    fn walk(v: &Value) -> bool {
                        match v {
                            Value::String(s) => s == SIDECAR_CONTAINER,
                            Value::Array(a) => a.iter().any(walk),
                            Value::Object(o) => o.values().any(walk),
                            _ => false,
                        }
                    }
                    walk(&v)
                }
                // Protobuf: strings are plain bytes there.
                None => body
                    .windows(SIDECAR_CONTAINER.len())
                    .any(|w| w == SIDECAR_CONTAINER.as_bytes()),
            };
            names_it.then(|| {
                format!(
                    "a debug container may not target or be named {SIDECAR_CONTAINER}, agentgate's own container (it holds the Targets' credentials and the records' signing key), whatever a grant or an approver says; target the agent's own container (kubectl debug --target=<container>)"
                )
            })
        }
        _ => None,
    }
}

/// The refusal of an exec, attach or port-forward into a pod that carries
/// [`SIDECAR_CONTAINER`].
pub fn sidecar_pod_refusal(pod: &str) -> String {
    format!(
        "pod {pod} carries {SIDECAR_CONTAINER}, agentgate's own container: an exec, attach or port-forward into it reaches the pod's loopback, where agentgate's gateways act as that pod's agent, so it is refused whatever a grant or an approver says; use a pod without the sidecar (or, to forward, a Service)"
    )
}

/// Whether a pod (the API server's JSON of it) carries [`SIDECAR_CONTAINER`] among any of
/// its containers, or says it was injected. `None` when it is not a pod's JSON.
pub fn pod_carries_sidecar(pod: &[u8]) -> Option<bool> {
    let v: Value = serde_json::from_slice(pod).ok()?;
    let spec = v.get("spec")?;
    let named = CONTAINER_LISTS.iter().any(|list| {
        spec.get(*list).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_CONTAINER))
        })
    });
    let injected = v
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .is_some_and(|a| a.contains_key("agentgate.dev/injected"));
    Some(named || injected)
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

/// Classifies a request. `body` is the request body as it is forwarded: a create's, an
/// update's or a patch's (JSON, or protobuf), or a delete's `DeleteOptions` (which only the
/// fingerprint reads).
pub fn classify(info: &RequestInfo, query: &str, body: Option<&[u8]>) -> Command {
    let mut keys = keys(info);
    let full_body = body;
    // What a write's body makes of objects; a delete's says only how to delete.
    let body = body.filter(|_| matches!(info.verb.as_str(), "create" | "update" | "patch"));
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
        && matches!(info.verb.as_str(), "create" | "update" | "patch")
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
        fingerprint: Fingerprint::known(fingerprint(info, query, full_body)),
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

/// The exact request a grant can be bound to: the request (with, for one with a body, its
/// API version and the body's media type), every value of every query parameter but those
/// that only page or time it ([`all_params`]), and the body as forwarded.
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

/// A query key or value decoded as the API server decodes it. The query was checked before
/// ([`super::request::check_query`] refuses what does not decode); should it not decode, it
/// is shown as it came, marked.
fn decoded(v: &str) -> String {
    super::request::decode_query_value(v).unwrap_or_else(|| format!("{v} (not decodable)"))
}

/// Every query parameter, decoded, sorted by name (every value of a name, in order), except
/// those that only page or time a request (so that a held read's retry, or a watch's, is the
/// same request).
pub fn all_params(query: &str) -> Vec<(String, String)> {
    let mut params: Vec<(String, String)> = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), decoded(v))
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
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            matches!(k, "command" | "container" | "stdin" | "tty" | "ports")
                .then(|| (k.to_owned(), decoded(v)))
        })
        .collect()
}

/// An exec's argument as an approver reads it: as it is when it is one plain word, else
/// quoted as a POSIX shell would need it (`sh -c 'echo a; rm b'` is three arguments, and
/// `sh -c echo a; rm b` six), so that no two commands read alike.
fn shell_word(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The text a record and an approver see: the request, for a connect request (exec,
/// attach, port-forward) the command, the container and whether stdin and a terminal are
/// attached (every value given), and for other requests the parameters that choose what
/// they reach (selectors, dry runs, …), every value of each.
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
        return s;
    }
    let params = connect_params(query);
    let values = |name: &str| -> Vec<&str> {
        params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let command = values("command");
    if !command.is_empty() {
        let words: Vec<String> = command.iter().map(|a| shell_word(a)).collect();
        s.push_str(": ");
        s.push_str(&words.join(" "));
    }
    let mut notes = Vec::new();
    let containers = values("container");
    if !containers.is_empty() {
        notes.push(format!("container {}", containers.join(", ")));
    }
    // As the API server reads them (the first value; anything but `0` or `false`).
    for flag in ["stdin", "tty"] {
        if !values(flag).is_empty() && super::request::query_flag(query, flag) {
            notes.push(flag.to_owned());
        }
    }
    let ports = values("ports");
    if !ports.is_empty() {
        notes.push(format!("ports {}", ports.join(", ")));
    }
    if !notes.is_empty() {
        s.push_str(&format!(" ({})", notes.join(", ")));
    }
    // A proxy passes its query to the pod or service: it is part of what runs.
    if info.subresource == "proxy" && !query.is_empty() {
        s.push_str(" ?");
        s.push_str(&decoded(query));
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
            // A pod spec that turns the service-account token off is a plain write.
            (
                "/apis/apps/v1/namespaces/a/deployments/orders",
                r#"{"spec":{"template":{"spec":{"automountServiceAccountToken":false,"containers":[{"name":"c","image":"orders:2","env":[{"name":"LOG","value":"secret"}]}]}}}}"#,
                OperationClass::Write,
            ),
            // One that does not gets its service account's token.
            (
                "/apis/apps/v1/namespaces/a/deployments/orders",
                r#"{"spec":{"template":{"spec":{"containers":[{"name":"c","image":"orders:2","env":[{"name":"LOG","value":"secret"}]}]}}}}"#,
                OperationClass::Exec,
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
            "create pods/exec web -n a: rm -rf /data (container app, stdin)"
        );
        let f1 = classify(&info, q1, None).fingerprint;
        let f2 = classify(&info, q2, None).fingerprint;
        assert_ne!(f1.get(), f2.get());
        assert_eq!(f1.get(), classify(&info, q1, None).fingerprint.get());
    }

    fn class_of(method: &str, path: &str, body: &str) -> OperationClass {
        class(method, path, body).0
    }

    #[test]
    fn a_pod_spec_that_does_not_turn_the_token_off_mounts_it() {
        let pod = "/api/v1/namespaces/a/pods";
        let deploy = "/apis/apps/v1/namespaces/a/deployments/orders";
        for (method, path, body, want) in [
            // A plain pod: the namespace's default account's token is mounted.
            (
                "POST",
                pod,
                r#"{"kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c","image":"busybox"}]}}"#,
                OperationClass::Exec,
            ),
            (
                "POST",
                pod,
                r#"{"kind":"Pod","metadata":{"name":"p"},"spec":{"automountServiceAccountToken":false,"containers":[{"name":"c","image":"busybox"}]}}"#,
                OperationClass::Write,
            ),
            // Set to anything but false (true, null in a merge patch) turns it on.
            (
                "PATCH",
                deploy,
                r#"{"spec":{"template":{"spec":{"automountServiceAccountToken":null}}}}"#,
                OperationClass::Exec,
            ),
            (
                "PATCH",
                deploy,
                r#"{"spec":{"template":{"spec":{"automountServiceAccountToken":true,"containers":[]}}}}"#,
                OperationClass::Exec,
            ),
            // A CronJob's template, in YAML.
            (
                "POST",
                "/apis/batch/v1/namespaces/a/cronjobs",
                "kind: CronJob\nspec:\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          containers: [{name: c, image: x}]\n",
                OperationClass::Exec,
            ),
            (
                "POST",
                "/apis/batch/v1/namespaces/a/cronjobs",
                "kind: CronJob\nspec:\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          automountServiceAccountToken: false\n          containers: [{name: c, image: x}]\n",
                OperationClass::Write,
            ),
            // `kubectl set image`: a strategic merge patch of the containers.
            (
                "PATCH",
                deploy,
                r#"{"spec":{"template":{"spec":{"$setElementOrder/containers":[{"name":"c"}],"containers":[{"image":"evil:1","name":"c"}]}}}}"#,
                OperationClass::Exec,
            ),
            // A JSON patch of a container, with and without turning the token off.
            (
                "PATCH",
                deploy,
                r#"[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"evil:1"}]"#,
                OperationClass::Exec,
            ),
            (
                "PATCH",
                deploy,
                r#"[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"evil:1"},{"op":"add","path":"/spec/template/spec/automountServiceAccountToken","value":false}]"#,
                OperationClass::Write,
            ),
            (
                "PATCH",
                deploy,
                r#"[{"op":"remove","path":"/spec/template/spec/automountServiceAccountToken"}]"#,
                OperationClass::Exec,
            ),
            (
                "PATCH",
                deploy,
                r#"[{"op":"add","path":"/spec/template/spec","value":{"containers":[{"name":"c","image":"x"}]}}]"#,
                OperationClass::Exec,
            ),
            // What does not touch the pod spec stays a write.
            (
                "PATCH",
                deploy,
                r#"{"spec":{"replicas":3}}"#,
                OperationClass::Write,
            ),
            (
                "PATCH",
                deploy,
                r#"{"spec":{"template":{"metadata":{"annotations":{"restartedAt":"now"}}}}}"#,
                OperationClass::Write,
            ),
            (
                "PATCH",
                deploy,
                r#"[{"op":"replace","path":"/spec/replicas","value":3}]"#,
                OperationClass::Write,
            ),
        ] {
            assert_eq!(class_of(method, path, body), want, "{method} {path} {body}");
        }
        let (_, keys) = class(
            "POST",
            pod,
            r#"{"spec":{"containers":[{"name":"c","image":"busybox"}]}}"#,
        );
        assert!(
            keys.iter().any(|k| k.starts_with("pod spec: ")
                && k.contains("automountServiceAccountToken: false")),
            "{keys:?}"
        );
    }

    #[test]
    fn pod_specs_are_checked_in_any_resource_of_any_group() {
        for (path, body, want) in [
            // Argo Workflows: a template's container; the token off for the whole workflow.
            (
                "/apis/argoproj.io/v1alpha1/namespaces/a/workflows",
                r#"{"kind":"Workflow","spec":{"entrypoint":"main","templates":[{"name":"main","container":{"image":"alpine","command":["sh"]}}]}}"#,
                OperationClass::Exec,
            ),
            (
                "/apis/argoproj.io/v1alpha1/namespaces/a/workflows",
                r#"{"kind":"Workflow","spec":{"automountServiceAccountToken":false,"templates":[{"name":"main","script":{"image":"alpine","source":"id"}}]}}"#,
                OperationClass::Write,
            ),
            (
                "/apis/argoproj.io/v1alpha1/namespaces/a/workflows",
                r#"{"kind":"Workflow","spec":{"automountServiceAccountToken":false,"templates":[{"name":"main","container":{"image":"alpine","securityContext":{"privileged":true}}}]}}"#,
                OperationClass::Admin,
            ),
            (
                "/apis/argoproj.io/v1alpha1/namespaces/a/workflows",
                r#"{"kind":"Workflow","spec":{"automountServiceAccountToken":false,"volumes":[{"name":"r","hostPath":{"path":"/"}}],"templates":[{"name":"main","container":{"image":"alpine"}}]}}"#,
                OperationClass::Admin,
            ),
            // Knative: a pod spec under spec.template.
            (
                "/apis/serving.knative.dev/v1/namespaces/a/services",
                r#"{"kind":"Service","spec":{"template":{"spec":{"containers":[{"image":"x"}]}}}}"#,
                OperationClass::Exec,
            ),
            (
                "/apis/serving.knative.dev/v1/namespaces/a/services",
                r#"{"kind":"Service","spec":{"template":{"spec":{"automountServiceAccountToken":false,"containers":[{"image":"x","envFrom":[{"secretRef":{"name":"db"}}]}]}}}}"#,
                OperationClass::Exec,
            ),
            // Tekton: a Task's steps.
            (
                "/apis/tekton.dev/v1/namespaces/a/tasks",
                r#"{"kind":"Task","spec":{"steps":[{"name":"s","image":"alpine","script":"id"}]}}"#,
                OperationClass::Exec,
            ),
            // KubeVirt: a virtual machine's volumes.
            (
                "/apis/kubevirt.io/v1/namespaces/a/virtualmachines",
                r#"{"kind":"VirtualMachine","spec":{"template":{"spec":{"domain":{"devices":{}},"volumes":[{"name":"sa","serviceAccount":{"serviceAccountName":"default"}}]}}}}"#,
                OperationClass::Exec,
            ),
            (
                "/apis/kubevirt.io/v1/namespaces/a/virtualmachines",
                r#"{"kind":"VirtualMachine","spec":{"template":{"spec":{"domain":{"devices":{}},"volumes":[{"name":"d","hostDisk":{"path":"/etc/shadow"}}]}}}}"#,
                OperationClass::Admin,
            ),
            (
                "/apis/kubevirt.io/v1/namespaces/a/virtualmachines",
                r#"{"kind":"VirtualMachine","spec":{"template":{"spec":{"domain":{"devices":{}},"volumes":[{"name":"d","containerDisk":{"image":"fedora"}}]}}}}"#,
                OperationClass::Write,
            ),
            // A JSON patch of a custom resource's containers.
            (
                "/apis/example.com/v1/namespaces/a/runners/r",
                r#"[{"op":"add","path":"/spec/podTemplate/spec/containers/-","value":{"name":"x","image":"evil"}}]"#,
                OperationClass::Exec,
            ),
            // No pod spec: keys that would matter in one do not here.
            (
                "/api/v1/namespaces/a/configmaps",
                r#"{"kind":"ConfigMap","data":{"secret":"x","privileged":"true","containers":"[]"}}"#,
                OperationClass::Write,
            ),
            (
                "/apis/example.com/v1/namespaces/a/widgets",
                r#"{"spec":{"containers":{"type":"array"},"secretName":"db"}}"#,
                OperationClass::Write,
            ),
            // (A `path` is a JSON patch's only in a JSON patch.)
            (
                "/api/v1/namespaces/a/configmaps",
                r#"{"data":{"path":"/spec/containers/0","secret":"x"}}"#,
                OperationClass::Write,
            ),
        ] {
            let method = if body.starts_with('[') {
                "PATCH"
            } else {
                "POST"
            };
            assert_eq!(class_of(method, path, body), want, "{path} {body}");
        }
        // Volumes that run git on the node, or mount what a CSI driver fetches.
        let pod = "/api/v1/namespaces/a/pods";
        let spec = |volume: &str| {
            format!(
                r#"{{"spec":{{"automountServiceAccountToken":false,"containers":[{{"name":"c","image":"x"}}],"volumes":[{{"name":"v",{volume}}}]}}}}"#
            )
        };
        for (volume, want) in [
            (
                r#""gitRepo":{"repository":"https://example.com/r.git"}"#,
                OperationClass::Admin,
            ),
            (
                r#""csi":{"driver":"secrets-store.csi.k8s.io","volumeAttributes":{"secretProviderClass":"db"}}"#,
                OperationClass::Exec,
            ),
            (
                r#""ephemeral":{"volumeClaimTemplate":{"spec":{"nodePublishSecretRef":{"name":"x"}}}}"#,
                OperationClass::Exec,
            ),
            (
                r#""flexVolume":{"driver":"example.com/x"}"#,
                OperationClass::Exec,
            ),
            (r#""emptyDir":{}"#, OperationClass::Write),
        ] {
            assert_eq!(class_of("POST", pod, &spec(volume)), want, "{volume}");
        }
        // Status writes do not change the spec.
        assert_eq!(
            class_of(
                "PUT",
                "/api/v1/namespaces/a/pods/p/status",
                r#"{"spec":{"containers":[{"name":"c","image":"x"}]},"status":{}}"#
            ),
            OperationClass::Write
        );
    }

    #[test]
    fn the_sidecars_own_container_is_never_reached() {
        let exec = parse("POST", "/api/v1/namespaces/a/pods/web/exec", "").unwrap();
        let attach = parse("POST", "/api/v1/namespaces/a/pods/web/attach", "").unwrap();
        for q in [
            "command=sh&container=agentgate-sidecar",
            "container=%61gentgate%2Dsidecar&command=id",
            "container=agentgate-sidecar&stdin=true",
        ] {
            let why = reaches_sidecar(&exec, q, None).unwrap();
            assert!(
                why.contains("agentgate-sidecar is agentgate's own container")
                    && why.contains("kubectl exec -c"),
                "{why}"
            );
            assert!(reaches_sidecar(&attach, q, None).is_some(), "{q}");
        }
        // The agent's container, or none (the API server picks the pod's only app
        // container; the sidecar is an init container).
        for q in ["command=sh&container=app", "command=sh"] {
            assert!(reaches_sidecar(&exec, q, None).is_none(), "{q}");
        }
        let debug = parse(
            "PATCH",
            "/api/v1/namespaces/a/pods/web/ephemeralcontainers",
            "",
        )
        .unwrap();
        let body = br#"{"spec":{"ephemeralContainers":[{"name":"d","image":"busybox","targetContainerName":"agentgate-sidecar"}]}}"#;
        assert!(
            reaches_sidecar(&debug, "", Some(body))
                .is_some_and(|w| w.contains("kubectl debug --target"))
        );
        let escaped = br#"{"spec":{"ephemeralContainers":[{"name":"d","targetContainerName":"agentgate-sidecar"}]}}"#;
        assert!(reaches_sidecar(&debug, "", Some(escaped)).is_some());
        let fine =
            br#"{"spec":{"ephemeralContainers":[{"name":"d","targetContainerName":"app"}]}}"#;
        assert!(reaches_sidecar(&debug, "", Some(fine)).is_none());
        // A port-forward's pod, as the API server returns it.
        let carrier = br#"{"kind":"Pod","metadata":{"name":"p"},"spec":{"initContainers":[{"name":"agentgate-sidecar","restartPolicy":"Always"}],"containers":[{"name":"app"}]}}"#;
        assert_eq!(pod_carries_sidecar(carrier), Some(true));
        let injected = br#"{"kind":"Pod","metadata":{"annotations":{"agentgate.dev/injected":"img"}},"spec":{"containers":[{"name":"app"}]}}"#;
        assert_eq!(pod_carries_sidecar(injected), Some(true));
        let plain =
            br#"{"kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"app"}]}}"#;
        assert_eq!(pod_carries_sidecar(plain), Some(false));
        assert_eq!(pod_carries_sidecar(b"not json"), None);
        assert!(sidecar_pod_refusal("p").contains("pod p carries agentgate-sidecar"));
    }

    #[test]
    fn what_an_approver_reads_of_a_connect_request_is_what_runs() {
        let exec = parse("POST", "/api/v1/namespaces/a/pods/web/exec", "").unwrap();
        // Arguments with spaces or quotes are quoted: these two differ, and read apart.
        let one = "command=sh&command=-c&command=echo+a%3B+rm+-rf+%2F&container=app";
        let split = "command=sh&command=-c&command=echo&command=a%3B&command=rm&command=-rf&command=%2F&container=app";
        assert_eq!(
            text(&exec, one),
            "create pods/exec web -n a: sh -c 'echo a; rm -rf /' (container app)"
        );
        assert_eq!(
            text(&exec, split),
            "create pods/exec web -n a: sh -c echo 'a;' rm -rf / (container app)"
        );
        assert_eq!(
            text(&exec, "command=echo&command=it%27s&command=&container=app"),
            r"create pods/exec web -n a: echo 'it'\''s' '' (container app)"
        );
        // stdin and a terminal are shown, as the API server reads the flags.
        assert_eq!(
            text(
                &exec,
                "command=sh&container=app&stdin=true&tty=1&stdout=true"
            ),
            "create pods/exec web -n a: sh (container app, stdin, tty)"
        );
        assert_eq!(
            text(&exec, "command=sh&container=app&stdin=false&tty=0"),
            "create pods/exec web -n a: sh (container app)"
        );
        assert_eq!(
            text(&exec, "command=sh&container=app&stdin"),
            "create pods/exec web -n a: sh (container app, stdin)"
        );
        let fp = |q: &str| classify(&exec, q, None).fingerprint.get().to_owned();
        assert_ne!(
            fp("command=sh&container=app"),
            fp("command=sh&container=app&stdin=true")
        );
        assert_ne!(
            fp("command=sh&container=app&tty=true"),
            fp("command=sh&container=app&tty=false")
        );
        // Every port of a port-forward.
        let pf = parse("POST", "/api/v1/namespaces/a/pods/web/portforward", "").unwrap();
        assert_eq!(
            text(&pf, "ports=80&ports=5432"),
            "create pods/portforward web -n a (ports 80, 5432)"
        );
        assert_ne!(
            classify(&pf, "ports=80", None).fingerprint.get(),
            classify(&pf, "ports=80&ports=5432", None).fingerprint.get()
        );
        // Every value of a repeated parameter elsewhere, decoded.
        let del = parse("DELETE", "/api/v1/namespaces/a/configmaps", "").unwrap();
        assert_eq!(
            text(&del, "dryRun=All&labelSelector=app%3Dweb"),
            "deletecollection configmaps -n a ?dryRun=All&labelSelector=app=web"
        );
        // A patch's media type and API version are part of what is approved.
        let mut patch = parse("PATCH", "/apis/apps/v1/namespaces/a/deployments/web", "").unwrap();
        let body: &[u8] = br#"{"spec":{"replicas":3}}"#;
        patch.media_type = "application/strategic-merge-patch+json".into();
        let strategic = classify(&patch, "", Some(body))
            .fingerprint
            .get()
            .to_owned();
        assert!(text(&patch, "").contains("(apps/v1, application/strategic-merge-patch+json)"));
        patch.media_type = "application/merge-patch+json".into();
        assert_ne!(
            classify(&patch, "", Some(body)).fingerprint.get(),
            strategic
        );
        patch.media_type = "application/strategic-merge-patch+json".into();
        patch.version = "v1beta1".into();
        assert_ne!(
            classify(&patch, "", Some(body)).fingerprint.get(),
            strategic
        );
    }

    #[test]
    fn a_deletes_options_are_part_of_the_request_not_of_its_class() {
        let mut del = parse("DELETE", "/api/v1/namespaces/a/secrets/db", "").unwrap();
        del.media_type = "application/json".into();
        let real: &[u8] =
            br#"{"kind":"DeleteOptions","apiVersion":"v1","propagationPolicy":"Background"}"#;
        let dry: &[u8] = br#"{"kind":"DeleteOptions","apiVersion":"v1","dryRun":["All"]}"#;
        let (a, b) = (
            classify(&del, "", Some(real)),
            classify(&del, "", Some(dry)),
        );
        assert_eq!(
            (a.class, b.class),
            (OperationClass::Write, OperationClass::Write)
        );
        assert_ne!(a.fingerprint.get(), b.fingerprint.get());
        // (Not read as a Secret, an RBAC object or a definition: in protobuf neither.)
        for path in [
            "/api/v1/namespaces/a/secrets/db",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/x.example.com",
        ] {
            let del = parse("DELETE", path, "").unwrap();
            assert_ne!(
                classify(&del, "", Some(b"k8s\0\x12\x00")).class,
                OperationClass::Admin,
                "{path}"
            );
        }
    }
}
