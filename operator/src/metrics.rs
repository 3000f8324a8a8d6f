//! Prometheus metrics, and the plain-HTTP server for /metrics, /healthz and /readyz.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::{Error, Result};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    kind: String,
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabel {
    webhook: String,
    allowed: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ])
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabel, Counter>,
    errors: Family<ErrorLabel, Counter>,
    reconcile_seconds: Family<KindLabel, Histogram>,
    grants: Family<PhaseLabel, Gauge>,
    webhook_seconds: Family<WebhookLabel, Histogram>,
    expiry_lag_seconds: Histogram,
    leader: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("agentgate_operator");
        let reconciles = Family::<KindLabel, Counter>::default();
        registry.register("reconciles", "Reconciles run, by kind", reconciles.clone());
        let errors = Family::<ErrorLabel, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by kind and error",
            errors.clone(),
        );
        let reconcile_seconds =
            Family::<KindLabel, Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_seconds.clone(),
        );
        let grants = Family::<PhaseLabel, Gauge>::default();
        registry.register("access_grants", "AccessGrants by phase", grants.clone());
        let webhook_seconds =
            Family::<WebhookLabel, Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "webhook_duration_seconds",
            "Admission webhook latency",
            webhook_seconds.clone(),
        );
        let expiry_lag_seconds = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0]);
        registry.register(
            "grant_expiry_lag_seconds",
            "Delay between a grant's expiresAt and the operator marking it Expired",
            expiry_lag_seconds.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            reconcile_seconds,
            grants,
            webhook_seconds,
            expiry_lag_seconds,
            leader,
            ready: AtomicBool::new(false),
        }
    }

    /// Counts a reconcile and times it until the returned guard drops.
    pub fn reconcile_started(&self, kind: &str) -> ReconcileTimer {
        let label = KindLabel {
            kind: kind.to_owned(),
        };
        self.reconciles.get_or_create(&label).inc();
        ReconcileTimer {
            hist: self.reconcile_seconds.get_or_create(&label).clone(),
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_error(&self, kind: &str, error: &str) {
        self.errors
            .get_or_create(&ErrorLabel {
                kind: kind.to_owned(),
                error: error.to_owned(),
            })
            .inc();
    }

    /// Records one webhook call.
    pub fn webhook(&self, webhook: &str, allowed: bool, seconds: f64) {
        self.webhook_seconds
            .get_or_create(&WebhookLabel {
                webhook: webhook.to_owned(),
                allowed: allowed.to_string(),
            })
            .observe(seconds);
    }

    /// Records how late an expiry was applied.
    pub fn expiry_lag(&self, seconds: f64) {
        self.expiry_lag_seconds.observe(seconds);
    }

    /// Sets the number of grants in each phase.
    pub fn set_grants(&self, counts: &[(String, i64)]) {
        self.grants.clear();
        for (phase, n) in counts {
            self.grants
                .get_or_create(&PhaseLabel {
                    phase: phase.clone(),
                })
                .set(*n);
        }
    }

    /// Marks this replica leader or not.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Marks the operator ready (webhook certificate loaded).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Times one reconcile.
pub struct ReconcileTimer {
    hist: Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed().as_secs_f64());
    }
}

/// Serves /metrics, /healthz and /readyz until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("bind the metrics address {addr}"), e))?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, metrics.encode()),
                        "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
                        "/readyz" if metrics.ready.load(Ordering::SeqCst) => {
                            (StatusCode::OK, "ok\n".to_owned())
                        }
                        "/readyz" => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: the webhook serving certificate is not loaded yet\n"
                                .to_owned(),
                        ),
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let io = hyper_util::rt::TokioIo::new(sock);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
