//! The SSH gateway against sshd directly, in one run, printed as ratios: `scp` of a large
//! file (1 GiB by default) and 50 concurrent sessions each running a command. Runs
//! alternate (direct, gateway, …); medians are kept.
//! `cargo bench -p agentgate-sidecar --bench ssh` (`AGENTGATE_BENCH_SCP_MIB`,
//! `AGENTGATE_BENCH_SESSIONS` and `AGENTGATE_BENCH_ROUNDS` tune it).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testenv::process::{Proc, Spec, free_port};
use testenv::{Parts, TestEnv};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// How the client reaches the host: OpenSSH options and the destination.
struct Route {
    options: Vec<String>,
    dest: String,
}

impl Route {
    fn scp(&self, from: &Path, to: &Path) -> Duration {
        let started = Instant::now();
        let out = Command::new("scp")
            .args(&self.options)
            .args(["-q", "-o", "BatchMode=yes"])
            .arg(from)
            .arg(format!("{}:{}", self.dest, to.display()))
            .output()
            .expect("scp");
        assert!(
            out.status.success(),
            "scp: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed()
    }

    /// `n` sessions at once, each running a command; the time until all are done.
    fn sessions(&self, n: usize) -> Duration {
        let started = Instant::now();
        let children: Vec<_> = (0..n)
            .map(|i| {
                Command::new("ssh")
                    .args(&self.options)
                    .args(["-o", "BatchMode=yes"])
                    .arg(&self.dest)
                    .arg(format!("echo session-{i}"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("ssh")
            })
            .collect();
        for (i, c) in children.into_iter().enumerate() {
            let out = c.wait_with_output().expect("ssh");
            assert!(
                out.status.success()
                    && String::from_utf8_lossy(&out.stdout).trim() == format!("session-{i}"),
                "session {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        started.elapsed()
    }
}

fn main() -> anyhow::Result<()> {
    let mib = env_or("AGENTGATE_BENCH_SCP_MIB", 1024);
    let sessions = env_or("AGENTGATE_BENCH_SESSIONS", 50);
    let rounds = env_or("AGENTGATE_BENCH_ROUNDS", 3);
    let env = TestEnv::start(Parts {
        ssh: true,
        ..Default::default()
    })?;
    let sshd = env.ssh()?;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy");
    let targets = dir.path().join("targets");
    std::fs::create_dir_all(&policy)?;
    sshd.write_credentials(&targets, "host")?;
    std::fs::write(
        policy.join("policy.yaml"),
        format!(
            "apiVersion: agentgate.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{ name: bench }}\nspec:\n  owner: platform-team\n  authentication: {{ serviceAccount: {{ name: bench }} }}\n  baseline:\n  - target: host\n    scope: {{ operations: [Read, Write] }}\n---\n{}",
            sshd.target_yaml("host")?
        ),
    )?;
    let client_dir = dir.path().join("client");
    let spec = Spec::new("sidecar-ssh-bench", env!("CARGO_BIN_EXE_agentgate-sidecar"))
        .args([
            format!("--policy-dir={}", policy.display()),
            "--identity=bench".into(),
            format!("--targets-dir={}", targets.display()),
            format!("--pg-addr=127.0.0.1:{}", free_port()?),
            "--kube-addr=off".into(),
            format!("--ssh-addr=127.0.0.1:{}", free_port()?),
            format!("--client-dir={}", client_dir.display()),
            format!("--audit-dir={}", dir.path().join("audit").display()),
        ])
        .env("RUST_LOG", "warn");
    let mut sidecar = Proc::start(spec, &env.dir().join("logs"))?;
    let config = client_dir.join("ssh_config");
    testenv::process::wait_until(
        &mut sidecar,
        Duration::from_secs(30),
        "the ssh_config",
        || std::fs::read_to_string(&config).is_ok_and(|c| c.contains("Host host")),
    )?;
    let mut direct_options = sshd.client_options();
    direct_options.extend(["-P".into(), sshd.port().to_string()]);
    let direct = Route {
        options: direct_options.clone(),
        dest: format!("{}@127.0.0.1", sshd.user()),
    };
    // ssh takes the port as -p, scp as -P.
    let mut ssh_direct_options = sshd.client_options();
    ssh_direct_options.extend(["-p".into(), sshd.port().to_string()]);
    let ssh_direct = Route {
        options: ssh_direct_options,
        dest: direct.dest.clone(),
    };
    let gateway = Route {
        options: vec!["-F".into(), config.display().to_string()],
        dest: "host".into(),
    };
    // A file of `mib` MiB (incompressible does not matter: ssh does not compress).
    let source: PathBuf = dir.path().join("payload");
    {
        let mut f = std::fs::File::create(&source)?;
        let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 31 % 251) as u8).collect();
        for _ in 0..mib {
            f.write_all(&chunk)?;
        }
    }
    let dest = dir.path().join("copy");
    println!("scp {mib} MiB and {sessions} concurrent sessions, {rounds} alternating rounds…");
    let (mut d_scp, mut g_scp, mut d_ses, mut g_ses) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        d_scp.push(mib as f64 / direct.scp(&source, &dest).as_secs_f64());
        g_scp.push(mib as f64 / gateway.scp(&source, &dest).as_secs_f64());
        d_ses.push(sessions as f64 / ssh_direct.sessions(sessions).as_secs_f64());
        g_ses.push(sessions as f64 / gateway.sessions(sessions).as_secs_f64());
    }
    anyhow::ensure!(
        std::fs::metadata(&dest)?.len() == (mib as u64) << 20,
        "the copy is incomplete"
    );
    let ratios = |g: &[f64], d: &[f64]| -> (f64, f64) {
        let r: Vec<f64> = g.iter().zip(d).map(|(g, d)| g / d).collect();
        let (_, lo, hi) = testenv::bench::median_spread(&r);
        (lo, hi)
    };
    let (scp_lo, scp_hi) = ratios(&g_scp, &d_scp);
    let (ses_lo, ses_hi) = ratios(&g_ses, &d_ses);
    let (ds, gs) = (median(d_scp), median(g_scp));
    let (dn, gn) = (median(d_ses), median(g_ses));
    testenv::bench::Figure::new("ssh", &format!("scp {mib} MiB"), "MiB/s", gs)
        .against(ds)
        .spread(scp_lo, scp_hi)
        .target("≥ 0.8", gs / ds >= 0.8)
        .report();
    testenv::bench::Figure::new(
        "ssh",
        &format!("{sessions} concurrent sessions"),
        "sessions/s",
        gn,
    )
    .against(dn)
    .spread(ses_lo, ses_hi)
    .report();
    println!(
        "SSH, median of {rounds} alternating rounds; direct: OpenSSH client to sshd; gateway: the same client through agentgate (authentication, guardrails, recording; no MaskPolicy)"
    );
    println!("| benchmark | direct | gateway | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| scp {mib} MiB (MiB/s) | {ds:.1} | {gs:.1} | {:.2} |",
        gs / ds
    );
    println!(
        "| {sessions} concurrent sessions (sessions/s) | {dn:.1} | {gn:.1} | {:.2} |",
        gn / dn
    );
    Ok(())
}
