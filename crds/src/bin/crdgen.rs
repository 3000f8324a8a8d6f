//! Writes the CustomResourceDefinitions generated from the types into `crds/manifests/`
//! (and into the Helm chart's `crds/`, which Helm installs and waits for before the rest), the
//! audit record's JSON Schema, and the API reference `docs/crd-reference.md`.
//!
//! Usage: `cargo run -p agentgate-crds --features crdgen --bin crdgen [-- --check]`.
//! With `--check` nothing is written; the exit code is 1 when a committed file is stale.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Writes `content` to `path` (or, with `check`, only compares): `Ok(true)` when the file
/// is stale.
fn sync(path: &Path, content: &str, check: bool) -> Result<bool, String> {
    if std::fs::read_to_string(path).unwrap_or_default() == content {
        return Ok(false);
    }
    if check {
        eprintln!("crdgen: {} is stale", path.display());
        return Ok(true);
    }
    path.parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(path, content))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(false)
}

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs: Vec<PathBuf> = vec![root.join("manifests")];
    let chart = root.join("../charts/agentgate/crds");
    if root.join("../charts/agentgate/Chart.yaml").is_file() {
        dirs.push(chart);
    }
    let generated = agentgate_crds::generate::render_all().and_then(|files| {
        let schema = agentgate_crds::generate::record_schema()?;
        Ok((files, schema))
    });
    let (files, schema) = match generated {
        Ok(g) => g,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut outputs: Vec<(PathBuf, &str)> = dirs
        .iter()
        .flat_map(|dir| {
            files
                .iter()
                .map(move |(name, yaml)| (dir.join(name), yaml.as_str()))
        })
        .collect();
    outputs.push((
        root.join(agentgate_crds::generate::RECORD_SCHEMA_FILE),
        &schema,
    ));
    let reference = agentgate_crds::generate::reference();
    outputs.push((
        root.join("..")
            .join(agentgate_crds::generate::REFERENCE_FILE),
        &reference,
    ));
    let mut stale = false;
    for (path, content) in outputs {
        match sync(&path, content, check) {
            Ok(s) => stale |= s,
            Err(e) => {
                eprintln!("crdgen: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if stale {
        eprintln!("crdgen: run `cargo run -p agentgate-crds --features crdgen --bin crdgen`");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
