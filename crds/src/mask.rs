//! `MaskPolicy`: which values are masked, where, and how.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, SecretKeyRef};

/// Which values the gateways mask in responses, for which targets and identities, and how.
///
/// Rules are tried in order for every value; the first rule that matches decides the action.
/// Column rules follow the source column through aliases, casts, functions and views; detector
/// and pattern rules look at the value itself, wherever it appears.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "agentgate.dev",
    version = "v1alpha1",
    kind = "MaskPolicy",
    plural = "maskpolicies",
    namespaced,
    status = "MaskPolicyStatus",
    shortname = "mpol",
    category = "agentgate",
    derive = "PartialEq",
    doc = "Which values are masked in responses (by source column, by value detector, by regex, by JSON path in Kubernetes objects), for which targets and identities, and how (redact, partial, keyed hash, null).",
    printcolumn(
        name = "Rules",
        type_ = "integer",
        json_path = ".status.rules",
        description = "Number of rules"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether every rule is valid"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.rules.exists(r, r.action == 'Hash') || has(self.hashKey)").message("spec.hashKey is required when a rule uses the Hash action"))]
#[x_kube(validation = Rule::new("self.rules.all(r, self.rules.exists_one(s, s.name == r.name))").message("rule names must be unique"))]
pub struct MaskPolicySpec {
    /// Targets the policy applies to, by name; `*` globs allowed. Empty: every target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub targets: Vec<String>,
    /// AgentIdentities the policy applies to, by name; `*` globs allowed. Empty: every identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub identities: Vec<String>,
    /// The rules, tried in order.
    #[schemars(length(min = 1, max = 128))]
    pub rules: Vec<MaskRule>,
    /// The Secret key holding the key for the `Hash` action (at least 32 bytes). The same key
    /// gives the same hash, so joins on hashed columns still work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<SecretKeyRef>,
}

/// One masking rule: what it matches and what it does to a match.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.columns) + size(self.detectors) + size(self.patterns) + size(self.kubernetes) > 0").message("a rule must match something: set columns, detectors, patterns or kubernetes"))]
#[x_kube(validation = Rule::new("self.action == 'Partial' || !has(self.keepLast)").message("keepLast applies only to the Partial action"))]
#[x_kube(validation = Rule::new("self.action == 'Redact' || !has(self.replacement)").message("replacement applies only to the Redact action"))]
pub struct MaskRule {
    /// The rule's name, used in audit records ("masked by customers-email").
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// PostgreSQL source columns as `table.column` or `schema.table.column`, `*` globs allowed
    /// (`public.customers.email`, `*.ssn`). Followed through aliases, expressions and views.
    #[serde(default)]
    #[schemars(length(max = 128), inner(length(min = 1, max = 253)))]
    pub columns: Vec<String>,
    /// Built-in value detectors applied to every text value.
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub detectors: Vec<Detector>,
    /// Custom regular expressions (Rust `regex` syntax: no look-around, no back-references)
    /// applied to every text value; the matching part is masked.
    #[serde(default)]
    #[schemars(length(max = 32), inner(length(min = 1, max = 1024)))]
    pub patterns: Vec<String>,
    /// Fields of Kubernetes objects, by kind and JSON path.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub kubernetes: Vec<KubernetesFieldMatch>,
    /// What to do with a match.
    pub action: MaskAction,
    /// For `Partial`: how many trailing characters stay visible (e.g. 4 for a card number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub keep_last: Option<u32>,
    /// For `Redact`: the text that replaces the value (default `****`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub replacement: Option<String>,
}

/// A built-in detector of sensitive values.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Detector {
    /// E-mail addresses.
    Email,
    /// Payment card numbers (13–19 digits, spaces or dashes allowed) that pass the Luhn check.
    CardNumber,
    /// US Social Security numbers (`123-45-6789`).
    UsSsn,
    /// UK National Insurance numbers (`QQ 12 34 56 C`).
    UkNino,
    /// International Bank Account Numbers that pass the mod-97 check.
    Iban,
    /// JSON Web Tokens (three base64url parts, a JSON header).
    Jwt,
    /// AWS access key ids (`AKIA…`, `ASIA…`).
    AwsAccessKey,
    /// Google Cloud API keys (`AIza…`).
    GcpApiKey,
    /// GitHub tokens (`ghp_…`, `github_pat_…`).
    GithubToken,
    /// PEM private key blocks (`-----BEGIN … PRIVATE KEY-----`).
    PrivateKey,
}

/// Fields of one kind of Kubernetes object to mask.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesFieldMatch {
    /// The API group of the kind; `""` for the core group.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub api_group: String,
    /// The kind, e.g. `Secret`, `ConfigMap`, `Pod`.
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// JSON paths inside the object, dotted with `*` for any key or index:
    /// `data.*`, `spec.containers.*.env.*.value`.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 512)))]
    pub paths: Vec<String>,
}

/// What a rule does to a value it matches.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum MaskAction {
    /// Replace the value with a fixed text (`replacement`, default `****`).
    Redact,
    /// Keep the last `keepLast` characters, mask the rest with `*`.
    Partial,
    /// Replace the value with a keyed hash (HMAC-SHA-256 with `hashKey`, hex): equal values
    /// give equal hashes, so joins and GROUP BY still work, but the value cannot be recovered.
    Hash,
    /// Replace the value with SQL NULL (JSON `null`). Named `SetNull` because YAML reads a
    /// bare `Null` as no value at all.
    SetNull,
}

/// What the operator observed about a MaskPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaskPolicyStatus {
    /// `Ready`: every pattern compiles and the hash key exists; otherwise the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<u32>,
}
