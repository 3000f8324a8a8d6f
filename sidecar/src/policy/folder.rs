//! Standalone policy: a folder of the same YAML manifests a cluster would hold, reloaded when
//! it changes. The embedded default for a laptop, a CI job or a demo.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agentgate_crds::validate::Validate;
use agentgate_crds::{AccessGrant, AgentIdentity, MaskPolicy, Target, Verdict};
use serde::Deserialize;

use super::{PolicyStore, Snapshot};

/// Why a folder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The folder or a file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A document is not valid YAML, or not a valid object of its kind.
    #[error("{path}: document {doc}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The document's position in the file (1-based).
        doc: usize,
        /// What is wrong.
        message: String,
    },
    /// Two objects of one kind share a name.
    #[error("{kind} {name} is defined twice: in {first} and in {second}")]
    Duplicate {
        /// The kind.
        kind: String,
        /// The name.
        name: String,
        /// Where it was first.
        first: PathBuf,
        /// Where it was again.
        second: PathBuf,
    },
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            files(&p, out)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

fn insert<T>(
    map: &mut BTreeMap<String, T>,
    seen: &mut BTreeMap<(String, String), PathBuf>,
    kind: &str,
    name: String,
    obj: T,
    path: &Path,
) -> Result<(), LoadError> {
    if let Some(first) = seen.insert((kind.to_owned(), name.clone()), path.to_owned()) {
        return Err(LoadError::Duplicate {
            kind: kind.to_owned(),
            name,
            first,
            second: path.to_owned(),
        });
    }
    map.insert(name, obj);
    Ok(())
}

/// Loads every agentgate object from the `.yaml`, `.yml` and `.json` files under `dir`
/// (recursively; other kinds, such as a kustomization, are skipped).
pub fn load(dir: &Path) -> Result<Snapshot, LoadError> {
    let mut paths = Vec::new();
    files(dir, &mut paths)?;
    let mut s = Snapshot {
        source: format!("folder {}", dir.display()),
        ..Default::default()
    };
    let mut seen = BTreeMap::new();
    for path in &paths {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        load_text(path, &text, &mut s, &mut seen)?;
    }
    Ok(s)
}

/// Loads the agentgate objects of one YAML text (several documents), as if it were a file of
/// a policy folder. For tools and benchmarks.
pub fn load_str(text: &str) -> Result<Snapshot, LoadError> {
    let mut s = Snapshot {
        source: "text".into(),
        ..Default::default()
    };
    load_text(Path::new("<text>"), text, &mut s, &mut BTreeMap::new())?;
    Ok(s)
}

fn load_text(
    path: &Path,
    text: &str,
    s: &mut Snapshot,
    seen: &mut BTreeMap<(String, String), PathBuf>,
) -> Result<(), LoadError> {
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let invalid = |message: String| LoadError::Invalid {
            path: path.to_path_buf(),
            doc: i + 1,
            message,
        };
        let value = serde_json::Value::deserialize(doc).map_err(|e| invalid(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let api = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        if api.split('/').next() != Some(agentgate_crds::common::GROUP) {
            continue;
        }
        if api
            != format!(
                "{}/{}",
                agentgate_crds::common::GROUP,
                agentgate_crds::common::VERSION
            )
        {
            return Err(invalid(format!("unsupported apiVersion {api}")));
        }
        let name = value
            .pointer("/metadata/name")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            return Err(invalid(format!("{kind} without metadata.name")));
        }
        let bad = |e: serde_json::Error| invalid(format!("{kind} {name}: {e}"));
        // The CRD's rules, which the API server would have enforced.
        let broken = |problems: Vec<String>| {
            if problems.is_empty() {
                Ok(())
            } else {
                Err(invalid(format!("{kind} {name}: {}", problems.join("; "))))
            }
        };
        match kind.as_str() {
            "AgentIdentity" => {
                let o: AgentIdentity = serde_json::from_value(value).map_err(bad)?;
                broken(o.spec.problems())?;
                insert(&mut s.identities, seen, &kind, name, o, path)?;
            }
            "Target" => {
                let o: Target = serde_json::from_value(value).map_err(bad)?;
                broken(o.spec.problems())?;
                insert(&mut s.targets, seen, &kind, name, o, path)?;
            }
            "MaskPolicy" => {
                let o: MaskPolicy = serde_json::from_value(value).map_err(bad)?;
                broken(o.spec.problems())?;
                insert(&mut s.masks, seen, &kind, name, o, path)?;
            }
            "AccessGrant" => {
                let o: AccessGrant = serde_json::from_value(value).map_err(bad)?;
                broken(o.spec.problems())?;
                // Without an API server nobody stamps the approval time: a standalone
                // approval must carry it, or its clock could never run out.
                let undated = o
                    .spec
                    .decision
                    .as_ref()
                    .is_some_and(|d| d.verdict == Verdict::Approve && d.decided_at.is_none());
                if undated {
                    s.warnings.push(format!(
                        "{}: AccessGrant {name} is ignored: a standalone approval needs spec.decision.decidedAt",
                        path.display()
                    ));
                    continue;
                }
                insert(&mut s.grants, seen, &kind, name, o, path)?;
            }
            "AgentSession" => {}
            other => return Err(invalid(format!("unknown kind {other}"))),
        }
    }
    Ok(())
}

/// What a folder looks like, cheaply: paths, sizes and modification times.
fn stamp(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut paths = Vec::new();
    let _ = files(dir, &mut paths);
    paths
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).ok();
            let len = m.as_ref().map(|m| m.len()).unwrap_or(0);
            let modified = m.and_then(|m| m.modified().ok());
            (p, len, modified)
        })
        .collect()
}

/// Loads `dir` now, then reloads it whenever it changes. A folder that fails to load at
/// start leaves no policy (everything is refused); a later bad edit keeps the last good
/// policy in force and is reported until fixed.
///
/// A change is loaded once the folder has looked the same for one more interval, so a file
/// caught half-written (which might parse, but without its last guardrails) is never loaded.
pub async fn watch(dir: PathBuf, store: Arc<PolicyStore>, every: Duration) {
    let mut last = None;
    let mut seen = None;
    loop {
        let now = stamp(&dir);
        if seen.as_ref() != Some(&now) && last.is_some() {
            seen = Some(now);
        } else if last.as_ref() != Some(&now) {
            seen = Some(now.clone());
            match load(&dir) {
                Ok(s) => {
                    for w in &s.warnings {
                        tracing::warn!("{w}");
                    }
                    tracing::info!(
                        dir = %dir.display(),
                        identities = s.identities.len(),
                        targets = s.targets.len(),
                        grants = s.grants.len(),
                        masks = s.masks.len(),
                        "policy loaded"
                    );
                    store.set(s);
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy folder not loaded; the last good policy stays in force");
                    store.set_error(e.to_string());
                }
            }
            last = Some(now);
        }
        tokio::time::sleep(every).await;
    }
}
