//! The long load run: 200 agent connections through one sidecar for ten minutes
//! (`AGENTGATE_LOAD_SECONDS`, `AGENTGATE_LOAD_CONNECTIONS`), mixing allowed, masked, refused
//! and held statements. Checks every answer and record like `tests/load.rs`, and reports the
//! sidecar's memory: RSS at the end against RSS after the first minute (target: within 10%).
//! `cargo bench -p agentgate-sidecar --bench load`

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../tests/support/fixtures.rs"]
mod fixtures;
#[path = "../tests/support/load.rs"]
mod load;

use std::time::Duration;

use testenv::bench::Figure;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    testenv::install_crypto_provider();
    let secs = env_or("AGENTGATE_LOAD_SECONDS", 600);
    let connections = env_or("AGENTGATE_LOAD_CONNECTIONS", 200) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let report = rt
        .block_on(load::run(connections, Duration::from_secs(secs)))
        .expect("the load run");
    // After the first minute (half a shorter run): caches and the allocator have settled.
    let warm = (secs as f64 / 2.0).min(60.0);
    let after_warmup = report.rss_at(warm).unwrap_or(0);
    let end = report.rss.last().map_or(0, |(_, kb)| *kb);
    let ratio = end as f64 / after_warmup.max(1) as f64;
    println!("RSS over time (s, MiB):");
    for (t, kb) in &report.rss {
        println!("  {t:>6.0} {:>8.1}", *kb as f64 / 1024.0);
    }
    let rate = report.total() as f64 / report.elapsed.as_secs_f64();
    Figure::new(
        "load",
        &format!("{connections} connections, {secs} s: statements answered"),
        "stmt/s",
        rate,
    )
    .detail(format!(
        "{:?}; unexpected answers {}; records {:?}; doubled {}; outcomes wrong {}",
        report.sent,
        report.unexpected_count,
        report.recorded,
        report.doubled,
        report.outcomes_wrong
    ))
    .report();
    Figure::new(
        "load",
        &format!("{connections} connections: sidecar RSS at the end / after {warm:.0} s"),
        "MiB",
        end as f64 / 1024.0,
    )
    .against(after_warmup as f64 / 1024.0)
    .target("≤ 1.10", ratio <= 1.10)
    .report();
    assert_eq!(report.unexpected_count, 0, "{:?}", report.unexpected);
    assert_eq!(report.recorded, report.sent, "records lost or extra");
    assert_eq!(report.doubled, 0);
    assert_eq!(report.outcomes_wrong, 0);
    assert!(!report.leaked);
}
