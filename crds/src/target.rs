//! `Target`: a database, cluster or host that agents reach through agentgate.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, OperationClass, SecretKeyRef, SecretRef};

/// A database, Kubernetes cluster or SSH host that agents reach only through agentgate: its
/// address, how agentgate connects upstream (TLS, credentials the agent never sees) and the
/// guardrails that apply to it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "agentgate.dev",
    version = "v1alpha1",
    kind = "Target",
    namespaced,
    status = "TargetStatus",
    shortname = "agtarget",
    category = "agentgate",
    derive = "PartialEq",
    doc = "A PostgreSQL database, Kubernetes cluster or SSH host that agents reach only through agentgate: address, upstream TLS, the credentials Secret (mounted into the sidecar only) and guardrails per operation class.",
    printcolumn(
        name = "Protocol",
        type_ = "string",
        json_path = ".spec.protocol",
        description = "Postgres, Kubernetes or SSH"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether its references resolved"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.protocol == 'Postgres') == has(self.postgres)").message("spec.postgres is required exactly when protocol is Postgres"))]
#[x_kube(validation = Rule::new("(self.protocol == 'Kubernetes') == has(self.kubernetes)").message("spec.kubernetes is required exactly when protocol is Kubernetes"))]
#[x_kube(validation = Rule::new("(self.protocol == 'SSH') == has(self.ssh)").message("spec.ssh is required exactly when protocol is SSH"))]
#[x_kube(validation = Rule::new("self.guardrails.all(g, self.guardrails.exists_one(h, h.name == g.name))").message("guardrail names must be unique"))]
#[x_kube(validation = Rule::new("!has(self.kubernetes) || !has(self.kubernetes.tls) || !has(self.kubernetes.tls.mode) || self.kubernetes.tls.mode == 'VerifyFull'").message("spec.kubernetes.tls.mode must be VerifyFull: agentgate sends the agent's requests (and its own credential) to an API server only over TLS that names it"))]
pub struct TargetSpec {
    /// The protocol agents speak to this target: `Postgres`, `Kubernetes` or `SSH`.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.protocol is immutable"))]
    pub protocol: Protocol,
    /// Connection settings for a PostgreSQL target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresTarget>,
    /// Connection settings for a Kubernetes API server target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesTarget>,
    /// Connection settings for an SSH host target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshTarget>,
    /// Guardrails, tried in order before agentgate's defaults; the first that matches a request
    /// decides. Defaults hold UPDATE/DELETE without WHERE and TRUNCATE for approval and block
    /// dangerous administration.
    #[serde(default)]
    #[schemars(length(max = 128))]
    pub guardrails: Vec<Guardrail>,
    /// How long a held request waits for an approver, then runs once approved, or gets an
    /// error naming the AccessGrant still pending (Go duration; `0s` answers at once with the
    /// grant to wait for, and the agent runs the request again once it is approved). Applies
    /// to a PostgreSQL statement, a Kubernetes API request, and an SSH command or session
    /// (`ssh host CMD`, a shell, scp, sftp); a line typed into an open SSH shell and one sftp
    /// operation are answered at once.
    #[serde(default = "default_hold_timeout")]
    #[schemars(
        length(max = 32),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    #[x_kube(validation = Rule::new("duration(self) <= duration('1h')").message("spec.holdTimeout must be at most 1h"))]
    pub hold_timeout: String,
}

fn default_hold_timeout() -> String {
    "0s".to_owned()
}

/// A protocol agentgate proxies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Protocol {
    /// PostgreSQL wire protocol.
    Postgres,
    /// The Kubernetes API (HTTPS, watch, exec).
    Kubernetes,
    /// SSH.
    #[serde(rename = "SSH")]
    Ssh,
}

/// How agentgate verifies the upstream's TLS certificate.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum TlsMode {
    /// No TLS. Only for a database on the same host or a trusted private link.
    Disable,
    /// TLS, the certificate must chain to the CA but the host name is not checked.
    VerifyCA,
    /// TLS, the certificate must chain to the CA and name the host (the default).
    #[default]
    VerifyFull,
}

/// Upstream TLS settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'Disable' || !has(self.ca)").message("tls.ca applies only when mode is VerifyCA or VerifyFull"))]
pub struct UpstreamTls {
    /// `Disable`, `VerifyCA` or `VerifyFull` (default).
    #[serde(default)]
    pub mode: TlsMode,
    /// The CA certificate (PEM) to verify against; the system roots when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<SecretKeyRef>,
    /// The name to verify the certificate against, when it differs from the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: Option<String>,
}

/// A PostgreSQL server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresTarget {
    /// Host name or IP address of the server.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Port of the server.
    #[serde(default = "default_pg_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// The database agents connect to.
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
    /// Upstream TLS.
    #[serde(default)]
    pub tls: UpstreamTls,
    /// The Secret with the upstream role's `username` and `password` (SCRAM-SHA-256 or md5).
    /// Mounted into the sidecar only; the agent never sees it.
    pub credentials: SecretRef,
}

fn default_pg_port() -> u16 {
    5432
}

/// A Kubernetes API server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesTarget {
    /// The API server URL; empty for the cluster the sidecar runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 9, max = 2048), pattern(r"^https://[^\s]+$"))]
    pub server: Option<String>,
    /// Upstream TLS: always verified (`VerifyFull`); `serverName` when the certificate names
    /// the API server differently from the URL's host.
    #[serde(default)]
    pub tls: UpstreamTls,
    /// The Secret with the credential agentgate uses upstream (`token`, or `tls.crt` and
    /// `tls.key`); it must allow only impersonating the agent's identity. Empty for the
    /// sidecar's own projected token in the local cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<SecretRef>,
}

/// An SSH host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshTarget {
    /// Host name or IP address.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Port.
    #[serde(default = "default_ssh_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// The remote login used when the agent does not ask for another one.
    #[schemars(length(min = 1, max = 32))]
    pub user: String,
    /// The host's public keys in `known_hosts` format. agentgate refuses a host key that is
    /// not listed: it never trusts on first use.
    #[schemars(length(min = 1, max = 65536))]
    pub known_hosts: String,
    /// The Secret with the private key (`ssh-privatekey`) and optionally a certificate
    /// (`ssh-certificate`) agentgate logs in with. Mounted into the sidecar only.
    pub credentials: SecretRef,
}

fn default_ssh_port() -> u16 {
    22
}

/// What a guardrail does with a request it matches.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum GuardrailAction {
    /// Let it through if the baseline or a grant covers its operation class.
    Allow,
    /// Let it through only under an Active AccessGrant covering it (baseline is not enough).
    RequireGrant,
    /// Hold it: an AccessGrant bound to this exact command must be approved first.
    RequireApproval,
    /// Refuse it, whatever grants exist.
    Block,
}

/// A guardrail: requests it matches get its action.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.operations) + size(self.matches) > 0").message("a guardrail must match something: set operations or matches"))]
pub struct Guardrail {
    /// The guardrail's name, quoted in refusals and audit records.
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Operation classes it covers; empty: any class.
    #[serde(default)]
    #[schemars(length(max = 6))]
    pub operations: Vec<OperationClass>,
    /// Protocol-specific patterns, any of which must match (empty: any request of the classes):
    /// SQL statement tags or function names (`DROP TABLE`, `pg_terminate_backend`,
    /// `SET search_path`), Kubernetes `verb resource` pairs (`delete namespaces`), shell
    /// command globs (`rm -rf *`). Each statement of a SQL string, and each simple command
    /// of a shell line, meets the guardrails on its own (its class and its keys); the whole
    /// gets the strictest outcome.
    #[serde(default)]
    #[schemars(length(max = 64), inner(length(min = 1, max = 1024)))]
    pub matches: Vec<String>,
    /// What happens to a matching request.
    pub action: GuardrailAction,
    /// Extra text for the agent when the guardrail refuses or holds a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}

/// What the operator observed about a Target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// `Ready`: the referenced Secrets exist and hold the expected keys; otherwise the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
