//! `agentgate-env`: starts the real local environment (etcd + kube-apiserver, PostgreSQL,
//! sshd on loopback), installs agentgate's CRDs and shows them served.
//!
//! - `agentgate-env demo`: start, install, apply `examples/quickstart`, show, tear down.
//! - `agentgate-env up`: start, install, print how to reach everything, run until Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Command;
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
    /// Start everything, install the CRDs, apply the quickstart examples, show them, stop.
    Demo,
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

fn show(title: &str, cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("run {title}"))?;
    println!("\x1b[2m$ {title}\x1b[0m");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        anyhow::bail!("{title} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
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

async fn demo() -> anyhow::Result<()> {
    let total = 5;
    let (env, _client) = start(total).await?;
    let kube = env.kube()?;
    step(
        3,
        total,
        "The API is served: kinds, short names, the `agentgate` category",
    );
    show(
        "kubectl api-resources --api-group=agentgate.dev",
        kube.kubectl()
            .args(["api-resources", "--api-group=agentgate.dev"]),
    )?;
    step(
        4,
        total,
        "Applying examples/quickstart (Targets, an AgentIdentity, a MaskPolicy, a grant request)",
    );
    let examples = repo_root().join("examples/quickstart");
    show(
        "kubectl apply -f examples/quickstart",
        kube.kubectl().arg("apply").arg("-f").arg(&examples),
    )?;
    show(
        "kubectl get agentgate",
        kube.kubectl().args(["get", "agentgate"]),
    )?;
    step(
        5,
        total,
        "Validation by the API server: an invalid grant is refused with the field named",
    );
    let bad = r#"{"apiVersion":"agentgate.dev/v1alpha1","kind":"AccessGrant","metadata":{"name":"too-long"},
        "spec":{"identity":"claude-orders","target":"orders-db","scope":{"operations":["Admin"]},
        "duration":"720h","reason":"please"}}"#;
    let path = env.dir().join("bad-grant.json");
    std::fs::write(&path, bad)?;
    let out = kube.kubectl().arg("apply").arg("-f").arg(&path).output()?;
    println!("\x1b[2m$ kubectl apply -f bad-grant.json   # duration: 720h\x1b[0m");
    print!("{}", String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(!out.status.success(), "the invalid grant was accepted");
    show(
        "kubectl explain accessgrant.spec.decision",
        kube.kubectl()
            .args(["explain", "accessgrant.spec.decision"]),
    )?;
    println!("\n\x1b[1mDone.\x1b[0m Stopping the environment (nothing is left running).");
    Ok(())
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
        Cmd::Demo => demo().await,
        Cmd::Up { env_file } => up(env_file).await,
    }
}
