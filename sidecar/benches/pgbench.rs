//! pgbench through the gateway against pgbench straight to PostgreSQL, in one run, printed as
//! ratios. Runs alternate (direct, gateway, direct, …) and the median of the rounds is kept,
//! because machines are noisy. `cargo bench -p agentgate-sidecar --bench pgbench`
//! (`AGENTGATE_BENCH_SECONDS`, `AGENTGATE_BENCH_ROUNDS` and `AGENTGATE_BENCH_CLIENTS` tune it).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use testenv::process::{Proc, Spec, free_port};
use testenv::{Parts, TestEnv};

struct Run {
    tps: f64,
    latency_ms: f64,
}

fn pgbench(
    env: &TestEnv,
    conninfo: &str,
    password: &str,
    mode: &str,
    clients: u32,
    secs: u32,
) -> Run {
    let out = Command::new(env.bins.pg_bin.join("pgbench"))
        .arg(conninfo)
        .args([
            "-n",
            "-S",
            "-M",
            mode,
            "-T",
            &secs.to_string(),
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
        ])
        .env("PGPASSWORD", password)
        .output()
        .expect("pgbench");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let find = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Run {
        tps: find("tps = "),
        latency_ms: find("latency average = "),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: u32 = std::env::var("AGENTGATE_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rounds: usize = std::env::var("AGENTGATE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let clients: Vec<u32> = std::env::var("AGENTGATE_BENCH_CLIENTS")
        .ok()
        .map(|v| v.split(',').filter_map(|c| c.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32]);
    let env = TestEnv::start_async(Parts {
        postgres: true,
        ..Default::default()
    })
    .await?;
    let pg = env.postgres()?;
    let init = Command::new(env.bins.pg_bin.join("pgbench"))
        .arg(pg.admin_url())
        .args(["-i", "-s", "2", "-q"])
        .output()?;
    anyhow::ensure!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    pg.psql_run(
        "app",
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO agentgate",
    )?;

    let policy = tempfile::tempdir()?;
    std::fs::write(
        policy.path().join("p.yaml"),
        format!(
            r#"apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: bench }}
spec:
  protocol: Postgres
  postgres: {{ host: 127.0.0.1, port: {port}, database: app, tls: {{ mode: VerifyFull, ca: {{ name: c, key: ca.crt }} }}, credentials: {{ name: c }} }}
  guardrails: [ {{ name: no-drop, matches: ["DROP TABLE"], action: Block }} ]
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: bench }}
spec: {{ owner: bench, authentication: {{ serviceAccount: {{ name: bench }} }}, baseline: [ {{ target: bench, scope: {{ operations: [Read, Write] }} }} ] }}
---
apiVersion: agentgate.dev/v1alpha1
kind: MaskPolicy
metadata: {{ name: pii }}
spec: {{ rules: [ {{ name: emails, detectors: [Email, CardNumber], action: Redact }} ] }}
"#,
            port = pg.port()
        ),
    )?;
    let targets = tempfile::tempdir()?;
    pg.write_credentials(targets.path(), "bench", "agentgate")?;
    let port = free_port()?;
    let spec = Spec::new("sidecar", env!("CARGO_BIN_EXE_agentgate-sidecar"))
        .args([
            format!("--policy-dir={}", policy.path().display()),
            "--identity=bench".into(),
            format!("--targets-dir={}", targets.path().display()),
            format!("--pg-addr=127.0.0.1:{port}"),
            format!(
                "--audit-dir={}",
                env.dir().join(format!("audit-{port}")).display()
            ),
        ])
        .env("RUST_LOG", "warn");
    let sidecar = Proc::start(spec, &env.dir().join("logs"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "sidecar not listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    // Direct: the same role, over verified TLS, as the gateway connects.
    let direct = format!(
        "host=127.0.0.1 port={} dbname=app user=agentgate sslmode=verify-full sslrootcert={}",
        pg.port(),
        pg.ca_path().display()
    );
    let gateway = format!("host=127.0.0.1 port={port} dbname=bench user=agent sslmode=disable");

    println!(
        "pgbench -S, {secs}s per run, median of {rounds} alternating rounds; gateway: guardrails + masking on"
    );
    println!(
        "{:<10} {:>7} {:>12} {:>12} {:>8} {:>14}",
        "mode", "clients", "direct tps", "gateway tps", "ratio", "added latency"
    );
    for mode in ["simple", "extended"] {
        for &c in &clients {
            let (mut dt, mut gt, mut dl, mut gl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                let d = pgbench(&env, &direct, pg.password(), mode, c, secs);
                let g = pgbench(&env, &gateway, "", mode, c, secs);
                dt.push(d.tps);
                gt.push(g.tps);
                dl.push(d.latency_ms);
                gl.push(g.latency_ms);
            }
            let (d, g) = (median(dt), median(gt));
            let added_us = (median(gl) - median(dl)) * 1000.0;
            println!(
                "{mode:<10} {c:>7} {d:>12.0} {g:>12.0} {:>8.2} {added_us:>11.0} µs",
                g / d.max(1.0)
            );
        }
    }

    // Streaming: a result of any size passes in constant memory. Peak RSS of the sidecar
    // before and after a million masked rows (every row has an email the detectors find).
    let pid = sidecar.pid().expect("the sidecar runs");
    let rows: u64 = std::env::var("AGENTGATE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let before = memory(pid);
    for (what, sql) in [
        (
            "SELECT",
            format!(
                "SELECT g, 'user' || g || '@example.com', repeat('x', 100) FROM generate_series(1, {rows}) g"
            ),
        ),
        (
            "COPY TO STDOUT",
            format!(
                "COPY (SELECT g, 'user' || g || '@example.com', repeat('x', 100) FROM generate_series(1, {rows}) g) TO STDOUT"
            ),
        ),
    ] {
        let started = Instant::now();
        let out = Command::new(env.bins.pg_bin.join("psql"))
            .arg(&gateway)
            .args(["-X", "-At", "-o", "/dev/null", "-c", &sql])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = memory(pid);
        println!(
            "{what} of {rows} masked rows (~{} MB) in {:.1}s; sidecar RSS {} -> {} kB, peak {} -> {} kB",
            rows * 130 / 1_000_000,
            started.elapsed().as_secs_f64(),
            before.0,
            after.0,
            before.1,
            after.1
        );
    }
    Ok(())
}

/// (VmRSS, VmHWM) of a process, in kB.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
