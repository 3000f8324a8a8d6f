//! SQL understanding: classification by the real PostgreSQL grammar.

pub mod classify;

pub use classify::{Classified, ClassifyError, Fingerprint, Flag, Statement, classify};
