//! The `agentgate.dev/v1alpha1` API.
//!
//! Custom resource types for [`AgentIdentity`], [`AccessGrant`], [`MaskPolicy`], [`Target`]
//! and [`AgentSession`], the generation of their CustomResourceDefinitions, and pure functions
//! over them. Nothing in this crate does I/O.

// Several `printcolumn(type_ = "string", ...)` entries in one `#[kube(...)]` are distinct
// columns, not duplicates; clippy's lint reads them as repeated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod audit;
pub mod common;
pub mod generate;
pub mod grant;
pub mod identity;
pub mod lifecycle;
pub mod mask;
pub mod session;
pub mod target;
pub mod validate;

pub use common::{AccessScope, KubernetesRule, OperationClass, SshScope, UserRef};
pub use grant::{
    AccessGrant, AccessGrantSpec, AccessGrantStatus, BoundCommand, GrantDecision, GrantPhase,
    GrantRevocation, Verdict,
};
pub use identity::{AgentIdentity, AgentIdentitySpec, AgentIdentityStatus};
pub use mask::{Detector, MaskAction, MaskPolicy, MaskPolicySpec, MaskPolicyStatus, MaskRule};
pub use session::{AgentSession, AgentSessionSpec, AgentSessionStatus, SessionPhase};
pub use target::{GuardrailAction, Protocol, Target, TargetSpec, TargetStatus};
