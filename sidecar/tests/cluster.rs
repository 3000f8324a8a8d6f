//! The sidecar in a cluster: policy watched from a real API server (with agentgate's operator
//! and approval webhooks running), the pod's own token verified with a TokenReview, held
//! commands filed as AccessGrant objects that a person approves or denies with kubectl, a
//! revocation that stops an open connection, and fail-closed when the policy cannot be read.

#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agentgate_crds::{AccessGrant, AgentSession};
use agentgate_operator::webhook::{Endpoint, configurations};
use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use testenv::process::{Proc, Spec, free_port};
use testenv::{KubeEnv, Parts, TestEnv};

const NS: &str = "default";

async fn token(client: &kube::Client, sa: &str, audience: Option<&str>) -> anyhow::Result<String> {
    Ok(testenv::kube_env::sa_token(client, NS, sa, audience).await?)
}

async fn apply(client: &kube::Client, obj: serde_json::Value) -> anyhow::Result<()> {
    Ok(testenv::kube_env::apply(client, NS, obj).await?)
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// A started sidecar: the process, its PostgreSQL port and its health port.
struct Sidecar {
    proc: Proc,
    port: u16,
    health: u16,
}

impl Sidecar {
    /// `/healthz`: status and body.
    fn health(&self) -> (u16, String) {
        testenv::http::get(self.health, "/healthz")
            .map(|r| (r.status, r.body))
            .unwrap_or_default()
    }
}

/// Starts a sidecar in in-cluster mode acting for `claude`, authenticated as service account
/// `sa`.
async fn sidecar(
    env: &TestEnv,
    admin: &kube::Client,
    sa: &str,
    targets: &Path,
) -> anyhow::Result<Sidecar> {
    sidecar_with(env, admin, sa, targets, &[]).await
}

/// [`sidecar`] with more arguments.
async fn sidecar_with(
    env: &TestEnv,
    admin: &kube::Client,
    sa: &str,
    targets: &Path,
    extra: &[String],
) -> anyhow::Result<Sidecar> {
    let kube = env.kube()?;
    let api_token = token(admin, sa, None).await?;
    let kubeconfig = kube.kubeconfig_with_token(&format!("{sa}-sidecar"), &api_token)?;
    let pod_token = token(admin, sa, Some("agentgate")).await?;
    let token_file = env.dir().join(format!("{sa}-agentgate-token"));
    std::fs::write(&token_file, pod_token)?;
    let port = free_port()?;
    let health = free_port()?;
    let spec = Spec::new(
        &format!("sidecar-{sa}"),
        env!("CARGO_BIN_EXE_agentgate-sidecar"),
    )
    .args([
        "--in-cluster".to_owned(),
        "--identity=claude".into(),
        format!("--token-file={}", token_file.display()),
        format!("--targets-dir={}", targets.display()),
        format!("--pg-addr=127.0.0.1:{port}"),
        "--kube-addr=127.0.0.1:0".into(),
        "--ssh-addr=127.0.0.1:0".into(),
        format!(
            "--audit-dir={}",
            env.dir().join(format!("audit-{port}")).display()
        ),
        "--policy-stale-after=3s".into(),
        format!("--health-addr=127.0.0.1:{health}"),
    ])
    .args(extra.iter().cloned())
    .env("KUBECONFIG", kubeconfig.display().to_string())
    .env("POD_NAMESPACE", NS)
    .env("RUST_LOG", "info,agentgate_sidecar=debug");
    let mut proc = Proc::start(spec, &env.dir().join("logs"))?;
    testenv::process::wait_listening(&mut proc, port, Duration::from_secs(20))?;
    Ok(Sidecar { proc, port, health })
}

fn psql(env: &TestEnv, port: u16, sql: &str) -> Output {
    Command::new(env.bins.pg_bin.join("psql"))
        .arg(format!(
            "host=127.0.0.1 port={port} dbname=db user=claude sslmode=disable"
        ))
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Polls `f` until it returns `Some`, for at most `secs` seconds.
async fn eventually<T>(
    what: &str,
    secs: u64,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The grant the sidecar filed for a command whose text contains `needle`.
async fn filed(admin: &kube::Client, needle: &str) -> anyhow::Result<AccessGrant> {
    let api: Api<AccessGrant> = Api::namespaced(admin.clone(), NS);
    eventually(&format!("an AccessGrant for {needle:?}"), 30, async || {
        api.list(&ListParams::default().labels("agentgate.dev/held-by=sidecar"))
            .await
            .ok()?
            .items
            .into_iter()
            .find(|g| {
                g.spec
                    .command
                    .as_ref()
                    .is_some_and(|c| c.text.contains(needle))
            })
    })
    .await
}

fn kubectl_as(kube: &KubeEnv, user: &str, args: &[&str]) -> Output {
    kube.kubectl_as(user)
        .args(args)
        .output()
        .expect("run kubectl")
}

fn decide(kube: &KubeEnv, user: &str, grant: &str, decision: serde_json::Value) -> Output {
    let patch = json!({ "spec": { "decision": decision } }).to_string();
    kubectl_as(
        kube,
        user,
        &[
            "patch",
            "accessgrant",
            grant,
            "-n",
            NS,
            "--type=merge",
            "-p",
            &patch,
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_cluster_policy_holds_and_revocation() -> anyhow::Result<()> {
    testenv::install_crypto_provider();
    let mut env = TestEnv::start_async(Parts {
        kube: true,
        postgres: true,
        ..Default::default()
    })
    .await?;
    let kube = env.kube()?;
    let admin = kube.client().await?;
    testenv::install_crds(&admin).await?;
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "agentgate-system" } }))?,
        )
        .await?;
    for name in ["claude", "other", "nobody"] {
        Api::<ServiceAccount>::namespaced(admin.clone(), NS)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({ "metadata": { "name": name } }))?,
            )
            .await?;
    }
    // The sidecar's permissions, exactly as documented in the example; `other` gets the same
    // (it is a working sidecar of another pod); `nobody` gets none.
    kube.kubectl_run(&[
        "apply",
        "-f",
        &repo("examples/in-cluster/sidecar-rbac.yaml")
            .display()
            .to_string(),
    ])?;
    kube.kubectl_run(&[
        "create",
        "rolebinding",
        "sidecar-other",
        "--clusterrole=agentgate-sidecar",
        "--serviceaccount=default:other",
    ])?;
    kube.kubectl_run(&[
        "create",
        "clusterrolebinding",
        "token-reviewer-other",
        "--clusterrole=agentgate-token-reviewer",
        "--serviceaccount=default:other",
    ])?;
    // People: approvers may read and patch grants; developers may request them.
    kube.kubectl_run(&[
        "create",
        "clusterrole",
        "grant-editor",
        "--verb=get,list,watch,create,patch,update",
        "--resource=accessgrants.agentgate.dev",
    ])?;
    kube.kubectl_run(&[
        "create",
        "clusterrolebinding",
        "grant-editors",
        "--clusterrole=grant-editor",
        "--group=agentgate-approvers",
        "--group=developers",
    ])?;

    let pg = env.postgres()?;
    pg.psql_run(
        "app",
        "CREATE TABLE customers (id int PRIMARY KEY, email text);
         INSERT INTO customers VALUES (1, 'ada@example.com'), (2, 'bob@example.com');
         CREATE TABLE orders (id int PRIMARY KEY, state text);
         INSERT INTO orders VALUES (4711, 'paid'), (4712, 'paid');
         GRANT ALL ON ALL TABLES IN SCHEMA public TO agentgate;",
    )?;
    let targets = tempfile::tempdir()?;
    pg.write_credentials(targets.path(), "db", "agentgate")?;

    apply(&admin, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "Target", "metadata": { "name": "db" },
        "spec": { "protocol": "Postgres", "holdTimeout": "60s",
            "postgres": { "host": "127.0.0.1", "port": pg.port(), "database": "app",
                "tls": { "mode": "VerifyFull", "ca": { "name": "db-credentials", "key": "ca.crt" } },
                "credentials": { "name": "db-credentials" } } }
    }))
    .await?;
    apply(&admin, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": { "name": "claude" },
        "spec": { "owner": "team-orders", "authentication": { "serviceAccount": { "name": "claude" } },
            "approvers": { "groups": ["agentgate-approvers"] }, "maxGrantDuration": "1h",
            "baseline": [ { "target": "db", "scope": { "operations": ["Read"] } } ] }
    }))
    .await?;
    apply(&admin, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "MaskPolicy", "metadata": { "name": "pii" },
        "spec": { "rules": [ { "name": "emails", "detectors": ["Email"], "action": "Redact", "replacement": "[email]" } ] }
    }))
    .await?;

    // agentgate's operator and its approval webhooks, for real.
    let webhook_port = free_port()?;
    let config = agentgate_operator::Config::parse_from([
        "agentgate-operator".to_owned(),
        "--namespace=agentgate-system".into(),
        format!("--webhook-addr=127.0.0.1:{webhook_port}"),
        "--webhook-hosts=127.0.0.1".into(),
        format!("--metrics-addr=127.0.0.1:{}", free_port()?),
        "--sidecar-image=registry.example/agentgate-sidecar:test".into(),
        format!("--oidc-ca-file={}", kube.ca_path().display()),
    ]);
    let (m, v) = configurations(
        &config,
        &Endpoint::Url(format!("https://127.0.0.1:{webhook_port}")),
    );
    Api::all(admin.clone())
        .create(&PostParams::default(), &m)
        .await?;
    Api::all(admin.clone())
        .create(&PostParams::default(), &v)
        .await?;
    tokio::spawn(agentgate_operator::run_with_client(admin.clone(), config));
    let grants: Api<AccessGrant> = Api::namespaced(admin.clone(), NS);
    let probe: AccessGrant = serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AccessGrant", "metadata": { "name": "probe" },
        "spec": { "identity": "claude", "target": "db", "scope": { "operations": ["Read"] }, "reason": "probe", "duration": "1m" }
    }))?;
    eventually("the approval webhooks", 60, async || {
        let pp = PostParams {
            dry_run: true,
            ..Default::default()
        };
        grants.create(&pp, &probe).await.ok()
    })
    .await?;

    let main = sidecar(&env, &admin, "claude", targets.path()).await?;
    let port = main.port;
    let log = main.proc.log_path().to_owned();
    let ready = eventually("the sidecar serving reads", 30, async || {
        let o = psql(&env, port, "SELECT email FROM customers ORDER BY id");
        o.status.success().then(|| stdout(&o))
    })
    .await;
    let ready = ready.map_err(|e| {
        anyhow::anyhow!(
            "{e}:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })?;
    // Policy from the cluster: the baseline allows reads; the MaskPolicy masks.
    assert_eq!(ready, "[email]\n[email]");
    // The startup probe the operator injects passes once policy and pod token are in.
    assert_eq!(main.health(), (200, "ok\n".to_owned()));

    // 1. A change to every row is held; the sidecar files an AccessGrant bound to it (the
    //    approver reads it masked), the query waits, a person approves, it runs.
    let env_ref = &env;
    let held = tokio::task::spawn_blocking({
        let pg_bin = env_ref.bins.pg_bin.clone();
        move || {
            Command::new(pg_bin.join("psql"))
                .arg(format!(
                    "host=127.0.0.1 port={port} dbname=db user=claude sslmode=disable"
                ))
                .args([
                    "-X",
                    "-At",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    "UPDATE customers SET email = 'eve@example.com'",
                ])
                .output()
                .expect("run psql")
        }
    });
    let g = filed(&admin, "UPDATE customers").await?;
    let name = g.metadata.name.clone().expect("name");
    let cmd = g.spec.command.clone().expect("a bound command");
    assert!(
        !cmd.text.contains("eve@example.com"),
        "the approver sees the command masked: {}",
        cmd.text
    );
    assert_eq!(cmd.rule.as_deref(), Some("agentgate-hold-unbounded"));
    assert_eq!(
        g.spec.requested_by.as_ref().map(|u| u.username.as_str()),
        Some("system:serviceaccount:default:claude"),
        "the webhook stamps the sidecar's service account as the requester"
    );
    assert!(
        g.spec.reason.contains("a change to every row"),
        "{}",
        g.spec.reason
    );
    // The agent cannot approve its own request.
    let agent_kubeconfig =
        kube.kubeconfig_with_token("claude-self", &token(&admin, "claude", None).await?)?;
    let selfish = Command::new(env.bins.kubectl.clone())
        .env("KUBECONFIG", &agent_kubeconfig)
        .args([
            "patch",
            "accessgrant",
            &name,
            "--type=merge",
            "-p",
            r#"{"spec":{"decision":{"verdict":"Approve"}}}"#,
        ])
        .output()?;
    assert!(!selfish.status.success(), "an agent approved itself");
    assert!(
        stderr(&selfish).contains("forbidden"),
        "{}",
        stderr(&selfish)
    );
    assert!(
        !held.is_finished(),
        "the held query must wait for the approver"
    );
    let ok = decide(
        kube,
        "alice",
        &name,
        json!({ "verdict": "Approve", "reason": "cleanup ticket 12" }),
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let out = held.await?;
    assert!(out.status.success(), "approved, it runs: {}", stderr(&out));
    assert_eq!(stdout(&out), "UPDATE 2");
    assert_eq!(
        pg.psql_run("app", "SELECT DISTINCT email FROM customers")?
            .trim(),
        "eve@example.com"
    );

    // 2. Denied: the waiting query ends at once with who denied it and why.
    let held = tokio::task::spawn_blocking({
        let pg_bin = env.bins.pg_bin.clone();
        move || {
            Command::new(pg_bin.join("psql"))
                .arg(format!(
                    "host=127.0.0.1 port={port} dbname=db user=claude sslmode=disable"
                ))
                .args(["-X", "-At", "-c", "DELETE FROM orders"])
                .output()
                .expect("run psql")
        }
    });
    let g = filed(&admin, "DELETE FROM orders").await?;
    let name = g.metadata.name.clone().expect("name");
    let no = decide(
        kube,
        "alice",
        &name,
        json!({ "verdict": "Deny", "reason": "orders are kept for 7 years" }),
    );
    assert!(no.status.success(), "{}", stderr(&no));
    let out = held.await?;
    assert!(
        stderr(&out).contains(&format!(
            "AccessGrant {name} was denied by alice: orders are kept for 7 years"
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        pg.psql_run("app", "SELECT count(*) FROM orders")?.trim(),
        "2"
    );

    // 3. holdTimeout 0s: answered at once with the grant to wait for and how to approve it;
    //    asking again reuses the same request; once approved, running it again works.
    apply(&admin, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "Target", "metadata": { "name": "db" },
        "spec": { "protocol": "Postgres", "holdTimeout": "0s",
            "postgres": { "host": "127.0.0.1", "port": pg.port(), "database": "app",
                "tls": { "mode": "VerifyFull", "ca": { "name": "db-credentials", "key": "ca.crt" } },
                "credentials": { "name": "db-credentials" } } }
    }))
    .await?;
    let first = eventually("holdTimeout 0s in force", 20, async || {
        let started = Instant::now();
        let o = psql(&env, port, "TRUNCATE orders");
        (started.elapsed() < Duration::from_secs(5)).then_some(o)
    })
    .await?;
    let err = stderr(&first);
    assert!(
        err.contains("held for approval: AccessGrant claude-"),
        "{err}"
    );
    assert!(
        err.contains("an approver runs: kubectl patch accessgrant claude-"),
        "{err}"
    );
    let g = filed(&admin, "TRUNCATE").await?;
    let name = g.metadata.name.clone().expect("name");
    assert!(err.contains(&name), "{err}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = psql(&env, port, "truncate   ORDERS");
    assert!(
        stderr(&again).contains(&name),
        "the same command (normalized) reuses request {name}: {}",
        stderr(&again)
    );
    let ok = decide(kube, "alice", &name, json!({ "verdict": "Approve" }));
    assert!(ok.status.success(), "{}", stderr(&ok));
    let ran = eventually("the approval seen by the sidecar", 20, async || {
        let o = psql(&env, port, "TRUNCATE orders");
        o.status.success().then(|| stdout(&o))
    })
    .await?;
    assert_eq!(ran, "TRUNCATE TABLE");

    // 4. A scoped grant works in an open connection, and its revocation stops it there at once.
    let bob = kube.client_as("bob").await?;
    let req: AccessGrant = serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AccessGrant", "metadata": { "name": "claude-writes-orders" },
        "spec": { "identity": "claude", "target": "db", "scope": { "operations": ["Write"], "tables": ["orders"] },
            "reason": "backfill", "duration": "30m" }
    }))?;
    Api::<AccessGrant>::namespaced(bob, NS)
        .create(&PostParams::default(), &req)
        .await?;
    let ok = decide(
        kube,
        "alice",
        "claude-writes-orders",
        json!({ "verdict": "Approve" }),
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} dbname=db user=claude sslmode=disable"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    let mut next: i32 = 1;
    eventually("the grant in force", 20, async || {
        next += 1;
        client
            .execute("INSERT INTO orders VALUES ($1, 'new')", &[&next])
            .await
            .ok()
    })
    .await?;
    // Outside the grant's tables: still not allowed.
    let other = tokio::time::timeout(
        Duration::from_secs(20),
        client.execute(
            "UPDATE customers SET email = 'x@example.com' WHERE id = 1",
            &[],
        ),
    )
    .await?
    .expect_err("customers is outside the grant");
    let other = other
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(other.contains("held for approval"), "{other}");
    let revoke = kubectl_as(
        kube,
        "alice",
        &[
            "patch",
            "accessgrant",
            "claude-writes-orders",
            "--type=merge",
            "-p",
            r#"{"spec":{"revocation":{"reason":"backfill done"}}}"#,
        ],
    );
    assert!(revoke.status.success(), "{}", stderr(&revoke));
    let refused = eventually("the revocation in force", 10, async || {
        next += 1;
        client
            .execute("INSERT INTO orders VALUES ($1, 'late')", &[&next])
            .await
            .err()
    })
    .await?;
    let text = refused
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(
        text.contains("no baseline or active grant allows Write on db"),
        "{text}"
    );
    drop(client);

    // 5. The audit trail: each session is an AgentSession (counters, grants, chain head, the
    //    sidecar's key) and `kubectl agentgate` lists them and verifies the records against
    //    them; approvers use its grant commands.
    let sessions: Api<AgentSession> = Api::namespaced(admin.clone(), NS);
    let summary = eventually(
        "AgentSessions with held and refused requests",
        30,
        async || {
            let list = sessions.list(&Default::default()).await.ok()?.items;
            let active = list.iter().any(|s| {
                s.status.as_ref().and_then(|st| st.phase)
                    != Some(agentgate_crds::SessionPhase::Ended)
            });
            if active {
                return None;
            }
            let ended: Vec<AgentSession> = list
                .into_iter()
                .filter(|s| {
                    s.status.as_ref().is_some_and(|st| {
                        st.phase == Some(agentgate_crds::SessionPhase::Ended)
                            && st.counters.held > 0
                    })
                })
                .collect();
            (ended.len() >= 3).then_some(ended)
        },
    )
    .await?;
    let approved = summary
        .iter()
        .find(|s| {
            s.status
                .as_ref()
                .is_some_and(|st| st.counters.rows == 2 && st.counters.held == 1)
        })
        .expect("the approved UPDATE's session");
    let st = approved.status.clone().unwrap_or_default();
    assert_eq!(approved.spec.identity, "claude");
    assert_eq!(approved.spec.target, "db");
    assert!(st.grants.iter().any(|g| g.starts_with("claude-")), "{st:?}");
    assert!(
        st.chain_head.is_some() && st.signing_key.is_some(),
        "{st:?}"
    );
    let plugin_path = format!(
        "{}:{}",
        Path::new(env!("CARGO_BIN_EXE_agentgate-sidecar"))
            .parent()
            .expect("bin dir")
            .display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let plugin = |user: &str, args: &[&str]| {
        let mut cmd = Command::new(env.bins.kubectl.clone());
        cmd.env("KUBECONFIG", kube.kubeconfig_for(user))
            .env("PATH", &plugin_path)
            .arg("agentgate")
            .args(args)
            .output()
            .expect("run kubectl agentgate")
    };
    // Auditors read sessions.
    kube.kubectl_run(&[
        "create",
        "clusterrole",
        "session-reader",
        "--verb=get,list,watch",
        "--resource=agentsessions.agentgate.dev",
    ])?;
    kube.kubectl_run(&[
        "create",
        "clusterrolebinding",
        "session-readers",
        "--clusterrole=session-reader",
        "--group=agentgate-approvers",
    ])?;
    let listed = plugin("alice", &["sessions", "-n", NS, "--identity", "claude"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(
        stdout(&listed).contains(&approved.spec.session_id),
        "{}",
        stdout(&listed)
    );
    let audit_dir = env.dir().join(format!("audit-{port}"));
    let verified = plugin(
        "alice",
        &[
            "verify",
            "-n",
            NS,
            "--sessions",
            "--open",
            &audit_dir.display().to_string(),
        ],
    );
    assert!(verified.status.success(), "{}", stdout(&verified));
    assert!(
        !stdout(&verified).contains("not pinned") && !stdout(&verified).contains("--key"),
        "the sessions' published key pins the chain: {}",
        stdout(&verified)
    );
    // A record cut from the end of the file is found against the AgentSessions' heads.
    let cut_dir = env.dir().join("cut");
    std::fs::create_dir_all(&cut_dir)?;
    let text = std::fs::read_to_string(audit_dir.join("audit.jsonl"))?;
    let last_end = text
        .lines()
        .collect::<Vec<_>>()
        .iter()
        .rposition(|l| l.contains("\"kind\":\"SessionEnd\""))
        .expect("a session end");
    let kept: Vec<&str> = text.lines().take(last_end).collect();
    std::fs::write(cut_dir.join("audit.jsonl"), kept.join("\n"))?;
    let cut = plugin(
        "alice",
        &[
            "verify",
            "-n",
            NS,
            "--sessions",
            "--open",
            &cut_dir.display().to_string(),
        ],
    );
    assert_eq!(cut.status.code(), Some(1), "{}", stdout(&cut));
    assert!(
        stdout(&cut).contains("TAMPERED Truncated"),
        "{}",
        stdout(&cut)
    );
    // Grants through the plugin: bob requests, bob cannot approve, alice approves.
    let asked = plugin(
        "bob",
        &[
            "grants",
            "request",
            "claude-reads-more",
            "-n",
            NS,
            "--identity",
            "claude",
            "--target",
            "db",
            "--operations",
            "Read",
            "--duration",
            "10m",
            "--reason",
            "report",
        ],
    );
    assert!(asked.status.success(), "{}", stderr(&asked));
    assert!(
        stdout(&asked).contains("kubectl agentgate grants approve claude-reads-more"),
        "{}",
        stdout(&asked)
    );
    let refused = plugin("bob", &["grants", "approve", "claude-reads-more", "-n", NS]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("accessgrant/claude-reads-more was not approved"),
        "{}",
        stderr(&refused)
    );
    let ok = plugin(
        "alice",
        &[
            "grants",
            "approve",
            "claude-reads-more",
            "-n",
            NS,
            "--reason",
            "ok",
        ],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let g = grants.get("claude-reads-more").await?;
    assert_eq!(
        g.spec
            .decision
            .and_then(|d| d.decided_by)
            .map(|u| u.username),
        Some("alice".to_owned())
    );
    let listed = plugin("alice", &["grants", "list", "-n", NS]);
    assert!(
        stdout(&listed).contains("claude-reads-more"),
        "{}",
        stdout(&listed)
    );
    let revoked = plugin(
        "alice",
        &[
            "grants",
            "revoke",
            "claude-reads-more",
            "-n",
            NS,
            "--reason",
            "done",
        ],
    );
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    let g = grants.get("claude-reads-more").await?;
    assert_eq!(
        g.spec
            .revocation
            .and_then(|r| r.revoked_by)
            .map(|u| u.username),
        Some("alice".to_owned())
    );
    // A scope from the flags: tables for this PostgreSQL Target; Kubernetes rules for it
    // are refused by the webhook (they would be ignored, and the grant would allow more).
    let asked = plugin(
        "bob",
        &[
            "grants",
            "request",
            "claude-orders",
            "-n",
            NS,
            "--identity",
            "claude",
            "--target",
            "db",
            "--operations",
            "Read,Write",
            "--table",
            "public.orders,billing.*",
            "--reason",
            "fix order 4711",
        ],
    );
    assert!(asked.status.success(), "{}", stderr(&asked));
    let g = grants.get("claude-orders").await?;
    assert_eq!(g.spec.scope.tables, ["public.orders", "billing.*"]);
    assert_eq!(g.spec.scope.operations.len(), 2);
    let wrong = plugin(
        "bob",
        &[
            "grants",
            "request",
            "claude-pods",
            "-n",
            NS,
            "--identity",
            "claude",
            "--target",
            "db",
            "--operations",
            "Write",
            "--verb",
            "delete",
            "--resource",
            "pods,deployments.apps/scale",
            "--in-namespace",
            "shop",
            "--reason",
            "restart",
        ],
    );
    assert!(!wrong.status.success(), "{}", stdout(&wrong));
    assert!(
        stderr(&wrong).contains("scope-fits-target")
            && stderr(&wrong).contains("scope.kubernetes does not apply to a Postgres Target"),
        "{}",
        stderr(&wrong)
    );
    let half = plugin(
        "bob",
        &[
            "grants",
            "request",
            "claude-half",
            "-n",
            NS,
            "--identity",
            "claude",
            "--target",
            "db",
            "--operations",
            "Read",
            "--verb",
            "get",
            "--reason",
            "x",
        ],
    );
    assert_eq!(half.status.code(), Some(2), "{}", stderr(&half));
    assert!(stderr(&half).contains("--resource"), "{}", stderr(&half));
    // A denial, with its reason, as YAML for scripts.
    let asked = plugin(
        "bob",
        &[
            "grants",
            "request",
            "claude-ddl",
            "-n",
            NS,
            "--identity",
            "claude",
            "--target",
            "db",
            "--operations",
            "DDL",
            "--duration",
            "10m",
            "--reason",
            "migration",
        ],
    );
    assert!(asked.status.success(), "{}", stderr(&asked));
    let denied = plugin(
        "alice",
        &[
            "grants",
            "deny",
            "claude-ddl",
            "-n",
            NS,
            "--reason",
            "use the migration job",
        ],
    );
    assert!(denied.status.success(), "{}", stderr(&denied));
    assert_eq!(stdout(&denied).trim(), "accessgrant/claude-ddl denied");
    let listed = plugin("alice", &["grants", "list", "-n", NS, "-o", "yaml"]);
    assert!(
        stdout(&listed).contains("reason: use the migration job"),
        "{}",
        stdout(&listed)
    );

    // 6. A pod whose service account is not the identity's cannot act as it.
    let other = sidecar(&env, &admin, "other", targets.path()).await?;
    let other_port = other.port;
    let refused = eventually("the mismatch reported", 30, async || {
        let e = stderr(&psql(&env, other_port, "SELECT 1"));
        e.contains("this pod runs as").then_some(e)
    })
    .await?;
    assert!(
        refused.contains("this pod runs as system:serviceaccount:default:other, but AgentIdentity claude is bound to system:serviceaccount:default:claude"),
        "{refused}"
    );
    let (status, body) = other.health();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("this pod runs as system:serviceaccount:default:other"),
        "{body}"
    );

    // 7. A sidecar that cannot read the policy refuses everything and says why.
    let nobody = sidecar(&env, &admin, "nobody", targets.path()).await?;
    let nobody_port = nobody.port;
    let refused = eventually("the refusal", 30, async || {
        let e = stderr(&psql(&env, nobody_port, "SELECT 1"));
        e.contains("forbidden").then_some(e)
    })
    .await?;
    assert!(
        refused.contains("agentgate refuses connections until its policy is loaded: the watch on"),
        "{refused}"
    );
    let (status, body) = nobody.health();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("policy not loaded: the watch on"),
        "{body}"
    );

    // 7b. Agents presenting service-account tokens (--pg-auth token): a token whose service
    //     account was deleted is refused once the API server says so, though its
    //     signature still holds.
    Api::<ServiceAccount>::namespaced(admin.clone(), NS)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "tok-agent" } }))?,
        )
        .await?;
    apply(&admin, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": { "name": "tok" },
        "spec": { "owner": "team-orders", "authentication": { "serviceAccount": { "name": "tok-agent" } },
            "baseline": [ { "target": "db", "scope": { "operations": ["Read"] } } ] }
    }))
    .await?;
    let tokened = sidecar_with(
        &env,
        &admin,
        "claude",
        targets.path(),
        &[
            "--pg-auth=token".into(),
            format!("--sa-issuer={}", kube.issuer()),
            format!("--oidc-ca-file={}", kube.ca_path().display()),
        ],
    )
    .await?;
    let agent_token = token(&admin, "tok-agent", Some("agentgate")).await?;
    let as_tok = |pass: &str| {
        Command::new(env.bins.pg_bin.join("psql"))
            .arg(format!(
                "host=127.0.0.1 port={} dbname=db user=tok sslmode=disable",
                tokened.port
            ))
            .args(["-X", "-At", "-c", "SELECT 42"])
            .env("PGPASSWORD", pass)
            .output()
            .expect("psql")
    };
    let works = eventually("the token accepted", 30, async || {
        let o = as_tok(&agent_token);
        o.status.success().then(|| stdout(&o))
    })
    .await?;
    assert_eq!(works, "42");
    let sas = Api::<ServiceAccount>::namespaced(admin.clone(), NS);
    sas.delete("tok-agent", &Default::default()).await?;
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({ "metadata": { "name": "tok-agent" } }))?,
    )
    .await?;
    let refused = eventually("the deleted account's token refused", 40, async || {
        let o = as_tok(&agent_token);
        (!o.status.success()).then(|| stderr(&o))
    })
    .await?;
    assert!(
        refused.contains("the API server does not accept this service-account token now"),
        "{refused}"
    );
    // A new token of the new account works.
    let fresh = token(&admin, "tok-agent", Some("agentgate")).await?;
    assert!(as_tok(&fresh).status.success());
    drop(tokened);

    // 8. The API server goes away: after --policy-stale-after the policy is dropped (a
    //    revocation could be missed) and everything is refused, with the reason.
    assert!(psql(&env, port, "SELECT 1").status.success());
    env.kube_mut()?.stop_apiserver();
    let refused = eventually("stale policy refused", 60, async || {
        let o = psql(&env, port, "SELECT 1");
        (!o.status.success()).then(|| stderr(&o))
    })
    .await?;
    assert!(refused.contains("policy may be stale"), "{refused}");
    drop(main);
    Ok(())
}
