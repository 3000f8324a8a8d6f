//! The audit pipeline: gateways hand records to an [`Auditor`]; one writer seals them into
//! the sidecar's hash chain (signing checkpoints with a key only the sidecar reads) and
//! appends them to the spill [`journal`]; each sink reads the journal from its own cursor and
//! delivers with retries and backoff.
//!
//! Fail closed: a command is forwarded only after its record was accepted. When the queue
//! stays full (the gateway waits up to a second for the writer), the writer cannot write, or
//! the journal holds more undelivered records than its bound (a sink is down),
//! [`Auditor::admit`] refuses and says why; gateways refuse new commands until the sinks
//! catch up.
//!
//! Nothing accepted is lost when the journal cannot be written (its disk full, an I/O
//! error): the record being written and every one after it wait, in order, while the writer
//! tries again with backoff ([`RETRY_FIRST`] to [`RETRY_MAX`]); new commands are refused
//! meanwhile, and accepted again as soon as what waited is written. A record sealed into the
//! chain is always written before any record sealed after it, so the chain has no gap.

pub mod journal;
pub mod sinks;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate_crds::audit::{Chain, Record, RecordKind, Signer};
use agentgate_crds::target::Protocol;
use jiff::Timestamp;

use journal::{Appender, Journal};
use sinks::Sink;

/// Errors starting the audit pipeline.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The spill directory or the key could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The signing key is unusable.
    #[error(transparent)]
    Key(#[from] agentgate_crds::audit::ChainError),
}

/// How long a gateway waits for room in a full queue before it refuses the command.
const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// How the pipeline is set up.
#[derive(Debug)]
pub struct Config {
    /// The spill journal's directory (sidecar-only volume).
    pub spill_dir: PathBuf,
    /// The Ed25519 signing key (PKCS#8 DER); created (mode 0600) when missing, with its
    /// public key beside it as `<file>.pub` (base64).
    pub key_file: PathBuf,
    /// The most undelivered bytes the journal may hold before commands are refused.
    pub max_spill_bytes: u64,
    /// The most records waiting for the writer (about 1 KiB of memory each). When it is
    /// full, gateways wait for the writer (up to a second) before they refuse.
    pub queue: usize,
    /// Sign a checkpoint after this many unsigned records…
    pub checkpoint_records: u64,
    /// …or when a record has been unsigned this long.
    pub checkpoint_every: Duration,
    /// The name of this sidecar's stream prefix (pod name or host name).
    pub stream_prefix: String,
    /// The pod, `namespace/name`, when in one.
    pub pod: Option<String>,
    /// Sync the journal to disk at each write burst (records survive a node crash, not only
    /// a process crash).
    pub sync: bool,
}

impl Config {
    /// Defaults for `spill_dir` and `key_file`.
    pub fn new(spill_dir: PathBuf, key_file: PathBuf) -> Self {
        Self {
            spill_dir,
            key_file,
            max_spill_bytes: 256 << 20,
            queue: 8_192,
            checkpoint_records: 1000,
            checkpoint_every: Duration::from_secs(1),
            stream_prefix: hostname(),
            pod: None,
            sync: true,
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agentgate".to_owned())
}

/// Why the pipeline refuses, if it does.
#[derive(Debug, Default)]
struct Health {
    /// The writer cannot write (disk full, I/O error): the flag (read per command) and why.
    /// Cleared when what waited is written.
    is_broken: AtomicBool,
    broken: Mutex<Option<String>>,
    /// Each sink's last failure, for the refusal message.
    failing: Mutex<std::collections::BTreeMap<String, (Timestamp, String)>>,
    stopped: AtomicBool,
    /// Held (shared) while a record is handed over, taken (exclusive) to stop: no record is
    /// accepted after the stream's end.
    handover: std::sync::RwLock<()>,
    accepted: AtomicU64,
}

enum Msg {
    Record(Box<Record>),
    /// A request record for a SQL statement: the writer fills `request.text` with its
    /// normalized form (every constant a `$n` placeholder) and `request.fingerprint`, off the
    /// request path.
    Statement(Box<Record>, crate::sql::Fingerprint, Option<Arc<str>>),
    Stop(std::sync::mpsc::Sender<()>),
}

/// The most of a request's text a record keeps.
pub const MAX_TEXT: usize = 16 << 10;

/// `text` cut to at most [`MAX_TEXT`] bytes (at a character boundary), saying so.
pub fn truncated(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let total = text.len();
        let mut cut = MAX_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(&format!("… ({total} bytes in all)"));
    }
    text
}

/// The most text one I/O record holds; longer terminal input or output takes several.
pub const IO_RECORD_MAX: usize = 16 << 10;

/// `text` in consecutive pieces of at most `max` bytes (at least 4), cut at character
/// boundaries.
pub fn pieces(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut cut = rest.len().min(max.max(4));
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        rest = tail;
        Some(head)
    })
}

/// Text the agent chose (a client name, a database name, an error it provoked), as records
/// keep it: control characters (terminal escapes) replaced, at most `max` characters.
pub fn agent_text(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// A statement as records keep it: every constant a `$n` placeholder and every comment
/// dropped ([`crate::sql::redact`]), so no value (a password, a card number) reaches a record.
pub fn normalized_sql(sql: &str) -> String {
    match crate::sql::redact(sql) {
        Some(n) => truncated(n),
        None => format!(
            "(a statement that does not scan, {} bytes: not recorded)",
            sql.len()
        ),
    }
}

/// The gateways' handle on the pipeline. Cheap to clone.
#[derive(Clone)]
pub struct Auditor {
    tx: SyncSender<Msg>,
    journal: Arc<Journal>,
    health: Arc<Health>,
    max_spill_bytes: u64,
    pod: Option<String>,
    next_session: Arc<AtomicU64>,
    stream: Arc<str>,
    public_key: Arc<agentgate_crds::audit::SigningKey>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

/// Loads the signing key, creating it when missing.
pub fn load_or_create_key(path: &Path) -> Result<Signer, AuditError> {
    let io = |what: String| move |source| AuditError::Io { what, source };
    match std::fs::read(path) {
        Ok(der) => Ok(Signer::from_pkcs8(&der)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (signer, der) = Signer::generate()?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
            }
            let tmp = path.with_extension("tmp");
            {
                use std::io::Write;
                #[cfg(unix)]
                use std::os::unix::fs::OpenOptionsExt;
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                opts.mode(0o600);
                let mut f = opts
                    .open(&tmp)
                    .map_err(io(format!("write {}", tmp.display())))?;
                f.write_all(&der)
                    .map_err(io(format!("write {}", tmp.display())))?;
            }
            std::fs::rename(&tmp, path).map_err(io(format!("write {}", path.display())))?;
            let mut public = path.as_os_str().to_owned();
            public.push(".pub");
            std::fs::write(&public, format!("{}\n", signer.public().public_key))
                .map_err(io(format!("write {}", PathBuf::from(&public).display())))?;
            tracing::info!(key_id = %signer.public().key_id, path = %path.display(), "created the audit signing key");
            Ok(signer)
        }
        Err(e) => Err(io(format!("read the audit signing key {}", path.display()))(e)),
    }
}

impl Auditor {
    /// Starts the pipeline: the writer thread and one delivery task per sink. Records spilled
    /// by an earlier run are delivered too.
    pub fn start(config: Config, sinks: Vec<Sink>) -> Result<Self, AuditError> {
        let signer = load_or_create_key(&config.key_file)?;
        let (journal, appender) =
            Journal::open(&config.spill_dir, config.sync).map_err(|source| AuditError::Io {
                what: format!(
                    "open the audit spill directory {}",
                    config.spill_dir.display()
                ),
                source,
            })?;
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue);
        let health = Arc::new(Health::default());
        let stream: Arc<str> = format!(
            "{}-{}",
            config.stream_prefix,
            crate::clock::now().strftime("%Y%m%dT%H%M%S%.6fZ")
        )
        .into();
        let public_key = Arc::new(signer.public().clone());
        let mut start = Record::new(RecordKind::StreamStart, crate::clock::now());
        start.key = Some(signer.public().clone());
        start.pod.clone_from(&config.pod);
        start.note = Some(format!("agentgate-sidecar {}", env!("CARGO_PKG_VERSION")));
        // Continue the stream of the run before (killed or stopped): this start's signature
        // then covers its end.
        let last = journal
            .last_line()
            .and_then(|l| serde_json::from_slice::<Record>(&l).ok());
        // Times go on from the run before, even on a clock that stepped back since.
        let last_time = last.as_ref().map(|r| r.time);
        start.previous = last.map(|r| agentgate_crds::audit::StreamLink {
            stream: r.stream,
            n: r.n,
            hash: r.hash,
        });
        let writer = Writer {
            chain: Chain::new(stream.to_string()),
            signer,
            appender,
            health: health.clone(),
            checkpoint_records: config.checkpoint_records,
            checkpoint_every: config.checkpoint_every,
            line: Vec::with_capacity(4096),
            unwritten: VecDeque::new(),
            outage: None,
            unrecordable: None,
            dirty: false,
            last_time,
        };
        std::thread::Builder::new()
            .name("agentgate-audit".into())
            .spawn(move || writer.run(rx, start))
            .map_err(|source| AuditError::Io {
                what: "start the audit writer".into(),
                source,
            })?;
        // Every sink's cursor is known before any sink delivers: a sink that finishes an old
        // segment deletes it once every *known* cursor is past it, so a sink registered
        // later would find its undelivered records gone. The journal also counts what each
        // still needs against the bound.
        let mut resumed = Vec::with_capacity(sinks.len());
        for sink in sinks {
            let pos = journal
                .cursor(&sink.name())
                .map_err(|source| AuditError::Io {
                    what: format!("read the cursor of audit sink {}", sink.name()),
                    source,
                })?;
            resumed.push((sink, pos));
        }
        for (sink, pos) in resumed {
            tokio::spawn(sinks::deliver(sink, pos, journal.clone(), health.clone()));
        }
        Ok(Self {
            tx,
            journal,
            health,
            max_spill_bytes: config.max_spill_bytes,
            pod: config.pod,
            next_session: Arc::new(AtomicU64::new(0)),
            stream,
            public_key,
        })
    }

    /// This sidecar's stream.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The public half of the signing key.
    pub fn public_key(&self) -> &agentgate_crds::audit::SigningKey {
        &self.public_key
    }

    /// `Ok` when new commands may run: their records can be taken. Otherwise why not, in a
    /// sentence for the agent.
    pub fn admit(&self) -> Result<(), String> {
        if let Some(why) = self.broken() {
            return Err(format!(
                "agentgate refuses new commands: its audit trail cannot be written ({why}); the records already taken are kept and written as soon as it can, and commands resume then: retry later (the sidecar's log says what fails; free space on, or repair, the volume of its audit spill directory)"
            ));
        }
        let spilled = self.journal.undelivered();
        if spilled > self.max_spill_bytes {
            return Err(format!(
                "agentgate refuses new commands: its audit buffer is full ({} KiB undelivered{}); commands resume when the sinks catch up",
                spilled >> 10,
                self.failing()
            ));
        }
        Ok(())
    }

    /// Why the writer cannot write, while it cannot.
    fn broken(&self) -> Option<String> {
        if !self.health.is_broken.load(Ordering::Acquire) {
            return None;
        }
        // Fail closed: the flag alone refuses, whatever the reason's lock says.
        Some(
            self.health
                .broken
                .lock()
                .ok()
                .and_then(|b| b.clone())
                .unwrap_or_else(|| "the audit writer failed".to_owned()),
        )
    }

    fn failing(&self) -> String {
        let Ok(f) = self.health.failing.lock() else {
            return String::new();
        };
        f.iter()
            // Only names and times: the agent reads this, and a sink's error can carry its
            // address or its answer (the sidecar's log has them).
            .map(|(sink, (since, _))| format!("; sink {sink} failing since {since}"))
            .collect()
    }

    /// Hands `record` to the writer. `Err` (with why) when it cannot be taken: the caller
    /// refuses the command it is about.
    pub fn record(&self, record: Record) -> Result<(), String> {
        self.send(Msg::Record(Box::new(record)))
    }

    /// Like [`Self::record`] for the request record of SQL statement `sql`: its text is
    /// normalized (constants replaced) and fingerprinted by the writer, before it is sealed.
    pub fn record_statement(
        &self,
        record: Record,
        sql: crate::sql::Fingerprint,
        redacted: Option<Arc<str>>,
    ) -> Result<(), String> {
        self.send(Msg::Statement(Box::new(record), sql, redacted))
    }

    fn send(&self, msg: Msg) -> Result<(), String> {
        let _handover = self.health.handover.read();
        if self.health.stopped.load(Ordering::Relaxed) {
            return Err("agentgate refuses new commands: it is shutting down".into());
        }
        let mut msg = msg;
        let deadline = Instant::now() + QUEUE_WAIT;
        let mut pause = Duration::from_micros(50);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => {
                    self.health.accepted.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                // Backpressure: the writer is behind (starved of CPU, most often). The
                // gateway's thread waits for it, which also gives it the CPU, rather than
                // let records pile up in memory; refused only if it does not catch up.
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    msg = back;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(1));
                }
                Err(TrySendError::Full(_)) => {
                    if let Some(why) = self.broken() {
                        return Err(format!(
                            "agentgate refuses new commands: its audit trail cannot be written ({why}) and its queue of records waiting to be written is full; retry later (the sidecar's log says what fails; free space on, or repair, the volume of its audit spill directory)"
                        ));
                    }
                    return Err(format!(
                        "agentgate refuses new commands: its audit queue stayed full for {} ms (records arrive faster than they can be written); retry, and if it persists give the sidecar more CPU",
                        QUEUE_WAIT.as_millis()
                    ));
                }
                Err(TrySendError::Disconnected(_)) => {
                    return Err(
                        "agentgate refuses new commands: its audit writer has stopped".into(),
                    );
                }
            }
        }
    }

    /// A new session's recorder; records its `SessionStart`.
    pub fn session(
        &self,
        identity: &str,
        target: &str,
        protocol: Protocol,
        client: Option<String>,
    ) -> Result<SessionRecorder, String> {
        self.admit()?;
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        let id = session_id(identity, &self.stream, n);
        let rec = SessionRecorder {
            auditor: self.clone(),
            id,
            identity: identity.to_owned(),
            target: target.to_owned(),
            protocol,
            next_request: AtomicU64::new(1),
            ended: AtomicBool::new(false),
            pending: std::sync::Mutex::new(None),
        };
        let mut start = rec.base(RecordKind::SessionStart);
        start.client = client;
        self.record(start)?;
        Ok(rec)
    }

    /// Ends the stream cleanly, after every record already accepted: the sessions still open
    /// end ("the sidecar stopped"), then a signed `StreamEnd`. Waits up to `wait` for the
    /// writer and the sinks (what they have not delivered then stays spilled for the next
    /// start).
    pub async fn shutdown(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        {
            let _exclusive = self.health.handover.write();
            self.health.stopped.store(true, Ordering::Relaxed);
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // The queue may be full (the writer waiting for its disk): wait for room, not past
        // the deadline, without holding up the runtime.
        let mut stop = Msg::Stop(done_tx);
        let sent = loop {
            match self.tx.try_send(stop) {
                Ok(()) => break true,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    stop = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(_) => break false,
            }
        };
        let finished = if sent {
            let left = deadline.saturating_duration_since(Instant::now());
            matches!(
                tokio::task::spawn_blocking(move || done_rx.recv_timeout(left)).await,
                Ok(Ok(()))
            )
        } else {
            false
        };
        if !finished {
            tracing::error!(
                wait_ms = wait.as_millis() as u64,
                reason = self.broken().as_deref().unwrap_or("the writer is behind"),
                "the audit writer did not finish in time: the records it has not written to the spill journal are lost, and the stream has no StreamEnd (the next start continues it)"
            );
        }
        while !self.journal.all_delivered() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Err(e) = self.journal.save_all() {
            tracing::warn!(error = %e, "could not save the audit sinks' cursors: a restart delivers the last records again");
        }
    }

    /// Bytes spilled and not yet delivered to every sink.
    pub fn spilled_bytes(&self) -> u64 {
        self.journal.undelivered()
    }
}

/// A session id: the identity, then a hash of the stream and the session's number (a valid
/// Kubernetes object name, unique across sidecars).
fn session_id(identity: &str, stream: &str, n: u64) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{stream}/{n}").as_bytes(),
    );
    let mut id: String = identity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    id = id.trim_matches('-').to_owned();
    if id.is_empty() {
        id.push_str("agent");
    }
    id.push('-');
    id.push_str(&agentgate_crds::audit::chain::hex(&digest.as_ref()[..6]));
    id
}

/// Records one session's events.
#[derive(Debug)]
pub struct SessionRecorder {
    auditor: Auditor,
    id: String,
    identity: String,
    target: String,
    protocol: Protocol,
    next_request: AtomicU64,
    ended: AtomicBool,
    /// With [`Self::track_outcomes`]: which requests still owe an outcome.
    pending: std::sync::Mutex<Option<Tracked>>,
}

/// Outcome tracking of a session (see [`SessionRecorder::track_outcomes`]).
#[derive(Debug, Default)]
struct Tracked {
    /// Requests recorded without an outcome yet.
    open: std::collections::BTreeSet<u64>,
    /// Requests answered elsewhere (an upgraded connection writes its own, maybe later).
    elsewhere: std::collections::BTreeSet<u64>,
    /// Requests the session's end answered: an outcome arriving later is dropped.
    closed: std::collections::BTreeSet<u64>,
}

impl SessionRecorder {
    /// From now on every Request must get an Outcome: one the session ends without (its
    /// client went away while it was served, and the code that would have recorded it was
    /// dropped) is recorded at the end, saying so. For gateways that record an outcome for
    /// every request, refused ones included (the Kubernetes gateway).
    pub fn track_outcomes(&self) {
        if let Ok(mut p) = self.pending.lock() {
            p.get_or_insert_with(Default::default);
        }
    }

    /// Request `id`'s outcome is written by code that outlives the session's connection
    /// (an upgraded exec, attach or port-forward): the session's end does not answer it.
    pub fn answered_elsewhere(&self, id: u64) {
        if let Ok(mut guard) = self.pending.lock()
            && let Some(t) = guard.as_mut()
            && t.open.remove(&id)
        {
            t.elsewhere.insert(id);
        }
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pipeline.
    pub fn auditor(&self) -> &Auditor {
        &self.auditor
    }

    /// A record of this session, to fill and [`Self::emit`].
    pub fn base(&self, kind: RecordKind) -> Record {
        let mut r = Record::new(kind, crate::clock::now());
        r.session = Some(self.id.clone());
        r.identity = Some(self.identity.clone());
        r.target = Some(self.target.clone());
        r.protocol = Some(self.protocol);
        r.pod.clone_from(&self.auditor.pod);
        r
    }

    /// The next request number.
    pub fn next_request(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// Records `record`; `Err` (why) when it cannot be taken.
    pub fn emit(&self, record: Record) -> Result<(), String> {
        let tracked = match (record.kind, &record.request, &record.outcome) {
            (RecordKind::Request, Some(r), _) => Some((r.id, true)),
            (RecordKind::Outcome, _, Some(o)) => Some((o.id, false)),
            _ => None,
        };
        let Some((id, request)) = tracked else {
            return self.auditor.record(record);
        };
        // An outcome is taken off the open requests before it is written (so the session's
        // end cannot answer it too); one the end already answered is not written again.
        let mut taken = false;
        if let Ok(mut guard) = self.pending.lock()
            && let Some(t) = guard.as_mut()
        {
            if request {
                t.open.insert(id);
            } else if t.closed.contains(&id) {
                return Ok(());
            } else {
                taken = t.open.remove(&id) | t.elsewhere.remove(&id);
            }
        }
        let written = self.auditor.record(record);
        if written.is_err()
            && let Ok(mut guard) = self.pending.lock()
            && let Some(t) = guard.as_mut()
        {
            if request {
                t.open.remove(&id);
            } else if taken {
                t.open.insert(id);
            }
        }
        written
    }

    /// Records the request record of SQL statement `sql` (normalized and fingerprinted by
    /// the writer).
    pub fn emit_statement(
        &self,
        record: Record,
        sql: crate::sql::Fingerprint,
        redacted: Option<Arc<str>>,
    ) -> Result<(), String> {
        self.auditor.record_statement(record, sql, redacted)
    }

    /// Records the session's end (once).
    pub fn end(&self, reason: &str) {
        if self.ended.swap(true, Ordering::Relaxed) {
            return;
        }
        let unanswered = self
            .pending
            .lock()
            .ok()
            .and_then(|mut p| {
                p.as_mut().map(|t| {
                    let open = std::mem::take(&mut t.open);
                    t.closed.extend(open.iter().copied());
                    open
                })
            })
            .unwrap_or_default();
        for id in unanswered {
            let mut r = self.base(RecordKind::Outcome);
            r.outcome = Some(agentgate_crds::audit::Outcome {
                id,
                error: Some(format!(
                    "the session ended ({reason}) before the request was answered"
                )),
                ..Default::default()
            });
            if let Err(e) = self.auditor.record(r) {
                tracing::error!(session = %self.id, error = %e, "an unanswered request's outcome could not be recorded");
            }
        }
        let mut end = self.base(RecordKind::SessionEnd);
        end.note = Some(reason.to_owned());
        if let Err(e) = self.auditor.record(end) {
            tracing::error!(session = %self.id, error = %e, "the session's end could not be recorded");
        }
    }
}

impl Drop for SessionRecorder {
    fn drop(&mut self) {
        self.end("the connection closed");
    }
}

/// Seals and appends records, signing checkpoints.
struct Writer {
    chain: Chain,
    signer: Signer,
    appender: Appender,
    health: Arc<Health>,
    checkpoint_records: u64,
    checkpoint_every: Duration,
    /// The line being written (one buffer, reused).
    line: Vec<u8>,
    /// Sealed lines the journal has not taken (its disk full or failing), oldest first. They
    /// are in the chain already: nothing new is sealed while one waits, and they are
    /// appended, in order, before anything else.
    unwritten: VecDeque<Vec<u8>>,
    /// The journal's failure being retried, if any.
    outage: Option<Outage>,
    /// A record could not be serialized (a bug, never seen): the trail misses it, so
    /// commands stay refused until a restart.
    unrecordable: Option<String>,
    /// Lines were appended since the last flush.
    dirty: bool,
    /// The latest time written: the trail's times never go back. Records are stamped where
    /// they happen, on many threads; one stamped a moment before another may reach the
    /// queue after it, and then takes the other's time.
    last_time: Option<jiff::Timestamp>,
}

/// A failure of the journal being retried.
struct Outage {
    /// When it began.
    since: Instant,
    /// Why the last try failed.
    why: String,
    /// How many tries failed.
    tries: u64,
    /// The wait before the next try.
    backoff: Duration,
}

/// The writer's first retry after the journal failed…
pub const RETRY_FIRST: Duration = Duration::from_millis(50);
/// …and the longest wait between two (each wait doubles the one before).
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// How long the writer lets records gather after a burst before it looks again.
const GATHER: Duration = Duration::from_micros(500);

/// While records keep coming, the writer flushes (and syncs, and checkpoints) at least this
/// often.
const FLUSH_EVERY: Duration = Duration::from_millis(1);

/// How long the writer keeps looking every [`GATHER`] after the last record before it blocks
/// on the queue. While it looks on its own, a gateway handing over a record never has to wake
/// it (a system call on the path of every request); when records stop, it sleeps until the
/// next one.
const POLL_FOR: Duration = Duration::from_millis(20);

impl Writer {
    fn run(mut self, rx: Receiver<Msg>, start: Record) {
        let mut unsigned_since: Option<Instant> = None;
        // Records taken from the queue and not yet sealed, in order.
        let mut pending: VecDeque<Msg> = VecDeque::from([Msg::Record(Box::new(start))]);
        // Until when the writer looks for records on its own (see [`POLL_FOR`]).
        let mut polling_until: Option<Instant> = None;
        let mut last_flush = Instant::now();
        // A stop asked for, and whether the stream's end is sealed.
        let mut stop = None;
        let mut ended = false;
        loop {
            // The journal failed: nothing new is sealed (and nothing more taken from the
            // queue, which holds the gateways back) until what waits is written.
            if self.outage.is_some() {
                self.retry();
                continue;
            }
            if !pending.is_empty() {
                polling_until = Some(Instant::now() + POLL_FOR);
            }
            while self.outage.is_none()
                && let Some(msg) = pending.pop_front()
            {
                match msg {
                    Msg::Record(mut r) => self.write(&mut r, &mut unsigned_since),
                    Msg::Statement(mut r, sql, redacted) => {
                        if let Some(req) = r.request.as_mut() {
                            req.text = match redacted {
                                Some(t) => truncated(t.to_string()),
                                None => normalized_sql(sql.text()),
                            };
                        }
                        // The exact-command fingerprint only where a grant binds to it: a
                        // hash of the whole text would let a short secret in it be guessed.
                        if r.verdict() == Some(agentgate_crds::audit::Verdict::Held)
                            && let Some(req) = r.request.as_mut()
                        {
                            req.fingerprint = Some(sql.get().to_owned());
                        }
                        self.write(&mut r, &mut unsigned_since);
                    }
                    Msg::Stop(done) => stop = Some(done),
                }
            }
            if self.outage.is_some() {
                continue;
            }
            // Drain what is queued before flushing: one write for a burst.
            while pending.len() < 4096
                && stop.is_none()
                && let Ok(msg) = rx.try_recv()
            {
                pending.push_back(msg);
            }
            // More is queued: go on writing, but flush (and sync, and checkpoint) at least
            // every FLUSH_EVERY, so that a queue that never empties (gateways waiting for
            // room) still reaches the sinks and the disk on time.
            let more = !pending.is_empty();
            if more && last_flush.elapsed() < FLUSH_EVERY {
                continue;
            }
            if let Some(since) = unsigned_since
                && (since.elapsed() >= self.checkpoint_every
                    || self.chain.unsigned() >= self.checkpoint_records)
            {
                let mut cp = Record::new(RecordKind::Checkpoint, crate::clock::now());
                cp.note = Some(format!(
                    "signs the stream through n={}",
                    self.chain.head().0
                ));
                self.write(&mut cp, &mut unsigned_since);
            }
            if stop.is_some() && !ended && self.outage.is_none() {
                self.end_stream(&mut unsigned_since);
                ended = true;
            }
            if self.dirty && self.outage.is_none() {
                self.dirty = false;
                last_flush = Instant::now();
                if let Err(e) = self.appender.flush() {
                    self.failed(format!("write the spill journal: {e}"));
                }
            }
            if self.outage.is_none()
                && self
                    .appender
                    .sync_due()
                    .is_some_and(|due| ended || due <= Instant::now())
                && let Err(e) = self.appender.sync()
            {
                self.failed(format!("sync the spill journal: {e}"));
            }
            if self.outage.is_some() {
                continue;
            }
            if ended {
                // Everything up to the stream's end is written (and synced).
                if let Some(done) = stop {
                    let _ = done.send(());
                }
                return;
            }
            if more {
                continue;
            }
            let mut wait = unsigned_since.map_or(Duration::from_secs(3600), |s| {
                self.checkpoint_every.saturating_sub(s.elapsed())
            });
            if let Some(due) = self.appender.sync_due() {
                wait = wait.min(due.saturating_duration_since(Instant::now()));
            }
            // While records keep coming, let the next ones gather for a moment and look again,
            // instead of being woken for each (two per statement): the records are already
            // accepted and ordered.
            if let Some(until) = polling_until {
                if Instant::now() < until {
                    std::thread::sleep(GATHER.min(wait));
                    if let Ok(msg) = rx.try_recv() {
                        pending.push_back(msg);
                    }
                    continue;
                }
                polling_until = None;
            }
            match rx.recv_timeout(wait) {
                Ok(msg) => pending.push_back(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Every handle is gone without a stop: what is written is flushed (the
                    // appender writes the rest when dropped).
                    if let Err(e) = self.appender.flush() {
                        tracing::error!(error = %e, "the last audit records could not be written to the spill journal");
                    }
                    return;
                }
            }
        }
    }

    /// Seals `r` as the stream's next record and appends it to the journal. When the journal
    /// does not take it (or an earlier line still waits), the sealed line waits in
    /// [`Self::unwritten`] and the writer retries ([`Self::retry`]): the chain never skips
    /// it.
    fn write(&mut self, r: &mut Record, unsigned_since: &mut Option<Instant>) {
        let sign = matches!(
            r.kind,
            RecordKind::StreamStart
                | RecordKind::StreamEnd
                | RecordKind::SessionEnd
                | RecordKind::Checkpoint
        ) || self.chain.unsigned() + 1 >= self.checkpoint_records;
        match self.last_time {
            Some(last) if r.time < last => r.time = last,
            _ => self.last_time = Some(r.time),
        }
        if let Err(e) = self
            .chain
            .seal_into(r, sign.then_some(&self.signer), &mut self.line)
        {
            // Not sealed (the chain did not move) and never will be: the trail misses a
            // record, so commands stay refused until a restart.
            let why = format!(
                "a {} record could not be serialized ({e}); restart the sidecar and report this",
                r.kind.as_str()
            );
            tracing::error!(session = r.session.as_deref().unwrap_or("-"), error = %why, "an audit record is lost");
            self.set_broken(&why);
            self.unrecordable = Some(why);
            return;
        }
        if sign {
            *unsigned_since = None;
        } else if unsigned_since.is_none() {
            *unsigned_since = Some(Instant::now());
        }
        self.dirty = true;
        if self.unwritten.is_empty() {
            match self.appender.append(&self.line) {
                Ok(()) => return,
                Err(e) => self.failed(format!("write the spill journal: {e}")),
            }
        }
        self.unwritten.push_back(std::mem::take(&mut self.line));
    }

    /// The sessions still open end, then the stream.
    fn end_stream(&mut self, unsigned_since: &mut Option<Instant>) {
        for session in self.chain.open_sessions() {
            let mut end = Record::new(RecordKind::SessionEnd, crate::clock::now());
            end.session = Some(session);
            end.note = Some("the sidecar stopped".into());
            self.write(&mut end, unsigned_since);
        }
        let mut end = Record::new(RecordKind::StreamEnd, crate::clock::now());
        end.note = Some("the sidecar stopped".into());
        self.write(&mut end, unsigned_since);
    }

    /// The journal failed (`why`): new commands are refused and the writer retries.
    fn failed(&mut self, why: String) {
        let waiting = self.unwritten.len();
        match &mut self.outage {
            Some(o) => {
                o.tries += 1;
                o.backoff = (o.backoff * 2).min(RETRY_MAX);
                if o.why != why {
                    tracing::error!(error = %why, waiting, "audit records still cannot be written: new commands stay refused, retrying");
                    o.why.clone_from(&why);
                    self.set_broken(&why);
                }
            }
            None => {
                tracing::error!(error = %why, "audit records cannot be written: refusing new commands and retrying (free space on, or repair, the audit spill directory's volume)");
                self.set_broken(&why);
                self.outage = Some(Outage {
                    since: Instant::now(),
                    why,
                    tries: 1,
                    backoff: RETRY_FIRST,
                });
            }
        }
    }

    /// Waits out the outage's backoff, then tries to write what waits: the sealed lines the
    /// journal did not take, the lines it took but did not write, and a sync that is due.
    /// When all is written the outage ends and commands are admitted again.
    fn retry(&mut self) {
        let Some(backoff) = self.outage.as_ref().map(|o| o.backoff) else {
            return;
        };
        std::thread::sleep(backoff);
        let tried = self.write_waiting();
        match tried {
            Err(why) => self.failed(why),
            Ok(()) => {
                self.dirty = false;
                if let Some(o) = self.outage.take() {
                    tracing::info!(
                        after_ms = o.since.elapsed().as_millis() as u64,
                        tries = o.tries,
                        "audit records are written again, none lost: new commands are admitted"
                    );
                }
                match &self.unrecordable {
                    Some(why) => self.set_broken(&why.clone()),
                    None => self.clear_broken(),
                }
            }
        }
    }

    /// Writes what waits: the sealed lines the journal did not take, in order, then what it
    /// took and did not write, then a sync that is due.
    fn write_waiting(&mut self) -> Result<(), String> {
        while let Some(line) = self.unwritten.front() {
            self.appender
                .append(line)
                .map_err(|e| format!("write the spill journal: {e}"))?;
            self.unwritten.pop_front();
        }
        self.appender
            .flush()
            .map_err(|e| format!("write the spill journal: {e}"))?;
        self.appender
            .sync()
            .map_err(|e| format!("sync the spill journal: {e}"))
    }

    fn set_broken(&self, why: &str) {
        if let Ok(mut b) = self.health.broken.lock() {
            *b = Some(why.to_owned());
        }
        self.health.is_broken.store(true, Ordering::Release);
    }

    fn clear_broken(&self) {
        self.health.is_broken.store(false, Ordering::Release);
        if let Ok(mut b) = self.health.broken.lock() {
            *b = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_io_is_split_at_character_boundaries_with_nothing_lost() {
        let text = format!("{}é{}", "a".repeat(16383), "b".repeat(20000));
        let parts: Vec<&str> = pieces(&text, IO_RECORD_MAX).collect();
        assert_eq!(parts.concat(), text);
        assert!(
            parts
                .iter()
                .all(|p| p.len() <= IO_RECORD_MAX && !p.is_empty())
        );
        assert_eq!(
            parts[0].len(),
            16383,
            "the cut moves back to the character boundary"
        );
        assert_eq!(pieces("", 10).count(), 0);
    }

    /// Every record in the journal, in order.
    fn journal(dir: &Path) -> Vec<Record> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("segments"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        files
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .flat_map(|t| {
                t.lines()
                    .map(|l| serde_json::from_str::<Record>(l).expect("a record"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Every line of the journal, with where it was read.
    fn journal_lines(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("segments"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|p| {
                let data = std::fs::read(p).expect("a segment");
                data.split(|b| *b == b'\n')
                    .enumerate()
                    .filter(|(_, l)| !l.is_empty())
                    .map(|(i, l)| (format!("{}:{}", p.display(), i + 1), l.to_vec()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// What `f` gives, once it gives something within `timeout`.
    fn wait_for<T>(mut f: impl FnMut() -> Option<T>, timeout: Duration) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A pipeline writing to `dir/spill` (no fsync, a queue of `queue` records when set) and
    /// one session on it.
    fn pipeline(
        dir: &Path,
        protocol: Protocol,
        queue: Option<usize>,
    ) -> (Auditor, SessionRecorder) {
        let mut config = Config::new(dir.join("spill"), dir.join("key"));
        config.sync = false;
        if let Some(q) = queue {
            config.queue = q;
        }
        let auditor = Auditor::start(config, Vec::new()).expect("the pipeline starts");
        let rec = auditor
            .session("agent", "db", protocol, None)
            .expect("a session");
        (auditor, rec)
    }

    /// Ends the session and the pipeline; the records it wrote to `dir/spill`.
    fn finish(auditor: Auditor, rec: SessionRecorder, dir: &Path) -> Vec<Record> {
        drop(rec);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(auditor.shutdown(Duration::from_secs(5)));
        journal(&dir.join("spill"))
    }

    #[test]
    fn a_tracked_session_ends_with_an_outcome_for_every_request() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (auditor, rec) = pipeline(dir.path(), Protocol::Kubernetes, None);
        rec.track_outcomes();
        for id in [1, 2] {
            let mut r = rec.base(RecordKind::Request);
            r.request = Some(agentgate_crds::audit::Request {
                id,
                ..Default::default()
            });
            rec.emit(r).expect("accepted");
        }
        let mut o = rec.base(RecordKind::Outcome);
        o.outcome = Some(agentgate_crds::audit::Outcome {
            id: 1,
            ..Default::default()
        });
        rec.emit(o).expect("accepted");
        // Request 3 is an upgrade whose relay writes its outcome after the connection ends.
        let mut r = rec.base(RecordKind::Request);
        r.request = Some(agentgate_crds::audit::Request {
            id: 3,
            ..Default::default()
        });
        rec.emit(r).expect("accepted");
        rec.answered_elsewhere(3);
        // The client goes away while request 2 is served: the session's end records its
        // outcome, once; the handler's own outcome, written late, is not written again.
        rec.end("the connection closed");
        rec.end("again");
        for id in [2, 3] {
            let mut late = rec.base(RecordKind::Outcome);
            late.outcome = Some(agentgate_crds::audit::Outcome {
                id,
                error: Some("late".into()),
                ..Default::default()
            });
            rec.emit(late).expect("accepted");
        }
        let outcomes: Vec<Record> = finish(auditor, rec, dir.path())
            .into_iter()
            .filter(|r| r.kind == RecordKind::Outcome)
            .collect();
        assert_eq!(outcomes.len(), 3, "{outcomes:?}");
        let ended = outcomes[1].outcome.clone().expect("an outcome");
        assert_eq!(ended.id, 2);
        assert_eq!(
            ended.error.as_deref(),
            Some("the session ended (the connection closed) before the request was answered")
        );
        let relayed = outcomes[2].outcome.clone().expect("an outcome");
        assert_eq!((relayed.id, relayed.error.as_deref()), (3, Some("late")));
    }

    #[test]
    fn the_trails_times_never_go_back() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (auditor, rec) = pipeline(dir.path(), Protocol::Postgres, None);
        // Stamped on two threads, queued in the other order.
        let early = rec.base(RecordKind::Request);
        std::thread::sleep(Duration::from_millis(5));
        let late = rec.base(RecordKind::Request);
        let (t_early, t_late) = (early.time, late.time);
        assert!(t_early < t_late);
        rec.emit(late).expect("accepted");
        rec.emit(early).expect("accepted");
        let times: Vec<jiff::Timestamp> = finish(auditor, rec, dir.path())
            .into_iter()
            .map(|r| r.time)
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        assert_eq!(
            times.iter().filter(|t| **t == t_late).count(),
            2,
            "{times:?}"
        );
    }

    #[test]
    fn a_full_queue_holds_the_gateway_back_then_refuses_and_loses_nothing() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (auditor, rec) = pipeline(dir.path(), Protocol::Postgres, Some(4));
        // The writer stalls: the queue fills, then a record waits for room and, when none
        // comes within QUEUE_WAIT, is refused with why.
        let stalled = auditor.journal.stall_writer();
        // A first record, then time for the writer to take it and stop at its flush, so
        // the queue's bound is what holds the next ones.
        rec.emit(rec.base(RecordKind::Request)).expect("accepted");
        std::thread::sleep(Duration::from_millis(100));
        let mut accepted = 1;
        let started = Instant::now();
        let refused = loop {
            match rec.emit(rec.base(RecordKind::Request)) {
                Ok(()) => accepted += 1,
                Err(why) => break why,
            }
            assert!(accepted < 100, "a stalled writer's queue never filled");
        };
        assert_eq!(
            accepted,
            1 + 4,
            "the queue holds 4, beyond the record being written"
        );
        assert!(started.elapsed() >= QUEUE_WAIT, "refused without waiting");
        assert!(
            refused.contains("audit queue stayed full") && refused.contains("more CPU"),
            "{refused}"
        );
        // A record that waits is taken as soon as the writer moves again.
        let waiting = std::thread::spawn({
            let auditor = auditor.clone();
            move || {
                let mut r = Record::new(RecordKind::Checkpoint, crate::clock::now());
                r.note = Some("waited".into());
                auditor.record(r)
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(stalled);
        assert_eq!(waiting.join().expect("the sender"), Ok(()));
        // Every accepted request and the record that waited: nothing accepted is lost,
        // nothing refused is written.
        let written: Vec<(String, Option<String>)> = finish(auditor, rec, dir.path())
            .into_iter()
            .map(|r| (r.kind.as_str().to_owned(), r.note))
            .collect();
        let requests = written.iter().filter(|(k, _)| k == "Request").count();
        assert_eq!(requests, accepted, "{written:?}");
        assert_eq!(
            written
                .iter()
                .filter(|(_, n)| n.as_deref() == Some("waited"))
                .count(),
            1,
            "{written:?}"
        );
        assert_eq!(written.last().map(|(k, _)| k.as_str()), Some("StreamEnd"));
    }

    /// The disk fills while a burst of records is written (a line cut short, then lines the
    /// journal cannot take): new commands are refused, saying why and what to do, while the
    /// records of commands already taken wait; once there is room they are all written, in
    /// order, once, and the chain verifies whole against the sidecar's key.
    #[test]
    fn a_full_disk_refuses_commands_then_writes_every_record_with_the_chain_whole() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (auditor, rec) = pipeline(dir.path(), Protocol::Postgres, None);
        let request = |id: u64, text: String| {
            let mut r = rec.base(RecordKind::Request);
            r.request = Some(agentgate_crds::audit::Request {
                id,
                text,
                ..Default::default()
            });
            r
        };
        rec.emit(request(1, "SELECT 1".into())).expect("accepted");
        // The writer stops at a flush while a burst (more than the journal gathers in
        // memory) is queued; then the disk fills, with room left for part of a line.
        let stalled = auditor.journal.stall_writer();
        rec.emit(request(2, "SELECT 2".into())).expect("accepted");
        std::thread::sleep(Duration::from_millis(100));
        for id in 3..=40 {
            rec.emit(request(id, "x".repeat(16 << 10)))
                .expect("accepted");
        }
        auditor.journal.set_space(Some(1000));
        drop(stalled);
        let refused = wait_for(|| auditor.admit().err(), Duration::from_secs(10))
            .expect("new commands are refused while the disk is full");
        assert!(
            refused.contains("audit trail cannot be written")
                && refused.contains("No space left on device")
                && refused.contains("free space"),
            "{refused}"
        );
        assert!(
            auditor
                .session("agent", "db", Protocol::Postgres, None)
                .is_err(),
            "a new session is refused"
        );
        // The records of commands already running are taken, and wait their turn.
        for id in 41..=45 {
            rec.emit(request(id, format!("SELECT {id}")))
                .expect("accepted");
        }
        // Several retries fail meanwhile.
        std::thread::sleep(RETRY_FIRST * 8);
        assert!(auditor.admit().is_err(), "still refused");
        // Room again: everything waiting is written, and commands are admitted again.
        auditor.journal.set_space(None);
        wait_for(|| auditor.admit().ok(), RETRY_MAX * 5)
            .expect("admitted once the waiting records are written");
        rec.emit(request(46, "SELECT 46".into())).expect("accepted");
        let key = auditor.public_key().public_key.clone();
        let records = finish(auditor, rec, dir.path());
        let ids: Vec<u64> = records
            .iter()
            .filter_map(|r| r.request.as_ref().map(|q| q.id))
            .collect();
        assert_eq!(
            ids,
            (1..=46).collect::<Vec<u64>>(),
            "every request, in order, once"
        );
        assert_eq!(records.last().map(|r| r.kind), Some(RecordKind::StreamEnd));
        let lines = journal_lines(&dir.path().join("spill"));
        let report = agentgate_crds::audit::verify(
            lines.iter().map(|(at, l)| (at.clone(), l.as_slice())),
            &agentgate_crds::audit::Expectations {
                keys: vec![key],
                ..Default::default()
            },
        );
        assert!(report.ok(), "{:#?}", report.problems);
        assert_eq!(report.records, records.len() as u64);
        assert_eq!(report.duplicates, 0);
    }

    /// The journal refuses a line in the middle of a burst (its disk full): the sealed line
    /// and every one sealed after it wait in order, nothing new is taken from the queue, and
    /// once there is room they are written before anything else: the chain has no gap.
    #[test]
    fn sealed_records_the_journal_refuses_wait_in_order_and_are_written_first() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (spill, appender) = Journal::open(dir.path(), true).expect("a journal");
        let (signer, _) = Signer::generate().expect("a key");
        let key = signer.public().public_key.clone();
        let health = Arc::new(Health::default());
        let mut writer = Writer {
            chain: Chain::new("run-1"),
            signer,
            appender,
            health: health.clone(),
            checkpoint_records: 1000,
            checkpoint_every: Duration::from_secs(1),
            line: Vec::new(),
            unwritten: VecDeque::new(),
            outage: None,
            unrecordable: None,
            dirty: false,
            last_time: None,
        };
        let mut unsigned = None;
        let mut start = Record::new(RecordKind::StreamStart, crate::clock::now());
        start.key = Some(writer.signer.public().clone());
        writer.write(&mut start, &mut unsigned);
        // Room for part of a line: the burst (more than the journal gathers) is refused
        // part way.
        spill.set_space(Some(1000));
        for id in 1..=40 {
            let mut r = Record::new(RecordKind::Request, crate::clock::now());
            r.request = Some(agentgate_crds::audit::Request {
                id,
                text: "x".repeat(16 << 10),
                ..Default::default()
            });
            writer.write(&mut r, &mut unsigned);
        }
        let waiting = writer.unwritten.len();
        assert!(
            (1..40).contains(&waiting),
            "{waiting} lines wait: the journal took the first ones"
        );
        assert!(writer.outage.is_some());
        assert!(health.is_broken.load(Ordering::Acquire));
        // Still full: a retry fails, and what waits stays.
        writer.retry();
        assert_eq!(writer.unwritten.len(), waiting);
        assert!(health.is_broken.load(Ordering::Acquire));
        // Room again.
        spill.set_space(None);
        writer.retry();
        assert!(writer.unwritten.is_empty() && writer.outage.is_none());
        assert!(!health.is_broken.load(Ordering::Acquire), "admitted again");
        writer.end_stream(&mut unsigned);
        writer.appender.flush().expect("flushed");
        let lines = journal_lines(dir.path());
        let report = agentgate_crds::audit::verify(
            lines.iter().map(|(at, l)| (at.clone(), l.as_slice())),
            &agentgate_crds::audit::Expectations {
                keys: vec![key],
                ..Default::default()
            },
        );
        assert!(report.ok(), "{:#?}", report.problems);
        let ids: Vec<u64> = journal(dir.path())
            .iter()
            .filter_map(|r| r.request.as_ref().map(|q| q.id))
            .collect();
        assert_eq!(ids, (1..=40).collect::<Vec<u64>>());
    }
}
