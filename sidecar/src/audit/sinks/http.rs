//! HTTP sinks: OTLP/HTTP logs to an OpenTelemetry collector, and a webhook.
//!
//! OTLP: each record is a log record (an `ExportLogsServiceRequest`, POST `…/v1/logs`, binary
//! protobuf or JSON: see [`super::otlp`]) whose body is the record's exact line and whose
//! attributes are the fields to search by (`agentgate.kind`, `agentgate.identity`,
//! `agentgate.session`, …).
//!
//! Webhook: a POST of `{"records":[<line>,…]}` (the lines verbatim, so the receiver can verify
//! the chain) with an optional bearer token. Any 2xx accepts the batch.
//!
//! A URL may carry a credential (`https://user:token@host/…`, `…?token=…`): every message and
//! log shows it as [`shown`] does, without its userinfo, query and fragment.

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
    /// `url` as messages show it ([`shown`]).
    shown: String,
    /// The credentials the request carries (the URL's userinfo and query, header values):
    /// cut from a receiver's answer before it is quoted, since an error page may echo them.
    secrets: Vec<String>,
    headers: Vec<(String, String)>,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Headers, and the URL's userinfo and query, may carry tokens.
        f.debug_struct("HttpSink")
            .field("kind", &self.kind)
            .field("url", &self.shown)
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
        let url: hyper::Uri = url.parse().map_err(|e| {
            format!(
                "the sink's URL {} is not a valid URL ({e}): give it as https://host[:port]/path",
                shown_text(url)
            )
        })?;
        if url.scheme().is_none() || url.host().is_none() {
            return Err(format!(
                "the sink's URL {} has no scheme or host: give it as https://host[:port]/path",
                shown_text(&url.to_string())
            ));
        }
        let shown = shown(&url);
        let secrets = secrets(&url, &headers);
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
            shown,
            secrets,
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
                .map_err(|e| format!("{}: {}", self.shown, error_chain(&e)))?;
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
            .map_err(|_| format!("{}: no complete answer in 30 s", self.shown))??;
        if status.is_success() {
            return Ok(());
        }
        let mut answer = String::from_utf8_lossy(&body).into_owned();
        for secret in &self.secrets {
            answer = answer.replace(secret.as_str(), "(credential)");
        }
        let mut cut = answer.len().min(300);
        while !answer.is_char_boundary(cut) {
            cut -= 1;
        }
        Err(format!(
            "{} answered {status}: {}",
            self.shown,
            &answer[..cut]
        ))
    }
}

/// `url` as messages and logs show it: `scheme://host:port/path` (the port the scheme's
/// default when the URL gives none), without the userinfo, query and fragment, where a token
/// is often put.
pub fn shown(url: &hyper::Uri) -> String {
    let scheme = url.scheme_str().unwrap_or("http");
    let host = url.host().unwrap_or("");
    let port = url.port_u16().or(match scheme {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    });
    match port {
        Some(port) => format!("{scheme}://{host}:{port}{}", url.path()),
        None => format!("{scheme}://{host}{}", url.path()),
    }
}

/// What a request to `url` with `headers` carries that may be a credential: the URL's userinfo
/// (and its password alone), its query (and each value in it) and the headers' values (and
/// their last word, a bearer token). Short strings (under 4 bytes) are left out: cutting them
/// from an answer would cut ordinary words.
fn secrets(url: &hyper::Uri, headers: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some((userinfo, _)) = url.authority().and_then(|a| a.as_str().rsplit_once('@')) {
        out.push(userinfo.to_owned());
        if let Some((_, password)) = userinfo.split_once(':') {
            out.push(password.to_owned());
        }
    }
    if let Some(query) = url.query() {
        out.push(query.to_owned());
        out.extend(
            query
                .split('&')
                .filter_map(|pair| pair.split_once('=').map(|(_, v)| v.to_owned())),
        );
    }
    for (_, value) in headers {
        out.push(value.clone());
        if let Some(word) = value.split_whitespace().last() {
            out.push(word.to_owned());
        }
    }
    out.retain(|s| s.len() >= 4);
    // The longest first, so a credential is cut whole before a part of it.
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out.dedup();
    out
}

/// [`shown`] for text that does not parse as a URL: what precedes an `@` in its authority,
/// and what follows a `?` or `#`, left out.
fn shown_text(url: &str) -> String {
    let url = url.find(['?', '#']).map_or(url, |i| &url[..i]);
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    format!("{scheme}{host}{path}")
}

/// An error and its causes (`client error (Connect): tcp connect error: Connection refused`):
/// the client's own message alone does not say what failed. None of them holds the URL.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cret-token";

    #[test]
    fn urls_are_shown_without_userinfo_query_or_fragment() {
        for (url, expected) in [
            (
                format!("https://hook:{SECRET}@audit.example:8443/v1/logs?token={SECRET}#{SECRET}"),
                "https://audit.example:8443/v1/logs",
            ),
            (
                format!("http://{SECRET}@[::1]/hook?x={SECRET}"),
                "http://[::1]:80/hook",
            ),
            (
                "https://audit.example".to_owned(),
                "https://audit.example:443/",
            ),
        ] {
            let uri: hyper::Uri = url.parse().expect("a URL");
            assert_eq!(shown(&uri), expected, "{url}");
        }
        assert_eq!(
            shown_text(&format!("https://u:{SECRET}@bad host/p?t={SECRET}")),
            "https://bad host/p"
        );
        assert_eq!(shown_text(&format!("u:{SECRET}@host/p#{SECRET}")), "host/p");
    }

    /// A failed delivery's error (logged on every retry) and the sink's Debug do not carry
    /// the URL's credentials; neither does the error of a URL that does not parse.
    #[tokio::test]
    async fn delivery_errors_do_not_show_the_urls_credentials() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let url = format!("http://hook:{SECRET}@127.0.0.1:{port}/hook?token={SECRET}");
        let mut record = agentgate_crds::audit::Record::new(
            agentgate_crds::audit::RecordKind::Checkpoint,
            crate::clock::now(),
        );
        let line = agentgate_crds::audit::Chain::new("run-1")
            .seal(&mut record, None)
            .expect("a sealed record");
        for kind in [Kind::Webhook, Kind::Otlp] {
            let mut sink = HttpSink::new(kind, &url, Vec::new(), None).expect("a sink");
            assert!(!format!("{sink:?}").contains(SECRET), "{sink:?}");
            let e = sink
                .deliver(&[Bytes::from(line.clone())])
                .await
                .expect_err("nothing listens");
            assert!(!e.contains(SECRET), "{e}");
            assert!(
                e.starts_with(&format!("http://127.0.0.1:{port}/hook: ")),
                "{e}"
            );
        }
        // A receiver whose error page echoes the request line and headers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a listener");
        let port = listener.local_addr().expect("an address").port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut request = vec![0; 64 << 10];
                let n = conn.read(&mut request).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&request[..n]);
                let head = head.split("\r\n\r\n").next().unwrap_or("").to_owned();
                let answer = format!(
                    "HTTP/1.1 403 Forbidden\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{head}",
                    head.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        let mut sink = HttpSink::new(
            Kind::Webhook,
            &format!("http://127.0.0.1:{port}/hook?token={SECRET}"),
            vec![("authorization".into(), format!("Bearer {SECRET}"))],
            None,
        )
        .expect("a sink");
        let e = sink
            .deliver(&[Bytes::from(line)])
            .await
            .expect_err("refused");
        assert!(
            e.starts_with(&format!(
                "http://127.0.0.1:{port}/hook answered 403 Forbidden: POST /hook?"
            )) && !e.contains(SECRET),
            "{e}"
        );
        let e = HttpSink::new(
            Kind::Webhook,
            &format!("https://hook:{SECRET}@bad host/?token={SECRET}"),
            Vec::new(),
            None,
        )
        .expect_err("not a URL");
        assert!(
            !e.contains(SECRET) && e.contains("https://bad host/"),
            "{e}"
        );
    }
}
