//! Status conditions that keep their transition time while their status holds.

use agentgate_crds::common::{Condition, Time};
use jiff::Timestamp;

/// Builds a condition, keeping `lastTransitionTime` from `old` when the status is unchanged.
pub fn condition(
    old: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Whether two condition lists say the same thing (ignoring nothing: transition times are
/// kept stable by [`condition`], so equality means no update is needed).
pub fn same(a: &[Condition], b: &[Condition]) -> bool {
    a == b
}
