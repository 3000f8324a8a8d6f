//! One agent connection through the PostgreSQL gateway.
//!
//! Two halves per connection, run in its one task: the *reader* takes the agent's messages,
//! classifies every SQL text with PostgreSQL's grammar, asks the policy, and forwards only
//! what is allowed; the *writer* relays the server's answers (masking values) and slots the
//! gateway's own answers (refusals) in exactly where the server's would have been, so
//! pipelining clients see a well-ordered stream.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use agentgate_crds::Protocol;
use bytes::Bytes;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Mutex, mpsc};

use super::audit::{self as records, Tally};
use super::backend::{self, ErrorFields, sqlstate};
use super::catalog::Catalog;
use super::data_row;
use super::frame::{
    Frame, FrameError, MAX_MESSAGE, Startup, read_frame, read_startup, write_frames,
};
use super::frontend::{self, Frontend};
use super::listener::AgentStream;
use super::pool::{self, Key, Pool, PoolConfig};
use super::search_path::SearchPath;
use super::upstream::{self, CredentialCache, Upstream};
use crate::audit::{Auditor, SessionRecorder};
use crate::mask::{MaskSet, Masked};
use crate::policy::approval::{Approvals, Filed, Request};
use crate::policy::{self, Command, Decision, PolicyStore, Verdict};
use crate::sql::{Classified, classify};

/// A backend's process id and secret key, as in BackendKeyData.
type CancelKey = (i32, Vec<u8>);

/// What a CancelRequest for one agent session reaches.
#[derive(Clone)]
struct Session {
    /// The Target.
    target: String,
    /// The server's key for the session, when it sent one.
    upstream: Option<CancelKey>,
    /// Ends a command held for approval as canceled.
    hold: Arc<HoldCancel>,
}

/// Cancels of a session's held commands: a counter (so a cancel between checks is never
/// lost) and a wake-up.
#[derive(Default)]
struct HoldCancel {
    requests: std::sync::atomic::AtomicU64,
    wake: tokio::sync::Notify,
    /// The agent's socket (a duplicate descriptor), to see it close while a command is held.
    client: std::sync::Mutex<Option<std::os::fd::OwnedFd>>,
}

/// Drops the session's duplicate of the agent's socket descriptor.
struct Watching(Arc<HoldCancel>);

impl Drop for Watching {
    fn drop(&mut self) {
        if let Ok(mut c) = self.0.client.lock() {
            c.take();
        }
    }
}

impl HoldCancel {
    fn cancel(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    fn count(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Whether the agent has closed its end of the connection.
    fn client_gone(&self) -> bool {
        self.client
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(super::listener::peer_closed))
            .unwrap_or(false)
    }
}

/// What the gateway needs to serve connections.
pub struct Gateway {
    /// The policy.
    pub policy: Arc<PolicyStore>,
    /// The identity every connection on this listener acts as (the pod's identity), when
    /// agents do not present tokens.
    pub identity: Option<String>,
    /// Verifies the token an agent presents as its password, when tokens are required.
    pub verifier: Option<Arc<crate::identity::Verifier>>,
    /// Where each Target's credentials are mounted: `<dir>/<target>/{username,password,…}`.
    pub targets_dir: PathBuf,
    /// Where approval requests for held commands are filed.
    pub approvals: Approvals,
    /// In a pod: the service account the pod's own token was verified as (TokenReview), or
    /// why it could not be. Connections are served only when it is the identity's.
    pub pod_user: Option<Arc<std::sync::RwLock<Result<String, String>>>>,
    /// Where every connection's and statement's record goes (before the statement runs).
    pub audit: Auditor,
    /// Idle upstream connections, reused by the next session of the same identity and Target.
    pub pool: Arc<Pool>,
    /// The Targets' credentials, read at most once a second.
    pub credentials: CredentialCache,
    cancels: Mutex<HashMap<CancelKey, Session>>,
    next_pid: AtomicI32,
}

impl Gateway {
    /// A gateway for `identity`.
    pub fn new(
        policy: Arc<PolicyStore>,
        identity: Option<String>,
        verifier: Option<Arc<crate::identity::Verifier>>,
        targets_dir: PathBuf,
        audit: Auditor,
    ) -> Self {
        Self {
            policy,
            identity,
            verifier,
            targets_dir,
            audit,
            approvals: Approvals::Disabled,
            pod_user: None,
            pool: Arc::new(Pool::new(PoolConfig::default())),
            credentials: CredentialCache::new(std::time::Duration::from_secs(1)),
            cancels: Mutex::new(HashMap::new()),
            next_pid: AtomicI32::new(1),
        }
    }
}

type AgentWriter = BufWriter<tokio::io::WriteHalf<AgentStream>>;

async fn fatal(
    w: &mut AgentWriter,
    code: &str,
    msg: String,
    hint: Option<&str>,
) -> Result<(), FrameError> {
    let mut e = ErrorFields::fatal(code, msg);
    if let Some(h) = hint {
        e = e.hint(h);
    }
    write_frames(w, &[e.to_error()]).await
}

/// Records a connection refused before its session began.
fn refused_connection(gw: &Gateway, identity: Option<&str>, target: &str, why: &str) {
    let mut r = agentgate_crds::audit::Record::new(
        agentgate_crds::audit::RecordKind::Refusal,
        crate::clock::now(),
    );
    r.identity = identity.map(str::to_owned);
    r.target = Some(crate::audit::agent_text(target, 253));
    r.protocol = Some(Protocol::Postgres);
    r.note = Some(crate::audit::agent_text(why, 512));
    // Refusals do not count against a full buffer (connections keep being refused anyway).
    if let Err(e) = gw.audit.admit().and_then(|()| gw.audit.record(r)) {
        tracing::warn!(error = %e, "a refused connection could not be recorded");
    }
}

/// In a pod, the pod must *be* the identity it serves: its verified service account is the
/// one the AgentIdentity names.
fn pod_identity(gw: &Gateway, snapshot: &policy::Snapshot, identity: &str) -> Result<(), String> {
    match &gw.pod_user {
        None => Ok(()),
        Some(pod_user) => crate::identity::pod::check(pod_user, snapshot, identity),
    }
}

/// Serves one connection to the end.
pub async fn handle(sock: AgentStream, gw: Arc<Gateway>) -> Result<(), FrameError> {
    let watcher = sock.watcher();
    let (r, w) = tokio::io::split(sock);
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    // Startup: TLS is not offered on loopback; the agent connects with sslmode=disable.
    let startup = loop {
        match read_startup(&mut r).await {
            Ok(Startup::SslRequest | Startup::GssEncRequest) => {
                w.write_all(b"N").await?;
                w.flush().await?;
            }
            Ok(Startup::Cancel { pid, key }) => {
                let found = {
                    let cancels = gw.cancels.lock().await;
                    let found = cancels.get(&(pid, key)).cloned();
                    // Marked under the lock: a session that ends after this never hands its
                    // server connection to another (the cancel could reach it there).
                    if let Some(session) = &found {
                        session.hold.cancel();
                    }
                    found
                };
                if let Some(session) = found {
                    // A held command is the gateway's own to cancel; a running one is the
                    // server's.
                    if let Some(ukey) = &session.upstream
                        && let Some(s) = gw.policy.get()
                        && let Some(pg) = s
                            .targets
                            .get(&session.target)
                            .and_then(|t| t.spec.postgres.clone())
                    {
                        let _ = upstream::cancel(&pg, ukey).await;
                    }
                }
                return Ok(());
            }
            Ok(s @ Startup::Startup { .. }) => break s,
            Err(e) => {
                let _ = fatal(
                    &mut w,
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("agentgate: {e}"),
                    None,
                )
                .await;
                return Err(e);
            }
        }
    };
    let database = startup
        .param("database")
        .or(startup.param("user"))
        .unwrap_or_default()
        .to_owned();
    let Some(snapshot) = gw.policy.get() else {
        let why = gw
            .policy
            .error()
            .unwrap_or_else(|| "no policy loaded yet".into());
        refused_connection(&gw, None, &database, &format!("policy not loaded: {why}"));
        fatal(
            &mut w,
            sqlstate::CANNOT_CONNECT_NOW,
            format!("agentgate refuses connections until its policy is loaded: {why}"),
            Some("retry in a moment; if it persists, check the sidecar's log"),
        )
        .await?;
        return Ok(());
    };
    // Who the connection's sessions are: with tokens the issuer and subject as well as the
    // AgentIdentity they map to. A server connection is only ever reused for the same.
    let mut principal = None;
    // The token the session began with, mapped again when the policy changes.
    let mut token_mapped: Option<crate::identity::Verified> = None;
    let identity = match (&gw.verifier, &gw.identity) {
        (Some(verifier), _) => {
            // The agent's password is its token.
            write_frames(&mut w, &[backend::authentication_cleartext()]).await?;
            let token = match read_frame(&mut r, 64 << 10).await {
                Ok(Some(f)) if f.tag == b'p' => {
                    let mut b = f.body.clone();
                    super::frame::cstring(&mut b, "PasswordMessage").unwrap_or_default()
                }
                _ => {
                    fatal(
                        &mut w,
                        sqlstate::PROTOCOL_VIOLATION,
                        "agentgate: expected a password message carrying a token".into(),
                        None,
                    )
                    .await?;
                    return Ok(());
                }
            };
            match verifier.verify(&token, &snapshot).await {
                Ok(v) => {
                    tracing::info!(identity = %v.identity, issuer = %v.issuer, subject = %v.subject, "token verified");
                    principal = Some(format!("{}\n{}\n{}", v.identity, v.issuer, v.subject));
                    let identity = v.identity.clone();
                    token_mapped = Some(v);
                    identity
                }
                Err(e) => {
                    tracing::warn!(error = %e, "token refused");
                    refused_connection(&gw, None, &database, &e.to_string());
                    fatal(
                        &mut w,
                        sqlstate::INVALID_PASSWORD,
                        format!("agentgate: {e}"),
                        Some("connect with a current token from your identity provider as the password"),
                    )
                    .await?;
                    return Ok(());
                }
            }
        }
        (None, Some(id)) => {
            if let Err(why) = pod_identity(&gw, &snapshot, id) {
                tracing::warn!(identity = %id, "{why}");
                refused_connection(&gw, Some(id), &database, &why);
                fatal(
                    &mut w,
                    sqlstate::INVALID_AUTHORIZATION,
                    format!("agentgate: {why}"),
                    Some("check the AgentIdentity's spec.authentication.serviceAccount and the pod's serviceAccountName"),
                )
                .await?;
                return Ok(());
            }
            id.clone()
        }
        (None, None) => {
            fatal(
                &mut w,
                sqlstate::INVALID_AUTHORIZATION,
                "agentgate: this gateway has no identity configured".into(),
                None,
            )
            .await?;
            return Ok(());
        }
    };
    match snapshot.identities.get(&identity) {
        None => {
            refused_connection(&gw, Some(&identity), &database, "unknown AgentIdentity");
            fatal(
                &mut w,
                sqlstate::INVALID_AUTHORIZATION,
                format!("agentgate: no AgentIdentity {identity} is known to this gateway"),
                None,
            )
            .await?;
            return Ok(());
        }
        Some(id) if id.spec.disabled => {
            refused_connection(&gw, Some(&identity), &database, "AgentIdentity disabled");
            fatal(
                &mut w,
                sqlstate::INVALID_AUTHORIZATION,
                format!("agentgate: AgentIdentity {identity} is disabled"),
                None,
            )
            .await?;
            return Ok(());
        }
        Some(_) => {}
    }
    let target = snapshot
        .targets
        .get(&database)
        .filter(|t| t.spec.protocol == Protocol::Postgres)
        .and_then(|t| t.spec.postgres.clone());
    let Some(pg) = target else {
        refused_connection(&gw, Some(&identity), &database, "no such PostgreSQL Target");
        let known: Vec<&str> = snapshot
            .targets
            .iter()
            .filter(|(_, t)| t.spec.protocol == Protocol::Postgres)
            .map(|(n, _)| n.as_str())
            .collect();
        fatal(
            &mut w,
            sqlstate::INVALID_AUTHORIZATION,
            format!("agentgate: no PostgreSQL Target named {database:?}"),
            Some(&format!(
                "connect with the Target's name as the database; known: {}",
                known.join(", ")
            )),
        )
        .await?;
        return Ok(());
    };
    let creds = match gw.credentials.get(
        &gw.targets_dir.join(&database),
        pg.tls.ca.as_ref().map(|c| c.key.as_str()),
    ) {
        Ok(c) => c,
        Err(e) => {
            fatal(
                &mut w,
                sqlstate::CONNECTION_FAILURE,
                format!("agentgate cannot connect to {database}: {e}"),
                None,
            )
            .await?;
            return Ok(());
        }
    };
    let passthrough: Vec<(String, String)> = match &startup {
        Startup::Startup { params, .. } => params
            .iter()
            .filter(|(k, _)| {
                matches!(
                    k.as_str(),
                    "application_name"
                        | "DateStyle"
                        | "TimeZone"
                        | "extra_float_digits"
                        | "IntervalStyle"
                )
            })
            .cloned()
            .chain([
                // The server must read statements exactly as the grammar agentgate checks
                // them with: UTF-8 (a multi-byte client encoding such as SJIS can hide a
                // quote inside a character) and standard-conforming strings.
                ("client_encoding".to_owned(), "UTF8".to_owned()),
                ("standard_conforming_strings".to_owned(), "on".to_owned()),
            ])
            .collect(),
        _ => Vec::new(),
    };
    let client = startup
        .param("application_name")
        .map(|c| crate::audit::agent_text(c, 200));
    let rec = match gw
        .audit
        .session(&identity, &database, Protocol::Postgres, client)
    {
        Ok(r) => Arc::new(r),
        Err(why) => {
            fatal(
                &mut w,
                sqlstate::INSUFFICIENT_RESOURCES,
                why,
                Some("retry when the audit sinks have recovered; the sidecar's log says which one failed"),
            )
            .await?;
            return Ok(());
        }
    };
    let principal = principal.unwrap_or_else(|| identity.clone());
    let pool_key = Key::session(&principal, &pg, &creds, &passthrough);
    let up = match gw.pool.connect(&pool_key, &pg, &creds, &passthrough).await {
        Ok((u, reused)) => {
            if reused {
                tracing::debug!(target = %database, "an idle upstream connection reused");
            }
            u
        }
        Err(e) => {
            tracing::warn!(target = %database, error = %e, "upstream connection failed");
            rec.end(&format!("the database could not be reached: {e}"));
            fatal(
                &mut w,
                sqlstate::CONNECTION_FAILURE,
                format!("agentgate cannot connect to {database}: {e}"),
                None,
            )
            .await?;
            return Ok(());
        }
    };
    let Upstream {
        stream,
        params,
        key,
        created,
        probe,
        home,
        names,
    } = up;
    let pid = gw.next_pid.fetch_add(1, Ordering::Relaxed);
    // The secret an agent must present to cancel this session: random, so one agent cannot
    // cancel another's work by guessing.
    let mut our_key = vec![0u8; 4];
    if rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut our_key)
        .is_err()
    {
        fatal(
            &mut w,
            sqlstate::CANNOT_CONNECT_NOW,
            "agentgate: no secure random numbers for the session's cancel key".into(),
            None,
        )
        .await?;
        return Ok(());
    }
    let hold_cancel = Arc::new(HoldCancel {
        client: std::sync::Mutex::new(watcher),
        ..Default::default()
    });
    // However the session ends (an early return, a panic), the duplicate descriptor goes
    // with it: the agent's socket must close when the session does.
    let _watching = Watching(hold_cancel.clone());
    gw.cancels.lock().await.insert(
        (pid, our_key.clone()),
        Session {
            target: database.clone(),
            upstream: key.clone(),
            hold: hold_cancel.clone(),
        },
    );
    let mut hello = vec![backend::authentication_ok()];
    hello.extend(params.iter().cloned());
    hello.push(backend::backend_key_data(pid, &our_key));
    hello.push(backend::ready_for_query(b'I'));
    if let Err(e) = write_frames(&mut w, &hello).await {
        gw.cancels.lock().await.remove(&(pid, our_key.clone()));
        return Err(e);
    }

    let masks = policy::masks_for(&snapshot, &identity, &database);
    let mask_set = match MaskSet::compile(&masks, &|k| {
        std::fs::read(gw.targets_dir.join("mask-keys").join(&k.name).join(&k.key)).ok()
    }) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            gw.cancels.lock().await.remove(&(pid, our_key.clone()));
            fatal(
                &mut w,
                sqlstate::CANNOT_CONNECT_NOW,
                format!("agentgate refuses {database} while a MaskPolicy is broken: {e}"),
                None,
            )
            .await?;
            return Ok(());
        }
    };
    tracing::info!(identity = %identity, target = %database, "session started");

    let (ur, uw) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Event>(256);
    // Where unqualified names point, for scopes that name tables; the writer confirms the
    // paths the server took.
    let path = SearchPath::new(&creds.username, names.as_ref());
    let path_confirmed = path.confirmation();
    let ddl = Ddl::default();
    let ddl_settled = ddl.settled.clone();
    let copy = Arc::new(tokio::sync::watch::Sender::new(CopyPhase::Idle));
    let catalog = Arc::new(Mutex::new(Catalog::new(
        pg.clone(),
        creds.clone(),
        &principal,
        gw.pool.clone(),
    )));
    // The reader and the writer are two futures of this one task, not two tasks: a request
    // and its answer then cost one task wake-up each, never a hand-off to another thread.
    let mut rx = rx;
    let writer = writer(
        &mut rx,
        BufReader::new(ur),
        w,
        mask_set.clone(),
        catalog.clone(),
        rec.clone(),
        params.clone(),
        Live {
            policy: gw.policy.clone(),
            identity: identity.clone(),
            target: database.clone(),
            pg: pg.clone(),
            key: key.clone(),
            path_confirmed,
            ddl_settled,
            copy: copy.clone(),
        },
    );
    let reader = reader(
        &gw,
        (&identity, token_mapped.as_ref()),
        &database,
        r,
        uw,
        tx,
        mask_set,
        catalog.clone(),
        hold_cancel.clone(),
        &rec,
        (path, ddl, copy),
    );
    let session_cancels = hold_cancel;
    let (result, reusable) = {
        tokio::pin!(writer, reader);
        // When the writer ends first, the session is over (the database went away, or the
        // gateway ended it): nothing more the agent sends is forwarded.
        tokio::select! {
            r = &mut reader => (r, (&mut writer).await),
            reusable = &mut writer => (Ok(()), reusable),
        }
    };
    // The writer ended before it took the reader's goodbye (the agent went away while an
    // answer was being relayed): the server is told the session is over.
    while let Ok(event) = rx.try_recv() {
        if let Event::Done(Some(half)) = event {
            terminate(half);
        }
    }
    rec.end(match &result {
        Ok(()) => "the agent closed the connection",
        Err(_) => "the connection broke (protocol error or network)",
    });
    // A cancel request for this session is marked under the same lock: once the session is
    // gone from the map, none can be on its way to the server.
    let canceled = {
        let mut cancels = gw.cancels.lock().await;
        cancels.remove(&(pid, our_key));
        session_cancels.count() > 0
    };
    // The duplicate descriptor goes with the session.
    if let Ok(mut c) = session_cancels.client.lock() {
        c.take();
    }
    catalog.lock().await.release();
    if let Some((stream, params)) = reusable {
        let up = Upstream {
            stream,
            params,
            key,
            created,
            probe,
            home,
            names: None,
        };
        if canceled {
            // A cancel sent for this session could still reach the server and hit the next
            // session's statement.
            pool::close(up);
        } else {
            // The server owes nothing and no transaction is open: the next session may
            // reuse the connection, once it is reset.
            gw.pool.release(pool_key, up);
        }
    }
    tracing::info!(identity = %identity, target = %database, "session ended");
    result
}

/// What the writer is told by the reader.
enum Event {
    /// A forwarded Query or Sync: the server will answer up to a ReadyForQuery.
    ExpectUpstream,
    /// A forwarded part of a batch that the gateway ended early with a Sync of its own: relay
    /// the server's answers but not its ReadyForQuery.
    ExpectUpstreamSwallowReady,
    /// The gateway's own answer, to send once everything before it was answered.
    Own(Vec<Frame>),
    /// The gateway's ReadyForQuery (after a refused batch), with the last known status.
    OwnReady,
    /// A forwarded simple Query: the server answers up to a ReadyForQuery; the rule masks
    /// its computed output columns.
    /// The last field: the query holds a COPY FROM (its ReadyForQuery ends any COPY).
    ExpectQuery(
        Option<crate::mask::Rule>,
        Box<Tally>,
        Option<u64>,
        Option<u64>,
        bool,
    ),
    /// An Execute was forwarded; the rule masks its computed output columns.
    /// With the search path change the server may confirm at the batch's end, and whether
    /// it runs a transaction statement (its batch then confirms nothing).
    Execute(
        Option<crate::mask::Rule>,
        Box<Tally>,
        Option<u64>,
        bool,
        Option<u64>,
    ),
    /// A Describe was forwarded: the agent's (its answer is relayed) or the gateway's own
    /// before an Execute (its answer sets the masking of the rows and is swallowed).
    Describe {
        /// The gateway's own.
        injected: bool,
    },
    /// The text of a statement forwarded in the open batch (only while columns are masked):
    /// what its errors may quote back.
    Text(Arc<str>),
    /// The gateway ended the COPY under way with a CopyFail of its own, for this reason.
    CopyFailed(String),
    /// The agent left; with the upstream's write side when it said goodbye with nothing
    /// open (the connection may then be reused).
    Done(Option<UpstreamWrite>),
    /// Tell the reader once everything forwarded before is answered (and the settings the
    /// server reported with those answers were checked).
    Barrier(tokio::sync::oneshot::Sender<()>),
}

enum Pending {
    Upstream {
        swallow_ready: bool,
        /// What the answer covers.
        batch: Box<Batch>,
    },
    Own(Vec<Frame>),
    OwnReady,
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// What the server owes for the messages forwarded up to one Sync (or one simple Query), so
/// each answer is matched with its request.
#[derive(Default)]
struct Batch {
    /// Executes, in order: the rule for their computed columns, and whether the gateway's
    /// describe of the portal has been answered.
    executes: VecDeque<(Option<crate::mask::Rule>, bool)>,
    /// Describes, in order: `true` for the gateway's own.
    describes: VecDeque<bool>,
    /// A simple query's rule for computed columns.
    query: Option<crate::mask::Rule>,
    /// The Executes' outcomes so far, in the order of `executes`.
    tallies: VecDeque<Box<Tally>>,
    /// A simple query's outcome so far.
    query_tally: Option<Box<Tally>>,
    /// The statements' texts (while columns are masked).
    texts: Vec<Arc<str>>,
    /// A simple query's search path change, confirmed when it is answered without an error
    /// and leaves no transaction open.
    path_change: Option<u64>,
    /// The latest DDL of the batch (its number): settled once a ReadyForQuery finds the
    /// session idle.
    ddl: Option<u64>,
    /// The server answered an error.
    failed: bool,
    /// An Execute of the batch runs a transaction statement: what its ReadyForQuery says is
    /// not where its search path changes stand.
    transaction: bool,
    /// A simple query holding a COPY FROM: no COPY is under way after its ReadyForQuery.
    copy_from: bool,
    /// Why the gateway ended the batch's COPY (its CopyFail): the server's error says it.
    copy_failed: Option<String>,
    /// The gateway refused a message of this batch and ended it with an Execute of
    /// [`REFUSED_PORTAL`]: the server's error for that Execute is the gateway's to drop.
    refused: bool,
}

/// A portal name no client can bind (the gateway refuses a Bind of any name that begins
/// with the byte 0x01): an Execute of it
/// makes the server fail the batch where the gateway refused a message, so what was
/// forwarded before it is rolled back as PostgreSQL would roll it back.
const REFUSED_PORTAL: &str = "\u{1}agentgate-refused";

impl Batch {
    /// The outcome being counted: the current Execute's, else the simple query's.
    fn tally(&mut self) -> Option<&mut Tally> {
        match self.tallies.front_mut() {
            Some(t) => Some(t),
            None => self.query_tally.as_deref_mut(),
        }
    }
}

/// Records every request the server still owed an answer as failed with `why`; returns how
/// many there were.
fn fail_unanswered(
    queue: &mut VecDeque<Pending>,
    open: &mut Batch,
    why: &str,
    rec: &SessionRecorder,
) -> usize {
    let mut batches: Vec<Batch> = queue
        .drain(..)
        .filter_map(|p| match p {
            Pending::Upstream { batch, .. } => Some(*batch),
            Pending::Own(_) | Pending::OwnReady | Pending::Barrier(_) => None,
        })
        .collect();
    batches.push(std::mem::take(open));
    let mut n = 0;
    for b in batches {
        for mut t in b.tallies.into_iter().chain(b.query_tally) {
            if t.error.is_none() {
                t.error = Some(format!("agentgate: {why} before answering"));
            }
            t.finish(rec);
            n += 1;
        }
    }
    n
}

/// The batch the server is answering now: the oldest one waiting for its ReadyForQuery, or
/// the one still open (answers to a Flush arrive before any Sync).
fn answering<'a>(queue: &'a mut VecDeque<Pending>, open: &'a mut Batch) -> &'a mut Batch {
    match queue.front_mut() {
        Some(Pending::Upstream { batch, .. }) => batch,
        _ => open,
    }
}

/// What the writer needs to end a running statement whose access ended.
struct Live {
    policy: Arc<PolicyStore>,
    identity: String,
    target: String,
    pg: agentgate_crds::target::PostgresTarget,
    /// The server's cancel key for this connection.
    key: Option<CancelKey>,
    /// Where the search path changes the server took are confirmed.
    path_confirmed: Arc<std::sync::atomic::AtomicU64>,
    /// The latest DDL whose transaction ended (see [`Ddl`]).
    ddl_settled: Arc<std::sync::atomic::AtomicU64>,
    /// Where a COPY FROM STDIN stands (the writer reports the server's answers).
    copy: Arc<tokio::sync::watch::Sender<CopyPhase>>,
}

/// Where the server stands with a COPY FROM STDIN, as the reader and the writer see it.
///
/// PostgreSQL reads every message after a `COPY … FROM STDIN` that started as COPY data: it
/// ignores Flush and Sync there, and ends the COPY with an error at any other message, which
/// it drops. The gateway must read them the same way, or an answer it then expects would
/// never come and every later answer would be matched with the wrong request (and masked by
/// the wrong rule). Whether the COPY started is the server's to say (its CopyInResponse);
/// until it said, the reader waits before it reads the next message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CopyPhase {
    /// No COPY FROM STDIN can be under way.
    Idle,
    /// A query holding COPY FROM was forwarded (or one of its COPYs ended) and the server
    /// has not answered yet: a COPY may start.
    Starting,
    /// The server sent CopyInResponse: it reads COPY data.
    Active,
}

/// DDL the session let through whose transaction may still be open: the catalog connection
/// cannot see what it created or replaced, so until a ReadyForQuery finds the session idle
/// after it, every function called is taken as one that may do anything (Exec).
#[derive(Default)]
struct Ddl {
    /// The number of the latest DDL let through.
    latest: u64,
    /// The latest whose transaction ended (the writer's).
    settled: Arc<std::sync::atomic::AtomicU64>,
    /// The latest after whose end the catalog's answers were forgotten.
    forgotten: u64,
    /// Relations the DDL let through since the last settled transaction created, as its
    /// statements name them: they hold only what statements checked here put in them.
    created: std::collections::HashSet<String>,
    /// That DDL made code the catalog cannot see yet (a function, an operator).
    code: bool,
}

impl Ddl {
    /// Numbers DDL in `c`, when it has some: the batch carrying it reports it.
    /// Code it creates (`CREATE FUNCTION`, `CREATE OPERATOR`, …: Exec) counts as DDL.
    fn note(&mut self, c: &Classified) -> Option<u64> {
        if !self.open() {
            self.created.clear();
            self.code = false;
        }
        let mut any = false;
        for s in c.statements.iter() {
            let code =
                s.class == agentgate_crds::OperationClass::Exec && s.tag.starts_with("CREATE");
            if s.class == agentgate_crds::OperationClass::Ddl || code {
                any = true;
                self.code |= code;
                self.created.extend(s.created.iter().cloned());
            }
        }
        any.then(|| {
            self.latest += 1;
            self.latest
        })
    }

    /// Whether DDL let through may still be uncommitted.
    fn open(&self) -> bool {
        self.settled.load(Ordering::Acquire) < self.latest
    }
}

/// How long the writer waits, after asking the server to cancel a statement whose access
/// ended, for the statement's answer before it closes the session anyway.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Live {
    /// Decides again the statement the server is running: the command a grant allowed it
    /// with (or, for a cursor's FETCH, its DECLARE's), else whether the session may go on at
    /// all (the identity disabled or gone, the policy lost). When it may not, asks the server
    /// to cancel it and returns why.
    fn check(&self, head: &Tally) -> Option<String> {
        let snapshot = self.policy.get();
        let now = crate::clock::now();
        let d = match head.command.as_deref() {
            Some(cmd) => {
                policy::decide(snapshot.as_deref(), &self.identity, &self.target, cmd, now)
            }
            None => {
                let probe = classify("SELECT 1").ok().map(|c| Command::from(&c))?;
                let d = policy::decide(
                    snapshot.as_deref(),
                    &self.identity,
                    &self.target,
                    &probe,
                    now,
                );
                if !matches!(
                    d.rule.as_str(),
                    "identity-disabled"
                        | "unknown-identity"
                        | "unknown-target"
                        | "policy-not-loaded"
                ) {
                    return None;
                }
                d
            }
        };
        if d.verdict == Verdict::Allow {
            return None;
        }
        tracing::info!(identity = %self.identity, target = %self.target, request = head.id, rule = %d.rule, reason = %d.message, "a running statement is canceled and its session closed: its access ended");
        if let Some(key) = self.key.clone() {
            let pg = self.pg.clone();
            tokio::spawn(async move {
                let sent = tokio::time::timeout(CANCEL_WAIT, upstream::cancel(&pg, &key)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    tracing::warn!(
                        "the cancel of a statement whose access ended did not reach the server; its connection is closed"
                    );
                }
            });
        }
        Some(policy::live::message(&d))
    }
}

/// The declared query of a cursor `c` reads from (FETCH, MOVE), when a grant allowed it.
fn granted_cursor<'a>(
    c: &Classified,
    cursors: &'a HashMap<String, Classified>,
    decide: &impl Fn(&Classified) -> Decision,
) -> Option<&'a Classified> {
    c.statements
        .iter()
        .flat_map(|st| st.flags.iter())
        .find_map(|f| match f {
            crate::sql::Flag::UseCursor(name) => cursors.get(name),
            _ => None,
        })
        .filter(|declared| decide(declared).grant.is_some())
}

/// The statement the server is answering now, if one is running.
fn running<'a>(queue: &'a VecDeque<Pending>, open: &'a Batch) -> Option<&'a Tally> {
    let batch = match queue.front() {
        Some(Pending::Upstream { batch, .. }) => batch,
        _ => open,
    };
    batch
        .tallies
        .front()
        .or(batch.query_tally.as_ref())
        .map(|t| &**t)
}

#[allow(clippy::too_many_arguments)]
async fn writer(
    rx: &mut mpsc::Receiver<Event>,
    mut up: BufReader<UpstreamRead>,
    mut agent: AgentWriter,
    masks: Arc<MaskSet>,
    catalog: Arc<Mutex<Catalog>>,
    rec: Arc<SessionRecorder>,
    mut params: Vec<Frame>,
    live: Live,
) -> Option<(Box<dyn upstream::Stream>, Vec<Frame>)> {
    let mut queue: VecDeque<Pending> = VecDeque::new();
    // While a statement runs it is decided again every second: when its access ended (the
    // grant it used expired or was revoked, the identity was disabled, the policy lost), the
    // server is asked to cancel it, and the session closes once it answered (or after 5 s).
    let mut live_tick = tokio::time::interval(std::time::Duration::from_secs(1));
    live_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing: Option<(String, std::time::Instant)> = None;
    let mut status = b'I';
    let mut formats: Vec<i16> = Vec::new();
    let mut types: Vec<u32> = Vec::new();
    // What was forwarded since the last Sync (its answer is not queued yet).
    let mut open = Batch::default();
    let mut field_rules: Vec<Option<crate::mask::Rule>> = Vec::new();
    let mut copy_out = false;
    // Values masked in the row being relayed, by rule.
    let mut masked_now: std::collections::BTreeMap<String, u64> = Default::default();
    let mut done = false;
    // The latest DDL answered so far.
    let mut ddl_seen = 0u64;
    loop {
        // Emit the gateway's own answers that are now at the head.
        loop {
            match queue.front() {
                Some(Pending::Own(_)) => {
                    if let Some(Pending::Own(frames)) = queue.pop_front()
                        && write_frames(&mut agent, &frames).await.is_err()
                    {
                        return None;
                    }
                }
                Some(Pending::Barrier(_)) => {
                    if let Some(Pending::Barrier(reached)) = queue.pop_front() {
                        let _ = reached.send(());
                    }
                }
                Some(Pending::OwnReady) => {
                    queue.pop_front();
                    if write_frames(&mut agent, &[backend::ready_for_query(status)])
                        .await
                        .is_err()
                    {
                        return None;
                    }
                }
                _ => break,
            }
        }
        if done && queue.is_empty() {
            let _ = agent.shutdown().await;
            return None;
        }
        // Biased: the reader's events for a request are queued before the request is sent
        // upstream, so they must be seen before any answer to it.
        tokio::select! {
            biased;
            ev = rx.recv(), if !done => match ev {
                Some(Event::ExpectUpstream) => queue.push_back(Pending::Upstream { swallow_ready: false, batch: Box::new(std::mem::take(&mut open)) }),
                Some(Event::ExpectUpstreamSwallowReady) => {
                    let mut batch = Box::new(std::mem::take(&mut open));
                    batch.refused = true;
                    queue.push_back(Pending::Upstream { swallow_ready: true, batch });
                }
                Some(Event::ExpectQuery(rule, tally, path_change, ddl, copy_from)) => {
                    let mut batch = Box::new(std::mem::take(&mut open));
                    batch.copy_from = copy_from;
                    batch.query = rule;
                    batch.query_tally = Some(tally);
                    batch.path_change = path_change;
                    batch.ddl = batch.ddl.max(ddl);
                    queue.push_back(Pending::Upstream { swallow_ready: false, batch });
                }
                Some(Event::Execute(rule, tally, path_change, transaction, ddl)) => {
                    open.ddl = open.ddl.max(ddl);
                    open.executes.push_back((rule, false));
                    open.tallies.push_back(tally);
                    open.path_change = open.path_change.max(path_change);
                    open.transaction |= transaction;
                }
                Some(Event::Describe { injected }) => open.describes.push_back(injected),
                Some(Event::Text(t)) => open.texts.push(t),
                Some(Event::CopyFailed(why)) => answering(&mut queue, &mut open).copy_failed = Some(why),
                Some(Event::Own(f)) => queue.push_back(Pending::Own(f)),
                Some(Event::OwnReady) => queue.push_back(Pending::OwnReady),
                Some(Event::Barrier(reached)) => queue.push_back(Pending::Barrier(reached)),
                Some(Event::Done(half)) => {
                    done = true;
                    if let Some(half) = half {
                        // Reusable when the server owes nothing, has nothing more buffered,
                        // and no transaction, COPY or extended-protocol batch is open.
                        let idle = queue.is_empty()
                            && status == b'I'
                            && !copy_out
                            && up.buffer().is_empty()
                            && open.executes.is_empty()
                            && open.describes.is_empty()
                            && open.tallies.is_empty()
                            && open.query_tally.is_none();
                        if idle {
                            let _ = agent.shutdown().await;
                            return Some((up.into_inner().unsplit(half), params));
                        }
                        // Answers are still owed (a client that did not wait for them, or a
                        // transaction is open): the server is told the session is over, so it
                        // ends once it has answered, rolling back what was not committed.
                        terminate(half);
                    }
                }
                None => done = true,
            },
            _ = live_tick.tick(), if closing.is_some() || running(&queue, &open).is_some() => {
                match &closing {
                    Some((why, since)) => {
                        if since.elapsed() >= CANCEL_WAIT {
                            let why = why.clone();
                            end_session(&mut agent, &mut queue, &mut open, &why, &rec).await;
                            return None;
                        }
                    }
                    None => {
                        if let Some(why) = running(&queue, &open).and_then(|t| live.check(t)) {
                            closing = Some((why, std::time::Instant::now()));
                        }
                    }
                }
                continue;
            }
            frame = read_frame(&mut up, MAX_MESSAGE) => {
                let frame = match frame {
                    Ok(Some(f)) => f,
                    Ok(None) | Err(_) => {
                        // The database went away (restart, crash, network): what it still
                        // owed is recorded as failed, the agent is told, and the session's
                        // end says why.
                        let why = "the database closed the connection";
                        let unanswered = fail_unanswered(&mut queue, &mut open, why, &rec);
                        if !done || unanswered > 0 {
                            let e = ErrorFields::fatal(sqlstate::CONNECTION_FAILURE, format!("agentgate: {why}"))
                                .hint("the transaction, if one was open, did not commit; connect again");
                            let _ = write_frames(&mut agent, &[e.to_error()]).await;
                        }
                        rec.end(why);
                        let _ = agent.shutdown().await;
                        return None;
                    }
                };
                let out = match frame.tag {
                    b'T' => {
                        let fields = match backend::decode_row_description(&frame) {
                            Ok(f) => f,
                            Err(_) => {
                                let e = ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, "agentgate: the database sent a malformed row description");
                                let _ = write_frames(&mut agent, &[e.to_error()]).await;
                                return None;
                            }
                        };
                        let batch = answering(&mut queue, &mut open);
                        let injected = batch.describes.pop_front().unwrap_or(false);
                        // Computed columns: the Execute's rule (after the gateway's own
                        // describe), else the simple query's.
                        let computed = if injected {
                            batch.executes.front_mut().and_then(|e| {
                                e.1 = true;
                                e.0.clone()
                            })
                        } else {
                            batch.query.clone()
                        };
                        formats = fields.iter().map(|x| x.format).collect();
                        types = fields.iter().map(|x| x.type_oid).collect();
                        field_rules.clear();
                        for f in &fields {
                            let rule = if !masks.has_column_rules() {
                                None
                            } else if f.table_oid != 0 {
                                match catalog.lock().await.rule(f.table_oid, f.column, &masks).await {
                                    Ok(rule) => rule,
                                    Err(e) => {
                                        let e = ErrorFields::fatal(sqlstate::CANNOT_CONNECT_NOW, format!("agentgate cannot tell which columns to mask ({e}); nothing is sent in clear"));
                                        let _ = write_frames(&mut agent, &[e.to_error()]).await;
                                        return None;
                                    }
                                }
                            } else {
                                computed.clone()
                            };
                            field_rules.push(rule);
                        }
                        if injected {
                            continue;
                        }
                        frame
                    }
                    // NoData: the gateway's own describe of a portal that returns no rows.
                    b'n' => {
                        let batch = answering(&mut queue, &mut open);
                        if batch.describes.pop_front().unwrap_or(false) {
                            if let Some(e) = batch.executes.front_mut() {
                                e.1 = true;
                            }
                            continue;
                        }
                        frame
                    }
                    // The settings that decide how the server reads the agent's text: the
                    // gateway classifies statements as a UTF-8 session with standard strings
                    // reads them. If something changed them anyway (a function that sets
                    // them), the server would from now on read the agent's next statements
                    // differently from how the gateway checks them: the session ends.
                    b'S' => match session_setting_breaks_parsing(&frame) {
                        Some(why) => {
                            let e = ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, format!("agentgate ends this session: {why}, so the server would read the next statements differently from how agentgate checks them"))
                                .hint("connect again; statements that change how strings are read are refused");
                            let _ = write_frames(&mut agent, &[e.to_error()]).await;
                            rec.end(&why);
                            let _ = agent.shutdown().await;
                            return None;
                        }
                        None => {
                            // What the next session on this connection is told at its start.
                            pool::replace_param(&mut params, frame.clone());
                            frame
                        }
                    },
                    b'H' => {
                        copy_out = true;
                        frame
                    }
                    // Before the agent hears of it: from now on its messages are COPY data.
                    b'G' => {
                        live.copy.send_replace(CopyPhase::Active);
                        frame
                    }
                    b'c' => {
                        copy_out = false;
                        frame
                    }
                    // COPY TO STDOUT rows: value rules on each line (column rules were checked
                    // before the COPY was allowed).
                    b'd' if copy_out && masks.has_value_rules() => {
                        match masks.mask(None, &String::from_utf8_lossy(&frame.body)).0 {
                            Masked::Clear => frame,
                            Masked::Text(t) => Frame::new(b'd', Bytes::from(t)),
                            Masked::Null => Frame::new(b'd', Bytes::from_static(b"\\N\n")),
                        }
                    }
                    // The end of an Execute's rows: the next rows are the next Execute's.
                    b'C' | b's' | b'I' => {
                        let batch = answering(&mut queue, &mut open);
                        if frame.tag == b'C'
                            && let Some(t) = batch.tally()
                        {
                            t.rows += command_rows(&frame);
                        }
                        if batch.executes.pop_front().is_some()
                            && let Some(t) = batch.tallies.pop_front()
                        {
                            t.finish(&rec);
                        }
                        frame
                    }
                    // After an error the server skips to the Sync: nothing more is answered.
                    b'E' => {
                        let batch = answering(&mut queue, &mut open);
                        batch.failed = true;
                        // The failure the gateway asked for, where it refused a message: the
                        // agent hears the gateway's own reason instead.
                        if batch.refused
                            && ErrorFields::decode(&frame).is_ok_and(|e| {
                                e.code == "34000" && e.message.contains(REFUSED_PORTAL)
                            })
                        {
                            continue;
                        }
                        // The statement agentgate canceled: the agent is told why, and so is
                        // the record.
                        // (The gateway's own words are not masked: they quote no value.)
                        let (frame, own) = match &closing {
                            Some((why, _)) if ErrorFields::decode(&frame).is_ok_and(|e| e.code == "57014") => {
                                if let Some(t) = batch.tally() {
                                    t.ended = Some(why.clone());
                                }
                                let ours = ErrorFields::error("57014", why.clone())
                                    .hint("the statement was canceled and the session closes; ask for a new grant, then connect again")
                                    .to_error();
                                (ours, true)
                            }
                            _ => match batch.copy_failed.take() {
                                Some(why) if ErrorFields::decode(&frame).is_ok_and(|e| e.code == "57014") => {
                                    (ErrorFields::error("57014", why).to_error(), true)
                                }
                                _ => (frame, false),
                            },
                        };
                        let error = error_summary(&frame);
                        if let Some(t) = batch.tally() {
                            t.error = Some(error);
                        }
                        if let Some(t) = batch.tallies.pop_front() {
                            t.finish(&rec);
                        }
                        for mut t in batch.tallies.drain(..) {
                            t.error = Some("not run: an earlier message of its batch failed".into());
                            t.finish(&rec);
                        }
                        batch.executes.clear();
                        batch.describes.clear();
                        if masks.is_empty() || own { frame } else { mask_error(&masks, &frame, &batch.texts) }
                    }
                    // Errors, notices and notifications can quote values too.
                    b'N' if !masks.is_empty() => mask_error(&masks, &frame, &answering(&mut queue, &mut open).texts),
                    b'A' if !masks.is_empty() => mask_notification(&masks, &frame),
                    // Rows of an Execute whose description the gateway has not seen: never
                    // sent (fail closed).
                    b'D' if !masks.is_empty()
                        && answering(&mut queue, &mut open)
                            .executes
                            .front()
                            .is_some_and(|e| !e.1) =>
                    {
                        let e = ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, "agentgate: rows arrived before their description; nothing is sent in clear");
                        let _ = write_frames(&mut agent, &[e.to_error()]).await;
                        return None;
                    }
                    b'D' if !masks.is_empty() => match data_row::mask(&masks, &frame, data_row::Formats::Described(&formats), &types, &field_rules, &mut masked_now) {
                        Some(f) => {
                            if !masked_now.is_empty()
                                && let Some(t) = answering(&mut queue, &mut open).tally()
                            {
                                for (rule, n) in std::mem::take(&mut masked_now) {
                                    *t.masked.entry(rule).or_default() += n;
                                }
                            }
                            f
                        }
                        None => {
                            let e = ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, "agentgate: the database sent a malformed row");
                            let _ = write_frames(&mut agent, &[e.to_error()]).await;
                            return None;
                        }
                    },
                    b'Z' => {
                        status = frame.body.first().copied().unwrap_or(b'I');
                        match queue.pop_front() {
                            Some(Pending::Upstream { swallow_ready, mut batch }) => {
                                if batch.copy_from {
                                    live.copy.send_replace(CopyPhase::Idle);
                                }
                                ddl_seen = ddl_seen.max(batch.ddl.unwrap_or(0));
                                if status == b'I' && ddl_seen > 0 {
                                    live.ddl_settled.fetch_max(ddl_seen, std::sync::atomic::Ordering::AcqRel);
                                }
                                if let Some(change) = batch.path_change
                                    && !batch.failed
                                    && !batch.transaction
                                    && status == b'I'
                                {
                                    live.path_confirmed.fetch_max(change, std::sync::atomic::Ordering::AcqRel);
                                }
                                if let Some(t) = batch.query_tally.take() {
                                    t.finish(&rec);
                                }
                                for mut t in batch.tallies.drain(..) {
                                    t.error.get_or_insert_with(|| "no answer before the end of its batch".into());
                                    t.finish(&rec);
                                }
                                if swallow_ready {
                                    continue;
                                }
                                frame
                            }
                            _ => frame,
                        }
                    }
                    _ => frame,
                };
                // Flush when the server has nothing more buffered (or the request is answered):
                // rows go out in batches, not one write each.
                let flush = out.tag == b'Z' || up.buffer().is_empty();
                if let Some(t) = answering(&mut queue, &mut open).tally() {
                    t.bytes_out += out.body.len() as u64 + 5;
                }
                let ready = out.tag == b'Z';
                if super::frame::write_frames_unflushed(&mut agent, &[out]).await.is_err()
                    || (flush && agent.flush().await.is_err())
                {
                    return None;
                }
                // The statement whose access ended has answered: the session closes.
                if ready && let Some((why, _)) = &closing {
                    let why = why.clone();
                    end_session(&mut agent, &mut queue, &mut open, &why, &rec).await;
                    return None;
                }
            }
        }
    }
}

/// Closes a session whose access ended: what the server still owed is recorded as ended,
/// the agent gets a FATAL error saying why, and the server connection is dropped (never
/// reused).
async fn end_session(
    agent: &mut AgentWriter,
    queue: &mut VecDeque<Pending>,
    open: &mut Batch,
    why: &str,
    rec: &SessionRecorder,
) {
    fail_unanswered(
        queue,
        open,
        why.strip_prefix("agentgate: ").unwrap_or(why),
        rec,
    );
    let e = ErrorFields::fatal("57P01", why.to_owned())
        .hint("ask for a new grant (or have the identity enabled), then connect again");
    let _ = write_frames(agent, &[e.to_error()]).await;
    rec.end(why);
    let _ = agent.shutdown().await;
}

/// Tells the server the session is over (Terminate, then the end of the stream) on a task
/// of its own, so relaying what the server still sends never waits for it; given up after
/// 30 s (the connection then closes without it).
fn terminate(mut half: UpstreamWrite) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            let _ = write_frames(&mut half, &[frontend::encode(&Frontend::Terminate)]).await;
            let _ = half.shutdown().await;
        })
        .await;
    });
}

/// Why a ParameterStatus from the server means the session no longer reads statements the
/// way the gateway parses them (UTF-8, standard-conforming strings), if it does.
fn session_setting_breaks_parsing(frame: &Frame) -> Option<String> {
    let mut b = frame.body.clone();
    let (Ok(name), Ok(value)) = (
        super::frame::cstring(&mut b, "ParameterStatus"),
        super::frame::cstring(&mut b, "ParameterStatus"),
    ) else {
        return Some("the database sent a malformed ParameterStatus".into());
    };
    let changed = match name.as_str() {
        "standard_conforming_strings" => !value.eq_ignore_ascii_case("on"),
        "client_encoding" => {
            let v = value.to_ascii_uppercase().replace(['-', '_'], "");
            v != "UTF8" && v != "UNICODE"
        }
        _ => false,
    };
    changed.then(|| format!("the database reports {name} = {value}"))
}

/// The rows a CommandComplete reports (`SELECT 5`, `INSERT 0 3`, `UPDATE 2`; 0 for others).
fn command_rows(frame: &Frame) -> u64 {
    let tag = frame.body.strip_suffix(b"\0").unwrap_or(&frame.body);
    std::str::from_utf8(tag)
        .ok()
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// An error as records keep it: its SQLSTATE and the condition's name, never the server's
/// message (messages quote values: `value "4111…" is out of range`, `syntax error at or near
/// "'secret'"`, whatever a `RAISE` says).
fn error_summary(frame: &Frame) -> String {
    let Ok(e) = ErrorFields::decode(frame) else {
        return "a malformed error".to_owned();
    };
    let name = match e.code.as_str() {
        "22001" => "string_data_right_truncation",
        "22003" => "numeric_value_out_of_range",
        "22007" => "invalid_datetime_format",
        "22012" => "division_by_zero",
        "22P02" => "invalid_text_representation",
        "23502" => "not_null_violation",
        "23503" => "foreign_key_violation",
        "23505" => "unique_violation",
        "23514" => "check_violation",
        "25P02" => "in_failed_sql_transaction",
        "40001" => "serialization_failure",
        "40P01" => "deadlock_detected",
        "42501" => "insufficient_privilege",
        "42601" => "syntax_error",
        "42703" => "undefined_column",
        "42883" => "undefined_function",
        "42P01" => "undefined_table",
        "57014" => "query_canceled",
        "P0001" => "raise_exception",
        c if c.starts_with("08") => "connection_exception",
        c if c.starts_with("22") => "data_exception",
        c if c.starts_with("23") => "integrity_constraint_violation",
        c if c.starts_with("42") => "syntax_error_or_access_rule_violation",
        c if c.starts_with("53") => "insufficient_resources",
        _ => "error",
    };
    let code: String = e
        .code
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(5)
        .collect();
    format!("{code} {name}")
}

/// An ErrorResponse or NoticeResponse with values masked: detectors on its texts; and when
/// columns are masked, the text of errors raised while the statement ran and of data and
/// constraint errors (classes 22 and 23, which quote the offending value: `invalid input
/// syntax for type integer: "ada@…"`, `Key (email)=(…) already exists`) is replaced,
/// keeping what kind of error it was.
fn mask_error(masks: &MaskSet, frame: &Frame, texts: &[Arc<str>]) -> Frame {
    let Ok(mut e) = ErrorFields::decode(frame) else {
        return ErrorFields::error(
            sqlstate::PROTOCOL_VIOLATION,
            "agentgate: the database sent a malformed error",
        )
        .to_error();
    };
    let text = |t: &str| match masks.mask(None, t).0 {
        Masked::Clear => t.to_owned(),
        Masked::Text(m) => m,
        Masked::Null => "(masked by agentgate)".to_owned(),
    };
    // While columns are masked, what an error quotes may be a value read from one
    // (`time zone "ada@example.com" not recognized`, `relation "Ada" does not exist` from
    // `name::regclass`): quoted text is hidden, except where the error points into the
    // agent's statement (a syntax error, a table or column it named that does not exist)
    // and the statement has the quoted text there. Errors about values read while running
    // carry no such position; a type's input function that parses the value itself
    // (`::regtype`) points into the value, where the statement does not have its text.
    let position = error_position(frame);
    let hide = masks.has_column_rules();
    // An error raised while the statement ran (it points at no place in the statement), or
    // about a value (classes 22 and 23), may quote a value in any form (`operator does not
    // exist: Ada_Lovelace` from `…::regoper`, `syntax error in tsquery: …`, the bytes of a
    // character that does not convert): only what kind of error it was is kept. A syntax
    // error is one too: the gateway forwards only statements that parse, so what the server
    // could not parse was a value (`::regtype` parses its input, and points into it).
    let runtime = position.is_none()
        || e.code.starts_with("22")
        || e.code.starts_with("23")
        || e.code == "42601";
    // The name written where the error points, in each of the batch's statements: up to the
    // next space, comma, semicolon or parenthesis, its double quotes dropped, lower-case.
    let at: Vec<String> = match position {
        Some(p) if !runtime => texts
            .iter()
            .map(|t| {
                t.chars()
                    .skip(p.saturating_sub(1))
                    .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | ';' | '(' | ')'))
                    .take(256)
                    .filter(|c| *c != '"')
                    .collect::<String>()
                    .to_lowercase()
            })
            .collect(),
        _ => Vec::new(),
    };
    let text = |t: &str| {
        let t = if hide {
            hide_quoted(t, &at)
        } else {
            t.to_owned()
        };
        text(&t)
    };
    if hide && runtime {
        e.message = match e.message.split_once(':') {
            Some((kind, _)) => format!(
                "{}: (the value is not shown: agentgate masks columns here)",
                hide_bytes(&text(kind))
            ),
            None => hide_numbers(&hide_bytes(&text(&e.message))),
        };
        e.detail = e
            .detail
            .map(|_| "(not shown: it may quote a masked value)".to_owned());
    } else {
        e.message = text(&e.message);
        e.detail = e.detail.as_deref().map(text);
    }
    e.hint = e.hint.as_deref().map(text);
    if frame.tag == b'N' {
        e.to_notice()
    } else {
        e.to_error()
    }
}

/// The position (1-based, in characters) an error points to in the statement, if it has
/// one (field `P`).
fn error_position(frame: &Frame) -> Option<usize> {
    let mut fields = frame.body.split(|b| *b == 0);
    fields.find_map(|f| {
        let (kind, value) = f.split_first()?;
        (*kind == b'P')
            .then(|| std::str::from_utf8(value).ok()?.parse().ok())
            .flatten()
    })
}

/// `text` with byte sequences (`0xd1 0x81`) hidden: an encoding error spells the bytes of
/// the character it could not convert.
fn hide_bytes(text: &str) -> String {
    text.split(' ')
        .map(|w| {
            let hex = w
                .strip_prefix("0x")
                .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if hex { "0x(hidden)" } else { w }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `text` with its numbers hidden: an error about a value may count with it (`index 85000
/// out of valid range`, from a value turned into a number).
fn hide_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_number = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('#');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out
}

/// `text` with what it quotes (`"…"`) hidden, unless it is the name the agent's statement
/// has where the error points (`names`, lower-case, without double quotes): the whole name
/// or one of its dotted parts, in any letter case (names are folded). Never a part of some
/// other text there: a comment at that place could list every character a value may have.
fn hide_quoted(text: &str, names: &[String]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut quoted = String::new();
    let mut inside = false;
    for c in text.chars() {
        if c == '"' {
            if inside {
                let lower = quoted.to_lowercase();
                let own = !quoted.is_empty()
                    && names
                        .iter()
                        .any(|n| *n == lower || n.split('.').any(|part| part == lower));
                if own {
                    out.push_str(&quoted);
                } else {
                    out.push_str("(hidden: agentgate masks columns here)");
                }
                quoted.clear();
            }
            inside = !inside;
            out.push(c);
        } else if inside {
            quoted.push(c);
        } else {
            out.push(c);
        }
    }
    if inside {
        out.push_str("(hidden)");
    }
    out
}

/// A NotificationResponse with its payload masked (detectors; the whole payload when columns
/// are masked, since it can carry anything a query read).
fn mask_notification(masks: &MaskSet, frame: &Frame) -> Frame {
    let malformed = || {
        ErrorFields {
            severity: "WARNING".into(),
            code: sqlstate::PROTOCOL_VIOLATION.into(),
            message: "agentgate dropped a malformed notification from the database".into(),
            ..Default::default()
        }
        .to_notice()
    };
    let mut b = frame.body.clone();
    if b.len() < 4 {
        return malformed();
    }
    let pid = b.split_to(4);
    let (Ok(channel), Ok(payload)) = (
        super::frame::cstring(&mut b, "NotificationResponse"),
        super::frame::cstring(&mut b, "NotificationResponse"),
    ) else {
        return malformed();
    };
    let payload = if masks.has_column_rules() {
        "(masked by agentgate)".to_owned()
    } else {
        match masks.mask(None, &payload).0 {
            Masked::Clear => payload,
            Masked::Text(m) => m,
            Masked::Null => String::new(),
        }
    };
    let mut out = bytes::BytesMut::new();
    out.extend_from_slice(&pid);
    for s in [channel, payload] {
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(&[0]);
    }
    Frame::new(b'A', out.freeze())
}

/// Why a `COPY … TO STDOUT` cannot be masked, if it cannot: it copies masked columns (COPY
/// carries no column origins, so the gateway refuses rather than guess), or it is binary while
/// value rules apply.
fn copy_out_refusal(
    masks: &MaskSet,
    c: &Classified,
    computed: Option<&crate::mask::Rule>,
) -> Option<String> {
    let copies: Vec<&crate::sql::Statement> =
        c.statements.iter().filter(|s| s.tag == "COPY TO").collect();
    if copies.is_empty() || masks.is_empty() {
        return None;
    }
    if let Some(rule) = computed {
        return Some(format!(
            "agentgate refuses COPY of columns masked by {}: SELECT them instead, where they are masked",
            rule.name
        ));
    }
    if masks.has_value_rules()
        && copies
            .iter()
            .any(|s| s.flags.contains(&crate::sql::Flag::CopyBinary))
    {
        return Some(
            "agentgate refuses binary COPY while masking applies: use the text or CSV format"
                .into(),
        );
    }
    None
}

/// Why `c` is refused when one of its statements changes something (it writes, or is DDL or
/// a privilege change) and reads a masked column: the
/// value it reads could be stored where no rule masks it (`INSERT … SELECT email`, `UPDATE …
/// SET note = c.card`, `CREATE TABLE … AS`, a write in a `WITH` query,
/// `set_config(…, email, …)`) and read back in clear, or returned by `RETURNING` under
/// another column's name. `computed` is the rule for what the whole text reads. `Err`: the
/// catalog could not say (refused too). (Exec and Admin run code whatever it reads: an
/// approver decides those.)
async fn stores_masked(
    catalog: &Mutex<Catalog>,
    masks: &MaskSet,
    c: &Classified,
    computed: Option<&crate::mask::Rule>,
    path: &mut SearchPath,
    created: &std::collections::HashSet<String>,
) -> Result<Option<String>, String> {
    use agentgate_crds::OperationClass;
    // A write that stores values (not a row lock, not a DELETE: what they return is masked
    // as a query's rows are), DDL, a privilege change.
    let changes = |s: &crate::sql::Statement| match s.class {
        // Only a row lock (`SELECT … FOR UPDATE`) or a DELETE stores nothing; a function
        // that writes (`lo_from_bytea`, `setval`) does.
        OperationClass::Write => {
            s.flags.contains(&crate::sql::Flag::StoresValues)
                || s.flags
                    .iter()
                    .any(|f| matches!(f, crate::sql::Flag::Function(_)))
                || !matches!(s.tag.as_str(), "SELECT" | "DELETE")
        }
        OperationClass::Ddl | OperationClass::Privilege => true,
        _ => false,
    };
    if !c.statements.iter().any(changes) || !masks.has_column_rules() {
        return Ok(None);
    }
    let refuse = |class: OperationClass, rule: &crate::mask::Rule| {
        format!(
            "agentgate refuses this statement (class {class}): it reads columns masked by {} and may store what it reads where it is not masked; name rows by columns that are not masked, and write values of your own",
            rule.name
        )
    };
    // A relation the catalog connection cannot see that this session created in its open
    // transaction holds only what statements checked here put in it: no masked column's.
    // (Any other it cannot see, renamed or replaced there, is judged masked.)
    let mut unseen = Vec::new();
    for st in c.statements.iter().filter(|s| changes(s)) {
        for r in &st.relations {
            if created.contains(r) && !catalog.lock().await.sees(r, masks).await? {
                unseen.push(r.clone());
            }
        }
    }
    if c.statements.len() == 1 && unseen.is_empty() {
        return Ok(computed.map(|rule| refuse(c.class, rule)));
    }
    for st in c.statements.iter().filter(|s| changes(s)) {
        let class = st.class;
        let mut st = st.clone();
        st.relations.retain(|r| !unseen.contains(r));
        let one = Classified {
            statements: Arc::new(vec![st]),
            ..c.clone()
        };
        if let Some(rule) = computed_for(catalog, masks, &one, path).await? {
            return Ok(Some(refuse(class, &rule)));
        }
    }
    Ok(None)
}

fn refusal(d: &Decision, c: Option<&Classified>) -> ErrorFields {
    let what = c
        .map(|c| {
            c.statements
                .iter()
                .map(|s| s.tag.clone())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    match d.verdict {
        // The audit trail cannot take the record: nothing runs unrecorded.
        _ if d.rule == "audit" => ErrorFields::error(sqlstate::INSUFFICIENT_RESOURCES, d.message.clone())
            .hint("commands resume when the audit sinks catch up; the sidecar's log says which one fails"),
        // A COPY out of masked columns.
        _ if d.rule == "mask" => ErrorFields::error(sqlstate::INSUFFICIENT_PRIVILEGE, d.message.clone()),
        Verdict::Hold => ErrorFields::error(
            sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("held for approval: {}", d.message),
        )
        .detail(format!(
            "{what} was not run. It runs once an AccessGrant bound to this exact command (fingerprint {}) is approved.",
            c.map(|c| c.fingerprint.get()).unwrap_or("")
        ))
        .hint("ask an approver to approve the grant request, then run the command again"),
        _ => ErrorFields::error(sqlstate::INSUFFICIENT_PRIVILEGE, format!("agentgate: {}", d.message))
            .detail(format!("{what} was refused by rule {}", d.rule)),
    }
}

/// SQL `PREPARE` makes statements the gateway's maps do not name (a protocol Parse of the
/// same name would then be rejected by the server while the gateway recorded it): refused.
fn sql_prepare(c: &Classified) -> Option<ErrorFields> {
    c.statements.iter().any(|s| s.tag == "PREPARE").then(|| {
        ErrorFields::error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "agentgate: SQL PREPARE is not supported; drivers prepare statements with the protocol (Parse), which works",
        )
    })
}

/// Files an approval request for a held command, then waits as long as the Target's
/// `holdTimeout` says (0s: answer at once) for an approver. Returns the decision after the wait
/// and the request filed.
#[allow(clippy::too_many_arguments)]
async fn hold(
    gw: &Gateway,
    identity: &str,
    target: &str,
    c: &Classified,
    sql: &str,
    masks: &MaskSet,
    mut d: Decision,
    decide: &impl Fn(&Classified) -> Decision,
    cancel: &HoldCancel,
) -> (Decision, Result<Filed, String>) {
    // A cancel from now on (also while the request is being filed) ends the hold.
    let cancels_before = cancel.count();
    // The approver reads the command with sensitive values masked.
    let text = match masks.mask(None, sql).0 {
        Masked::Text(t) => t,
        _ => sql.to_owned(),
    };
    let snapshot = gw.policy.get();
    let filed = gw
        .approvals
        .file(
            snapshot.as_deref(),
            &Request {
                identity,
                target,
                class: c.class,
                fingerprint: c.fingerprint.get(),
                text: &text,
                rule: &d.rule,
                message: &d.message,
            },
        )
        .await;
    if let Err(e) = &filed {
        tracing::warn!(identity, target, error = %e, "could not file an approval request");
        return (d, filed);
    }
    let wait = crate::policy::approval::hold_timeout(snapshot.as_deref(), target);
    let deadline = std::time::Instant::now() + wait;
    let name = filed.as_ref().map(|f| f.name.clone()).unwrap_or_default();
    // The client is watched while it waits: one that goes away must not have its statement
    // run by a later approval. Its socket is asked whether its end closed (`POLLRDHUP`),
    // nothing is read from it: pipelined messages after this one stay where they are.
    while std::time::Instant::now() < deadline && d.verdict == Verdict::Hold {
        let woken = tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => false,
            _ = cancel.wake.notified() => true,
        };
        if cancel.client_gone() {
            tracing::info!(identity, target, grant = %name, "held command's client went away while it waited");
            return (client_gone(&name, "stays as it is"), filed);
        }
        if woken || cancel.count() != cancels_before {
            tracing::info!(identity, target, grant = %name, "held command canceled by the client");
            return (
                Decision {
                    verdict: Verdict::Refuse,
                    rule: "canceled".into(),
                    grant: Some(name.clone()),
                    message: format!(
                        "canceling statement due to user request: it was held for approval and was not run; AccessGrant {name} stays pending"
                    ),
                },
                filed,
            );
        }
        d = decide(c);
        if d.verdict == Verdict::Hold
            && let Some(denied) = gw
                .policy
                .get()
                .and_then(|s| crate::policy::approval::denial(&s, identity, &name))
        {
            d = Decision {
                verdict: Verdict::Refuse,
                rule: "denied".into(),
                grant: Some(name.clone()),
                message: denied,
            };
        }
    }
    // Gone between the last look and the approval: not run either.
    if d.verdict == Verdict::Allow && cancel.client_gone() {
        return (client_gone(&name, "was approved and is unused"), filed);
    }
    if d.verdict == Verdict::Allow {
        tracing::info!(identity, target, grant = ?d.grant, "held command approved: running it");
    }
    (d, filed)
}

/// The refusal of a held statement whose client went away while it waited.
fn client_gone(grant: &str, state: &str) -> Decision {
    Decision {
        verdict: Verdict::Refuse,
        rule: "client-gone".into(),
        grant: Some(grant.to_owned()),
        message: format!(
            "the client disconnected while it waited for approval; the statement was not run; AccessGrant {grant} {state}"
        ),
    }
}

/// The error for a refused or still-held command, naming the request filed for it.
fn held_refusal(
    d: &Decision,
    c: &Classified,
    filed: Option<&Result<Filed, String>>,
) -> ErrorFields {
    if d.rule == "canceled" {
        return ErrorFields::error(sqlstate::QUERY_CANCELED, d.message.clone());
    }
    let mut err = refusal(d, Some(c));
    if d.verdict != Verdict::Hold {
        return err;
    }
    match filed {
        Some(Ok(req)) => {
            err.message = format!("held for approval: AccessGrant {}; {}", req.name, d.message);
            err.hint = Some(req.how_to_approve.clone());
        }
        Some(Err(e)) => {
            err.hint = Some(format!(
                "agentgate could not file the approval request ({e}); run the statement again once it can be (requests bound to one command are filed by the gateway)"
            ));
        }
        None => {}
    }
    err
}

/// Refuses a message of an extended-protocol batch. The part of the batch already forwarded is
/// ended with a Sync of the gateway's own (the server's ReadyForQuery to it is swallowed),
/// then the refusal follows; the agent's own Sync later gets the gateway's ReadyForQuery.
async fn refuse_in_batch(
    up: &mut BufWriter<tokio::io::WriteHalf<Box<dyn upstream::Stream>>>,
    tx: &mpsc::Sender<Event>,
    in_batch: bool,
    err: ErrorFields,
) -> Result<(), FrameError> {
    if in_batch {
        // What was forwarded of the batch must not take effect without the rest: the server
        // is made to fail the batch here (as it would have failed at a statement it could
        // not run), so an implicit transaction rolls back and an explicit one is aborted.
        tx.send(Event::ExpectUpstreamSwallowReady).await.ok();
        write_frames(
            up,
            &[
                frontend::encode(&Frontend::Execute {
                    portal: REFUSED_PORTAL.to_owned(),
                    max_rows: 0,
                }),
                frontend::encode(&Frontend::Sync),
            ],
        )
        .await?;
    }
    // What was forwarded but not yet flushed must reach the server, or its answers (which
    // this refusal is queued behind) never come.
    up.flush().await?;
    tx.send(Event::Own(vec![err.to_error()])).await.ok();
    Ok(())
}

/// Classes the functions `c` calls that the classifier does not know by the catalog (see
/// [`Catalog::check_functions`]); `Some` says why that cannot be done, and the statement is
/// refused.
async fn check_functions(
    catalog: &Mutex<Catalog>,
    c: &mut Classified,
    path: &mut SearchPath,
    ddl: &mut Ddl,
) -> Option<String> {
    if !ddl.open() && ddl.latest > ddl.forgotten {
        // Its transaction ended: what the catalog said before it is forgotten.
        catalog.lock().await.forget();
        ddl.forgotten = ddl.latest;
    }
    catalog.lock().await.set_ddl_open(ddl.open());
    if !c.needs_catalog_check() {
        return None;
    }
    if ddl.open()
        || c.statements
            .iter()
            .any(|s| s.class == agentgate_crds::OperationClass::Ddl)
    {
        // DDL in this string, or let through in a transaction that may still be open: the
        // catalog connection does not see what it created, renamed or replaced, so whatever
        // is called may be anything (built-in names included).
        let keep = |s: &&crate::sql::Statement| {
            s.class != agentgate_crds::OperationClass::Ddl || runs_query(s)
        };
        let called: Vec<String> = c
            .statements
            .iter()
            .filter(keep)
            .flat_map(|s| s.functions.iter())
            .cloned()
            .collect();
        for f in called {
            crate::sql::classify::raise_function(c, &f, agentgate_crds::OperationClass::Exec);
        }
        // Operators too once the open transaction made code (`CREATE OPERATOR`, a function
        // behind one) the catalog cannot see; otherwise it sees every operator there is.
        if ddl.open() && ddl.code {
            let operators: Vec<(String, String)> = c
                .statements
                .iter()
                .filter(keep)
                .flat_map(|s| s.operators.iter())
                .cloned()
                .collect();
            for (schema, op) in operators {
                crate::sql::classify::raise_operator(
                    c,
                    &schema,
                    &op,
                    agentgate_crds::OperationClass::Exec,
                );
            }
        }
    }
    // A path with a schema before pg_catalog: a built-in's name may call another function.
    let all = path.catalog_later_for(c);
    catalog.lock().await.check_functions(c, all).await.err().map(|e| {
        format!("agentgate cannot tell what the functions this statement calls do ({e}); it is not run")
    })
}

/// The rule for the computed output columns of `c` (see [`Catalog::computed_rule`]); `Err`
/// says why it cannot be told, and the statement is refused.
async fn computed_for(
    catalog: &Mutex<Catalog>,
    masks: &MaskSet,
    c: &Classified,
    path: &mut SearchPath,
) -> Result<Option<crate::mask::Rule>, String> {
    if !masks.has_column_rules() {
        return Ok(None);
    }
    let why = |e: String| {
        format!("agentgate cannot tell which columns to mask ({e}); nothing is sent in clear")
    };
    // What a statement creates (`CREATE TABLE t …`, `… AS`, `SELECT … INTO t`) is not read
    // by it, and does not exist yet for the catalog.
    // (Where it runs a query, only a name the catalog does not see yet: `CREATE TABLE
    // customers AS SELECT … FROM customers` may read a relation of the name it creates, in
    // another schema.)
    let stripped;
    let c = if c.statements.iter().any(|s| !s.created.is_empty()) {
        let mut own = c.clone();
        for st in Arc::make_mut(&mut own.statements) {
            let created = std::mem::take(&mut st.created);
            let mut keep = Vec::new();
            for r in &created {
                if runs_query(st) && catalog.lock().await.sees(r, masks).await? {
                    keep.push(r.clone());
                }
            }
            st.relations
                .retain(|r| !created.contains(r) || keep.contains(r));
            st.created = created;
        }
        stripped = own;
        &stripped
    } else {
        c
    };
    // The catalog reads names on its own connection's default path: they are resolved on
    // the session's paths first (its own connection's, and any it set since). A name that
    // may be more than one relation, or whose schema cannot be told, masks every computed
    // value.
    let mut statements = std::borrow::Cow::Borrowed(&**c.statements);
    if c.statements.iter().any(|s| {
        s.relations
            .iter()
            .any(|r| crate::sql::classify::unqualified(r).is_some())
    }) && (path.initial_known() || path.changed_for(c))
    {
        let mut resolved = c.clone();
        path.resolve(catalog, &mut resolved).await.map_err(why)?;
        match qualified_statements(&resolved) {
            Some(s) => statements = std::borrow::Cow::Owned(s),
            None => {
                if let Some(why) = schema_change_on_masked(masks, &c.statements) {
                    return Err(why);
                }
                return Ok(masks
                    .first_column_rule()
                    .map(crate::mask::Rule::for_computed));
            }
        }
    }
    if let Some(why) = schema_change_on_masked(masks, &statements) {
        return Err(why);
    }
    catalog
        .lock()
        .await
        .computed_rule(masks, &statements)
        .await
        .map_err(why)
}

/// Why a statement that changes the schema or privileges (class DDL or above) of a relation
/// with masked columns is refused: rules name columns, so a renamed column, a changed type,
/// a dropped and recreated table, a rule or policy, or a grant could move the values out of
/// them. A name the session's path did not resolve is taken as `public`'s (the default
/// path's).
fn schema_change_on_masked(
    masks: &MaskSet,
    statements: &[crate::sql::Statement],
) -> Option<String> {
    // Rules name schemas too: renaming, dropping or moving a schema (or moving a table to
    // another) could move every table in it out of them.
    if let Some(s) = statements.iter().find(|s| {
        s.class >= agentgate_crds::OperationClass::Ddl
            && (s.tag == "ALTER SET SCHEMA"
                || s.tag == "DROP SCHEMA"
                || (s.tag == "ALTER RENAME" && s.relations.is_empty())
                || s.tag == "ALTER OWNER")
    }) && let Some(rule) = masks.first_column_rule()
    {
        return Some(format!(
            "agentgate refuses {} while columns are masked (by {} and others): rules name schemas, tables and columns, and this change could move their values out of them; an administrator makes it",
            s.tag, rule.name
        ));
    }
    statements
        .iter()
        // (A query whose class comes from a function it calls is not a schema change: what
        // it reads is judged by [`stores_masked`].)
        .filter(|s| {
            s.class >= agentgate_crds::OperationClass::Ddl
                && !matches!(
                    s.tag.as_str(),
                    "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "VALUES"
                )
        })
        .find_map(|s| {
            s.relations.iter().find_map(|r| {
                let (schema, table) = match crate::sql::classify::relation_parts(r) {
                    (s, t) if s.is_empty() => ("public".to_owned(), t),
                    parts => parts,
                };
                let rule = masks.table_rule(&schema, &table)?;
                Some(format!(
                    "agentgate refuses {} on {r}: its columns are masked by {}, and a change to it could move their values out of the rules; an administrator changes masked tables",
                    s.tag, rule.name
                ))
            })
        })
}

/// `c`'s statements with their unqualified relation names replaced by what they resolved to
/// (relations, aliases, and a table's own name used as a qualifier), or `None` when a name
/// may be more than one relation or its schema cannot be told.
fn qualified_statements(c: &Classified) -> Option<Vec<crate::sql::Statement>> {
    use crate::sql::classify::unqualified;
    let Some(map) = &c.resolved else {
        return Some(c.statements.to_vec());
    };
    let one = |r: &str| match map.get(r) {
        Some(Ok(list)) if list.len() == 1 => Some(list[0].clone()),
        _ => None,
    };
    let mut out = c.statements.to_vec();
    for st in &mut out {
        let mut relations = std::collections::BTreeSet::new();
        for r in &st.relations {
            match unqualified(r) {
                None => {
                    relations.insert(r.clone());
                }
                Some(table) => {
                    let q = one(r)?;
                    st.aliases.add(table, q.clone());
                    relations.insert(q);
                }
            }
        }
        for target in st.aliases.values_mut() {
            if unqualified(target).is_some() {
                *target = one(target)?;
            }
        }
        st.relations = relations;
    }
    Some(out)
}

/// Whether a DDL statement runs a query as it is made (`CREATE TABLE … AS`, `SELECT …
/// INTO`, a materialized view), calling what the query calls.
fn runs_query(s: &crate::sql::Statement) -> bool {
    matches!(
        s.tag.as_str(),
        "SELECT INTO"
            | "CREATE TABLE AS"
            | "CREATE MATERIALIZED VIEW"
            | "REFRESH MATERIALIZED VIEW"
    )
}

/// Decides `c`, with its unqualified relation names resolved on the session's search path
/// when the decision depends on them: some scope of the identity names tables (`scoped`),
/// or the statement would be held (the grant a hold asks for then names the tables the
/// server would use). The second value says why the names could not be resolved (the
/// statement is then refused).
async fn decide_names(
    path: &mut SearchPath,
    catalog: &Mutex<Catalog>,
    scoped: bool,
    c: &mut Classified,
    decide: &impl Fn(&Classified) -> Decision,
) -> (Decision, Option<String>) {
    if scoped && let Err(e) = path.resolve(catalog, c).await {
        return (decide(c), Some(names_refusal(e)));
    }
    let d = decide(c);
    if d.verdict != Verdict::Hold || c.resolved.is_some() {
        return (d, None);
    }
    match path.resolve(catalog, c).await {
        Ok(()) if c.resolved.is_some() => (decide(c), None),
        Ok(()) => (d, None),
        Err(e) => (d, Some(names_refusal(e))),
    }
}

/// Why a statement whose names could not be resolved is refused.
fn names_refusal(e: String) -> String {
    format!("cannot tell which tables this statement names ({e}); it is not run")
}

/// Follows a statement let through on the session's search path; a change of a role's or a
/// database's default settings also empties the pool (its connections have the old ones).
/// After DDL, what is known of functions is forgotten (one may have been created or
/// replaced). Returns the change for the writer to confirm (see [`SearchPath::observe`]).
async fn follow_path(
    gw: &Gateway,
    path: &mut SearchPath,
    catalog: &Mutex<Catalog>,
    c: &Classified,
    by_server: bool,
) -> Option<u64> {
    if c.statements
        .iter()
        .any(|s| matches!(s.tag.as_str(), "ALTER ROLE SET" | "ALTER DATABASE SET"))
    {
        gw.pool.clear();
    }
    // DDL, and what may run DDL of its own (a DO block, CALL, CREATE EXTENSION): functions
    // and views may have been created or replaced.
    if c.statements.iter().any(|s| {
        matches!(
            s.class,
            agentgate_crds::OperationClass::Ddl
                | agentgate_crds::OperationClass::Admin
                | agentgate_crds::OperationClass::Exec
        )
    }) {
        catalog.lock().await.forget();
    }
    path.observe(c, by_server)
}

/// Whether how the server reads `sql` depends on session settings the agent could change
/// with what ran before it: a backslash (read as an escape in a string once
/// `standard_conforming_strings` is off) or a non-ASCII byte (read by `client_encoding`).
/// Text without either reads the same under every setting the server accepts.
fn reads_by_settings(sql: &str) -> bool {
    sql.bytes().any(|b| b == b'\\' || !b.is_ascii())
}

/// Waits until the server answered everything forwarded before (the settings it reported
/// with those answers checked by the writer, which ends the session when they changed how
/// strings are read), so the next statement is checked as the server will read it.
async fn settled(
    up: &mut BufWriter<UpstreamWrite>,
    tx: &mpsc::Sender<Event>,
) -> Result<(), FrameError> {
    let (reached, wait) = tokio::sync::oneshot::channel();
    if tx.send(Event::Barrier(reached)).await.is_err() {
        return Err(session_over());
    }
    up.flush().await?;
    wait.await.map_err(|_| session_over())
}

fn session_over() -> FrameError {
    FrameError::Io(std::io::Error::other(
        "the session ended while a statement waited for the answers before it",
    ))
}

/// Sends a message upstream, flushing only when the agent has nothing more waiting (a
/// pipelined batch goes out in one write).
async fn forward(
    up: &mut BufWriter<tokio::io::WriteHalf<Box<dyn upstream::Stream>>>,
    flush: bool,
    frame: Frame,
) -> Result<(), FrameError> {
    super::frame::write_frames_unflushed(up, &[frame]).await?;
    if flush {
        up.flush().await?;
    }
    Ok(())
}

/// The server's side of a session, split between the writer (reads) and the reader
/// (writes).
type UpstreamRead = tokio::io::ReadHalf<Box<dyn upstream::Stream>>;
/// The server's side the reader writes to.
type UpstreamWrite = tokio::io::WriteHalf<Box<dyn upstream::Stream>>;

/// Reads the agent's messages, decides, forwards. When the agent ended the session cleanly
/// (Terminate outside any COPY or extended-protocol batch) the upstream's write side goes to
/// the writer with the end, which keeps the connection for reuse when the server owes
/// nothing; otherwise it is shut.
#[allow(clippy::too_many_arguments)]
async fn reader(
    gw: &Gateway,
    identity: (&str, Option<&crate::identity::Verified>),
    target: &str,
    agent: BufReader<tokio::io::ReadHalf<AgentStream>>,
    up: UpstreamWrite,
    tx: mpsc::Sender<Event>,
    masks: Arc<MaskSet>,
    catalog: Arc<Mutex<Catalog>>,
    cancel: Arc<HoldCancel>,
    rec: &SessionRecorder,
    names: (SearchPath, Ddl, Arc<tokio::sync::watch::Sender<CopyPhase>>),
) -> Result<(), FrameError> {
    let mut up = BufWriter::new(up);
    let r = read_agent(
        gw, identity, target, agent, &mut up, &tx, masks, catalog, cancel, rec, names,
    )
    .await;
    let half = if matches!(r, Ok(true)) && up.flush().await.is_ok() {
        Some(up.into_inner())
    } else {
        let _ = up.shutdown().await;
        None
    };
    let _ = tx.send(Event::Done(half)).await;
    r.map(|_| ())
}

/// Whether a token-begun session still mapped to its identity, under one policy snapshot.
type MappedIn = (Arc<policy::Snapshot>, Result<(), String>);

/// The reader's loop: `Ok(true)` when the agent sent Terminate with nothing left open.
#[allow(clippy::too_many_arguments)]
async fn read_agent(
    gw: &Gateway,
    (identity, token): (&str, Option<&crate::identity::Verified>),
    target: &str,
    mut agent: BufReader<tokio::io::ReadHalf<AgentStream>>,
    mut up: &mut BufWriter<UpstreamWrite>,
    tx: &mpsc::Sender<Event>,
    masks: Arc<MaskSet>,
    catalog: Arc<Mutex<Catalog>>,
    cancel: Arc<HoldCancel>,
    rec: &SessionRecorder,
    (mut path, mut ddl, copy): (SearchPath, Ddl, Arc<tokio::sync::watch::Sender<CopyPhase>>),
) -> Result<bool, FrameError> {
    // Prepared statements' classifications, for Execute-time checks.
    let mut statements: HashMap<String, Classified> = HashMap::new();
    // Portals → what their statement was when they were bound: a statement parsed again
    // under the same name (the unnamed one) after the Bind does not change what the portal
    // runs.
    let mut portals: HashMap<String, Option<Classified>> = HashMap::new();
    let mut skip_until_sync = false;
    // Names are never reused: the gateway's maps must name what the server has, and a Parse
    // or Bind the server rejects (a duplicate name) or skips (after an error earlier in the
    // batch) would otherwise leave them naming something else.
    let mut used_statements: std::collections::HashSet<String> = Default::default();
    let mut used_portals: std::collections::HashSet<String> = Default::default();
    // The unnamed statement was parsed after other messages of its batch: the server may
    // have skipped that Parse and kept the previous one.
    let mut unnamed_uncertain = false;
    let mut in_batch = false;
    // A Bind or an Execute was forwarded since the last Sync: what it ran may have changed
    // settings the server reports only at the Sync's ReadyForQuery.
    let mut executed_in_batch = false;
    let mut copy_phase = copy.subscribe();
    // Asked for every statement: answered once per policy snapshot.
    let mut scoped_in: Option<(Arc<policy::Snapshot>, bool)> = None;
    let mut table_scoped = || {
        let Some(s) = gw.policy.get() else {
            return false;
        };
        match &scoped_in {
            Some((seen, v)) if Arc::ptr_eq(seen, &s) => *v,
            _ => {
                let v = policy::table_scoped(&s, identity, target);
                scoped_in = Some((s, v));
                v
            }
        }
    };
    // A command runs only when its record can be taken (fail closed).
    let admitted = |d: Decision| -> Decision {
        if d.verdict == Verdict::Refuse {
            return d;
        }
        match rec.auditor().admit() {
            Ok(()) => d,
            Err(why) => Decision {
                verdict: Verdict::Refuse,
                rule: "audit".into(),
                grant: None,
                message: why,
            },
        }
    };
    // Records the request; a record that cannot be taken refuses it.
    let recorded = |id: u64, sql: &str, c: Option<&Classified>, via: &str, d: Decision| {
        match records::request(rec, id, sql, c, via, &d) {
            Ok(()) => d,
            Err(why) if d.verdict != Verdict::Refuse => Decision {
                verdict: Verdict::Refuse,
                rule: "audit".into(),
                grant: None,
                message: why,
            },
            Err(_) => d,
        }
    };
    // A session begun with a token: does it still map to the identity? Asked once per
    // policy snapshot.
    let mapped: std::sync::Mutex<Option<MappedIn>> = Default::default();
    let still_mapped = |snapshot: &Arc<policy::Snapshot>| -> Result<(), String> {
        let (Some(v), Some(verifier)) = (token, gw.verifier.as_ref()) else {
            return Ok(());
        };
        let mut memo = mapped.lock().unwrap_or_else(|p| p.into_inner());
        match &*memo {
            Some((seen, r)) if Arc::ptr_eq(seen, snapshot) => r.clone(),
            _ => {
                let r = verifier.still_maps(v, snapshot);
                *memo = Some((snapshot.clone(), r.clone()));
                r
            }
        }
    };
    let decide = |c: &Classified| {
        // The token must still stand: unexpired, and accepted by the API server when it is a
        // service account's.
        if let (Some(v), Some(verifier)) = (token, gw.verifier.as_ref())
            && let Err(why) = verifier.still_valid(v)
        {
            return Decision {
                verdict: Verdict::Refuse,
                rule: "token-ended".into(),
                grant: None,
                message: format!("agentgate: {why}"),
            };
        }
        let snapshot = gw.policy.get();
        if let Some(s) = &snapshot
            && let Err(why) = still_mapped(s)
        {
            return Decision {
                verdict: Verdict::Refuse,
                rule: "identity-changed".into(),
                grant: None,
                message: format!(
                    "agentgate: this session's token no longer maps to AgentIdentity {identity} ({why}); connect again"
                ),
            };
        }
        let mut d = policy::decide(
            snapshot.as_deref(),
            identity,
            target,
            &Command::from(c),
            crate::clock::now(),
        );
        // Say why the policy is gone (a broken watch, a bad folder), not only that it is.
        if snapshot.is_none()
            && let Some(why) = gw.policy.error()
        {
            d.message = format!("agentgate refuses everything until its policy is loaded: {why}");
        }
        d
    };
    // Cursors the agent declared: their queries run as their rows are fetched, so each
    // FETCH or MOVE is decided again as the DECLARE was (a grant that ended stops it).
    let mut cursors: HashMap<String, Classified> = HashMap::new();
    let cursor_refusal = |c: &Classified, cursors: &HashMap<String, Classified>| {
        c.statements
            .iter()
            .flat_map(|st| st.flags.iter())
            .find_map(|f| match f {
                crate::sql::Flag::UseCursor(name) => {
                    let declared = cursors.get(name)?;
                    let d = decide(declared);
                    (d.verdict != Verdict::Allow).then(|| Decision {
                        verdict: Verdict::Refuse,
                        rule: d.rule.clone(),
                        grant: None,
                        message: format!(
                            "the query of cursor {name} is no longer allowed: {}",
                            d.message
                        ),
                    })
                }
                _ => None,
            })
    };
    // Cursors and portals share the server's names: a cursor may never take the name the
    // gateway fails batches with (see [`REFUSED_PORTAL`]), whatever else is decided.
    let reserved_cursor = |c: &Classified| {
        c.statements
            .iter()
            .flat_map(|st| st.flags.iter())
            .any(|f| matches!(f, crate::sql::Flag::DeclareCursor(name) if name.starts_with('\u{1}')))
            .then(|| Decision {
                verdict: Verdict::Refuse,
                rule: "protocol".into(),
                grant: None,
                message: "agentgate reserves cursor and portal names that begin with the byte 0x01; declare the cursor under another name".into(),
            })
    };
    let remember_cursors = |c: &Classified, cursors: &mut HashMap<String, Classified>| {
        for st in c.statements.iter() {
            for f in &st.flags {
                if let crate::sql::Flag::DeclareCursor(name) = f {
                    cursors.insert(name.clone(), c.clone());
                }
            }
        }
    };

    loop {
        let frame = match read_frame(&mut agent, MAX_MESSAGE).await {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(false),
            Err(e) => {
                let err =
                    ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, format!("agentgate: {e}"));
                let _ = tx.send(Event::Own(vec![err.to_error()])).await;
                break Err(e);
            }
        };
        let msg = match frontend::decode(&frame) {
            Ok(m) => m,
            Err(e) => {
                let err =
                    ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, format!("agentgate: {e}"));
                let _ = tx.send(Event::Own(vec![err.to_error()])).await;
                break Err(e);
            }
        };
        // A session begun with a service-account token, idle for a while: the API server is
        // asked again before what it sends now is decided.
        if matches!(
            msg,
            Frontend::Query(_)
                | Frontend::Parse { .. }
                | Frontend::Bind { .. }
                | Frontend::Execute { .. }
        ) && let (Some(v), Some(verifier)) = (token, gw.verifier.as_ref())
        {
            let _ = verifier.still_valid_now(v).await;
        }
        if *copy_phase.borrow_and_update() != CopyPhase::Idle {
            // Whether the COPY started is the server's answer: wait for it (the writer runs
            // meanwhile), then read the message as the server will.
            if *copy_phase.borrow() == CopyPhase::Starting {
                // What was forwarded unflushed is what the server's answer waits on.
                up.flush().await?;
            }
            let phase = match copy_phase.wait_for(|p| *p != CopyPhase::Starting).await {
                Ok(p) => *p,
                Err(_) => CopyPhase::Idle,
            };
            if phase == CopyPhase::Active {
                match &msg {
                    Frontend::CopyData(_) => {
                        forward(up, agent.buffer().is_empty(), frame).await?;
                    }
                    Frontend::CopyDone | Frontend::CopyFail(_) => {
                        // Another COPY of the same query may start next; the server says.
                        copy.send_replace(CopyPhase::Starting);
                        forward(up, agent.buffer().is_empty(), frame).await?;
                    }
                    // Ignored by the server during COPY FROM STDIN: not forwarded, no answer.
                    Frontend::Flush | Frontend::Sync => {}
                    Frontend::Terminate => {
                        let _ = write_frames(&mut *up, &[frame]).await;
                        break Ok(false);
                    }
                    other => {
                        // The server would end the COPY with an error and drop the message:
                        // the gateway ends it with the same meaning and drops it too.
                        let why = format!(
                            "agentgate: the agent sent {} during COPY FROM STDIN; the COPY was ended and that message dropped (send CopyData, then CopyDone or CopyFail)",
                            other.kind()
                        );
                        copy.send_replace(CopyPhase::Starting);
                        tx.send(Event::CopyFailed(why.clone())).await.ok();
                        forward(up, true, frontend::encode(&Frontend::CopyFail(why))).await?;
                    }
                }
                continue;
            }
        }
        if skip_until_sync && !matches!(msg, Frontend::Sync | Frontend::Terminate) {
            continue;
        }
        match msg {
            Frontend::Query(sql) => {
                let id = rec.next_request();
                let bytes_in = frame.body.len() + 5;
                if reads_by_settings(&sql) {
                    if in_batch {
                        // An extended-protocol batch is open: what it ran is answered only
                        // at its Sync, which comes after this.
                        let message = "agentgate checks a statement with a backslash or a non-ASCII character only once what ran before it was answered (it may have changed how the server reads strings): send a Sync before this query";
                        recorded(
                            id,
                            &sql,
                            None,
                            "simple",
                            Decision::refuse("protocol", message.to_owned()),
                        );
                        up.flush().await?;
                        let err = ErrorFields::error(sqlstate::FEATURE_NOT_SUPPORTED, message);
                        tx.send(Event::Own(vec![err.to_error()])).await.ok();
                        tx.send(Event::OwnReady).await.ok();
                        continue;
                    }
                    settled(up, tx).await?;
                }
                let classified = match classify(&sql) {
                    Ok(c) => c,
                    Err(e) => {
                        let message = format!("agentgate refuses what it cannot parse: {e}");
                        recorded(
                            id,
                            &sql,
                            None,
                            "simple",
                            Decision {
                                verdict: Verdict::Refuse,
                                rule: "unparsable".into(),
                                grant: None,
                                message: message.clone(),
                            },
                        );
                        let err = ErrorFields::error(sqlstate::SYNTAX_ERROR, message);
                        up.flush().await?;
                        tx.send(Event::Own(vec![err.to_error()])).await.ok();
                        tx.send(Event::OwnReady).await.ok();
                        continue;
                    }
                };
                if let Some(err) = sql_prepare(&classified) {
                    recorded(
                        id,
                        &sql,
                        Some(&classified),
                        "simple",
                        Decision {
                            verdict: Verdict::Refuse,
                            rule: "prepare".into(),
                            grant: None,
                            message: err.message.clone(),
                        },
                    );
                    tx.send(Event::Own(vec![err.to_error()])).await.ok();
                    tx.send(Event::OwnReady).await.ok();
                    continue;
                }
                let mut classified = classified;
                let functions_unknown =
                    check_functions(&catalog, &mut classified, &mut path, &mut ddl).await;
                let (computed, unknown) =
                    match computed_for(&catalog, &masks, &classified, &mut path).await {
                        Ok(r) => (r, None),
                        Err(e) => (None, Some(e)),
                    };
                let unknown = functions_unknown.or(unknown).or(
                    match stores_masked(
                        &catalog,
                        &masks,
                        &classified,
                        computed.as_ref(),
                        &mut path,
                        &ddl.created,
                    )
                    .await
                    {
                        Ok(why) => why,
                        Err(e) => Some(e),
                    },
                );
                let (mut d, names_unknown) = decide_names(
                    &mut path,
                    &catalog,
                    table_scoped(),
                    &mut classified,
                    &decide,
                )
                .await;
                if let Some(r) = reserved_cursor(&classified) {
                    d = r;
                } else if d.verdict == Verdict::Allow
                    && let Some(r) = cursor_refusal(&classified, &cursors)
                {
                    d = r;
                }
                if let Some(why) = names_unknown {
                    d = Decision::refuse("catalog", why);
                }
                if d.verdict != Verdict::Refuse
                    && let Some(why) = unknown
                {
                    d = Decision {
                        verdict: Verdict::Refuse,
                        rule: "mask".into(),
                        grant: None,
                        message: why,
                    };
                }
                if d.verdict != Verdict::Refuse
                    && let Some(why) = copy_out_refusal(&masks, &classified, computed.as_ref())
                {
                    d = Decision {
                        verdict: Verdict::Refuse,
                        rule: "mask".into(),
                        grant: None,
                        message: why,
                    };
                }
                let mut d = recorded(id, &sql, Some(&classified), "simple", admitted(d));
                tracing::debug!(identity, target, class = %classified.class, verdict = ?d.verdict, rule = %d.rule, "query");
                let mut held_as = None;
                if d.verdict == Verdict::Hold {
                    up.flush().await?;
                    let (after, filed) = hold(
                        gw,
                        identity,
                        target,
                        &classified,
                        &sql,
                        &masks,
                        d,
                        &decide,
                        &cancel,
                    )
                    .await;
                    d = admitted(after);
                    if d.verdict == Verdict::Allow
                        && let Some(why) = copy_out_refusal(&masks, &classified, computed.as_ref())
                    {
                        d = Decision {
                            verdict: Verdict::Refuse,
                            rule: "mask".into(),
                            grant: d.grant,
                            message: why,
                        };
                    }
                    let grant = filed.as_ref().ok().map(|f| f.name.clone());
                    let by = grant
                        .as_deref()
                        .and_then(|g| records::approver(gw.policy.get().as_deref(), g));
                    if let Err(why) = records::approval(rec, id, &d, grant.as_deref(), by)
                        && d.verdict == Verdict::Allow
                    {
                        d = Decision {
                            verdict: Verdict::Refuse,
                            rule: "audit".into(),
                            grant: d.grant,
                            message: why,
                        };
                    }
                    held_as = Some(filed);
                }
                if d.verdict == Verdict::Allow {
                    let copy_from = classified.statements.iter().any(|s| s.tag == "COPY FROM");
                    if copy_from {
                        // Before the query goes: the server's answer may come at once.
                        copy.send_replace(CopyPhase::Starting);
                    }
                    remember_cursors(&classified, &mut cursors);
                    let path_change = follow_path(gw, &mut path, &catalog, &classified, true).await;
                    if masks.has_column_rules() {
                        tx.send(Event::Text(Arc::from(sql.as_str()))).await.ok();
                    }
                    let mut tally = Tally::new(id, bytes_in);
                    if d.grant.is_some() {
                        tally.command = Some(Arc::new(Command::from(&classified)));
                    } else if let Some(declared) = granted_cursor(&classified, &cursors, &decide) {
                        // A FETCH runs its cursor's query: decided again as the DECLARE.
                        tally.command = Some(Arc::new(Command::from(declared)));
                    }
                    let ddl_no = ddl.note(&classified);
                    tx.send(Event::ExpectQuery(
                        computed,
                        Box::new(tally),
                        path_change,
                        ddl_no,
                        copy_from,
                    ))
                    .await
                    .ok();
                    write_frames(&mut up, &[frontend::encode(&Frontend::Query(sql))]).await?;
                } else {
                    let err = held_refusal(&d, &classified, held_as.as_ref());
                    up.flush().await?;
                    tx.send(Event::Own(vec![err.to_error()])).await.ok();
                    tx.send(Event::OwnReady).await.ok();
                }
            }
            Frontend::Parse {
                name,
                sql,
                param_types,
            } => {
                let id = rec.next_request();
                let refuse = |rule: &str, err: ErrorFields| {
                    recorded(
                        id,
                        &sql,
                        None,
                        "parse",
                        Decision {
                            verdict: Verdict::Refuse,
                            rule: rule.into(),
                            grant: None,
                            message: err.message.clone(),
                        },
                    );
                    Some(err)
                };
                let by_settings = reads_by_settings(&sql);
                if by_settings && !executed_in_batch {
                    settled(up, tx).await?;
                }
                let refused = if !name.is_empty() && used_statements.contains(&name) {
                    refuse(
                        "protocol",
                        ErrorFields::error(
                            "42P05",
                            format!(
                                "agentgate: prepared statement \"{name}\" was already used in this session; prepare under a new name"
                            ),
                        ),
                    )
                } else if by_settings && executed_in_batch {
                    refuse(
                        "protocol",
                        ErrorFields::error(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            "agentgate checks a statement with a backslash or a non-ASCII character only once what ran before it was answered (it may have changed how the server reads strings): send a Sync before this Parse",
                        ),
                    )
                } else {
                    match classify(&sql) {
                        Err(e) => refuse(
                            "unparsable",
                            ErrorFields::error(
                                sqlstate::SYNTAX_ERROR,
                                format!("agentgate refuses what it cannot parse: {e}"),
                            ),
                        ),
                        Ok(mut c) => {
                            let functions_unknown =
                                check_functions(&catalog, &mut c, &mut path, &mut ddl).await;
                            let (mut d, names_unknown) =
                                decide_names(&mut path, &catalog, table_scoped(), &mut c, &decide)
                                    .await;
                            if let Some(r) = reserved_cursor(&c) {
                                d = r;
                            } else if d.verdict == Verdict::Allow
                                && let Some(r) = cursor_refusal(&c, &cursors)
                            {
                                d = r;
                            }
                            if let Some(why) = functions_unknown.or(names_unknown) {
                                d = Decision {
                                    verdict: Verdict::Refuse,
                                    rule: "catalog".into(),
                                    grant: None,
                                    message: why,
                                };
                            } else if let Some(err) = sql_prepare(&c) {
                                d = Decision {
                                    verdict: Verdict::Refuse,
                                    rule: "prepare".into(),
                                    grant: None,
                                    message: err.message.clone(),
                                };
                            } else if d.verdict == Verdict::Allow
                                && c.statements.iter().any(|s| s.tag.starts_with("COPY"))
                            {
                                // COPY's checks (masked columns, binary format) and its data
                                // flow are handled for simple queries; fail closed here.
                                d = Decision {
                                    verdict: Verdict::Refuse,
                                    rule: "copy".into(),
                                    grant: None,
                                    message: "agentgate runs COPY only as a simple query: send it without parameters (psql's \\copy and drivers' copy APIs do)".into(),
                                };
                            }
                            let mut d = recorded(id, &sql, Some(&c), "parse", admitted(d));
                            tracing::debug!(identity, target, class = %c.class, verdict = ?d.verdict, rule = %d.rule, "parse");
                            let mut held_as = None;
                            if d.verdict == Verdict::Hold {
                                up.flush().await?;
                                let (after, filed) = hold(
                                    gw, identity, target, &c, &sql, &masks, d, &decide, &cancel,
                                )
                                .await;
                                d = admitted(after);
                                let grant = filed.as_ref().ok().map(|f| f.name.clone());
                                let by = grant
                                    .as_deref()
                                    .and_then(|g| records::approver(gw.policy.get().as_deref(), g));
                                if let Err(why) =
                                    records::approval(rec, id, &d, grant.as_deref(), by)
                                    && d.verdict == Verdict::Allow
                                {
                                    d = Decision {
                                        verdict: Verdict::Refuse,
                                        rule: "audit".into(),
                                        grant: d.grant,
                                        message: why,
                                    };
                                }
                                held_as = Some(filed);
                            }
                            if d.verdict == Verdict::Allow {
                                if name.is_empty() {
                                    unnamed_uncertain = in_batch;
                                } else {
                                    used_statements.insert(name.clone());
                                }
                                remember_cursors(&c, &mut cursors);
                                follow_path(gw, &mut path, &catalog, &c, false).await;
                                statements.insert(name.clone(), c);
                                None
                            } else if matches!(d.rule.as_str(), "prepare" | "copy") {
                                Some(ErrorFields::error(
                                    sqlstate::FEATURE_NOT_SUPPORTED,
                                    d.message.clone(),
                                ))
                            } else {
                                Some(held_refusal(&d, &c, held_as.as_ref()))
                            }
                        }
                    }
                };
                match refused {
                    None => {
                        in_batch = true;
                        if masks.has_column_rules() {
                            tx.send(Event::Text(Arc::from(sql.as_str()))).await.ok();
                        }
                        let parse = frontend::encode(&Frontend::Parse {
                            name,
                            sql,
                            param_types,
                        });
                        forward(up, agent.buffer().is_empty(), parse).await?;
                    }
                    Some(err) => {
                        refuse_in_batch(up, tx, in_batch, err).await?;
                        skip_until_sync = true;
                        in_batch = false;
                    }
                }
            }
            Frontend::Bind {
                ref portal,
                ref statement,
                ..
            } => {
                // (A name beginning with \x01 is the gateway's: see [`REFUSED_PORTAL`].)
                let reserved = portal.starts_with('\u{1}');
                if reserved || (!portal.is_empty() && !used_portals.insert(portal.clone())) {
                    let err = ErrorFields::error(
                        "42P03",
                        if reserved {
                            "agentgate reserves portal names that begin with the byte 0x01; bind under another name".to_owned()
                        } else {
                            format!(
                                "agentgate: portal \"{portal}\" was already used in this session; bind under a new name"
                            )
                        },
                    );
                    refuse_in_batch(up, tx, in_batch, err).await?;
                    skip_until_sync = true;
                    in_batch = false;
                    continue;
                }
                portals.insert(portal.clone(), statements.get(statement).cloned());
                in_batch = true;
                // Planning the portal may evaluate functions (an IMMUTABLE one at once).
                executed_in_batch = true;
                forward(up, agent.buffer().is_empty(), frame).await?;
            }
            Frontend::Execute { ref portal, .. } => {
                // Re-check at execution: a grant may have expired since Parse.
                // A portal the gateway did not see bound (a SQL cursor's name) is unknown:
                // refused below, never taken for the unnamed statement.
                let id = rec.next_request();
                let mut found = portals.get(portal).cloned().flatten();
                catalog.lock().await.set_ddl_open(ddl.open());
                let computed = match &found {
                    Some(c) => computed_for(&catalog, &masks, c, &mut path).await,
                    None => Ok(None),
                };
                let stores = match (&found, &computed) {
                    (Some(c), Ok(rule)) => {
                        match stores_masked(
                            &catalog,
                            &masks,
                            c,
                            rule.as_ref(),
                            &mut path,
                            &ddl.created,
                        )
                        .await
                        {
                            Ok(why) => why,
                            Err(e) => Some(e),
                        }
                    }
                    _ => None,
                };
                // Its names as the session's path reads them now (it may have changed since
                // the Parse: the server plans the statement again).
                let mut names_unknown = None;
                if let Some(c) = found.as_mut()
                    && table_scoped()
                {
                    names_unknown = path.resolve(&catalog, c).await.err().map(names_refusal);
                }
                let verdict = found.map(|c| {
                    let mut d = admitted(decide(&c));
                    if let Some(why) = names_unknown {
                        d = Decision::refuse("catalog", why);
                    }
                    if let Some(r) = reserved_cursor(&c) {
                        d = r;
                    } else if d.verdict == Verdict::Allow
                        && let Some(r) = cursor_refusal(&c, &cursors)
                    {
                        d = r;
                    }
                    if d.verdict != Verdict::Refuse
                        && let Err(why) = &computed
                    {
                        d = Decision {
                            verdict: Verdict::Refuse,
                            rule: "mask".into(),
                            grant: None,
                            message: why.clone(),
                        };
                    }
                    if d.verdict != Verdict::Refuse
                        && let Some(why) = stores
                    {
                        d = Decision::refuse("mask", why);
                    }
                    let d = recorded(id, c.fingerprint.text(), Some(&c), "execute", d);
                    (d, c)
                });
                match verdict {
                    Some((d, c)) if d.verdict == Verdict::Allow => {
                        in_batch = true;
                        executed_in_batch = true;
                        if masks.has_column_rules() {
                            tx.send(Event::Text(Arc::from(c.fingerprint.text())))
                                .await
                                .ok();
                        }
                        let mut tally = Tally::new(id, frame.body.len() + 5);
                        if d.grant.is_some() {
                            tally.command = Some(Arc::new(Command::from(&c)));
                        }
                        // A prepared SET runs (and changes the path) when executed, however
                        // long after its Parse.
                        let path_change = follow_path(gw, &mut path, &catalog, &c, true).await;
                        let transaction = c
                            .statements
                            .iter()
                            .any(|s| s.tag.contains("TRANSACTION") || s.tag.contains("COMMIT"));
                        tx.send(Event::Execute(
                            computed.ok().flatten(),
                            Box::new(tally),
                            path_change,
                            transaction,
                            ddl.note(&c),
                        ))
                        .await
                        .ok();
                        if !masks.is_empty() {
                            // The rows' columns, types and formats, from the server, right
                            // before them: whatever the agent described (or did not), the
                            // masking rules are those of this portal. Its answer is the
                            // gateway's own.
                            tx.send(Event::Describe { injected: true }).await.ok();
                            super::frame::write_frames_unflushed(
                                &mut up,
                                &[frontend::encode(&Frontend::Describe {
                                    kind: b'P',
                                    name: portal.clone(),
                                })],
                            )
                            .await?;
                        }
                        forward(up, agent.buffer().is_empty(), frame).await?;
                    }
                    other => {
                        let err = match &other {
                            Some((d, c)) => refusal(d, Some(c)),
                            None => {
                                let message = "agentgate: executing a statement it has not seen prepared (or a portal it has not seen bound)";
                                recorded(
                                    id,
                                    "",
                                    None,
                                    "execute",
                                    Decision {
                                        verdict: Verdict::Refuse,
                                        rule: "protocol".into(),
                                        grant: None,
                                        message: message.into(),
                                    },
                                );
                                ErrorFields::error(sqlstate::INSUFFICIENT_PRIVILEGE, message)
                            }
                        };
                        refuse_in_batch(up, tx, in_batch, err).await?;
                        skip_until_sync = true;
                        in_batch = false;
                    }
                }
            }
            Frontend::Describe { .. } => {
                // Its answer is the agent's; rows are masked by the gateway's own describe
                // of the portal at Execute.
                tx.send(Event::Describe { injected: false }).await.ok();
                in_batch = true;
                forward(up, agent.buffer().is_empty(), frame).await?;
            }
            Frontend::Close { kind, ref name } => {
                if kind == b'S' {
                    statements.remove(name);
                } else {
                    portals.remove(name);
                }
                in_batch = true;
                forward(up, agent.buffer().is_empty(), frame).await?;
            }
            Frontend::Flush => {
                in_batch = true;
                forward(up, agent.buffer().is_empty(), frame).await?;
            }
            Frontend::Sync => {
                executed_in_batch = false;
                // The unnamed portal lives in its batch only; the unnamed statement too when
                // the server may have skipped its Parse.
                portals.remove("");
                if std::mem::take(&mut unnamed_uncertain) {
                    statements.remove("");
                }
                if skip_until_sync {
                    skip_until_sync = false;
                    tx.send(Event::OwnReady).await.ok();
                } else {
                    tx.send(Event::ExpectUpstream).await.ok();
                    forward(up, agent.buffer().is_empty(), frame).await?;
                }
                in_batch = false;
            }
            Frontend::Terminate => {
                if in_batch || *copy.borrow() != CopyPhase::Idle || skip_until_sync {
                    let _ = write_frames(&mut *up, &[frame]).await;
                    break Ok(false);
                }
                // Not forwarded: the connection may serve the next session.
                break Ok(true);
            }
            Frontend::FunctionCall => {
                let err = ErrorFields::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "agentgate refuses the fast-path function call protocol: call functions with SELECT",
                );
                // Recorded like any refused request (its arguments are not: they are values).
                recorded(
                    rec.next_request(),
                    "",
                    None,
                    "function-call",
                    Decision {
                        verdict: Verdict::Refuse,
                        rule: "protocol".into(),
                        grant: None,
                        message: err.message.clone(),
                    },
                );
                up.flush().await?;
                tx.send(Event::Own(vec![err.to_error()])).await.ok();
                tx.send(Event::OwnReady).await.ok();
            }
            Frontend::CopyData(_) | Frontend::CopyDone | Frontend::CopyFail(_) => {
                // Outside COPY FROM STDIN the server ignores these; so does the gateway.
            }
            Frontend::Password(_) => {
                let err = ErrorFields::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "agentgate: unexpected authentication message",
                );
                up.flush().await?;
                tx.send(Event::Own(vec![err.to_error()])).await.ok();
                break Ok(false);
            }
        }
    }
}
