//! agentgate's operator: the control plane of the `agentgate.dev` API.
//!
//! - [`approvers`]: who may decide grants (people, and automation accounts an installation
//!   names);
//! - [`controller`]: one controller per kind (grant lifecycle and expiry, identity checks,
//!   policy and target validation, session retention);
//! - [`webhook`]: the approval webhooks (who decided, and whether they may) and sidecar
//!   injection, served over TLS with a certificate the operator manages;
//! - [`leader`]: a Lease so that only one replica runs the controllers;
//! - [`metrics`]: Prometheus metrics and health endpoints.

pub mod approvers;
pub mod conditions;
pub mod config;
pub mod controller;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use agentgate_crds::AccessGrant;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, ListParams};
use tokio::sync::watch;

pub use config::Config;
pub use error::{Error, Result};

/// Runs the operator: metrics and webhooks on every replica, controllers on the leader.
/// Returns only on a fatal error (including losing leadership, so the replica restarts clean).
pub async fn run(config: Config) -> Result<()> {
    let client = Client::try_default().await?;
    run_with_client(client, config).await
}

/// [`run`] with a given client.
pub async fn run_with_client(client: Client, config: Config) -> Result<()> {
    let metrics = Arc::new(metrics::Metrics::new());
    tokio::spawn(metrics::serve(config.metrics_addr, metrics.clone()));

    let certs = Arc::new(webhook::certs::CertStore::default());
    match config.webhook_cert_mode {
        config::CertMode::SelfManaged => {
            tokio::spawn(webhook::certs::run_self_managed(
                client.clone(),
                config.clone(),
                certs.clone(),
                metrics.clone(),
            ));
        }
        config::CertMode::Files => {
            let dir = config.webhook_cert_dir.clone();
            let (c, m) = (certs.clone(), metrics.clone());
            tokio::spawn(async move { webhook::certs::run_files(&dir, c, m).await });
        }
    }
    let wctx = Arc::new(webhook::WebhookContext {
        client: client.clone(),
        config: config.clone(),
        metrics: metrics.clone(),
        certs,
    });
    let webhooks = tokio::spawn(webhook::server::serve(config.webhook_addr, wctx));

    let (tx, mut rx) = watch::channel(!config.leader_election);
    if config.leader_election {
        let leases: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
        tokio::spawn(leader::campaign(
            leases,
            config.lease_name.clone(),
            config.identity(),
            config.lease_duration,
            tx,
        ));
        tracing::info!(lease = %config.lease_name, "waiting to become leader");
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return Err(Error::Config("leader election stopped".into()));
            }
        }
    }
    metrics.set_leader(true);
    tracing::info!("running controllers");
    let ctx = Arc::new(controller::Context::new(
        client.clone(),
        config.clone(),
        metrics.clone(),
    )?);

    // Controllers stop when leadership is lost.
    let lost = {
        let mut rx = rx.clone();
        async move {
            while *rx.borrow_and_update() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        }
    };
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let stopper = |tx: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };
    let tasks = vec![
        tokio::spawn(controller::grant::run(ctx.clone(), stopper(&stop_tx))),
        tokio::spawn(controller::identity::run(ctx.clone(), stopper(&stop_tx))),
        tokio::spawn(controller::mask::run(ctx.clone(), stopper(&stop_tx))),
        tokio::spawn(controller::target::run(ctx.clone(), stopper(&stop_tx))),
        tokio::spawn(controller::session::run(ctx.clone(), stopper(&stop_tx))),
        tokio::spawn(grant_gauge(client.clone(), metrics.clone())),
    ];
    tokio::select! {
        _ = lost => {
            let _ = stop_tx.send(());
            for t in tasks {
                t.abort();
            }
            metrics.set_leader(false);
            Err(Error::Config("lost the leader Lease: exiting so this replica restarts as a follower".into()))
        }
        res = webhooks => match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::Config(format!("the webhook server stopped: {e}"))),
        },
    }
}

/// Keeps the grants-by-phase gauge current.
async fn grant_gauge(client: Client, metrics: Arc<metrics::Metrics>) {
    let api: Api<AccessGrant> = Api::all(client);
    loop {
        if let Ok(list) = api.list(&ListParams::default()).await {
            let mut counts = std::collections::BTreeMap::<String, i64>::new();
            for g in list.items {
                let phase = g
                    .status
                    .and_then(|s| s.phase)
                    .map(|p| format!("{p:?}"))
                    .unwrap_or_else(|| "New".into());
                *counts.entry(phase).or_default() += 1;
            }
            metrics.set_grants(&counts.into_iter().collect::<Vec<_>>());
        }
        tokio::time::sleep(Duration::from_secs(15)).await;
    }
}
