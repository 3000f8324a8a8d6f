//! Sidecar injection, and the pod boundary it depends on.
//!
//! A pod labelled `agentgate.dev/inject: "true"` and annotated `agentgate.dev/identity: NAME`
//! gets the sidecar as a native sidecar (an init container that keeps running), and its agent
//! containers are pointed at it. Injection is refused, with the reason, when the pod could
//! reach around the gateway: a shared process namespace, host namespaces or paths, privileged
//! agent containers, an API token or a Target's credentials in an agent container. Debug
//! (ephemeral) containers added later are held to the same rules, and an injected pod keeps
//! the label that has this webhook see them.
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
const DANGEROUS_CAPS: &[&str] = &["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN", "NET_RAW", "ALL"];

/// Why a pod cannot be injected.
#[derive(Debug, PartialEq, Eq)]
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
    /// Names of Secrets labelled sensitive that agent containers reference.
    pub sensitive_secrets: &'a BTreeSet<String>,
    /// The Secrets the namespace's MaskPolicies name as `hashKey`: mounted into the sidecar
    /// only (at `<targets>/mask-keys/<Secret>`), never into an agent container.
    pub mask_key_secrets: &'a BTreeSet<String>,
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

/// Why a container's security context would let it reach into the sidecar, if it would:
/// privileged, or a capability that reads other processes or rewires the pod's network.
fn privilege_problem(sc: Option<&SecurityContext>) -> Option<String> {
    let sc = sc.cloned().unwrap_or_default();
    if sc.privileged == Some(true) {
        return Some("is privileged".into());
    }
    let added = sc
        .capabilities
        .and_then(|caps| caps.add)
        .unwrap_or_default();
    added
        .iter()
        .find(|a| DANGEROUS_CAPS.contains(&a.to_uppercase().trim_start_matches("CAP_")))
        .map(|cap| format!("adds capability {cap}"))
}

/// A volume name: `prefix` + `name`, cut to 63 characters.
fn volume_name(prefix: &str, name: &str) -> String {
    let v = format!("{prefix}{name}");
    if v.len() > 63 {
        v[..63].trim_end_matches(['-', '.']).to_owned()
    } else {
        v
    }
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

fn is_token_volume(v: &Volume) -> bool {
    v.projected.as_ref().is_some_and(|p| {
        p.sources
            .iter()
            .flatten()
            .any(|s| s.service_account_token.is_some())
    })
}

/// What no container but the sidecar may reach in a pod of the namespace.
pub struct Boundary<'a> {
    /// Operator configuration (the audit sinks' Secrets).
    pub config: &'a Config,
    /// Every Target of the namespace (their credentials Secrets).
    pub targets: &'a [Target],
    /// Names of Secrets labelled sensitive among those the checked containers reference.
    pub sensitive_secrets: &'a BTreeSet<String>,
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
/// the gateway: privileged or with a dangerous capability, mounting a service-account token,
/// mounting any of agentgate's volumes (all but the client volume, which only read-only),
/// or using a Secret only the sidecar may read (a Target's credentials, a MaskPolicy's hash
/// key, the audit sinks' Secrets, a Secret labelled [`SENSITIVE_LABEL`]) through a volume,
/// `env` or `envFrom`.
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
    if let Some(why) = privilege_problem(c.security_context.as_ref()) {
        return refuse(format!("{what} {} {why}: {who} may not", c.name));
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
        if boundary.sensitive_secrets.contains(&s) {
            return refuse(format!(
                "{what} {} uses Secret {s}, which is labelled {SENSITIVE_LABEL}: only the sidecar may read it",
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
        sensitive_secrets: input.sensitive_secrets,
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
    {
        if let Some(ms) = c.volume_mounts.as_mut() {
            ms.retain(|m| !auto.contains(&m.name));
        }
    }

    // Volumes of the sidecar.
    let mut target_mounts = Vec::new();
    let vols = spec.volumes.get_or_insert_with(Vec::new);
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
        let vname = volume_name("agentgate-target-", &tname);
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
        let vname = volume_name("agentgate-maskkey-", s);
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
    /// The Secrets labelled [`SENSITIVE_LABEL`] among those the checked containers reference.
    sensitive: BTreeSet<String>,
    /// The Secrets its MaskPolicies name as `hashKey`.
    mask_keys: BTreeSet<String>,
}

/// Reads what [`check_container`] needs in namespace `ns`, failing closed: the Targets and
/// MaskPolicies (from the API server's watch cache) and the labels of the Secrets in
/// `referenced` (consistent reads). The reads are independent: made at once, the admission
/// waits for the slowest, not for their sum.
async fn namespace_inputs(
    client: &kube::Client,
    ns: &str,
    referenced: &BTreeSet<String>,
) -> Result<NamespaceInputs, String> {
    let targets: Api<Target> = Api::namespaced(client.clone(), ns);
    let policies: Api<MaskPolicy> = Api::namespaced(client.clone(), ns);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let cached = from_cache();
    let (targets, policies, labelled) = futures::join!(
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
    let mut sensitive = BTreeSet::new();
    for (name, meta) in labelled {
        let meta = meta.map_err(|e| format!("cannot read Secret {name} (failing closed): {e}"))?;
        if meta.is_some_and(|m| {
            m.metadata
                .labels
                .unwrap_or_default()
                .get(SENSITIVE_LABEL)
                .map(String::as_str)
                == Some("true")
        }) {
            sensitive.insert(name.clone());
        }
    }
    let mask_keys = policies
        .map_err(|e| format!("cannot list MaskPolicies (failing closed): {e}"))?
        .items
        .iter()
        .filter_map(|p| p.spec.hash_key.as_ref().map(|k| k.name.clone()))
        .collect();
    Ok(NamespaceInputs {
        targets,
        sensitive,
        mask_keys,
    })
}

/// `pods/ephemeralcontainers`: each debug container added to an injected pod is held to what
/// agent containers are held to ([`check_container`]), and may not target the sidecar (it
/// would share its process namespace).
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
        sensitive_secrets: &inputs.sensitive,
        mask_key_secrets: &inputs.mask_keys,
    };
    for c in &containers {
        if let Err(Refusal(why)) = check_container(Kind::Debug, pod, c, &boundary) {
            return deny(req, why);
        }
    }
    AdmissionResponse::from(req)
}

fn deny(req: &AdmissionRequest<DynamicObject>, msg: impl std::fmt::Display) -> AdmissionResponse {
    AdmissionResponse::from(req).deny(format!("agentgate injection refused: {msg}"))
}

/// The mutating webhook for pods.
pub async fn mutate(
    ctx: &WebhookContext,
    req: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    let ns = req.namespace.clone().unwrap_or_default();
    if ns == ctx.config.namespace {
        return AdmissionResponse::from(req);
    }
    let Some(obj) = &req.object else {
        return AdmissionResponse::from(req);
    };
    let value = match serde_json::to_value(obj) {
        Ok(v) => v,
        Err(e) => return deny(req, format!("cannot read the pod: {e}")),
    };
    let pod: Pod = match serde_json::from_value(value.clone()) {
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
        sensitive,
        mask_keys,
    } = match inputs {
        Ok(i) => i,
        Err(why) => return deny(req, why),
    };
    let input = InjectionInput {
        config: &ctx.config,
        identity: &id,
        targets: &targets,
        sensitive_secrets: &sensitive,
        mask_key_secrets: &mask_keys,
    };
    let injected = match inject(&pod, &input) {
        Ok(p) => p,
        Err(Refusal(why)) => return deny(req, why),
    };
    let new_value = match serde_json::to_value(&injected) {
        Ok(v) => v,
        Err(e) => return deny(req, format!("cannot encode the pod: {e}")),
    };
    // Compare like with like: the typed round trip of the original.
    let original = match serde_json::to_value(&pod) {
        Ok(v) => v,
        Err(e) => return deny(req, format!("cannot encode the pod: {e}")),
    };
    let _ = value;
    let patch = json_patch::diff(&original, &new_value);
    match AdmissionResponse::from(req).with_patch(patch) {
        Ok(r) => r,
        Err(e) => deny(req, format!("cannot encode the patch: {e}")),
    }
}
