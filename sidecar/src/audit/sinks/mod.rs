//! Where records go: each sink reads the spill journal from its own cursor and delivers in
//! batches; a failed delivery is retried with exponential backoff (100 ms to 30 s) and the
//! cursor moves only after the sink accepted the batch. Delivery is at least once: after a
//! crash a sink may see the last batch again (the verifier skips exact duplicates; the
//! PostgreSQL sink ignores rows it already has).

pub mod file;
pub mod http;
pub mod otlp;
pub mod pgtls;
pub mod postgres;
pub mod sessions;

use std::sync::Arc;
use std::time::Duration;

use super::Health;
use super::journal::{Chunk, Journal};

/// How often a sink's cursor is saved to disk while it delivers (and after it goes idle).
const SAVE_CURSOR_EVERY: Duration = Duration::from_millis(200);

/// After records arrive, a sink waits this long for more before it reads them: one delivery
/// (one open, read, write and cursor update) for a burst of statements, not one per record.
const LINGER: Duration = Duration::from_millis(5);

/// The largest batch read from the journal for one delivery.
const BATCH_BYTES: usize = 4 << 20;

/// A configured sink.
pub enum Sink {
    /// A JSON-lines file with rotation.
    File(file::FileSink),
    /// An append-only PostgreSQL table.
    Postgres(Box<postgres::PostgresSink>),
    /// OTLP/HTTP logs, or an HTTPS webhook.
    Http(Box<http::HttpSink>),
    /// AgentSession objects' status (a summary per session).
    Sessions(Box<sessions::SessionSink>),
}

impl Sink {
    /// The sink's name (its cursor's file name).
    pub fn name(&self) -> String {
        match self {
            Sink::File(_) => "file".into(),
            Sink::Postgres(_) => "postgres".into(),
            Sink::Http(h) => h.name().into(),
            Sink::Sessions(_) => "agentsessions".into(),
        }
    }

    async fn deliver(&mut self, chunk: &Chunk) -> Result<(), String> {
        let lines = &chunk.lines;
        match self {
            Sink::File(s) => s.deliver(chunk),
            Sink::Postgres(s) => s.deliver(lines).await,
            Sink::Http(s) => s.deliver(lines).await,
            Sink::Sessions(s) => s.deliver(lines).await,
        }
    }

    /// The largest batch delivered at once.
    fn max_batch(&self) -> usize {
        match self {
            // Receivers commonly cap request bodies (a few MiB).
            Sink::Http(_) => BATCH_BYTES / 4,
            _ => BATCH_BYTES,
        }
    }

    async fn idle(&mut self) -> Result<(), String> {
        match self {
            Sink::Sessions(s) => s.flush(false).await,
            _ => Ok(()),
        }
    }
}

/// Delivers the journal to `sink` forever.
pub(super) async fn deliver(
    mut sink: Sink,
    mut pos: super::journal::Position,
    journal: Arc<Journal>,
    health: Arc<Health>,
) {
    let name = sink.name();
    let mut appended = journal.subscribe();
    let max = sink.max_batch();
    let mut backoff = Duration::from_millis(100);
    // The cursor on disk, and when it was saved.
    let mut saved = pos;
    let mut saved_at = std::time::Instant::now();
    let save = |journal: &Journal, saved: &mut super::journal::Position, pos| {
        if let Err(e) = journal.save(&name) {
            fail(&health, &name, &format!("save its cursor: {e}"));
        } else {
            *saved = pos;
        }
    };
    loop {
        appended.borrow_and_update();
        let (chunk, next) = match journal.read(pos, max) {
            Ok(r) => r,
            Err(e) => {
                fail(&health, &name, &format!("read the spill journal: {e}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        if chunk.lines.is_empty() {
            pos = next;
            if let Err(e) = sink.idle().await {
                fail(&health, &name, &e);
            }
            if saved != pos {
                // Save once nothing more arrives for a moment.
                let quiet = tokio::time::timeout(SAVE_CURSOR_EVERY, appended.changed()).await;
                if quiet.is_err() || saved_at.elapsed() >= SAVE_CURSOR_EVERY {
                    save(&journal, &mut saved, pos);
                    saved_at = std::time::Instant::now();
                }
            } else {
                let _ = tokio::time::timeout(Duration::from_secs(1), appended.changed()).await;
            }
            tokio::time::sleep(LINGER).await;
            continue;
        }
        match sink.deliver(&chunk).await {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                if let Ok(mut f) = health.failing.lock()
                    && f.remove(&name).is_some()
                {
                    tracing::info!(sink = %name, "audit sink recovered");
                }
                pos = next;
                journal.ack(&name, pos);
                // A finished segment is deleted as soon as every sink is past it.
                if pos.segment != saved.segment || saved_at.elapsed() >= SAVE_CURSOR_EVERY {
                    save(&journal, &mut saved, pos);
                    saved_at = std::time::Instant::now();
                }
            }
            Err(e) => {
                fail(&health, &name, &e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

fn fail(health: &Health, sink: &str, why: &str) {
    tracing::warn!(sink, error = %why, "audit sink failed: records stay spilled and are retried");
    if let Ok(mut f) = health.failing.lock() {
        f.entry(sink.to_owned())
            .and_modify(|e| e.1 = why.to_owned())
            .or_insert_with(|| (crate::clock::now(), why.to_owned()));
    }
}
