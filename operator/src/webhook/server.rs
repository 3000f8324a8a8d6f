//! The HTTPS server the API server calls for admission reviews.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio_rustls::TlsAcceptor;

use super::{WebhookContext, grant, pod};
use crate::error::{Error, Result};

/// The largest admission review accepted (the API server's own request limit is 3 MiB).
const MAX_BODY: usize = 8 << 20;

fn respond(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    ctx: Arc<WebhookContext>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if req.method() == Method::GET && path == "/healthz" {
        return respond(StatusCode::OK, b"{\"status\":\"ok\"}".to_vec());
    }
    if req.method() != Method::POST {
        return respond(StatusCode::METHOD_NOT_ALLOWED, b"{}".to_vec());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let msg = format!("{{\"error\":\"cannot read the request: {e}\"}}");
            return respond(StatusCode::BAD_REQUEST, msg.into_bytes());
        }
    };
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let msg = serde_json::json!({ "error": format!("not an AdmissionReview: {e}") });
            return respond(StatusCode::BAD_REQUEST, msg.to_string().into_bytes());
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            let msg =
                serde_json::json!({ "error": format!("AdmissionReview without a request: {e}") });
            return respond(StatusCode::BAD_REQUEST, msg.to_string().into_bytes());
        }
    };
    let start = Instant::now();
    let response = match path.as_str() {
        "/mutate/accessgrants" => grant::mutate(&ctx, &request).await,
        "/validate/accessgrants" => grant::validate(&ctx, &request).await,
        "/mutate/pods" => pod::mutate(&ctx, &request).await,
        other => {
            AdmissionResponse::from(&request).deny(format!("agentgate: no webhook at {other}"))
        }
    };
    let allowed = response.allowed;
    ctx.metrics.webhook(
        path.trim_start_matches('/'),
        allowed,
        start.elapsed().as_secs_f64(),
    );
    if !allowed {
        tracing::info!(
            webhook = %path,
            user = %request.user_info.username.clone().unwrap_or_default(),
            namespace = %request.namespace.clone().unwrap_or_default(),
            name = %request.name,
            reason = %response.result.message,
            "admission refused"
        );
    }
    match serde_json::to_vec(&response.into_review()) {
        Ok(body) => respond(StatusCode::OK, body),
        Err(e) => {
            let msg = serde_json::json!({ "error": format!("cannot encode the response: {e}") });
            respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                msg.to_string().into_bytes(),
            )
        }
    }
}

/// Serves the webhooks on `addr` with the certificate from `ctx.certs`, until the process ends.
pub async fn serve(addr: SocketAddr, ctx: Arc<WebhookContext>) -> Result<()> {
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(ctx.certs.clone());
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("bind the webhook address {addr}"), e))?;
    tracing::info!(%addr, "serving admission webhooks");
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "webhook accept failed");
                continue;
            }
        };
        // Answers are small and written in parts (TLS records, headers, body): without
        // TCP_NODELAY each waits for the API server's delayed ACK (~40 ms per admission).
        let _ = sock.set_nodelay(true);
        let acceptor = acceptor.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(sock).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, ctx).await) }
            });
            let io = hyper_util::rt::TokioIo::new(tls);
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder.serve_connection(io, svc).await {
                tracing::debug!(%peer, error = %e, "webhook connection ended with an error");
            }
        });
    }
}
