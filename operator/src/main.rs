//! `agentgate-operator`: agentgate's control plane.

use clap::Parser;

/// agentgate's control plane: reconciles AgentIdentity, AccessGrant, MaskPolicy, Target and
/// AgentSession, serves the approval and injection webhooks, and expires grants on time.
#[derive(Parser, Debug)]
#[command(name = "agentgate-operator", version, about, long_about = None)]
struct Args {
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
    // kube (ring by default) and other TLS users must agree on one provider: aws-lc-rs.
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
        "the operator's controllers are not built yet (issue 3); this binary only prints --help and --version"
    )
}
