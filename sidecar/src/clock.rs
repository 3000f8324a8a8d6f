//! Wall-clock time that never goes back within the process.
//!
//! Grants end and tokens expire by the wall clock, and records carry it. When the system
//! clock steps back (a bad NTP correction, a VM restored, someone setting the date), plain
//! wall time would bring an expired grant or token back to life and make the trail's times
//! (and the rotated files' names) go back. So the sidecar reads the clock through [`now`],
//! which answers the latest time it has answered before when the system clock is behind it:
//! after a step back, what had ended stays ended and records stay in order; a step forward is
//! taken at once (grants and tokens then end early, which fails closed).

use std::sync::atomic::{AtomicI64, Ordering};

use jiff::Timestamp;

/// The latest time answered, in nanoseconds since the Unix epoch.
static LATEST: AtomicI64 = AtomicI64::new(i64::MIN);
/// The latest time at which a step back was reported (one warning per step).
static WARNED: AtomicI64 = AtomicI64::new(i64::MIN);

/// The current time: the system's, or the latest time answered before if the system clock is
/// now behind it.
pub fn now() -> Timestamp {
    let system = Timestamp::now();
    let ns = i64::try_from(system.as_nanosecond()).unwrap_or(i64::MAX);
    let latest = LATEST.fetch_max(ns, Ordering::AcqRel);
    if latest <= ns {
        return system;
    }
    // Behind by more than a second (ordinary jitter between threads is far less): say so,
    // once for each step.
    if latest - ns > 1_000_000_000 && WARNED.swap(latest, Ordering::AcqRel) != latest {
        tracing::warn!(
            behind_seconds = (latest - ns) / 1_000_000_000,
            "the system clock went back; agentgate keeps time from going back, so grants and tokens that had ended stay ended and records keep their order"
        );
    }
    Timestamp::from_nanosecond(i128::from(latest)).unwrap_or(system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_back() {
        let a = now();
        // As if the system clock had answered a later time before.
        let ahead = a.as_nanosecond() as i64 + 3_600_000_000_000;
        LATEST.fetch_max(ahead, Ordering::AcqRel);
        let b = now();
        // Back to the real time at once: the clock is shared by every test of the process
        // (some wait for a grant to expire by it).
        LATEST.store(a.as_nanosecond() as i64, Ordering::SeqCst);
        assert!(b.as_nanosecond() >= i128::from(ahead), "{a} then {b}");
    }
}
