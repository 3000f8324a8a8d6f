//! `agentgate-env`: starts the real local environment (etcd + kube-apiserver, PostgreSQL,
//! sshd on loopback), installs agentgate's CRDs and shows them served.
//!
//! - `agentgate-env demo`: the README's main job (see [`testenv::demo`]): start, install
//!   agentgate with its chart, run a scripted agent through the sidecar, audit, tear down.
//! - `agentgate-env up`: start, install, print how to reach everything, run until Ctrl-C.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use testenv::{Parts, TestEnv};

/// The local agentgate environment: real Kubernetes API server, PostgreSQL and sshd.
#[derive(Parser, Debug)]
#[command(name = "agentgate-env", version, about)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The main job: start everything, install agentgate with its Helm chart, run a scripted
    /// agent against PostgreSQL, the API server and sshd through the sidecar, show what an
    /// auditor sees, stop.
    Demo {
        /// Use this cluster instead of starting a local API server (its current context,
        /// as cluster-admin). What the demo creates there is removed at the end, except the
        /// CRDs. The operator and the sidecar still run on this machine.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// With --kubeconfig: the address that cluster's API server reaches this machine at,
        /// for the operator's webhooks (for kind: the Docker bridge gateway).
        #[arg(long, requires = "kubeconfig")]
        webhook_host: Option<String>,
    },
    /// Print the figures every benchmark appended to a report file (`scripts/bench.sh`
    /// sets `AGENTGATE_BENCH_REPORT`) as one table.
    BenchReport {
        /// The JSON-lines report.
        report: PathBuf,
    },
    /// Start everything, install the CRDs, print how to reach each part, run until Ctrl-C.
    Up {
        /// Write shell exports (KUBECONFIG, PG URL, ssh command) to this file.
        #[arg(long)]
        env_file: Option<PathBuf>,
    },
}

fn step(n: usize, total: usize, what: &str) {
    println!("\n\x1b[1m[{n}/{total}] {what}\x1b[0m");
}

async fn start(total: usize) -> anyhow::Result<(TestEnv, kube::Client)> {
    step(
        1,
        total,
        "Starting etcd, kube-apiserver, PostgreSQL and sshd on loopback",
    );
    let t = Instant::now();
    let env = TestEnv::start_async(Parts::all()).await?;
    let kube = env.kube()?;
    let version: serde_json::Value = serde_json::from_str(kube.version_json()).unwrap_or_default();
    println!(
        "  kube-apiserver {} at {}  ·  PostgreSQL on 127.0.0.1:{}  ·  sshd on 127.0.0.1:{}  ({:.1}s)",
        version["gitVersion"].as_str().unwrap_or("?"),
        kube.url(),
        env.postgres()?.port(),
        env.ssh()?.port(),
        t.elapsed().as_secs_f64()
    );
    step(2, total, "Installing the agentgate.dev CRDs");
    let client = kube.client().await?;
    let crds = testenv::install_crds(&client).await?;
    for crd in &crds {
        println!(
            "  established {}",
            crd.metadata.name.as_deref().unwrap_or("?")
        );
    }
    Ok((env, client))
}

async fn up(env_file: Option<PathBuf>) -> anyhow::Result<()> {
    let (env, _client) = start(2).await?;
    let kube = env.kube()?;
    let pg = env.postgres()?;
    let ssh = env.ssh()?;
    let exports = format!(
        "export KUBECONFIG={}\nexport AGENTGATE_PG_URL='{}'\nalias agentgate-ssh='ssh {} -p {} {}@127.0.0.1'\n",
        kube.kubeconfig().display(),
        pg.admin_url(),
        ssh.client_options().join(" "),
        ssh.port(),
        ssh.user()
    );
    println!("\nThe environment is up. In another shell:\n\n{exports}");
    if let Some(path) = env_file {
        std::fs::write(&path, &exports).with_context(|| format!("write {}", path.display()))?;
        println!("(also written to {})", path.display());
    }
    println!("Press Ctrl-C to stop it.");
    tokio::signal::ctrl_c().await?;
    println!("Stopping.");
    drop(env);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    testenv::install_crypto_provider();
    match Args::parse().command {
        Cmd::Demo {
            kubeconfig,
            webhook_host,
        } => {
            testenv::demo::run_demo(testenv::demo::Options {
                kubeconfig,
                webhook_host,
            })
            .await
        }
        Cmd::Up { env_file } => up(env_file).await,
        Cmd::BenchReport { report } => {
            print!(
                "{}",
                testenv::bench::render(&report).map_err(anyhow::Error::msg)?
            );
            Ok(())
        }
    }
}
