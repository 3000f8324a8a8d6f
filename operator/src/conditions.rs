//! Status conditions that keep their transition time while their status holds.

pub use agentgate_crds::lifecycle::condition;
