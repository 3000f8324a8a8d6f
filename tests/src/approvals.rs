//! Approvals in a standalone sidecar's policy folder, as an approver makes them there: a
//! held command files its AccessGrant request as `<policy>/requests/<name>.yaml`, and a
//! decision is that file with `spec.decision` set.

use std::path::Path;
use std::time::{Duration, Instant};

/// The names of the requests filed so far.
pub fn filed(policy: &Path) -> Vec<String> {
    std::fs::read_dir(policy.join("requests"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter_map(|n| n.strip_suffix(".yaml").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (up to 20 s) for a request that is not in `before` and returns its name.
pub fn wait_new(policy: &Path, before: &[String]) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(new) = filed(policy).into_iter().find(|n| !before.contains(n)) {
            return Ok(new);
        }
        if Instant::now() > deadline {
            return Err("no AccessGrant request was filed within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Decides request `name`: `verdict` is `Approve` or `Deny`, by `who`, with `reason`
/// (written atomically, as a GitOps tool would).
pub fn decide(
    policy: &Path,
    name: &str,
    verdict: &str,
    who: &str,
    reason: &str,
) -> Result<(), String> {
    let file = policy.join("requests").join(format!("{name}.yaml"));
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let decided = text.replacen(
        "spec:\n",
        &format!(
            "spec:\n  decision: {{ verdict: {verdict}, reason: {reason:?}, decidedAt: \"{}\", decidedBy: {{ username: {who} }} }}\n",
            jiff::Timestamp::now()
        ),
        1,
    );
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, decided).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &file).map_err(|e| format!("{}: {e}", file.display()))
}

/// Whether `records` hold the Approval of grant `name` by `approver`.
pub fn approval_recorded(records: &[serde_json::Value], name: &str, approver: &str) -> bool {
    records.iter().any(|r| {
        r["kind"] == "Approval"
            && r["decision"]["verdict"] == "Approved"
            && r["decision"]["grant"] == name
            && r["decision"]["approver"] == approver
    })
}

/// Kills `child` (an agent's client waiting on a held request filed as `name`), then has
/// `who` approve the request: what a client that gives up meets.
pub fn give_up_then_approve(
    policy: &Path,
    mut child: std::process::Child,
    name: &str,
    who: &str,
) -> Result<(), String> {
    child.kill().map_err(|e| format!("kill the client: {e}"))?;
    child
        .wait()
        .map_err(|e| format!("wait for the client: {e}"))?;
    std::thread::sleep(Duration::from_secs(1));
    decide(policy, name, "Approve", who, "ok")
}

/// Waits (up to 15 s) for an Outcome record whose error contains one of `needles` among
/// `records()`.
pub fn wait_outcome(
    records: impl Fn() -> Vec<serde_json::Value>,
    needles: &[&str],
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if records().iter().any(|r| {
            r["kind"] == "Outcome"
                && r["outcome"]["error"]
                    .as_str()
                    .is_some_and(|e| needles.iter().any(|n| e.contains(n)))
        }) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no Outcome record says one of {needles:?} within 15 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
