//! `agentgate-sidecar`: the gateway next to each agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentgate_sidecar::gateway::postgres::session::{Gateway, serve};
use agentgate_sidecar::identity::Verifier;
use agentgate_sidecar::policy::{PolicyStore, folder};
use anyhow::Context;
use clap::Parser;

/// agentgate's gateway: runs next to an agent, authenticates it, enforces its grants and
/// guardrails, masks sensitive values and records every request. Proxies PostgreSQL, the
/// Kubernetes API and SSH.
#[derive(Parser, Debug)]
#[command(name = "agentgate-sidecar", version, about, long_about = None)]
struct Args {
    /// Standalone mode: read policy (AgentIdentity, AccessGrant, MaskPolicy, Target) from this
    /// folder of YAML manifests instead of the Kubernetes API; it is reloaded when it changes.
    #[arg(long, env = "AGENTGATE_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// The AgentIdentity the agent next to this sidecar acts as (with `--pg-auth pod`).
    #[arg(long, env = "AGENTGATE_IDENTITY")]
    identity: Option<String>,
    /// How PostgreSQL clients authenticate: `pod` (every connection is the pod's identity) or
    /// `token` (the password is an OIDC token, verified and mapped to an AgentIdentity).
    #[arg(long, env = "AGENTGATE_PG_AUTH", default_value = "pod")]
    pg_auth: PgAuth,
    /// The cluster's service-account token issuer, trusted for projected tokens.
    #[arg(long, env = "AGENTGATE_SA_ISSUER")]
    sa_issuer: Option<String>,
    /// Extra CA certificates (PEM) trusted when fetching issuers' keys.
    #[arg(long, env = "AGENTGATE_OIDC_CA_FILE")]
    oidc_ca_file: Option<PathBuf>,
    /// Where the Targets' credentials are: `<dir>/<target>/username`, `password`, CA files.
    #[arg(
        long,
        env = "AGENTGATE_TARGETS_DIR",
        default_value = "/var/run/agentgate/targets"
    )]
    targets_dir: PathBuf,
    /// Standalone: where approval requests for held commands are written (default: the
    /// `requests` folder inside --policy-dir).
    #[arg(long, env = "AGENTGATE_REQUESTS_DIR")]
    requests_dir: Option<PathBuf>,
    /// Loopback address of the PostgreSQL gateway.
    #[arg(long, env = "AGENTGATE_PG_ADDR", default_value = "127.0.0.1:15432")]
    pg_addr: SocketAddr,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "AGENTGATE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum PgAuth {
    Pod,
    Token,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // kube (ring by default), pgwire and russh (aws-lc-rs) must agree on one provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    let Some(dir) = args.policy_dir else {
        anyhow::bail!(
            "in-cluster policy (a watch on the API server) is not built yet: run standalone with --policy-dir"
        );
    };
    let verifier = match args.pg_auth {
        PgAuth::Token => Some(Arc::new(
            Verifier::new(args.sa_issuer.clone(), args.oidc_ca_file.as_deref())
                .map_err(anyhow::Error::msg)?,
        )),
        PgAuth::Pod => None,
    };
    if verifier.is_none() && args.identity.is_none() {
        anyhow::bail!(
            "--identity (or AGENTGATE_IDENTITY) is required with --pg-auth pod: the AgentIdentity this sidecar serves"
        );
    }
    let identity = args.identity.clone();
    let store = Arc::new(PolicyStore::default());
    tokio::spawn(folder::watch(
        dir.clone(),
        store.clone(),
        Duration::from_secs(1),
    ));
    let listener = tokio::net::TcpListener::bind(args.pg_addr)
        .await
        .with_context(|| format!("bind the PostgreSQL gateway on {}", args.pg_addr))?;
    tracing::info!(addr = %args.pg_addr, auth = ?args.pg_auth, "PostgreSQL gateway listening");
    let mut gw = Gateway::new(store, identity, verifier, args.targets_dir);
    gw.requests_dir = Some(args.requests_dir.unwrap_or_else(|| dir.join("requests")));
    let gw = Arc::new(gw);
    tokio::select! {
        _ = serve(listener, gw) => Ok(()),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted: stopping");
            Ok(())
        }
    }
}
