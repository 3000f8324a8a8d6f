//! HTTP sinks: OTLP/HTTP logs to an OpenTelemetry collector, and a webhook.
//!
//! OTLP: each record is a log record (an `ExportLogsServiceRequest`, POST `…/v1/logs`, binary
//! protobuf or JSON: see [`super::otlp`]) whose body is the record's exact line and whose
//! attributes are the fields to search by (`agentgate.kind`, `agentgate.identity`,
//! `agentgate.session`, …).
//!
//! Webhook: a POST of `{"records":[<line>,…]}` (the lines verbatim, so the receiver can verify
//! the chain) with an optional bearer token. Any 2xx accepts the batch.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

pub use super::otlp::Encoding;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Which protocol an HTTP sink speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// OTLP/HTTP logs.
    Otlp,
    /// A webhook receiving record batches.
    Webhook,
}

/// An HTTP sink.
pub struct HttpSink {
    kind: Kind,
    encoding: Encoding,
    url: hyper::Uri,
    headers: Vec<(String, String)>,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Headers may carry tokens.
        f.debug_struct("HttpSink")
            .field("kind", &self.kind)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// A sink posting to `url` with `headers`, trusting the system roots plus `ca_file`.
    pub fn new(
        kind: Kind,
        url: &str,
        headers: Vec<(String, String)>,
        ca_file: Option<&Path>,
    ) -> Result<Self, String> {
        let url: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let tls = crate::tls::client_config(ca_file)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            kind,
            encoding: Encoding::default(),
            url,
            headers,
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// The OTLP sink's encoding (binary protobuf unless told otherwise).
    pub fn with_encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// The sink's name.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Otlp => "otlp",
            Kind::Webhook => "webhook",
        }
    }

    /// Posts `lines`.
    pub async fn deliver(&mut self, lines: &[Bytes]) -> Result<(), String> {
        let (body, content_type) = match self.kind {
            Kind::Otlp => (
                super::otlp::body(lines, self.encoding)?,
                self.encoding.content_type(),
            ),
            Kind::Webhook => (webhook_body(lines), "application/json"),
        };
        let mut req = hyper::Request::post(self.url.clone())
            .header(hyper::header::CONTENT_TYPE, content_type);
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        // One deadline for the answer and its body: a receiver that stalls is a failure.
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{}: {e}", self.url))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, String>((status, body))
        };
        let (status, body) = tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .map_err(|_| format!("{}: no complete answer in 30 s", self.url))??;
        if status.is_success() {
            return Ok(());
        }
        Err(format!(
            "{} answered {status}: {}",
            self.url,
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ))
    }
}

fn webhook_body(lines: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum::<usize>() + 16);
    out.extend_from_slice(b"{\"records\":[");
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(l);
    }
    out.extend_from_slice(b"]}");
    out
}
