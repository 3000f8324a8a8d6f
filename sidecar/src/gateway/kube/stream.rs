//! Answers that are not read whole: relayed bodies (counted for the record), watch streams
//! and followed logs (masked line by line, as they arrive), and upgraded connections (exec,
//! attach, port-forward).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::mask::Masker;
use super::upstream::Upstream;
use super::{Body, outcome, outcome_why, status};
use crate::audit::SessionRecorder;
use crate::mask::MaskSet;
use crate::policy::{Decision, live};

/// The longest line of a watch stream or log (one event, one object).
const MAX_LINE: usize = 64 << 20;

/// Records a request's outcome once, when its answer ends or is dropped.
struct OutcomeGuard {
    rec: Arc<SessionRecorder>,
    id: u64,
    started: Instant,
    code: u16,
    bytes: u64,
    rows: u64,
    counts: BTreeMap<String, u64>,
    error: bool,
    /// Why the answer was cut short by agentgate, when it was.
    ended: Option<EndedBy>,
}

impl OutcomeGuard {
    fn new(rec: Arc<SessionRecorder>, id: u64, started: Instant, code: u16) -> Self {
        Self {
            rec,
            id,
            started,
            code,
            bytes: 0,
            rows: 0,
            counts: BTreeMap::new(),
            error: false,
            ended: None,
        }
    }
}

impl Drop for OutcomeGuard {
    fn drop(&mut self) {
        let code = if self.error { 502 } else { self.code };
        outcome_why(
            &self.rec,
            (self.id, self.started, code),
            self.bytes,
            self.rows,
            std::mem::take(&mut self.counts),
            self.ended.as_ref().and_then(|e| e.get().cloned()),
        );
    }
}

/// Why a long-lived answer (a watch, a followed log) was ended by agentgate, once it was.
pub type EndedBy = Arc<std::sync::OnceLock<String>>;

/// The API server's answer as a [`Body`].
pub fn incoming(body: Incoming) -> Body {
    body.map_err(std::io::Error::other).boxed()
}

/// A long-lived answer that ends when the access that allowed it ends ([`live::ended`]):
/// a watch gets a last `ERROR` event with a `Status` saying why (as the API server ends a
/// watch it cannot go on with), other streams break off; `why` keeps the reason for the
/// record.
pub fn revocable(
    inner: Body,
    ended: impl std::future::Future<Output = Decision> + Send + 'static,
    watch_events: bool,
    why: EndedBy,
) -> Body {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let _ = tx.send(ended.await);
    });
    Revocable {
        inner,
        ended: Some(rx),
        task,
        watch_events,
        why,
        done: false,
        line_open: false,
    }
    .boxed()
}

struct Revocable {
    inner: Body,
    ended: Option<tokio::sync::oneshot::Receiver<Decision>>,
    task: tokio::task::JoinHandle<()>,
    watch_events: bool,
    why: EndedBy,
    done: bool,
    /// The last bytes relayed did not end with a newline (a watch event is partly sent).
    line_open: bool,
}

impl Drop for Revocable {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpBody for Revocable {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(rx) = this.ended.as_mut()
            && let Poll::Ready(d) = Pin::new(rx).poll(cx)
        {
            this.ended = None;
            // A check that can no longer run ends the request too (fail closed).
            let d = d.unwrap_or_else(|_| Decision {
                verdict: crate::policy::Verdict::Refuse,
                rule: "live-check".into(),
                grant: None,
                message: "agentgate could not keep checking this request's access".into(),
            });
            {
                this.done = true;
                let message = live::message(&d);
                let _ = this.why.set(message.clone());
                tracing::info!(rule = %d.rule, reason = %d.message, "a long-lived Kubernetes request ended: its access ended");
                if this.watch_events {
                    let event = serde_json::json!({
                        "type": "ERROR",
                        "object": {
                            "kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "message": message, "reason": "Forbidden", "code": 403
                        }
                    });
                    // After a whole line: an event cut in half would be unreadable.
                    let mut line = if this.line_open {
                        vec![b'\n']
                    } else {
                        Vec::new()
                    };
                    line.extend_from_slice(event.to_string().as_bytes());
                    line.push(b'\n');
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))));
                }
                return Poll::Ready(Some(Err(std::io::Error::other(message))));
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
            && let Some(last) = d.last()
        {
            this.line_open = *last != b'\n';
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}

/// A relayed body that counts its bytes and records the outcome at its end.
struct Counted<F: FnOnce(u64) + Send> {
    inner: Body,
    bytes: u64,
    on_end: Option<F>,
}

impl<F: FnOnce(u64) + Send + Unpin> HttpBody for Counted<F> {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {
                if let Some(f) = this.on_end.take() {
                    f(this.bytes);
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<F: FnOnce(u64) + Send> Drop for Counted<F> {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes);
        }
    }
}

/// Relays `body` as it is, calling `on_end` with its length when it ends (or is dropped).
pub fn counted(body: Body, on_end: impl FnOnce(u64) + Send + Sync + Unpin + 'static) -> Body {
    Counted {
        inner: body,
        bytes: 0,
        on_end: Some(on_end),
    }
    .boxed()
}

/// How a stream's lines are masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One JSON document per line (watch events).
    Json,
    /// Plain text (logs).
    Text,
}

/// What a stream needs to mask, owned.
pub struct OwnedMasker {
    /// The MaskPolicies.
    pub masks: Arc<MaskSet>,
    /// Whether Secret data passes in clear.
    pub reveal_secrets: bool,
    /// The request's group and kind.
    pub hint: Option<(String, String)>,
}

struct LineState {
    body: Body,
    buf: BytesMut,
    /// How much of `buf` was searched for a newline already.
    scanned: usize,
    mode: Mode,
    masker: OwnedMasker,
    guard: OutcomeGuard,
    done: bool,
    /// For text (logs): the SSH gateway's line masker, which follows a private key's body
    /// from line to line and reads values through terminal colours.
    text: crate::gateway::ssh::terminal::OutputMasker,
}

impl LineState {
    /// Masks one whole line (without its newline) into `out`.
    fn line(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), std::io::Error> {
        let mut m = Masker {
            masks: &self.masker.masks,
            reveal_secrets: self.masker.reveal_secrets,
            hint: self.masker.hint.clone(),
            counts: std::mem::take(&mut self.guard.counts),
        };
        let result = match self.mode {
            Mode::Json => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    out.extend_from_slice(line);
                    Ok(())
                } else {
                    match serde_json::from_slice::<serde_json::Value>(line) {
                        Ok(mut v) => {
                            m.document(&mut v);
                            self.guard.rows += 1;
                            serde_json::to_writer(&mut *out, &v).map_err(std::io::Error::other)
                        }
                        Err(_) => Err(std::io::Error::other(
                            "agentgate: a watch event is not valid JSON, so it cannot be masked; the stream ends",
                        )),
                    }
                }
            }
            Mode::Text => {
                if self.masker.masks.has_value_rules() {
                    let mut whole = line.to_vec();
                    whole.push(b'\n');
                    let masked = self.text.feed(&self.masker.masks, &whole);
                    for (rule, n) in std::mem::take(&mut self.text.masked) {
                        *m.counts.entry(rule).or_default() += n;
                    }
                    out.extend_from_slice(masked.strip_suffix(b"\n").unwrap_or(&masked));
                } else {
                    out.extend_from_slice(line);
                }
                Ok(())
            }
        };
        self.guard.counts = m.counts;
        result
    }
}

/// Relays a stream line by line, each line masked before it is sent; a partial line waits
/// for its end. A line that cannot be masked ends the stream (nothing is sent in clear).
#[allow(clippy::too_many_arguments)]
pub fn masked_lines(
    body: Body,
    mode: Mode,
    masker: OwnedMasker,
    rec: Arc<SessionRecorder>,
    id: u64,
    started: Instant,
    code: u16,
    ended: Option<EndedBy>,
) -> Body {
    let mut guard = OutcomeGuard::new(rec, id, started, code);
    guard.ended = ended;
    let state = LineState {
        body,
        buf: BytesMut::new(),
        scanned: 0,
        mode,
        masker,
        guard,
        done: false,
        text: Default::default(),
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            // Whole lines in the buffer go out together (only the bytes not yet looked at
            // are searched for a newline).
            let fresh = st.buf.get(st.scanned..).unwrap_or_default();
            let found = fresh
                .iter()
                .rposition(|b| *b == b'\n')
                .map(|p| p + st.scanned);
            st.scanned = st.buf.len();
            if let Some(last_nl) = found {
                st.scanned = st.buf.len() - (last_nl + 1);
                let chunk = st.buf.split_to(last_nl + 1);
                let mut out = Vec::with_capacity(chunk.len());
                for line in chunk.split_inclusive(|b| *b == b'\n') {
                    let body = line.strip_suffix(b"\n").unwrap_or(line);
                    if let Err(e) = st.line(body, &mut out) {
                        st.done = true;
                        st.guard.error = true;
                        return Some((Err(e), st));
                    }
                    out.push(b'\n');
                }
                st.guard.bytes += out.len() as u64;
                return Some((Ok(Frame::data(Bytes::from(out))), st));
            }
            if st.buf.len() > MAX_LINE {
                st.done = true;
                st.guard.error = true;
                return Some((
                    Err(std::io::Error::other(
                        "agentgate: a line of the stream is too long to mask; the stream ends",
                    )),
                    st,
                ));
            }
            match st.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(mut d) = f.into_data() {
                        while d.has_remaining() {
                            let c = d.chunk();
                            st.buf.extend_from_slice(c);
                            let n = c.len();
                            d.advance(n);
                        }
                    }
                }
                Some(Err(e)) => {
                    st.done = true;
                    st.guard.error = true;
                    return Some((Err(e), st));
                }
                None => {
                    st.done = true;
                    // The last line without a newline.
                    if st.buf.is_empty() {
                        return None;
                    }
                    let rest = st.buf.split();
                    let mut out = Vec::with_capacity(rest.len());
                    if let Err(e) = st.line(&rest, &mut out) {
                        st.guard.error = true;
                        return Some((Err(e), st));
                    }
                    st.guard.bytes += out.len() as u64;
                    return Some((Ok(Frame::data(Bytes::from(out))), st));
                }
            }
        }
    });
    StreamBody::new(stream).boxed()
}

/// Relays an upgraded request (exec, attach, port-forward; SPDY or WebSocket): the request
/// goes to the API server over its own HTTP/1.1 connection; on `101 Switching Protocols` both
/// sides are joined and the bytes counted for the record.
#[allow(clippy::too_many_arguments)]
pub async fn upgrade(
    up: Arc<Upstream>,
    mut parts: hyper::http::request::Parts,
    headers: HeaderMap,
    (path, query, subresource): (&str, &str, &str),
    masks: Arc<MaskSet>,
    rec: Arc<SessionRecorder>,
    (id, started): (u64, Instant),
    ended: Option<super::Ended>,
) -> Response<Body> {
    let fail = |why: String| {
        outcome(&rec, id, started, 502, 0, 0, BTreeMap::new());
        status(StatusCode::BAD_GATEWAY, "ServiceUnavailable", &why)
    };
    let websocket = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let spdy = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_uppercase().starts_with("SPDY/3"));
    let terminal = matches!(subresource, "exec" | "attach");
    if terminal && spdy && masks.has_value_rules() {
        // SPDY's flow control counts the server's bytes: output cannot be rewritten (masked)
        // in it, and a session whose output cannot be masked is not run.
        outcome(&rec, id, started, 403, 0, 0, BTreeMap::new());
        let mut refused = status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "agentgate masks exec and attach output, which it can do over WebSocket only: use kubectl 1.30 or later (WebSocket is its default) instead of SPDY",
        );
        refused
            .extensions_mut()
            .insert(super::fallback::SpdyRefused);
        return refused;
    }
    if terminal && !websocket && !spdy {
        // A session agentgate cannot read as it passes cannot be recorded, so it is not run.
        outcome(&rec, id, started, 403, 0, 0, BTreeMap::new());
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "agentgate records exec and attach sessions over WebSocket or SPDY/3.1 only; this client asked for another protocol",
        );
    }
    let Some(agent_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return fail("agentgate: this connection cannot be upgraded (use HTTP/1.1)".into());
    };
    let Ok(base) = up.base.parse::<hyper::Uri>() else {
        return fail("agentgate: the Target's server URL is malformed".into());
    };
    let host = base
        .host()
        .unwrap_or("")
        .trim_matches(['[', ']'])
        .to_owned();
    let port = base.port_u16().unwrap_or(443);
    let tcp = match tokio::net::TcpStream::connect((host.as_str(), port)).await {
        Ok(s) => s,
        Err(e) => return fail(format!("agentgate cannot reach the API server: {e}")),
    };
    let mut tls = (*up.tls).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = match &up.server_name {
        Some(n) => n.clone(),
        None => match rustls::pki_types::ServerName::try_from(host.clone()) {
            Ok(n) => n,
            Err(_) => return fail("agentgate: the Target's server name is invalid".into()),
        },
    };
    let tls = match tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
    {
        Ok(s) => s,
        Err(e) => return fail(format!("agentgate: TLS to the API server failed: {e}")),
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls)).await {
            Ok(x) => x,
            Err(e) => return fail(format!("agentgate: HTTP to the API server failed: {e}")),
        };
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    // The Target's server URL may have a path of its own (a proxy in front of the API
    // server): upgrades go under it, as every other request does.
    let prefix = base.path().trim_end_matches('/');
    let uri = if query.is_empty() {
        format!("{prefix}{path}")
    } else {
        format!("{prefix}{path}?{query}")
    };
    let mut out = Request::new(Empty::<Bytes>::new());
    *out.method_mut() = parts.method.clone();
    *out.headers_mut() = headers;
    out.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Some(u) = parts.headers.get(header::UPGRADE) {
        out.headers_mut().insert(header::UPGRADE, u.clone());
    }
    if let Ok(h) = HeaderValue::from_str(&format!("{host}:{port}")) {
        out.headers_mut().insert(header::HOST, h);
    }
    *out.uri_mut() = match uri.parse() {
        Ok(u) => u,
        Err(_) => return fail("agentgate: a malformed path".into()),
    };
    let mut resp = match sender.send_request(out).await {
        Ok(r) => r,
        Err(e) => return fail(format!("agentgate: the API server did not answer: {e}")),
    };
    let code = resp.status();
    if code != StatusCode::SWITCHING_PROTOCOLS {
        // A refusal or an error from the API server: relayed as it is.
        let (parts, body) = resp.into_parts();
        let rec2 = rec.clone();
        let body = counted(incoming(body), move |bytes| {
            outcome(&rec2, id, started, code.as_u16(), bytes, 0, BTreeMap::new());
        });
        return Response::from_parts(parts, body);
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let mut answer = Response::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for (k, v) in resp.headers() {
        answer.headers_mut().append(k.clone(), v.clone());
    }
    let protocol = resp
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // Output is masked only in a protocol agentgate reads: the server agreeing on another
    // (or on none) would pass it in clear.
    if terminal
        && websocket
        && masks.has_value_rules()
        && !super::ws::TERMINAL_PROTOCOLS.contains(&protocol.as_str())
    {
        outcome(&rec, id, started, 403, 0, 0, BTreeMap::new());
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "agentgate masks exec and attach output in the channel.k8s.io protocols (v1 to v5, binary or base64); the server agreed on {protocol:?}, which it cannot read, so the session was not started: use kubectl 1.30 or later"
            ),
        );
    }
    // The relay writes this request's outcome itself, after the HTTP connection (and with
    // it the session's end) is over.
    rec.answered_elsewhere(id);
    tokio::spawn(async move {
        let joined = async {
            let agent = agent_upgrade.await?;
            let server = upstream_upgrade.await?;
            Ok::<_, hyper::Error>((agent, server))
        };
        let mut masked = BTreeMap::new();
        let (bytes_in, bytes_out, error) = match joined.await {
            Ok((agent, server)) => {
                let recorder = terminal.then(|| Terminal {
                    rec: rec.clone(),
                    masks,
                    masked: Default::default(),
                });
                let framing = if websocket {
                    Some(Framing::WebSocket(protocol))
                } else if spdy {
                    Some(Framing::Spdy)
                } else {
                    None
                };
                let relayed = relay(
                    TokioIo::new(agent),
                    TokioIo::new(server),
                    framing,
                    recorder.as_ref(),
                );
                let result = match ended {
                    // The session ends (both connections closed) when its access does.
                    Some(end) => tokio::select! {
                        r = relayed => r,
                        d = end => {
                            tracing::info!(rule = %d.rule, reason = %d.message, "an exec, attach or port-forward session ended: its access ended");
                            (0, 0, Some(live::message(&d)))
                        }
                    },
                    None => relayed.await,
                };
                if let Some(m) = recorder.as_ref().and_then(|t| t.masked.lock().ok()) {
                    masked = m.clone();
                }
                result
            }
            Err(e) => (0, 0, Some(format!("the upgrade failed: {e}"))),
        };
        let mut r = rec.base(agentgate_crds::audit::RecordKind::Outcome);
        r.outcome = Some(agentgate_crds::audit::Outcome {
            id,
            rows: 0,
            bytes_in,
            bytes_out,
            masked,
            latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            error,
            status: Some(101),
        });
        if let Err(e) = rec.emit(r) {
            tracing::error!(session = rec.id(), error = %e, "an upgraded request's outcome could not be recorded");
        }
    });
    answer
}

/// Records a terminal session's input and output (masked) as `Io` records.
struct Terminal {
    rec: Arc<SessionRecorder>,
    masks: Arc<MaskSet>,
    /// Values masked in the output, by rule (for the session's outcome).
    masked: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Terminal {
    fn io(&self, stream: &str, data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        let data = match self.masks.mask(None, &text).0 {
            crate::mask::Masked::Clear => text.into_owned(),
            crate::mask::Masked::Text(t) => t,
            crate::mask::Masked::Null => String::new(),
        };
        // In records of a bounded size, nothing cut.
        for piece in crate::audit::pieces(&data, crate::audit::IO_RECORD_MAX) {
            let mut r = self.rec.base(agentgate_crds::audit::RecordKind::Io);
            r.io = Some(agentgate_crds::audit::IoChunk {
                stream: stream.to_owned(),
                data: piece.to_owned(),
            });
            if let Err(e) = self.rec.emit(r) {
                tracing::error!(session = self.rec.id(), error = %e, "terminal I/O could not be recorded");
            }
        }
    }

    fn messages(&self, from_agent: bool, messages: Vec<super::ws::Message>) {
        for m in messages {
            match (from_agent, m.channel) {
                (true, 0) => self.io("i", &m.data),
                (true, 4) => {
                    // {"Width": w, "Height": h} → asciicast's `COLSxROWS`.
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.data) {
                        let w = v
                            .get("Width")
                            .and_then(serde_json::Value::as_u64)
                            .unwrap_or(0);
                        let h = v
                            .get("Height")
                            .and_then(serde_json::Value::as_u64)
                            .unwrap_or(0);
                        self.io("r", format!("{w}x{h}").as_bytes());
                    }
                }
                (false, 1 | 2) => self.io("o", &m.data),
                _ => {}
            }
        }
    }
}

/// Joins the two sides of an upgraded connection until both are done. Returns the bytes
/// each way and why it broke, if it did. With a terminal recorder, WebSocket messages are
/// read as they pass and recorded.
async fn relay<A, S>(
    agent: A,
    server: S,
    framing: Option<Framing>,
    terminal: Option<&Terminal>,
) -> (u64, u64, Option<String>)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(agent);
    let (sr, sw) = tokio::io::split(server);
    let up = pump(
        ar,
        sw,
        framing.as_ref().map(Reader::new),
        terminal.map(|t| (t, true)),
        "the API server closed the stream",
    );
    let down = async {
        match (&framing, terminal) {
            (Some(Framing::WebSocket(protocol)), Some(t)) if t.masks.has_value_rules() => {
                masked_output(sr, aw, protocol, t).await
            }
            _ => {
                pump(
                    sr,
                    aw,
                    framing.as_ref().map(Reader::new),
                    terminal.map(|t| (t, false)),
                    "the agent closed the stream",
                )
                .await
            }
        }
    };
    let ((bytes_in, e1), (bytes_out, e2)) = tokio::join!(up, down);
    (bytes_in, bytes_out, e1.or(e2))
}

/// Copies one direction of an upgraded connection until it ends, feeding the recorder.
/// Returns the bytes copied and why it broke, if it did.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    mut parser: Option<Reader>,
    terminal: Option<(&Terminal, bool)>,
    broke: &str,
) -> (u64, Option<String>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 << 10];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let (Some((t, from_agent)), Some(p)) = (terminal, parser.as_mut()) {
            t.messages(from_agent, p.feed(&buf[..n], from_agent));
            if p.broken() {
                // What cannot be read cannot be recorded: the session ends.
                let _ = to.shutdown().await;
                return (
                    total,
                    Some("the session's frames could not be read, so it ended".to_owned()),
                );
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return (total, Some(broke.to_owned()));
        }
        total += n as u64;
    }
    let _ = to.shutdown().await;
    (total, None)
}

/// The framing of an upgraded connection.
enum Framing {
    /// WebSocket, with the subprotocol the server chose.
    WebSocket(String),
    /// SPDY/3.1.
    Spdy,
}

/// Reads one direction's messages in a framing.
enum Reader {
    WebSocket(super::ws::Parser),
    Spdy(super::spdy::Parser),
}

impl Reader {
    fn broken(&self) -> bool {
        match self {
            Self::WebSocket(p) => p.broken(),
            Self::Spdy(p) => p.broken(),
        }
    }

    fn new(f: &Framing) -> Self {
        match f {
            Framing::WebSocket(p) => Self::WebSocket(super::ws::Parser::new(p)),
            Framing::Spdy => Self::Spdy(super::spdy::Parser::default()),
        }
    }

    /// The messages `bytes` complete. SPDY's streams are not named without decompressing
    /// their headers, and need not be: what the agent sends is input (or a resize, which is
    /// JSON with a width and a height), what the server sends is output.
    fn feed(&mut self, bytes: &[u8], from_agent: bool) -> Vec<super::ws::Message> {
        match self {
            Self::WebSocket(p) => p.feed(bytes),
            Self::Spdy(p) => p
                .feed(bytes)
                .into_iter()
                .map(|(_, data)| {
                    let resize = from_agent
                        && serde_json::from_slice::<serde_json::Value>(&data)
                            .is_ok_and(|v| v.get("Width").is_some() && v.get("Height").is_some());
                    let channel = match (from_agent, resize) {
                        (true, true) => 4,
                        (true, false) => 0,
                        (false, _) => 1,
                    };
                    super::ws::Message { channel, data }
                })
                .collect(),
        }
    }
}

/// Relays a terminal session's output with MaskPolicy detectors applied (WebSocket), and
/// records what the agent got. A partial line is sent once the output pauses.
async fn masked_output<R, W>(
    from: R,
    to: W,
    protocol: &str,
    terminal: &Terminal,
) -> (u64, Option<String>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut reframer = super::ws::Reframer::new(protocol, &terminal.masks);
    let result = masked_output_with(from, to, &mut reframer, terminal).await;
    if let Ok(mut m) = terminal.masked.lock() {
        for (rule, n) in reframer.masked() {
            *m.entry(rule).or_default() += n;
        }
    }
    result
}

async fn masked_output_with<R, W>(
    mut from: R,
    mut to: W,
    reframer: &mut super::ws::Reframer<'_>,
    terminal: &Terminal,
) -> (u64, Option<String>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// How long output may pause before a partial line (a prompt) is sent.
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(30);
    let mut buf = vec![0u8; 16 << 10];
    let mut total = 0u64;
    loop {
        let read = if reframer.has_pending() {
            tokio::time::timeout(PAUSE, from.read(&mut buf)).await.ok()
        } else {
            Some(from.read(&mut buf).await)
        };
        let (out, sent) = match read {
            None => reframer.flush(),
            Some(Ok(0)) | Some(Err(_)) => {
                let (out, sent) = reframer.flush();
                terminal.messages(false, sent);
                let _ = to.write_all(&out).await;
                break;
            }
            Some(Ok(n)) => {
                total += n as u64;
                reframer.feed(&buf[..n])
            }
        };
        terminal.messages(false, sent);
        if reframer.broken() {
            let _ = to.shutdown().await;
            return (
                total,
                Some("the server's frames could not be read, so the session ended".to_owned()),
            );
        }
        if !out.is_empty() && to.write_all(&out).await.is_err() {
            return (total, Some("the agent closed the stream".to_owned()));
        }
    }
    let _ = to.shutdown().await;
    (total, None)
}

/// Relays a list as it arrives, each item masked on its own ([`super::list::Splitter`]); a
/// document of another shape is masked whole. A list that cannot be read ends with an error
/// (nothing unmasked is sent).
pub fn masked_list(
    body: Incoming,
    masker: OwnedMasker,
    rec: Arc<SessionRecorder>,
    id: u64,
    started: Instant,
    code: u16,
) -> Body {
    struct ListState {
        body: Incoming,
        splitter: super::list::Splitter,
        masker: OwnedMasker,
        guard: OutcomeGuard,
        /// Not a list: the whole document, gathered.
        whole: Option<Vec<u8>>,
        done: bool,
    }
    let state = ListState {
        body,
        splitter: super::list::Splitter::new(),
        masker,
        guard: OutcomeGuard::new(rec, id, started, code),
        whole: None,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let frame = st.body.frame().await;
            let data = match frame {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
                Some(Err(e)) => {
                    st.done = true;
                    st.guard.error = true;
                    return Some((Err(std::io::Error::other(e)), st));
                }
                None => {
                    st.done = true;
                    let Some(whole) = st.whole.take() else {
                        if st.splitter.finished() {
                            return None;
                        }
                        st.guard.error = true;
                        return Some((
                            Err(std::io::Error::other("agentgate: the list ended early")),
                            st,
                        ));
                    };
                    // Another shape: masked whole.
                    let mut m = Masker {
                        masks: &st.masker.masks,
                        reveal_secrets: st.masker.reveal_secrets,
                        hint: st.masker.hint.clone(),
                        counts: std::mem::take(&mut st.guard.counts),
                    };
                    let out = serde_json::from_slice::<serde_json::Value>(&whole)
                        .ok()
                        .and_then(|mut v| {
                            m.document(&mut v);
                            serde_json::to_vec(&v).ok()
                        });
                    st.guard.counts = m.counts;
                    return match out {
                        Some(out) => {
                            st.guard.bytes += out.len() as u64;
                            Some((Ok(Frame::data(Bytes::from(out))), st))
                        }
                        None => {
                            st.guard.error = true;
                            Some((
                                Err(std::io::Error::other(
                                    "agentgate: the answer is not JSON it can mask",
                                )),
                                st,
                            ))
                        }
                    };
                }
            };
            if let Some(whole) = st.whole.as_mut() {
                whole.extend_from_slice(&data);
                if whole.len() > 64 << 20 {
                    st.done = true;
                    st.guard.error = true;
                    return Some((
                        Err(std::io::Error::other(
                            "agentgate: the answer is too long to mask",
                        )),
                        st,
                    ));
                }
                continue;
            }
            let masks = st.masker.masks.clone();
            let mut m = Masker {
                masks: &masks,
                reveal_secrets: st.masker.reveal_secrets,
                hint: st.masker.hint.clone(),
                counts: std::mem::take(&mut st.guard.counts),
            };
            let step = st.splitter.feed(&data, &mut |raw, (group, kind), out| {
                m.item_json(raw, group, kind, out)
                    .map_err(|_| super::list::ListError::Invalid("an item does not parse"))
            });
            st.guard.counts = m.counts;
            st.guard.rows = st.splitter.items();
            match step {
                Ok(super::list::Step::Send(out)) if out.is_empty() => continue,
                Ok(super::list::Step::Send(out)) => {
                    st.guard.bytes += out.len() as u64;
                    return Some((Ok(Frame::data(Bytes::from(out))), st));
                }
                Ok(super::list::Step::NotAList(so_far)) => st.whole = Some(so_far),
                Err(e) => {
                    st.done = true;
                    st.guard.error = true;
                    return Some((Err(std::io::Error::other(format!("agentgate: {e}"))), st));
                }
            }
        }
    });
    StreamBody::new(stream).boxed()
}
