//! agentgate's sidecar: the gateway next to each agent.
//!
//! A request's way through it, for every protocol: listener → identity (who) → policy
//! decision (may they; hold?) → upstream → response → masking → audit record → agent.

pub mod audit;
pub mod clock;
pub mod gateway;
pub mod health;
pub mod identity;
pub mod mask;
pub mod policy;
pub mod sql;
pub mod tls;
