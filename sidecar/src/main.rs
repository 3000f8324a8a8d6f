//! `agentgate-sidecar`: the gateway next to each agent.

use std::path::PathBuf;

use clap::Parser;

/// agentgate's gateway: runs next to an agent, authenticates it, enforces its grants and
/// guardrails, masks sensitive values and records every request. Proxies PostgreSQL, the
/// Kubernetes API and SSH.
#[derive(Parser, Debug)]
#[command(name = "agentgate-sidecar", version, about, long_about = None)]
struct Args {
    /// Standalone mode: read policy (AgentIdentity, AccessGrant, MaskPolicy, Target) from this
    /// folder of YAML manifests instead of the Kubernetes API.
    #[arg(long, env = "AGENTGATE_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "AGENTGATE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    // kube (ring by default), pgwire and russh (aws-lc-rs) must agree on one provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    anyhow::bail!(
        "the gateways are not built yet (issue 4); this binary only prints --help and --version"
    )
}
