//! The hash chain: sealing records as they are written, and verifying a trail.
//!
//! A record's hash is the SHA-256 of its canonical form: the record serialized by this crate
//! (fields in schema order, no whitespace) with `hash` and `sig` left out. Because `hash` and
//! `sig` are the last two fields, the line a sink stores is the canonical form with them
//! appended, and a verifier recomputes the hash from the parsed record.

use std::collections::{BTreeMap, HashMap};

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;

use super::record::{Record, RecordKind, SCHEMA_VERSION, SigningKey};

/// Errors of sealing and key handling.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The record could not be serialized (should not happen for records built by this crate).
    #[error("serialize the audit record: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The signing key is not a valid Ed25519 PKCS#8 document.
    #[error("the audit signing key is not an Ed25519 PKCS#8 key: {0}")]
    BadKey(String),
    /// Generating a key failed.
    #[error("generate an Ed25519 key: {0}")]
    KeyGen(String),
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The canonical form of `record` (its `hash` and `sig` ignored).
pub fn canonical(record: &Record) -> Result<Vec<u8>, ChainError> {
    #[derive(Serialize)]
    struct Unsealed<'a>(#[serde(with = "unsealed")] &'a Record);
    mod unsealed {
        use super::Record;
        use serde::Serialize;
        pub fn serialize<S: serde::Serializer>(r: &&Record, s: S) -> Result<S::Ok, S::Error> {
            if r.hash.is_empty() && r.sig.is_none() {
                r.serialize(s)
            } else {
                let mut copy = (*r).clone();
                copy.hash.clear();
                copy.sig = None;
                copy.serialize(s)
            }
        }
    }
    Ok(serde_json::to_vec(&Unsealed(record))?)
}

/// SHA-256 (hex) of the canonical form.
pub fn hash_of(record: &Record) -> Result<String, ChainError> {
    Ok(hex(
        digest::digest(&digest::SHA256, &canonical(record)?).as_ref()
    ))
}

/// The sidecar's signing key (Ed25519). It lives only in the sidecar container.
pub struct Signer {
    pair: Ed25519KeyPair,
    public: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.public.key_id)
            .finish_non_exhaustive()
    }
}

/// The id of a raw Ed25519 public key: the first 16 hex digits of its SHA-256.
pub fn key_id(public_key: &[u8]) -> String {
    let mut id = hex(digest::digest(&digest::SHA256, public_key).as_ref());
    id.truncate(16);
    id
}

impl Signer {
    /// A key from its PKCS#8 document (DER, as written by [`Signer::generate`]).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, ChainError> {
        let pair =
            Ed25519KeyPair::from_pkcs8(der).map_err(|e| ChainError::BadKey(e.to_string()))?;
        let raw = pair.public_key().as_ref().to_vec();
        let public = SigningKey {
            algorithm: "ed25519".to_owned(),
            key_id: key_id(&raw),
            public_key: B64.encode(&raw),
        };
        Ok(Self { pair, public })
    }

    /// A new random key and its PKCS#8 document (to store).
    pub fn generate() -> Result<(Self, Vec<u8>), ChainError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|e| ChainError::KeyGen(e.to_string()))?;
        let der = doc.as_ref().to_vec();
        Ok((Self::from_pkcs8(&der)?, der))
    }

    /// The public half, as recorded in `StreamStart`.
    pub fn public(&self) -> &SigningKey {
        &self.public
    }

    /// The signature (base64) of a record hash (hex).
    pub fn sign(&self, hash_hex: &str) -> String {
        let bytes = unhex(hash_hex).unwrap_or_default();
        B64.encode(self.pair.sign(&bytes).as_ref())
    }
}

/// Seals records into one stream: assigns `stream`, `n`, `prev`, the session fields and the
/// hash, signs when asked, and renders the line a sink stores.
#[derive(Debug)]
pub struct Chain {
    stream: String,
    next: u64,
    head: String,
    sessions: HashMap<String, (u64, String)>,
    unsigned: u64,
}

impl Chain {
    /// A new stream named `stream` (its first record is `n = 0`).
    pub fn new(stream: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            next: 0,
            head: String::new(),
            sessions: HashMap::new(),
            unsigned: 0,
        }
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The next record's position and the head hash.
    pub fn head(&self) -> (u64, &str) {
        (self.next, &self.head)
    }

    /// Records sealed since the last signature.
    pub fn unsigned(&self) -> u64 {
        self.unsigned
    }

    /// The sessions open in the stream (sealed a record, no `SessionEnd` yet).
    pub fn open_sessions(&self) -> Vec<String> {
        let mut open: Vec<String> = self.sessions.keys().cloned().collect();
        open.sort();
        open
    }

    /// The head of a session (last `seq` and hash), while it is open.
    pub fn session_head(&self, session: &str) -> Option<(u64, &str)> {
        self.sessions.get(session).map(|(s, h)| (*s, h.as_str()))
    }

    /// Seals `record` as the stream's next record, signing it with `signer` when given, and
    /// returns the line to store (JSON, no newline). The record's chain fields are
    /// overwritten; a `SessionEnd` closes its session.
    pub fn seal(
        &mut self,
        record: &mut Record,
        signer: Option<&Signer>,
    ) -> Result<Vec<u8>, ChainError> {
        let mut line = Vec::with_capacity(512);
        self.seal_into(record, signer, &mut line)?;
        Ok(line)
    }

    /// [`Self::seal`] writing the line into `line` (cleared first), so a writer can reuse
    /// one buffer.
    pub fn seal_into(
        &mut self,
        record: &mut Record,
        signer: Option<&Signer>,
        line: &mut Vec<u8>,
    ) -> Result<(), ChainError> {
        record.v = SCHEMA_VERSION;
        record.stream.clone_from(&self.stream);
        record.n = self.next;
        record.prev.clone_from(&self.head);
        record.hash.clear();
        record.sig = None;
        if let Some(session) = &record.session {
            let (seq, prev) = match self.sessions.get(session) {
                Some((seq, h)) => (seq + 1, h.clone()),
                None => (0, self.head.clone()),
            };
            record.seq = Some(seq);
            record.session_prev = Some(prev);
        } else {
            record.seq = None;
            record.session_prev = None;
        }
        line.clear();
        serde_json::to_writer(&mut *line, record)?;
        let hash = hex(digest::digest(&digest::SHA256, line).as_ref());
        // The stored line is the canonical form with `hash` (and `sig`) appended: they are
        // the last fields of the schema.
        line.pop();
        line.extend_from_slice(b",\"hash\":\"");
        line.extend_from_slice(hash.as_bytes());
        line.push(b'"');
        if let Some(signer) = signer {
            let sig = signer.sign(&hash);
            line.extend_from_slice(b",\"sig\":\"");
            line.extend_from_slice(sig.as_bytes());
            line.push(b'"');
            record.sig = Some(sig);
            self.unsigned = 0;
        } else {
            self.unsigned += 1;
        }
        line.push(b'}');
        if let Some(session) = &record.session {
            if record.kind == RecordKind::SessionEnd {
                self.sessions.remove(session);
            } else if let Some(head) = self.sessions.get_mut(session) {
                head.0 = record.seq.unwrap_or(0);
                head.1.clone_from(&hash);
            } else {
                self.sessions
                    .insert(session.clone(), (record.seq.unwrap_or(0), hash.clone()));
            }
        }
        self.next += 1;
        self.head.clone_from(&hash);
        record.hash = hash;
        Ok(())
    }
}

/// What is wrong with a trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum ProblemKind {
    /// A line is not a record of this schema version.
    Malformed,
    /// A record's content does not match its hash.
    Edited,
    /// A record does not link to the one before it (edited and re-hashed, or replaced).
    Broken,
    /// Records are missing.
    Missing,
    /// A record is out of order.
    Reordered,
    /// A signature does not verify, or the key is not the trusted one.
    BadSignature,
    /// The trail ends before a point it is known to have reached.
    Truncated,
    /// Records no valid signature covers: they could have been written by anyone.
    Unsigned,
}

/// One finding of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// The stream concerned.
    pub stream: String,
    /// The record concerned (its `n`), when known.
    pub n: Option<u64>,
    /// Where it was read (`file:line`, `table row`).
    pub location: String,
    /// What was found, in a sentence.
    pub message: String,
}

/// A stream as the verifier saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StreamSummary {
    /// The stream.
    pub stream: String,
    /// Records read.
    pub records: u64,
    /// First and last `n` seen.
    pub first: u64,
    /// Last `n` seen.
    pub last: u64,
    /// The last `n` covered by a valid signature.
    pub signed_through: Option<u64>,
    /// The key the stream was signed with.
    pub key_id: Option<String>,
    /// Whether a `StreamEnd` closes it.
    pub ended: bool,
    /// Sessions seen.
    pub sessions: u64,
}

/// The result of verifying a trail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Records read.
    pub records: u64,
    /// Exact duplicates skipped (a sink may deliver a record twice after a crash).
    pub duplicates: u64,
    /// The streams found.
    pub streams: Vec<StreamSummary>,
    /// What is wrong; empty when the trail verifies.
    pub problems: Vec<Problem>,
    /// What a reader should know but is not proof of tampering (an open stream, an unsigned
    /// tail, an unpinned key).
    pub warnings: Vec<String>,
}

impl Report {
    /// Whether the trail verifies.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What a verifier trusts and expects.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// Trusted signing keys (raw Ed25519 public keys, base64). When empty, each stream's own
    /// `StreamStart` key is used and a warning says the key is not pinned.
    pub keys: Vec<String>,
    /// Accept streams whose beginning is not in the input (rotated files deleted by retention).
    pub allow_partial: bool,
    /// Accept streams that have no `StreamEnd` and that no later stream continues, and
    /// records not yet covered by a signature at their end (the trail of a sidecar still
    /// running: it signs at least every second). Without it both are problems: the trail may
    /// have been cut. Records after a `StreamEnd`, and a stream no valid signature covers at
    /// all, are problems either way.
    pub allow_open: bool,
    /// Session heads known from elsewhere (an AgentSession's status): session → (seq, hash).
    /// A session named here with no record in the trail is a problem (its records were
    /// deleted, or are in a sink not read).
    pub session_heads: BTreeMap<String, (u64, String)>,
}

#[derive(Default)]
struct StreamState {
    summary: StreamSummary,
    started: bool,
    next: u64,
    last_hash: String,
    key: Option<Vec<u8>>,
    sessions: HashMap<String, (u64, String, bool)>,
    /// The hashes of the last records, to recognise a re-delivered range.
    recent: std::collections::VecDeque<(u64, String)>,
    /// The stream this one continues (from its StreamStart, when validly signed).
    previous: Option<super::record::StreamLink>,
    /// A later stream continues this one.
    continued: bool,
    /// A later stream's signed start names this one (whether or not the link matches: a
    /// mismatch is reported on its own).
    linked: bool,
    /// The `n` of the stream's `StreamEnd`.
    ended_at: Option<u64>,
    /// The first record read after the `StreamEnd` (its `n` and where it was read).
    after_end: Option<(u64, String)>,
}

/// How many recent hashes per stream the verifier keeps to recognise re-delivered records.
const RECENT: usize = 65_536;

/// An Ed25519 public key as `--key` and stream starts give it (base64): its 32 bytes, or
/// `None` when the text is not one.
pub fn public_key_bytes(text: &str) -> Option<Vec<u8>> {
    B64.decode(text.trim()).ok().filter(|raw| raw.len() == 32)
}

/// Verifies a trail: `lines` yields each stored line with where it was read. Streams are
/// checked independently; within a stream, records must appear in order.
pub fn verify<'a, I>(lines: I, expect: &Expectations) -> Report
where
    I: IntoIterator<Item = (String, &'a [u8])>,
{
    let trusted: Vec<Vec<u8>> = expect
        .keys
        .iter()
        .filter_map(|k| B64.decode(k.trim()).ok())
        .collect();
    let mut report = Report::default();
    let mut streams: BTreeMap<String, StreamState> = BTreeMap::new();
    for (location, line) in lines {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let mut record: Record = match serde_json::from_slice(line) {
            Ok(r) => r,
            Err(e) => {
                report.problems.push(Problem {
                    kind: ProblemKind::Malformed,
                    stream: String::new(),
                    n: None,
                    location,
                    message: format!("not an agentgate audit record: {e}"),
                });
                continue;
            }
        };
        // Sequence numbers count records: one no stream can reach is forged.
        if record.n >= u64::MAX / 2 {
            report.problems.push(Problem {
                kind: ProblemKind::Malformed,
                stream: record.stream.clone(),
                n: Some(record.n),
                location,
                message: format!("n={} is beyond any stream's length", record.n),
            });
            continue;
        }
        if record.v != SCHEMA_VERSION {
            report.problems.push(Problem {
                kind: ProblemKind::Malformed,
                stream: record.stream.clone(),
                n: Some(record.n),
                location,
                message: format!(
                    "schema version {} is not {SCHEMA_VERSION}, the version this verifier knows",
                    record.v
                ),
            });
            continue;
        }
        report.records += 1;
        let state = streams.entry(record.stream.clone()).or_default();
        check(&mut report, state, &mut record, &location, &trusted, expect);
    }
    // Streams continued by a later one (a restart): the link, signed by the later stream,
    // covers the earlier one's end.
    let links: Vec<(String, super::record::StreamLink)> = streams
        .iter()
        .filter_map(|(name, s)| s.previous.clone().map(|l| (name.clone(), l)))
        .collect();
    for (from, link) in links {
        if let Some(prev) = streams.get_mut(&link.stream) {
            prev.linked = true;
        }
        match streams.get_mut(&link.stream) {
            None if !expect.allow_partial => report.problems.push(Problem {
                kind: ProblemKind::Missing,
                stream: link.stream.clone(),
                n: None,
                location: String::new(),
                message: format!(
                    "stream {} is not in the input, but stream {from} continues it from n={}: it was deleted",
                    link.stream, link.n
                ),
            }),
            None => {}
            Some(prev) if prev.summary.last < link.n => report.problems.push(Problem {
                kind: ProblemKind::Truncated,
                stream: link.stream.clone(),
                n: Some(prev.summary.last + 1),
                location: String::new(),
                message: format!(
                    "stream {} ends at n={} here, but stream {from} continues it from n={}: its last records were cut",
                    link.stream, prev.summary.last, link.n
                ),
            }),
            Some(prev) => {
                if prev.summary.last == link.n && prev.last_hash != link.hash {
                    report.problems.push(Problem {
                        kind: ProblemKind::Broken,
                        stream: link.stream.clone(),
                        n: Some(link.n),
                        location: String::new(),
                        message: format!(
                            "record n={} of stream {} is not the one stream {from} continues from: it was edited or replaced",
                            link.n, link.stream
                        ),
                    });
                } else if prev.summary.last > link.n {
                    report.problems.push(Problem {
                        kind: ProblemKind::Unsigned,
                        stream: link.stream.clone(),
                        n: Some(link.n + 1),
                        location: String::new(),
                        message: format!(
                            "records n={}..={} of stream {} come after the point stream {from} continued it from: they were added later",
                            link.n + 1,
                            prev.summary.last,
                            link.stream
                        ),
                    });
                } else {
                    prev.summary.signed_through = Some(link.n);
                    prev.continued = true;
                }
            }
        }
    }
    // Every session an AgentSession knows must have records here: a session whose records
    // are all gone (a deleted stream, a cut tail) would otherwise not show at all.
    for (session, (seq, _)) in &expect.session_heads {
        if !streams.values().any(|s| s.sessions.contains_key(session)) {
            report.problems.push(Problem {
                kind: ProblemKind::Missing,
                stream: String::new(),
                n: None,
                location: String::new(),
                message: format!(
                    "session {session}: its AgentSession records its chain up to seq {seq}, but its records are missing from the trail: they were deleted (a cut end or a deleted stream), or they are in a sink not read here"
                ),
            });
        }
    }
    for (name, mut state) in streams {
        state.summary.stream = name.clone();
        state.summary.sessions = state.sessions.len() as u64;
        // Nothing follows a stream's end: a sidecar writes its StreamEnd last. Records after
        // it were added later, whoever signed them, with or without --open.
        let end = match (&state.after_end, state.ended_at) {
            (Some((first, location)), Some(end)) => {
                report.problems.push(Problem {
                    kind: ProblemKind::Unsigned,
                    stream: name.clone(),
                    n: Some(*first),
                    location: location.clone(),
                    message: format!(
                        "stream {name}: records n={first}..={} come after its StreamEnd (n={end}): a stream ends once, so they were added later",
                        state.summary.last
                    ),
                });
                end
            }
            _ => state.summary.last,
        };
        // A stream without an end that no later stream continues: either its sidecar still
        // runs, or the trail was cut after it (its last records, or whole newer streams).
        if !state.summary.ended && !state.linked {
            if expect.allow_open {
                report.warnings.push(format!(
                    "stream {name} has no StreamEnd after n={}: the sidecar is still running, was killed, or the end of the trail was cut",
                    state.summary.last
                ));
            } else {
                report.problems.push(Problem {
                    kind: ProblemKind::Truncated,
                    stream: name.clone(),
                    n: Some(state.summary.last + 1),
                    location: String::new(),
                    message: format!(
                        "stream {name}: the trail ends at n={} without a StreamEnd, and no later stream continues it: its end was cut (records or newer streams deleted), or its sidecar is still running or was killed (verify a running sidecar's trail with --open)",
                        state.summary.last
                    ),
                });
            }
        }
        match state.summary.signed_through {
            // Not one record of the stream carries a valid signature: nothing shows that the
            // sidecar wrote any of it (a running sidecar signs its start and then at least
            // every second), so this is not accepted as an open tail either.
            None => report.problems.push(Problem {
                kind: ProblemKind::Unsigned,
                stream: name.clone(),
                n: Some(state.summary.first),
                location: String::new(),
                message: format!(
                    "stream {name}: none of its records n={}..={end} is covered by a valid signature, so anyone could have written them",
                    state.summary.first
                ),
            }),
            Some(s) if s < end => {
                let message = format!(
                    "stream {name}: records n={}..={end} are not covered by a signature, so anyone could have written them (a running sidecar signs at least every second: verify again, or pass --open)",
                    s + 1
                );
                if expect.allow_open {
                    report.warnings.push(message);
                } else {
                    report.problems.push(Problem {
                        kind: ProblemKind::Unsigned,
                        stream: name.clone(),
                        n: Some(s + 1),
                        location: String::new(),
                        message,
                    });
                }
            }
            Some(_) => {}
        }
        if state.summary.ended {
            for (session, (_, _, ended)) in &state.sessions {
                if !ended {
                    report.problems.push(Problem {
                        kind: ProblemKind::Missing,
                        stream: name.clone(),
                        n: None,
                        location: String::new(),
                        message: format!(
                            "session {session} has no SessionEnd in a stream that ended: its last records were deleted"
                        ),
                    });
                }
            }
        }
        for (session, (seq, hash)) in &expect.session_heads {
            let Some((last_seq, last_hash, _)) = state.sessions.get(session) else {
                continue;
            };
            if last_seq < seq {
                report.problems.push(Problem {
                    kind: ProblemKind::Truncated,
                    stream: name.clone(),
                    n: None,
                    location: String::new(),
                    message: format!(
                        "session {session} ends at seq {last_seq} here, but its AgentSession recorded seq {seq}: records were cut"
                    ),
                });
            } else if last_seq == seq && last_hash != hash {
                report.problems.push(Problem {
                    kind: ProblemKind::Broken,
                    stream: name.clone(),
                    n: None,
                    location: String::new(),
                    message: format!(
                        "session {session}'s record seq {seq} does not have the hash its AgentSession recorded"
                    ),
                });
            }
        }
        report.streams.push(state.summary);
    }
    if expect.keys.is_empty() && !report.streams.is_empty() {
        report.warnings.push(
            "signatures were checked against each stream's own key: pass the sidecar's public key (--key) to pin it".to_owned(),
        );
    }
    report
}

fn check(
    report: &mut Report,
    state: &mut StreamState,
    record: &mut Record,
    location: &str,
    trusted: &[Vec<u8>],
    expect: &Expectations,
) {
    let stream = record.stream.clone();
    let n = record.n;
    let problem = |kind, message: String| Problem {
        kind,
        stream: stream.clone(),
        n: Some(n),
        location: location.to_owned(),
        message,
    };
    let stored_hash = std::mem::take(&mut record.hash);
    let sig = record.sig.take();
    let actual = hash_of(record).unwrap_or_default();
    if state.summary.records > 0 && n < state.next {
        if state
            .recent
            .iter()
            .rev()
            .any(|(m, h)| *m == n && *h == stored_hash)
            // A copy is a duplicate only when it is the same record: an edited copy that
            // keeps the old hash is an edit.
            && actual == stored_hash
        {
            report.duplicates += 1;
            report.records -= 1;
            return;
        }
        report.problems.push(problem(
            ProblemKind::Reordered,
            format!(
                "record n={n} appears after n={}: the trail was reordered or a record replayed",
                state.next - 1
            ),
        ));
        return;
    }
    if state.summary.ended && state.after_end.is_none() {
        state.after_end = Some((n, location.to_owned()));
    }
    if actual != stored_hash {
        report.problems.push(problem(
            ProblemKind::Edited,
            format!("record n={n} was edited: its content does not match its hash"),
        ));
    }
    if state.summary.records == 0 {
        state.summary.first = n;
        if n != 0 && !expect.allow_partial {
            report.problems.push(problem(
                ProblemKind::Missing,
                format!("stream begins at n={n}: records n=0..{n} are missing"),
            ));
        }
    } else if n > state.next {
        report.problems.push(problem(
            ProblemKind::Missing,
            format!(
                "records n={}..{} are missing before this record (deleted)",
                state.next,
                n - 1
            ),
        ));
    } else if record.prev != state.last_hash {
        report.problems.push(problem(
            ProblemKind::Broken,
            format!(
                "record n={n} does not follow record n={}: one of them was edited and re-hashed, or replaced",
                n - 1
            ),
        ));
    }
    if record.kind == RecordKind::StreamStart {
        if n != 0 || state.started {
            report.problems.push(problem(
                ProblemKind::Broken,
                format!("record n={n} starts the stream again: a stream starts once, at n=0"),
            ));
        }
        state.started = true;
        if record.key.is_none() {
            report.problems.push(problem(
                ProblemKind::BadSignature,
                "the stream's start carries no signing key".to_owned(),
            ));
        }
        if let Some(key) = &record.key {
            state.summary.key_id = Some(key.key_id.clone());
            match B64.decode(&key.public_key) {
                // Unpinned only when no key was given at all: a key given that does not
                // decode trusts nothing (never the stream's own).
                Ok(raw) if expect.keys.is_empty() || trusted.contains(&raw) => {
                    state.key = Some(raw)
                }
                Ok(_) => report.problems.push(problem(
                    ProblemKind::BadSignature,
                    format!(
                        "stream is signed with key {} which is not a trusted key",
                        key.key_id
                    ),
                )),
                Err(_) => report.problems.push(problem(
                    ProblemKind::Malformed,
                    "the stream's public key is not base64".to_owned(),
                )),
            }
        }
    }
    if let Some(sig) = &sig {
        let sig_ok = B64.decode(sig).ok().is_some_and(|s| {
            let msg = unhex(&stored_hash).unwrap_or_default();
            let keys: Vec<&Vec<u8>> = match &state.key {
                Some(k) => vec![k],
                None if !state.started => trusted.iter().collect(),
                None => vec![],
            };
            keys.iter()
                .any(|k| UnparsedPublicKey::new(&ED25519, k).verify(&msg, &s).is_ok())
        });
        if sig_ok && actual == stored_hash {
            state.summary.signed_through = Some(n);
            if record.kind == RecordKind::StreamStart {
                state.previous.clone_from(&record.previous);
            }
        } else if !sig_ok {
            report.problems.push(problem(
                ProblemKind::BadSignature,
                format!("record n={n}'s signature does not verify with the stream's key"),
            ));
        }
    }
    if sig.is_none()
        && matches!(
            record.kind,
            RecordKind::StreamStart
                | RecordKind::StreamEnd
                | RecordKind::SessionEnd
                | RecordKind::Checkpoint
        )
    {
        report.problems.push(problem(
            ProblemKind::BadSignature,
            format!(
                "record n={n} ({}) is always signed, and this one is not",
                record.kind.as_str()
            ),
        ));
    }
    if let Some(session) = &record.session {
        let seq = record.seq.unwrap_or(0);
        let sprev = record.session_prev.clone().unwrap_or_default();
        match state.sessions.get(session) {
            None if seq == 0 => {
                if sprev != record.prev {
                    report.problems.push(problem(
                        ProblemKind::Broken,
                        format!("session {session} does not start where the stream was"),
                    ));
                }
            }
            None => {
                if !expect.allow_partial || state.summary.records > 0 && state.started {
                    report.problems.push(problem(
                        ProblemKind::Missing,
                        format!(
                            "session {session} begins at seq {seq}: its earlier records are missing"
                        ),
                    ));
                }
            }
            Some((last, h, _)) => {
                if seq != last + 1 {
                    report.problems.push(problem(
                        ProblemKind::Missing,
                        format!(
                            "session {session}: seq {seq} follows seq {last}: records are missing"
                        ),
                    ));
                } else if &sprev != h {
                    report.problems.push(problem(
                        ProblemKind::Broken,
                        format!(
                            "session {session}: seq {seq} does not follow seq {last} (edited and re-hashed, or replaced)"
                        ),
                    ));
                }
            }
        }
        let ended = record.kind == RecordKind::SessionEnd;
        state
            .sessions
            .insert(session.clone(), (seq, stored_hash.clone(), ended));
    }
    if record.kind == RecordKind::StreamEnd && !state.summary.ended {
        state.summary.ended = true;
        state.ended_at = Some(n);
    }
    state.summary.records += 1;
    state.summary.last = n;
    state.next = n + 1;
    if state.recent.len() == RECENT {
        state.recent.pop_front();
    }
    state.recent.push_back((n, stored_hash.clone()));
    state.last_hash = stored_hash;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Decision, Request, StreamLink, Verdict};

    fn record(kind: RecordKind, session: Option<&str>) -> Record {
        let mut r = Record::new(kind, "2026-11-23T04:00:00Z".parse().unwrap());
        r.session = session.map(str::to_owned);
        if kind == RecordKind::Request {
            r.request = Some(Request {
                id: 1,
                text: "SELECT 1".to_owned(),
                ..Default::default()
            });
            r.decision = Some(Decision {
                verdict: Verdict::Allowed,
                rule: Some("baseline".to_owned()),
                grant: None,
                approver: None,
                reason: None,
            });
        }
        r
    }

    /// Seals `records` (kind, session, signed) as the stream `chain`, after a signed start
    /// carrying `previous`.
    fn sealed(
        chain: &mut Chain,
        signer: &Signer,
        previous: Option<StreamLink>,
        records: &[(RecordKind, Option<&str>, bool)],
    ) -> Vec<String> {
        let mut lines = Vec::new();
        if chain.head().0 == 0 {
            let mut start = record(RecordKind::StreamStart, None);
            start.key = Some(signer.public().clone());
            start.previous = previous;
            lines.push(String::from_utf8(chain.seal(&mut start, Some(signer)).unwrap()).unwrap());
        }
        for (kind, session, signed) in records {
            let mut r = record(*kind, *session);
            let line = chain.seal(&mut r, signed.then_some(signer)).unwrap();
            lines.push(String::from_utf8(line).unwrap());
        }
        lines
    }

    /// Session `s`: a start, two requests, a signed checkpoint (the stream's end not yet
    /// written).
    const RUN: &[(RecordKind, Option<&str>, bool)] = &[
        (RecordKind::SessionStart, Some("s"), false),
        (RecordKind::Request, Some("s"), false),
        (RecordKind::Request, Some("s"), false),
        (RecordKind::Checkpoint, None, true),
    ];
    const END: &[(RecordKind, Option<&str>, bool)] = &[
        (RecordKind::SessionEnd, Some("s"), true),
        (RecordKind::StreamEnd, None, true),
    ];

    fn run(lines: &[String], expect: &Expectations) -> Report {
        verify(
            lines
                .iter()
                .enumerate()
                .map(|(i, l)| (format!("audit.jsonl:{}", i + 1), l.as_bytes())),
            expect,
        )
    }

    fn pinned(signer: &Signer) -> Expectations {
        Expectations {
            keys: vec![signer.public().public_key.clone()],
            ..Default::default()
        }
    }

    fn link(lines: &[String]) -> StreamLink {
        let last: Record = serde_json::from_str(lines.last().unwrap()).unwrap();
        StreamLink {
            stream: last.stream,
            n: last.n,
            hash: last.hash,
        }
    }

    fn kinds(report: &Report) -> Vec<(ProblemKind, Option<u64>)> {
        report.problems.iter().map(|p| (p.kind, p.n)).collect()
    }

    #[test]
    fn a_tail_cut_after_a_signed_checkpoint_is_a_problem_unless_open() {
        let (signer, _) = Signer::generate().unwrap();
        let mut chain = Chain::new("run-1");
        let mut lines = sealed(&mut chain, &signer, None, RUN);
        lines.extend(sealed(&mut chain, &signer, None, END));
        assert!(run(&lines, &pinned(&signer)).ok());
        // Cut right after the checkpoint: every record left is signed, only the end is gone.
        let cut = &lines[..5];
        let report = run(cut, &pinned(&signer));
        assert_eq!(kinds(&report), vec![(ProblemKind::Truncated, Some(5))]);
        let message = &report.problems[0].message;
        assert!(message.contains("without a StreamEnd"), "{message}");
        assert!(message.contains("--open"), "{message}");
        // A sidecar still running: accepted when asked, with a warning.
        let open = Expectations {
            allow_open: true,
            ..pinned(&signer)
        };
        let report = run(cut, &open);
        assert!(report.ok(), "{:#?}", report.problems);
        assert!(report.warnings.iter().any(|w| w.contains("no StreamEnd")));
    }

    #[test]
    fn a_deleted_newest_stream_is_a_problem() {
        let (signer, _) = Signer::generate().unwrap();
        // The first run is killed (no end); the second continues it and ends.
        let first = sealed(&mut Chain::new("run-1"), &signer, None, RUN);
        let mut chain = Chain::new("run-2");
        let mut second = sealed(&mut chain, &signer, Some(link(&first)), RUN);
        second.extend(sealed(&mut chain, &signer, None, END));
        let both = [first.clone(), second.clone()].concat();
        let report = run(&both, &pinned(&signer));
        assert!(report.ok(), "{:#?}", report.problems);
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        // The newest stream deleted: the killed one is no longer continued.
        let report = run(&first, &pinned(&signer));
        assert_eq!(kinds(&report), vec![(ProblemKind::Truncated, Some(5))]);
        assert!(report.problems[0].message.contains("stream run-1"));
    }

    #[test]
    fn a_cut_link_is_reported_once() {
        let (signer, _) = Signer::generate().unwrap();
        let first = sealed(&mut Chain::new("run-1"), &signer, None, RUN);
        let mut chain = Chain::new("run-2");
        let mut second = sealed(&mut chain, &signer, Some(link(&first)), RUN);
        second.extend(sealed(&mut chain, &signer, None, END));
        let report = run(&[first[..3].to_vec(), second].concat(), &pinned(&signer));
        // The cut shows against the link (and its unsigned records), not as a second,
        // vaguer "no StreamEnd".
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.kind == ProblemKind::Truncated
                    && p.n == Some(3)
                    && p.message.contains("continues it from n=4")),
            "{:#?}",
            report.problems
        );
        assert!(
            !report
                .problems
                .iter()
                .any(|p| p.message.contains("without a StreamEnd")),
            "{:#?}",
            report.problems
        );
    }

    #[test]
    fn an_agent_session_whose_records_are_gone_is_a_problem() {
        let (signer, _) = Signer::generate().unwrap();
        // The first run ended cleanly; a second one (session t) was deleted whole.
        let mut chain = Chain::new("run-1");
        let mut first = sealed(&mut chain, &signer, None, RUN);
        first.extend(sealed(&mut chain, &signer, None, END));
        let last_s: Record = serde_json::from_str(&first[5]).unwrap();
        let mut expect = pinned(&signer);
        expect.session_heads = BTreeMap::from([
            ("s".to_owned(), (last_s.seq.unwrap(), last_s.hash.clone())),
            ("t".to_owned(), (7, "ab".repeat(32))),
        ]);
        let report = run(&first, &expect);
        assert_eq!(kinds(&report), vec![(ProblemKind::Missing, None)]);
        let message = &report.problems[0].message;
        assert!(
            message.contains("session t") && message.contains("records are missing"),
            "{message}"
        );
        // Not even --open and --allow-partial accept it.
        expect.allow_open = true;
        expect.allow_partial = true;
        assert!(!run(&first, &expect).ok());
        expect.session_heads.remove("t");
        assert!(run(&first, &expect).ok());
    }

    #[test]
    fn records_after_a_stream_end_are_a_problem_even_when_open() {
        let (signer, _) = Signer::generate().unwrap();
        let mut chain = Chain::new("run-1");
        let mut lines = sealed(&mut chain, &signer, None, RUN);
        lines.extend(sealed(&mut chain, &signer, None, END));
        // Forged: unsigned records chained on after the signed end.
        lines.extend(sealed(
            &mut chain,
            &signer,
            None,
            &[
                (RecordKind::SessionStart, Some("x"), false),
                (RecordKind::Request, Some("x"), false),
            ],
        ));
        for expect in [
            pinned(&signer),
            Expectations {
                allow_open: true,
                allow_partial: true,
                ..pinned(&signer)
            },
        ] {
            let report = run(&lines, &expect);
            assert!(
                kinds(&report).contains(&(ProblemKind::Unsigned, Some(7))),
                "{:#?}",
                report.problems
            );
            let after = report
                .problems
                .iter()
                .find(|p| p.message.contains("after its StreamEnd"))
                .unwrap();
            assert_eq!(after.location, "audit.jsonl:8");
            assert!(
                after
                    .message
                    .contains("records n=7..=8 come after its StreamEnd (n=6)"),
                "{}",
                after.message
            );
        }
        // Even when signed (a second end, as a replayed key would sign it).
        let mut chain = Chain::new("run-1");
        let mut lines = sealed(&mut chain, &signer, None, RUN);
        lines.extend(sealed(&mut chain, &signer, None, END));
        lines.extend(sealed(&mut chain, &signer, None, END));
        let report = run(&lines, &pinned(&signer));
        assert!(
            kinds(&report).contains(&(ProblemKind::Unsigned, Some(7))),
            "{:#?}",
            report.problems
        );
    }

    #[test]
    fn an_invented_unsigned_stream_is_a_problem_even_partial_and_open() {
        let (signer, _) = Signer::generate().unwrap();
        // A stream "begun" at n=40, its beginning claimed rotated away: nothing is signed.
        let mut lines = Vec::new();
        let mut prev = "00".repeat(32);
        for (i, kind) in [RecordKind::SessionStart, RecordKind::Request]
            .into_iter()
            .enumerate()
        {
            let mut r = record(kind, Some("s"));
            r.v = SCHEMA_VERSION;
            r.stream = "invented".to_owned();
            r.n = 40 + i as u64;
            r.prev.clone_from(&prev);
            r.seq = Some(i as u64);
            r.session_prev = Some(prev.clone());
            r.hash = hash_of(&r).unwrap();
            prev.clone_from(&r.hash);
            lines.push(serde_json::to_string(&r).unwrap());
        }
        let expect = Expectations {
            allow_open: true,
            allow_partial: true,
            ..pinned(&signer)
        };
        let report = run(&lines, &expect);
        assert_eq!(
            kinds(&report),
            vec![(ProblemKind::Unsigned, Some(40))],
            "{:#?}",
            report.problems
        );
        assert!(
            report.problems[0]
                .message
                .contains("none of its records n=40..=41"),
            "{}",
            report.problems[0].message
        );
    }

    #[test]
    fn an_open_running_stream_still_verifies_with_open() {
        let (signer, _) = Signer::generate().unwrap();
        let mut chain = Chain::new("run-1");
        let mut lines = sealed(&mut chain, &signer, None, RUN);
        // The last second, not yet signed.
        lines.extend(sealed(
            &mut chain,
            &signer,
            None,
            &[(RecordKind::Request, Some("s"), false)],
        ));
        let report = run(
            &lines,
            &Expectations {
                allow_open: true,
                ..pinned(&signer)
            },
        );
        assert!(report.ok(), "{:#?}", report.problems);
        assert_eq!(report.warnings.len(), 2, "{:?}", report.warnings);
        let report = run(&lines, &pinned(&signer));
        assert_eq!(
            kinds(&report),
            vec![
                (ProblemKind::Truncated, Some(6)),
                (ProblemKind::Unsigned, Some(5))
            ]
        );
    }

    #[test]
    fn edited_copies_unusable_keys_and_impossible_numbers_are_problems() {
        let (signer, _) = Signer::generate().unwrap();
        let mut chain = Chain::new("run-1");
        let mut lines = sealed(&mut chain, &signer, None, RUN);
        lines.extend(sealed(&mut chain, &signer, None, END));
        // An exact copy of a record delivered twice is a duplicate; an edited copy that
        // keeps the old hash is an edit.
        let mut copied = lines.clone();
        copied.push(lines[2].clone());
        let report = run(&copied, &pinned(&signer));
        assert!(
            report.ok() && report.duplicates == 1,
            "{:#?}",
            report.problems
        );
        let mut edited: Record = serde_json::from_str(&lines[2]).unwrap();
        edited.note = Some("forged".into());
        let mut forged = lines.clone();
        forged.push(serde_json::to_string(&edited).unwrap());
        let report = run(&forged, &pinned(&signer));
        assert!(
            !report.ok() && report.duplicates == 0,
            "{:#?}",
            report.problems
        );
        // A key given that is not a key trusts nothing (never the stream's own).
        let typo = Expectations {
            keys: vec!["/etc/agentgate/signing-key.pk8.pub.typo".into()],
            ..Default::default()
        };
        let report = run(&lines, &typo);
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.kind == ProblemKind::BadSignature),
            "{:#?}",
            report.problems
        );
        // A sequence number no stream reaches is malformed, not a panic.
        let huge = format!(
            r#"{{"v":{SCHEMA_VERSION},"stream":"x","n":18446744073709551615,"prev":"","time":"2026-01-01T00:00:00Z","kind":"Request"}}"#
        );
        let report = run(&[huge], &pinned(&signer));
        assert_eq!(
            kinds(&report),
            vec![(ProblemKind::Malformed, Some(u64::MAX))]
        );
        assert_eq!(public_key_bytes("not a key"), None);
        assert!(public_key_bytes(&signer.public().public_key).is_some());
    }
}
