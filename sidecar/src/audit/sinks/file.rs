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
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| format!("{}: {e}", self.path.display()))?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            self.file = Some((f, len));
        }
        self.file
            .as_mut()
            .ok_or_else(|| "the audit file is not open".to_owned())
    }

    /// Appends the chunk's lines (as stored in the journal: one write), rotating first when
    /// the file is full.
    pub fn deliver(&mut self, chunk: &Chunk) -> Result<(), String> {
        let size = chunk.data.len() as u64;
        if self.open()?.1 > 0 && self.open()?.1 + size > self.max_bytes {
            self.rotate()?;
        }
        let path = self.path.display().to_string();
        let (f, len) = self.open()?;
        if let Err(e) = f.write_all(&chunk.data) {
            // A partial write would leave a torn line: cut the file back to where it was,
            // and reopen it for the retry.
            let _ = f.set_len(*len);
            self.file = None;
            return Err(format!("{path}: {e}"));
        }
        *len += size;
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
        let now = crate::clock::now().strftime("%Y%m%dT%H%M%S%.6fZ");
        let rotated = dir.join(format!("{stem}.{now}.jsonl"));
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
