//! kubectl (1.30 and later) opens exec and attach over WebSocket and, when that upgrade is
//! answered with anything but `101 Switching Protocols`, repeats the request at once over
//! SPDY and shows only the SPDY answer. With a MaskPolicy agentgate refuses SPDY sessions
//! (their output cannot be masked), so without this module every failure of the WebSocket
//! attempt (pod not found, held for approval, the API server's own refusal) would read as
//! "use WebSocket". Here the WebSocket attempt's answer is remembered for a moment, and the
//! SPDY refusal that follows it for the same request is replaced by that answer: the agent
//! reads what really went wrong.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Body as _;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::{Body, full};

/// How long a WebSocket attempt's answer waits for the SPDY retry (kubectl sends it at once).
const REMEMBERED_FOR: Duration = Duration::from_secs(10);
/// At most this many answers are remembered; more are not (the SPDY refusal then stands).
const AT_MOST: usize = 1024;
/// The largest answer remembered (the API server's `Status` objects are far smaller).
const LARGEST: u64 = 64 << 10;

/// Marks agentgate's refusal of an SPDY exec or attach session (output that must be masked).
#[derive(Clone, Copy, Debug)]
pub struct SpdyRefused;

/// Which upgrade a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    WebSocket,
    Spdy,
}

/// An exec or attach upgrade, keyed by who sent it and what it asks for.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    key: u64,
    protocol: Protocol,
}

struct Remembered {
    at: Instant,
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

/// The answers of recent WebSocket attempts that failed.
#[derive(Default)]
pub struct Fallbacks {
    hasher: RandomState,
    answers: Mutex<HashMap<u64, Remembered>>,
}

impl Fallbacks {
    /// The attempt `req` is, when it is an exec or attach upgrade over WebSocket or SPDY.
    pub fn attempt<B>(&self, req: &Request<B>, peer: IpAddr) -> Option<Attempt> {
        let path = req.uri().path();
        if !(path.ends_with("/exec") || path.ends_with("/attach")) {
            return None;
        }
        let upgrade = req.headers().get(header::UPGRADE)?.to_str().ok()?;
        let protocol = if upgrade.eq_ignore_ascii_case("websocket") {
            Protocol::WebSocket
        } else if upgrade.to_ascii_uppercase().starts_with("SPDY/") {
            Protocol::Spdy
        } else {
            return None;
        };
        // The same client (address and credentials) asking for the same session.
        let mut h = self.hasher.build_hasher();
        peer.hash(&mut h);
        req.headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes)
            .hash(&mut h);
        req.method().as_str().hash(&mut h);
        path.hash(&mut h);
        req.uri().query().hash(&mut h);
        Some(Attempt {
            key: h.finish(),
            protocol,
        })
    }

    /// What the agent gets for `attempt`, given the gateway's answer `resp`.
    pub async fn answer(&self, attempt: Attempt, resp: Response<Body>) -> Response<Body> {
        match attempt.protocol {
            Protocol::WebSocket => self.remember(attempt.key, resp).await,
            Protocol::Spdy => {
                if resp.extensions().get::<SpdyRefused>().is_none() {
                    return resp;
                }
                let earlier = self.lock().remove(&attempt.key);
                match earlier {
                    Some(r) if r.at.elapsed() < REMEMBERED_FOR => {
                        let mut out = Response::new(full(r.body));
                        *out.status_mut() = r.status;
                        if let Some(ct) = r.content_type {
                            out.headers_mut().insert(header::CONTENT_TYPE, ct);
                        }
                        out
                    }
                    _ => resp,
                }
            }
        }
    }

    async fn remember(&self, key: u64, resp: Response<Body>) -> Response<Body> {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            || resp.body().size_hint().upper().is_none_or(|n| n > LARGEST)
        {
            return resp;
        }
        let (parts, body) = resp.into_parts();
        let body = match Limited::new(body, LARGEST as usize).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                tracing::debug!(error = %e, "an exec answer could not be read");
                return Response::from_parts(parts, full(Bytes::new()));
            }
        };
        {
            let mut answers = self.lock();
            answers.retain(|_, r| r.at.elapsed() < REMEMBERED_FOR);
            if answers.len() < AT_MOST {
                answers.insert(
                    key,
                    Remembered {
                        at: Instant::now(),
                        status: parts.status,
                        content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
                        body: body.clone(),
                    },
                );
            }
        }
        Response::from_parts(parts, full(body))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Remembered>> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(upgrade: &str, path: &str) -> Request<()> {
        Request::builder()
            .uri(format!("{path}?command=sh&stdout=true"))
            .header(header::UPGRADE, upgrade)
            .header(header::AUTHORIZATION, "Bearer t")
            .body(())
            .unwrap()
    }

    fn refused() -> Response<Body> {
        let mut r = super::super::status(StatusCode::FORBIDDEN, "Forbidden", "use WebSocket");
        r.extensions_mut().insert(SpdyRefused);
        r
    }

    async fn text(r: Response<Body>) -> (StatusCode, String) {
        let code = r.status();
        let b = r.into_body().collect().await.unwrap().to_bytes();
        (code, String::from_utf8_lossy(&b).into_owned())
    }

    #[tokio::test]
    async fn the_spdy_retry_shows_what_the_websocket_attempt_got() {
        let f = Fallbacks::default();
        let ip: IpAddr = [127, 0, 0, 1].into();
        let path = "/api/v1/namespaces/default/pods/web/exec";
        let ws = f.attempt(&req("websocket", path), ip).unwrap();
        let not_found = super::super::status(StatusCode::NOT_FOUND, "NotFound", "no pod web");
        let (code, body) = text(f.answer(ws, not_found).await).await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert!(body.contains("no pod web"));
        // Another client's SPDY request keeps agentgate's own refusal.
        let other = f
            .attempt(&req("SPDY/3.1", path), [10, 0, 0, 1].into())
            .unwrap();
        let (code, body) = text(f.answer(other, refused()).await).await;
        assert_eq!(code, StatusCode::FORBIDDEN);
        assert!(body.contains("use WebSocket"));
        // The same client's retry reads the WebSocket attempt's answer, once.
        let spdy = f.attempt(&req("SPDY/3.1", path), ip).unwrap();
        let (code, body) = text(f.answer(spdy, refused()).await).await;
        assert_eq!(
            (code, body.contains("no pod web")),
            (StatusCode::NOT_FOUND, true)
        );
        let (code, _) = text(f.answer(spdy, refused()).await).await;
        assert_eq!(code, StatusCode::FORBIDDEN);
        // Other paths are none of this module's business.
        assert!(f.attempt(&req("websocket", "/api/v1/pods"), ip).is_none());
    }
}
