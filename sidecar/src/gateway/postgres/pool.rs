//! Idle upstream connections kept for the next session, as PgBouncer's session pooling keeps
//! them: agents that connect once per command (`psql -c …`) skip the TCP, TLS and SCRAM
//! set-up of a new server connection.
//!
//! A connection is kept only when its session ended cleanly: the agent sent Terminate, the
//! server had answered everything, no transaction, COPY or extended-protocol batch was open.
//! It is then reset with `DISCARD ALL` (temporary tables, prepared statements, cursors,
//! settings, `SET ROLE`, advisory locks, `LISTEN`s) before another session may take it.
//! Connections are reused only for the same agent identity, Target, credentials and startup
//! settings (the pool's [`Key`]), so a changed Secret or Target spec never reuses an old
//! login. Idle connections are closed after `idle_timeout`, and any connection after
//! `lifetime`; one the server closed while idle is noticed before it is handed out.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use agentgate_crds::target::PostgresTarget;
use bytes::Bytes;
use tokio::io::AsyncWrite;

use super::frame::{Frame, MAX_MESSAGE, cstring, read_frame, write_frames};
use super::frontend::{self, Frontend};
use super::upstream::{self, Credentials, Upstream, UpstreamError};

/// How long resetting a released connection may take before it is closed instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// How idle upstream connections are kept.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// The most idle connections kept per [`Key`]; 0 keeps none (every session logs in anew).
    pub max_idle: usize,
    /// An idle connection is closed after this long unused.
    pub idle_timeout: Duration,
    /// A connection is closed at its first release after this long, however busy.
    pub lifetime: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_idle: 16,
            idle_timeout: Duration::from_secs(60),
            lifetime: Duration::from_secs(3600),
        }
    }
}

/// What a connection may be reused for: the same agent identity, Target spec, credentials
/// and startup settings.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    identity: String,
    target: String,
    username: String,
    password: String,
    ca: Option<Vec<u8>>,
    params: Vec<(String, String)>,
}

impl Key {
    /// The key of a login as `identity` to `target` with `creds` and startup `params`.
    pub fn new(
        identity: &str,
        target: &PostgresTarget,
        creds: &Credentials,
        params: &[(String, String)],
    ) -> Self {
        Self {
            identity: identity.to_owned(),
            // Every field of the spec (host, port, database, TLS settings) counts.
            target: serde_json::to_string(target).unwrap_or_else(|_| format!("{target:?}")),
            username: creds.username.clone(),
            password: creds.password.clone(),
            ca: creds.ca_pem.clone(),
            params: params.to_vec(),
        }
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("identity", &self.identity)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

struct Idle {
    up: Upstream,
    since: Instant,
    thread: std::thread::ThreadId,
}

/// The idle upstream connections of one gateway.
pub struct Pool {
    config: PoolConfig,
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.config)
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl Pool {
    /// An empty pool.
    pub fn new(config: PoolConfig) -> Self {
        Self {
            config,
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// How the pool keeps connections.
    pub fn config(&self) -> PoolConfig {
        self.config
    }

    /// How many idle connections the pool holds.
    pub fn idle_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Idle>>> {
        // A panic while holding the lock cannot leave the map inconsistent (every change
        // is one push or pop): keep using it.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection for `key` when one is alive, else a new login. The flag says
    /// whether the connection was reused.
    pub async fn connect(
        &self,
        key: &Key,
        target: &PostgresTarget,
        creds: &Credentials,
        params: &[(String, String)],
    ) -> Result<(Upstream, bool), UpstreamError> {
        while let Some(idle) = self.take(key) {
            if self.expired(&idle, Instant::now()) {
                close(idle.up);
            } else if !alive(&idle.up.probe) {
                tracing::debug!("a pooled upstream connection was closed by the server");
                drop(idle.up);
            } else {
                return Ok((idle.up, true));
            }
        }
        Ok((upstream::connect(target, creds, params).await?, false))
    }

    /// The most recently released idle connection for `key`, preferring one created on
    /// this thread (its event loop is the one that watches it).
    fn take(&self, key: &Key) -> Option<Idle> {
        let mut idle = self.lock();
        let list = idle.get_mut(key)?;
        let here = std::thread::current().id();
        let at = list
            .iter()
            .rposition(|i| i.thread == here)
            .or_else(|| list.len().checked_sub(1))?;
        let taken = list.remove(at);
        if list.is_empty() {
            idle.remove(key);
        }
        Some(taken)
    }

    fn expired(&self, idle: &Idle, now: Instant) -> bool {
        now.duration_since(idle.since) >= self.config.idle_timeout
            || now.duration_since(idle.up.created) >= self.config.lifetime
    }

    /// Takes back a connection whose session ended cleanly (idle, nothing owed): it is reset
    /// with `DISCARD ALL` on a task of its own and kept for `key`, or closed when the pool
    /// is full, the connection is past its lifetime, or the reset fails.
    pub fn release(self: &Arc<Self>, key: Key, up: Upstream) {
        if self.config.max_idle == 0 || up.created.elapsed() >= self.config.lifetime {
            close(up);
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let mut up = up;
            match tokio::time::timeout(RESET_TIMEOUT, reset(&mut up)).await {
                Ok(Ok(())) => pool.keep(key, up),
                Ok(Err(why)) => {
                    tracing::debug!(%why, "a released upstream connection was not kept");
                    close(up);
                }
                Err(_) => {
                    tracing::debug!("resetting a released upstream connection timed out");
                    close(up);
                }
            }
        });
    }

    fn keep(&self, key: Key, up: Upstream) {
        let mut idle = self.lock();
        let list = idle.entry(key).or_default();
        if list.len() >= self.config.max_idle {
            drop(idle);
            close(up);
            return;
        }
        list.push(Idle {
            up,
            since: Instant::now(),
            thread: std::thread::current().id(),
        });
    }

    /// Closes idle connections past their idle timeout or lifetime.
    pub fn reap(&self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        {
            let mut idle = self.lock();
            for list in idle.values_mut() {
                let mut i = 0;
                while i < list.len() {
                    if self.expired(&list[i], now) {
                        gone.push(list.remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            idle.retain(|_, l| !l.is_empty());
        }
        for g in gone {
            close(g.up);
        }
    }

    /// Reaps every `every` until the process ends.
    pub async fn reap_every(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.reap();
        }
    }
}

/// Whether the server left an idle connection alone: nothing to read. A server that closes
/// the connection sends an error and an end of stream, which are read as "not alive". The
/// socket is non-blocking (the event loop set it so), so the peek never waits.
fn alive(probe: &std::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(probe.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// `DISCARD ALL`, read to its ReadyForQuery: every session setting back to its default, the
/// settings the server reports afterwards replacing the connection's.
async fn reset(up: &mut Upstream) -> Result<(), String> {
    write_frames(
        &mut up.stream,
        &[frontend::encode(&Frontend::Query("DISCARD ALL".into()))],
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut ok = false;
    loop {
        let f = read_frame(&mut up.stream, MAX_MESSAGE)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the server closed the connection")?;
        match f.tag {
            b'C' => ok = f.body.starts_with(b"DISCARD ALL"),
            b'S' => replace_param(&mut up.params, f),
            b'N' | b'A' => {}
            b'E' => return Err("DISCARD ALL failed".into()),
            b'Z' if ok && f.body.first() == Some(&b'I') => return Ok(()),
            b'Z' => return Err("DISCARD ALL did not leave the session idle".into()),
            other => return Err(format!("unexpected message {:?}", other as char)),
        }
    }
}

/// The parameter a ParameterStatus names, or `None` when malformed.
fn param_name(frame: &Frame) -> Option<String> {
    let mut b: Bytes = frame.body.clone();
    cstring(&mut b, "ParameterStatus").ok()
}

/// Replaces (or adds) the ParameterStatus of the same name.
fn replace_param(params: &mut Vec<Frame>, frame: Frame) {
    let Some(name) = param_name(&frame) else {
        return;
    };
    match params
        .iter_mut()
        .find(|p| param_name(p).as_deref() == Some(name.as_str()))
    {
        Some(p) => *p = frame,
        None => params.push(frame),
    }
}

/// Ends a connection without waiting: a Terminate when the socket takes it at once, then the
/// socket is closed.
pub fn close(mut up: Upstream) {
    const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
    let mut cx = Context::from_waker(Waker::noop());
    let stream = Pin::new(&mut up.stream);
    let stream = stream.get_mut();
    if let Poll::Ready(Ok(5)) = Pin::new(&mut *stream).poll_write(&mut cx, &TERMINATE) {
        let _ = Pin::new(&mut *stream).poll_flush(&mut cx);
        let _ = Pin::new(&mut *stream).poll_shutdown(&mut cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(port: u16) -> PostgresTarget {
        serde_json::from_value(serde_json::json!({
            "host": "db", "port": port, "database": "app", "credentials": { "name": "db" }
        }))
        .expect("a target")
    }

    fn creds(password: &str) -> Credentials {
        Credentials {
            username: "app".into(),
            password: password.into(),
            ca_pem: None,
        }
    }

    #[test]
    fn a_connection_is_reused_only_for_the_same_identity_target_login_and_settings() {
        let params = vec![("application_name".to_owned(), "psql".to_owned())];
        let key = Key::new("claude", &target(5432), &creds("pw"), &params);
        assert_eq!(
            key,
            Key::new("claude", &target(5432), &creds("pw"), &params)
        );
        for other in [
            Key::new("other-agent", &target(5432), &creds("pw"), &params),
            Key::new("claude", &target(5433), &creds("pw"), &params),
            Key::new("claude", &target(5432), &creds("rotated"), &params),
            Key::new("claude", &target(5432), &creds("pw"), &[]),
        ] {
            assert_ne!(key, other);
        }
        // The password never shows.
        assert!(!format!("{key:?}").contains("pw"), "{key:?}");
    }

    #[test]
    fn settings_the_reset_reports_replace_the_ones_replayed_to_the_next_session() {
        let status = |name: &str, value: &str| {
            let mut b = bytes::BytesMut::new();
            super::super::frame::put_cstring(&mut b, name);
            super::super::frame::put_cstring(&mut b, value);
            Frame::new(b'S', b.freeze())
        };
        let mut params = vec![status("TimeZone", "UTC"), status("DateStyle", "ISO, MDY")];
        replace_param(&mut params, status("TimeZone", "Europe/Berlin"));
        replace_param(&mut params, status("is_superuser", "off"));
        // A malformed one is ignored.
        replace_param(&mut params, Frame::new(b'S', Bytes::from_static(b"no-nul")));
        assert_eq!(
            params,
            vec![
                status("TimeZone", "Europe/Berlin"),
                status("DateStyle", "ISO, MDY"),
                status("is_superuser", "off"),
            ]
        );
    }
}
