//! `kubectl agentgate grants` against a real API server with agentgate's CRDs: what an
//! approver reads before approving, and that an approval applies only to the version shown.
//! (No operator runs here: the approval webhooks are tested in `operator/tests/grants.rs`.)
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate_crds::AccessGrant;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use testenv::{Parts, TestEnv};

const NS: &str = "default";

fn plugin(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-agentgate"))
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl-agentgate")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A running `grants approve --confirm`, its standard error collected as it comes.
struct Approval {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Approval {
    fn start(kubeconfig: &Path, name: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kubectl-agentgate"))
            .env("KUBECONFIG", kubeconfig)
            .args(["grants", "approve", name, "-n", NS, "--confirm"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl-agentgate");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self { child, stderr }
    }

    /// Waits until the grant has been shown and the question asked.
    fn wait_for_question(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !text(&self.stderr.lock().unwrap()).contains("Approve it? [y/N]") {
            assert!(
                Instant::now() < deadline,
                "no question: {}",
                text(&self.stderr.lock().unwrap())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Answers, and returns the exit code, standard output and standard error.
    fn answer(mut self, answer: &str) -> (Option<i32>, String, String) {
        let mut stdin = self.child.stdin.take().expect("stdin");
        stdin.write_all(answer.as_bytes()).expect("answer");
        drop(stdin);
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read stdout");
        let status = self.child.wait().expect("wait");
        // The reader thread ends with the pipe.
        std::thread::sleep(Duration::from_millis(50));
        let err = text(&self.stderr.lock().unwrap());
        (status.code(), out, err)
    }
}

fn grant(name: &str, spec: Value) -> AccessGrant {
    serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AccessGrant",
        "metadata": { "name": name }, "spec": spec
    }))
    .expect("a grant")
}

fn held(text: &str, fingerprint: &str) -> Value {
    json!({ "identity": "claude", "target": "orders-db", "scope": { "operations": ["DDL"] },
        "duration": "15m", "reason": "held by guardrail no-ddl: DDL needs an approval",
        "command": { "text": text, "fingerprint": fingerprint, "operation": "DDL", "rule": "no-ddl" } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvers_see_what_they_approve_and_approve_only_that() -> anyhow::Result<()> {
    let env = TestEnv::start_async(Parts {
        kube: true,
        ..Default::default()
    })
    .await?;
    let kube = env.kube()?;
    let client = kube.client().await?;
    testenv::install_crds(&client).await?;
    let kubeconfig: PathBuf = kube.kubeconfig();
    let api: Api<AccessGrant> = Api::namespaced(client.clone(), NS);
    let pp = PostParams::default();

    // A long command, with a line break and an escape sequence that would erase the line
    // before it on a terminal.
    let long = format!(
        "DROP TABLE customers_archive_2019;\n\u{1b}[1A\u{1b}[2KALTER TABLE orders DROP COLUMN {}",
        "x".repeat(80)
    );
    api.create(&pp, &grant("held-ddl", held(&long, "9c2f4e1ab87d03c5")))
        .await?;
    api.create(
        &pp,
        &grant(
            "plain-read",
            json!({ "identity": "claude", "target": "orders-db",
                "scope": { "operations": ["Read", "Write"], "tables": ["public.orders"] },
                "reason": "r".repeat(70) }),
        ),
    )
    .await?;

    // The list: the class of a held command, and a cut marked as one.
    let out = plugin(&kubeconfig, &["grants", "list", "-n", NS]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    let row = |name: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_owned()
    };
    let held_row = row("held-ddl");
    assert!(
        held_row.contains("command (DDL): DROP TABLE customers_archive_2019;"),
        "{listed}"
    );
    assert!(held_row.contains('…'), "{listed}");
    assert!(!held_row.contains("xxxxxxxxxx"), "{listed}");
    assert!(!listed.contains('\u{1b}'), "{listed}");
    let plain_row = row("plain-read");
    assert!(plain_row.contains("Read,Write"), "{listed}");
    assert!(
        plain_row.contains(&format!("{}…", "r".repeat(59))),
        "{listed}"
    );

    // Approving shows everything first: the whole text (escapes made visible), the class,
    // the rule, the fingerprint, identity and target; then approves.
    let out = plugin(&kubeconfig, &["grants", "approve", "held-ddl", "-n", NS]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    for wanted in [
        "identity:     claude",
        "target:       orders-db",
        "operations:   DDL",
        "class:        DDL",
        "held by:      no-ddl",
        "fingerprint:  9c2f4e1ab87d03c5",
        "    DROP TABLE customers_archive_2019;",
        &format!(
            "    \\u{{1b}}[1A\\u{{1b}}[2KALTER TABLE orders DROP COLUMN {}",
            "x".repeat(80)
        ),
        "accessgrant/held-ddl approved",
    ] {
        assert!(shown.contains(wanted), "{wanted:?} not in:\n{shown}");
    }
    assert!(!shown.contains('\u{1b}'), "{shown}");
    let g = api.get("held-ddl").await?;
    assert_eq!(
        g.spec.decision.map(|d| d.verdict),
        Some(agentgate_crds::Verdict::Approve)
    );

    // Changed while the approver reads: nothing is approved.
    api.create(&pp, &grant("changing", held("DROP TABLE a", "1111")))
        .await?;
    let approval = Approval::start(&kubeconfig, "changing");
    approval.wait_for_question();
    api.patch(
        "changing",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "annotations": { "edited": "meanwhile" } } })),
    )
    .await?;
    let (code, out, err) = approval.answer("y\n");
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("DROP TABLE a"), "{out}");
    assert!(
        err.contains(
            "accessgrant/changing was not approved: it was changed or replaced after it was shown"
        ),
        "{err}"
    );
    assert!(api.get("changing").await?.spec.decision.is_none());

    // Replaced by another grant of the same name, for another command: nothing is approved.
    api.create(&pp, &grant("replaced", held("DROP TABLE shown", "2222")))
        .await?;
    let approval = Approval::start(&kubeconfig, "replaced");
    approval.wait_for_question();
    api.delete("replaced", &DeleteParams::default()).await?;
    api.create(&pp, &grant("replaced", held("DROP TABLE other", "3333")))
        .await?;
    let (code, out, err) = approval.answer("yes\n");
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("DROP TABLE shown"), "{out}");
    assert!(err.contains("was changed or replaced"), "{err}");
    let g = api.get("replaced").await?;
    assert!(g.spec.decision.is_none(), "{:?}", g.spec.decision);

    // Not confirmed: nothing is approved; confirmed and unchanged: approved.
    let approval = Approval::start(&kubeconfig, "replaced");
    approval.wait_for_question();
    let (code, _, err) = approval.answer("n\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not approved: not confirmed"), "{err}");
    assert!(api.get("replaced").await?.spec.decision.is_none());
    let approval = Approval::start(&kubeconfig, "replaced");
    approval.wait_for_question();
    let (code, out, err) = approval.answer("y\n");
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("DROP TABLE other") && out.contains("accessgrant/replaced approved"),
        "{out}"
    );
    assert!(api.get("replaced").await?.spec.decision.is_some());

    // A grant that does not exist: said so, nothing else.
    let out = plugin(&kubeconfig, &["grants", "approve", "nothing", "-n", NS]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("accessgrant/nothing was not approved"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}
