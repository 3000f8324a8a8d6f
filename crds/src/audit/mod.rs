//! Session records and their hash chain: the schema every gateway writes and every sink
//! stores, and the pure functions that seal and verify a trail.
//!
//! The schema is versioned ([`SCHEMA_VERSION`]); a line of the trail is one [`Record`] as
//! JSON. See the README's "Audit" section for the fields and how tampering is detected.

pub mod chain;
pub mod record;

pub use chain::{
    Chain, ChainError, Expectations, Problem, ProblemKind, Report, Signer, StreamSummary,
    canonical, hash_of, key_id, public_key_bytes, verify,
};
pub use record::{
    Decision, IoChunk, Outcome, Record, RecordKind, Request, SCHEMA_VERSION, SigningKey,
    StreamLink, Verdict,
};
