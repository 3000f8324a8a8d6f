//! 200 agent connections at once through one sidecar, each running allowed, masked, refused
//! and held statements against a real PostgreSQL: every answer is what the policy says, and
//! there is exactly one record per statement (none lost, none doubled) and one outcome per
//! statement that ran. `AGENTGATE_LOAD_SECONDS` sets how long (60 s here; `benches/load.rs`
//! runs the ten-minute version and follows memory).

#![allow(clippy::expect_used)]

// (The bench reads the memory samples; this test does not.)
#[path = "support/fixtures.rs"]
mod fixtures;
#[allow(dead_code)]
#[path = "support/load.rs"]
mod load;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connections_lose_and_double_nothing() -> anyhow::Result<()> {
    let secs = std::env::var("AGENTGATE_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let report = load::run(200, Duration::from_secs(secs)).await?;
    eprintln!(
        "{} statements in {:?}: {:?}",
        report.total(),
        report.elapsed,
        report.sent
    );
    assert_eq!(
        report.unexpected_count, 0,
        "answers the policy does not give: {:?}",
        report.unexpected
    );
    for (kind, ..) in load::MIX {
        assert!(
            report.sent.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} statement ran: {report:?}"
        );
    }
    assert_eq!(report.recorded, report.sent, "records lost or extra");
    assert_eq!(report.doubled, 0, "records doubled");
    assert_eq!(
        report.outcomes_wrong, 0,
        "allowed statements without exactly one outcome"
    );
    assert!(!report.leaked, "an unmasked value reached the records");
    Ok(())
}
