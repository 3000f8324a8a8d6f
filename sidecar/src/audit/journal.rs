//! The spill journal: every sealed record is appended here first, then each sink reads it at
//! its own pace from its own cursor. A slow or failed sink only makes the journal grow; the
//! journal is bounded, and when it is full the gateway refuses new commands. Segments survive
//! a crash: after a restart each sink resumes from its cursor.
//!
//! Layout: `<dir>/segments/<id>.jsonl` (one record per line, ids increasing across restarts)
//! and `<dir>/cursors/<sink>` (`<segment id> <byte offset>` of the first undelivered byte).
//!
//! A failed write (the disk full, an I/O error) loses nothing and tears nothing for good: the
//! [`Appender`] takes a line whole or not at all, and keeps every byte the file did not take
//! (a write can stop in the middle of a line) to write first on the next try.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// A position in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    /// The segment.
    pub segment: u64,
    /// The byte offset in it.
    pub offset: u64,
}

/// Whole lines read from the journal: the bytes as stored (each line ends in a newline) and
/// each line without its newline.
#[derive(Debug, Default)]
pub struct Chunk {
    /// The lines as stored.
    pub data: Bytes,
    /// Each line, without its newline (slices of `data`).
    pub lines: Vec<Bytes>,
}

/// A segment larger than this is closed and a new one started.
pub const SEGMENT_BYTES: u64 = 1 << 20;

/// Written records are synced to disk within this long (bursts closer together share one
/// sync, as PostgreSQL's WAL writer does): one sync per statement would cost more CPU than
/// relaying the statement.
pub const SYNC_EVERY: Duration = Duration::from_millis(10);

/// The journal, shared by its writer and its readers.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// The segment being written.
    active: AtomicU64,
    /// Bytes in all segments on disk.
    bytes: AtomicU64,
    /// Each sink's acknowledged position, for deleting delivered segments.
    acked: Mutex<BTreeMap<String, Position>>,
    /// The slowest sink's offset in its segment (delivered bytes still on disk).
    behind: AtomicU64,
    /// The end of what was written and flushed.
    end: Mutex<Position>,
    /// Tells readers that records were appended.
    appended: tokio::sync::watch::Sender<u64>,
    /// Serializes cursor saves (they share a temporary file per sink).
    saving: Mutex<()>,
    /// Tests of a full disk: how many more bytes the segments' volume takes (`None`: as many
    /// as it has). Past that, writes fail as on a full disk (`ENOSPC`), and so do syncs and
    /// new segments.
    #[cfg(test)]
    space: Mutex<Option<u64>>,
}

fn segment_name(id: u64) -> String {
    format!("{id:020}.jsonl")
}

impl Journal {
    /// Opens (creating) the journal in `dir`. Returns it and the writer of a new segment.
    pub fn open(dir: &Path, sync: bool) -> io::Result<(Arc<Self>, Appender)> {
        fs::create_dir_all(dir.join("segments"))?;
        fs::create_dir_all(dir.join("cursors"))?;
        let mut last = 0;
        let mut bytes = 0;
        for id in segments(dir)? {
            last = last.max(id);
            bytes += fs::metadata(dir.join("segments").join(segment_name(id)))?.len();
        }
        let active = last + 1;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("segments").join(segment_name(active)))?;
        let (appended, _) = tokio::sync::watch::channel(0);
        let journal = Arc::new(Self {
            dir: dir.to_owned(),
            active: AtomicU64::new(active),
            bytes: AtomicU64::new(bytes),
            acked: Mutex::new(BTreeMap::new()),
            behind: AtomicU64::new(0),
            end: Mutex::new(Position {
                segment: active,
                offset: 0,
            }),
            appended,
            saving: Mutex::new(()),
            #[cfg(test)]
            space: Mutex::new(None),
        });
        let appender = Appender {
            journal: journal.clone(),
            file,
            buf: Vec::with_capacity(BUFFER),
            written: 0,
            segment: active,
            size: 0,
            sync,
            synced: 0,
            unsynced_since: None,
        };
        Ok((journal, appender))
    }

    /// The last whole line an earlier run wrote (the end of its stream), if its segments are
    /// still here. A segment with no whole line (empty, or only a torn one: the run was
    /// killed right after starting it) is passed over for the one before.
    pub fn last_line(&self) -> Option<Vec<u8>> {
        let active = self.active.load(Ordering::Acquire);
        for id in segments(&self.dir).ok()?.into_iter().rev() {
            if id >= active {
                continue;
            }
            let data = match fs::read(self.dir.join("segments").join(segment_name(id))) {
                Ok(data) => data,
                Err(e) => {
                    tracing::warn!(
                        segment = id,
                        error = %e,
                        "cannot read an audit journal segment of the run before"
                    );
                    continue;
                }
            };
            let mut end = data.len();
            // The last non-empty line that ends in a newline.
            while let Some(whole) = data[..end].iter().rposition(|b| *b == b'\n') {
                let start = data[..whole]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1);
                if whole > start {
                    return Some(data[start..whole].to_vec());
                }
                end = whole;
            }
        }
        None
    }

    /// Holds the writer at its next flush while the guard lives (tests of a stalled writer).
    #[cfg(test)]
    pub(super) fn stall_writer(&self) -> std::sync::MutexGuard<'_, Position> {
        self.end.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tests of a full disk: the volume takes `bytes` more bytes (`None`: no limit).
    #[cfg(test)]
    pub(super) fn set_space(&self, bytes: Option<u64>) {
        *self.space.lock().unwrap_or_else(|e| e.into_inner()) = bytes;
    }

    /// Tests of a full disk: `Err` (as the kernel gives it) when the volume is full.
    #[cfg(test)]
    fn full(&self) -> io::Result<()> {
        match *self.space.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(0) => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            _ => Ok(()),
        }
    }

    /// Bytes in the journal (delivered segments are deleted).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether every sink has delivered everything written so far.
    pub fn all_delivered(&self) -> bool {
        let Ok(end) = self.end.lock().map(|e| *e) else {
            return false;
        };
        self.acked
            .lock()
            .map(|a| a.values().all(|p| *p >= end))
            .unwrap_or(false)
    }

    /// Bytes not yet delivered to every sink (what the bound on the journal counts): the
    /// journal's bytes less what the slowest sink has read of its oldest segment (older ones
    /// are deleted as soon as every sink is past them).
    pub fn undelivered(&self) -> u64 {
        self.bytes()
            .saturating_sub(self.behind.load(Ordering::Relaxed))
    }

    /// Where sink `name` resumes: its saved cursor, or the oldest segment.
    pub fn cursor(&self, name: &str) -> io::Result<Position> {
        let pos = match fs::read_to_string(self.dir.join("cursors").join(name)) {
            Ok(s) => {
                let mut it = s.split_whitespace().map(str::parse::<u64>);
                match (it.next(), it.next()) {
                    (Some(Ok(segment)), Some(Ok(offset))) => Position { segment, offset },
                    _ => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("the cursor of audit sink {name} is damaged"),
                        ));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Position {
                segment: segments(&self.dir)?.first().copied().unwrap_or(0),
                offset: 0,
            },
            Err(e) => return Err(e),
        };
        self.ack_in_memory(name, pos);
        Ok(pos)
    }

    fn ack_in_memory(&self, name: &str, pos: Position) {
        if let Ok(mut acked) = self.acked.lock() {
            acked.insert(name.to_owned(), pos);
            let slowest = acked.values().min().map_or(0, |p| p.offset);
            self.behind.store(slowest, Ordering::Relaxed);
        }
    }

    /// Records in memory that sink `name` has delivered everything before `pos` (what
    /// `all_delivered` and `undelivered` see); [`Journal::save`] makes it durable.
    pub fn ack(&self, name: &str, pos: Position) {
        self.ack_in_memory(name, pos);
    }

    /// Saves sink `name`'s acknowledged cursor to disk and deletes the segments every sink is
    /// done with. Cursors are saved at most a few times a second, not per record: after a
    /// crash a sink sees the last moments again (delivery is at least once).
    pub fn save(&self, name: &str) -> io::Result<()> {
        let _one_at_a_time = self
            .saving
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        let Some(pos) = self.acked.lock().ok().and_then(|a| a.get(name).copied()) else {
            return Ok(());
        };
        let cursors = self.dir.join("cursors");
        let tmp = cursors.join(format!(".{name}.tmp"));
        fs::write(&tmp, format!("{} {}\n", pos.segment, pos.offset))?;
        fs::rename(&tmp, cursors.join(name))?;
        let oldest = self
            .acked
            .lock()
            .ok()
            .and_then(|a| a.values().map(|p| p.segment).min())
            .unwrap_or(0);
        let active = self.active.load(Ordering::Acquire);
        for id in segments(&self.dir)? {
            if id < oldest && id < active {
                let path = self.dir.join("segments").join(segment_name(id));
                if let Ok(meta) = fs::metadata(&path) {
                    fs::remove_file(&path)?;
                    self.bytes.fetch_sub(meta.len(), Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Saves every sink's cursor (at a clean stop, so a restart does not deliver again).
    pub fn save_all(&self) -> io::Result<()> {
        let names: Vec<String> = self
            .acked
            .lock()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default();
        for name in names {
            self.save(&name)?;
        }
        Ok(())
    }

    /// A receiver told of every append.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Reads up to `max` bytes of whole lines from `pos`. Returns the lines and the position
    /// after them; an empty batch means nothing new yet. A closed segment's torn last line (a
    /// crash mid-write) is skipped.
    pub fn read(&self, pos: Position, max: usize) -> io::Result<(Chunk, Position)> {
        let mut pos = pos;
        loop {
            let path = self.dir.join("segments").join(segment_name(pos.segment));
            let active = self.active.load(Ordering::Acquire);
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Deleted (all delivered) or never written: the next one that exists.
                    match segments(&self.dir)?
                        .into_iter()
                        .find(|id| *id > pos.segment)
                    {
                        Some(next) if next <= active => {
                            pos = Position {
                                segment: next,
                                offset: 0,
                            };
                            continue;
                        }
                        _ => return Ok((Chunk::default(), pos)),
                    }
                }
                Err(e) => return Err(e),
            };
            file.seek(SeekFrom::Start(pos.offset))?;
            // Sized by what is there to read (a large buffer per read would be mapped and
            // unmapped each time).
            let available = file.metadata()?.len().saturating_sub(pos.offset);
            let mut buf = Vec::with_capacity(max.min(usize::try_from(available).unwrap_or(max)));
            Read::by_ref(&mut file)
                .take(max as u64)
                .read_to_end(&mut buf)?;
            let whole = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            if whole == 0 {
                // Nothing whole here. A closed segment is finished: move on.
                if pos.segment < active {
                    if !buf.is_empty() && buf.len() < max {
                        tracing::warn!(
                            segment = pos.segment,
                            bytes = buf.len(),
                            "skipping a torn record at the end of an audit journal segment (written when the sidecar was killed)"
                        );
                    }
                    if buf.len() < max {
                        pos = Position {
                            segment: pos.segment + 1,
                            offset: 0,
                        };
                        continue;
                    }
                }
                return Ok((Chunk::default(), pos));
            }
            let buf = Bytes::from(buf).slice(..whole);
            let mut lines = Vec::new();
            let mut start = 0;
            for end in memchr::memchr_iter(b'\n', &buf) {
                if end > start {
                    lines.push(buf.slice(start..end));
                }
                start = end + 1;
            }
            pos.offset += whole as u64;
            return Ok((Chunk { data: buf, lines }, pos));
        }
    }
}

fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids: Vec<u64> = fs::read_dir(dir.join("segments"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".jsonl")?.parse().ok())
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// How many bytes of lines the [`Appender`] gathers before it writes them to the file.
const BUFFER: usize = 256 << 10;

/// Appends records to the active segment (one writer).
///
/// Lines are gathered in memory and written to the file when 256 KiB are gathered, at
/// [`Self::flush`] and before a new segment. A line is taken whole or not at all: when `append`
/// fails (the gathered lines could not be written to make room, or a new segment could not be
/// started) the journal is as it was, and the caller keeps the line to append again. Bytes the
/// file did not take (a write can stop mid-line on a full disk) stay gathered and are written
/// first on the next try, so a line cut short is completed, never lost or written twice.
#[derive(Debug)]
pub struct Appender {
    journal: Arc<Journal>,
    file: File,
    /// Lines appended and not yet written to the file, from `written` on.
    buf: Vec<u8>,
    /// How much of `buf` the file has taken.
    written: usize,
    segment: u64,
    /// The active segment's size, counting the lines not yet written to the file.
    size: u64,
    /// Sync to disk (group commit, within [`SYNC_EVERY`] of a write): records survive a
    /// node crash.
    sync: bool,
    /// The size of the active segment at the last sync.
    synced: u64,
    /// Since when written lines wait for a sync.
    unsynced_since: Option<Instant>,
}

impl Appender {
    /// Appends one line (a newline is added). Not visible to readers until [`Self::flush`].
    /// On `Err` nothing of `line` was taken: append it again later.
    pub fn append(&mut self, line: &[u8]) -> io::Result<()> {
        if self.size >= SEGMENT_BYTES {
            self.roll()?;
        }
        let n = line.len() + 1;
        if self.unwritten() > 0 && self.unwritten() + n > BUFFER {
            self.write_out()?;
        }
        self.buf.extend_from_slice(line);
        self.buf.push(b'\n');
        self.size += n as u64;
        self.journal.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes appended and not yet written to the file.
    fn unwritten(&self) -> usize {
        self.buf.len() - self.written
    }

    /// Writes the gathered lines to the file. On `Err` what the file did not take stays
    /// gathered, to be written first next time.
    fn write_out(&mut self) -> io::Result<()> {
        while self.written < self.buf.len() {
            match self.write_some() {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the segment file took no bytes",
                    ));
                }
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        self.written = 0;
        // A burst that grew the buffer (a long outage's lines) does not keep its memory.
        if self.buf.capacity() > 4 * BUFFER {
            self.buf.shrink_to(BUFFER);
        }
        Ok(())
    }

    /// One write of the gathered lines: how many bytes the file took.
    fn write_some(&mut self) -> io::Result<usize> {
        let data = &self.buf[self.written..];
        #[cfg(test)]
        if let Some(space) = self
            .journal
            .space
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            if *space == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let room = usize::try_from(*space).unwrap_or(usize::MAX);
            let n = self.file.write(&data[..data.len().min(room)])?;
            *space -= n as u64;
            return Ok(n);
        }
        self.file.write(data)
    }

    /// Writes the appended lines to the file and wakes the readers. Syncing to disk is
    /// separate ([`Appender::sync`]) so that bursts close together share one sync. On `Err`
    /// nothing is lost: call it again.
    pub fn flush(&mut self) -> io::Result<()> {
        self.write_out()?;
        if self.sync && self.size != self.synced {
            self.unsynced_since.get_or_insert_with(Instant::now);
        }
        if let Ok(mut end) = self.journal.end.lock() {
            *end = Position {
                segment: self.segment,
                offset: self.size,
            };
        }
        self.journal.appended.send_modify(|n| *n += 1);
        Ok(())
    }

    /// When the written lines must be synced to disk (`None`: nothing waits for a sync).
    pub fn sync_due(&self) -> Option<Instant> {
        self.unsynced_since.map(|t| t + SYNC_EVERY)
    }

    /// Syncs the written lines to disk. On `Err` they still wait for a sync: call it again.
    ///
    /// A later success does not prove that the lines a failed sync covered reached the disk
    /// (after an I/O error Linux may drop the pages' dirty state): they are still in the page
    /// cache, which the sinks read, and are at risk only if the node crashes before the sinks
    /// deliver them.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced_since.is_some() {
            self.sync_data()?;
            self.unsynced_since = None;
            self.synced = self.size - self.unwritten() as u64;
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        #[cfg(test)]
        self.journal.full()?;
        self.file.sync_data()
    }

    fn roll(&mut self) -> io::Result<()> {
        self.write_out()?;
        if self.sync {
            self.sync_data()?;
            self.unsynced_since = None;
        }
        let next = self.segment + 1;
        #[cfg(test)]
        self.journal.full()?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.journal.dir.join("segments").join(segment_name(next)))?;
        self.file = file;
        self.segment = next;
        self.size = 0;
        self.synced = 0;
        self.journal.active.store(next, Ordering::Release);
        Ok(())
    }
}

impl Drop for Appender {
    /// Lines still gathered are written (the writer flushes before it stops; this is for a
    /// writer that ends otherwise).
    fn drop(&mut self) {
        if self.unwritten() > 0
            && let Err(e) = self.write_out()
        {
            tracing::error!(
                error = %e,
                bytes = self.unwritten(),
                "the last audit records could not be written to the spill journal"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_lines(journal: &Journal, mut pos: Position) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let (chunk, next) = journal.read(pos, 1 << 20).unwrap();
            if chunk.lines.is_empty() {
                return out;
            }
            out.extend(
                chunk
                    .lines
                    .iter()
                    .map(|l| String::from_utf8_lossy(l).into_owned()),
            );
            pos = next;
        }
    }

    /// The disk fills in the middle of a line, then while lines wait: nothing appended is lost,
    /// written twice or left torn once there is room again, a line that does not fit is
    /// refused whole (the caller keeps it), and a failed sync is tried again.
    #[test]
    fn a_full_disk_loses_and_tears_nothing_once_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, mut w) = Journal::open(dir.path(), true).unwrap();
        let start = journal.cursor("sink").unwrap();
        w.append(b"r0").unwrap();
        w.flush().unwrap();
        w.sync().unwrap();
        // Room for 10 bytes: the next line is cut short.
        journal.set_space(Some(10));
        let long = format!("r1-{}", "x".repeat(40));
        w.append(long.as_bytes()).unwrap();
        let e = w.flush().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        assert_eq!(
            all_lines(&journal, start),
            ["r0"],
            "a torn line is not read"
        );
        // More lines than the buffer holds: once it is full, a line is refused whole.
        let big = "y".repeat(64 << 10);
        let mut taken = 0;
        let refused = loop {
            match w.append(big.as_bytes()) {
                Ok(()) => taken += 1,
                Err(e) => break e,
            }
            assert!(taken < 100, "a full buffer took every line");
        };
        assert_eq!(refused.raw_os_error(), Some(libc::ENOSPC));
        assert!(
            taken >= 1 && taken * (64 << 10) <= BUFFER,
            "{taken} lines taken"
        );
        // A sync on the full disk fails and is still due.
        assert!(w.sync_due().is_none());
        journal.set_space(Some(0));
        w.unsynced_since = Some(Instant::now());
        assert!(w.sync().is_err());
        assert!(w.sync_due().is_some(), "a failed sync is tried again");
        // Room again: the line cut short is finished, everything taken is written once.
        journal.set_space(None);
        w.append(b"r9").unwrap();
        w.flush().unwrap();
        w.sync().unwrap();
        assert!(w.sync_due().is_none());
        let mut expected = vec!["r0".to_owned(), long];
        expected.extend(std::iter::repeat_n(big, taken));
        expected.push("r9".to_owned());
        assert_eq!(all_lines(&journal, start), expected);
        let on_disk = fs::read(dir.path().join("segments").join(segment_name(1))).unwrap();
        assert_eq!(
            on_disk,
            format!("{}\n", expected.join("\n")).into_bytes(),
            "the file holds each line once, whole"
        );
        assert_eq!(journal.bytes(), on_disk.len() as u64);
    }

    /// After a restart each sink resumes from its own cursor; an old segment is deleted only
    /// once every sink the journal knows is past it, and a torn last line is skipped.
    #[test]
    fn sinks_resume_from_their_cursors_after_a_kill() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (journal, mut w) = Journal::open(dir.path(), false).unwrap();
            let fast = journal.cursor("fast").unwrap();
            let slow = journal.cursor("slow").unwrap();
            for i in 0..3 {
                w.append(format!("r{i}").as_bytes()).unwrap();
            }
            w.flush().unwrap();
            let (_, end) = journal.read(fast, 1 << 20).unwrap();
            journal.ack("fast", end);
            journal.save("fast").unwrap();
            journal.ack("slow", slow);
            journal.save("slow").unwrap();
            // Killed mid-write: half a line.
            w.file.write_all(b"{\"torn").unwrap();
            w.file.flush().unwrap();
        }
        let (journal, mut w) = Journal::open(dir.path(), false).unwrap();
        let fast = journal.cursor("fast").unwrap();
        let slow = journal.cursor("slow").unwrap();
        w.append(b"r3").unwrap();
        w.flush().unwrap();
        assert_eq!(all_lines(&journal, fast), ["r3"]);
        // The fast sink finishing the old segment does not delete what the slow one needs.
        let (_, end) = journal.read(fast, 1 << 20).unwrap();
        let (_, end) = journal.read(end, 1 << 20).unwrap();
        journal.ack("fast", end);
        journal.save("fast").unwrap();
        assert_eq!(all_lines(&journal, slow), ["r0", "r1", "r2", "r3"]);
    }

    /// Killed right after rolling to a new segment: the run before's newest segment is empty
    /// or holds only a torn line, and its last record is found in the segment before.
    #[test]
    fn the_run_before_ends_past_an_empty_or_torn_newest_segment() {
        for newest in [&b""[..], b"{\"torn", b"\n", b"\n{\"torn"] {
            let dir = tempfile::tempdir().unwrap();
            {
                let (_journal, mut w) = Journal::open(dir.path(), false).unwrap();
                w.append(b"r0").unwrap();
                w.append(b"r1").unwrap();
                w.flush().unwrap();
                w.roll().unwrap();
                w.file.write_all(newest).unwrap();
                w.file.flush().unwrap();
            }
            let (journal, _w) = Journal::open(dir.path(), false).unwrap();
            assert_eq!(
                journal.last_line().as_deref(),
                Some(&b"r1"[..]),
                "newest segment {:?}",
                String::from_utf8_lossy(newest)
            );
        }
        // Nothing before: nothing to continue.
        let dir = tempfile::tempdir().unwrap();
        drop(Journal::open(dir.path(), false).unwrap());
        let (journal, _w) = Journal::open(dir.path(), false).unwrap();
        assert_eq!(journal.last_line(), None);
    }
}
