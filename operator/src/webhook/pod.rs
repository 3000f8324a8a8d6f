//! Sidecar injection, and the pod boundary it depends on.
//!
//! A pod labelled `agentgate.dev/inject: "true"` and annotated `agentgate.dev/identity: NAME`
//! gets the sidecar as a native sidecar (an init container that keeps running), and its agent
//! containers are pointed at it. Injection is refused, with the reason, when the pod could
//! reach around the gateway: a shared process namespace, host namespaces or paths, privileged
//! agent containers or capabilities beyond the Pod Security Standards baseline, an API token
//! (projected, a pod certificate, or a Secret of a service account) or a Target's
//! credentials in an agent container. Debug (ephemeral) containers added later are held to
//! the same rules, and an injected pod keeps the label that has this webhook see them.
//!
//! Injection is idempotent: a second admission of an injected pod changes nothing, and a pod
//! that brings its own `agentgate-sidecar` with another image is refused.

use std::collections::{BTreeMap, BTreeSet};

use agentgate_crds::{AgentIdentity, MaskPolicy, Protocol, Target};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, DownwardAPIProjection,
    DownwardAPIVolumeFile, EmptyDirVolumeSource, EnvVar, EnvVarSource, EphemeralContainer,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource,
    ResourceRequirements, SecretProjection, SecretVolumeSource, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::Api;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};

use super::{IDENTITY_ANNOTATION, INJECT_LABEL, WebhookContext, from_cache};
use crate::config::Config;

/// The injected container's name.
pub const SIDECAR: &str = "agentgate-sidecar";
/// Loopback port of the PostgreSQL gateway.
pub const PG_PORT: i32 = 15432;
/// Loopback port of the Kubernetes API gateway (HTTPS).
pub const KUBE_PORT: i32 = 16443;
/// Loopback port of the SSH gateway.
pub const SSH_PORT: i32 = 12222;
/// Port of the sidecar's health endpoint.
pub const HEALTH_PORT: i32 = 15021;
/// The token audience the sidecar verifies the pod with.
pub const AUDIENCE: &str = "agentgate";
/// Where agent containers find the client files the sidecar writes (kubeconfig, ssh config).
pub const CLIENT_DIR: &str = "/var/run/agentgate/client";
/// The label that marks a Secret agent containers may never mount (e.g. the signing key).
pub const SENSITIVE_LABEL: &str = "agentgate.dev/sensitive";

const V_TOKEN: &str = "agentgate-token";
const V_API: &str = "agentgate-api-token";
const V_SPILL: &str = "agentgate-spill";
const V_CLIENT: &str = "agentgate-client";
const V_AUDIT_CA: &str = "agentgate-audit-ca";
/// Where the sidecar reads the audit sinks' CA (`--sidecar-audit-ca`).
const AUDIT_CA_DIR: &str = "/var/run/agentgate/audit-ca";
const ANN_INJECTED: &str = "agentgate.dev/injected";
/// The annotation that names the service account a token Secret belongs to. The API server
/// requires it on every Secret of type `kubernetes.io/service-account-token` (and keeps it
/// there), so a Secret's metadata is enough to tell a token: its data is never read.
pub const SA_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
/// The Secret type of a (long-lived) service-account token.
pub const SA_TOKEN_TYPE: &str = "kubernetes.io/service-account-token";
/// The only capabilities a container other than the sidecar may add: those the Pod Security
/// Standards "baseline" profile allows. Every other one (`DAC_READ_SEARCH`, `SYS_PTRACE`,
/// `SYS_MODULE`, `BPF`, `NET_ADMIN`, `NET_RAW`, `ALL`, ...) could reach into the sidecar or
/// around it.
pub const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];
/// Capabilities injection drops from every container other than the sidecar, even where the
/// runtime grants them by default: with `NET_RAW` an agent running as root could read the
/// sidecar's upstream traffic off the pod's shared network namespace.
pub const DROPPED_FROM_AGENTS: &[&str] = &["NET_RAW"];

/// Why a pod cannot be injected.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(msg.into()))
}

/// What injection needs to know besides the pod.
pub struct InjectionInput<'a> {
    /// Operator configuration (image, resources).
    pub config: &'a Config,
    /// The pod's AgentIdentity.
    pub identity: &'a AgentIdentity,
    /// Every Target of the pod's namespace.
    pub targets: &'a [Target],
    /// What the API server says about the Secrets agent containers reference.
    pub secrets: &'a SecretFacts,
    /// The Secrets the namespace's MaskPolicies name as `hashKey`: mounted into the sidecar
    /// only (at `<targets>/mask-keys/<Secret>`), never into an agent container.
    pub mask_key_secrets: &'a BTreeSet<String>,
}

/// What the API server says about the Secrets the checked containers reference, read from
/// their metadata only (the operator never reads a Secret's data for this).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SecretFacts {
    /// Those labelled [`SENSITIVE_LABEL`]`=true`.
    pub sensitive: BTreeSet<String>,
    /// Those that hold a service-account token (annotated [`SA_NAME_ANNOTATION`], as the API
    /// server requires of type [`SA_TOKEN_TYPE`]), with the service account they name.
    pub tokens: BTreeMap<String, String>,
    /// Those that do not exist: nothing can be said of them, and one created later could be
    /// any of the above.
    pub missing: BTreeSet<String>,
}

impl SecretFacts {
    /// Files what Secret `name`'s metadata says (`None`: it does not exist).
    pub fn add(&mut self, name: &str, meta: Option<&kube::core::ObjectMeta>) {
        let Some(meta) = meta else {
            self.missing.insert(name.to_owned());
            return;
        };
        let label = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(SENSITIVE_LABEL))
            .map(String::as_str);
        if label == Some("true") {
            self.sensitive.insert(name.to_owned());
        }
        if let Some(sa) = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(SA_NAME_ANNOTATION))
        {
            self.tokens.insert(name.to_owned(), sa.clone());
        }
    }
}

/// The Secrets a container references (volumes it mounts, env and envFrom).
pub fn secrets_referenced(pod: &Pod, c: &Container) -> BTreeSet<String> {
    let spec = pod.spec.as_ref();
    let volumes: BTreeMap<&str, &Volume> = spec
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mut out = BTreeSet::new();
    for m in c.volume_mounts.iter().flatten() {
        if let Some(v) = volumes.get(m.name.as_str()) {
            if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
                out.insert(s);
            }
            for p in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
                if let Some(s) = p.secret.as_ref() {
                    out.insert(s.name.clone());
                }
            }
        }
    }
    for e in c.env.iter().flatten() {
        if let Some(s) = e
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
        {
            out.insert(s.name.clone());
        }
    }
    for e in c.env_from.iter().flatten() {
        if let Some(s) = e.secret_ref.as_ref() {
            out.insert(s.name.clone());
        }
    }
    out
}

/// A capability's name as the Pod Security Standards list it: upper case, no `CAP_`.
fn capability_name(cap: &str) -> String {
    let upper = cap.trim().to_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_owned()
}

/// Why a container's security context would let it reach into the sidecar or around it, if
/// it would: privileged, a Windows host process, or a capability beyond the Pod Security
/// Standards baseline ([`BASELINE_CAPABILITIES`]). Returns what it does and what it may do
/// instead (possibly empty).
fn privilege_problem(sc: Option<&SecurityContext>) -> Option<(String, String)> {
    let sc = sc.cloned().unwrap_or_default();
    if sc.privileged == Some(true) {
        return Some(("is privileged".into(), String::new()));
    }
    if sc
        .windows_options
        .as_ref()
        .and_then(|w| w.host_process)
        .unwrap_or(false)
    {
        return Some(("runs as a Windows host process".into(), String::new()));
    }
    let added = sc
        .capabilities
        .and_then(|caps| caps.add)
        .unwrap_or_default();
    added
        .iter()
        .find(|a| !BASELINE_CAPABILITIES.contains(&capability_name(a).as_str()))
        .map(|cap| {
            (
                format!("adds capability {cap}"),
                format!(
                    "; the capabilities the Pod Security Standards baseline allows ({}) may be added",
                    BASELINE_CAPABILITIES.join(", ")
                ),
            )
        })
}

/// Adds [`DROPPED_FROM_AGENTS`] to a container's `capabilities.drop` (unless it drops `ALL`).
fn drop_agent_capabilities(sc: &mut Option<SecurityContext>) {
    let drop = sc
        .get_or_insert_with(Default::default)
        .capabilities
        .get_or_insert_with(Default::default)
        .drop
        .get_or_insert_with(Vec::new);
    for cap in DROPPED_FROM_AGENTS {
        if !drop.iter().any(|d| {
            let d = capability_name(d);
            d == *cap || d == "ALL"
        }) {
            drop.push((*cap).to_owned());
        }
    }
}

/// The name of the sidecar's volume for a Target (`kind` `t`) or a MaskPolicy's hash key
/// (`kind` `k`) named `name`: `agentgate-<kind>-` and 16 hex digits of the SHA-256 of the
/// name. Target and Secret names may hold dots and run to 253 characters, a volume name
/// neither (an RFC 1123 label): the digest is always a valid name, and two names never
/// share one by being cut short. The sidecar finds the files by their mount path, which
/// keeps the real name.
fn volume_name(kind: &str, name: &str) -> Result<String, Refusal> {
    use rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    // SHA-256 from the TLS provider the operator already carries.
    let rustls::SupportedCipherSuite::Tls13(suite) = TLS13_AES_128_GCM_SHA256 else {
        return refuse("cannot name the sidecar's volumes: no SHA-256 available (failing closed)");
    };
    let digest = suite.common.hash_provider.hash(name.as_bytes());
    let hex: String = digest
        .as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("agentgate-{kind}-{hex}"))
}

/// The name of the sidecar's volume for Target `target` (its credentials, and its CA when
/// that is in another Secret), mounted at `/var/run/agentgate/targets/<target>`.
pub fn target_volume(target: &str) -> Result<String, Refusal> {
    volume_name("t", target)
}

/// The name of the sidecar's volume for the MaskPolicy hash key in Secret `secret`, mounted
/// at `/var/run/agentgate/targets/mask-keys/<secret>`.
pub fn hash_key_volume(secret: &str) -> Result<String, Refusal> {
    volume_name("k", secret)
}

/// The Secret and key of a Target's upstream CA, when it names one.
fn ca_secret(t: &Target) -> Option<agentgate_crds::common::SecretKeyRef> {
    match t.spec.protocol {
        Protocol::Postgres => t.spec.postgres.as_ref().and_then(|p| p.tls.ca.clone()),
        Protocol::Kubernetes => t.spec.kubernetes.as_ref().and_then(|k| k.tls.ca.clone()),
        Protocol::Ssh => None,
    }
}

fn credentials_secret(t: &Target) -> Option<String> {
    match t.spec.protocol {
        Protocol::Postgres => t.spec.postgres.as_ref().map(|p| p.credentials.name.clone()),
        Protocol::Kubernetes => t
            .spec
            .kubernetes
            .as_ref()
            .and_then(|k| k.credentials.as_ref())
            .map(|c| c.name.clone()),
        Protocol::Ssh => t.spec.ssh.as_ref().map(|s| s.credentials.name.clone()),
    }
}

/// Whether volume `v` hands its containers a credential for the API server: a projected
/// service-account token, or a projected pod certificate (a client certificate the API
/// server may accept as the pod's service account).
fn is_token_volume(v: &Volume) -> bool {
    v.projected.as_ref().is_some_and(|p| {
        p.sources
            .iter()
            .flatten()
            .any(|s| s.service_account_token.is_some() || s.pod_certificate.is_some())
    })
}

/// What no container but the sidecar may reach in a pod of the namespace.
pub struct Boundary<'a> {
    /// Operator configuration (the audit sinks' Secrets).
    pub config: &'a Config,
    /// Every Target of the namespace (their credentials Secrets).
    pub targets: &'a [Target],
    /// What the API server says about the Secrets the checked containers reference.
    pub secrets: &'a SecretFacts,
    /// The Secrets the namespace's MaskPolicies name as `hashKey`.
    pub mask_key_secrets: &'a BTreeSet<String>,
}

/// Which kind of container besides the sidecar is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A container or init container of the pod as created (before injection).
    Agent,
    /// An ephemeral (debug) container added to a running, injected pod.
    Debug,
}

impl Kind {
    fn container(self) -> &'static str {
        match self {
            Self::Agent => "container",
            Self::Debug => "ephemeral container",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Self::Agent => "agent containers",
            Self::Debug => "debug containers",
        }
    }
}

/// An ephemeral container as a [`Container`], with what the boundary checks read (its name,
/// security context, mounts and environment).
pub fn as_container(e: &EphemeralContainer) -> Container {
    Container {
        name: e.name.clone(),
        image: e.image.clone(),
        env: e.env.clone(),
        env_from: e.env_from.clone(),
        volume_mounts: e.volume_mounts.clone(),
        volume_devices: e.volume_devices.clone(),
        security_context: e.security_context.clone(),
        ..Default::default()
    }
}

/// Refuses container `c` of `pod` (any container but the sidecar) when it could reach around
/// the gateway: privileged, a Windows host process, or adding a capability beyond the Pod
/// Security Standards baseline; mounting a service-account token or a pod certificate;
/// mounting any of agentgate's volumes (all but the client volume, which only read-only);
/// or using, through a volume, `env` or `envFrom`, a Secret only the sidecar may read (a
/// Target's credentials, a MaskPolicy's hash key, the audit sinks' Secrets, a Secret
/// labelled [`SENSITIVE_LABEL`]), a Secret that holds a service-account token, or a Secret
/// that does not exist (nothing can be said of it; one created later could be a token).
///
/// For [`Kind::Agent`] the pod is the one submitted, before injection: its automatic
/// `kube-api-access-*` token volume is allowed because injection removes it. For
/// [`Kind::Debug`] the pod is already injected, and every token volume counts.
pub fn check_container(
    kind: Kind,
    pod: &Pod,
    c: &Container,
    boundary: &Boundary<'_>,
) -> Result<(), Refusal> {
    let (what, who) = (kind.container(), kind.plural());
    if let Some((why, instead)) = privilege_problem(c.security_context.as_ref()) {
        return refuse(format!("{what} {} {why}: {who} may not{instead}", c.name));
    }
    let volumes: BTreeMap<&str, &Volume> = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .map(|v| (v.name.as_str(), v))
        .collect();
    for m in c.volume_mounts.iter().flatten() {
        // The sidecar's socket and client files live there: others only read them.
        if m.name == V_CLIENT {
            if m.read_only != Some(true) {
                return refuse(format!(
                    "{what} {} mounts agentgate's volume {V_CLIENT} writable: mount it readOnly",
                    c.name
                ));
            }
            continue;
        }
        // Every other agentgate volume (tokens, spill, a Target's credentials, hash keys)
        // is the sidecar's, also one the pod names itself before injection fills it.
        if m.name.starts_with("agentgate-") {
            return refuse(format!(
                "{what} {} mounts agentgate's volume {}: only the sidecar may",
                c.name, m.name
            ));
        }
        let automatic = kind == Kind::Agent && m.name.starts_with("kube-api-access-");
        if volumes
            .get(m.name.as_str())
            .is_some_and(|v| is_token_volume(v))
            && !automatic
        {
            return refuse(format!(
                "{what} {} mounts a service-account token (volume {}): {who} get no API token; the sidecar is the way to the API",
                c.name, m.name
            ));
        }
    }
    let credentials: BTreeMap<String, String> = boundary
        .targets
        .iter()
        .filter_map(|t| {
            Some((
                credentials_secret(t)?,
                t.metadata.name.clone().unwrap_or_default(),
            ))
        })
        .collect();
    for s in secrets_referenced(pod, c) {
        if let Some(target) = credentials.get(&s) {
            return refuse(format!(
                "{what} {} uses Secret {s}, the credentials of Target {target}: upstream credentials live only in the sidecar",
                c.name
            ));
        }
        if boundary.mask_key_secrets.contains(&s) {
            return refuse(format!(
                "{what} {} uses Secret {s}, a MaskPolicy's hash key: with it, masked values could be matched back; only the sidecar may read it",
                c.name
            ));
        }
        if [
            &boundary.config.sidecar_audit_secret,
            &boundary.config.sidecar_audit_credentials,
        ]
        .iter()
        .any(|a| a.as_deref() == Some(s.as_str()))
        {
            return refuse(format!(
                "{what} {} uses Secret {s}, the audit sinks' connection or credentials: only the sidecar may read it",
                c.name
            ));
        }
        if boundary.secrets.sensitive.contains(&s) {
            return refuse(format!(
                "{what} {} uses Secret {s}, which is labelled {SENSITIVE_LABEL}: only the sidecar may read it",
                c.name
            ));
        }
        if let Some(sa) = boundary.secrets.tokens.get(&s) {
            return refuse(format!(
                "{what} {} uses Secret {s}, a token of service account {sa} ({SA_TOKEN_TYPE}): with it the agent would reach the API server around the gateway; {who} get no API token, so remove it from the container (the sidecar is the way to the API)",
                c.name
            ));
        }
        if boundary.secrets.missing.contains(&s) {
            return refuse(format!(
                "{what} {} uses Secret {s}, which does not exist: agentgate checks every Secret {who} read before admitting them (one created later could hold a service-account token); create the Secret first, then the pod",
                c.name
            ));
        }
    }
    Ok(())
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// `env` plus the installation's audit sinks (the sidecar's own file and AgentSession sinks
/// are always on).
fn audit_env(config: &Config, mut env_vars: Vec<EnvVar>) -> Vec<EnvVar> {
    if let Some(url) = &config.sidecar_audit_otlp {
        env_vars.push(env("AGENTGATE_AUDIT_OTLP", url));
    }
    if let Some(url) = &config.sidecar_audit_webhook {
        env_vars.push(env("AGENTGATE_AUDIT_WEBHOOK", url));
    }
    if let Some(secret) = &config.sidecar_audit_secret {
        env_vars.push(secret_env(
            "AGENTGATE_AUDIT_POSTGRES",
            secret,
            "postgres",
            false,
        ));
    }
    if config.sidecar_audit_ca.is_some() {
        env_vars.push(env(
            "AGENTGATE_AUDIT_CA_FILE",
            &format!("{AUDIT_CA_DIR}/ca.crt"),
        ));
    }
    if let Some(secret) = &config.sidecar_audit_credentials {
        env_vars.push(secret_env(
            "AGENTGATE_AUDIT_WEBHOOK_TOKEN",
            secret,
            "webhook-token",
            true,
        ));
        env_vars.push(secret_env(
            "AGENTGATE_AUDIT_OTLP_HEADERS",
            secret,
            "otlp-headers",
            true,
        ));
    }
    env_vars
}

/// An environment variable from key `key` of Secret `secret` (the pod does not start while
/// a key that is not `optional` is missing).
fn secret_env(name: &str, secret: &str, key: &str, optional: bool) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(k8s_openapi::api::core::v1::SecretKeySelector {
                name: secret.to_owned(),
                key: key.into(),
                optional: Some(optional),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

fn upsert<T, F: Fn(&T) -> bool>(list: &mut Vec<T>, item: T, same: F) {
    match list.iter_mut().find(|x| same(x)) {
        Some(slot) => *slot = item,
        None => list.push(item),
    }
}

/// The sidecar container agentgate injects; `targets` are `(folder under the targets
/// directory, volume)`: a Target's credentials, or `mask-keys/<Secret>`.
pub fn sidecar_container(
    config: &Config,
    identity: &str,
    targets: &[(String, String)],
) -> Container {
    let mut mounts = vec![
        mount(V_TOKEN, "/var/run/secrets/agentgate", true),
        mount(V_API, "/var/run/secrets/kubernetes.io/serviceaccount", true),
        mount(V_SPILL, "/var/lib/agentgate/audit", false),
        mount(V_CLIENT, CLIENT_DIR, false),
    ];
    if config.sidecar_audit_ca.is_some() {
        mounts.push(mount(V_AUDIT_CA, AUDIT_CA_DIR, true));
    }
    for (dir, volume) in targets {
        mounts.push(mount(
            volume,
            &format!("/var/run/agentgate/targets/{dir}"),
            true,
        ));
    }
    let resources = BTreeMap::from([
        ("cpu".to_owned(), Quantity(config.sidecar_cpu.clone())),
        ("memory".to_owned(), Quantity(config.sidecar_memory.clone())),
    ]);
    Container {
        name: SIDECAR.into(),
        image: Some(config.sidecar_image.clone()),
        args: Some(vec!["--in-cluster".into()]),
        env: Some(audit_env(
            config,
            vec![
                env("AGENTGATE_IDENTITY", identity),
                env("AGENTGATE_TOKEN_FILE", "/var/run/secrets/agentgate/token"),
                env("AGENTGATE_AUDIT_DIR", "/var/lib/agentgate/audit"),
                env("AGENTGATE_CLIENT_DIR", CLIENT_DIR),
                env("AGENTGATE_TARGETS_DIR", "/var/run/agentgate/targets"),
                env("AGENTGATE_PG_ADDR", &format!("127.0.0.1:{PG_PORT}")),
                // Also a Unix socket beside the client files: agents may set PGHOST to the
                // directory instead of 127.0.0.1 (cheaper per statement).
                env("AGENTGATE_PG_SOCKET_DIR", CLIENT_DIR),
                env("AGENTGATE_KUBE_ADDR", &format!("127.0.0.1:{KUBE_PORT}")),
                env("AGENTGATE_SSH_ADDR", &format!("127.0.0.1:{SSH_PORT}")),
                env("AGENTGATE_HEALTH_ADDR", &format!("0.0.0.0:{HEALTH_PORT}")),
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
                field_env("POD_UID", "metadata.uid"),
            ],
        )),
        ports: Some(vec![ContainerPort {
            name: Some("ag-health".into()),
            container_port: HEALTH_PORT,
            ..Default::default()
        }]),
        startup_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::Int(HEALTH_PORT),
                ..Default::default()
            }),
            period_seconds: Some(1),
            failure_threshold: Some(60),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(resources.clone()),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity(config.sidecar_memory.clone()),
            )])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        // A native sidecar: started before the agent containers, running alongside them.
        restart_policy: Some("Always".into()),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// Checks the pod boundary and returns the injected pod (unchanged if already injected).
pub fn inject(pod: &Pod, input: &InjectionInput<'_>) -> Result<Pod, Refusal> {
    let mut pod = pod.clone();
    let identity = input.identity.metadata.name.clone().unwrap_or_default();
    if input.identity.spec.disabled {
        return refuse(format!(
            "AgentIdentity {identity} is disabled: no pod may run as it"
        ));
    }
    let Some(spec) = pod.spec.as_mut() else {
        return refuse("the pod has no spec");
    };
    // Bound to its identity: the pod runs as the identity's service account.
    let pod_sa = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    // The identity is read from the pod's namespace.
    let pod_ns = pod
        .metadata
        .namespace
        .clone()
        .or_else(|| input.identity.metadata.namespace.clone());
    match &input.identity.spec.authentication.service_account {
        None => {
            return refuse(format!(
                "AgentIdentity {identity} names no service account (spec.authentication.serviceAccount), and an injected sidecar knows its agent by the pod's service-account token: add serviceAccount: {{ name: {pod_sa} }} to it (an identity with OIDC only is for agents that present their own tokens to a sidecar run with --pg-auth token)"
            ));
        }
        // Every pod of the namespace that names no service account runs as `default`: a
        // pod the agent creates would hold the same credential as its sidecar.
        Some(sa) if sa.name == "default" => {
            return refuse(format!(
                "AgentIdentity {identity} authenticates the namespace's default service account, which every pod that names none runs as (a pod the agent creates would get its sidecar's credential): give the agent a service account of its own and name it in spec.authentication.serviceAccount and the pod's spec.serviceAccountName"
            ));
        }
        Some(sa) if sa.name != pod_sa => {
            return refuse(format!(
                "the pod runs as service account {pod_sa}, but AgentIdentity {identity} authenticates service account {}: set spec.serviceAccountName: {}",
                sa.name, sa.name
            ));
        }
        Some(sa)
            if sa
                .namespace
                .as_ref()
                .is_some_and(|ns| pod_ns.as_ref().is_some_and(|p| p != ns)) =>
        {
            return refuse(format!(
                "AgentIdentity {identity} authenticates service account {} in namespace {}, but the pod is in namespace {}: run the pod there, or name this namespace",
                sa.name,
                sa.namespace.as_deref().unwrap_or_default(),
                pod_ns.as_deref().unwrap_or_default()
            ));
        }
        Some(_) => {}
    }
    if spec.share_process_namespace == Some(true) {
        return refuse(
            "shareProcessNamespace would let the agent read the sidecar's memory and files: remove it",
        );
    }
    for (flag, set) in [
        ("hostNetwork", spec.host_network),
        ("hostPID", spec.host_pid),
        ("hostIPC", spec.host_ipc),
    ] {
        if set == Some(true) {
            return refuse(format!(
                "{flag} would let the agent reach around the gateway: remove it"
            ));
        }
    }
    if spec
        .security_context
        .as_ref()
        .and_then(|sc| sc.windows_options.as_ref())
        .and_then(|w| w.host_process)
        .unwrap_or(false)
    {
        return refuse(
            "securityContext.windowsOptions.hostProcess runs every container on the host, around the gateway: remove it",
        );
    }
    if let Some(v) = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.host_path.is_some())
    {
        return refuse(format!(
            "volume {} is a hostPath: agent pods may not mount host paths",
            v.name
        ));
    }
    // The sidecar, if already there, must be exactly ours.
    let injected_sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == SIDECAR)
        .cloned();
    if let Some(existing) = &injected_sidecar
        && existing.image.as_deref() != Some(input.config.sidecar_image.as_str())
    {
        return refuse(format!(
            "container {SIDECAR} is managed by agentgate: the pod may not bring its own (image {} instead of {})",
            existing.image.as_deref().unwrap_or("none"),
            input.config.sidecar_image
        ));
    }
    if spec.containers.iter().any(|c| c.name == SIDECAR) {
        return refuse(format!(
            "container {SIDECAR} is managed by agentgate and must not be in spec.containers"
        ));
    }
    // Agent containers: no privilege, no API token, no credentials.
    let pod_view = Pod {
        metadata: Default::default(),
        spec: Some(spec.clone()),
        status: None,
    };
    let boundary = Boundary {
        config: input.config,
        targets: input.targets,
        secrets: input.secrets,
        mask_key_secrets: input.mask_key_secrets,
    };
    let agents = spec.containers.iter().chain(
        spec.init_containers
            .iter()
            .flatten()
            .filter(|c| c.name != SIDECAR),
    );
    for c in agents {
        check_container(Kind::Agent, &pod_view, c, &boundary)?;
    }

    // The API token the API server's ServiceAccount admission added goes: agents get none.
    spec.automount_service_account_token = Some(false);
    let auto: BTreeSet<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| v.name.starts_with("kube-api-access-") && is_token_volume(v))
        .map(|v| v.name.clone())
        .collect();
    if let Some(vols) = spec.volumes.as_mut() {
        vols.retain(|v| !auto.contains(&v.name));
    }
    for c in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
        .filter(|c| c.name != SIDECAR)
    {
        if let Some(ms) = c.volume_mounts.as_mut() {
            ms.retain(|m| !auto.contains(&m.name));
        }
        // No raw sockets next to the sidecar's upstream connections.
        drop_agent_capabilities(&mut c.security_context);
    }

    // Volumes of the sidecar. Every `agentgate-` volume is the sidecar's (no other container
    // may mount one, checked above): those of an earlier injection, or named so by the pod,
    // go, and exactly the current ones are added.
    let mut target_mounts = Vec::new();
    let vols = spec.volumes.get_or_insert_with(Vec::new);
    vols.retain(|v| !v.name.starts_with("agentgate-"));
    let token_source = |audience: Option<&str>, expiry: i64| VolumeProjection {
        service_account_token: Some(ServiceAccountTokenProjection {
            audience: audience.map(str::to_owned),
            expiration_seconds: Some(expiry),
            path: "token".into(),
        }),
        ..Default::default()
    };
    let mut sidecar_volumes = vec![
        Volume {
            name: V_TOKEN.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![token_source(Some(AUDIENCE), 3600)]),
                default_mode: Some(0o440),
            }),
            ..Default::default()
        },
        Volume {
            name: V_API.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![
                    token_source(None, 3607),
                    VolumeProjection {
                        config_map: Some(ConfigMapProjection {
                            name: "kube-root-ca.crt".into(),
                            items: Some(vec![KeyToPath {
                                key: "ca.crt".into(),
                                path: "ca.crt".into(),
                                mode: None,
                            }]),
                            optional: Some(true),
                        }),
                        ..Default::default()
                    },
                    VolumeProjection {
                        downward_api: Some(DownwardAPIProjection {
                            items: Some(vec![DownwardAPIVolumeFile {
                                path: "namespace".into(),
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: "metadata.namespace".into(),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }]),
                        }),
                        ..Default::default()
                    },
                ]),
                default_mode: Some(0o440),
            }),
            ..Default::default()
        },
        Volume {
            name: V_SPILL.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
        Volume {
            name: V_CLIENT.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("1Mi".into())),
            }),
            ..Default::default()
        },
    ];
    if let Some(cm) = &input.config.sidecar_audit_ca {
        sidecar_volumes.push(Volume {
            name: V_AUDIT_CA.into(),
            config_map: Some(k8s_openapi::api::core::v1::ConfigMapVolumeSource {
                name: cm.clone(),
                items: Some(vec![KeyToPath {
                    key: "ca.crt".into(),
                    path: "ca.crt".into(),
                    mode: None,
                }]),
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    for v in sidecar_volumes {
        let name = v.name.clone();
        upsert(vols, v, |x| x.name == name);
    }
    let mut targets: Vec<&Target> = input.targets.iter().collect();
    targets.sort_by_key(|t| t.metadata.name.clone());
    for t in targets {
        let (Some(tname), Some(secret)) = (t.metadata.name.clone(), credentials_secret(t)) else {
            continue;
        };
        let vname = target_volume(&tname)?;
        let v = match ca_secret(t).filter(|ca| ca.name != secret) {
            // The CA in another Secret: both projected into the Target's one folder, where
            // the sidecar reads the credentials and the CA file the Target names.
            Some(ca) => Volume {
                name: vname.clone(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![
                        VolumeProjection {
                            secret: Some(SecretProjection {
                                name: secret,
                                optional: Some(true),
                                items: None,
                            }),
                            ..Default::default()
                        },
                        VolumeProjection {
                            secret: Some(SecretProjection {
                                name: ca.name.clone(),
                                optional: Some(true),
                                items: Some(vec![KeyToPath {
                                    key: ca.key.clone(),
                                    path: ca.key.clone(),
                                    mode: None,
                                }]),
                            }),
                            ..Default::default()
                        },
                    ]),
                    default_mode: Some(0o440),
                }),
                ..Default::default()
            },
            None => Volume {
                name: vname.clone(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret),
                    optional: Some(true),
                    default_mode: Some(0o440),
                    ..Default::default()
                }),
                ..Default::default()
            },
        };
        upsert(vols, v, |x| x.name == vname);
        target_mounts.push((tname, vname));
    }
    // MaskPolicies' hash keys, for the Hash action (the sidecar refuses a Target whose
    // policy's key it cannot read).
    for s in input.mask_key_secrets {
        let vname = hash_key_volume(s)?;
        let v = Volume {
            name: vname.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(s.clone()),
                optional: Some(true),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        };
        upsert(vols, v, |x| x.name == vname);
        target_mounts.push((format!("mask-keys/{s}"), vname));
    }

    // The sidecar, first among the init containers so it starts before anything else.
    let sidecar = sidecar_container(input.config, &identity, &target_mounts);
    let inits = spec.init_containers.get_or_insert_with(Vec::new);
    inits.retain(|c| c.name != SIDECAR);
    inits.insert(0, sidecar);

    // Agent containers talk to the sidecar only.
    let agent_env = [
        ("PGHOST", "127.0.0.1".to_owned()),
        ("PGPORT", PG_PORT.to_string()),
        ("PGSSLMODE", "disable".to_owned()),
        ("KUBECONFIG", format!("{CLIENT_DIR}/kubeconfig")),
        ("GIT_SSH_COMMAND", format!("ssh -F {CLIENT_DIR}/ssh_config")),
        ("AGENTGATE_SSH_CONFIG", format!("{CLIENT_DIR}/ssh_config")),
    ];
    for c in spec.containers.iter_mut() {
        let envs = c.env.get_or_insert_with(Vec::new);
        for (k, v) in &agent_env {
            upsert(envs, env(k, v), |e| e.name == *k);
        }
        let ms = c.volume_mounts.get_or_insert_with(Vec::new);
        upsert(ms, mount(V_CLIENT, CLIENT_DIR, true), |m| {
            m.name == V_CLIENT
        });
    }

    let ann = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    ann.insert(ANN_INJECTED.into(), input.config.sidecar_image.clone());
    Ok(pod)
}

/// What the boundary checks read in a namespace.
struct NamespaceInputs {
    /// Its Targets.
    targets: Vec<Target>,
    /// What the API server says about the Secrets the checked containers reference.
    secrets: SecretFacts,
    /// The Secrets its MaskPolicies name as `hashKey`.
    mask_keys: BTreeSet<String>,
}

/// Reads what [`check_container`] needs in namespace `ns`, failing closed: the Targets and
/// MaskPolicies (from the API server's watch cache) and the metadata of the Secrets in
/// `referenced` (consistent reads: labels, the service account a token names, whether they
/// exist; never their data). The reads are independent: made at once, the admission waits
/// for the slowest, not for their sum.
async fn namespace_inputs(
    client: &kube::Client,
    ns: &str,
    referenced: &BTreeSet<String>,
) -> Result<NamespaceInputs, String> {
    let targets: Api<Target> = Api::namespaced(client.clone(), ns);
    let policies: Api<MaskPolicy> = Api::namespaced(client.clone(), ns);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let cached = from_cache();
    let (targets, policies, metadata) = futures::join!(
        targets.list(&cached),
        policies.list(&cached),
        futures::future::join_all(referenced.iter().map(|name| {
            let secrets = &secrets;
            async move { (name, secrets.get_metadata_opt(name).await) }
        })),
    );
    let targets = targets
        .map_err(|e| format!("cannot list Targets (failing closed): {e}"))?
        .items;
    let mut facts = SecretFacts::default();
    for (name, meta) in metadata {
        let meta = meta.map_err(|e| format!("cannot read Secret {name} (failing closed): {e}"))?;
        facts.add(name, meta.as_ref().map(|m| &m.metadata));
    }
    let mask_keys = policies
        .map_err(|e| format!("cannot list MaskPolicies (failing closed): {e}"))?
        .items
        .iter()
        .filter_map(|p| p.spec.hash_key.as_ref().map(|k| k.name.clone()))
        .collect();
    Ok(NamespaceInputs {
        targets,
        secrets: facts,
        mask_keys,
    })
}

/// `pods/ephemeralcontainers`: each debug container added to an injected pod is held to what
/// agent containers are held to ([`check_container`]), may not target the sidecar (it would
/// share its process namespace), and loses [`DROPPED_FROM_AGENTS`] as agent containers do.
async fn debug_containers(
    ctx: &WebhookContext,
    req: &AdmissionRequest<DynamicObject>,
    ns: &str,
    pod: &Pod,
    old: Option<&Pod>,
) -> AdmissionResponse {
    let ephemeral = |p: &Pod| -> Vec<EphemeralContainer> {
        p.spec
            .iter()
            .flat_map(|s| s.ephemeral_containers.iter().flatten())
            .cloned()
            .collect()
    };
    // Those already admitted (the API server refuses changes to them) are not checked again:
    // a Target created since must not make the pod impossible to debug.
    let before = old.map(ephemeral).unwrap_or_default();
    let added: Vec<EphemeralContainer> = ephemeral(pod)
        .into_iter()
        .filter(|c| !before.contains(c))
        .collect();
    if added.is_empty() {
        return AdmissionResponse::from(req);
    }
    if let Some(c) = added
        .iter()
        .find(|c| c.target_container_name.as_deref() == Some(SIDECAR))
    {
        return deny(
            req,
            format!(
                "ephemeral container {} targets {SIDECAR}: nobody may share the sidecar's process namespace",
                c.name
            ),
        );
    }
    let containers: Vec<Container> = added.iter().map(as_container).collect();
    let referenced: BTreeSet<String> = containers
        .iter()
        .flat_map(|c| secrets_referenced(pod, c))
        .collect();
    let inputs = match namespace_inputs(&ctx.client, ns, &referenced).await {
        Ok(i) => i,
        Err(why) => return deny(req, why),
    };
    let boundary = Boundary {
        config: &ctx.config,
        targets: &inputs.targets,
        secrets: &inputs.secrets,
        mask_key_secrets: &inputs.mask_keys,
    };
    for c in &containers {
        if let Err(Refusal(why)) = check_container(Kind::Debug, pod, c, &boundary) {
            return deny(req, why);
        }
    }
    let added_names: BTreeSet<&str> = added.iter().map(|c| c.name.as_str()).collect();
    let mut patched = pod.clone();
    for e in patched
        .spec
        .iter_mut()
        .flat_map(|s| s.ephemeral_containers.iter_mut().flatten())
        .filter(|e| added_names.contains(e.name.as_str()))
    {
        drop_agent_capabilities(&mut e.security_context);
    }
    patch_response(req, pod, &patched)
}

fn deny(req: &AdmissionRequest<DynamicObject>, msg: impl std::fmt::Display) -> AdmissionResponse {
    AdmissionResponse::from(req).deny(format!("agentgate injection refused: {msg}"))
}

/// Admits the request with the patch that turns `original` into `changed` (both typed, so
/// that like is compared with like).
fn patch_response(
    req: &AdmissionRequest<DynamicObject>,
    original: &Pod,
    changed: &Pod,
) -> AdmissionResponse {
    let (original, changed) = match (
        serde_json::to_value(original),
        serde_json::to_value(changed),
    ) {
        (Ok(o), Ok(c)) => (o, c),
        (Err(e), _) | (_, Err(e)) => return deny(req, format!("cannot encode the pod: {e}")),
    };
    let patch = json_patch::diff(&original, &changed);
    match AdmissionResponse::from(req).with_patch(patch) {
        Ok(r) => r,
        Err(e) => deny(req, format!("cannot encode the patch: {e}")),
    }
}

/// The mutating webhook for pods.
pub async fn mutate(
    ctx: &WebhookContext,
    req: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    let ns = req.namespace.clone().unwrap_or_default();
    let Some(obj) = &req.object else {
        return AdmissionResponse::from(req);
    };
    // The operator's own namespace is never injected (its pods must start without the
    // operator): a pod there that asks to be would run with no sidecar, so it is refused.
    if ns == ctx.config.namespace {
        let asks = obj
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(INJECT_LABEL))
            .is_some_and(|v| v == "true");
        if req.operation == Operation::Create && asks {
            return deny(
                req,
                format!(
                    "namespace {ns} is agentgate's own and is never injected, so this pod would run without the sidecar: run the agent in another namespace, or remove the label {INJECT_LABEL}"
                ),
            );
        }
        return AdmissionResponse::from(req);
    }
    let value = match serde_json::to_value(obj) {
        Ok(v) => v,
        Err(e) => return deny(req, format!("cannot read the pod: {e}")),
    };
    let pod: Pod = match serde_json::from_value(value) {
        Ok(p) => p,
        Err(e) => return deny(req, format!("not a valid Pod: {e}")),
    };
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let opted_in = labels.get(INJECT_LABEL).map(String::as_str) == Some("true");
    let old: Option<Pod> = req
        .old_object
        .as_ref()
        .and_then(|o| serde_json::to_value(o).ok())
        .and_then(|v| serde_json::from_value(v).ok());
    if req.sub_resource.as_deref() == Some("ephemeralcontainers") {
        return debug_containers(ctx, req, &ns, &pod, old.as_ref()).await;
    }
    if req.operation == Operation::Update {
        // An injected pod keeps its sidecar exactly as injected.
        let find = |p: &Pod| {
            p.spec.as_ref().and_then(|s| {
                s.init_containers
                    .iter()
                    .flatten()
                    .chain(s.containers.iter())
                    .find(|c| c.name == SIDECAR)
                    .cloned()
            })
        };
        if let Some(old) = &old
            && let Some(before) = find(old)
        {
            if find(&pod).map(|c| c.image) != Some(before.image.clone()) {
                return deny(
                    req,
                    format!(
                        "container {SIDECAR} is managed by agentgate: its image cannot be changed or removed"
                    ),
                );
            }
            // Without the label this webhook no longer sees the pod, and a debug container
            // added later would not be checked.
            if !opted_in {
                return deny(
                    req,
                    format!(
                        "the pod is injected: it keeps the label {INJECT_LABEL}=true, which has agentgate check the debug containers added to it"
                    ),
                );
            }
        }
        return AdmissionResponse::from(req);
    }
    if !opted_in {
        return AdmissionResponse::from(req);
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let Some(identity) = annotations
        .get(IDENTITY_ANNOTATION)
        .or(labels.get(IDENTITY_ANNOTATION))
    else {
        return deny(
            req,
            format!(
                "the pod opts in with {INJECT_LABEL}=true but names no AgentIdentity: add the annotation {IDENTITY_ANNOTATION}: <name>"
            ),
        );
    };
    // The identity and the namespace's inputs are read at once (the identity consistently).
    let referenced: BTreeSet<String> = pod
        .spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .filter(|c| c.name != SIDECAR)
        .flat_map(|c| secrets_referenced(&pod, c))
        .collect();
    let ids: Api<AgentIdentity> = Api::namespaced(ctx.client.clone(), &ns);
    let (id, inputs) = futures::join!(
        ids.get_opt(identity),
        namespace_inputs(&ctx.client, &ns, &referenced),
    );
    let id = match id {
        Ok(Some(id)) => id,
        Ok(None) => {
            return deny(
                req,
                format!("AgentIdentity {ns}/{identity} does not exist: create it first"),
            );
        }
        Err(e) => {
            return deny(
                req,
                format!("cannot read AgentIdentity {ns}/{identity} (failing closed): {e}"),
            );
        }
    };
    let NamespaceInputs {
        targets,
        secrets,
        mask_keys,
    } = match inputs {
        Ok(i) => i,
        Err(why) => return deny(req, why),
    };
    let input = InjectionInput {
        config: &ctx.config,
        identity: &id,
        targets: &targets,
        secrets: &secrets,
        mask_key_secrets: &mask_keys,
    };
    let injected = match inject(&pod, &input) {
        Ok(p) => p,
        Err(Refusal(why)) => return deny(req, why),
    };
    patch_response(req, &pod, &injected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::json;

    fn config() -> Config {
        Config::parse_from([
            "agentgate-operator",
            "--sidecar-image=registry.example/sidecar:1",
        ])
    }

    fn identity() -> AgentIdentity {
        serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity",
            "metadata": { "name": "claude", "namespace": "agents" },
            "spec": { "owner": "team", "authentication": { "serviceAccount": { "name": "claude" } } }
        }))
        .expect("an identity")
    }

    fn target(name: &str, secret: &str) -> Target {
        serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "Target",
            "metadata": { "name": name, "namespace": "agents" },
            "spec": { "protocol": "Postgres", "postgres": { "host": "db", "database": "d",
                "credentials": { "name": secret } } }
        }))
        .expect("a target")
    }

    fn pod(spec: serde_json::Value) -> Pod {
        let mut base = json!({
            "serviceAccountName": "claude",
            "containers": [ { "name": "agent", "image": "a" } ]
        });
        if let (Some(b), Some(e)) = (base.as_object_mut(), spec.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(
            json!({ "metadata": { "name": "p", "namespace": "agents" }, "spec": base }),
        )
        .expect("a pod")
    }

    fn injected(p: &Pod, targets: &[Target], secrets: &SecretFacts) -> Result<Pod, Refusal> {
        let config = config();
        let id = identity();
        inject(
            p,
            &InjectionInput {
                config: &config,
                identity: &id,
                targets,
                secrets,
                mask_key_secrets: &BTreeSet::from(["keys.v1".to_owned()]),
            },
        )
    }

    fn rfc1123_label(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    }

    #[test]
    fn volume_names_are_labels_whatever_the_name() {
        let long = "a".repeat(240) + ".example";
        let names: Vec<String> = ["orders.db", "orders-db", &long, &(long.clone() + "x")]
            .iter()
            .map(|n| volume_name("t", n).expect("a name"))
            .collect();
        for n in &names {
            assert!(rfc1123_label(n), "{n}");
            assert!(n.starts_with("agentgate-t-") && n.len() == 28, "{n}");
        }
        let distinct: BTreeSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        // Stable: the same name, the same volume.
        assert_eq!(volume_name("t", "orders.db"), volume_name("t", "orders.db"));
        assert_ne!(volume_name("t", "x"), volume_name("k", "x"));
    }

    #[test]
    fn capabilities_beyond_the_baseline_are_refused() {
        let sc = |caps: &[&str]| SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(caps.iter().map(|c| (*c).to_owned()).collect()),
                drop: None,
            }),
            ..Default::default()
        };
        for bad in [
            "DAC_READ_SEARCH",
            "SYS_MODULE",
            "BPF",
            "PERFMON",
            "SYS_RAWIO",
            "cap_sys_ptrace",
            "NET_RAW",
            "NET_ADMIN",
            "ALL",
        ] {
            let why = privilege_problem(Some(&sc(&["CHOWN", bad])));
            assert!(
                why.as_ref()
                    .is_some_and(|(w, hint)| w == &format!("adds capability {bad}")
                        && hint.contains("NET_BIND_SERVICE")),
                "{bad}: {why:?}"
            );
        }
        assert_eq!(
            privilege_problem(Some(&sc(&["CAP_CHOWN", "net_bind_service", "SYS_CHROOT"]))),
            None
        );
        let host = SecurityContext {
            windows_options: Some(k8s_openapi::api::core::v1::WindowsSecurityContextOptions {
                host_process: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(privilege_problem(Some(&host)).is_some());
    }

    #[test]
    fn agent_containers_lose_net_raw() {
        let mut sc = None;
        drop_agent_capabilities(&mut sc);
        drop_agent_capabilities(&mut sc);
        let drop = |sc: &Option<SecurityContext>| {
            sc.as_ref()
                .and_then(|s| s.capabilities.as_ref())
                .and_then(|c| c.drop.clone())
                .unwrap_or_default()
        };
        assert_eq!(drop(&sc), ["NET_RAW"]);
        let mut all = Some(SecurityContext {
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        });
        drop_agent_capabilities(&mut all);
        assert_eq!(drop(&all), ["ALL"]);
    }

    #[test]
    fn service_account_token_secrets_never_reach_an_agent() {
        let mut facts = SecretFacts::default();
        let token_meta = kube::core::ObjectMeta {
            annotations: Some([(SA_NAME_ANNOTATION.to_owned(), "claude".to_owned())].into()),
            ..Default::default()
        };
        facts.add("claude-token", Some(&token_meta));
        facts.add("app-config", Some(&Default::default()));
        facts.add("later", None);
        assert_eq!(
            facts.tokens.get("claude-token").map(String::as_str),
            Some("claude")
        );
        let ways = [
            json!({ "containers": [ { "name": "agent", "image": "a", "env": [ { "name": "T",
                "valueFrom": { "secretKeyRef": { "name": "claude-token", "key": "token" } } } ] } ] }),
            json!({ "containers": [ { "name": "agent", "image": "a",
                "envFrom": [ { "secretRef": { "name": "claude-token" } } ] } ] }),
            json!({ "volumes": [ { "name": "t", "secret": { "secretName": "claude-token" } } ],
                "containers": [ { "name": "agent", "image": "a", "volumeMounts": [ { "name": "t", "mountPath": "/t" } ] } ] }),
            json!({ "volumes": [ { "name": "t", "projected": { "sources": [ { "secret": { "name": "claude-token" } } ] } } ],
                "containers": [ { "name": "agent", "image": "a", "volumeMounts": [ { "name": "t", "mountPath": "/t" } ] } ] }),
            json!({ "initContainers": [ { "name": "prep", "image": "a",
                "envFrom": [ { "secretRef": { "name": "claude-token" } } ] } ] }),
        ];
        for spec in ways {
            let e = injected(&pod(spec.clone()), &[], &facts).err();
            assert!(
                e.as_ref().is_some_and(|Refusal(m)| m
                    .contains("uses Secret claude-token, a token of service account claude")),
                "{spec}: {e:?}"
            );
        }
        // A Secret that does not exist cannot be vouched for.
        let e = injected(
            &pod(json!({ "containers": [ { "name": "agent", "image": "a",
                "envFrom": [ { "secretRef": { "name": "later" } } ] } ] })),
            &[],
            &facts,
        )
        .err();
        assert!(
            e.as_ref().is_some_and(|Refusal(m)| m
                .contains("uses Secret later, which does not exist")
                && m.contains("create the Secret first")),
            "{e:?}"
        );
        // Any other Secret of the agent's own is fine.
        injected(
            &pod(json!({ "containers": [ { "name": "agent", "image": "a",
                "envFrom": [ { "secretRef": { "name": "app-config" } } ] } ] })),
            &[],
            &facts,
        )
        .expect("an ordinary Secret");
        // A debug container is held to the same.
        let config = config();
        let boundary = Boundary {
            config: &config,
            targets: &[],
            secrets: &facts,
            mask_key_secrets: &BTreeSet::new(),
        };
        let debug = Container {
            name: "dbg".into(),
            env_from: Some(vec![k8s_openapi::api::core::v1::EnvFromSource {
                secret_ref: Some(k8s_openapi::api::core::v1::SecretEnvSource {
                    name: "claude-token".into(),
                    optional: Some(true),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let e = check_container(Kind::Debug, &pod(json!({})), &debug, &boundary).err();
        assert!(
            e.as_ref().is_some_and(|Refusal(m)| m
                .starts_with("ephemeral container dbg uses Secret claude-token, a token")),
            "{e:?}"
        );
    }

    #[test]
    fn pod_certificates_are_api_credentials() {
        let p = pod(json!({
            "volumes": [ { "name": "cert", "projected": { "sources": [ { "podCertificate": {
                "signerName": "kubernetes.io/kube-apiserver-client-pod", "keyType": "ED25519",
                "credentialBundlePath": "bundle.pem" } } ] } } ],
            "containers": [ { "name": "agent", "image": "a", "volumeMounts": [ { "name": "cert", "mountPath": "/c" } ] } ] }));
        let e = injected(&p, &[], &SecretFacts::default()).err();
        assert!(
            e.as_ref().is_some_and(
                |Refusal(m)| m.contains("mounts a service-account token (volume cert)")
            ),
            "{e:?}"
        );
    }

    #[test]
    fn injection_names_volumes_by_digest_and_drops_net_raw_idempotently() {
        let targets = [target("orders.db", "orders-credentials")];
        let facts = SecretFacts::default();
        let once = injected(&pod(json!({})), &targets, &facts).expect("injected");
        let spec = once.spec.clone().expect("a spec");
        let volumes: Vec<String> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.clone())
            .collect();
        assert!(volumes.iter().all(|v| rfc1123_label(v)), "{volumes:?}");
        let t = volume_name("t", "orders.db").expect("a name");
        let k = volume_name("k", "keys.v1").expect("a name");
        assert!(volumes.contains(&t) && volumes.contains(&k), "{volumes:?}");
        let sidecar = &spec.init_containers.as_ref().expect("inits")[0];
        let mounts: Vec<(String, String)> = sidecar
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.clone(), m.mount_path.clone()))
            .collect();
        assert!(
            mounts.contains(&(t, "/var/run/agentgate/targets/orders.db".into())),
            "{mounts:?}"
        );
        assert!(
            mounts.contains(&(k, "/var/run/agentgate/targets/mask-keys/keys.v1".into())),
            "{mounts:?}"
        );
        let agent_drop = spec.containers[0]
            .security_context
            .as_ref()
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.drop.clone());
        assert_eq!(agent_drop, Some(vec!["NET_RAW".to_owned()]));
        // The sidecar keeps its own (drop ALL).
        assert_eq!(
            sidecar
                .security_context
                .as_ref()
                .and_then(|s| s.capabilities.as_ref())
                .and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        // Injected again (a second admission): nothing changes.
        let twice = injected(&once, &targets, &facts).expect("injected again");
        assert_eq!(
            serde_json::to_value(&once.spec).ok(),
            serde_json::to_value(&twice.spec).ok()
        );
        // The volumes of an older injection (other names) go with it.
        let mut old = once.clone();
        if let Some(v) = old.spec.as_mut().and_then(|s| s.volumes.as_mut()) {
            v.push(Volume {
                name: "agentgate-target-orders-db".into(),
                empty_dir: Some(Default::default()),
                ..Default::default()
            });
        }
        let again = injected(&old, &targets, &facts).expect("injected again");
        assert_eq!(
            serde_json::to_value(&once.spec).ok(),
            serde_json::to_value(&again.spec).ok()
        );
    }

    #[test]
    fn a_windows_host_process_pod_is_refused() {
        let p = pod(json!({ "securityContext": { "windowsOptions": { "hostProcess": true } } }));
        let e = injected(&p, &[], &SecretFacts::default()).err();
        assert!(
            e.as_ref()
                .is_some_and(|Refusal(m)| m.contains("hostProcess")),
            "{e:?}"
        );
    }
}
