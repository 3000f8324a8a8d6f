//! Where records are read from: JSON-lines files (a file, or a directory of rotated files in
//! the order they were written) or the PostgreSQL sink's table.

use std::path::{Path, PathBuf};

use agentgate_crds::audit::Record;
use anyhow::Context;

/// A place records are read from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Files (directories are expanded to their `*.jsonl` files, rotated ones first).
    Files(Vec<PathBuf>),
    /// The PostgreSQL sink's table.
    Postgres {
        /// Connection string.
        conninfo: String,
        /// Table.
        table: String,
        /// Extra CA certificates (PEM) trusted for the server's certificate.
        ca_file: Option<PathBuf>,
    },
}

/// One stored line and where it was read.
pub struct Line {
    /// `file:line` or `table stream/n`.
    pub location: String,
    /// The line.
    pub bytes: Vec<u8>,
}

fn expand(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("read {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    // Rotated files (`audit.<time>.jsonl`) sort by time; the active `audit.jsonl` goes last.
    files.sort_by_key(|p| {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let active = name.matches('.').count() == 1;
        (active, name)
    });
    Ok(files)
}

impl Source {
    /// Every line, in stored order.
    pub async fn lines(&self) -> anyhow::Result<Vec<Line>> {
        match self {
            Source::Files(paths) => {
                let mut out = Vec::new();
                for p in paths {
                    for f in expand(p)? {
                        let data =
                            std::fs::read(&f).with_context(|| format!("read {}", f.display()))?;
                        for (i, l) in data.split(|b| *b == b'\n').enumerate() {
                            if l.is_empty() {
                                continue;
                            }
                            out.push(Line {
                                location: format!("{}:{}", f.display(), i + 1),
                                bytes: l.to_vec(),
                            });
                        }
                    }
                }
                Ok(out)
            }
            Source::Postgres {
                conninfo,
                table,
                ca_file,
            } => {
                // As the sink connects: verified TLS over the network unless the string says
                // sslmode=disable.
                let client =
                    agentgate_sidecar::audit::sinks::pgtls::connect(conninfo, ca_file.as_deref())
                        .await
                        .map_err(|why| anyhow::anyhow!("the audit database: {why}"))?;
                let quoted = table
                    .split('.')
                    .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
                    .collect::<Vec<_>>()
                    .join(".");
                let rows = client
                    .query(
                        &format!("SELECT stream, n, record::text FROM {quoted} ORDER BY stream, n"),
                        &[],
                    )
                    .await
                    .with_context(|| format!("read {table}"))?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        let stream: String = r.get(0);
                        let n: i64 = r.get(1);
                        let text: String = r.get(2);
                        Line {
                            location: format!("{table} {stream}/{n}"),
                            bytes: text.into_bytes(),
                        }
                    })
                    .collect())
            }
        }
    }

    /// Every record that parses (verification reports the others).
    pub async fn records(&self) -> anyhow::Result<Vec<Record>> {
        let mut records: Vec<Record> = self
            .lines()
            .await?
            .iter()
            .filter_map(|l| serde_json::from_slice(&l.bytes).ok())
            .collect();
        // Re-deliveries after a crash repeat records: keep one of each.
        let mut seen = std::collections::HashSet::new();
        records.retain(|r| seen.insert((r.stream.clone(), r.n)));
        Ok(records)
    }
}
