//! The README's main job (`scripts/demo.sh`): the real environment, agentgate installed with
//! its Helm chart, the operator running with the chart's RBAC, a policy for one agent, the
//! agent's pod admitted with the sidecar injected, and a scripted agent working through the
//! sidecar against PostgreSQL, the API server and sshd — then what an auditor sees.
//!
//! There is no kubelet here: the operator and the sidecar run as local processes, each with
//! the Kubernetes identity it has in a cluster (the chart's ServiceAccount; the agent pod's
//! ServiceAccount and its projected token).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::process::{Proc, Spec, free_port, wait_listening, wait_until};
use crate::{Parts, TestEnv};

/// Namespace of the agent and its policy.
const NS: &str = "agents";
/// The operator's namespace.
const SYSTEM: &str = "agentgate-system";
/// The agent's identity.
const AGENT: &str = "claude-orders";

/// The binaries the demo runs: operator, sidecar and CLI.
pub struct Binaries {
    operator: PathBuf,
    sidecar: PathBuf,
    cli: PathBuf,
}

impl Binaries {
    /// From `AGENTGATE_BIN_DIR`, or the directory of the running executable (cargo's
    /// `target/<profile>`).
    pub fn locate() -> anyhow::Result<Self> {
        let dir = match std::env::var_os("AGENTGATE_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => std::env::current_exe()?
                .parent()
                .map(Path::to_path_buf)
                .context("the executable's directory")?,
        };
        let bins = Self {
            operator: dir.join("agentgate-operator"),
            sidecar: dir.join("agentgate-sidecar"),
            cli: dir.join("kubectl-agentgate"),
        };
        for b in [&bins.operator, &bins.sidecar, &bins.cli] {
            anyhow::ensure!(
                b.is_file(),
                "{} is missing: build it first with `cargo build --locked -p agentgate-operator \
                 -p agentgate-sidecar -p agentgate-cli` (scripts/demo.sh does), or set \
                 AGENTGATE_BIN_DIR",
                b.display()
            );
        }
        Ok(bins)
    }
}

fn step(n: usize, what: &str) {
    println!("\n\x1b[1m[{n}/9] {what}\x1b[0m");
}

fn say(text: &str) {
    println!("  {text}");
}

/// Prints a command line the way a user would type it, then its output, indented.
fn show(shown: &str, out: &Output) {
    println!("\x1b[2m$ {shown}\x1b[0m");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("  {line}");
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))
}

fn ensure_ok(what: &str, out: &Output) -> anyhow::Result<()> {
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the demo runs.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// A cluster to use instead of starting a local API server: its admin kubeconfig (the
    /// current context; cluster-admin, since the demo installs CRDs and RBAC and
    /// impersonates an approver).
    pub kubeconfig: Option<PathBuf>,
    /// With `kubeconfig`: the address that cluster's API server reaches this machine at, to
    /// call the operator's webhooks (e.g. the Docker bridge's gateway for kind).
    pub webhook_host: Option<String>,
}

/// Runs the whole demo; the environment stops when it returns. Against a cluster of the
/// user's, everything it created there is removed at the end, except the CRDs.
pub async fn run_demo(options: Options) -> anyhow::Result<()> {
    let bins = Binaries::locate()?;
    let users_cluster = options.kubeconfig.is_some();
    let t = Instant::now();
    let env = if users_cluster {
        step(1, "Starting PostgreSQL and sshd; using your cluster");
        TestEnv::start_async(Parts {
            postgres: true,
            ssh: true,
            ..Default::default()
        })
        .await?
    } else {
        step(
            1,
            "Starting the environment: etcd + kube-apiserver, PostgreSQL, sshd",
        );
        TestEnv::start_async(Parts::all()).await?
    };
    let dir = env.dir().to_path_buf();
    let kube = match &options.kubeconfig {
        Some(kc) => {
            crate::cluster::Cluster::from_kubeconfig(kc, &env.bins.kubectl, &dir.join("cluster"))?
        }
        None => env.kube()?.cluster()?,
    };
    let webhook_host = match (&options.kubeconfig, &options.webhook_host) {
        (None, _) => "127.0.0.1".to_owned(),
        (Some(_), Some(h)) => h.clone(),
        (Some(_), None) => anyhow::bail!(
            "with --kubeconfig, say where the cluster's API server reaches this machine for the \
             operator's webhooks: --webhook-host <address> (for kind: the Docker bridge \
             gateway, e.g. 172.18.0.1)"
        ),
    };
    let pg = env.postgres()?;
    let sshd = env.ssh()?;
    let admin = kube.client().await?;
    say(&format!(
        "kube-apiserver at {} · PostgreSQL on 127.0.0.1:{} · sshd on 127.0.0.1:{} ({:.1}s)",
        kube.url(),
        pg.port(),
        sshd.port(),
        t.elapsed().as_secs_f64()
    ));
    let result = demo_steps(&bins, &env, &kube, &admin, &webhook_host).await;
    if users_cluster {
        println!("\nRemoving what the demo created in your cluster (the CRDs stay).");
        cleanup(&kube, &env);
    }
    if result.is_ok() {
        println!("\n\x1b[1mDone.\x1b[0m Stopping the environment (nothing is left running).");
    }
    result
}

/// Best effort: the demo's namespace (its grants' finalizers need the operator, which is
/// stopped by now, so they are cleared), cluster-scoped bindings and the Helm release.
fn cleanup(kube: &crate::cluster::Cluster, env: &TestEnv) {
    let _ = kube
        .kubectl()
        .args([
            "patch",
            "accessgrants",
            "--all",
            "-n",
            NS,
            "--type=merge",
            "-p",
        ])
        .arg(r#"{"metadata":{"finalizers":null}}"#)
        .output();
    let _ = kube
        .kubectl()
        .args([
            "delete",
            "namespace",
            NS,
            "--wait=false",
            "--ignore-not-found",
        ])
        .output();
    let _ = kube
        .kubectl()
        .args(["delete", "clusterrolebinding", "--ignore-not-found"])
        .args(CLUSTER_BINDINGS)
        .args([
            &format!("agentgate-impersonate-{LABEL}"),
            &format!("agent-{LABEL}"),
        ])
        .output();
    let _ = kube
        .kubectl()
        .args(["delete", "clusterrole", "--ignore-not-found"])
        .args([
            &format!("agentgate-impersonate-{LABEL}"),
            &format!("agent-{LABEL}"),
        ])
        .output();
    if let Ok(helm) = env.bins.helm() {
        let _ = Command::new(helm)
            .env("KUBECONFIG", kube.kubeconfig())
            .env("HELM_CACHE_HOME", env.dir().join("helm/cache"))
            .env("HELM_CONFIG_HOME", env.dir().join("helm/config"))
            .env("HELM_DATA_HOME", env.dir().join("helm/data"))
            .args(["uninstall", "agentgate", "-n", SYSTEM])
            .output();
    }
    let _ = kube
        .kubectl()
        .args([
            "delete",
            "namespace",
            SYSTEM,
            "--wait=false",
            "--ignore-not-found",
        ])
        .output();
}

/// Cluster-scoped bindings the demo creates.
const CLUSTER_BINDINGS: [&str; 3] = [
    "claude-orders-token-reviewer",
    "agentgate-approvers",
    "agentgate-auditors",
];
/// The label of the Kubernetes gateway's RBAC objects.
const LABEL: &str = "demo-claude-orders";

async fn demo_steps(
    bins: &Binaries,
    env: &TestEnv,
    kube: &crate::cluster::Cluster,
    admin: &kube::Client,
    webhook_host: &str,
) -> anyhow::Result<()> {
    let pg = env.postgres()?;
    let sshd = env.ssh()?;
    let dir = env.dir().to_path_buf();
    let kubectl = |args: &[&str]| -> anyhow::Result<Output> { run(kube.kubectl().args(args)) };

    step(2, "Installing agentgate with its Helm chart");
    let webhook_port = free_port()?;
    let helm = env.bins.helm()?.to_path_buf();
    let chart = repo_root().join("charts/agentgate");
    let out = kubectl(&["create", "namespace", NS])?;
    ensure_ok(
        "kubectl create namespace agents (the demo needs it new: in your own cluster, \
         `kubectl delete namespace agents` first)",
        &out,
    )?;
    let out = run(Command::new(&helm)
        .env("KUBECONFIG", kube.kubeconfig())
        .env("HELM_CACHE_HOME", dir.join("helm/cache"))
        .env("HELM_CONFIG_HOME", dir.join("helm/config"))
        .env("HELM_DATA_HOME", dir.join("helm/data"))
        // The CRDs come from the chart's crds/: Helm waits for them before the rest, and
        // leaves CRDs kept from an earlier install (or applied by hand) as they are.
        .args(["install", "agentgate"])
        .arg(&chart)
        .args(["-n", SYSTEM, "--create-namespace"])
        .arg("--set")
        .arg(format!("webhook.url=https://{webhook_host}:{webhook_port}"))
        .arg("--set")
        .arg(format!("defaults.namespaces={{{NS}}}")))?;
    ensure_ok("helm install", &out)?;
    println!(
        "\x1b[2m$ helm install agentgate charts/agentgate -n {SYSTEM} --create-namespace --set defaults.namespaces={{{NS}}}\x1b[0m"
    );
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("NAME:") || l.starts_with("STATUS:"))
    {
        say(line);
    }
    let out = kubectl(&[
        "get",
        "crd",
        "-l",
        "app.kubernetes.io/name=agentgate",
        "-o",
        "name",
    ])?;
    show(
        "kubectl get crd -l app.kubernetes.io/name=agentgate -o name",
        &out,
    );

    // The operator, as the chart's ServiceAccount (no kubelet here to run its Deployment).
    let token = crate::kube_env::sa_token(admin, SYSTEM, "agentgate-operator", None).await?;
    let operator_kubeconfig = kube.kubeconfig_with_token("agentgate-operator", &token)?;
    let metrics = free_port()?;
    let mut spec = Spec::new("operator", &bins.operator)
        .args([
            format!("--namespace={SYSTEM}"),
            if webhook_host == "127.0.0.1" {
                format!("--webhook-addr=127.0.0.1:{webhook_port}")
            } else {
                format!("--webhook-addr=0.0.0.0:{webhook_port}")
            },
            format!("--webhook-hosts={webhook_host}"),
            format!("--metrics-addr=127.0.0.1:{metrics}"),
            "--pod-name=agentgate-operator-0".into(),
        ])
        .env("KUBECONFIG", operator_kubeconfig.display().to_string())
        .env("RUST_LOG", "info,kube_runtime=warn");
    spec.stop_signal = "INT";
    let mut operator = Proc::start(spec, &dir.join("logs"))?;
    wait_until(
        &mut operator,
        Duration::from_secs(60),
        "the operator ready",
        || crate::http::get(metrics, "/readyz").is_ok_and(|r| r.status == 200),
    )?;
    say(&format!(
        "operator running as {SYSTEM}/agentgate-operator (the chart's RBAC), leader, webhooks on :{webhook_port}"
    ));

    step(3, "The policy for one agent (as in examples/walkthrough)");
    let targets = dir.join("targets");
    let audit = dir.join("audit");
    let client_dir = dir.join("client");
    pg.psql_run(
        "app",
        "CREATE TABLE customers (id int PRIMARY KEY, name text, email text, card text);
         INSERT INTO customers VALUES
           (1, 'Ada Lovelace', 'ada@example.com', '4111 1111 1111 1111'),
           (2, 'Alan Turing', 'alan@example.com', '5500 0000 0000 0004');
         CREATE TABLE orders (id int PRIMARY KEY, customer int, state text);
         INSERT INTO orders VALUES (4711, 1, 'paid'), (4712, 2, 'paid');
         GRANT ALL ON ALL TABLES IN SCHEMA public TO agentgate;",
    )?;
    pg.write_credentials(&targets, "orders-db", "agentgate")?;
    sshd.write_credentials(&targets, "build-host")?;
    let cluster = kube
        .gateway_target(
            LABEL,
            &format!("agentgate:agent:{NS}:{AGENT}"),
            NS,
            &[
                r#"{ apiGroups: [""], resources: [pods, configmaps, secrets, services], verbs: [get, list, watch] }"#,
            ],
            &targets,
            "this-cluster",
        )
        .await?;
    let cluster = cluster
        .replace("name: c,", "name: this-cluster-credentials,")
        .replace("name: c }", "name: this-cluster-credentials }");
    let ssh_target = sshd.target_yaml("build-host")?;
    let policy = format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{ name: {AGENT} }}
---
apiVersion: v1
kind: Secret
metadata: {{ name: orders-db-credentials }}
stringData: {{ username: agentgate, password: "{pg_password}", ca.crt: "(the database's CA)" }}
---
apiVersion: v1
kind: Secret
metadata: {{ name: build-host-key }}
stringData: {{ ssh-privatekey: "(the host's key, mounted into the sidecar only)" }}
---
apiVersion: v1
kind: Secret
metadata: {{ name: this-cluster-credentials }}
stringData: {{ token: "(a token allowed only to impersonate the agent)", ca.crt: "(the cluster's CA)" }}
---
apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: orders-db }}
spec:
  protocol: Postgres
  holdTimeout: 120s
  postgres:
    host: 127.0.0.1
    port: {pg_port}
    database: app
    tls: {{ mode: VerifyFull, ca: {{ name: orders-db-credentials, key: ca.crt }} }}
    credentials: {{ name: orders-db-credentials }}
  guardrails:
    - {{ name: no-drops, matches: ["DROP *"], action: Block, message: "dropping objects is never done by agents; ask the orders team" }}
    - {{ name: writes-need-approval, operations: [Write], action: RequireApproval }}
---
apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: this-cluster }}
spec:
  protocol: Kubernetes
  kubernetes: {cluster}
---
{ssh_target}  guardrails:
    - {{ name: no-reboots, matches: ["reboot", "shutdown *", "systemctl reboot"], action: Block }}
---
apiVersion: agentgate.dev/v1alpha1
kind: MaskPolicy
metadata: {{ name: customer-data }}
spec:
  rules:
    - {{ name: emails, detectors: [Email], action: Redact }}
    - {{ name: cards, detectors: [CardNumber], action: Partial, keepLast: 4 }}
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: {AGENT} }}
spec:
  owner: team-orders
  authentication: {{ serviceAccount: {{ name: {AGENT} }} }}
  approvers: {{ groups: [agentgate-approvers] }}
  maxGrantDuration: 8h
  baseline:
    - {{ target: orders-db, scope: {{ operations: [Read] }} }}
    - target: this-cluster
      scope:
        operations: [Read]
        kubernetes: [ {{ verbs: [get, list, watch], resources: [pods, configmaps, secrets, services], namespaces: [{NS}] }} ]
    - {{ target: build-host, scope: {{ operations: [Read, Write, Exec] }} }}
"#,
        pg_password = pg.password(),
        pg_port = pg.port(),
    );
    let policy_file = dir.join("policy.yaml");
    std::fs::write(&policy_file, &policy)?;
    let out = run(kube
        .kubectl()
        .args(["apply", "-n", NS, "-f"])
        .arg(&policy_file))?;
    ensure_ok("kubectl apply the policy", &out)?;
    show("kubectl apply -n agents -f policy.yaml", &out);
    // The sidecar's permissions (the chart's roles) and the approvers.
    for args in [
        vec![
            "create",
            "rolebinding",
            "claude-orders-sidecar",
            "-n",
            NS,
            "--clusterrole=agentgate-sidecar",
            "--serviceaccount=agents:claude-orders",
        ],
        vec![
            "create",
            "clusterrolebinding",
            "claude-orders-token-reviewer",
            "--clusterrole=agentgate-token-reviewer",
            "--serviceaccount=agents:claude-orders",
        ],
        vec![
            "create",
            "clusterrolebinding",
            "agentgate-approvers",
            "--clusterrole=agentgate-approver",
            "--group=agentgate-approvers",
        ],
        vec![
            "create",
            "clusterrolebinding",
            "agentgate-auditors",
            "--clusterrole=agentgate-auditor",
            "--group=agentgate-approvers",
        ],
    ] {
        let out = kubectl(&args)?;
        ensure_ok("kubectl create binding", &out)?;
    }
    say(
        "bound: agentgate-sidecar + agentgate-token-reviewer → agents/claude-orders; agentgate-approver → group agentgate-approvers (alice)",
    );
    // The operator checks each object as it arrives; wait for its verdict before listing.
    let out = kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--all",
        "--timeout=60s",
        "-n",
        NS,
        "agentidentities,targets,maskpolicies",
    ])?;
    ensure_ok("wait for the operator to accept the policy", &out)?;
    let out = kubectl(&["get", "agentgate", "-n", NS])?;
    show("kubectl get agentgate -n agents", &out);

    step(4, "The agent's pod: admitted with the sidecar injected");
    let pod = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: coding-agent
  labels: {{ agentgate.dev/inject: "true" }}
  annotations: {{ agentgate.dev/identity: {AGENT} }}
spec:
  serviceAccountName: {AGENT}
  containers:
    - name: agent
      image: registry.example/coding-agent:1
"#
    );
    let pod_file = dir.join("pod.yaml");
    std::fs::write(&pod_file, &pod)?;
    // A server-side dry run: admitted and mutated exactly as a real create, and nothing
    // tries to run it (there is no kubelet here; in your cluster there is no image).
    let out = run(kube
        .kubectl()
        .args(["apply", "--dry-run=server", "-n", NS, "-f"])
        .arg(&pod_file)
        .args([
            "-o",
            r#"jsonpath={range .spec.initContainers[*]}{.name}{" (init, restartPolicy "}{.restartPolicy}{")\n"}{end}{range .spec.containers[*]}{.name}{": "}{range .env[*]}{.name}{" "}{end}{"\n"}{end}"#,
        ]))?;
    ensure_ok("admit the agent pod", &out)?;
    show(
        "kubectl apply --dry-run=server -n agents -f coding-agent.yaml -o jsonpath=… (its containers, the agent's env)",
        &out,
    );
    let escape = r#"apiVersion: v1
kind: Pod
metadata:
  name: sneaky-agent
  labels: { agentgate.dev/inject: "true" }
  annotations: { agentgate.dev/identity: claude-orders }
spec:
  serviceAccountName: claude-orders
  hostNetwork: true
  containers: [ { name: agent, image: registry.example/coding-agent:1 } ]
"#;
    let escape_file = dir.join("sneaky.yaml");
    std::fs::write(&escape_file, escape)?;
    let out = run(kube
        .kubectl()
        .args(["apply", "--dry-run=server", "-n", NS, "-f"])
        .arg(&escape_file))?;
    anyhow::ensure!(!out.status.success(), "a pod with hostNetwork was admitted");
    show(
        "kubectl apply --dry-run=server -n agents -f sneaky-agent.yaml   # hostNetwork: true",
        &out,
    );

    // The injected sidecar, run here as a process with the pod's identity.
    let api_token = crate::kube_env::sa_token(admin, NS, AGENT, None).await?;
    let sidecar_kubeconfig = kube.kubeconfig_with_token("claude-orders-sidecar", &api_token)?;
    let pod_token = crate::kube_env::sa_token(admin, NS, AGENT, Some("agentgate")).await?;
    let token_file = dir.join("pod-token");
    std::fs::write(&token_file, pod_token)?;
    let pg_port = free_port()?;
    let kube_port = free_port()?;
    let ssh_port = free_port()?;
    let spec = Spec::new("sidecar", &bins.sidecar)
        .args([
            "--in-cluster".to_owned(),
            format!("--identity={AGENT}"),
            format!("--token-file={}", token_file.display()),
            format!("--targets-dir={}", targets.display()),
            format!("--pg-addr=127.0.0.1:{pg_port}"),
            format!("--kube-addr=127.0.0.1:{kube_port}"),
            format!("--ssh-addr=127.0.0.1:{ssh_port}"),
            format!("--client-dir={}", client_dir.display()),
            format!("--audit-dir={}", audit.display()),
        ])
        .env("KUBECONFIG", sidecar_kubeconfig.display().to_string())
        .env("POD_NAMESPACE", NS)
        .env("RUST_LOG", "info");
    let mut sidecar = Proc::start(spec, &dir.join("logs"))?;
    wait_listening(&mut sidecar, pg_port, Duration::from_secs(30))?;
    let ssh_config = client_dir.join("ssh_config");
    let agent_kubeconfig = client_dir.join("kubeconfig");
    wait_until(
        &mut sidecar,
        Duration::from_secs(30),
        "the sidecar's client files",
        || {
            std::fs::read_to_string(&ssh_config).is_ok_and(|c| c.contains("Host build-host"))
                && agent_kubeconfig.is_file()
        },
    )?;
    say(
        "sidecar running with the pod's ServiceAccount token (verified by TokenReview); policy watched from the API server",
    );

    let psql_bin = env.bins.pg_bin.join("psql");
    let psql = |sql: &str| -> anyhow::Result<Output> {
        run(Command::new(&psql_bin)
            .arg(format!(
                "host=127.0.0.1 port={pg_port} dbname=orders-db user={AGENT} sslmode=disable"
            ))
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", sql]))
    };
    // The sidecar serves once its policy and token are in.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = psql("SELECT 1")?;
        if out.status.success() {
            break;
        }
        sidecar.check_running()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the sidecar never served: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            sidecar.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    step(
        5,
        "The agent on PostgreSQL: a masked SELECT, a refused DROP, a held UPDATE",
    );
    let out = psql("SELECT c.name, c.email, c.card FROM customers c ORDER BY c.id")?;
    ensure_ok("the masked SELECT", &out)?;
    show(
        r#"psql -c "SELECT c.name, c.email, c.card FROM customers c ORDER BY c.id""#,
        &out,
    );
    let out = psql("DROP TABLE orders")?;
    anyhow::ensure!(!out.status.success(), "DROP TABLE was not refused");
    show(r#"psql -c "DROP TABLE orders""#, &out);
    // The UPDATE is held: the query waits while a person decides.
    let held = {
        let psql_bin = psql_bin.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(psql_bin)
                .arg(format!(
                    "host=127.0.0.1 port={pg_port} dbname=orders-db user={AGENT} sslmode=disable"
                ))
                .args(["-X", "-v", "ON_ERROR_STOP=1", "-c"])
                .arg("UPDATE orders SET state = 'refunded' WHERE id = 4711")
                .output()
        })
    };
    println!(
        "\x1b[2m$ psql -c \"UPDATE orders SET state = 'refunded' WHERE id = 4711\"   # waits…\x1b[0m"
    );
    let grant = pending_grant(kube, "UPDATE orders").await?;
    let cli = |user: &str, args: &[&str]| -> anyhow::Result<Output> {
        let mut cmd = Command::new(&bins.cli);
        cmd.env(
            "KUBECONFIG",
            kube.kubeconfig_as(user, &["agentgate-approvers"])?,
        )
        .args(args);
        run(&mut cmd)
    };
    let out = cli("alice", &["grants", "list", "-n", NS])?;
    show(
        "kubectl agentgate grants list -n agents        # alice, an approver",
        &out,
    );
    let approve = |grant: &str, reason: &str| -> anyhow::Result<()> {
        let out = cli(
            "alice",
            &["grants", "approve", grant, "-n", NS, "--reason", reason],
        )?;
        ensure_ok("approve", &out)?;
        show(
            &format!("kubectl agentgate grants approve {grant} -n agents --reason '{reason}'"),
            &out,
        );
        Ok(())
    };
    approve(&grant, "refund requested in ticket 4711")?;
    let out = held.await??;
    ensure_ok("the held UPDATE", &out)?;
    say("the agent's psql, once approved:");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        say(&format!("  {line}"));
    }

    step(
        6,
        "The agent on Kubernetes: a Secret, masked (reading Secrets needs a grant)",
    );
    let agent_kubectl = |args: &[&str]| -> anyhow::Result<Output> {
        run(kube
            .kubectl()
            .env("KUBECONFIG", &agent_kubeconfig)
            .args(args))
    };
    let out = agent_kubectl(&[
        "get",
        "secret",
        "orders-db-credentials",
        "-n",
        NS,
        "-o",
        "yaml",
    ])?;
    show(
        "kubectl get secret orders-db-credentials -n agents -o yaml   # through the sidecar",
        &out,
    );
    anyhow::ensure!(!out.status.success(), "a Secret was read without a grant");
    {
        let grant = pending_grant(kube, "secrets").await?;
        approve(&grant, "debugging the db connection")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let out = loop {
            let out = agent_kubectl(&[
                "get",
                "secret",
                "orders-db-credentials",
                "-n",
                NS,
                "-o",
                "yaml",
            ])?;
            if out.status.success() || Instant::now() > deadline {
                break out;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        ensure_ok("the Secret after approval", &out)?;
        println!("\x1b[2m$ kubectl get secret orders-db-credentials -n agents -o yaml\x1b[0m");
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                !l.contains("kubectl.kubernetes.io/last-applied-configuration")
                    && !l.trim_start().starts_with('{')
            })
            .take(16)
        {
            say(line);
        }
    }

    step(7, "The agent on SSH: a recorded session, a refused command");
    let ssh = |args: &[&str]| -> anyhow::Result<Output> {
        run(Command::new("ssh")
            .arg("-F")
            .arg(&ssh_config)
            .args(["-o", "BatchMode=yes"])
            .args(args))
    };
    let out = ssh(&["build-host", "uname -s; grep -c . /etc/hostname"])?;
    ensure_ok("ssh build-host", &out)?;
    show("ssh build-host 'uname -s; grep -c . /etc/hostname'", &out);
    let out = ssh(&["build-host", "sudo reboot"])?;
    anyhow::ensure!(
        out.status.code() == Some(126),
        "sudo reboot was not refused"
    );
    show("ssh build-host 'sudo reboot'", &out);

    // Every record reaches the sinks; a clean stop signs the end of the stream.
    sidecar.stop(Duration::from_secs(15));
    operator.stop(Duration::from_secs(5));

    step(
        8,
        "The auditor: the sessions, the SSH ones in detail, the chain verified",
    );
    let records = audit.display().to_string();
    let out = cli("alice", &["sessions", "-n", NS])?;
    show(
        "kubectl agentgate sessions -n agents          # AgentSessions in the cluster",
        &out,
    );
    let out = cli("alice", &["sessions", "--from", &records, "-o", "json"])?;
    let sessions: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let ssh_sessions: Vec<String> = sessions
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["target"] == "build-host")
        .filter_map(|s| s["session"].as_str().map(str::to_owned))
        .collect();
    for id in &ssh_sessions {
        let out = cli("alice", &["show", id, "--from", &records])?;
        show(&format!("kubectl agentgate show {id} --from audit/"), &out);
    }
    let key = audit.join("signing-key.pk8.pub").display().to_string();
    let out = cli("alice", &["verify", "--key", &key, &records])?;
    ensure_ok("verify", &out)?;
    show(
        "kubectl agentgate verify --key audit/signing-key.pk8.pub audit/",
        &out,
    );

    step(
        9,
        "Evidence for an assessor: an OSCAL export mapped to NIST SP 800-53",
    );
    let out = cli(
        "alice",
        &["export", "--from", &records, "--key", &key, "-o", "oscal"],
    )?;
    ensure_ok("export", &out)?;
    let oscal_file = dir.join("assessment-results.json");
    std::fs::write(&oscal_file, &out.stdout)?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let findings = doc["assessment-results"]["results"][0]["findings"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    println!(
        "\x1b[2m$ kubectl agentgate export --from audit/ --key audit/signing-key.pk8.pub -o oscal > assessment-results.json\x1b[0m"
    );
    say(&format!(
        "OSCAL assessment results: {findings} findings, {} bytes; one per control:",
        out.stdout.len()
    ));
    for f in doc["assessment-results"]["results"][0]["findings"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let control = f["target"]["target-id"].as_str().unwrap_or("?");
        let state = f["target"]["status"]["state"].as_str().unwrap_or("?");
        let title = f["title"].as_str().unwrap_or("");
        say(&format!("  {control:<14} {state:<14} {title}"));
    }
    Ok(())
}

/// Waits for the AccessGrant the sidecar filed for a held request whose text contains
/// `needle`, and returns its name.
async fn pending_grant(kube: &crate::cluster::Cluster, needle: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = kube
            .kubectl()
            .args([
                "get", "accessgrants", "-n", NS, "-l", "agentgate.dev/held-by=sidecar", "-o",
                r#"jsonpath={range .items[*]}{.metadata.name}{"\t"}{.spec.command.text}{"\t"}{.status.phase}{"\n"}{end}"#,
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(name) = text
            .lines()
            .filter(|l| l.ends_with("Pending"))
            .find(|l| l.contains(needle))
            .and_then(|l| l.split('\t').next())
        {
            return Ok(name.to_owned());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no pending AccessGrant for {needle:?}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
