//! Validation of OSCAL JSON documents against NIST's published OSCAL JSON schema.
//!
//! `tests/env/install.sh` builds `oscal-validate` (`tests/env/oscal`, a small Go program on
//! github.com/santhosh-tekuri/jsonschema/v6: draft-07, formats asserted, `\p{L}` patterns as
//! the schema means them) and puts NIST's `oscal_complete_schema.json` of the OSCAL release
//! [`version`] next to it, unmodified and checked against the release asset's SHA-256, in
//! `<cache>/oscal-validate-<version>/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// The OSCAL release whose schema documents are validated against (`OSCAL_VERSION` in
/// `tests/env/install.sh`).
pub fn version() -> String {
    crate::install_setting("OSCAL_VERSION")
}

/// The validator: `$AGENTGATE_OSCAL_VALIDATE`, else
/// `<cache>/oscal-validate-<version>/oscal-validate`. Its schema is
/// `oscal_complete_schema.json` in the same directory.
pub fn validator() -> Result<PathBuf, Error> {
    let path = std::env::var_os("AGENTGATE_OSCAL_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            crate::cache_dir()
                .join(format!("oscal-validate-{}", version()))
                .join("oscal-validate")
        });
    let schema = path.with_file_name("oscal_complete_schema.json");
    if !path.exists() {
        return Err(Error::MissingBinary {
            what: "oscal-validate",
            path,
            var: "AGENTGATE_OSCAL_VALIDATE",
        });
    }
    if !schema.exists() {
        return Err(Error::MissingBinary {
            what: "NIST's OSCAL JSON schema (next to oscal-validate)",
            path: schema,
            var: "AGENTGATE_OSCAL_VALIDATE",
        });
    }
    Ok(path)
}

/// Validates the OSCAL JSON document at `path` against NIST's OSCAL complete schema (any
/// OSCAL model). `Err` carries the validator's report: one line per violation, with the
/// instance location, the error and the schema location, or why it could not run.
pub fn oscal_validate(path: &Path) -> Result<(), String> {
    run(path, None)
}

/// Like [`oscal_validate`], and also requires the document's root model to be `model` (for
/// example `assessment-results`).
pub fn oscal_validate_model(path: &Path, model: &str) -> Result<(), String> {
    run(path, Some(model))
}

fn run(path: &Path, model: Option<&str>) -> Result<(), String> {
    let validator = validator().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&validator);
    if let Some(model) = model {
        cmd.arg("-model").arg(model);
    }
    let out = cmd
        .arg("--")
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", validator.display()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
