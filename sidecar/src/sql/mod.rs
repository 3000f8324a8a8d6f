//! SQL understanding: classification by the real PostgreSQL grammar.

pub mod classify;
pub mod redact;

pub use classify::{
    Classified, ClassifyError, Fingerprint, Flag, PathChange, Resolved, Statement, classify,
};
pub use redact::redact;
