//! Sustained load through one sidecar: many agent connections at once, each running a mix of
//! allowed, masked, refused and held statements against a real PostgreSQL; then every
//! answer and every record is accounted for. Shared by `tests/load.rs` (a short run, for the
//! exact accounting) and `benches/load.rs` (the long run, for memory over time).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use testenv::process::{Proc, Spec, free_port};
use testenv::{Parts, TestEnv};

/// The kinds of statement in the mix, with the statement, its record's text (constants
/// redacted) and the record's verdict.
pub const MIX: [(&str, &str, &str, &str); 4] = [
    (
        "allowed",
        "SELECT id, state FROM orders WHERE id = 4711",
        "SELECT id, state FROM orders WHERE id = $1",
        "Allowed",
    ),
    (
        "masked",
        "SELECT email FROM customers WHERE id = 1",
        "SELECT email FROM customers WHERE id = $1",
        "Allowed",
    ),
    (
        "refused",
        "DROP TABLE orders",
        "DROP TABLE orders",
        "Refused",
    ),
    (
        "held",
        "UPDATE orders SET state = 'shipped' WHERE id = 4712",
        "UPDATE orders SET state = $1 WHERE id = $2",
        "Held",
    ),
];

/// What a run saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Statements answered, by kind.
    pub sent: BTreeMap<&'static str, u64>,
    /// Answers that were not what the policy says (first ones, with the connection).
    pub unexpected: Vec<String>,
    /// How many unexpected answers in all.
    pub unexpected_count: u64,
    /// Request records of the mix, by kind.
    pub recorded: BTreeMap<&'static str, u64>,
    /// Request records with the same session and request id as another.
    pub doubled: u64,
    /// Allowed requests without exactly one outcome record.
    pub outcomes_wrong: u64,
    /// Whether any record holds the unmasked email.
    pub leaked: bool,
    /// The sidecar's resident memory over time: (seconds since the start, KiB).
    pub rss: Vec<(f64, u64)>,
    /// How long the load ran.
    pub elapsed: Duration,
}

impl Report {
    /// Statements answered in all.
    pub fn total(&self) -> u64 {
        self.sent.values().sum()
    }

    /// The highest RSS sampled at or after `from` seconds, and the first such sample.
    pub fn rss_at(&self, from: f64) -> Option<u64> {
        self.rss.iter().find(|(t, _)| *t >= from).map(|(_, kb)| *kb)
    }
}

fn policy(pg_port: u16) -> String {
    format!(
        r#"{}---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: claude }}
spec:
  owner: team-orders
  authentication: {{ serviceAccount: {{ name: claude }} }}
  baseline:
    - {{ target: orders-db, scope: {{ operations: [Read] }} }}
---
apiVersion: agentgate.dev/v1alpha1
kind: MaskPolicy
metadata: {{ name: pii }}
spec:
  rules:
    - {{ name: emails, detectors: [Email], action: Redact }}
"#,
        crate::fixtures::orders_db(pg_port)
    )
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Checks one answer against what the policy says; `None` when it is right.
fn check(
    kind: &str,
    r: &Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>,
) -> Option<String> {
    use tokio_postgres::SimpleQueryMessage::Row;
    let first = |r: &Vec<tokio_postgres::SimpleQueryMessage>, i: usize| {
        r.iter().find_map(|m| match m {
            Row(row) => row.get(i).map(str::to_owned),
            _ => None,
        })
    };
    let message = |e: &tokio_postgres::Error| {
        e.as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| e.to_string())
    };
    match (kind, r) {
        ("allowed", Ok(rows)) if first(rows, 1).as_deref() == Some("paid") => None,
        ("masked", Ok(rows)) if first(rows, 0).as_deref() == Some("****") => None,
        ("refused", Err(e)) if message(e).contains("dropping tables is never allowed") => None,
        ("held", Err(e)) if message(e).contains("held for approval") => None,
        (kind, Ok(rows)) => Some(format!("{kind}: answered {:?}", first(rows, 0))),
        (kind, Err(e)) => Some(format!("{kind}: {}", message(e))),
    }
}

/// Runs `connections` agent connections through one sidecar for `duration`, then accounts
/// for every answer and record.
pub async fn run(connections: usize, duration: Duration) -> anyhow::Result<Report> {
    let env = TestEnv::start_async(Parts {
        postgres: true,
        ..Default::default()
    })
    .await?;
    let pg = env.postgres()?;
    pg.psql_run(
        "app",
        "CREATE TABLE customers (id int PRIMARY KEY, email text);
         INSERT INTO customers VALUES (1, 'ada@example.com');
         CREATE TABLE orders (id int PRIMARY KEY, state text);
         INSERT INTO orders VALUES (4711, 'paid'), (4712, 'paid');
         GRANT ALL ON ALL TABLES IN SCHEMA public TO agentgate;",
    )?;
    let policy_dir = tempfile::tempdir()?;
    std::fs::write(policy_dir.path().join("policy.yaml"), policy(pg.port()))?;
    let targets = tempfile::tempdir()?;
    pg.write_credentials(targets.path(), "orders-db", "agentgate")?;
    let audit: PathBuf = env.dir().join("audit-load");
    let port = free_port()?;
    let spec = Spec::new("sidecar-load", env!("CARGO_BIN_EXE_agentgate-sidecar")).args([
        format!("--policy-dir={}", policy_dir.path().display()),
        "--identity=claude".into(),
        format!("--targets-dir={}", targets.path().display()),
        format!("--pg-addr=127.0.0.1:{port}"),
        "--kube-addr=127.0.0.1:0".into(),
        "--ssh-addr=127.0.0.1:0".into(),
        format!("--audit-dir={}", audit.display()),
        "--audit-file-keep=0".into(),
    ]);
    let mut proc = Proc::start(spec, &env.dir().join("logs"))?;
    testenv::process::wait_listening(&mut proc, port, Duration::from_secs(20))?;
    let pid = proc
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the sidecar has no pid"))?;
    let conninfo =
        format!("host=127.0.0.1 port={port} dbname=orders-db user=claude sslmode=disable");

    // Every connection first, then the load.
    let mut clients = Vec::with_capacity(connections);
    for i in 0..connections {
        let (client, conn) = tokio_postgres::connect(
            &format!("{conninfo} application_name=load-{i}"),
            tokio_postgres::NoTls,
        )
        .await?;
        tokio::spawn(conn);
        clients.push(client);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(connections);
    for (i, client) in clients.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent: BTreeMap<&'static str, u64> = BTreeMap::new();
            let mut unexpected = Vec::new();
            let mut n = i;
            while !stop.load(Ordering::Relaxed) {
                let (kind, sql, _, _) = MIX[n % MIX.len()];
                n += 1;
                let r = client.simple_query(sql).await;
                *sent.entry(kind).or_default() += 1;
                if let Some(e) = check(kind, &r) {
                    unexpected.push(format!("connection {i}: {e}"));
                    if r.is_err() && client.is_closed() {
                        break;
                    }
                }
            }
            (sent, unexpected)
        }));
    }
    let mut report = Report::default();
    let sample = Duration::from_secs(5);
    while started.elapsed() < duration {
        tokio::time::sleep(sample.min(duration.saturating_sub(started.elapsed()))).await;
        report
            .rss
            .push((started.elapsed().as_secs_f64(), rss_kb(pid)));
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let (sent, unexpected) = t.await?;
        for (k, v) in sent {
            *report.sent.entry(k).or_default() += v;
        }
        report.unexpected_count += unexpected.len() as u64;
        report.unexpected.extend(
            unexpected
                .into_iter()
                .take(5usize.saturating_sub(report.unexpected.len())),
        );
    }
    report.elapsed = started.elapsed();

    // The records: read until the file sink has written what the gateway recorded (each
    // request is recorded before its answer, so nothing more is coming).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        account(&audit, &mut report)?;
        if report.recorded == report.sent || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    proc.stop(Duration::from_secs(10));
    Ok(report)
}

/// Counts the mix's request records, doubled ones, and outcomes per allowed request.
fn account(dir: &Path, report: &mut Report) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let mut recorded: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut requests: HashMap<(String, u64), (u32, bool)> = HashMap::new();
    let mut outcomes: HashMap<(String, u64), u32> = HashMap::new();
    let mut doubled = 0;
    let mut leaked = false;
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        leaked |= text.contains("ada@example.com");
        for line in text.lines() {
            let Ok(r) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let key = || {
                (
                    r["session"].as_str().unwrap_or_default().to_owned(),
                    r["request"]["id"]
                        .as_u64()
                        .or(r["outcome"]["id"].as_u64())
                        .unwrap_or(0),
                )
            };
            match r["kind"].as_str() {
                Some("Request") => {
                    let Some((kind, _, _, verdict)) = MIX
                        .iter()
                        .find(|(_, _, text, _)| r["request"]["text"] == *text)
                    else {
                        continue;
                    };
                    if r["decision"]["verdict"] != *verdict {
                        continue;
                    }
                    *recorded.entry(kind).or_default() += 1;
                    let e = requests.entry(key()).or_default();
                    e.0 += 1;
                    e.1 = *verdict == "Allowed";
                    if e.0 > 1 {
                        doubled += 1;
                    }
                }
                Some("Outcome") => *outcomes.entry(key()).or_default() += 1,
                _ => {}
            }
        }
    }
    report.recorded = recorded;
    report.doubled = doubled;
    report.leaked = leaked;
    report.outcomes_wrong = requests
        .iter()
        .filter(|(_, (_, allowed))| *allowed)
        .filter(|(k, _)| outcomes.get(*k).copied().unwrap_or(0) != 1)
        .count() as u64;
    Ok(())
}
