//! Health endpoints for the kubelet: `/livez` (the process answers), `/healthz` and `/readyz`
//! (policy is loaded and, in a pod, the pod's own token is verified: what the injected
//! sidecar's startup probe waits for before the agent containers start).

use std::sync::{Arc, RwLock};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};

use crate::policy::PolicyStore;

/// What readiness depends on.
#[derive(Clone)]
pub struct Health {
    /// The policy.
    pub policy: Arc<PolicyStore>,
    /// In a pod: the pod token check.
    pub pod_user: Option<Arc<RwLock<Result<String, String>>>>,
    /// In a pod: the AgentIdentity the pod must be.
    pub identity: Option<String>,
}

impl Health {
    /// `Ok` when ready, else why not.
    pub fn ready(&self) -> Result<(), String> {
        let Some(snapshot) = self.policy.get() else {
            return Err(format!(
                "policy not loaded: {}",
                self.policy.error().unwrap_or_else(|| "not yet".to_owned())
            ));
        };
        if let (Some(p), Some(identity)) = (&self.pod_user, &self.identity) {
            crate::identity::pod::check(p, &snapshot, identity)?;
        }
        Ok(())
    }
}

/// Serves the endpoints on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, health: Health) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /livez, /healthz and /readyz");
    }
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "health accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let health = health.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/livez" => (StatusCode::OK, "ok\n".to_owned()),
                        "/healthz" | "/readyz" => match health.ready() {
                            Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
                            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                        },
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let io = hyper_util::rt::TokioIo::new(sock);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(io, svc)
                .await;
        });
    }
}
