//! Writes the CustomResourceDefinitions generated from the types into `crds/manifests/`
//! (and into the Helm chart's `files/crds/`, which its `crds.yaml` template includes), the
//! audit record's JSON Schema, and the API reference `docs/crd-reference.md`.
//!
//! Usage: `cargo run -p agentgate-crds --features crdgen --bin crdgen [-- --check]`.
//! With `--check` nothing is written; the exit code is 1 when a committed file is stale.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs: Vec<PathBuf> = vec![root.join("manifests")];
    let chart = root.join("../charts/agentgate/files/crds");
    if root.join("../charts/agentgate/Chart.yaml").is_file() {
        dirs.push(chart);
    }
    let files = match agentgate_crds::generate::render_all() {
        Ok(files) => files,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stale = false;
    for dir in &dirs {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("crdgen: cannot create {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        for (name, yaml) in &files {
            let path = dir.join(name);
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current == *yaml {
                continue;
            }
            if check {
                eprintln!("crdgen: {} is stale", path.display());
                stale = true;
            } else if let Err(e) = std::fs::write(&path, yaml) {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            } else {
                println!("wrote {}", path.display());
            }
        }
    }
    match agentgate_crds::generate::record_schema() {
        Ok(schema) => {
            let path = root.join(agentgate_crds::generate::RECORD_SCHEMA_FILE);
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current != schema {
                if check {
                    eprintln!("crdgen: {} is stale", path.display());
                    stale = true;
                } else if let Err(e) = path
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::write(&path, &schema))
                {
                    eprintln!("crdgen: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                } else {
                    println!("wrote {}", path.display());
                }
            }
        }
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    }
    let path = root
        .join("..")
        .join(agentgate_crds::generate::REFERENCE_FILE);
    let reference = agentgate_crds::generate::reference();
    if std::fs::read_to_string(&path).unwrap_or_default() != reference {
        if check {
            eprintln!("crdgen: {} is stale", path.display());
            stale = true;
        } else if let Err(e) = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, &reference))
        {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("wrote {}", path.display());
        }
    }
    if stale {
        eprintln!("crdgen: run `cargo run -p agentgate-crds --features crdgen --bin crdgen`");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
