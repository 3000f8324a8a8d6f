//! The README's main job (`scripts/demo.sh` runs `agentgate-env demo`) works end to end.

use std::process::Command;

#[test]
fn the_demo_shows_the_api_served_and_validated() {
    let out = Command::new(env!("CARGO_BIN_EXE_agentgate-env"))
        .arg("demo")
        .output()
        .expect("run agentgate-env demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "established accessgrants.agentgate.dev",
        "agentidentities   agid         agentgate.dev/v1alpha1   true         AgentIdentity",
        "accessgrant.agentgate.dev/fix-order-4711 created",
        "agentidentity.agentgate.dev/claude-orders",
        "spec.duration must be between 10s and 168h",
        "The approver's decision.",
        "Done.",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected:?}:\n{stdout}"
        );
    }
}
