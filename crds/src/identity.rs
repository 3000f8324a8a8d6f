//! `AgentIdentity`: a named non-human principal.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{AccessScope, Condition, Time};

/// A non-human principal (an AI coding agent) that agentgate authenticates, authorizes and
/// records. It says how the agent proves who it is, who answers for it, what it may do without
/// asking (its baseline), who may approve more, and for how long at most.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "agentgate.dev",
    version = "v1alpha1",
    kind = "AgentIdentity",
    plural = "agentidentities",
    namespaced,
    status = "AgentIdentityStatus",
    shortname = "agid",
    category = "agentgate",
    derive = "PartialEq",
    doc = "A non-human principal (an AI coding agent): how it authenticates, who owns it, its standing access per target, who may approve its grants and the longest grant it may get.",
    printcolumn(
        name = "Owner",
        type_ = "string",
        json_path = ".spec.owner",
        description = "Who answers for this agent"
    ),
    printcolumn(
        name = "Disabled",
        type_ = "boolean",
        json_path = ".spec.disabled",
        description = "A disabled identity can do nothing"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether its references resolved"
    ),
    printcolumn(
        name = "Last Seen",
        type_ = "date",
        json_path = ".status.lastSeen",
        description = "When the identity last made a request"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentitySpec {
    /// Who answers for this agent: a team or a person, e.g. `team-payments` or
    /// `alice@example.com`. Shown to approvers and in audit exports (AC-2).
    #[schemars(length(min = 1, max = 253))]
    pub owner: String,
    /// What the agent is and what it is for, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// How the agent proves it is this identity. At least one method is required.
    pub authentication: IdentityAuthentication,
    /// Standing access per target that needs no grant. Keep it small (least privilege, AC-6):
    /// anything beyond it goes through an AccessGrant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub baseline: Vec<TargetAccess>,
    /// Who may approve this identity's grants, besides users that RBAC allows the verb
    /// `approve` on `accessgrants`. The identity itself can never approve its own grants.
    #[serde(default, skip_serializing_if = "Approvers::is_empty")]
    pub approvers: Approvers,
    /// The longest duration a grant for this identity may have, as a Go duration ("1h").
    /// Requests for longer are refused at admission.
    #[serde(default = "default_max_grant_duration")]
    #[schemars(
        length(max = 32),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m') && duration(self) <= duration('168h')").message("maxGrantDuration must be between 1m and 168h"))]
    pub max_grant_duration: String,
    /// When true the identity can do nothing: new sessions are refused, every request in an
    /// open session is refused, what is running ends (a statement is canceled; a watch, exec
    /// or SSH channel is closed) and its grants are revoked.
    #[serde(default)]
    pub disabled: bool,
}

fn default_max_grant_duration() -> String {
    "1h".to_owned()
}

/// How an agent proves it is this identity. Tokens are verified by the sidecar; the verified
/// subject maps to exactly one AgentIdentity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.serviceAccount) || has(self.oidc)").message("authentication needs serviceAccount or oidc (or both)"))]
pub struct IdentityAuthentication {
    /// The Kubernetes service account of the agent's pod. Its projected token (audience
    /// `agentgate`) is verified against the API server's issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountRef>,
    /// A token from an external OpenID Connect provider, presented by the agent (for
    /// PostgreSQL: as the password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcSubject>,
}

/// A service account.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Name of the service account.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Namespace of the service account; defaults to the AgentIdentity's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: Option<String>,
}

/// Which OpenID Connect tokens belong to this identity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.subject) || (has(self.claims) && size(self.claims) > 0)").message("oidc needs a subject or at least one claim: otherwise every token of the issuer would match"))]
pub struct OidcSubject {
    /// The issuer URL, exactly as in the token's `iss` claim; its discovery document and keys
    /// are fetched from `<issuer>/.well-known/openid-configuration`.
    #[schemars(length(min = 9, max = 2048), pattern(r"^https://[^\s]+$"))]
    pub issuer: String,
    /// The audience the token must carry in `aud`.
    #[schemars(length(min = 1, max = 253))]
    pub audience: String,
    /// The exact subject (`sub` claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub subject: Option<String>,
    /// Further claims that must equal these values, e.g. `azp: ci-agent`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(length(max = 16))]
    pub claims: BTreeMap<String, String>,
}

/// Standing access to one target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetAccess {
    /// Name of a Target in the same namespace.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub target: String,
    /// What is allowed on it.
    pub scope: AccessScope,
}

/// People allowed to approve an identity's grants.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approvers {
    /// User names as the API server authenticates them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub users: Vec<String>,
    /// Groups whose members may approve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub groups: Vec<String>,
}

impl Approvers {
    /// True when no user and no group is listed.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.groups.is_empty()
    }
}

/// What the operator observed about an AgentIdentity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentityStatus {
    /// `Ready`: the service account and OIDC issuer resolve; `Disabled`: the identity is off.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Names of this identity's AccessGrants that are Active now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active_grants: Vec<String>,
    /// When a sidecar last authenticated this identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
}
