//! `agentgate-sidecar`: the gateway next to each agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentgate_sidecar::gateway::postgres::session::{Gateway, serve};
use agentgate_sidecar::identity::{Verifier, pod};
use agentgate_sidecar::policy::approval::Approvals;
use agentgate_sidecar::policy::{PolicyStore, cluster, folder};
use anyhow::Context;
use clap::Parser;

/// agentgate's gateway: runs next to an agent, authenticates it, enforces its grants and
/// guardrails, masks sensitive values and records every request. Proxies PostgreSQL, the
/// Kubernetes API and SSH.
#[derive(Parser, Debug)]
#[command(name = "agentgate-sidecar", version, about, long_about = None)]
struct Args {
    /// In-cluster mode (what the injected sidecar runs): watch AgentIdentity, AccessGrant,
    /// MaskPolicy and Target in the pod's namespace, file held commands as AccessGrants, and
    /// verify the pod's own token. Credentials come from the pod's service account, or
    /// KUBECONFIG when set.
    #[arg(long, env = "AGENTGATE_IN_CLUSTER", conflicts_with = "policy_dir")]
    in_cluster: bool,
    /// In-cluster: the namespace to watch (default: the pod's, from POD_NAMESPACE or the
    /// client's configuration).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// In-cluster: the pod's projected service-account token for audience `agentgate`; it is
    /// verified with a TokenReview and must belong to the AgentIdentity's service account.
    #[arg(
        long,
        env = "AGENTGATE_TOKEN_FILE",
        default_value = "/var/run/secrets/agentgate/token"
    )]
    token_file: PathBuf,
    /// In-cluster: how long a broken policy watch is tolerated before everything is refused
    /// (a revocation could otherwise be missed).
    #[arg(long, env = "AGENTGATE_POLICY_STALE_AFTER", default_value = "30s", value_parser = duration)]
    policy_stale_after: Duration,
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
    /// Where the health endpoints (`/livez`, `/healthz`, `/readyz`) are served; none when
    /// unset.
    #[arg(long, env = "AGENTGATE_HEALTH_ADDR")]
    health_addr: Option<SocketAddr>,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "AGENTGATE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

fn duration(s: &str) -> Result<Duration, String> {
    agentgate_crds::common::parse_duration(s).map_err(|e| e.to_string())
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
    let approvals;
    let mut pod_user = None;
    if args.in_cluster {
        let client = kube::Client::try_default()
            .await
            .context("connect to the Kubernetes API (in-cluster, or KUBECONFIG)")?;
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        tokio::spawn(cluster::watch(
            client.clone(),
            namespace.clone(),
            store.clone(),
            args.policy_stale_after,
        ));
        if args.pg_auth == PgAuth::Pod {
            let slot = Arc::new(std::sync::RwLock::new(Err("not verified yet".to_owned())));
            tokio::spawn(pod::keep_verified(
                client.clone(),
                args.token_file.clone(),
                slot.clone(),
                Duration::from_secs(60),
            ));
            pod_user = Some(slot);
        }
        tracing::info!(%namespace, "policy from the API server");
        approvals = Approvals::Cluster { client, namespace };
    } else if let Some(dir) = &args.policy_dir {
        tokio::spawn(folder::watch(
            dir.clone(),
            store.clone(),
            Duration::from_secs(1),
        ));
        approvals = Approvals::Folder(
            args.requests_dir
                .clone()
                .unwrap_or_else(|| dir.join("requests")),
        );
    } else {
        anyhow::bail!(
            "no policy source: run in a cluster with --in-cluster, or standalone with --policy-dir"
        );
    }
    let listener = tokio::net::TcpListener::bind(args.pg_addr)
        .await
        .with_context(|| format!("bind the PostgreSQL gateway on {}", args.pg_addr))?;
    tracing::info!(addr = %args.pg_addr, auth = ?args.pg_auth, "PostgreSQL gateway listening");
    if let Some(addr) = args.health_addr {
        let health = agentgate_sidecar::health::Health {
            policy: store.clone(),
            pod_user: pod_user.clone(),
            identity: args.identity.clone(),
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind the health endpoints on {addr}"))?;
        tokio::spawn(agentgate_sidecar::health::serve(listener, health));
    }
    let mut gw = Gateway::new(store, identity, verifier, args.targets_dir);
    gw.approvals = approvals;
    gw.pod_user = pod_user;
    let gw = Arc::new(gw);
    tokio::select! {
        _ = serve(listener, gw) => Ok(()),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted: stopping");
            Ok(())
        }
    }
}
