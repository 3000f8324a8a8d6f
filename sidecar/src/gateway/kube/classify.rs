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
    key_counts(v, key, &|_| true)
}

/// Whether `key` is a key of any object in `v` whose value `counts`, or a JSON patch reaches
/// it: an operation whose `path` or `from` goes through it counts, except an `add` or
/// `replace` of the key itself, which is judged by its value as the key would be.
fn key_counts(v: &Value, key: &str, counts: &dyn Fn(&Value) -> bool) -> bool {
    match v {
        Value::Object(o) => {
            let sets_it = o
                .get("op")
                .and_then(Value::as_str)
                .is_some_and(|op| matches!(op, "add" | "replace"))
                && o.get("path")
                    .and_then(Value::as_str)
                    .is_some_and(|p| p.rsplit('/').next() == Some(key));
            if sets_it && o.get("value").is_some_and(counts) {
                return true;
            }
            o.iter().any(|(k, x)| {
                (k == key && counts(x))
                    // A JSON patch names it in an operation's path.
                    || (matches!(k.as_str(), "path" | "from")
                        && !(sets_it && k == "path")
                        && x.as_str()
                            .is_some_and(|p| p.split('/').any(|seg| seg == key)))
                    || key_counts(x, key, counts)
            })
        }
        Value::Array(a) => a.iter().any(|x| key_counts(x, key, counts)),
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

/// Where a built-in pod-making kind holds its pod spec, as a JSON pointer into its object.
fn pod_spec_pointer(resource: &str) -> Option<&'static str> {
    match resource {
        "pods" => Some("/spec"),
        "podtemplates" => Some("/template/spec"),
        "cronjobs" => Some("/spec/jobTemplate/spec/template/spec"),
        "deployments"
        | "replicasets"
        | "statefulsets"
        | "daemonsets"
        | "jobs"
        | "replicationcontrollers" => Some("/spec/template/spec"),
        _ => None,
    }
}

/// Whether a strategic merge patch's directives in an object may delete fields the object
/// stands for: `$patch: replace` or `$patch: delete`, or a `$retainKeys` list that does not
/// keep `automountServiceAccountToken`.
fn clears_fields(o: &serde_json::Map<String, Value>) -> bool {
    let patch = o
        .get("$patch")
        .and_then(Value::as_str)
        .is_some_and(|p| matches!(p, "replace" | "delete"));
    let retain = o.get("$retainKeys").is_some_and(|r| {
        !r.as_array()
            .is_some_and(|keys| keys.iter().any(|k| k.as_str() == Some(AUTOMOUNT)))
    });
    patch || retain
}

/// The pod specs in `v` (JSON pointers, `at` being `v`'s own) that mount a service-account
/// token, into `specs`: a pod spec (the object that holds what runs, [`is_pod_spec`]) that
/// does not itself set `automountServiceAccountToken: false` (the field counts on that
/// object only: on any other, a Pod's top level or a Deployment's `spec`, the API server
/// drops it), and, at `known` (where the kind holds its pod spec), an object whose
/// strategic-merge-patch directives may delete the field ([`clears_fields`]) without setting
/// it `false`. Returns whether `v` sets the field anywhere to anything but `false` (`true`,
/// or `null`, which a merge patch reads as "remove").
fn token_specs(v: &Value, at: &str, known: Option<&str>, specs: &mut Vec<String>) -> bool {
    match v {
        Value::Object(o) => {
            let off = match o.get(AUTOMOUNT) {
                Some(Value::Bool(false)) => true,
                Some(_) => return true,
                None => false,
            };
            if !off && (is_pod_spec(o) || (known == Some(at) && clears_fields(o))) {
                specs.push(at.to_owned());
            }
            o.iter().any(|(k, x)| {
                let key = k.replace('~', "~0").replace('/', "~1");
                token_specs(x, &format!("{at}/{key}"), known, specs)
            })
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .any(|(i, x)| token_specs(x, &format!("{at}/{i}"), known, specs)),
        _ => false,
    }
}

/// The pod spec a JSON patch path reaches into: the pointer before its first segment in
/// [`POD_PATH_SEGMENTS`] (`/spec/template/spec` of `/spec/template/spec/containers/0/image`).
fn pod_spec_prefix(path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split('/').collect();
    let i = segs.iter().position(|s| POD_PATH_SEGMENTS.contains(s))?;
    Some(segs[..i].join("/"))
}

/// Whether `inner` is `outer` or inside it (JSON pointers).
fn within(outer: &str, inner: &str) -> bool {
    inner == outer
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Whether a JSON patch operation of kind `kind` at `target` inserts into or removes from an
/// array on the way to `p`, so that `p` names another object after it than before (`add` at
/// `/spec/templates/0` moves what `/spec/templates/0` named to `/spec/templates/1`).
/// Appending (`-`) shifts nothing; a key that is not an index is taken for one.
fn shifts(kind: &str, target: &str, p: &str) -> bool {
    if !matches!(kind, "add" | "copy" | "move" | "remove") {
        return false;
    }
    let Some((array, last)) = target.rsplit_once('/') else {
        return false;
    };
    let Ok(index) = last.parse::<u64>() else {
        return false;
    };
    let Some(rest) = p.strip_prefix(array).and_then(|r| r.strip_prefix('/')) else {
        return false;
    };
    let seg = rest.split('/').next().unwrap_or("");
    match seg.parse::<u64>() {
        Ok(j) => j >= index,
        Err(_) => seg != "-",
    }
}

/// Whether a JSON patch gives a pod its service account's token: it sets
/// `automountServiceAccountToken` to anything but `false`, or removes, moves or copies it;
/// or it reaches into a pod spec's containers (a path through [`POD_PATH_SEGMENTS`]), or adds
/// a pod spec that mounts one ([`token_specs`]), and does not set the field `false` on that
/// same pod spec (`/spec/template/spec/automountServiceAccountToken` beside
/// `/spec/template/spec/containers/…`; on `/spec`, which holds no containers, it is dropped).
/// A `false` set before an operation that overwrites, removes or shifts it (an insert into
/// an array on its way) no longer counts, and a pod spec an array shift moved cannot be
/// matched any more.
fn patch_mounts_token(ops: &[Value]) -> bool {
    // The pod specs the patch reaches (and whether a shift has moved one since), and those
    // it sets the field `false` in.
    let mut touched: Vec<(String, bool)> = Vec::new();
    let mut off: BTreeSet<String> = BTreeSet::new();
    let names = |p: &str| p.split('/').any(|s| s == AUTOMOUNT);
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        if kind == "test" {
            continue;
        }
        let path = op.get("path").and_then(Value::as_str).unwrap_or("");
        let from = op.get("from").and_then(Value::as_str);
        // What the operation overwrites or removes: its path, and a move's `from`.
        let mut changed = vec![path];
        if kind == "move"
            && let Some(f) = from
        {
            changed.push(f);
        }
        for t in &changed {
            off.retain(|p| !within(t, &format!("{p}/{AUTOMOUNT}")) && !shifts(kind, t, p));
            for (p, moved) in &mut touched {
                *moved |= shifts(kind, t, p);
            }
        }
        if matches!(kind, "add" | "replace")
            && op.get("value") == Some(&Value::Bool(false))
            && let Some((spec, AUTOMOUNT)) = path.rsplit_once('/')
        {
            off.insert(spec.to_owned());
            continue;
        }
        if names(path) || from.is_some_and(names) {
            return true;
        }
        for p in std::iter::once(path).chain(from) {
            if let Some(spec) = pod_spec_prefix(p) {
                touched.push((spec, false));
            }
        }
        if let Some(value) = op.get("value") {
            let mut specs = Vec::new();
            if token_specs(value, "", None, &mut specs) {
                return true;
            }
            touched.extend(specs.into_iter().map(|r| (format!("{path}{r}"), false)));
        }
    }
    touched.iter().any(|(p, moved)| *moved || !off.contains(p))
}

/// Whether a body gives a pod its service account's token (the default mounts the token of
/// the pod's service account, the namespace's `default` when it names none, and the
/// ServiceAccount's own setting cannot be seen from here): it sets
/// `automountServiceAccountToken` to anything but `false` at any depth, or holds a pod spec
/// that does not set it `false` itself ([`token_specs`]); a JSON patch, see
/// [`patch_mounts_token`].
fn mounts_token(info: &RequestInfo, v: &Value) -> bool {
    match json_patch_ops(v) {
        Some(ops) => patch_mounts_token(ops),
        None => {
            let mut specs = Vec::new();
            token_specs(v, "", pod_spec_pointer(&info.resource), &mut specs) || !specs.is_empty()
        }
    }
}

/// API groups the API server serves itself (`""` is the core group): any other is a custom
/// resource's (or an aggregated API's), whose schema agentgate does not know.
const BUILT_IN_GROUPS: [&str; 24] = [
    "",
    "apps",
    "batch",
    "autoscaling",
    "policy",
    "extensions",
    "networking.k8s.io",
    "rbac.authorization.k8s.io",
    "storage.k8s.io",
    "apiextensions.k8s.io",
    "admissionregistration.k8s.io",
    "apiregistration.k8s.io",
    "certificates.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
    "flowcontrol.apiserver.k8s.io",
    "node.k8s.io",
    "scheduling.k8s.io",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "resource.k8s.io",
    "internal.apiserver.k8s.io",
    "storagemigration.k8s.io",
];

/// Whether a group is a custom resource's ([`BUILT_IN_GROUPS`]).
fn is_custom_group(group: &str) -> bool {
    !BUILT_IN_GROUPS.contains(&group)
}

/// String fields that hold, as JSON or YAML text, a pod spec, a patch of one or a whole
/// manifest that a controller applies: Argo Workflows' `podSpecPatch` and resource
/// templates' `manifest`, a `template` given as text, Flux's and Kustomize's `patch`,
/// Kyverno's `patchesJson6902`, Helm values (`values`, `valuesContent`).
const EMBEDDED: [&str; 8] = [
    "podSpecPatch",
    "manifest",
    "manifests",
    "template",
    "patch",
    "patchesJson6902",
    "values",
    "valuesContent",
];

/// How deep text embedded in text is read.
const MAX_EMBEDDED_DEPTH: usize = 4;

/// Replaces every string field named in [`EMBEDDED`] (also the value of a JSON patch
/// operation whose path ends in one) with what it reads as, JSON or one YAML document (a
/// scalar stays one), so that the keys inside are checked as any others. `Err` when one
/// does not read (a template with `{{ }}` placeholders, several documents, YAML tags), or
/// text is embedded more than [`MAX_EMBEDDED_DEPTH`] deep.
fn expand_embedded(v: &mut Value, depth: usize) -> Result<(), ()> {
    match v {
        Value::Object(o) => {
            let op_sets_one = o.get("op").is_some()
                && o.get("path")
                    .and_then(Value::as_str)
                    .and_then(|p| p.rsplit('/').next())
                    .is_some_and(|last| EMBEDDED.contains(&last));
            for (k, x) in o.iter_mut() {
                let named = EMBEDDED.contains(&k.as_str()) || (op_sets_one && k == "value");
                let parsed = match &*x {
                    Value::String(text) if named => {
                        if depth >= MAX_EMBEDDED_DEPTH {
                            return Err(());
                        }
                        let json = super::yaml_as_json(text.as_bytes()).ok_or(())?;
                        let mut parsed: Value = serde_json::from_slice(&json).map_err(|_| ())?;
                        expand_embedded(&mut parsed, depth + 1)?;
                        parsed
                    }
                    _ => {
                        expand_embedded(x, depth)?;
                        continue;
                    }
                };
                *x = parsed;
            }
            Ok(())
        }
        Value::Array(a) => a.iter_mut().try_for_each(|x| expand_embedded(x, depth)),
        _ => Ok(()),
    }
}

/// Whether a custom resource names an image outside every pod spec agentgate reads
/// ([`is_pod_spec`], [`is_vm_spec`]), in an object or a JSON patch's path or value:
/// something runs it (an operator's pods, a Spark driver, a Flink job manager, a Helm
/// chart's values) from a pod spec agentgate cannot see, so whether its pods mount a
/// service-account token cannot be seen either.
fn stray_image(v: &Value) -> bool {
    let in_spec = |p: &str| p.split('/').any(|s| POD_PATH_SEGMENTS.contains(&s));
    let image = |p: &str| p.split('/').any(|s| s == "image");
    match v {
        Value::Object(o) if is_pod_spec(o) || is_vm_spec(o) => false,
        Value::Object(o) => {
            if o.get("op").is_some()
                && let Some(path) = o.get("path").and_then(Value::as_str)
            {
                // A JSON patch operation: into a pod spec, its value is one's.
                if in_spec(path) {
                    return false;
                }
                return image(path)
                    || o.get("from")
                        .and_then(Value::as_str)
                        .is_some_and(|f| !in_spec(f) && image(f))
                    || o.get("value").is_some_and(stray_image);
            }
            o.iter().any(|(k, x)| k == "image" || stray_image(x))
        }
        Value::Array(a) => a.iter().any(stray_image),
        _ => false,
    }
}

/// Whether a body adds Linux capabilities to a container: a `capabilities` object with a
/// non-empty `add`, or one that is not an object; in a JSON patch, an operation on
/// `capabilities` or on anything in it but its `drop` list. (Dropping capabilities, as
/// restricted pods do, is not a risk.)
fn adds_capabilities(v: &Value) -> bool {
    let adds = |c: &Value| match c {
        Value::Object(c) => c
            .get("add")
            .is_some_and(|a| !a.is_null() && a.as_array().is_none_or(|a| !a.is_empty())),
        Value::Null => false,
        _ => true,
    };
    match v {
        Value::Object(o) => {
            let in_path = o.get("op").is_some()
                && ["path", "from"].iter().any(|k| {
                    o.get(*k).and_then(Value::as_str).is_some_and(|p| {
                        let segs: Vec<&str> = p.split('/').collect();
                        segs.iter()
                            .position(|s| *s == "capabilities")
                            .is_some_and(|i| match segs.get(i + 1) {
                                Some(&"drop") => false,
                                Some(_) => true,
                                None => *k == "from" || o.get("value").is_none_or(adds),
                            })
                    })
                });
            in_path
                || o.iter()
                    .any(|(k, x)| (k == "capabilities" && adds(x)) || adds_capabilities(x))
        }
        Value::Array(a) => a.iter().any(adds_capabilities),
        _ => false,
    }
}

/// Why a body reaches the node, if it does: privileged containers, the node's namespaces
/// (`hostPID`, `hostNetwork`, `hostIPC`, `hostUsers` set to anything but `false`), node
/// ports, `hostPath` (also KubeVirt's `hostDisk`) or `gitRepo` volumes (git runs on the
/// node), an unmasked `procMount`, added capabilities.
fn node_risk(v: &Value) -> Option<&'static str> {
    let on = |x: &Value| !matches!(x, Value::Bool(false) | Value::Null);
    if key_counts(v, "privileged", &on) {
        return Some("a privileged container");
    }
    if ["hostPID", "hostNetwork", "hostIPC", "hostUsers"]
        .iter()
        .any(|k| key_counts(v, k, &on))
        || has_key(v, "hostPort")
    {
        return Some("the node's namespaces or ports");
    }
    if has_key(v, "hostPath") || has_key(v, "hostDisk") {
        return Some("a hostPath volume");
    }
    if adds_capabilities(v) {
        return Some("container capabilities");
    }
    if has_key(v, "procMount") {
        return Some("the node's namespaces or ports");
    }
    if has_key(v, "gitRepo") {
        return Some("a gitRepo volume (git runs on the node)");
    }
    None
}

/// Keys that give a pod a credential: a service account (its token), Secrets (as env, as
/// volumes, through a CSI or flexVolume driver, which mount what they are told to (a cloud
/// secret store's values) with a Secret of their own).
const CREDENTIAL_KEYS: [&str; 10] = [
    "serviceAccountName",
    "serviceAccount",
    "serviceAccountToken",
    "secretKeyRef",
    "secretRef",
    "secret",
    "secretName",
    "csi",
    "nodePublishSecretRef",
    "flexVolume",
];

/// Of [`CREDENTIAL_KEYS`], those that count anywhere in a custom resource, whatever its
/// shape (`secretName` and `secretRef` name where many a custom resource writes or reads a
/// Secret of its own, not a mount; a `secret` counts when it is an object, as a volume's).
const CREDENTIAL_KEYS_ANYWHERE: [&str; 6] = [
    "serviceAccountName",
    "serviceAccount",
    "serviceAccountToken",
    "csi",
    "nodePublishSecretRef",
    "flexVolume",
];

/// Why a write of a pod, or of anything pods run from, reaches around the gateway, if it
/// does, and its class. A pod runs as whatever identity and with whatever it mounts, and its
/// logs are only a read away:
/// - Admin: the node itself ([`node_risk`]);
/// - Exec (held for approval): a service account (its token is the pod's credential, and an
///   agent's own is the sidecar's), which every pod mounts unless its spec sets
///   `automountServiceAccountToken: false` ([`mounts_token`]), or Secrets (as env, volumes
///   or a CSI driver's secret), which would reach the agent unmasked.
///
/// Which writes: the pod-making kinds ([`POD_MAKERS`]) by name; any resource whose body
/// holds a pod spec's shape at any depth ([`has_pod_shape`]); and any custom resource
/// (a group not in [`BUILT_IN_GROUPS`]: Argo Workflows, Spark, Flink, Knative, Tekton,
/// KubeVirt, …), whose pod specs may hide under keys of its own: its text fields that embed
/// a pod spec or manifest are read first ([`expand_embedded`]; one that does not read is
/// Admin), the node keys and the service-account, volume and CSI keys
/// ([`CREDENTIAL_KEYS_ANYWHERE`]) count anywhere in it, and an image outside every pod spec
/// agentgate reads ([`stray_image`]) is Exec. Keys are looked for at any depth, and in JSON
/// patch paths; a pod-making kind's body that cannot be read is Admin.
fn pod_spec_risk(
    info: &RequestInfo,
    body: Option<&[u8]>,
) -> Option<(OperationClass, &'static str)> {
    if !info.subresource.is_empty() || !matches!(info.verb.as_str(), "create" | "update" | "patch")
    {
        return None;
    }
    let pod_maker = POD_MAKERS.contains(&info.resource.as_str());
    let custom = is_custom_group(&info.group);
    let body = body.filter(|b| !b.is_empty())?;
    let mut v = match body_value(body) {
        Some(v) => v,
        None if pod_maker => {
            return Some((OperationClass::Admin, "a pod body agentgate cannot read"));
        }
        // (Only built-in kinds come in protobuf, and the others hold no pod.)
        None => return None,
    };
    if custom && expand_embedded(&mut v, 0).is_err() {
        return Some((
            OperationClass::Admin,
            "a pod spec, patch or manifest given as text (podSpecPatch, manifest, template, patch, values) that agentgate cannot read as JSON or one plain YAML document",
        ));
    }
    let shaped = pod_maker || has_pod_shape(&v);
    let stray = custom && stray_image(&v);
    if !shaped && !stray && !custom {
        return None;
    }
    if let Some(what) = node_risk(&v) {
        return Some((OperationClass::Admin, what));
    }
    let credentials: &[&str] = if shaped || stray {
        &CREDENTIAL_KEYS
    } else {
        &CREDENTIAL_KEYS_ANYWHERE
    };
    if credentials.iter().any(|k| has_key(&v, k))
        || (custom && key_counts(&v, "secret", &Value::is_object))
    {
        return Some((
            OperationClass::Exec,
            "a service account or Secrets mounted into a pod",
        ));
    }
    if mounts_token(info, &v) {
        return Some((
            OperationClass::Exec,
            "a pod that mounts a service-account token (its spec does not set automountServiceAccountToken: false)",
        ));
    }
    if stray {
        return Some((
            OperationClass::Exec,
            "a custom resource that runs an image outside any pod spec agentgate reads (so whether its pods mount a service-account token cannot be seen)",
        ));
    }
    None
}

/// The segments of a kubelet path proxied through `nodes/<node>/proxy`, as the kubelet
/// reads them: percent-decoded (an encoded `/` too, as Go decodes a request's path), empty
/// and `.` segments dropped, `..` taking the one before away.
fn kubelet_segments(subpath: &str) -> Vec<String> {
    let b = subpath.as_bytes();
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .filter(|h| b[i] == b'%' && h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(b[i]);
                i += 1;
            }
        }
    }
    let mut segs: Vec<String> = Vec::new();
    for seg in String::from_utf8_lossy(&decoded).split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s.to_owned()),
        }
    }
    segs
}

/// The kubelet's endpoints, under `nodes/<node>/proxy`, that run a command in a container,
/// attach to one or forward a pod's ports: `/<endpoint>/<namespace>/<pod>/…`.
const KUBELET_INTO_PODS: [&str; 4] = ["exec", "attach", "run", "portforward"];

/// Why a request reaches into agentgate's own container ([`SIDECAR_CONTAINER`]), if it
/// does: an exec or attach naming it as its `container` (any value given), a debug
/// container that targets it or is named after it, or a kubelet path (`nodes/<node>/proxy`)
/// with a segment naming it (`/exec/<namespace>/<pod>/agentgate-sidecar`, `/run/…`,
/// `/attach/…`, `/checkpoint/…`, `/containerLogs/…`). Refused whatever a policy or an
/// approver says. (Without a `container`, the API server picks the pod's only app
/// container, never an init container, which is where the sidecar is injected. Any exec,
/// attach or port-forward into a pod that carries the sidecar, and any debug container added
/// to one or change of one, is refused too, once the gateway has read the pod:
/// [`pod_to_check`], [`pod_carries_sidecar`].)
pub fn reaches_sidecar(info: &RequestInfo, query: &str, body: Option<&[u8]>) -> Option<String> {
    if !info.resource_request {
        return None;
    }
    if info.resource == "nodes" && info.subresource == "proxy" {
        return kubelet_segments(&info.subpath)
            .iter()
            .any(|s| s.eq_ignore_ascii_case(SIDECAR_CONTAINER))
            .then(|| {
                format!(
                    "{SIDECAR_CONTAINER} is agentgate's own container (it holds the Targets' credentials and the records' signing key): no kubelet path through nodes/proxy may name it, whatever a grant or an approver says"
                )
            });
    }
    if info.resource != "pods" {
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

/// The pod (namespace, name) a request reaches into or changes, which the gateway reads
/// first to refuse the request when the pod carries [`SIDECAR_CONTAINER`]
/// ([`pod_carries_sidecar`]): an exec, attach or port-forward (also through the kubelet's
/// endpoints under `nodes/<node>/proxy`, [`KUBELET_INTO_PODS`]), a debug container added
/// (`pods/ephemeralcontainers`, any write), and an update or patch of the pod itself (its
/// containers' images and commands, its labels, which say whose agent it is). A command in
/// any of a pod's containers shares its loopback, where the sidecar's gateways act as that
/// pod's agent, another identity than the caller's with its grants. Deleting a pod, and
/// writing its status, reach nothing of it.
pub fn pod_to_check(info: &RequestInfo) -> Option<(String, String)> {
    if !info.resource_request {
        return None;
    }
    let this = || Some((info.namespace.clone(), info.name.clone()));
    match (info.resource.as_str(), info.subresource.as_str()) {
        ("pods", "exec" | "attach" | "portforward") => this(),
        ("pods", "ephemeralcontainers")
            if !matches!(info.verb.as_str(), "get" | "list" | "watch") =>
        {
            this()
        }
        ("pods", "") if matches!(info.verb.as_str(), "update" | "patch") => this(),
        ("nodes", "proxy") => match kubelet_segments(&info.subpath).as_slice() {
            [endpoint, namespace, pod, ..]
                if KUBELET_INTO_PODS.contains(&endpoint.to_ascii_lowercase().as_str()) =>
            {
                Some((namespace.clone(), pod.clone()))
            }
            _ => None,
        },
        _ => None,
    }
}

/// The refusal of a request into, or a change of, a pod that carries [`SIDECAR_CONTAINER`]
/// ([`pod_to_check`]), saying what the request would have done.
pub fn sidecar_pod_refusal(info: &RequestInfo, pod: &str) -> String {
    let (what, instead) = match info.subresource.as_str() {
        "ephemeralcontainers" => (
            "a debug container added to it runs beside agentgate's own container and shares the pod's loopback",
            "debug a pod without the sidecar",
        ),
        "" => (
            "a change of it (its containers' images or commands, its labels) runs other code beside agentgate's own container, on the pod's loopback, or changes whose agent the pod is",
            "change the Deployment or other owner that makes the pod, or ask a person",
        ),
        _ => (
            "an exec, attach or port-forward into it reaches the pod's loopback",
            "use a pod without the sidecar (or, to forward, a Service)",
        ),
    };
    format!(
        "pod {pod} carries {SIDECAR_CONTAINER}, agentgate's own container: {what}, where agentgate's gateways act as that pod's agent, so it is refused whatever a grant or an approver says; {instead}"
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
    // What a write's body makes of objects; a delete's says only how to delete, and a
    // proxied request's is the proxied server's.
    let body = body.filter(|_| {
        matches!(info.verb.as_str(), "create" | "update" | "patch") && info.subresource != "proxy"
    });
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

/// The exact request a grant can be bound to, hashed as a sequence of length-prefixed
/// fields, so that no value (a newline, `=` or `&` inside a decoded parameter) can make two
/// requests hash alike: every field of the request (verb, group, version, resource,
/// subresource, namespace, name, proxied path, the body's media type; a non-resource
/// request's path), its query (for a proxy the raw query the proxied server reads; else every
/// value of every parameter, decoded, but those that only page or time it ([`all_params`])),
/// and the body as forwarded.
fn fingerprint(info: &RequestInfo, query: &str, body: Option<&[u8]>) -> String {
    struct Fields(aws_lc_rs::digest::Context);
    impl Fields {
        fn put(&mut self, b: &[u8]) {
            let len = u64::try_from(b.len()).unwrap_or(u64::MAX);
            self.0.update(&len.to_be_bytes());
            self.0.update(b);
        }
        fn count(&mut self, n: usize) {
            self.put(&u64::try_from(n).unwrap_or(u64::MAX).to_be_bytes());
        }
    }
    let mut h = Fields(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256));
    h.put(b"agentgate kubernetes request, v2");
    h.put(&[u8::from(info.resource_request)]);
    for f in [
        &info.path,
        &info.verb,
        &info.group,
        &info.version,
        &info.resource,
        &info.subresource,
        &info.namespace,
        &info.name,
        &info.subpath,
        &info.media_type,
    ] {
        h.put(f.as_bytes());
    }
    if info.subresource == "proxy" {
        h.put(query.as_bytes());
    } else {
        let params = all_params(query);
        h.count(params.len());
        for (k, v) in &params {
            h.put(k.as_bytes());
            h.put(v.as_bytes());
        }
    }
    match body {
        Some(b) => {
            h.count(1);
            h.put(b);
        }
        None => h.count(0),
    }
    agentgate_crds::audit::chain::hex(h.0.finish().as_ref())
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

/// Characters an approver reads as themselves inside a word: no quote, space, `&`, `;`, `$`
/// or other character a shell or a query would read otherwise.
const PLAIN: &[u8] = b"-_./:=@%+,";

/// Characters that do not show as themselves (format characters such as a right-to-left
/// override or a zero-width space, separators): a word with one is written escaped.
fn invisible(c: char) -> bool {
    c.is_control()
        || (c.is_whitespace() && c != ' ')
        || matches!(c,
            '\u{ad}' | '\u{34f}' | '\u{61c}' | '\u{115f}' | '\u{1160}' | '\u{17b4}' | '\u{17b5}'
            | '\u{180b}'..='\u{180f}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}' | '\u{3164}' | '\u{fe00}'..='\u{fe0f}' | '\u{feff}'
            | '\u{ffa0}' | '\u{fff0}'..='\u{fffb}' | '\u{e0000}'..='\u{e0fff}')
}

/// A word (an exec's argument, a container's name, a query value) as an approver reads it,
/// so that no two words, nor two lists of words, read alike: as it is when it is one plain
/// word (ASCII letters and digits and `plain`); in double quotes with escapes (`\n`,
/// `\u{202e}`, `\"`, `\\`) when it holds a character that would not show as itself; else
/// in single quotes as a POSIX shell would need it (`sh -c 'echo a; rm b'` is three
/// arguments, and `sh -c echo 'a;' rm b` six). The first character says which.
fn word(arg: &str, plain: &[u8]) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || plain.contains(&b))
    {
        return arg.to_owned();
    }
    if arg.chars().any(invisible) {
        let mut out = String::from("\"");
        for c in arg.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if invisible(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
                c => out.push(c),
            }
        }
        out.push('"');
        return out;
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// An exec's argument as an approver reads it ([`word`]).
fn shell_word(arg: &str) -> String {
    word(arg, PLAIN)
}

/// A query value as an approver reads it ([`word`]): decoded, so `&`, `%` and `+` in it are
/// quoted (`a='x&dryRun=All'` is one parameter, `a=x&dryRun=All` two).
fn query_word(v: &str) -> String {
    word(v, b"-_./:=@,")
}

/// The text a record and an approver see: the request, and
/// - for an exec, attach or port-forward the command, the container and whether stdin and a
///   terminal are attached (every value given; the API server reads no other parameter
///   there, and agentgate refuses any other: [`super::request::check_known`]);
/// - for a proxy the query as the proxied server gets it (raw, as it is hashed);
/// - for any other request every parameter that is hashed into its fingerprint, decoded,
///   every value of each, a value that is not one plain word quoted ([`query_word`]).
pub fn text(info: &RequestInfo, query: &str) -> String {
    let mut s = info.describe();
    if info.subresource == "proxy" {
        // A proxy passes its query to the pod, service or node: part of what runs.
        if !query.is_empty() {
            s.push_str(" ?");
            s.push_str(query);
        }
        return s;
    }
    if !CONNECT.contains(&info.subresource.as_str()) {
        let params: Vec<String> = all_params(query)
            .into_iter()
            .map(|(k, v)| format!("{k}={}", query_word(&v)))
            .collect();
        if !params.is_empty() {
            s.push_str(" ?");
            s.push_str(&params.join("&"));
        }
        return s;
    }
    let params = connect_params(query);
    let values = |name: &str| -> Vec<String> {
        params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| shell_word(v))
            .collect()
    };
    let command = values("command");
    if !command.is_empty() {
        s.push_str(": ");
        s.push_str(&command.join(" "));
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
            // Argo Workflows: a template's container; the token off on the template (the
            // object that says what runs), not only for the whole workflow (the field counts
            // on the pod spec itself: elsewhere it may be a decoy the API server drops).
            (
                "/apis/argoproj.io/v1alpha1/namespaces/a/workflows",
                r#"{"kind":"Workflow","spec":{"entrypoint":"main","templates":[{"name":"main","container":{"image":"alpine","command":["sh"]}}]}}"#,
                OperationClass::Exec,
            ),
            (
                "/apis/argoproj.io/v1alpha1/namespaces/a/workflows",
                r#"{"kind":"Workflow","spec":{"automountServiceAccountToken":false,"templates":[{"name":"main","script":{"image":"alpine","source":"id"}}]}}"#,
                OperationClass::Exec,
            ),
            (
                "/apis/argoproj.io/v1alpha1/namespaces/a/workflows",
                r#"{"kind":"Workflow","spec":{"templates":[{"name":"main","automountServiceAccountToken":false,"script":{"image":"alpine","source":"id"}}]}}"#,
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
        assert!(sidecar_pod_refusal(&exec, "p").contains("pod p carries agentgate-sidecar"));
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

    fn fp(info: &RequestInfo, query: &str, body: Option<&[u8]>) -> String {
        classify(info, query, body).fingerprint.get().to_owned()
    }

    #[test]
    fn no_value_makes_two_requests_hash_or_read_alike() {
        // The reviewer's exec: an approver reads `ls`; the other runs `sh -c …` and `ls`.
        let exec = parse("POST", "/api/v1/namespaces/a/pods/web/exec", "").unwrap();
        let shown = "a=1%0Acommand%3Dsh%0Acommand%3D-c%0Acommand%3Did&command=ls&container=app";
        let runs = "a=1&command=sh&command=-c&command=id&command=ls&container=app";
        assert_ne!(fp(&exec, shown, None), fp(&exec, runs, None));
        // (agentgate refuses `a` for an exec anyway: request::check_known.)
        // The same with a dry run: `a` holds it, or the query does.
        let del = parse("DELETE", "/api/v1/namespaces/a/configmaps/c", "").unwrap();
        let (one, two) = ("a=x%0AdryRun%3DAll", "a=x&dryRun=All");
        assert_ne!(fp(&del, one, None), fp(&del, two, None));
        assert_eq!(text(&del, two), "delete configmaps c -n a ?a=x&dryRun=All");
        assert_eq!(
            text(&del, one),
            r#"delete configmaps c -n a ?a="x\ndryRun=All""#
        );
        assert_eq!(
            text(&del, "a=x%26dryRun%3DAll"),
            "delete configmaps c -n a ?a='x&dryRun=All'"
        );
        assert_ne!(fp(&del, "a=x%26dryRun%3DAll", None), fp(&del, two, None));
        // Field boundaries: a key's end, a value's, the body's start.
        assert_ne!(fp(&del, "ab=c", None), fp(&del, "a=bc", None));
        assert_ne!(fp(&del, "a=b", Some(b"x")), fp(&del, "a=bx", None));
        assert_ne!(fp(&del, "", Some(b"")), fp(&del, "", None));
        // Every hashed parameter is shown (also watch, follow, fieldManager), each value
        // quoted unless it is one plain word.
        let log = parse("GET", "/api/v1/namespaces/a/pods/web/log", "").unwrap();
        assert_eq!(
            text(&log, "follow=true&container=app"),
            "get pods/log web -n a ?container=app&follow=true"
        );
        let patch = parse("PATCH", "/api/v1/namespaces/a/configmaps/c", "").unwrap();
        assert_eq!(
            text(&patch, "fieldManager=kubectl+edit&dryRun=All"),
            "patch configmaps c -n a ?dryRun=All&fieldManager='kubectl edit'"
        );
        // Characters that do not show as themselves are escaped, in commands too.
        assert_eq!(
            text(&exec, "command=echo&command=a%E2%80%AEb&container=app"),
            r#"create pods/exec web -n a: echo "a\u{202e}b" (container app)"#
        );
        assert_eq!(
            text(&exec, "command=ls&container=app%2C+stdin"),
            "create pods/exec web -n a: ls (container 'app, stdin')"
        );
        // A proxy's query is the proxied server's: shown and hashed raw, every parameter
        // (those that only page or time other requests too).
        let proxy = parse("GET", "/api/v1/namespaces/a/services/web:80/proxy/x", "").unwrap();
        assert_ne!(fp(&proxy, "timeout=1", None), fp(&proxy, "timeout=2", None));
        assert_ne!(fp(&proxy, "a=%26", None), fp(&proxy, "a=&", None));
        assert_ne!(fp(&proxy, "q=a+b", None), fp(&proxy, "q=a%20b", None));
        assert_eq!(
            text(&proxy, "a=x%26b=y&command=rm"),
            "get services/proxy web:80 -n a path /x ?a=x%26b=y&command=rm"
        );
    }

    #[test]
    fn a_decoy_automount_field_does_not_turn_the_token_off() {
        let pod = "/api/v1/namespaces/a/pods";
        let deploy = "/apis/apps/v1/namespaces/a/deployments/orders";
        let app = r#"{"name":"c","image":"x"}"#;
        for (method, path, body, want) in [
            // Top-level on a Pod (an unknown field, dropped by the API server).
            (
                "POST",
                pod.to_owned(),
                format!(r#"{{"kind":"Pod","automountServiceAccountToken":false,"spec":{{"containers":[{app}]}}}}"#),
                OperationClass::Exec,
            ),
            // On a Deployment's spec (DeploymentSpec has no such field).
            (
                "PATCH",
                deploy.to_owned(),
                format!(r#"{{"spec":{{"automountServiceAccountToken":false,"template":{{"spec":{{"containers":[{app}]}}}}}}}}"#),
                OperationClass::Exec,
            ),
            // A second pod spec turns nothing off for the first.
            (
                "PATCH",
                deploy.to_owned(),
                format!(r#"{{"spec":{{"automountServiceAccountToken":false,"containers":[{app}],"template":{{"spec":{{"containers":[{app}]}}}}}}}}"#),
                OperationClass::Exec,
            ),
            // A JSON patch that sets it on /spec, beside a change of the template's containers.
            (
                "PATCH",
                deploy.to_owned(),
                r#"[{"op":"add","path":"/spec/automountServiceAccountToken","value":false},{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"evil"}]"#.to_owned(),
                OperationClass::Exec,
            ),
            // ... or on the pod spec, then replaces that pod spec.
            (
                "PATCH",
                deploy.to_owned(),
                format!(r#"[{{"op":"add","path":"/spec/template/spec/automountServiceAccountToken","value":false}},{{"op":"replace","path":"/spec/template/spec","value":{{"containers":[{app}]}}}}]"#),
                OperationClass::Exec,
            ),
            // ... or sets it on one Argo template, then inserts another before it.
            (
                "PATCH",
                "/apis/argoproj.io/v1alpha1/namespaces/a/workflows/w".to_owned(),
                r#"[{"op":"replace","path":"/spec/templates/0/container/image","value":"evil"},{"op":"add","path":"/spec/templates/0","value":{"name":"n"}},{"op":"add","path":"/spec/templates/0/automountServiceAccountToken","value":false}]"#.to_owned(),
                OperationClass::Exec,
            ),
            // The same pod spec as the containers: off.
            (
                "PATCH",
                deploy.to_owned(),
                r#"[{"op":"add","path":"/spec/template/spec/automountServiceAccountToken","value":false},{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"new"}]"#.to_owned(),
                OperationClass::Write,
            ),
            (
                "PATCH",
                "/apis/argoproj.io/v1alpha1/namespaces/a/workflows/w".to_owned(),
                r#"[{"op":"replace","path":"/spec/templates/1/container/image","value":"new"},{"op":"add","path":"/spec/templates/-","value":{"name":"n","automountServiceAccountToken":false,"container":{"image":"x"}}},{"op":"add","path":"/spec/templates/1/automountServiceAccountToken","value":false}]"#.to_owned(),
                OperationClass::Write,
            ),
            // A strategic merge patch's directives may delete it from the pod spec.
            (
                "PATCH",
                deploy.to_owned(),
                r#"{"spec":{"template":{"spec":{"$retainKeys":["containers","volumes"],"nodeSelector":{"a":"b"}}}}}"#.to_owned(),
                OperationClass::Exec,
            ),
            (
                "PATCH",
                deploy.to_owned(),
                r#"{"spec":{"template":{"spec":{"$patch":"replace","nodeSelector":{"a":"b"}}}}}"#.to_owned(),
                OperationClass::Exec,
            ),
            (
                "PATCH",
                "/apis/batch/v1/namespaces/a/cronjobs/c".to_owned(),
                r#"{"spec":{"jobTemplate":{"spec":{"template":{"spec":{"$patch":"delete"}}}}}}"#.to_owned(),
                OperationClass::Exec,
            ),
            (
                "PATCH",
                pod.to_owned() + "/p",
                format!(r#"{{"spec":{{"$patch":"replace","containers":[{app}],"automountServiceAccountToken":false}}}}"#),
                OperationClass::Write,
            ),
            (
                "PATCH",
                deploy.to_owned(),
                r#"{"spec":{"template":{"spec":{"$retainKeys":["automountServiceAccountToken","nodeSelector"],"nodeSelector":{"a":"b"}}}}}"#.to_owned(),
                OperationClass::Write,
            ),
            // (Directives elsewhere, as kubectl apply sends for volumes and strategies, do not.)
            (
                "PATCH",
                deploy.to_owned(),
                r#"{"spec":{"strategy":{"$retainKeys":["type"],"type":"Recreate"},"template":{"spec":{"volumes":[{"$retainKeys":["emptyDir","name"],"name":"v","emptyDir":{}}]}}}}"#.to_owned(),
                OperationClass::Write,
            ),
        ] {
            let b: &str = &body;
            assert_eq!(class_of(method, &path, b), want, "{path} {body}");
        }
    }

    #[test]
    fn pod_specs_under_a_custom_resources_own_keys() {
        let spark = "/apis/sparkoperator.k8s.io/v1beta2/namespaces/a/sparkapplications";
        let flink = "/apis/flink.apache.org/v1beta1/namespaces/a/flinkdeployments";
        let wf = "/apis/argoproj.io/v1alpha1/namespaces/a/workflows";
        let safe_template =
            r#""name":"main","automountServiceAccountToken":false,"container":{"image":"alpine"}"#;
        for (path, body, want) in [
            // A Spark application: its image and driver are not a pod spec agentgate reads.
            (
                spark,
                r#"{"kind":"SparkApplication","spec":{"type":"Python","image":"spark:3","mainApplicationFile":"local:///x.py"}}"#.to_owned(),
                OperationClass::Exec,
            ),
            (
                spark,
                r#"{"kind":"SparkApplication","spec":{"driver":{"securityContext":{"privileged":true}}}}"#.to_owned(),
                OperationClass::Admin,
            ),
            (
                spark,
                r#"{"kind":"SparkApplication","spec":{"volumes":[{"name":"r","hostPath":{"path":"/"}}]}}"#.to_owned(),
                OperationClass::Admin,
            ),
            (
                spark,
                r#"{"kind":"SparkApplication","spec":{"driver":{"serviceAccount":"spark-admin"}}}"#.to_owned(),
                OperationClass::Exec,
            ),
            (
                spark,
                r#"[{"op":"replace","path":"/spec/image","value":"evil"}]"#.to_owned(),
                OperationClass::Exec,
            ),
            // Flink: its image outside the pod template.
            (
                flink,
                r#"{"kind":"FlinkDeployment","spec":{"image":"flink:1.17","podTemplate":{"spec":{"automountServiceAccountToken":false,"containers":[{"name":"flink-main-container"}]}}}}"#.to_owned(),
                OperationClass::Exec,
            ),
            (
                flink,
                r#"{"kind":"FlinkDeployment","spec":{"podTemplate":{"spec":{"hostNetwork":true}}}}"#.to_owned(),
                OperationClass::Admin,
            ),
            // Argo's podSpecPatch is text: JSON or YAML, read and checked as any other keys.
            (
                wf,
                format!(r#"{{"kind":"Workflow","spec":{{"templates":[{{{safe_template},"podSpecPatch":"{{\"containers\":[{{\"name\":\"main\",\"securityContext\":{{\"privileged\":true}}}}]}}"}}]}}}}"#),
                OperationClass::Admin,
            ),
            (
                wf,
                format!(r#"{{"kind":"Workflow","spec":{{"templates":[{{{safe_template},"podSpecPatch":"hostPID: true\n"}}]}}}}"#),
                OperationClass::Admin,
            ),
            (
                wf,
                format!(r#"{{"kind":"Workflow","spec":{{"templates":[{{{safe_template},"podSpecPatch":"volumes:\n- name: s\n  secret: {{secretName: db}}\n"}}]}}}}"#),
                OperationClass::Exec,
            ),
            (
                wf,
                format!(r#"{{"kind":"Workflow","spec":{{"podSpecPatch":"automountServiceAccountToken: true","templates":[{{{safe_template}}}]}}}}"#),
                OperationClass::Exec,
            ),
            // ... and text that does not read is the worst.
            (
                wf,
                format!(r#"{{"kind":"Workflow","spec":{{"templates":[{{{safe_template},"podSpecPatch":"{{{{inputs.parameters.patch}}}}"}}]}}}}"#),
                OperationClass::Admin,
            ),
            (
                wf,
                r#"[{"op":"add","path":"/spec/templates/0/podSpecPatch","value":"{\"hostIPC\":true}"}]"#.to_owned(),
                OperationClass::Admin,
            ),
            // A resource template's manifest: a pod of its own.
            (
                wf,
                format!(r#"{{"kind":"Workflow","spec":{{"templates":[{{{safe_template}}},{{"name":"r","resource":{{"action":"create","manifest":"apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - name: x\n    image: evil\n"}}}}]}}}}"#),
                OperationClass::Exec,
            ),
            (
                wf,
                format!(r#"{{"kind":"Workflow","spec":{{"templates":[{{{safe_template}}}]}}}}"#),
                OperationClass::Write,
            ),
            // Node and credential keys count anywhere in a custom resource.
            (
                "/apis/example.com/v1/namespaces/a/runners",
                r#"{"spec":{"runner":{"hostNetwork":true}}}"#.to_owned(),
                OperationClass::Admin,
            ),
            (
                "/apis/example.com/v1/namespaces/a/runners",
                r#"{"spec":{"runAs":{"serviceAccountName":"admin"}}}"#.to_owned(),
                OperationClass::Exec,
            ),
            (
                "/apis/example.com/v1/namespaces/a/runners",
                r#"{"spec":{"mounts":[{"secret":{"secretName":"db"}}]}}"#.to_owned(),
                OperationClass::Exec,
            ),
            // ... but what names a Secret a custom resource writes is not a mount, switches
            // turned off are off, and dropping capabilities adds none.
            (
                "/apis/cert-manager.io/v1/namespaces/a/certificates",
                r#"{"spec":{"secretName":"web-tls","issuerRef":{"name":"le"},"dnsNames":["a.example.com"]}}"#.to_owned(),
                OperationClass::Write,
            ),
            (
                "/apis/example.com/v1/namespaces/a/runners",
                r#"{"spec":{"privileged":false,"hostNetwork":false,"capabilities":{"drop":["ALL"]},"selector":{"matchExpressions":[{"key":"a","operator":"In","values":["x: y","{{z}}"]}]}}}"#.to_owned(),
                OperationClass::Write,
            ),
            // Built-in kinds keep their shapes: a ConfigMap's or a Secret's text is theirs.
            (
                "/api/v1/namespaces/a/configmaps",
                r#"{"kind":"ConfigMap","data":{"podSpecPatch":"{{x}}","manifest":"hostPID: true","image":"x"}}"#.to_owned(),
                OperationClass::Write,
            ),
            (
                "/api/v1/namespaces/a/secrets",
                r#"{"kind":"Secret","stringData":{"values":"privileged: true","serviceAccountName":"x"}}"#.to_owned(),
                OperationClass::Write,
            ),
        ] {
            let method = if body.starts_with('[') {
                "PATCH"
            } else {
                "POST"
            };
            let path = if method == "PATCH" {
                format!("{path}/x")
            } else {
                path.to_owned()
            };
            assert_eq!(class_of(method, &path, &body), want, "{path} {body}");
        }
        // Capabilities in a pod: added is Admin, only dropped is not.
        let pod = "/api/v1/namespaces/a/pods";
        let with = |caps: &str| {
            format!(
                r#"{{"spec":{{"automountServiceAccountToken":false,"containers":[{{"name":"c","securityContext":{{"capabilities":{caps}}}}}]}}}}"#
            )
        };
        assert_eq!(
            class_of("POST", pod, &with(r#"{"add":["NET_ADMIN"]}"#)),
            OperationClass::Admin
        );
        assert_eq!(
            class_of("POST", pod, &with(r#"{"drop":["ALL"],"add":[]}"#)),
            OperationClass::Write
        );
        assert_eq!(
            class_of(
                "PATCH",
                "/api/v1/namespaces/a/pods/p",
                r#"[{"op":"add","path":"/spec/containers/0/securityContext/capabilities/add/-","value":"SYS_ADMIN"}]"#
            ),
            OperationClass::Admin
        );
    }

    #[test]
    fn requests_into_or_changing_a_pod_read_it_first() {
        let pod = |method: &str, path: &str| parse(method, path, "").unwrap();
        let web = Some(("a".to_owned(), "web".to_owned()));
        for (method, path) in [
            ("POST", "/api/v1/namespaces/a/pods/web/exec"),
            ("GET", "/api/v1/namespaces/a/pods/web/attach"),
            ("POST", "/api/v1/namespaces/a/pods/web/portforward"),
            ("PATCH", "/api/v1/namespaces/a/pods/web/ephemeralcontainers"),
            ("PUT", "/api/v1/namespaces/a/pods/web/ephemeralcontainers"),
            ("PATCH", "/api/v1/namespaces/a/pods/web"),
            ("PUT", "/api/v1/namespaces/a/pods/web"),
        ] {
            assert_eq!(pod_to_check(&pod(method, path)), web, "{method} {path}");
        }
        for (method, path) in [
            ("DELETE", "/api/v1/namespaces/a/pods/web"),
            ("GET", "/api/v1/namespaces/a/pods/web"),
            ("PATCH", "/api/v1/namespaces/a/pods/web/status"),
            ("GET", "/api/v1/namespaces/a/pods/web/ephemeralcontainers"),
            ("POST", "/api/v1/namespaces/a/pods/web/eviction"),
            ("PATCH", "/apis/apps/v1/namespaces/a/deployments/web"),
        ] {
            assert_eq!(pod_to_check(&pod(method, path)), None, "{method} {path}");
        }
        // The kubelet's own endpoints, through nodes/proxy, as the kubelet decodes them.
        for sub in [
            "exec/a/web/app",
            "run/a/web/app",
            "attach/a/web/uid/app",
            "portForward/a/web",
            "exec%2Fa%2Fweb%2Fapp",
            "x%2F..%2Fexec/a/%2E/web/app",
        ] {
            let node = pod("POST", &format!("/api/v1/nodes/n1/proxy/{sub}"));
            assert_eq!(pod_to_check(&node), web, "{sub}");
        }
        assert_eq!(
            pod_to_check(&pod("GET", "/api/v1/nodes/n1/proxy/metrics")),
            None
        );
        for sub in [
            "exec/a/web/agentgate-sidecar",
            "run/a/web/uid/agentgate-sidecar",
            "checkpoint/a/web/agentgate-sidecar",
            "containerLogs/a/web/agentgate-sidecar",
            "exec/a/web/agentgate%2Dsidecar",
            "exec/a/web/Agentgate-Sidecar",
        ] {
            let node = pod("POST", &format!("/api/v1/nodes/n1/proxy/{sub}"));
            assert!(
                reaches_sidecar(&node, "", None)
                    .is_some_and(|w| w.contains("no kubelet path through nodes/proxy may name it")),
                "{sub}"
            );
        }
        assert!(
            reaches_sidecar(
                &pod("POST", "/api/v1/nodes/n1/proxy/exec/a/web/app"),
                "",
                None
            )
            .is_none()
        );
        // What the refusal says follows what was asked.
        let debug = pod("PATCH", "/api/v1/namespaces/a/pods/web/ephemeralcontainers");
        assert!(sidecar_pod_refusal(&debug, "web").contains("a debug container added to it"));
        let edit = pod("PATCH", "/api/v1/namespaces/a/pods/web");
        assert!(sidecar_pod_refusal(&edit, "web").contains("change the Deployment"));
    }

    #[test]
    fn a_proxied_body_is_not_read_as_an_object() {
        let info = parse("POST", "/api/v1/namespaces/a/pods/web/proxy/login", "").unwrap();
        // Unreadable as JSON, it sets no owners (no delete of the pod is added).
        let c = classify(&info, "", Some(b"user=a&ownerReferences=x"));
        assert_eq!(c.class, OperationClass::Exec);
        assert!(
            !c.keys.iter().any(|k| k.starts_with("delete")),
            "{:?}",
            c.keys
        );
        assert_ne!(fp(&info, "", Some(b"a=1")), fp(&info, "", Some(b"a=2")));
    }
}
