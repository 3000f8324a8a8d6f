//! Types and helpers shared by several kinds.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The API group of every agentgate kind.
pub const GROUP: &str = "agentgate.dev";
/// The API version of every agentgate kind in this crate.
pub const VERSION: &str = "v1alpha1";
/// The category every agentgate kind belongs to: `kubectl get agentgate` lists them all.
pub const CATEGORY: &str = "agentgate";

/// The regular expression a Go-style duration must match ("90s", "15m", "1h30m").
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// The regular expression of a Kubernetes object name (DNS subdomain, RFC 1123).
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";

/// The class of an operation, the unit that baselines, grants and guardrails speak of.
///
/// Every gateway classifies each request into exactly one class:
///
/// | class | PostgreSQL | Kubernetes API | SSH |
/// |---|---|---|---|
/// | `Read` | SELECT, SHOW, EXPLAIN | get, list, watch | read-only commands |
/// | `Write` | INSERT, UPDATE, DELETE, MERGE, COPY FROM | create, update, patch, delete | commands that change files |
/// | `DDL` | CREATE, ALTER, DROP, TRUNCATE | CRDs, namespaces | package and service changes |
/// | `Privilege` | GRANT, REVOKE, roles, SET ROLE | RBAC objects, impersonation | sudo, su |
/// | `Admin` | ALTER SYSTEM, server-side files and programs, killing backends | nodes, agentgate's own objects | shutdown, mkfs, firewall |
/// | `Exec` | DO blocks, procedural code | exec, attach, port-forward | interactive shells, port forwarding |
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum OperationClass {
    /// Reads data without changing it.
    Read,
    /// Changes data.
    Write,
    /// Changes the schema or structure (data definition).
    #[serde(rename = "DDL")]
    Ddl,
    /// Changes who may do what.
    Privilege,
    /// Administers the server itself, or reaches outside the data it serves.
    Admin,
    /// Runs arbitrary code or opens an interactive channel.
    Exec,
}

impl OperationClass {
    /// The class's name as it appears in manifests and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "Read",
            Self::Write => "Write",
            Self::Ddl => "DDL",
            Self::Privilege => "Privilege",
            Self::Admin => "Admin",
            Self::Exec => "Exec",
        }
    }
}

impl std::fmt::Display for OperationClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reference to one key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the namespace of the object that refers to it.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key inside the Secret's `data`.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A reference to a whole Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret, in the namespace of the object that refers to it.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// An authenticated Kubernetes user, as the API server reported it in an admission request.
///
/// agentgate never trusts a user name typed into an object: fields of this type are written by
/// agentgate's admission webhook from the authenticated request, and any value a client sends is
/// replaced.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserRef {
    /// The authenticated user name, e.g. `alice@example.com` or
    /// `system:serviceaccount:agents:claude`.
    pub username: String,
    /// The user's UID as reported by the authenticator, when it reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The groups the user belonged to at the time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// What a baseline entry or a grant allows on one target.
///
/// `operations` is checked by every gateway; the other fields narrow it for one protocol and
/// are ignored by the others. An empty narrowing list means "no further restriction".
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessScope {
    /// Operation classes allowed: `Read`, `Write`, `DDL`, `Privilege`, `Admin`, `Exec`.
    #[schemars(length(min = 1, max = 6))]
    #[x_kube(validation = Rule::new("self.all(x, self.exists_one(y, x == y))").message("operations must not repeat a class"))]
    pub operations: Vec<OperationClass>,
    /// PostgreSQL: tables the access is limited to, as `table` (in `public`), `schema.table`
    /// or globs such as `public.*`, `billing.invoice_*` or `*.orders` (any schema). A table a
    /// statement names without its schema is judged as the one the session's search path
    /// reaches, as the server finds it (`pg_catalog` first, then the login's own schema and
    /// `public` on the default path). Empty: every table the upstream role can reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub tables: Vec<String>,
    /// Kubernetes API: the requests allowed, in RBAC's shape. Empty with a Kubernetes target:
    /// what the operation classes imply, in every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub kubernetes: Vec<KubernetesRule>,
    /// SSH: logins and commands allowed on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshScope>,
}

impl AccessScope {
    /// Why this scope does not fit a Target of `protocol`, if it does not: it limits access
    /// with settings another protocol reads (`tables` for PostgreSQL, `kubernetes` for the
    /// Kubernetes API, `ssh` for SSH), which the Target's gateway would ignore, so the scope
    /// would allow more than it says.
    pub fn mismatch(&self, protocol: crate::target::Protocol) -> Option<String> {
        use crate::target::Protocol;
        let foreign = [
            ("tables", !self.tables.is_empty(), Protocol::Postgres),
            (
                "kubernetes",
                !self.kubernetes.is_empty(),
                Protocol::Kubernetes,
            ),
            ("ssh", self.ssh.is_some(), Protocol::Ssh),
        ]
        .into_iter()
        .filter(|(_, set, p)| *set && *p != protocol)
        .map(|(f, _, _)| f)
        .collect::<Vec<_>>();
        if foreign.is_empty() {
            return None;
        }
        let own = match protocol {
            Protocol::Postgres => "tables",
            Protocol::Kubernetes => "kubernetes",
            Protocol::Ssh => "ssh",
        };
        Some(format!(
            "scope.{} does not apply to a {protocol:?} Target and would be ignored, leaving the scope wider than it reads: limit it with scope.{own}",
            foreign.join(" and scope.")
        ))
    }
}

/// One rule of Kubernetes API access, shaped like an RBAC PolicyRule plus namespaces.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesRule {
    /// Verbs, e.g. `get`, `list`, `watch`, `create`, `patch`, `delete`; `*` for all.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 63)))]
    pub verbs: Vec<String>,
    /// API groups; `""` is the core group, `*` all groups.
    #[serde(default)]
    #[schemars(length(max = 32), inner(length(max = 253)))]
    pub api_groups: Vec<String>,
    /// Resources, e.g. `pods`, `deployments`, `pods/log`; `*` for all.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 253)))]
    pub resources: Vec<String>,
    /// Namespaces; empty means every namespace the rule's resources live in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub namespaces: Vec<String>,
    /// Object names; empty means every name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub resource_names: Vec<String>,
    /// Secrets read under this rule are sent with their `data` in clear. By default agentgate
    /// masks every Secret's values, whatever the rule allows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reveal_secret_data: bool,
}

/// SSH access on a host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshScope {
    /// Remote logins the agent may use; empty means the Target's default user only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 32)))]
    pub logins: Vec<String>,
    /// Commands allowed, as globs over the parsed command line (e.g. `systemctl status *`):
    /// a `*` that is a whole word matches any arguments; a `*` inside a word (`cat
    /// /srv/reports/*`) matches text within that one argument only (no blanks, no `..`
    /// segment, no `$` or backtick expansion). Empty: whatever the operation classes and
    /// guardrails allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 1024)))]
    pub commands: Vec<String>,
    /// Allow port forwarding: local (`ssh -L`, `ssh -W`) and remote (`ssh -R`); refused by
    /// default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub port_forwarding: bool,
    /// Allow SSH agent forwarding (refused by default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent_forwarding: bool,
    /// Allow X11 forwarding (refused by default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub x11_forwarding: bool,
}

/// Why a duration string could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid duration {input:?}: {reason} (use Go syntax such as \"90s\", \"15m\" or \"1h30m\")"
)]
pub struct DurationError {
    /// The text that was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses a Go-style duration ("300ms", "90s", "15m", "1h30m", "1.5h"), the syntax every
/// duration field of the API uses and that the API server's CEL `duration()` accepts.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.to_owned(),
        reason,
    };
    if input.is_empty() {
        return Err(err("empty"));
    }
    let mut rest = input;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| err("a number without a unit"))?;
        if num_len == 0 {
            return Err(err("expected a number"));
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| err("not a number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1e0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(err("a number without a unit")),
            _ => return Err(err("unknown unit")),
        };
        rest = &rest[unit_len..];
        total += value * nanos_per_unit;
    }
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(err("too large"));
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Formats a duration the way Go prints it and `parse_duration` reads it back ("1h30m0s"
/// becomes "1h30m").
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        let ms = d.subsec_millis();
        if ms > 0 {
            out.push_str(&format!("{s}.{ms:03}s"));
        } else {
            out.push_str(&format!("{s}s"));
        }
    }
    out
}

/// Labels that make an object findable by identity and target with a label selector.
pub fn selector_labels(identity: &str, target: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (format!("{GROUP}/identity"), identity.to_owned()),
        (format!("{GROUP}/target"), target.to_owned()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "15", "m", "15x", "1h 30m", "-5m", "1..5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn durations_format_round_trip() {
        for s in ["1h30m", "15m", "90s", "0s", "1h"] {
            let d = parse_duration(s).unwrap();
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
    }
}
