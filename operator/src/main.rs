//! `agentgate-operator`: agentgate's control plane.

use clap::Parser;

use agentgate_operator::config::{Config, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // kube (ring by default) and other TLS users must agree on one provider: aws-lc-rs.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_runtime=warn"));
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), namespace = %config.namespace, "starting agentgate-operator");
    tokio::select! {
        res = agentgate_operator::run(config) => res.map_err(anyhow::Error::from),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted: stopping");
            Ok(())
        }
    }
}
