//! The JSON-lines file sink: one record per line, rotated by size.
//!
//! The active file is `<path>` (e.g. `audit.jsonl`); a full one is renamed
//! `<stem>.<UTC time>.jsonl`, names that sort in the order they were written, and at most
//! `keep` rotated files are kept (0: all). `kubectl agentgate verify <dir>` reads them in
//! order.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::audit::journal::Chunk;

/// The file sink.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: Option<(File, u64)>,
}

impl FileSink {
    /// A sink writing `path`, rotating past `max_bytes`, keeping `keep` rotated files.
    pub fn new(path: PathBuf, max_bytes: u64, keep: usize) -> Self {
        Self {
            path,
            max_bytes,
            keep,
            file: None,
        }
    }

    fn open(&mut self) -> Result<&mut (File, u64), String> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            let mut f = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| format!("{}: {e}", self.path.display()))?;
            let len =
                trim_torn_line(&mut f).map_err(|e| format!("{}: {e}", self.path.display()))?;
            self.file = Some((f, len));
        }
        self.file
            .as_mut()
            .ok_or_else(|| "the audit file is not open".to_owned())
    }

    /// Appends the chunk's lines (as stored in the journal: as few writes as the rotation
    /// allows), rotating whenever the next line would take the file past its size (a line
    /// longer than that gets a file of its own).
    pub fn deliver(&mut self, chunk: &Chunk) -> Result<(), String> {
        let mut rest: &[u8] = &chunk.data;
        while !rest.is_empty() {
            let len = self.open()?.1;
            let room = self.max_bytes.saturating_sub(len);
            // The whole lines that fit.
            let mut end = 0;
            while let Some(nl) = memchr::memchr(b'\n', &rest[end..]) {
                let next = end + nl + 1;
                if next as u64 > room {
                    break;
                }
                end = next;
            }
            if memchr::memchr(b'\n', rest).is_none() && (rest.len() as u64) <= room {
                end = rest.len();
            }
            if end == 0 {
                if len > 0 {
                    self.rotate()?;
                    continue;
                }
                // One line longer than a whole file: on its own.
                end = memchr::memchr(b'\n', rest).map_or(rest.len(), |nl| nl + 1);
            }
            self.write(&rest[..end])?;
            rest = &rest[end..];
        }
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<(), String> {
        let path = self.path.display().to_string();
        let (f, len) = self.open()?;
        if let Err(e) = f.write_all(data) {
            // A partial write would leave a torn line: cut the file back to where it was,
            // and reopen it for the retry.
            let _ = f.set_len(*len);
            self.file = None;
            return Err(format!("{path}: {e}"));
        }
        *len += data.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), String> {
        self.file = None;
        let stem = self
            .path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("audit")
            .to_owned();
        let dir = self.path.parent().unwrap_or(Path::new(".")).to_owned();
        // Named by the time (in order), never over an earlier file rotated the same
        // microsecond.
        let mut rotated;
        loop {
            let now = crate::clock::now().strftime("%Y%m%dT%H%M%S%.6fZ");
            rotated = dir.join(format!("{stem}.{now}.jsonl"));
            if !rotated.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(2));
        }
        std::fs::rename(&self.path, &rotated)
            .map_err(|e| format!("rotate {}: {e}", self.path.display()))?;
        if self.keep > 0 {
            let mut old = rotated_files(&self.path);
            while old.len() > self.keep {
                let oldest = old.remove(0);
                let _ = std::fs::remove_file(oldest);
            }
        }
        Ok(())
    }
}

/// Cuts a torn last line (the sidecar killed mid-write) off `file`, so that the record,
/// delivered again from the journal, starts a line of its own instead of being glued onto
/// the torn one. Returns the file's length after.
fn trim_torn_line(file: &mut File) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    const BLOCK: u64 = 64 << 10;
    let len = file.metadata()?.len();
    // Back from the end, a block at a time, to the last newline.
    let mut end = len;
    let mut buf = Vec::new();
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(BLOCK);
        buf.resize(usize::try_from(end - start).unwrap_or(0), 0);
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        if let Some(nl) = memchr::memrchr(b'\n', &buf) {
            break start + nl as u64 + 1;
        }
        end = start;
    };
    if keep < len {
        tracing::warn!(
            bytes = len - keep,
            "cutting a torn record off the end of the audit file (written when the sidecar was killed); it is delivered again whole"
        );
        file.set_len(keep)?;
    }
    Ok(keep)
}

/// The rotated files of `path`, oldest first.
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("audit")
        .to_owned();
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with(&format!("{stem}.")) && n.ends_with(".jsonl") && p != path
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use bytes::Bytes;

    fn chunk(lines: &[String]) -> Chunk {
        let mut data = Vec::new();
        for l in lines {
            data.extend_from_slice(l.as_bytes());
            data.push(b'\n');
        }
        let data = Bytes::from(data);
        let mut out = Vec::new();
        let mut at = 0;
        for l in lines {
            out.push(data.slice(at..at + l.len()));
            at += l.len() + 1;
        }
        Chunk { data, lines: out }
    }

    /// Killed mid-write: the torn last line is cut on reopening, and the record delivered
    /// again starts a line of its own.
    #[test]
    fn a_torn_last_line_is_cut_when_the_file_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let lines: Vec<String> = (0..3).map(|i| format!("{{\"n\":{i}}}")).collect();
        for torn in ["", "{\"n\":3,\"to", "{\"n\":3,\"to".repeat(20_000).as_str()] {
            std::fs::write(&path, format!("{}\n{}\n{torn}", lines[0], lines[1])).unwrap();
            let mut sink = FileSink::new(path.clone(), 10 << 20, 0);
            sink.deliver(&chunk(&lines[2..])).unwrap();
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                format!("{}\n", lines.join("\n")),
                "torn: {} bytes",
                torn.len()
            );
        }
        // Only a torn line: the file is emptied.
        std::fs::write(&path, "{\"n\":0,").unwrap();
        let mut sink = FileSink::new(path.clone(), 10 << 20, 0);
        sink.deliver(&chunk(&lines[..1])).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", lines[0])
        );
    }

    #[test]
    fn no_file_grows_past_its_size_whatever_the_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = FileSink::new(path.clone(), 1000, 0);
        let lines: Vec<String> = (0..10).map(|i| format!("{i:0>299}")).collect();
        sink.deliver(&chunk(&lines)).unwrap();
        // A line longer than a whole file gets one of its own.
        let long = "x".repeat(2500);
        sink.deliver(&chunk(std::slice::from_ref(&long))).unwrap();
        sink.deliver(&chunk(&lines[..1])).unwrap();
        let mut files = rotated_files(&path);
        files.push(path.clone());
        let mut all = String::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(
                text.len() <= 1000 || text == format!("{long}\n"),
                "{f:?}: {} bytes",
                text.len()
            );
            all.push_str(&text);
        }
        let expected: Vec<&str> = lines
            .iter()
            .map(String::as_str)
            .chain([long.as_str(), lines[0].as_str()])
            .collect();
        assert_eq!(
            all.lines().collect::<Vec<_>>(),
            expected,
            "every line, in order"
        );
    }
}
