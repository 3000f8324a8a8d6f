//! The binary answers `--help` and `--version` like a well-behaved CLI.

use std::process::Command;

fn run(arg: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentgate-sidecar"))
        .arg(arg)
        .output()
        .unwrap_or_else(|e| panic!("run agentgate-sidecar {arg}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn prints_version() {
    let (ok, out) = run("--version");
    assert!(ok);
    assert_eq!(
        out.trim(),
        format!("agentgate-sidecar {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn prints_help() {
    let (ok, out) = run("--help");
    assert!(ok);
    assert!(out.contains("Usage: agentgate-sidecar"), "{out}");
    assert!(out.contains("--log-format"), "{out}");
}

#[test]
fn refuses_unknown_flags() {
    let (ok, _) = run("--no-such-flag");
    assert!(!ok);
}
