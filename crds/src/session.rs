//! `AgentSession`: one agent's session through one gateway, summarised.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, Time};
use crate::target::Protocol;

/// One session of an agent through the sidecar to one target: who, where, when, what was
/// decided, and the head of its audit chain. The full records live in the audit sinks; this
/// object is the summary `kubectl agentgate sessions` lists.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "agentgate.dev",
    version = "v1alpha1",
    kind = "AgentSession",
    namespaced,
    status = "AgentSessionStatus",
    shortname = "agsess",
    category = "agentgate",
    derive = "PartialEq",
    doc = "One session of an agent through the sidecar to one target: identity, pod, target, grants used, start and end, counters, decisions and the head of its audit chain.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Active or Ended"
    ),
    printcolumn(
        name = "Identity",
        type_ = "string",
        json_path = ".spec.identity",
        description = "The authenticated AgentIdentity"
    ),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".spec.target",
        description = "The Target reached"
    ),
    printcolumn(
        name = "Protocol",
        type_ = "string",
        json_path = ".spec.protocol",
        priority = 1
    ),
    printcolumn(
        name = "Requests",
        type_ = "integer",
        json_path = ".status.counters.requests",
        description = "Requests seen"
    ),
    printcolumn(
        name = "Refused",
        type_ = "integer",
        json_path = ".status.counters.refused",
        description = "Requests refused"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSessionSpec {
    /// The authenticated AgentIdentity.
    #[schemars(length(min = 1, max = 253))]
    pub identity: String,
    /// The Target reached.
    #[schemars(length(min = 1, max = 253))]
    pub target: String,
    /// The protocol of the session.
    pub protocol: Protocol,
    /// The agent's pod (`namespace/name`), when the sidecar runs in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317))]
    pub pod: Option<String>,
    /// The UID of that pod: a pod created again under the same name is another pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub pod_uid: Option<String>,
    /// The client as the agent described itself (PostgreSQL `application_name`, SSH client
    /// version, HTTP user agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub client: Option<String>,
    /// The session id carried by every audit record of the session.
    #[schemars(length(min = 1, max = 128))]
    pub session_id: String,
    /// When the session started.
    pub started_at: Time,
}

/// Where a session is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SessionPhase {
    /// Open.
    Active,
    /// Closed by the agent, the upstream, a revocation or the sidecar.
    Ended,
}

/// Counts of what happened in a session.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionCounters {
    /// Requests seen (statements, API requests, commands).
    #[serde(default)]
    pub requests: u64,
    /// Requests allowed.
    #[serde(default)]
    pub allowed: u64,
    /// Requests refused.
    #[serde(default)]
    pub refused: u64,
    /// Requests held for approval.
    #[serde(default)]
    pub held: u64,
    /// Values masked in responses.
    #[serde(default)]
    pub masked_values: u64,
    /// Rows returned.
    #[serde(default)]
    pub rows: u64,
    /// Bytes from the agent.
    #[serde(default)]
    pub bytes_in: u64,
    /// Bytes to the agent.
    #[serde(default)]
    pub bytes_out: u64,
}

/// The last record of a session's audit chain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChainHead {
    /// Sequence number of the last record.
    pub seq: u64,
    /// Its hash (hex).
    #[schemars(length(max = 128))]
    pub hash: String,
}

/// What the sidecar reported about a session (updates are rate-limited).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSessionStatus {
    /// `Active` or `Ended`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SessionPhase>,
    /// Standard conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the session ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Time>,
    /// Why it ended, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    /// The AccessGrants used during the session.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<String>,
    /// What happened.
    #[serde(default)]
    pub counters: SessionCounters,
    /// The head of the session's audit chain at the last update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_head: Option<ChainHead>,
    /// The public Ed25519 key (raw, base64) of the sidecar stream that signed this session's
    /// records: `kubectl agentgate verify --sessions` trusts it, as the agent cannot write
    /// here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub signing_key: Option<String>,
    /// When the last request was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity: Option<Time>,
}
