//! The protocol gateways. Each knows only its protocol; identity, policy, masking and audit
//! are shared.

pub mod kube;
pub mod postgres;
pub mod relay;
pub mod ssh;
