//! The session record: one line of the audit trail, the same for every gateway and every sink.

use std::collections::BTreeMap;

use jiff::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::OperationClass;
use crate::target::Protocol;

/// The version of the record schema this crate writes and reads. A verifier refuses records of
/// another version rather than guess how they were hashed.
pub const SCHEMA_VERSION: u32 = 1;

/// One audit record.
///
/// Every record belongs to the **stream** of the sidecar process that wrote it (`stream`, `n`,
/// `prev`: a hash chain over everything that sidecar recorded) and, except for stream-level
/// records, to one **session** (`session`, `seq`, `sessionPrev`: the chain of that session,
/// anchored at its start in the stream). `hash` is the SHA-256 of the record's canonical form
/// (the record serialized as JSON without `hash` and `sig`); `sig` is an Ed25519 signature of
/// `hash` by the stream's key, present on signed records (stream start and end, session end,
/// checkpoints). Requests are stored masked: no record holds a raw sensitive value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Record {
    /// The schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// The stream: one sidecar process's chain of records.
    pub stream: String,
    /// Position in the stream, from 0 (the `StreamStart` record).
    pub n: u64,
    /// Hash of the stream's previous record (`n - 1`); empty for `n = 0`.
    pub prev: String,
    /// When the event happened (UTC).
    #[schemars(with = "String")]
    pub time: Timestamp,
    /// What the record is about.
    pub kind: RecordKind,
    /// The session, for session records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Position in the session, from 0 (the `SessionStart` record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Hash of the session's previous record; for `seq = 0`, the stream's previous record (the
    /// session's anchor in the stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_prev: Option<String>,
    /// The AgentIdentity acting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The agent's pod (`namespace/name`), when the sidecar runs in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The Target reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The protocol of the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// The client as the agent described itself (PostgreSQL `application_name`, SSH client
    /// version, HTTP user agent) and its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The request, masked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Request>,
    /// The decision taken on the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// What came of an allowed request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// A chunk of terminal I/O (SSH sessions), masked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<IoChunk>,
    /// The stream's signing key (on `StreamStart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<SigningKey>,
    /// On `StreamStart`: the last record of the stream this sidecar wrote before it restarted
    /// (from its spill journal), so the new stream's signature covers the old stream's end
    /// and a deleted stream is missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<StreamLink>,
    /// Free-form detail: why a session ended, what a checkpoint covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// SHA-256 (hex) of the canonical form.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
    /// Ed25519 signature (base64) of the 32 bytes of `hash`, on signed records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// What a record is about.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RecordKind {
    /// A sidecar process started its stream; carries the signing key.
    StreamStart,
    /// A sidecar process ended its stream cleanly.
    StreamEnd,
    /// A periodic signature over the stream so far.
    Checkpoint,
    /// An agent opened a session (authenticated, identity known).
    SessionStart,
    /// A session ended.
    SessionEnd,
    /// A request and the decision taken on it (before it ran).
    Request,
    /// What came of an allowed request (rows, bytes, masked values, latency, error).
    Outcome,
    /// A held request's approval, denial or timeout.
    Approval,
    /// A chunk of terminal I/O.
    Io,
    /// A connection refused before a session began (bad token, unknown identity).
    Refusal,
}

impl RecordKind {
    /// The kind's name as written in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StreamStart => "StreamStart",
            Self::StreamEnd => "StreamEnd",
            Self::Checkpoint => "Checkpoint",
            Self::SessionStart => "SessionStart",
            Self::SessionEnd => "SessionEnd",
            Self::Request => "Request",
            Self::Outcome => "Outcome",
            Self::Approval => "Approval",
            Self::Io => "Io",
            Self::Refusal => "Refusal",
        }
    }
}

/// A request as the gateway understood it, masked.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    /// The request's number in its session (statement, API call or command), from 1.
    pub id: u64,
    /// The request as text with literals and sensitive values masked (SQL statement, `VERB
    /// /path`, shell command).
    pub text: String,
    /// Its class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<OperationClass>,
    /// The fingerprint of its normalized form (what a grant for the exact command binds to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// How it arrived (`simple`, `extended`, `GET`, `exec`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// The decision on a request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Decision {
    /// What was decided.
    pub verdict: Verdict,
    /// The rule behind it (a guardrail, the identity's baseline, a grant's scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The AccessGrant that allowed or holds it (`namespace/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// Who approved or denied it, for held requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
    /// The reason, as the agent was told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What was decided on a request.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Verdict {
    /// Allowed by the identity's baseline or a grant.
    Allowed,
    /// Refused (policy, guardrail, parse failure, fail-closed state).
    Refused,
    /// Held for approval.
    Held,
    /// A held request was approved and ran.
    Approved,
    /// A held request was denied, timed out or was cancelled.
    Denied,
}

impl Verdict {
    /// The verdict's name as written in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "Allowed",
            Self::Refused => "Refused",
            Self::Held => "Held",
            Self::Approved => "Approved",
            Self::Denied => "Denied",
        }
    }
}

/// What came of a request that ran.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Outcome {
    /// The request's number in its session (as in [`Request::id`]).
    pub id: u64,
    /// Rows returned or affected.
    #[serde(default)]
    pub rows: u64,
    /// Bytes from the agent for this request.
    #[serde(default)]
    pub bytes_in: u64,
    /// Bytes to the agent for this request.
    #[serde(default)]
    pub bytes_out: u64,
    /// Values masked in the response, by mask rule (`MaskPolicy/rule`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub masked: BTreeMap<String, u64>,
    /// Time from the request to its completion, in microseconds.
    #[serde(default)]
    pub latency_us: u64,
    /// The error the upstream answered, masked (`SQLSTATE: message`, HTTP status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The HTTP status code of the answer (Kubernetes API requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl Outcome {
    /// Total values masked.
    pub fn masked_total(&self) -> u64 {
        self.masked.values().sum()
    }
}

/// A chunk of terminal I/O, for replay.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IoChunk {
    /// `o` (output to the agent), `i` (input from the agent) or `r` (resize, data `COLSxROWS`),
    /// as in asciicast v2.
    pub stream: String,
    /// The data, masked, as UTF-8 (invalid bytes replaced).
    pub data: String,
}

/// A point in another stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamLink {
    /// The stream.
    pub stream: String,
    /// Its last record's position.
    pub n: u64,
    /// That record's hash.
    pub hash: String,
}

/// The public half of a stream's signing key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SigningKey {
    /// The algorithm: `ed25519`.
    pub algorithm: String,
    /// The raw public key, base64.
    pub public_key: String,
    /// Its id: the first 16 hex digits of the SHA-256 of the raw public key.
    pub key_id: String,
}

impl Record {
    /// A record with everything but the chain fields unset; the chain writer fills `stream`,
    /// `n`, `prev`, `seq`, `sessionPrev`, `hash` and `sig`.
    pub fn new(kind: RecordKind, time: Timestamp) -> Self {
        Self {
            v: SCHEMA_VERSION,
            stream: String::new(),
            n: 0,
            prev: String::new(),
            time,
            kind,
            session: None,
            seq: None,
            session_prev: None,
            identity: None,
            pod: None,
            target: None,
            protocol: None,
            client: None,
            request: None,
            decision: None,
            outcome: None,
            io: None,
            key: None,
            previous: None,
            note: None,
            hash: String::new(),
            sig: None,
        }
    }

    /// The verdict, for request and approval records.
    pub fn verdict(&self) -> Option<Verdict> {
        self.decision.as_ref().map(|d| d.verdict)
    }
}
