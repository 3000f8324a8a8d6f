//! The Kubernetes API gateway: an HTTPS listener on loopback that kubectl and client
//! libraries reach through the kubeconfig the sidecar writes. Every request is authenticated
//! (the pod's identity, or a bearer token), authorized by the identity's baseline, its grants
//! and the guardrails, recorded, and forwarded to the Target's API server *as the agent*
//! (impersonation), so the API server's RBAC and audit log apply too. Responses are masked
//! (Secret data always, MaskPolicy detectors and paths) in JSON objects, lists, `Table`s,
//! watch streams and logs.
//!
//! The path `/targets/<name>/…` chooses the Target; without it, the only Kubernetes Target.

pub mod classify;
mod fallback;
pub mod list;
pub mod mask;
pub mod request;
pub mod spdy;
mod stream;
pub mod upstream;
pub mod ws;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agentgate_crds::Protocol;
use agentgate_crds::audit::{self as records, Outcome, RecordKind};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::audit::{SessionRecorder, agent_text};
use crate::gateway::postgres::session::Gateway;
use crate::mask::MaskSet;
use crate::policy::approval::Request as ApprovalRequest;
use crate::policy::{self, Decision, Snapshot, Verdict};

use self::request::RequestInfo;
use self::upstream::Upstream;

/// The largest request body forwarded (the API server's own limit is 3 MiB).
const MAX_REQUEST_BODY: usize = 3 << 20;
/// The largest response the gateway reads whole to mask it (a page of a list: clients page
/// large lists with `limit`/`continue`, as kubectl does by default).
const MAX_MASKED_RESPONSE: usize = 64 << 20;
/// How many responses are read whole at once (the rest wait), bounding the memory they take.
const MASKING_AT_ONCE: usize = 2;

/// The user name the API server sees for an identity (what RBAC binds).
pub fn impersonated_user(namespace: Option<&str>, identity: &str) -> String {
    match namespace {
        Some(ns) => format!("agentgate:agent:{ns}:{identity}"),
        None => format!("agentgate:agent:{identity}"),
    }
}

/// The group every agent is put in upstream.
pub const AGENTS_GROUP: &str = "agentgate:agents";

/// A response body.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// Resolves when a long-lived request's access ends ([`policy::live::ended`]).
type Ended = std::pin::Pin<Box<dyn std::future::Future<Output = Decision> + Send>>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// The Kubernetes gateway's state.
pub struct KubeGateway {
    /// Identity, policy, approvals and audit, shared with the other gateways.
    pub core: Arc<Gateway>,
    /// The namespace of the sidecar's policy objects (in a cluster), for user names.
    pub namespace: Option<String>,
    /// One client per Target, rebuilt when the Target changes.
    upstreams: Mutex<HashMap<String, (agentgate_crds::target::KubernetesTarget, Arc<Upstream>)>>,
    /// Compiled MaskPolicies per (identity, target), for the snapshot they came from.
    masks: crate::mask::MaskCache,
    /// Permits to read a response whole.
    buffering: tokio::sync::Semaphore,
    /// What recent exec and attach attempts over WebSocket got (kubectl retries over SPDY).
    fallbacks: fallback::Fallbacks,
}

impl KubeGateway {
    /// A gateway sharing `core`'s identity, policy and audit.
    pub fn new(core: Arc<Gateway>, namespace: Option<String>) -> Self {
        Self {
            core,
            namespace,
            upstreams: Mutex::new(HashMap::new()),
            masks: crate::mask::MaskCache::default(),
            buffering: tokio::sync::Semaphore::new(MASKING_AT_ONCE),
            fallbacks: fallback::Fallbacks::default(),
        }
    }

    fn upstream(&self, name: &str, snapshot: &Snapshot) -> Result<Arc<Upstream>, String> {
        let target = snapshot
            .targets
            .get(name)
            .and_then(|t| t.spec.kubernetes.clone())
            .ok_or_else(|| format!("Target {name} is not a Kubernetes cluster"))?;
        if let Ok(map) = self.upstreams.lock()
            && let Some((spec, up)) = map.get(name)
            && spec == &target
        {
            return Ok(up.clone());
        }
        let up = Arc::new(
            Upstream::new(&target, &self.core.targets_dir.join(name))
                .map_err(|e| format!("Target {name}: {e}"))?,
        );
        if let Ok(mut map) = self.upstreams.lock() {
            map.insert(name.to_owned(), (target, up.clone()));
        }
        Ok(up)
    }

    fn mask_set(
        &self,
        snapshot: &Arc<Snapshot>,
        identity: &str,
        target: &str,
    ) -> Result<Arc<MaskSet>, String> {
        self.masks
            .get(snapshot, identity, target, &self.core.targets_dir)
    }
}

/// The listener's certificate, made at start (loopback only; the kubeconfig trusts it).
pub struct ServingCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The TLS configuration.
    pub config: Arc<rustls::ServerConfig>,
}

/// Makes a self-signed certificate for `127.0.0.1` and `localhost`.
pub fn serving_cert() -> Result<ServingCert, String> {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .map_err(|e| format!("make the gateway's certificate: {e}"))?;
    let cert_pem = ck.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .map_err(|e| format!("the gateway's certificate: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(ServingCert {
        cert_pem,
        config: Arc::new(config),
    })
}

/// A kubeconfig for the agent: one cluster and context per Kubernetes Target, reaching the
/// gateway at `addr`, trusting `cert_pem`. A context for the cluster the pod runs in
/// (`(name, Some(namespace))`) defaults to the pod's namespace, as kubectl in a pod does.
pub fn kubeconfig(
    addr: SocketAddr,
    cert_pem: &str,
    targets: &[(String, Option<String>)],
) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(cert_pem);
    let mut clusters = String::new();
    let mut contexts = String::new();
    for (t, namespace) in targets {
        clusters.push_str(&format!(
            "- name: {t}\n  cluster:\n    server: https://{addr}/targets/{t}\n    certificate-authority-data: {ca}\n"
        ));
        let ns = namespace
            .as_deref()
            .map(|n| format!("    namespace: {n}\n"))
            .unwrap_or_default();
        contexts.push_str(&format!(
            "- name: {t}\n  context:\n    cluster: {t}\n    user: agent\n{ns}"
        ));
    }
    format!(
        "# Written by agentgate: every request goes through its gateway.\napiVersion: v1\nkind: Config\nclusters:\n{clusters}contexts:\n{contexts}users:\n- name: agent\n  user:\n    # Not a credential: the gateway knows who the pod is (or, with --pg-auth token, needs\n    # the agent's own token here). It keeps kubectl from asking for a password.\n    token: agentgate-pod-identity\ncurrent-context: {}\n",
        targets.first().map(|(t, _)| t.as_str()).unwrap_or("none")
    )
}

/// Keeps `<dir>/kubeconfig` (and `<dir>/kube-ca.crt`) listing the Kubernetes Targets of the
/// current policy.
pub async fn write_kubeconfig(
    dir: PathBuf,
    addr: SocketAddr,
    cert_pem: String,
    store: Arc<policy::PolicyStore>,
    pod_namespace: Option<String>,
) {
    let mut last: Option<Vec<(String, Option<String>)>> = None;
    loop {
        let targets: Vec<(String, Option<String>)> = store
            .get()
            .map(|s| {
                s.targets
                    .iter()
                    .filter(|(_, t)| t.spec.protocol == Protocol::Kubernetes)
                    .map(|(n, t)| {
                        let local = t
                            .spec
                            .kubernetes
                            .as_ref()
                            .is_none_or(|k| k.server.is_none());
                        (n.clone(), pod_namespace.clone().filter(|_| local))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if targets.is_empty() && last.is_none() {
            // Nothing to reach yet: no file (a kubeconfig without clusters helps nobody).
            last = Some(targets);
        } else if last.as_ref() != Some(&targets) {
            let write = || -> std::io::Result<()> {
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("kube-ca.crt"), &cert_pem)?;
                let tmp = dir.join(".kubeconfig.tmp");
                std::fs::write(&tmp, kubeconfig(addr, &cert_pem, &targets))?;
                std::fs::rename(&tmp, dir.join("kubeconfig"))
            };
            match write() {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), targets = ?targets, "kubeconfig written");
                    last = Some(targets);
                }
                Err(e) => {
                    // Said once per change of Targets, not every round.
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot write the kubeconfig");
                    last = Some(targets);
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// Accepts connections forever.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, gw: Arc<KubeGateway>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let acceptor = acceptor.clone();
        let gw = gw.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(sock),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let conn = Arc::new(Connection {
                gw,
                peer,
                sessions: Mutex::new(HashMap::new()),
            });
            let service = hyper::service::service_fn({
                let conn = conn.clone();
                move |req| {
                    let conn = conn.clone();
                    async move { Ok::<_, Infallible>(conn.handle(req).await) }
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
            conn.end();
        });
    }
}

/// One agent connection: its sessions (one per identity and target).
struct Connection {
    gw: Arc<KubeGateway>,
    peer: SocketAddr,
    sessions: Mutex<HashMap<(String, String), Arc<SessionRecorder>>>,
}

/// A refusal as the Kubernetes API answers one: a `Status` object.
pub fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Headers never forwarded upstream: everything but what Kubernetes clients send to say what
/// they want (an allowlist). The agent's credentials and identity claims (`Authorization`,
/// `Impersonate-*`, `X-Remote-*`), its own audit ids, compressed bodies the gateway could not
/// read, and hop-by-hop headers never pass; the gateway sets its own.
fn dropped_header(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "accept"
            | "content-type"
            | "user-agent"
            | "kubectl-command"
            | "kubectl-session"
            | "x-stream-protocol-version"
            | "sec-websocket-protocol"
            | "sec-websocket-key"
            | "sec-websocket-version"
            | "upgrade"
            | "cache-control"
            | "pragma"
    )
}

/// The longest request text (line, parameters, masked body) a hold may have: an approver is
/// shown all of it.
const MAX_APPROVABLE: usize = 16 << 10;

/// What a record and an approver see of a request: its line and its parameters
/// ([`classify::text`]: for an exec its command, for a proxy its query), and for a write its
/// body as JSON, masked as a response would be (Secret values always; field rules and value
/// detectors), for a proxied request its body as the text it is; then the whole masked by
/// the value detectors, control characters replaced.
/// The flag says whether it shows the request whole (an approver may decide on it): not
/// when a MaskPolicy cannot be loaded (the request line only), a body is not JSON, or the
/// text is too long or masked away.
fn request_text(
    info: &request::RequestInfo,
    query: &str,
    body: Option<&[u8]>,
    masks: Option<&MaskSet>,
) -> (String, bool) {
    let Some(masks) = masks else {
        let line = format!(
            "{} (parameters and body not recorded: the MaskPolicy could not be loaded)",
            agent_text(&info.describe(), 4096)
        );
        return (line, false);
    };
    let mut whole = true;
    let mut text = classify::text(info, query);
    if let Some(b) = body.filter(|b| !b.is_empty()) {
        let shown = if info.subresource == "proxy" {
            // The proxied server's, as it came (read by its Content-Type, shown with the
            // request): text as a quoted string, every character escaped that would not
            // show as itself; anything else is not shown.
            match std::str::from_utf8(b) {
                Ok(t) => serde_json::Value::String(t.to_owned()).to_string(),
                Err(_) => {
                    whole = false;
                    format!("({} bytes, not text: not shown)", b.len())
                }
            }
        } else {
            match serde_json::from_slice::<serde_json::Value>(b) {
                Ok(mut v) => {
                    // (A delete's body is its DeleteOptions, which hold no Secret values.)
                    if info.resource == "secrets"
                        && !matches!(info.verb.as_str(), "delete" | "deletecollection")
                    {
                        hide_secret_strings(&mut v);
                    }
                    elide_last_applied(&mut v);
                    let mut m = mask::Masker {
                        masks,
                        reveal_secrets: false,
                        hint: mask::kind_of(&info.group, &info.resource),
                        counts: BTreeMap::new(),
                    };
                    m.document(&mut v);
                    v.to_string()
                }
                // kubectl sends built-in kinds in protobuf: shown field by field; a Secret's
                // values are not.
                Err(_) => match classify::protobuf_text(b) {
                    Some(_) if info.resource == "secrets" => {
                        format!(
                            "(a Secret in protobuf, {} bytes: values not shown)",
                            b.len()
                        )
                    }
                    Some((t, shown)) => {
                        // Bytes only counted, or fields a MaskPolicy's path rules would mask
                        // (they are read in JSON only): not whole.
                        let kind = mask::kind_of(&info.group, &info.resource);
                        let paths = masks.has_kube_paths()
                            && kind
                                .as_ref()
                                .is_none_or(|(g, k)| !masks.kube_paths(g, k).is_empty());
                        whole &= shown && !paths;
                        format!("(protobuf) {t}")
                    }
                    None => {
                        whole = false;
                        format!("({} bytes, not JSON: not shown)", b.len())
                    }
                },
            }
        };
        text.push_str(" body: ");
        text.push_str(&shown);
    }
    // Longer than a record keeps and an approver is shown: the detectors read what is kept.
    if text.len() > MAX_APPROVABLE {
        whole = false;
        let mut cut = MAX_APPROVABLE + 1024;
        if cut < text.len() {
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
    }
    let text = agent_text(&text, usize::MAX);
    let text = match masks.mask(None, &text).0 {
        crate::mask::Masked::Clear => text,
        crate::mask::Masked::Text(t) => t,
        crate::mask::Masked::Null => {
            whole = false;
            "(masked whole by a SetNull rule)".to_owned()
        }
    };
    (text, whole)
}

/// Replaces every string of a Secret's body with `****` but what names it: at the top level
/// of an object its `apiVersion`, `kind`, `type` and `metadata`, and in a JSON patch each
/// operation's `op`, `path` and `from`.
fn hide_secret_strings(v: &mut serde_json::Value) {
    fn all(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => *s = mask::SECRET_REPLACEMENT.to_owned(),
            serde_json::Value::Array(a) => a.iter_mut().for_each(all),
            serde_json::Value::Object(o) => o.values_mut().for_each(all),
            _ => {}
        }
    }
    let keep = |o: &mut serde_json::Map<String, serde_json::Value>, names: &[&str]| {
        for (k, x) in o.iter_mut() {
            if !names.contains(&k.as_str()) {
                all(x);
            }
        }
    };
    match &mut *v {
        // A JSON patch: its operations.
        serde_json::Value::Array(ops) => {
            for op in ops {
                match op {
                    serde_json::Value::Object(o) => keep(o, &["op", "path", "from"]),
                    other => all(other),
                }
            }
        }
        serde_json::Value::Object(o) => keep(o, &["apiVersion", "kind", "type", "metadata"]),
        other => all(other),
    }
    // What names it, not what it holds: the annotations' values can hold anything.
    if let Some(a) = v
        .pointer_mut("/metadata/annotations")
        .filter(|a| a.is_object())
    {
        all(a);
    }
}

/// `kubectl apply` keeps a copy of the applied object in an annotation, doubling what an
/// approver reads; when the copy is the body itself, it is shown as such.
fn elide_last_applied(v: &mut serde_json::Value) {
    const KEY: &str = "kubectl.kubernetes.io/last-applied-configuration";
    let Some(copy) = v
        .pointer(&format!("/metadata/annotations/{}", KEY.replace('/', "~1")))
        .and_then(serde_json::Value::as_str)
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
    else {
        return;
    };
    let mut without = v.clone();
    if let Some(a) = without
        .pointer_mut("/metadata/annotations")
        .and_then(serde_json::Value::as_object_mut)
    {
        a.remove(KEY);
        if a.is_empty()
            && let Some(m) = without
                .pointer_mut("/metadata")
                .and_then(serde_json::Value::as_object_mut)
        {
            m.remove("annotations");
        }
    }
    let mut copy_plain = copy;
    if let Some(m) = copy_plain
        .pointer_mut("/metadata")
        .and_then(serde_json::Value::as_object_mut)
        && m.get("annotations")
            .and_then(serde_json::Value::as_object)
            .is_some_and(serde_json::Map::is_empty)
    {
        m.remove("annotations");
    }
    if copy_plain == without
        && let Some(a) = v
            .pointer_mut("/metadata/annotations")
            .and_then(serde_json::Value::as_object_mut)
    {
        a.insert(
            KEY.to_owned(),
            serde_json::Value::String("(kubectl's copy of this same object)".to_owned()),
        );
    }
}

/// What keeps a body the API server reads as JSON from being read the same way here: a key
/// given twice in one object (the API server's decoder merges, serde keeps the last), or
/// anything serde cannot read (the API server may skip it). `None` when it reads alike.
fn json_problem(bytes: &[u8]) -> Option<String> {
    match read_once(bytes) {
        Ok(()) => None,
        Err(e) if e.starts_with(TWICE) => Some(
            "it gives a key twice in one object (the API server would merge what agentgate reads as one): send each key once".into(),
        ),
        Err(e) => Some(format!(
            "it is not JSON agentgate can read ({e}): send JSON (numbers within range), YAML or protobuf"
        )),
    }
}

/// What [`read_once`] says of a key given twice.
const TWICE: &str = "a key given twice";

/// Whether a JSON document gives a key twice in one object. The API server's decoder merges
/// such objects where serde keeps the last: the gateway would judge another object than the
/// one created.
#[cfg(test)]
fn has_duplicate_keys(bytes: &[u8]) -> bool {
    read_once(bytes).is_err_and(|e| e.starts_with(TWICE))
}

/// Reads a JSON document whole, every value as serde_json reads it (numbers included), each
/// object's keys once.
fn read_once(bytes: &[u8]) -> Result<(), String> {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Any;
    impl<'de> Deserialize<'de> for Any {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(Check).map(|()| Any)
        }
    }
    struct Check;
    impl<'de> Visitor<'de> for Check {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
            while s.next_element::<Any>()?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = m.next_key::<String>()? {
                if !seen.insert(k) {
                    return Err(serde::de::Error::custom(TWICE));
                }
                m.next_value::<Any>()?;
            }
            Ok(())
        }
    }
    let mut d = serde_json::Deserializer::from_slice(bytes);
    Any::deserialize(&mut d)
        .and_then(|_| d.end())
        .map_err(|e| e.to_string())
}

/// A `Sec-WebSocket-Protocol` value without the subprotocols that carry a credential
/// (`base64url.bearer.authorization.k8s.io.<token>`); `None` when nothing else is left or
/// the value is not text.
fn without_bearer_protocols(v: &HeaderValue) -> Option<HeaderValue> {
    let kept: Vec<&str> = v
        .to_str()
        .ok()?
        .split(',')
        .map(str::trim)
        .filter(|p| {
            !p.is_empty()
                && !p
                    .to_ascii_lowercase()
                    .starts_with("base64url.bearer.authorization.k8s.io")
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// The offered exec/attach subprotocols agentgate reads ([`ws::TERMINAL_PROTOCOLS`]).
fn readable_protocols(v: &HeaderValue) -> Option<HeaderValue> {
    let kept: Vec<&str> = v
        .to_str()
        .ok()?
        .split(',')
        .map(str::trim)
        .filter(|p| ws::TERMINAL_PROTOCOLS.contains(p) && !p.is_empty())
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// How the gateway reads a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFormat {
    /// JSON: read, checked (each key once, every value readable) and forwarded as the JSON
    /// the gateway serialized from what it read.
    Json,
    /// YAML: read and forwarded as JSON ([`yaml_as_json`]).
    Yaml,
    /// Kubernetes protobuf (`k8s\0` and a `runtime.Unknown`): forwarded as it is.
    Protobuf,
}

/// The media types a request body may have, how each is read, and whether it is a patch's
/// (the API server reads a patch by its media type: a strategic merge patch and a merge
/// patch of the same body are different changes). Anything else (CBOR, an unknown or
/// misspelled type) is refused: the API server would read it some other way, or not at all.
const MEDIA_TYPES: [(&str, BodyFormat, bool); 7] = [
    ("application/json", BodyFormat::Json, false),
    ("application/yaml", BodyFormat::Yaml, false),
    (
        "application/vnd.kubernetes.protobuf",
        BodyFormat::Protobuf,
        false,
    ),
    ("application/json-patch+json", BodyFormat::Json, true),
    ("application/merge-patch+json", BodyFormat::Json, true),
    (
        "application/strategic-merge-patch+json",
        BodyFormat::Json,
        true,
    ),
    ("application/apply-patch+yaml", BodyFormat::Yaml, true),
];

/// A body agentgate refuses: the status, its reason, and the message.
type BodyRefusal = (StatusCode, &'static str, String);

/// The media types accepted for a verb, for a message.
fn accepted_media_types(patch: bool) -> String {
    MEDIA_TYPES
        .iter()
        .filter(|(_, _, p)| *p == patch)
        .map(|(t, _, _)| *t)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The request's `Content-Type` header, if it has one; more than one is refused (which one
/// the receiver reads cannot be told).
fn one_content_type(headers: &HeaderMap) -> Result<Option<&HeaderValue>, BodyRefusal> {
    let mut given = headers.get_all(header::CONTENT_TYPE).iter();
    let first = given.next();
    if given.next().is_some() {
        return Err((
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "agentgate refuses this body: the request has more than one Content-Type header; send one".into(),
        ));
    }
    Ok(first)
}

/// The media type of a request body and how it is read: the `Content-Type` header's type
/// without parameters, in any case, exactly one of [`MEDIA_TYPES`] (`application/json;
/// x=protobuf` is JSON). A patch must name a patch's type and other writes must not; a
/// write without a `Content-Type` is JSON, as the API server reads it.
fn body_media_type(
    headers: &HeaderMap,
    verb: &str,
) -> Result<(&'static str, BodyFormat), BodyRefusal> {
    let patch = verb == "patch";
    let first = one_content_type(headers)?;
    let media = match first {
        None if !patch => return Ok(("application/json", BodyFormat::Json)),
        None => String::new(),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|t| t.split(';').next())
            .map(|t| t.trim().to_ascii_lowercase())
            .unwrap_or_default(),
    };
    MEDIA_TYPES
        .iter()
        .find(|(t, _, p)| *t == media && *p == patch)
        .map(|(t, f, _)| (*t, *f))
        .ok_or_else(|| {
            let what = if patch {
                "a patch (PATCH), which names the kind of patch"
            } else {
                "a create, update or delete"
            };
            (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!(
                    "agentgate refuses this body: its Content-Type {media:?} is not one agentgate reads for {what}; send one of: {}",
                    accepted_media_types(patch)
                ),
            )
        })
}

/// The `Content-Type` of a proxied request's body, as it is forwarded (the proxied server
/// reads the body by it, so it is shown and hashed with the body): the header's value, whole;
/// `""` when there is none. More than one, or one that is not text, is refused.
fn proxied_media_type(headers: &HeaderMap) -> Result<String, BodyRefusal> {
    let first = one_content_type(headers)?;
    match first.map(HeaderValue::to_str) {
        None => Ok(String::new()),
        Some(Ok(t)) => Ok(t.trim().to_owned()),
        Some(Err(_)) => Err((
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "agentgate refuses this body: its Content-Type header is not plain text; send it in ASCII".into(),
        )),
    }
}

/// A write's body as the gateway judges and forwards it, and the media type it is forwarded
/// with (the `Content-Type` is set to exactly that): JSON read whole, each key once, and
/// forwarded as the JSON serialized from what was read, so the API server gets exactly the
/// bytes judged; YAML likewise as JSON (an apply patch keeps its type: JSON is YAML);
/// protobuf as it is.
fn judged_body(
    headers: &HeaderMap,
    verb: &str,
    body: &[u8],
) -> Result<(&'static str, Bytes), BodyRefusal> {
    let (media, format) = body_media_type(headers, verb)?;
    let bad = |why: String| {
        (
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("agentgate refuses this body: {why}"),
        )
    };
    let json = match format {
        BodyFormat::Protobuf => {
            if !body.starts_with(b"k8s\0") {
                return Err(bad(format!(
                    "it is sent as {media} but is not a Kubernetes protobuf body (which starts with k8s\\0); send it as JSON"
                )));
            }
            return Ok((media, Bytes::copy_from_slice(body)));
        }
        BodyFormat::Json => body.to_vec(),
        BodyFormat::Yaml => {
            // A body that is JSON is read as JSON (each key once) whatever it is labelled.
            if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
                && let Some(why) = json_problem(body)
            {
                return Err(bad(why));
            }
            match yaml_as_json(body) {
                Some(j) => j.to_vec(),
                None => {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "agentgate cannot read this YAML body (one document of plain YAML, no tags): send it as JSON".into(),
                    ));
                }
            }
        }
    };
    if let Some(why) = json_problem(&json) {
        return Err(bad(why));
    }
    let forwarded = serde_json::from_slice::<serde_json::Value>(&json)
        .ok()
        .and_then(|v| serde_json::to_vec(&v).ok())
        .ok_or_else(|| {
            bad("it is not JSON agentgate can read: send JSON, YAML or protobuf".into())
        })?;
    let media = match media {
        "application/yaml" => "application/json",
        other => other,
    };
    Ok((media, Bytes::from(forwarded)))
}

/// A YAML body as JSON, or `None` when it is not one plain YAML document: tags (`!!binary`,
/// which the API server decodes and the gateway's reader would not) are refused rather than
/// read two ways.
fn yaml_as_json(body: &[u8]) -> Option<Bytes> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        return serde_json::to_vec(&v).ok().map(Bytes::from);
    }
    let text = std::str::from_utf8(body).ok()?;
    if yaml_has_tags(text) {
        return None;
    }
    let mut v: serde_json::Value = serde_norway::from_str(text).ok()?;
    // A merge key (`<<: *defaults`) the API server's reader merges: not read two ways.
    if has_merge_key(&v) {
        return None;
    }
    whole_numbers(&mut v);
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

fn has_merge_key(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(m) => m.iter().any(|(k, v)| k == "<<" || has_merge_key(v)),
        serde_json::Value::Array(a) => a.iter().any(has_merge_key),
        _ => false,
    }
}

/// Floats without a fraction as integers, as the API server's YAML reader writes them
/// (`replicas: 1.0` is `1`).
fn whole_numbers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64())
                && f.fract() == 0.0
                && f.abs() < 9.0e15
            {
                #[allow(clippy::cast_possible_truncation)]
                let i = f as i64;
                *v = serde_json::Value::from(i);
            }
        }
        serde_json::Value::Object(m) => m.values_mut().for_each(whole_numbers),
        serde_json::Value::Array(a) => a.iter_mut().for_each(whole_numbers),
        _ => {}
    }
}

/// The indentation of a line, and whether it opens a block scalar (`key: |`, `- >-`) whose
/// content indentation its first line sets.
fn block_header(line: &str) -> Option<usize> {
    let content = line.split(" #").next().unwrap_or(line).trim_end();
    let indicator = content.trim_end_matches(['-', '+']);
    let rest = indicator.strip_suffix(['|', '>'])?;
    // Only after a key or a sequence dash (`key: |`, `- >-`): elsewhere `|` or `>` may end
    // a plain value, and the lines after it are YAML.
    let rest = rest.trim();
    let opens = rest.is_empty() || rest == "-" || (rest.ends_with(':') && !rest.starts_with('#'));
    opens.then(|| line.len() - line.trim_start().len())
}

/// Whether YAML text holds a tag (`!name`, `!!type`, `!<uri>`) outside quoted scalars.
/// Conservative: a `!` that starts a plain token anywhere counts.
fn yaml_has_tags(text: &str) -> bool {
    // A block scalar's lines are text, not YAML: (header indentation, content indentation).
    let mut block: Option<(usize, Option<usize>)> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some((header, content)) = block {
            if line.trim().is_empty() {
                continue;
            }
            let inside = match content {
                Some(c) => indent >= c,
                None => indent > header,
            };
            if inside {
                block = Some((header, Some(content.unwrap_or(indent))));
                continue;
            }
            block = None;
        }
        if let Some(header) = block_header(line) {
            block = Some((header, None));
        }
        // (A quoted scalar that goes on to the next line is read there as plain: only
        // more is taken for a tag.)
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match quote {
                Some('\'') if c == '\'' => {
                    if chars.peek() == Some(&'\'') {
                        chars.next();
                    } else {
                        quote = None;
                    }
                }
                Some('"') if c == '\\' => {
                    chars.next();
                }
                Some('"') if c == '"' => quote = None,
                Some(_) => {}
                None => match c {
                    '#' if prev.is_whitespace() => break,
                    '\'' | '"'
                        if prev.is_whitespace() || matches!(prev, '[' | '{' | ',' | ':' | '-') =>
                    {
                        quote = Some(c)
                    }
                    '!' if prev.is_whitespace()
                        || matches!(prev, '[' | '{' | ',' | ':' | '-' | '?') =>
                    {
                        return true;
                    }
                    _ => {}
                },
            }
            prev = c;
        }
    }
    false
}

/// Whether a non-resource path is a discovery document: `/api`, `/apis`, a group or group
/// version under them, `/version`, or the OpenAPI documents.
fn is_discovery(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    matches!(
        parts.as_slice(),
        ["api"] | ["api", _] | ["apis"] | ["apis", _] | ["apis", _, _] | ["version"]
    ) || matches!(parts.first(), Some(&"openapi"))
}

/// The Accept header without protobuf (answers are masked as JSON; clients fall back).
/// With `plain`, also without `as=Table` or metadata-only forms (whose cells and rows cannot
/// carry a MaskPolicy's paths).
fn json_accept(h: &HeaderMap, plain: bool) -> HeaderValue {
    let kept: Vec<&str> = h
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| {
            let media = v
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            // Parameter names as the API server reads them (trimmed, any case): `as =Table`
            // is `as=Table` there.
            let as_param = v.split(';').skip(1).any(|p| {
                p.split('=')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("as")
            });
            (media == "application/json" || media == "*/*" || media == "application/*")
                && !(plain && as_param)
        })
        .collect();
    if kept.is_empty() {
        HeaderValue::from_static("application/json")
    } else {
        HeaderValue::from_str(&kept.join(", "))
            .unwrap_or_else(|_| HeaderValue::from_static("application/json"))
    }
}

impl Connection {
    fn end(&self) {
        if let Ok(s) = self.sessions.lock() {
            for rec in s.values() {
                rec.end("the agent closed the connection");
            }
        }
    }

    fn session(&self, identity: &str, target: &str) -> Result<Arc<SessionRecorder>, String> {
        let key = (identity.to_owned(), target.to_owned());
        if let Ok(s) = self.sessions.lock()
            && let Some(rec) = s.get(&key)
        {
            return Ok(rec.clone());
        }
        let rec = Arc::new(self.gw.core.audit.session(
            identity,
            target,
            Protocol::Kubernetes,
            Some(self.peer.to_string()),
        )?);
        // Every request here gets an outcome, also one whose client went away mid-way.
        rec.track_outcomes();
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(key, rec.clone());
        }
        Ok(rec)
    }

    fn refusal_record(&self, identity: Option<&str>, target: &str, why: &str) {
        let mut r = records::Record::new(RecordKind::Refusal, crate::clock::now());
        r.identity = identity.map(str::to_owned);
        r.target = Some(agent_text(target, 253));
        r.protocol = Some(Protocol::Kubernetes);
        r.client = Some(self.peer.to_string());
        r.note = Some(agent_text(why, 512));
        if let Err(e) = self
            .gw
            .core
            .audit
            .admit()
            .and_then(|()| self.gw.core.audit.record(r))
        {
            tracing::warn!(error = %e, "a refused request could not be recorded");
        }
    }

    /// Serves one request; every answer is a response (refusals are `Status` objects).
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        match self.gw.fallbacks.attempt(&req, self.peer.ip()) {
            Some(attempt) => {
                let resp = self.answer_request(req).await;
                self.gw.fallbacks.answer(attempt, resp).await
            }
            None => self.answer_request(req).await,
        }
    }

    async fn answer_request(&self, req: Request<Incoming>) -> Response<Body> {
        let gw = &self.gw;
        let core = &gw.core;
        let Some(mut snapshot) = core.policy.get() else {
            let why = core
                .policy
                .error()
                .unwrap_or_else(|| "no policy loaded yet".into());
            self.refusal_record(None, "", &format!("policy not loaded: {why}"));
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                &format!(
                    "agentgate refuses requests until its policy is loaded: {why}; retry in a moment, and if it persists check the sidecar's log"
                ),
            );
        };
        // Which Target.
        let full_path = req.uri().path().to_owned();
        let (target, path) = match full_path.strip_prefix("/targets/") {
            Some(rest) => {
                let (t, p) = rest.split_once('/').unwrap_or((rest, ""));
                (t.to_owned(), format!("/{p}"))
            }
            None => {
                let clusters: Vec<&String> = snapshot
                    .targets
                    .iter()
                    .filter(|(_, t)| t.spec.protocol == Protocol::Kubernetes)
                    .map(|(n, _)| n)
                    .collect();
                match clusters.as_slice() {
                    [one] => ((*one).clone(), full_path.clone()),
                    _ => {
                        return status(
                            StatusCode::NOT_FOUND,
                            "NotFound",
                            "agentgate serves several clusters (or none): use a context of the kubeconfig it wrote, whose server ends in /targets/<Target>",
                        );
                    }
                }
            }
        };
        let query = req.uri().query().unwrap_or("").to_owned();
        // Who.
        let (identity, token) = match self.authenticate(&req, &snapshot).await {
            Ok(i) => i,
            Err((code, why)) => {
                self.refusal_record(None, &target, &why);
                return status(code, "Unauthorized", &why);
            }
        };
        if req
            .headers()
            .keys()
            .any(|h| h.as_str().starts_with("impersonate-"))
        {
            let why = "impersonation is not allowed through agentgate: requests always act as the agent's own identity";
            self.refusal_record(Some(&identity), &target, why);
            return status(StatusCode::FORBIDDEN, "Forbidden", why);
        }
        let mut info = match request::check_query(&query)
            .and_then(|()| request::parse(req.method().as_str(), &path, &query))
            .and_then(|i| request::check_repeated(&i, &query).map(|()| i))
            .and_then(|i| request::check_known(&i, &query).map(|()| i))
        {
            Ok(i) => i,
            Err(e) => {
                let why = format!("agentgate refuses the request: {e}");
                self.refusal_record(Some(&identity), &target, &why);
                return status(StatusCode::BAD_REQUEST, "BadRequest", &why);
            }
        };
        // Only a known Kubernetes Target gets a session (and records).
        if !snapshot
            .targets
            .get(&target)
            .is_some_and(|t| t.spec.protocol == Protocol::Kubernetes)
        {
            let why = format!(
                "agentgate knows no Kubernetes Target {target}; use a context of the kubeconfig it wrote"
            );
            self.refusal_record(Some(&identity), &target, &why);
            return status(StatusCode::NOT_FOUND, "NotFound", &why);
        }
        let rec = match self.session(&identity, &target) {
            Ok(r) => r,
            Err(why) => return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &why),
        };
        let id = rec.next_request();
        let started = Instant::now();
        // Only the connect subresources are upgraded; elsewhere an Upgrade header is dropped
        // (an upgraded answer would pass unmasked).
        let upgrade = req.headers().contains_key(header::UPGRADE)
            && matches!(
                info.subresource.as_str(),
                "exec" | "attach" | "portforward" | "proxy"
            );
        // Port-forward and upgraded proxy connections carry bytes agentgate cannot read to
        // mask: where values are masked for this identity, they are refused before anything
        // is decided or filed (as downloads are over SSH).
        if upgrade
            && !matches!(info.subresource.as_str(), "exec" | "attach")
            && gw
                .mask_set(&snapshot, &identity, &target)
                .is_ok_and(|m| m.has_value_rules())
        {
            let why = format!(
                "agentgate: {} is refused: a MaskPolicy masks values for AgentIdentity {identity} on Target {target}, and this connection would carry bytes agentgate cannot read to mask; read the data through requests agentgate masks (the API, logs, exec), or ask a platform owner about the MaskPolicy",
                info.describe()
            );
            self.refusal_record(Some(&identity), &target, &why);
            return status(StatusCode::FORBIDDEN, "Forbidden", &why);
        }
        // The body of a write, read whole (for the decision, the fingerprint and the record).
        let (mut parts, body) = req.into_parts();
        // (A delete's body is its DeleteOptions: a dry run, the propagation policy, a grace
        // period; it is judged, shown and forwarded like a write's. A proxied request's body
        // is the proxied server's: read whole for the fingerprint and the record, and
        // forwarded as it came.)
        let writes_body = matches!(
            info.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        ) && !upgrade
            && info.subresource != "exec"
            && info.subresource != "attach"
            && info.subresource != "portforward";
        let proxied = info.subresource == "proxy";
        let body: Option<Bytes> = if writes_body {
            match Limited::new(body, MAX_REQUEST_BODY).collect().await {
                Ok(b) => Some(b.to_bytes()),
                Err(_) => {
                    let why = format!(
                        "the request body is larger than {} MiB, or broke off",
                        MAX_REQUEST_BODY >> 20
                    );
                    return status(StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge", &why);
                }
            }
        } else {
            None
        };
        // A write's body is judged by its exact media type and forwarded as judged: JSON (and
        // YAML, made JSON: the API server's YAML reader would see what the gateway's does
        // not, `!!binary` keys and values, YAML 1.1 forms) must read whole, each key once
        // (the API server merges a key given twice where serde keeps the last, and skips
        // what it does not know where serde stops), and goes upstream as the JSON the
        // gateway serialized from what it read; protobuf goes as it is.
        let body = match body {
            Some(b) if !b.is_empty() && proxied => match proxied_media_type(&parts.headers) {
                Ok(media) => {
                    info.media_type = media;
                    Some(b)
                }
                Err((code, reason, why)) => {
                    self.refusal_record(Some(&identity), &target, &why);
                    return status(code, reason, &why);
                }
            },
            Some(b) if !b.is_empty() => match judged_body(&parts.headers, &info.verb, &b) {
                Ok((media, judged)) => {
                    parts
                        .headers
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static(media));
                    info.media_type = media.to_owned();
                    Some(judged)
                }
                Err((code, reason, why)) => {
                    self.refusal_record(Some(&identity), &target, &why);
                    return status(code, reason, &why);
                }
            },
            other => other,
        };
        // A delete with a body reads its options from the body only: options in its query
        // would be shown and not used.
        if let Err(e) = request::check_delete_options(
            &info,
            &query,
            body.as_ref().is_some_and(|b| !b.is_empty()),
        ) {
            let why = format!("agentgate refuses the request: {e}");
            self.refusal_record(Some(&identity), &target, &why);
            return status(StatusCode::BAD_REQUEST, "BadRequest", &why);
        }
        let cmd = classify::classify(&info, &query, body.as_deref());
        let now = crate::clock::now();
        let mut decision = if let Some(why) =
            classify::reaches_sidecar(&info, &query, body.as_deref())
        {
            // Never, whatever a policy or an approver says: the gateway's own container holds
            // the Targets' credentials and the records' signing key.
            Decision {
                verdict: Verdict::Refuse,
                rule: "agentgate-sidecar".into(),
                grant: None,
                message: why,
            }
        } else if info.group == classify::OWN_GROUP
            && !matches!(info.verb.as_str(), "get" | "list" | "watch")
        {
            // Never through the gateway, whatever a policy says: an agent could approve or
            // widen its own grants.
            Decision {
                verdict: Verdict::Refuse,
                rule: "agentgate-own-resources".into(),
                grant: None,
                message: "agentgate's own resources (grants, identities, policies, sessions) cannot be changed by an agent; ask a person to make the change".into(),
            }
        } else if !info.resource_request {
            // Discovery, version and OpenAPI documents (what every client reads first), for an
            // identity that may use this Target at all; nothing else (logs, metrics, debug).
            let discovery =
                matches!(info.verb.as_str(), "get" | "head") && is_discovery(&info.path);
            let probe = policy::Command {
                class: agentgate_crds::OperationClass::Read,
                fingerprint: cmd.fingerprint.clone(),
                keys: Default::default(),
                tables: Default::default(),
                unresolved: None,
                parts: Vec::new(),
                kube: None,
                ssh: None,
            };
            let d = policy::decide(Some(&snapshot), &identity, &target, &probe, now);
            if d.verdict == Verdict::Refuse {
                d
            } else if discovery {
                Decision {
                    verdict: Verdict::Allow,
                    rule: "discovery".into(),
                    grant: None,
                    message: String::new(),
                }
            } else {
                Decision {
                    verdict: Verdict::Refuse,
                    rule: "non-resource".into(),
                    grant: None,
                    message: format!(
                        "agentgate serves the Kubernetes API and its discovery documents only, not {}",
                        info.path
                    ),
                }
            }
        } else {
            policy::decide(Some(&snapshot), &identity, &target, &cmd, now)
        };
        // The pod must be the identity it serves, before anything runs or is filed for it.
        if decision.verdict != Verdict::Refuse
            && let Some(pod_user) = &core.pod_user
            && let Err(why) = crate::identity::pod::check(pod_user, &snapshot, &identity)
        {
            decision = Decision {
                verdict: Verdict::Refuse,
                rule: "pod-identity".into(),
                grant: None,
                message: why,
            };
        }
        // An exec, attach or port-forward, a debug container, or a changed container shares
        // the pod's loopback: in a pod that carries the sidecar, its gateways (which act as
        // that pod's agent). Checked before anyone is asked to approve it, and again before
        // it runs.
        if decision.verdict != Verdict::Refuse
            && let Err(why) = self
                .sidecar_pod_check(&target, &snapshot, &identity, &info)
                .await
        {
            decision = Decision {
                verdict: Verdict::Refuse,
                rule: "agentgate-sidecar".into(),
                grant: None,
                message: why,
            };
        }
        // What the record and an approver see: masked as responses are (a MaskPolicy that
        // cannot be loaded leaves the request line only).
        let early_masks = gw.mask_set(&snapshot, &identity, &target).ok();
        let (text, whole) = request_text(&info, &query, body.as_deref(), early_masks.as_deref());
        // A hold an approver cannot be shown whole cannot be approved.
        if decision.verdict == Verdict::Hold && !whole {
            decision = Decision {
                verdict: Verdict::Refuse,
                rule: decision.rule,
                grant: None,
                message: format!(
                    "{}; and the request cannot be shown whole to an approver (a body that is not JSON, longer than {MAX_APPROVABLE} bytes as an approver reads it, or a MaskPolicy that cannot be loaded), so it cannot be approved: send it as JSON, or split it",
                    decision.message,
                ),
            };
        }
        let text = crate::audit::truncated(text);
        // The record comes first: nothing is forwarded unrecorded.
        let mut r = rec.base(RecordKind::Request);
        r.request = Some(records::Request {
            id,
            text: text.clone(),
            operation: Some(cmd.class),
            fingerprint: (decision.verdict == Verdict::Hold)
                .then(|| cmd.fingerprint.get().to_owned()),
            via: Some(if upgrade {
                "upgrade".into()
            } else {
                parts.method.as_str().to_owned()
            }),
        });
        let mut d = crate::gateway::postgres::audit::decision(&decision);
        // A reason may quote the request (a path, a name): masked as its text is.
        d.reason = d.reason.map(|why| match early_masks.as_deref() {
            Some(m) => match m.mask(None, &why).0 {
                crate::mask::Masked::Clear => why,
                crate::mask::Masked::Text(t) => t,
                crate::mask::Masked::Null => String::new(),
            },
            None => why,
        });
        r.decision = Some(d);
        if let Err(why) = core.audit.admit().and_then(|()| rec.emit(r)) {
            return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &why);
        }
        match decision.verdict {
            Verdict::Allow => {}
            Verdict::Refuse => {
                let how = if decision.rule == "not-in-scope" {
                    format!(
                        "; to ask for it: {}",
                        crate::policy::hint::request_hint(&identity, &target, &cmd, str::to_owned)
                    )
                } else {
                    String::new()
                };
                let msg = format!(
                    "agentgate: {} is refused: {}{how}",
                    info.describe(),
                    decision.message
                );
                self.outcome(&rec, id, started, 403, 0, BTreeMap::new());
                return status(StatusCode::FORBIDDEN, "Forbidden", &msg);
            }
            Verdict::Hold => {
                let (msg, filed) = self
                    .hold(&snapshot, &identity, &target, &cmd, &text, &decision)
                    .await;
                // The Target's holdTimeout: wait for an approver, then run it.
                let wait = crate::policy::approval::hold_timeout(Some(&snapshot), &target);
                let Some(name) = filed.filter(|_| !wait.is_zero()) else {
                    self.outcome(&rec, id, started, 403, 0, BTreeMap::new());
                    return status(StatusCode::FORBIDDEN, "Forbidden", &msg);
                };
                // A client that goes away while it waits (the connection closes, and its
                // request is dropped here) gets its outcome all the same; nothing runs.
                let gone = Abandoned {
                    rec: &rec,
                    id,
                    started,
                    grant: &name,
                    armed: true,
                };
                let after = crate::policy::approval::await_decision(
                    &core.policy,
                    &identity,
                    &name,
                    wait,
                    || {
                        decide_as_pod(
                            core,
                            core.policy.get().as_deref(),
                            &identity,
                            &target,
                            &cmd,
                            crate::clock::now(),
                        )
                    },
                )
                .await;
                let by =
                    crate::gateway::postgres::audit::approver(core.policy.get().as_deref(), &name);
                gone.disarm();
                // An Approval record for what an approver decided; any other end of the wait
                // (the identity disabled, say) is the outcome's error alone.
                if (after.verdict == Verdict::Allow || after.rule == "denied")
                    && let Err(why) =
                        crate::gateway::postgres::audit::approval(&rec, id, &after, Some(&name), by)
                {
                    self.outcome(&rec, id, started, 503, 0, BTreeMap::new());
                    return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &why);
                }
                match after.verdict {
                    Verdict::Allow => {
                        tracing::info!(%identity, %target, grant = %name, "held request approved: running it");
                        match core.policy.get() {
                            Some(s) => snapshot = s,
                            None => {
                                self.outcome(&rec, id, started, 503, 0, BTreeMap::new());
                                return status(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "ServiceUnavailable",
                                    "agentgate has no policy loaded yet, so it refuses everything; retry shortly",
                                );
                            }
                        }
                        // The pod may have changed while the request waited.
                        if let Err(why) = self
                            .sidecar_pod_check(&target, &snapshot, &identity, &info)
                            .await
                        {
                            self.outcome(&rec, id, started, 403, 0, BTreeMap::new());
                            let msg = format!("agentgate: {} is refused: {why}", info.describe());
                            return status(StatusCode::FORBIDDEN, "Forbidden", &msg);
                        }
                    }
                    Verdict::Refuse => {
                        self.outcome(&rec, id, started, 403, 0, BTreeMap::new());
                        let msg = format!(
                            "agentgate: {} is refused: {}",
                            info.describe(),
                            after.message
                        );
                        return status(StatusCode::FORBIDDEN, "Forbidden", &msg);
                    }
                    Verdict::Hold => {
                        self.outcome(&rec, id, started, 403, 0, BTreeMap::new());
                        let msg = format!(
                            "{msg}; no approver decided within the Target's holdTimeout ({}), so it was not run: AccessGrant {name} stays pending; run the request again once it is approved",
                            agentgate_crds::common::format_duration(wait)
                        );
                        return status(StatusCode::FORBIDDEN, "Forbidden", &msg);
                    }
                }
            }
        }
        // Forward, as the agent.
        let up = match gw.upstream(&target, &snapshot) {
            Ok(u) => u,
            Err(why) => {
                self.outcome(&rec, id, started, 503, 0, BTreeMap::new());
                return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &why);
            }
        };
        let masks = match gw.mask_set(&snapshot, &identity, &target) {
            Ok(m) => m,
            Err(why) => {
                self.outcome(&rec, id, started, 503, 0, BTreeMap::new());
                return status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    &format!("agentgate refuses requests while {why}"),
                );
            }
        };
        let reveal =
            policy::reveals_secret_data(&snapshot, &identity, &target, &cmd, crate::clock::now());
        let user = impersonated_user(self.gw.namespace.as_deref(), &identity);
        let mut headers = HeaderMap::new();
        for (k, v) in &parts.headers {
            if !dropped_header(k) && k != header::ACCEPT && (upgrade || k != header::UPGRADE) {
                if *k == header::SEC_WEBSOCKET_PROTOCOL {
                    // A WebSocket client may carry a bearer token as a subprotocol: the
                    // agent's credentials never pass. For exec and attach only the
                    // protocols agentgate reads are offered, so the server cannot agree on
                    // one whose output it could not mask.
                    let terminal = matches!(info.subresource.as_str(), "exec" | "attach");
                    if let Some(v) = without_bearer_protocols(v).and_then(|v| {
                        if terminal {
                            readable_protocols(&v)
                        } else {
                            Some(v)
                        }
                    }) {
                        headers.append(k.clone(), v);
                    }
                    continue;
                }
                headers.append(k.clone(), v.clone());
            }
        }
        // Answers are masked as JSON: protobuf, CBOR and YAML are never asked for (clients
        // fall back to JSON). An upgrade's Accept passes as it is (kubelets' streaming
        // endpoints negotiate on it; nothing there is masked as an object).
        if !upgrade {
            headers.insert(
                header::ACCEPT,
                json_accept(&parts.headers, masks.has_kube_paths()),
            );
        } else {
            for v in parts.headers.get_all(header::ACCEPT) {
                headers.append(header::ACCEPT, v.clone());
            }
        }
        match up.authorization() {
            Ok(Some(a)) => {
                if let Ok(v) = HeaderValue::from_str(&a) {
                    headers.insert(header::AUTHORIZATION, v);
                }
            }
            Ok(None) => {}
            Err(e) => {
                self.outcome(&rec, id, started, 503, 0, BTreeMap::new());
                return status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    &format!("agentgate cannot read its upstream credential: {e}"),
                );
            }
        }
        let (Ok(user_v), Ok(group_v)) = (
            HeaderValue::from_str(&user),
            HeaderValue::from_str(AGENTS_GROUP),
        ) else {
            self.outcome(&rec, id, started, 400, 0, BTreeMap::new());
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the identity's name cannot be sent as a header",
            );
        };
        headers.insert("impersonate-user", user_v);
        headers.insert("impersonate-group", group_v);
        // What outlives this moment (an exec, a watch, a followed log) ends when the access
        // that allowed it ends: a grant expired or revoked, the identity disabled.
        let long_lived = upgrade
            || info.verb == "watch"
            || request::query_flag(&query, "follow")
            || info.subresource == "proxy";
        let ended: Option<Ended> = long_lived.then(|| {
            let core = self.gw.core.clone();
            let (identity, target, cmd) = (identity.clone(), target.clone(), cmd.clone());
            let token = token.clone();
            Box::pin(async move {
                policy::live::ended_when(core.policy.clone(), &identity, |snapshot, now| {
                    // A stream begun with a token ends with it: expired, no longer accepted
                    // by the API server, or mapping to another identity.
                    if let (Some(v), Some(verifier)) = (&token, core.verifier.as_ref()) {
                        let ended = verifier.still_valid(v).and_then(|()| match snapshot {
                            Some(s) => verifier.still_maps(v, s),
                            None => Ok(()),
                        });
                        if let Err(why) = ended {
                            return Decision {
                                verdict: Verdict::Refuse,
                                rule: "token-ended".into(),
                                grant: None,
                                message: format!("agentgate: {why}"),
                            };
                        }
                    }
                    decide_as_pod(&core, snapshot, &identity, &target, &cmd, now)
                })
                .await
            }) as Ended
        });
        if upgrade {
            return stream::upgrade(
                up,
                parts,
                headers,
                (&path, &query, &info.subresource),
                masks.clone(),
                rec,
                (id, started),
                ended,
            )
            .await;
        }
        let uri = if query.is_empty() {
            format!("{}{path}", up.base)
        } else {
            format!("{}{path}?{query}", up.base)
        };
        let mut out = Request::new(Full::new(body.clone().unwrap_or_default()));
        *out.method_mut() = parts.method.clone();
        *out.headers_mut() = headers;
        *out.uri_mut() = match uri.parse() {
            Ok(u) => u,
            Err(_) => {
                self.outcome(&rec, id, started, 400, 0, BTreeMap::new());
                return status(StatusCode::BAD_REQUEST, "BadRequest", "a malformed path");
            }
        };
        let resp = match up.client.request(out).await {
            Ok(r) => r,
            Err(e) => {
                self.outcome(&rec, id, started, 502, 0, BTreeMap::new());
                return status(
                    StatusCode::BAD_GATEWAY,
                    "ServiceUnavailable",
                    &format!(
                        "agentgate cannot reach the API server of {target}: {}",
                        with_causes(&e)
                    ),
                );
            }
        };
        let masker = mask::Masker {
            masks: &masks,
            reveal_secrets: reveal,
            hint: mask::kind_of(&info.group, &info.resource),
            counts: BTreeMap::new(),
        };
        self.answer(
            resp,
            &info,
            &query,
            masker,
            masks.clone(),
            rec,
            (id, started),
            ended,
        )
        .await
    }

    /// Verifies who is asking: the pod's identity, or a bearer token mapped to one.
    async fn authenticate(
        &self,
        req: &Request<Incoming>,
        snapshot: &Snapshot,
    ) -> Result<(String, Option<crate::identity::Verified>), (StatusCode, String)> {
        let core = &self.gw.core;
        match (&core.verifier, &core.identity) {
            (Some(verifier), _) => {
                let token = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .ok_or((
                        StatusCode::UNAUTHORIZED,
                        "agentgate needs the agent's token: send it as a bearer token (kubectl --token, or the kubeconfig's user)".to_owned(),
                    ))?;
                verifier
                    .verify(token, snapshot)
                    .await
                    .map(|v| (v.identity.clone(), Some(v)))
                    .map_err(|e| {
                        (
                            StatusCode::UNAUTHORIZED,
                            format!("agentgate refuses the token: {e}"),
                        )
                    })
            }
            (None, Some(identity)) => Ok((identity.clone(), None)),
            (None, None) => Err((
                StatusCode::UNAUTHORIZED,
                "agentgate has no identity configured for this listener".to_owned(),
            )),
        }
    }

    /// For a request into or changing a pod ([`classify::pod_to_check`]: an exec, attach or
    /// port-forward, also through the kubelet's endpoints; a debug container added; an update
    /// or patch of the pod), checks that the pod does not carry agentgate's own container
    /// ([`classify::SIDECAR_CONTAINER`]): a port-forward names no container and reaches every
    /// port on the pod's loopback, and code in any of the pod's containers shares that
    /// loopback, where the sidecar's gateways act as that pod's agent (another identity than
    /// the caller's, with its grants). The pod is read as the agent (kubectl reads it first
    /// too); a pod that cannot be read is refused. Other requests pass.
    async fn sidecar_pod_check(
        &self,
        target: &str,
        snapshot: &Snapshot,
        identity: &str,
        info: &RequestInfo,
    ) -> Result<(), String> {
        let Some((namespace, pod)) = classify::pod_to_check(info) else {
            return Ok(());
        };
        let cannot = |why: String| {
            format!(
                "agentgate reads the pod a request reaches into or changes (as the agent) to check that it does not carry {}, agentgate's own container, and could not read pod {pod}: {why}; the agent needs get on pods in namespace {namespace} (kubectl exec, port-forward, debug and edit read the pod too)",
                classify::SIDECAR_CONTAINER,
            )
        };
        let up = self.gw.upstream(target, snapshot).map_err(&cannot)?;
        let user = impersonated_user(self.gw.namespace.as_deref(), identity);
        // (Names with a character a path would read otherwise are no pod's.)
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        if !plain(&namespace) || !plain(&pod) {
            return Err(cannot(
                "its namespace or name is not a Kubernetes name".into(),
            ));
        }
        let uri = format!("{}/api/v1/namespaces/{namespace}/pods/{pod}", up.base);
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = uri
            .parse()
            .map_err(|_| cannot(format!("{uri:?} is not a URL")))?;
        let headers = req.headers_mut();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(a) = up
            .authorization()
            .map_err(|e| cannot(format!("its upstream credential: {e}")))?
            && let Ok(v) = HeaderValue::from_str(&a)
        {
            headers.insert(header::AUTHORIZATION, v);
        }
        let user_v = HeaderValue::from_str(&user)
            .map_err(|_| cannot("the identity's name cannot be sent as a header".into()))?;
        headers.insert("impersonate-user", user_v);
        headers.insert("impersonate-group", HeaderValue::from_static(AGENTS_GROUP));
        let resp = tokio::time::timeout(std::time::Duration::from_secs(10), up.client.request(req))
            .await
            .map_err(|_| cannot("the API server did not answer within 10 s".into()))?
            .map_err(|e| cannot(with_causes(&e)))?;
        let code = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_MASKED_RESPONSE)
            .collect()
            .await
            .map_err(|e| cannot(format!("its answer broke off ({e})")))?
            .to_bytes();
        if !code.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
                .unwrap_or_default();
            return Err(cannot(format!("HTTP {} {message}", code.as_u16())));
        }
        match classify::pod_carries_sidecar(&bytes) {
            Some(false) => Ok(()),
            Some(true) => Err(classify::sidecar_pod_refusal(info, &pod)),
            None => Err(cannot("the answer is not a pod".into())),
        }
    }

    /// Files (or finds) the AccessGrant request for a held request; the message says which.
    async fn hold(
        &self,
        snapshot: &Snapshot,
        identity: &str,
        target: &str,
        cmd: &policy::Command,
        text: &str,
        decision: &Decision,
    ) -> (String, Option<String>) {
        let req = ApprovalRequest {
            identity,
            target,
            class: cmd.class,
            fingerprint: cmd.fingerprint.get(),
            text,
            rule: &decision.rule,
            message: &decision.message,
        };
        match self.gw.core.approvals.file(Some(snapshot), &req).await {
            Ok(filed) => (
                format!(
                    "agentgate: held for approval ({}): AccessGrant {}; {}{}",
                    decision.message,
                    filed.name,
                    filed.how_to_approve,
                    policy::hint::scoped(identity, target, cmd, decision, str::to_owned)
                ),
                Some(filed.name),
            ),
            Err(e) => (
                format!(
                    "agentgate: {} and the request for approval could not be filed ({e}); send the request again once it can be (requests bound to one command, fingerprint {}, are filed by the gateway)",
                    decision.message,
                    cmd.fingerprint.get()
                ),
                None,
            ),
        }
    }

    fn outcome(
        &self,
        rec: &SessionRecorder,
        id: u64,
        started: Instant,
        code: u16,
        bytes: u64,
        masked: BTreeMap<String, u64>,
    ) {
        outcome(rec, id, started, code, bytes, 0, masked);
    }

    /// Relays (and masks) the API server's answer.
    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        resp: Response<Incoming>,
        info: &RequestInfo,
        query: &str,
        mut masker: mask::Masker<'_>,
        masks: Arc<MaskSet>,
        rec: Arc<SessionRecorder>,
        (id, started): (u64, Instant),
        ended: Option<Ended>,
    ) -> Response<Body> {
        let (mut parts, body) = resp.into_parts();
        let code = parts.status.as_u16();
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let encoded = parts
            .headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes() != b"identity");
        parts.headers.remove(header::CONTENT_LENGTH);
        let json = content_type.starts_with("application/json");
        let streaming = info.verb == "watch"
            || request::query_flag(query, "follow")
            || content_type.contains("stream");
        // What needs looking at: every resource answer when any rule could apply (Secrets are
        // always masked); discovery documents pass as they are.
        let needs_mask = info.resource_request
            && (info.resource == "secrets" || masks.has_value_rules() || masks.has_kube_paths());
        // A watch or a followed log ends when its access does.
        let why = stream::EndedBy::default();
        let live = |body: Incoming| match ended {
            Some(end) => stream::revocable(
                stream::incoming(body),
                end,
                info.verb == "watch" && json,
                why.clone(),
            ),
            None => stream::incoming(body),
        };
        if !needs_mask {
            let rec2 = rec.clone();
            let why = why.clone();
            let counted = stream::counted(live(body), move |bytes| {
                outcome_why(
                    &rec2,
                    (id, started, code),
                    bytes,
                    0,
                    BTreeMap::new(),
                    why.get().cloned(),
                );
            });
            return Response::from_parts(parts, counted);
        }
        if encoded {
            self.outcome(&rec, id, started, 502, 0, BTreeMap::new());
            return status(
                StatusCode::BAD_GATEWAY,
                "InternalError",
                "the API server answered compressed, which agentgate cannot mask; nothing was sent",
            );
        }
        if streaming {
            let mode = if json {
                stream::Mode::Json
            } else {
                stream::Mode::Text
            };
            let owned = stream::OwnedMasker {
                masks,
                reveal_secrets: masker.reveal_secrets,
                hint: masker.hint.clone(),
            };
            let body = stream::masked_lines(
                live(body),
                mode,
                owned,
                rec,
                id,
                started,
                code,
                Some(why.clone()),
            );
            return Response::from_parts(parts, body);
        }
        if json && info.verb == "list" {
            // A list streams, item by item.
            let owned = stream::OwnedMasker {
                masks,
                reveal_secrets: masker.reveal_secrets,
                hint: masker.hint.clone(),
            };
            let body = stream::masked_list(body, owned, rec, id, started, code);
            return Response::from_parts(parts, body);
        }
        let _permit = self.gw.buffering.acquire().await;
        let bytes = match Limited::new(body, MAX_MASKED_RESPONSE).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                self.outcome(&rec, id, started, 502, 0, BTreeMap::new());
                return status(
                    StatusCode::BAD_GATEWAY,
                    "InternalError",
                    &format!(
                        "agentgate could not read the API server's answer whole to mask it ({e}); answers over {} MiB are refused: page the list (limit and continue; kubectl pages by default)",
                        MAX_MASKED_RESPONSE >> 20
                    ),
                );
            }
        };
        let mut rows = None;
        let out: Bytes = if json {
            match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(mut v) => {
                    rows = v
                        .get("items")
                        .or_else(|| v.get("rows"))
                        .and_then(|i| i.as_array().map(|a| a.len() as u64));
                    masker.document(&mut v);
                    match serde_json::to_vec(&v) {
                        Ok(b) => Bytes::from(b),
                        Err(_) => Bytes::new(),
                    }
                }
                Err(_) => {
                    self.outcome(&rec, id, started, 502, 0, BTreeMap::new());
                    return status(
                        StatusCode::BAD_GATEWAY,
                        "InternalError",
                        "the API server's answer is not valid JSON, so agentgate cannot mask it; nothing was sent",
                    );
                }
            }
        } else if content_type.starts_with("text/") {
            // Logs: a line at a time, a private key's body followed from line to line.
            if masker.masks.has_value_rules() {
                let mut lines = crate::gateway::ssh::terminal::OutputMasker::default();
                let mut out = lines.feed(masker.masks, &bytes);
                out.extend(lines.flush(masker.masks));
                for (rule, n) in lines.masked {
                    *masker.counts.entry(rule).or_default() += n;
                }
                Bytes::from(out)
            } else {
                bytes
            }
        } else {
            self.outcome(&rec, id, started, 502, 0, BTreeMap::new());
            return status(
                StatusCode::BAD_GATEWAY,
                "InternalError",
                &format!(
                    "the API server answered {content_type:?}, which agentgate cannot mask; nothing was sent"
                ),
            );
        };
        let rows = rows.unwrap_or(0);
        outcome(
            &rec,
            id,
            started,
            code,
            out.len() as u64,
            rows,
            std::mem::take(&mut masker.counts),
        );
        Response::from_parts(parts, full(out))
    }
}

/// An error with its causes ("client error (Connect): invalid peer certificate: …").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// Records a request's outcome.
fn outcome(
    rec: &SessionRecorder,
    id: u64,
    started: Instant,
    code: u16,
    bytes: u64,
    rows: u64,
    masked: BTreeMap<String, u64>,
) {
    outcome_why(rec, (id, started, code), bytes, rows, masked, None);
}

/// Records a request's outcome; `why` says why agentgate cut it short, when it did.
fn outcome_why(
    rec: &SessionRecorder,
    (id, started, code): (u64, Instant, u16),
    bytes: u64,
    rows: u64,
    masked: BTreeMap<String, u64>,
    why: Option<String>,
) {
    let mut r = rec.base(RecordKind::Outcome);
    r.outcome = Some(Outcome {
        id,
        rows,
        bytes_in: 0,
        bytes_out: bytes,
        masked,
        latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        error: why.or_else(|| {
            (code >= 400).then(|| {
                format!(
                    "HTTP {code} {}",
                    StatusCode::from_u16(code)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("")
                )
            })
        }),
        status: Some(code),
    });
    if let Err(e) = rec.emit(r) {
        tracing::error!(session = rec.id(), error = %e, "a request's outcome could not be recorded");
    }
}

/// Records the outcome of a held request whose client went away while it waited (its
/// future is dropped with this guard still armed).
struct Abandoned<'a> {
    rec: &'a SessionRecorder,
    id: u64,
    started: Instant,
    grant: &'a str,
    armed: bool,
}

impl Abandoned<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            tracing::info!(grant = %self.grant, "a held request's client went away while it waited");
            outcome_why(
                self.rec,
                (self.id, self.started, 499),
                0,
                0,
                BTreeMap::new(),
                Some(format!(
                    "the client disconnected while it waited for approval; nothing ran; AccessGrant {} stays as it is",
                    self.grant
                )),
            );
        }
    }
}

/// [`policy::decide`], and for an allowed request that the pod is still the identity it
/// serves.
fn decide_as_pod(
    core: &Gateway,
    snapshot: Option<&Snapshot>,
    identity: &str,
    target: &str,
    cmd: &policy::Command,
    now: jiff::Timestamp,
) -> Decision {
    let d = policy::decide(snapshot, identity, target, cmd, now);
    match (&core.pod_user, snapshot) {
        (Some(pod_user), Some(s)) if d.verdict == Verdict::Allow => {
            match crate::identity::pod::check(pod_user, s, identity) {
                Ok(()) => d,
                Err(why) => Decision {
                    verdict: Verdict::Refuse,
                    rule: "pod-identity".into(),
                    grant: None,
                    message: why,
                },
            }
        }
        _ => d,
    }
}

#[cfg(test)]
mod tests {
    use super::{kubeconfig, request_text, without_bearer_protocols, yaml_as_json};

    #[test]
    fn a_key_given_twice_is_found_at_any_depth() {
        use super::has_duplicate_keys as dup;
        assert!(dup(br#"{"spec":{"hostPID":true},"spec":{}}"#));
        assert!(dup(br#"[{"a":{"b":1,"b":2}}]"#));
        assert!(!dup(br#"{"a":{"b":1},"c":[{"b":2},{"b":3}]}"#));
        assert!(!dup(b"not json"));
        // What serde cannot read is refused too (the API server would skip it).
        assert!(
            super::json_problem(br#"{"x":1e400,"spec":{"hostPID":true},"spec":{}}"#)
                .is_some_and(|w| w.contains("not JSON agentgate can read"))
        );
        assert!(super::json_problem(br#"{"a":[1,2.5,"x",null,true,{"b":{}}]}"#).is_none());
        assert!(super::json_problem(b"{} trailing").is_some());
    }

    #[test]
    fn what_an_approver_reads_shows_the_body_masked() {
        let p: agentgate_crds::MaskPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "MaskPolicy",
            "metadata": { "name": "pii" },
            "spec": { "rules": [ { "name": "emails", "detectors": ["Email", "Jwt"], "action": "Redact" } ] }
        }))
        .unwrap();
        let masks = crate::mask::MaskSet::compile(&[&p], &|_| None).unwrap();
        let text = |method: &str, path: &str, query: &str, body: &str| {
            let info = super::request::parse(method, path, query).unwrap();
            request_text(
                &info,
                query,
                (!body.is_empty()).then_some(body.as_bytes()),
                Some(&masks),
            )
            .0
        };
        // A write's body is shown, with what a response would mask masked.
        let t = text(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            "",
            r#"{"kind":"ConfigMap","metadata":{"name":"team"},"data":{"owner":"dana@example.com","replicas":"3"}}"#,
        );
        assert!(
            t.starts_with("create configmaps -n default body: ")
                && t.contains(r#""name":"team""#)
                && t.contains(r#""replicas":"3""#)
                && !t.contains("dana@example.com"),
            "{t}"
        );
        // A Secret's values never, in any form of write (a JSON patch too).
        for body in [
            r#"{"kind":"Secret","metadata":{"name":"db"},"data":{"password":"czNjcjN0"},"stringData":{"token":"s3cr3t"}}"#,
            r#"[{"op":"add","path":"/data/password","value":"czNjcjN0"}]"#,
        ] {
            let t = text("PATCH", "/api/v1/namespaces/default/secrets/db", "", body);
            assert!(!t.contains("czNjcjN0") && !t.contains("s3cr3t"), "{t}");
            assert!(t.contains("****"), "{t}");
        }
        // An exec's command is masked too; a proxy's query is shown.
        let t = text(
            "POST",
            "/api/v1/namespaces/default/pods/web/exec",
            "command=curl&command=-H&command=Authorization:+Bearer+eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl&container=app",
            "",
        );
        assert!(!t.contains("eyJhbGciOiJSUzI1NiJ9"), "{t}");
        // ... also inside a quoted argument.
        let t = text(
            "POST",
            "/api/v1/namespaces/default/pods/web/exec",
            "command=sh&command=-c&command=echo+owner%3A+dana%40example.com&container=app",
            "",
        );
        assert_eq!(
            t,
            "create pods/exec web -n default: sh -c 'echo owner: ****' (container app)"
        );
        let t = text(
            "GET",
            "/api/v1/namespaces/default/services/web:80/proxy/admin",
            "drop=all",
            "",
        );
        assert!(t.ends_with("?drop=all"), "{t}");
        // A proxied body is the proxied server's: shown as the text it is (JSON or not,
        // with its Content-Type), whole.
        let mut info = super::request::parse(
            "POST",
            "/api/v1/namespaces/default/services/web:80/proxy/login",
            "",
        )
        .unwrap();
        info.media_type = "application/x-www-form-urlencoded".into();
        let (t, whole) = request_text(
            &info,
            "",
            Some(b"user=dana&note=a\nb&mail=dana@example.com"),
            Some(&masks),
        );
        assert_eq!(
            t,
            r#"create services/proxy web:80 -n default path /login (v1, application/x-www-form-urlencoded) body: "user=dana&note=a\nb&mail=****""#
        );
        assert!(whole);
        let (t, whole) = request_text(&info, "", Some(br#"{"a":1,"a":2}"#), Some(&masks));
        assert!(t.ends_with(r#"body: "{\"a\":1,\"a\":2}""#) && whole, "{t}");
        let (t, whole) = request_text(&info, "", Some(b"\xff\xfe"), Some(&masks));
        assert!(
            t.ends_with("(2 bytes, not text: not shown)") && !whole,
            "{t}"
        );
        assert_eq!(
            super::proxied_media_type(&typed(&["text/plain; charset=utf-8"])).unwrap(),
            "text/plain; charset=utf-8"
        );
        assert_eq!(
            super::proxied_media_type(&hyper::HeaderMap::new()).unwrap(),
            ""
        );
        assert!(super::proxied_media_type(&typed(&["text/plain", "application/json"])).is_err());
        // Without the mask set, the request line only.
        let info =
            super::request::parse("POST", "/api/v1/namespaces/default/configmaps", "").unwrap();
        let (t, whole) = request_text(&info, "", Some(b"{}"), None);
        assert!(t.contains("not recorded") && !whole);
        // A Secret's nested `type` is a value too; kubectl's copy of the body is not repeated.
        let t = text(
            "PATCH",
            "/api/v1/namespaces/default/secrets/db",
            "",
            r#"[{"op":"add","path":"/data","value":{"type":"czNjcjN0"}}]"#,
        );
        assert!(!t.contains("czNjcjN0"), "{t}");
        let applied =
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"big"},"data":{"k":"v"}}"#;
        let body = serde_json::json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"big","annotations":{"kubectl.kubernetes.io/last-applied-configuration": applied}},"data":{"k":"v"}}).to_string();
        let t = text("POST", "/api/v1/namespaces/default/configmaps", "", &body);
        assert!(t.contains("kubectl's copy of this same object"), "{t}");
        // Not JSON: not whole, so a hold of it is refused.
        let info =
            super::request::parse("POST", "/api/v1/namespaces/default/configmaps", "").unwrap();
        assert!(!request_text(&info, "", Some(b"\xff{"), Some(&masks)).1);
    }

    /// Headers with these `Content-Type` values.
    fn typed(types: &[&str]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for t in types {
            h.append(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_str(t).unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_body_is_read_by_its_exact_media_type_and_forwarded_as_judged() {
        use super::judged_body;
        // The reviewer's case: JSON whose Content-Type only mentions protobuf is JSON, and a
        // key given twice is refused (the API server would merge a privileged hostPath pod).
        let twice = br#"{"kind":"Pod","spec":{"hostPID":true},"spec":{"containers":[]}}"#;
        for t in [
            "application/json; x=protobuf",
            "application/json;protobuf",
            "Application/JSON; charset=utf-8",
            " application/json ",
        ] {
            let (code, _, why) = judged_body(&typed(&[t]), "create", twice).unwrap_err();
            assert_eq!(code, hyper::StatusCode::BAD_REQUEST, "{t}");
            assert!(why.contains("gives a key twice"), "{t}: {why}");
        }
        for (t, verb) in [
            ("application/merge-patch+json; x=protobuf", "patch"),
            ("application/strategic-merge-patch+json", "patch"),
            ("application/json-patch+json", "patch"),
            ("application/apply-patch+yaml", "patch"),
            ("application/yaml", "update"),
        ] {
            let why = judged_body(&typed(&[t]), verb, twice).unwrap_err().2;
            assert!(why.contains("gives a key twice"), "{t}: {why}");
        }
        // Protobuf only by its exact type, and only a Kubernetes protobuf body.
        let (media, b) = judged_body(
            &typed(&["application/vnd.kubernetes.protobuf"]),
            "create",
            b"k8s\0\x12\x00",
        )
        .unwrap();
        assert_eq!(
            (media, &b[..]),
            ("application/vnd.kubernetes.protobuf", &b"k8s\0\x12\x00"[..])
        );
        let why = judged_body(
            &typed(&["application/vnd.kubernetes.protobuf; x=y"]),
            "create",
            twice,
        )
        .unwrap_err()
        .2;
        assert!(why.contains("not a Kubernetes protobuf body"), "{why}");
        // Any other type is refused, saying which are read.
        for (t, verb) in [
            ("application/json+protobuf", "create"),
            ("application/protobuf", "create"),
            ("text/plain", "create"),
            ("application/cbor", "create"),
            ("application/x-www-form-urlencoded", "delete"),
            ("application/json", "patch"),
            ("application/apply-patch+cbor", "patch"),
            ("application/merge-patch+json", "create"),
            ("", "patch"),
        ] {
            let (code, reason, why) = judged_body(&typed(&[t]), verb, b"{}").unwrap_err();
            assert_eq!(
                (code, reason),
                (
                    hyper::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType"
                ),
                "{t}"
            );
            assert!(
                why.contains("is not one agentgate reads")
                    && why.contains("send one of: application/"),
                "{t}: {why}"
            );
        }
        assert!(
            judged_body(&typed(&["text/plain"]), "create", b"{}")
                .unwrap_err()
                .2
                .contains(
                    "application/json, application/yaml, application/vnd.kubernetes.protobuf"
                )
        );
        assert!(
            judged_body(&hyper::HeaderMap::new(), "patch", b"{}")
                .unwrap_err()
                .2
                .contains("application/strategic-merge-patch+json")
        );
        assert!(
            judged_body(
                &typed(&["application/json", "application/json"]),
                "create",
                b"{}"
            )
            .unwrap_err()
            .2
            .contains("more than one Content-Type")
        );
        // What goes upstream is the JSON the gateway read: exactly what it judged, with the
        // media type it judged (parameters dropped; YAML made JSON; none means JSON).
        let spaced = b" { \"kind\" : \"ConfigMap\", \"data\": {\"a\": \"\\u0062\"}, \"n\": 1.50 } ";
        for (types, verb, want_media) in [
            (
                vec!["application/json; charset=utf-8"],
                "create",
                "application/json",
            ),
            (vec![], "update", "application/json"),
            (vec!["application/yaml"], "create", "application/json"),
            (
                vec!["application/merge-patch+json"],
                "patch",
                "application/merge-patch+json",
            ),
            (
                vec!["application/apply-patch+yaml"],
                "patch",
                "application/apply-patch+yaml",
            ),
            (vec!["application/json"], "delete", "application/json"),
        ] {
            let (media, b) = judged_body(&typed(&types), verb, spaced).unwrap();
            assert_eq!(media, want_media, "{types:?}");
            assert_eq!(
                std::str::from_utf8(&b).unwrap(),
                r#"{"data":{"a":"b"},"kind":"ConfigMap","n":1.5}"#,
                "{types:?}"
            );
        }
        let (media, b) = judged_body(
            &typed(&["application/yaml"]),
            "create",
            b"kind: ConfigMap\ndata: {a: b}\n",
        )
        .unwrap();
        assert_eq!(
            (media, std::str::from_utf8(&b).unwrap()),
            (
                "application/json",
                r#"{"data":{"a":"b"},"kind":"ConfigMap"}"#
            )
        );
        assert!(
            judged_body(
                &typed(&["application/yaml"]),
                "create",
                b"a: !!binary eA==\n"
            )
            .unwrap_err()
            .2
            .contains("cannot read this YAML body")
        );
    }

    #[test]
    fn a_bearer_token_carried_as_a_websocket_subprotocol_never_passes() {
        let v = |s: &str| {
            without_bearer_protocols(&hyper::header::HeaderValue::from_str(s).unwrap())
                .map(|h| h.to_str().unwrap().to_owned())
        };
        assert_eq!(
            v("v5.channel.k8s.io, base64url.bearer.authorization.k8s.io.ZXlK, v4.channel.k8s.io")
                .as_deref(),
            Some("v5.channel.k8s.io, v4.channel.k8s.io")
        );
        assert_eq!(v("Base64URL.Bearer.Authorization.K8s.io.ZXlK"), None);
        assert_eq!(v("channel.k8s.io").as_deref(), Some("channel.k8s.io"));
    }

    #[test]
    fn yaml_bodies_become_json_and_tags_are_refused() {
        let json =
            |y: &str| yaml_as_json(y.as_bytes()).map(|b| String::from_utf8_lossy(&b).into_owned());
        assert_eq!(
            json("kind: ConfigMap\ndata:\n  a: 'it''s # not a comment'\n  b: \"x !y\" # c\n")
                .as_deref(),
            Some(r#"{"data":{"a":"it's # not a comment","b":"x !y"},"kind":"ConfigMap"}"#)
        );
        assert_eq!(
            json(r#"{"kind":"ConfigMap"}"#).as_deref(),
            Some(r#"{"kind":"ConfigMap"}"#)
        );
        // A block scalar's text may hold anything; whole numbers are integers.
        assert_eq!(
            json("data:\n  run.sh: |\n    #!/bin/sh\n    if [ ! -f /x ]; then echo hi !; fi\n  n: >-\n    a != b\nspec: {replicas: 1.0}\n")
                .as_deref(),
            Some(
                r##"{"data":{"n":"a != b","run.sh":"#!/bin/sh\nif [ ! -f /x ]; then echo hi !; fi\n"},"spec":{"replicas":1}}"##
            )
        );
        for tagged in [
            "metadata:\n  !!binary b3duZXJSZWZlcmVuY2Vz: []\n",
            "spec:\n  containers:\n  - env:\n    - valueFrom:\n        !!binary c2VjcmV0S2V5UmVm: {name: db}\n",
            "type: !!binary a3ViZXJuZXRlcy5pby9zZXJ2aWNlLWFjY291bnQtdG9rZW4=\n",
            "a: [!!str x]\n",
            "a: {b: !custom x}\n",
            "- !<tag:yaml.org,2002:binary> eA==\n",
            "a: 1\n---\nb: 2\n",
            // A merge key, which the API server's reader would merge.
            "base: &b {x: 1}\nmetadata:\n  <<: *b\n",
            // A block scalar ends where the indentation falls back: what follows is YAML.
            "data:\n  s: |\n      line\n    !!binary a2V5: v\n",
            // `|` at the end of a plain value opens no block.
            "data:\n  s: a |\n  !!binary a2V5: v\n",
        ] {
            assert_eq!(json(tagged), None, "{tagged}");
        }
    }

    #[test]
    fn the_pods_own_cluster_defaults_to_the_pods_namespace() {
        let addr = "127.0.0.1:16443".parse().expect("an address");
        let text = kubeconfig(
            addr,
            "CERT",
            &[
                ("this-cluster".into(), Some("agents".into())),
                ("prod".into(), None),
            ],
        );
        let doc: serde_json::Value = serde_norway::from_str(&text).expect("YAML");
        assert_eq!(doc["current-context"], "this-cluster");
        assert_eq!(doc["contexts"][0]["context"]["namespace"], "agents");
        assert!(doc["contexts"][1]["context"].get("namespace").is_none());
        assert_eq!(
            doc["clusters"][1]["cluster"]["server"],
            "https://127.0.0.1:16443/targets/prod"
        );
    }
}
