//! Idle upstream connections kept for the next session, as PgBouncer's session pooling keeps
//! them: agents that connect once per command (`psql -c …`) skip the TCP, TLS and SCRAM
//! set-up of a new server connection.
//!
//! A connection is kept only when its session ended cleanly: the agent sent Terminate, the
//! server had answered everything, no transaction, COPY or extended-protocol batch was open,
//! and no cancel request was sent for the session. It is then reset with `DISCARD ALL`
//! (temporary tables, prepared statements, cursors, settings, `SET ROLE`, advisory locks,
//! `LISTEN`s) before another session may take it. Connections are reused only for the same
//! principal (AgentIdentity, and with tokens the issuer and subject), Target spec,
//! credentials and startup settings (the pool's [`Key`]); the masking catalog's connections
//! are never a session's. Idle connections are closed after `idle_timeout`, any connection
//! after `lifetime`, the least recently used when `max_idle` are kept (all keys together). A
//! connection the server closed while idle is noticed before it is handed out, and one idle
//! for longer than `check_after` is asked a round trip first.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use agentgate_crds::target::PostgresTarget;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::ReadBuf;

use super::frame::{Frame, MAX_MESSAGE, cstring, read_frame, write_frames};
use super::frontend::{self, Frontend};
use super::upstream::{self, Credentials, Upstream, UpstreamError};

/// How long resetting a released connection may take before it is closed instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// How long that round trip may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How idle upstream connections are kept.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// The most idle connections kept, all keys together (the least recently used goes
    /// first); 0 keeps none (every session logs in anew).
    pub max_idle: usize,
    /// An idle connection is closed after this long unused.
    pub idle_timeout: Duration,
    /// A connection is closed at its first release after this long, however busy.
    pub lifetime: Duration,
    /// A connection idle for longer than this is asked a round trip (an empty query) before
    /// it is handed out, as PgBouncer's `server_check_delay`: a server host that vanished
    /// without closing the connection is noticed there, not in the agent's first statement.
    pub check_after: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_idle: 16,
            idle_timeout: Duration::from_secs(60),
            lifetime: Duration::from_secs(3600),
            check_after: Duration::from_secs(30),
        }
    }
}

/// What a connection may be reused for: the same principal, purpose, Target spec,
/// credentials and startup settings.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    principal: String,
    /// The masking catalog's, never an agent's session's.
    catalog: bool,
    target: String,
    username: String,
    /// SHA-256 of the password and CA: a changed Secret is a different key, and the pool
    /// holds no second copy of the password.
    secret: [u8; 32],
    params: Vec<(String, String)>,
}

impl Key {
    /// The key of an agent's session as `principal` to `target` with `creds` and startup
    /// `params`.
    pub fn session(
        principal: &str,
        target: &PostgresTarget,
        creds: &Credentials,
        params: &[(String, String)],
    ) -> Self {
        Self::new(principal, false, target, creds, params)
    }

    /// The key of the masking catalog's connection for `principal`'s sessions.
    pub fn catalog(
        principal: &str,
        target: &PostgresTarget,
        creds: &Credentials,
        params: &[(String, String)],
    ) -> Self {
        Self::new(principal, true, target, creds, params)
    }

    fn new(
        principal: &str,
        catalog: bool,
        target: &PostgresTarget,
        creds: &Credentials,
        params: &[(String, String)],
    ) -> Self {
        let mut secret = Sha256::new();
        secret.update(creds.password.as_bytes());
        secret.update([0]);
        if let Some(ca) = &creds.ca_pem {
            secret.update(ca);
        }
        Self {
            principal: principal.to_owned(),
            catalog,
            // Every field of the spec (host, port, database, TLS settings) counts.
            target: serde_json::to_string(target).unwrap_or_else(|_| format!("{target:?}")),
            username: creds.username.clone(),
            secret: secret.finalize().into(),
            params: params.to_vec(),
        }
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("principal", &self.principal)
            .field("catalog", &self.catalog)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

struct Idle {
    up: Upstream,
    since: Instant,
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
        // is one push or remove): keep using it.
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
        while let Some(mut idle) = self.take(key) {
            let now = Instant::now();
            if self.expired(&idle, now) {
                close(idle.up);
            } else if !alive(&mut idle.up) {
                tracing::debug!("a pooled upstream connection was closed by the server");
            } else if now.duration_since(idle.since) >= self.config.check_after
                && !matches!(
                    tokio::time::timeout(CHECK_TIMEOUT, round_trip(&mut idle.up)).await,
                    Ok(Ok(()))
                )
            {
                tracing::debug!("a pooled upstream connection did not answer");
            } else {
                return Ok((idle.up, true));
            }
        }
        let mut up = upstream::connect(target, creds, params).await?;
        // A session's connection reports where its names point; the catalog's is never
        // asked (its own default path is not used).
        if !key.catalog {
            match read_names(&mut up).await {
                Ok(names) => up.names = Some(names),
                Err(why) => {
                    // Its answer may be half read: the connection is not used.
                    close(up);
                    return Err(UpstreamError::Protocol(format!(
                        "reading the new session's search path: {why}"
                    )));
                }
            }
        }
        Ok((up, false))
    }

    /// The most recently released idle connection for `key`, preferring one watched by this
    /// thread's event loop.
    fn take(&self, key: &Key) -> Option<Idle> {
        let mut idle = self.lock();
        let list = idle.get_mut(key)?;
        let here = std::thread::current().id();
        let at = list
            .iter()
            .rposition(|i| i.up.home == here)
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
    /// with `DISCARD ALL` on a task of its own and kept for `key`, or closed when the
    /// connection is past its lifetime or the reset fails.
    pub fn release(self: &Arc<Self>, key: Key, up: Upstream) {
        if self.config.max_idle == 0 || up.created.elapsed() >= self.config.lifetime {
            close(up);
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let mut up = up;
            match tokio::time::timeout(RESET_TIMEOUT, reset(&mut up, key.catalog)).await {
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

    /// Keeps `up`; when `max_idle` are kept already, the least recently used goes.
    fn keep(&self, key: Key, up: Upstream) {
        let evicted = {
            let mut idle = self.lock();
            let total: usize = idle.values().map(Vec::len).sum();
            let evicted = if total >= self.config.max_idle {
                let oldest = idle
                    .iter()
                    .flat_map(|(k, l)| l.iter().enumerate().map(move |(i, x)| (x.since, k, i)))
                    .min_by_key(|(since, _, _)| *since)
                    .map(|(_, k, i)| (k.clone(), i));
                oldest.and_then(|(k, i)| {
                    let list = idle.get_mut(&k)?;
                    let gone = list.remove(i);
                    if list.is_empty() {
                        idle.remove(&k);
                    }
                    Some(gone)
                })
            } else {
                None
            };
            idle.entry(key).or_default().push(Idle {
                up,
                since: Instant::now(),
            });
            evicted
        };
        if let Some(e) = evicted {
            close(e.up);
        }
    }

    /// Closes every idle connection: after a role's or database's default settings changed,
    /// sessions and catalog lookups then start on connections with the new defaults alike.
    pub fn clear(&self) {
        let gone: Vec<Idle> = self.lock().drain().flat_map(|(_, l)| l).collect();
        for g in gone {
            close(g.up);
        }
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

/// Whether the server left an idle connection alone: nothing to read on the socket, and
/// nothing already decrypted and waiting in the TLS layer. A server that closes the
/// connection sends an error and an end of stream, which are read as "not alive". The
/// socket is non-blocking (the event loop set it so), so neither look waits.
fn alive(up: &mut Upstream) -> bool {
    let mut byte = [0u8; 1];
    let socket_quiet =
        matches!(up.probe.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    socket_quiet && quiet(&mut up.stream)
}

/// Whether a read would wait: nothing buffered, nothing arrived. Anything read (data, an
/// end of stream, an error) means the connection is not quiet (and it is closed anyway).
fn quiet(stream: &mut Box<dyn upstream::Stream>) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    // Outside the task's cooperative budget: a spent budget would answer "wait" whatever is
    // there.
    let read = std::future::poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut byte);
        Poll::Ready(Pin::new(&mut **stream).poll_read(cx, &mut buf).is_pending())
    });
    let mut read = std::pin::pin!(tokio::task::unconstrained(read));
    matches!(read.as_mut().poll(&mut cx), Poll::Ready(true))
}

/// `DISCARD ALL`, read to its ReadyForQuery: every session setting back to its default, the
/// settings the server reports afterwards replacing the connection's. Nothing may follow
/// the ReadyForQuery.
async fn reset(up: &mut Upstream, catalog: bool) -> Result<(), String> {
    match simple_query(up, "DISCARD ALL").await?.as_slice() {
        [c] if c.tag == b'C' && c.body.starts_with(b"DISCARD ALL") => {}
        _ => return Err("DISCARD ALL did not complete".into()),
    }
    // The defaults it went back to (a role's or database's may have changed since); a
    // catalog connection is never asked.
    if !catalog {
        up.names = Some(read_names(up).await?);
    }
    if quiet(&mut up.stream) {
        Ok(())
    } else {
        Err("the server sent more after DISCARD ALL".into())
    }
}

/// The session's `search_path` setting and `current_user` (where unqualified names point),
/// read once the session is idle. `Err` when the answer is not as expected: it may be half
/// read, and the caller closes the connection.
async fn read_names(up: &mut Upstream) -> Result<(String, String), String> {
    let answer = tokio::time::timeout(
        CHECK_TIMEOUT,
        simple_query(
            up,
            "SELECT pg_catalog.current_setting('search_path'), current_user",
        ),
    )
    .await
    .map_err(|_| "no answer in time".to_owned())??;
    let row = answer
        .iter()
        .find(|f| f.tag == b'D')
        .ok_or("no row in the answer")?;
    let values = super::backend::decode_data_row(row).map_err(|e| e.to_string())?;
    let text = |i: usize| {
        values
            .get(i)
            .cloned()
            .flatten()
            .and_then(|v| String::from_utf8(v.to_vec()).ok())
            .ok_or("a malformed row")
    };
    Ok((text(0)?, text(1)?))
}

/// An empty query, read to its ReadyForQuery: the server is there and the session idle.
async fn round_trip(up: &mut Upstream) -> Result<(), String> {
    match simple_query(up, "").await?.as_slice() {
        [i] if i.tag == b'I' => Ok(()),
        _ => Err("the empty query was not answered as one".into()),
    }
}

/// Sends `sql` as a simple query and reads its answer to a ReadyForQuery that finds the
/// session idle: the messages, without the settings the server reports (they replace the
/// connection's), notices and notifications. An error, or more messages than a reset or a
/// check can answer, fails.
async fn simple_query(up: &mut Upstream, sql: &str) -> Result<Vec<Frame>, String> {
    write_frames(
        &mut up.stream,
        &[frontend::encode(&Frontend::Query(sql.into()))],
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    loop {
        let f = read_frame(&mut up.stream, MAX_MESSAGE)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the server closed the connection")?;
        match f.tag {
            b'S' => replace_param(&mut up.params, f),
            b'N' | b'A' => {}
            b'E' => return Err(format!("{sql:?} failed")),
            b'Z' if f.body.first() == Some(&b'I') => return Ok(answer),
            b'Z' => return Err(format!("{sql:?} did not leave the session idle")),
            _ if answer.len() >= 4 => return Err(format!("{sql:?}: an unexpected answer")),
            _ => answer.push(f),
        }
    }
}

/// The parameter a ParameterStatus names, or `None` when malformed.
fn param_name(frame: &Frame) -> Option<String> {
    let mut b: Bytes = frame.body.clone();
    cstring(&mut b, "ParameterStatus").ok()
}

/// Replaces (or adds) the ParameterStatus of the same name in `params`, the settings a
/// session on this connection is told at its start.
pub fn replace_param(params: &mut Vec<Frame>, frame: Frame) {
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
    let stream = &mut *up.stream;
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
        let key = Key::session("claude", &target(5432), &creds("pw"), &params);
        assert_eq!(
            key,
            Key::session("claude", &target(5432), &creds("pw"), &params)
        );
        for other in [
            Key::session("other-agent", &target(5432), &creds("pw"), &params),
            Key::session("claude", &target(5433), &creds("pw"), &params),
            Key::session("claude", &target(5432), &creds("rotated"), &params),
            Key::session("claude", &target(5432), &creds("pw"), &[]),
            Key::catalog("claude", &target(5432), &creds("pw"), &params),
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
