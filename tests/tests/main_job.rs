//! The README, followed as a newcomer would from a clean clone: its main command
//! (`scripts/demo.sh`: the real environment, agentgate installed with its Helm chart, a
//! scripted agent through the sidecar, the auditor's view), the same against a cluster given
//! by kubeconfig, and its three-line standalone quickstart against a real PostgreSQL.
//!
//! The clone builds into `~/.cache/agentgate/newcomer-target` (outside the repository, so a
//! second run is incremental).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testenv::{Parts, TestEnv};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A clean clone of the repository's committed state.
fn clone() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agentgate");
    let out = Command::new("git")
        .args(["clone", "-q", "--no-hardlinks"])
        .arg(repo())
        .arg(&dir)
        .output()
        .expect("git clone");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (tmp, dir)
}

/// The lines of the fenced `sh` block that follows `heading` in the README.
fn block_after(readme: &str, heading: &str) -> Vec<String> {
    let rest = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("the README has no {heading:?}"))
        .1;
    let block = rest
        .split_once("```sh\n")
        .and_then(|(_, b)| b.split_once("```"))
        .expect("a sh block")
        .0;
    block
        .lines()
        .map(|l| l.split("  #").next().unwrap_or("").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

fn target_dir() -> PathBuf {
    testenv::cache_dir().join("newcomer-target")
}

fn bash(dir: &Path, line: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(line)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target_dir())
        .env_remove("AGENTGATE_BIN_DIR");
    cmd
}

#[test]
fn the_readme_from_a_clean_clone() {
    let (_tmp, dir) = clone();
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let quickstart = block_after(&readme, "## Quickstart: the two commands");
    assert_eq!(
        quickstart,
        ["scripts/demo.sh", "scripts/test.sh"],
        "the two commands"
    );

    // The main job, exactly as the README says (scripts/test.sh is what runs this test).
    let out = bash(&dir, &quickstart[0])
        .output()
        .expect("run the main job");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{}",
        quickstart[0],
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        // Installed with the chart; the operator runs with the chart's RBAC.
        "STATUS: deployed",
        "customresourcedefinition.apiextensions.k8s.io/accessgrants.agentgate.dev",
        "operator running as agentgate-system/agentgate-operator",
        "agentidentity.agentgate.dev/claude-orders   team-orders   false      True",
        // The pod is admitted with the sidecar injected; an escape is refused.
        "agentgate-sidecar (init, restartPolicy Always)",
        "agent: PGHOST PGPORT PGSSLMODE KUBECONFIG GIT_SSH_COMMAND",
        "agentgate injection refused: hostNetwork",
        // A masked SELECT, a refused DROP, a held UPDATE approved then run.
        " Ada Lovelace | ****  | **** **** **** 1111",
        "refused by guardrail no-drops: dropping objects is never done by agents",
        "approved",
        "UPDATE 1",
        // A masked Secret, after its grant.
        "held for approval (guardrail agentgate-grant-secrets",
        "password: KioqKg==",
        // A recorded SSH session and a refused command.
        "Linux",
        "agentgate: refused: refused by guardrail no-reboots",
        "#1 uname -s; grep -c . /etc/hostname  Allowed (baseline)",
        // The auditor: sessions, the chain, OSCAL.
        "claude-orders  build-host",
        "records verified (0 duplicates skipped)",
        "OSCAL assessment results: 13 findings",
        "au-10_obj      satisfied",
        "Done.",
    ] {
        assert!(
            stdout.contains(expected),
            "the main job's output lacks {expected:?}:\n{stdout}"
        );
    }
    assert!(!stdout.contains("ada@example.com"), "{stdout}");
    assert!(!stdout.contains("4111 1111 1111 1111"), "{stdout}");

    // The same against "your cluster": an API server started apart, given by kubeconfig (a
    // real cluster's would be reached the same way). Afterwards only the CRDs are left.
    let yours = TestEnv::start(Parts {
        kube: true,
        ..Default::default()
    })
    .unwrap();
    let theirs = yours.kube().unwrap();
    let line = format!(
        "{} --kubeconfig {} --webhook-host 127.0.0.1",
        quickstart[0],
        theirs.kubeconfig().display()
    );
    let out = bash(&dir, &line)
        .output()
        .expect("run the main job on a cluster");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{line} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "using your cluster",
        &format!("kube-apiserver at {}", theirs.url()),
        "STATUS: deployed",
        "UPDATE 1",
        "password: KioqKg==",
        "Removing what the demo created in your cluster (the CRDs stay).",
        "Done.",
    ] {
        assert!(stdout.contains(expected), "lacks {expected:?}:\n{stdout}");
    }
    let left = theirs
        .kubectl_run(&["get", "clusterrolebindings,clusterroles", "-o", "name"])
        .unwrap();
    assert!(
        !left.contains("agentgate-approvers") && !left.contains("agentgate-operator"),
        "{left}"
    );
    let crds = theirs.kubectl_run(&["get", "crd", "-o", "name"]).unwrap();
    assert!(crds.contains("accessgrants.agentgate.dev"), "{crds}");
    drop(yours);

    // The standalone quickstart: a user points the example at their database, then runs the
    // three lines.
    let lines = block_after(&readme, "### Standalone: three lines");
    assert_eq!(lines.len(), 3, "{lines:?}");
    let env = TestEnv::start(Parts {
        postgres: true,
        ..Default::default()
    })
    .unwrap();
    let pg = env.postgres().unwrap();
    pg.psql_run(
        "app",
        "CREATE TABLE customers (id int PRIMARY KEY, email text, card text);
         INSERT INTO customers VALUES (1, 'ada@example.com', '4111 1111 1111 1111');
         GRANT SELECT ON customers TO agentgate;",
    )
    .unwrap();
    let example = dir.join("examples/standalone");
    let policy = std::fs::read_to_string(example.join("policy.yaml"))
        .unwrap()
        .replace("port: 5432", &format!("port: {}", pg.port()))
        .replace("database: orders", "database: app");
    std::fs::write(example.join("policy.yaml"), policy).unwrap();
    let creds = example.join("credentials/orders-db");
    std::fs::write(creds.join("username"), "agentgate").unwrap();
    std::fs::write(creds.join("password"), pg.password()).unwrap();

    let out = bash(&dir, &lines[0]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sidecar_line = lines[1].trim_end_matches('&').trim();
    // The sidecar's binary from the build above (the README's path is under ./target).
    let sidecar_line = sidecar_line.replace(
        "target/debug/",
        &format!("{}/debug/", target_dir().display()),
    );
    let mut sidecar = bash(&dir, &format!("exec {sidecar_line}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut sidecar);
    let psql = lines[2].replacen(
        "psql",
        &env.bins.pg_bin.join("psql").display().to_string(),
        1,
    );
    let query = format!("{psql} -At -c 'SELECT email, card FROM customers'");
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let out = bash(&dir, &query).output().unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the standalone sidecar never served: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(text.trim(), "****|**** **** **** 1111");
    let out = bash(&dir, &format!("{psql} -c 'DROP TABLE customers'"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused by guardrail no-drops"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
