//! `AccessGrant`: just-in-time access for one identity to one target.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{AccessScope, Condition, OperationClass, Time, UserRef};

/// Just-in-time access for one AgentIdentity to one Target, for a limited time.
///
/// Lifecycle: `Pending → Approved → Active → Expired`, or `Denied`, or `Revoked`. An approver
/// decides by patching `spec.decision`; agentgate's webhook records who did it from the
/// authenticated request. The clock starts at approval.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "agentgate.dev",
    version = "v1alpha1",
    kind = "AccessGrant",
    namespaced,
    status = "AccessGrantStatus",
    shortname = "agrant",
    category = "agentgate",
    derive = "PartialEq",
    doc = "Just-in-time access for one AgentIdentity to one Target, with a scope, a duration and a reason. Approvers decide by patching spec.decision; the clock starts at approval.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Approved, Active, Expired, Denied or Revoked"
    ),
    printcolumn(
        name = "Identity",
        type_ = "string",
        json_path = ".spec.identity",
        description = "The AgentIdentity that receives the access"
    ),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".spec.target",
        description = "The Target the access is to"
    ),
    printcolumn(
        name = "Duration",
        type_ = "string",
        json_path = ".spec.duration",
        priority = 1,
        description = "How long the access lasts once approved"
    ),
    printcolumn(
        name = "Approver",
        type_ = "string",
        json_path = ".status.approvedBy.username",
        priority = 1,
        description = "Who approved it"
    ),
    printcolumn(
        name = "Expires",
        type_ = "date",
        json_path = ".status.expiresAt",
        description = "When the access ends"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(oldSelf.decision) || (has(self.decision) && self.decision == oldSelf.decision)").message("spec.decision is immutable once made: to end an approved grant set spec.revocation; to ask again create a new AccessGrant"))]
#[x_kube(validation = Rule::new("!has(oldSelf.revocation) || (has(self.revocation) && self.revocation == oldSelf.revocation)").message("spec.revocation is immutable once set"))]
#[x_kube(validation = Rule::new("has(self.command) == has(oldSelf.command)").message("spec.command is immutable: create a new AccessGrant for another command"))]
#[x_kube(validation = Rule::new("!has(self.revocation) || !has(self.decision) || self.decision.verdict == 'Approve'").message("spec.revocation applies to approved or pending grants; a denied grant cannot be revoked"))]
pub struct AccessGrantSpec {
    /// The AgentIdentity (same namespace) that receives the access. Immutable.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.identity is immutable"))]
    pub identity: String,
    /// The Target (same namespace) the access is to. Immutable.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.target is immutable"))]
    pub target: String,
    /// What the grant allows on the target, on top of the identity's baseline. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.scope is immutable: create a new AccessGrant for a different scope"))]
    pub scope: AccessScope,
    /// How long the access lasts once approved, as a Go duration ("15m", "2h"): between 10s and
    /// 168h, and no longer than the identity's `maxGrantDuration`. Immutable.
    #[serde(default = "default_duration")]
    #[schemars(
        length(max = 32),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10s') && duration(self) <= duration('168h')").message("spec.duration must be between 10s and 168h"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.duration is immutable"))]
    pub duration: String,
    /// Why the access is needed: shown to approvers and kept in the audit trail. Immutable.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.reason is immutable"))]
    pub reason: String,
    /// When set, the grant allows exactly this one command and nothing else. The sidecar sets
    /// it when a guardrail holds a command for approval. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.command is immutable"))]
    pub command: Option<BoundCommand>,
    /// How long the request waits for a decision before it expires, as a Go duration
    /// (default "1h", at most 168h), counted from its creation. A decision made later is
    /// refused. Immutable.
    #[serde(default = "default_pending_ttl")]
    #[schemars(
        length(max = 32),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10s') && duration(self) <= duration('168h')").message("spec.pendingTTL must be between 10s and 168h"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.pendingTTL is immutable: a request that expired is asked again with a new AccessGrant"))]
    #[serde(rename = "pendingTTL")]
    pub pending_ttl: String,
    /// Who asked for the grant. Written by agentgate's webhook from the authenticated request
    /// that created the object; a value sent by a client is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.requestedBy is immutable"))]
    pub requested_by: Option<UserRef>,
    /// The approver's decision. Set it with a patch (`kubectl agentgate grants approve`, or
    /// `kubectl patch accessgrant NAME --type merge -p '{"spec":{"decision":{"verdict":"Approve"}}}'`).
    /// The webhook records who decided and when; a decision cannot be changed once made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<GrantDecision>,
    /// Ends an approved (or still pending) grant early. Set it with a patch; the webhook
    /// records who revoked it and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<GrantRevocation>,
}

fn default_duration() -> String {
    "15m".to_owned()
}

fn default_pending_ttl() -> String {
    "1h".to_owned()
}

/// One exact command a grant is bound to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BoundCommand {
    /// The command as the agent sent it, with sensitive literals masked, for the approver to
    /// read.
    #[schemars(length(min = 1, max = 16384))]
    pub text: String,
    /// The normalized fingerprint the gateway matches (for SQL: the parse tree's fingerprint,
    /// so constants must match exactly and whitespace or comments do not matter).
    #[schemars(length(min = 1, max = 128))]
    pub fingerprint: String,
    /// The operation class the guardrail assigned to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<OperationClass>,
    /// The guardrail rule that held it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub rule: Option<String>,
}

/// An approver's verdict.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Verdict {
    /// Grant the access: the clock starts now.
    Approve,
    /// Refuse the request.
    Deny,
}

/// A decision on a grant request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantDecision {
    /// `Approve` or `Deny`.
    pub verdict: Verdict,
    /// The approver's note, kept in the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
    /// Who decided: written by the webhook from the authenticated request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<UserRef>,
    /// When the decision was made: written by the webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<Time>,
}

/// An early end of a grant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantRevocation {
    /// Why the grant was ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
    /// Who revoked it: written by the webhook from the authenticated request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<UserRef>,
    /// When: written by the webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Time>,
}

/// Where a grant is in its lifecycle.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum GrantPhase {
    /// Waiting for an approver.
    Pending,
    /// Approved; the operator is starting the clock.
    Approved,
    /// In force until `status.expiresAt`.
    Active,
    /// Its time ran out (or nobody decided before the pending TTL).
    Expired,
    /// An approver refused it.
    Denied,
    /// Ended early by an approver, by deletion, or because the identity was disabled.
    Revoked,
}

impl GrantPhase {
    /// True for phases a grant never leaves.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Expired | Self::Denied | Self::Revoked)
    }
}

/// What the operator observed and decided about an AccessGrant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessGrantStatus {
    /// Where the grant is in its lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<GrantPhase>,
    /// Standard conditions: `Ready` (the grant is in force) with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Who approved the grant (copied from the authenticated decision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<UserRef>,
    /// When it was approved: the start of its clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_at: Option<Time>,
    /// When it ends (or ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When it reached a final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Time>,
    /// Who ended it, when a person did (a denial or a revocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<UserRef>,
    /// A sentence on the current phase, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
