//! pgbench (select-only and TPC-B-like, simple and extended, 1/8/32 clients, and a connection
//! per transaction) through the gateway against pgbench straight to PostgreSQL, in one run, printed as
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
    transactions: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// CPU time (user + system) a process has used, in microseconds.
fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0);
    ticks * 1_000_000.0 / 100.0
}

/// One pgbench run: `script` is `select-only` (`-S`) or `tpcb-like` (the default TPC-B-like
/// transaction); `connect` opens a connection per transaction (`-C`). Latency percentiles
/// come from pgbench's per-transaction log.
fn pgbench(env: &TestEnv, conninfo: &str, password: &str, run: &RunSpec) -> Run {
    let logs = tempfile::tempdir().expect("a temp dir");
    let mut cmd = Command::new(env.bins.pg_bin.join("pgbench"));
    cmd.arg(conninfo)
        .args(["-n", "-b", run.script, "-M", run.mode, "-T"])
        .arg(run.secs.to_string())
        .arg("-c")
        .arg(run.clients.to_string())
        .arg("-j")
        .arg(run.clients.min(2).to_string())
        .arg("-l")
        .arg(format!("--log-prefix={}", logs.path().join("tx").display()))
        .env("PGPASSWORD", password);
    if run.connect {
        cmd.arg("-C");
    }
    let out = cmd.output().expect("pgbench");
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
    // Per-transaction log lines: client, transaction, latency (µs), script, epoch, µs.
    let mut latencies: Vec<f64> = std::fs::read_dir(logs.path())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
            / 1000.0
    };
    Run {
        tps: find("tps = "),
        transactions: find("number of transactions actually processed: "),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    }
}

/// What one pgbench run does.
struct RunSpec {
    script: &'static str,
    mode: &'static str,
    clients: u32,
    secs: u32,
    connect: bool,
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
    // The API server is the token issuer for the connection set-up figure.
    let env = TestEnv::start_async(Parts {
        postgres: true,
        kube: true,
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

    let targets = tempfile::tempdir()?;
    pg.write_credentials(targets.path(), "bench", "agentgate")?;
    let target = |guardrails: &str| {
        format!(
            r#"apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: bench }}
spec:
  protocol: Postgres
  postgres: {{ host: 127.0.0.1, port: {port}, database: app, tls: {{ mode: VerifyFull, ca: {{ name: c, key: ca.crt }} }}, credentials: {{ name: c }} }}
  {guardrails}
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: bench }}
spec: {{ owner: bench, authentication: {{ serviceAccount: {{ name: bench }} }}, baseline: [ {{ target: bench, scope: {{ operations: [Read, Write] }} }} ] }}
"#,
            port = pg.port()
        )
    };
    // No policy: the Target and the identity's baseline only (the audit trail is always on).
    let bare = Gateway::start(&env, targets.path(), &target(""))?;
    // Everything on: guardrails, a MaskPolicy with value detectors, the audit trail.
    let everything = format!(
        r#"{}---
apiVersion: agentgate.dev/v1alpha1
kind: MaskPolicy
metadata: {{ name: pii }}
spec: {{ rules: [ {{ name: emails, detectors: [Email, CardNumber], action: Redact }} ] }}
"#,
        target(r#"guardrails: [ { name: no-drop, matches: ["DROP TABLE"], action: Block } ]"#)
    );
    let full = Gateway::start(&env, targets.path(), &everything)?;
    // Everything on, and every connection presents a token as its password (a projected
    // service-account token, verified against the API server's issuer keys).
    let kube = env.kube()?;
    let admin = kube.client().await?;
    let sas: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
        kube::Api::namespaced(admin.clone(), "default");
    sas.create(
        &Default::default(),
        &serde_json::from_value(serde_json::json!({ "metadata": { "name": "bench" } }))?,
    )
    .await?;
    let token = testenv::kube_env::sa_token(&admin, "default", "bench", Some("agentgate")).await?;
    anyhow::ensure!(everything.contains("metadata: { name: bench }\nspec: { owner"));
    let tokened = Gateway::start_with(
        &env,
        targets.path(),
        // The identity in the service account's namespace.
        &everything.replace(
            "metadata: { name: bench }\nspec: { owner",
            "metadata: { name: bench, namespace: default }\nspec: { owner",
        ),
        &[
            "--pg-auth=token".into(),
            format!("--sa-issuer={}", kube.issuer()),
            format!("--oidc-ca-file={}", kube.ca_path().display()),
        ],
    )?;
    // PgBouncer (Debian's), the proxy users would otherwise put here: session pooling (one
    // server connection per client, as the gateway relays), verified TLS upstream.
    let bouncer_port = free_port()?;
    let bouncer_dir = env.dir().join("pgbouncer");
    std::fs::create_dir_all(&bouncer_dir)?;
    // Its Unix socket, in a directory the postgres user (below) can write.
    let bouncer_sock = env.dir().join("pgbouncer-sock");
    std::fs::create_dir_all(&bouncer_sock)?;
    std::fs::set_permissions(
        &bouncer_sock,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )?;
    std::fs::write(
        bouncer_dir.join("pgbouncer.ini"),
        format!(
            "[databases]\nbench = host=127.0.0.1 port={} dbname=app user=agentgate password={}\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {bouncer_port}\nunix_socket_dir = {}\n\
             auth_type = any\npool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 64\n\
             server_tls_sslmode = verify-full\nserver_tls_ca_file = {}\n",
            pg.port(),
            pg.password(),
            bouncer_sock.display(),
            pg.ca_path().display(),
        ),
    )?;
    let mut spec = Spec::new("pgbouncer", "pgbouncer")
        .args([bouncer_dir.join("pgbouncer.ini").display().to_string()]);
    // PgBouncer refuses to run as root: as the postgres user then.
    if Command::new("id")
        .arg("-u")
        .output()?
        .stdout
        .starts_with(b"0\n")
    {
        spec.run_as = Some(("postgres".into(), "postgres".into()));
    }
    let bouncer_proc = Proc::start(spec, &env.dir().join("logs"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", bouncer_port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "pgbouncer not listening: {}",
            bouncer_proc.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let bouncer_pid = bouncer_proc
        .pid()
        .ok_or_else(|| anyhow::anyhow!("pgbouncer exited"))?;
    let bouncer =
        format!("host=127.0.0.1 port={bouncer_port} dbname=bench user=agentgate sslmode=disable");
    let bouncer_unix = format!(
        "host={} port={bouncer_port} dbname=bench user=agentgate",
        bouncer_sock.display()
    );
    // Direct: the same role, over verified TLS, as the gateway connects.
    let direct = format!(
        "host=127.0.0.1 port={} dbname=app user=agentgate sslmode=verify-full sslrootcert={}",
        pg.port(),
        pg.ca_path().display()
    );

    // The routes, each against direct in the same rounds. An agent in a pod reaches the
    // sidecar on loopback TCP (the injected PGHOST) or on its Unix socket; PgBouncer is
    // measured both ways too.
    let routes: Vec<(&str, &str, u32)> = vec![
        ("PgBouncer", bouncer.as_str(), bouncer_pid),
        ("PgBouncer, Unix socket", bouncer_unix.as_str(), bouncer_pid),
        ("agentgate, no policy", bare.conninfo.as_str(), bare.pid),
        ("agentgate, everything on", full.conninfo.as_str(), full.pid),
        (
            "agentgate, everything on, Unix socket",
            full.unix_conninfo.as_str(),
            full.pid,
        ),
    ];
    println!(
        "pgbench, {secs}s per run, median of {rounds} alternating rounds (direct, then each route in turn)"
    );
    println!(
        "each route: tps as a ratio of direct (spread), added p50 latency, the proxy's CPU per transaction"
    );
    let scripts: Vec<&'static str> = match std::env::var("AGENTGATE_BENCH_SCRIPTS").ok().as_deref()
    {
        Some("select-only") => vec!["select-only"],
        Some("tpcb-like") => vec!["tpcb-like"],
        _ => vec!["select-only", "tpcb-like"],
    };
    for script in scripts {
        for mode in ["simple", "extended"] {
            for &c in &clients {
                let spec = RunSpec {
                    script,
                    mode,
                    clients: c,
                    secs,
                    connect: false,
                };
                let mut direct_runs = Vec::new();
                let mut runs: Vec<Vec<(Run, f64)>> = routes.iter().map(|_| Vec::new()).collect();
                for _ in 0..rounds {
                    direct_runs.push(pgbench(&env, &direct, pg.password(), &spec));
                    for (i, (_, conninfo, pid)) in routes.iter().enumerate() {
                        let before = cpu_us(*pid);
                        let run = pgbench(&env, conninfo, "", &spec);
                        let cpu = (cpu_us(*pid) - before) / run.transactions.max(1.0);
                        runs[i].push((run, cpu));
                    }
                }
                let d_tps = median(direct_runs.iter().map(|r| r.tps).collect());
                let d50 = median(direct_runs.iter().map(|r| r.p50_ms).collect());
                let d99 = median(direct_runs.iter().map(|r| r.p99_ms).collect());
                println!(
                    "{script}, {mode}, {c} clients: direct {d_tps:.0} tps, p50 {:.0} µs",
                    d50 * 1000.0
                );
                for ((who, _, _), runs) in routes.iter().zip(&runs) {
                    let tps = median(runs.iter().map(|r| r.0.tps).collect());
                    let per_round: Vec<f64> = runs
                        .iter()
                        .zip(&direct_runs)
                        .map(|(r, d)| r.0.tps / d.tps.max(1.0))
                        .collect();
                    let (_, lo, hi) = testenv::bench::median_spread(&per_round);
                    let p50 = median(runs.iter().map(|r| r.0.p50_ms).collect());
                    let p99 = median(runs.iter().map(|r| r.0.p99_ms).collect());
                    let cpu = median(runs.iter().map(|r| r.1).collect());
                    let added = (p50 - d50) * 1000.0;
                    println!(
                        "  {who:<40} {:>5.2} ({lo:.2}–{hi:.2})  {added:>+6.0} µs p50  {cpu:>4.0} µs CPU/tx",
                        tps / d_tps.max(1.0)
                    );
                    let mut f = testenv::bench::Figure::new(
                        "postgres",
                        &format!("pgbench {script}, {mode}, {c} clients: {who}"),
                        "tps",
                        tps,
                    )
                    .against(d_tps.max(1.0))
                    .spread(lo, hi)
                    .detail(format!(
                        "latency p50 {p50:.2} ms ({added:+.0} µs), p99 {p99:.2} ms (direct {d50:.2} / {d99:.2}); the proxy's CPU {cpu:.0} µs per transaction"
                    ));
                    if script == "select-only" && who.starts_with("agentgate, everything on") {
                        if c == 8 {
                            f = f.target("≥ 0.90", tps / d_tps.max(1.0) >= 0.9);
                        }
                        if c == 1 {
                            testenv::bench::Figure::new(
                                "postgres",
                                &format!(
                                    "pgbench {script}, {mode}, 1 client: {who}: added latency"
                                ),
                                "µs p50",
                                added,
                            )
                            .target("≤ 50 µs", added <= 50.0)
                            .report();
                        }
                    }
                    f.report();
                }
            }
        }
    }

    // Memory under load: the sidecar's peak RSS after every run above (up to 32 clients at
    // once). Records wait for the audit writer in a bounded queue, so a writer short of CPU
    // holds the gateway back instead of letting records pile up.
    let (rss, hwm) = memory(full.pid);
    println!("sidecar (everything on) after the runs above: RSS {rss} kB, peak {hwm} kB");
    testenv::bench::Figure::new(
        "postgres",
        &format!(
            "sidecar peak RSS after the pgbench runs (up to {} clients)",
            clients.iter().max().copied().unwrap_or(0)
        ),
        "kB",
        hwm as f64,
    )
    .target(
        "< 64 MiB (half the injected sidecar's limit)",
        hwm > 0 && hwm < 64 * 1024,
    )
    .report();

    // Connection set-up: a new connection per transaction (pgbench -C), select-only, simple,
    // 8 clients, as an agent that runs `psql -c` once per command connects. The gateway's
    // cost per connection: the identity check (with a token: its signature, issuer, audience
    // and times), a session record, and a server connection: an idle one reset with
    // DISCARD ALL (as PgBouncer's session pooling does), else a new TLS and SCRAM login.
    let spec = RunSpec {
        script: "select-only",
        mode: "simple",
        clients: 8,
        secs,
        connect: true,
    };
    let mut d_runs = Vec::new();
    let mut routes: Vec<(&str, &str, Vec<Run>)> = vec![
        ("PgBouncer", bouncer.as_str(), Vec::new()),
        ("agentgate, no policy", bare.conninfo.as_str(), Vec::new()),
        (
            "agentgate, everything on",
            full.conninfo.as_str(),
            Vec::new(),
        ),
        (
            "agentgate, everything on, a token per connection",
            tokened.conninfo.as_str(),
            Vec::new(),
        ),
    ];
    for _ in 0..rounds {
        d_runs.push(pgbench(&env, &direct, pg.password(), &spec));
        for (who, conninfo, runs) in routes.iter_mut() {
            let password = if who.contains("token") {
                token.as_str()
            } else {
                ""
            };
            runs.push(pgbench(&env, conninfo, password, &spec));
        }
    }
    let d_tps = median(d_runs.iter().map(|r| r.tps).collect());
    let bouncer_tps = median(routes[0].2.iter().map(|r| r.tps).collect());
    for (who, _, runs) in &routes {
        let tps = median(runs.iter().map(|r| r.tps).collect());
        // Each transaction is one connection: the added time per connection, per client.
        let added_us = (1.0 / tps.max(1.0) - 1.0 / d_tps.max(1.0)) * 8.0 * 1e6;
        println!(
            "pgbench -S -C, simple, 8 clients: {who}: {tps:.0} tps (direct {d_tps:.0}), {added_us:.0} µs added per connection"
        );
        let mut f = testenv::bench::Figure::new(
            "postgres",
            &format!(
                "pgbench select-only -C (a connection per transaction), simple, 8 clients: {who}"
            ),
            "tps",
            tps,
        )
        .against(d_tps.max(1.0))
        .detail(format!("{added_us:.0} µs added per connection"));
        if *who == "agentgate, everything on" {
            f = f.target(
                &format!("ahead of PgBouncer ({:.2})", bouncer_tps / d_tps.max(1.0)),
                tps >= bouncer_tps,
            );
        }
        f.report();
    }

    // Streaming: a result of any size passes in constant memory. Peak RSS of the sidecar
    // before and after a million masked rows (every row has an email the detectors find).
    let (pid, gateway) = (full.pid, full.conninfo.clone());
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
        let secs = started.elapsed().as_secs_f64();
        testenv::bench::Figure::new(
            "postgres",
            &format!("{what} of {rows} masked rows"),
            "MB/s",
            (rows * 130) as f64 / 1e6 / secs,
        )
        .report();
        testenv::bench::Figure::new(
            "postgres",
            &format!("sidecar peak RSS growth over {what} of {rows} rows"),
            "kB",
            after.1.saturating_sub(before.1) as f64,
        )
        .target(
            "flat (< 16 MB)",
            after.1.saturating_sub(before.1) < 16 * 1024,
        )
        .report();
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

/// A sidecar serving one policy folder.
struct Gateway {
    _proc: Proc,
    _policy: tempfile::TempDir,
    pid: u32,
    conninfo: String,
    /// Through its Unix socket.
    unix_conninfo: String,
}

impl Gateway {
    fn start(env: &TestEnv, targets: &std::path::Path, manifests: &str) -> anyhow::Result<Self> {
        Self::start_with(env, targets, manifests, &["--identity=bench".into()])
    }

    /// Like [`Gateway::start`], with how agents authenticate given by `auth`.
    fn start_with(
        env: &TestEnv,
        targets: &std::path::Path,
        manifests: &str,
        auth: &[String],
    ) -> anyhow::Result<Self> {
        let policy = tempfile::tempdir()?;
        std::fs::write(policy.path().join("p.yaml"), manifests)?;
        let port = free_port()?;
        let sock = env.dir().join(format!("sock-{port}"));
        let spec = Spec::new("sidecar", env!("CARGO_BIN_EXE_agentgate-sidecar"))
            .args(auth.iter().cloned())
            .args([
                format!("--policy-dir={}", policy.path().display()),
                format!("--targets-dir={}", targets.display()),
                format!("--pg-addr=127.0.0.1:{port}"),
                format!("--pg-socket-dir={}", sock.display()),
                "--kube-addr=127.0.0.1:0".into(),
                "--ssh-addr=127.0.0.1:0".into(),
                format!(
                    "--audit-dir={}",
                    env.dir().join(format!("audit-{port}")).display()
                ),
            ])
            .env("RUST_LOG", "warn");
        // A service-account issuer is trusted with TokenReview against its API server.
        let spec = match env.kube() {
            Ok(kube) => spec.env("KUBECONFIG", kube.kubeconfig().display().to_string()),
            Err(_) => spec,
        };
        let proc = Proc::start(spec, &env.dir().join("logs"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "sidecar not listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(1));
        let pid = proc
            .pid()
            .ok_or_else(|| anyhow::anyhow!("the sidecar exited"))?;
        Ok(Self {
            _proc: proc,
            _policy: policy,
            pid,
            conninfo: format!("host=127.0.0.1 port={port} dbname=bench user=agent sslmode=disable"),
            unix_conninfo: format!(
                "host={} port={port} dbname=bench user=agent",
                sock.display()
            ),
        })
    }
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
