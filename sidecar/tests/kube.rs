//! The Kubernetes API gateway against the real API server, with real kubectl and a kube-rs
//! client: reads, a watch, apply, a held delete, refused escalation and impersonation,
//! Secret masking in `-o yaml`, `-o json`, the default table and a watch, detectors on
//! ConfigMaps, impersonation upstream (the API server's RBAC applies), and the records.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use testenv::process::{Proc, Spec, free_port};
use testenv::{Parts, TestEnv};

/// The Secret's value, and how it looks in base64 (neither may reach the agent).
const PASSWORD: &str = "hunter2-s3cret";
const PASSWORD_B64: &str = "aHVudGVyMi1zM2NyZXQ=";
/// What a masked Secret value is: base64 of `****`.
const MASKED_B64: &str = "KioqKg==";

struct Setup {
    env: TestEnv,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    audit: PathBuf,
    _sidecar: Proc,
}

impl Setup {
    /// kubectl as the agent (through the gateway).
    fn agent(&self, args: &[&str]) -> Output {
        Command::new(&self.env.bins.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl")
    }

    fn agent_ok(&self, args: &[&str]) -> String {
        let out = self.agent(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\nkubeconfig: {}\nsidecar: {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.kubeconfig).unwrap_or_default(),
            self._sidecar.log_tail(20)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn agent_err(&self, args: &[&str]) -> String {
        let out = self.agent(args);
        assert!(
            !out.status.success(),
            "kubectl {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn admin(&self, args: &[&str]) -> String {
        self.env
            .kube()
            .unwrap()
            .kubectl_run(args)
            .expect("admin kubectl")
    }

    /// The AccessGrant request a held answer names, and its manifest in the policy folder.
    fn filed(&self, held: &str) -> (String, String) {
        let name = held
            .split("AccessGrant ")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .expect("the grant is named")
            .trim()
            .to_owned();
        let path = self
            .dir
            .path()
            .join("policy/requests")
            .join(format!("{name}.yaml"));
        let text = std::fs::read_to_string(path).expect("the request is filed");
        (name, text)
    }

    /// The request text an approver reads in a filed AccessGrant request
    /// (`spec.command.text`, as YAML holds it unquoted).
    fn command_text(filed: &str) -> String {
        let grant: serde_json::Value = serde_norway::from_str(filed).expect("a filed request");
        grant["spec"]["command"]["text"]
            .as_str()
            .expect("the request's text")
            .to_owned()
    }

    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn apply(env: &TestEnv, dir: &Path, name: &str, yaml: &str) {
    let f = dir.join(format!("{name}.yaml"));
    std::fs::write(&f, yaml).unwrap();
    env.kube()
        .unwrap()
        .kubectl_run(&["apply", "-f", f.to_str().unwrap()])
        .expect("apply");
}

async fn setup() -> anyhow::Result<Setup> {
    let env = TestEnv::start_async(Parts {
        kube: true,
        ..Default::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let kube = env.kube()?;
    // The gateway's own account may only impersonate the agent; the agent's user may read
    // ConfigMaps, Secrets and Pods, write ConfigMaps and exec (what the API server enforces).
    let targets = dir.path().join("targets");
    let cluster = kube
        .gateway_target(
            "bench",
            &[
                r#"{ apiGroups: [""], resources: [configmaps, secrets, pods, namespaces], verbs: [get, list, watch] }"#,
                r#"{ apiGroups: [""], resources: [configmaps], verbs: [create, update, patch, delete] }"#,
                r#"{ apiGroups: [""], resources: [pods/exec, pods/portforward], verbs: [create, get] }"#,
                r#"{ apiGroups: [""], resources: [pods/log], verbs: [get] }"#,
            ],
            &targets,
            "cluster",
        )
        .await?;
    // (No controller manager here makes the default account.)
    apply(
        &env,
        dir.path(),
        "default-sa",
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: { name: default, namespace: default }\n",
    );
    // Applied with kubectl: the last-applied annotation repeats the Secret's data.
    apply(
        &env,
        dir.path(),
        "objects",
        &format!(
            r#"apiVersion: v1
kind: Secret
metadata: {{ name: db, namespace: default }}
stringData: {{ password: "{PASSWORD}" }}
---
apiVersion: v1
kind: Pod
metadata: {{ name: web, namespace: default }}
spec: {{ nodeName: kwok-node-0, automountServiceAccountToken: false, containers: [ {{ name: app, image: registry.example.com/app:1 }} ] }}
---
apiVersion: v1
kind: ConfigMap
metadata: {{ name: settings, namespace: default, annotations: {{ contact: "dana@example.com" }} }}
data: {{ owner: "ops lead: carol@example.com", level: "3" }}
"#
        ),
    );
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy)?;
    let now = jiff::Timestamp::now();
    std::fs::write(
        policy.join("policy.yaml"),
        format!(
            r#"apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: cluster }}
spec:
  protocol: Kubernetes
  kubernetes: {cluster}
  guardrails:
  - {{ name: gitops-owns-config, matches: ["delete configmaps"], action: Block, message: "ConfigMaps are managed in Git; change them there" }}
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: bench }}
spec:
  owner: platform-team
  authentication: {{ serviceAccount: {{ name: bench }} }}
  baseline:
  - target: cluster
    scope:
      operations: [Read, Write, DDL]
      kubernetes:
      - {{ verbs: [get, list, watch], apiGroups: ["*"], resources: ["*"] }}
      - {{ verbs: [create, update, patch], resources: [configmaps], namespaces: [default] }}
      - {{ verbs: [delete], resources: [namespaces] }}
      - {{ verbs: ["*"], apiGroups: [agentgate.dev], resources: ["*"] }}
---
apiVersion: agentgate.dev/v1alpha1
kind: AccessGrant
metadata: {{ name: read-secrets }}
spec:
  identity: bench
  target: cluster
  scope:
    operations: [Read]
    kubernetes: [ {{ verbs: [get, list, watch], resources: [secrets], namespaces: [default] }} ]
  duration: 1h
  reason: debugging the db connection
  decision: {{ verdict: Approve, decidedAt: "{now}", decidedBy: {{ username: alice }} }}
---
apiVersion: agentgate.dev/v1alpha1
kind: MaskPolicy
metadata: {{ name: pii }}
spec:
  rules: [ {{ name: emails, detectors: [Email], action: Redact }} ]
"#
        ),
    )?;
    let client_dir = dir.path().join("client");
    let audit_dir = dir.path().join("audit");
    let spec = Spec::new("sidecar-kube", env!("CARGO_BIN_EXE_agentgate-sidecar"))
        .args([
            format!("--policy-dir={}", policy.display()),
            "--identity=bench".into(),
            format!("--targets-dir={}", targets.display()),
            format!("--pg-addr=127.0.0.1:{}", free_port()?),
            format!("--kube-addr=127.0.0.1:{}", free_port()?),
            "--ssh-addr=127.0.0.1:0".into(),
            format!("--client-dir={}", client_dir.display()),
            format!("--audit-dir={}", audit_dir.display()),
        ])
        .env("RUST_LOG", "info");
    let sidecar = Proc::start(spec, &env.dir().join("logs"))?;
    let kubeconfig = client_dir.join("kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&kubeconfig).is_ok_and(|k| k.contains("/targets/cluster")) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no kubeconfig: {}",
            sidecar.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Setup {
        env,
        kubeconfig,
        audit: audit_dir.join("audit.jsonl"),
        dir,
        _sidecar: sidecar,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_and_kube_rs_through_the_gateway() -> anyhow::Result<()> {
    let s = setup().await?;

    // Reads pass, masked: a ConfigMap's email, a Secret in every output kubectl has.
    let cm: serde_json::Value =
        serde_json::from_str(&s.agent_ok(&["get", "configmap", "settings", "-o", "json"]))?;
    assert_eq!(cm["data"]["owner"], "ops lead: ****");
    assert_eq!(cm["data"]["level"], "3");
    // Every value is read by the detectors, not only data: an annotation too (and the
    // last-applied copy that repeats it), in any output, in a list as in a single object.
    assert_eq!(cm["metadata"]["annotations"]["contact"], "****");
    for args in [
        &["get", "configmap", "settings", "-o", "yaml"][..],
        &["get", "configmaps", "-o", "json"][..],
    ] {
        let out = s.agent_ok(args);
        assert!(
            !out.contains("dana@")
                && !out.contains("carol@")
                && (out.contains("contact: '****'") || out.contains(r#""contact": "****""#)),
            "{args:?}: {out}"
        );
    }
    let yaml = s.agent_ok(&["get", "secret", "db", "-o", "yaml"]);
    assert!(yaml.contains(&format!("password: {MASKED_B64}")), "{yaml}");
    assert!(
        yaml.contains("agentgate.dev/masked: data,last-applied-configuration"),
        "{yaml}"
    );
    let json = s.agent_ok(&["get", "secret", "db", "-o", "json"]);
    let secret: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(secret["data"]["password"], MASKED_B64);
    assert_eq!(
        secret["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
        "****"
    );
    let table = s.agent_ok(&["get", "secrets"]);
    assert!(table.contains("db") && table.contains("Opaque"), "{table}");
    let wide = s.agent_ok(&["get", "secrets", "-o", "wide", "--show-labels"]);
    let list = s.agent_ok(&["get", "secrets", "-o", "json"]);
    for out in [&yaml, &json, &table, &wide, &list] {
        assert!(
            !out.contains(PASSWORD) && !out.contains(PASSWORD_B64),
            "{out}"
        );
    }

    // A watch: an update the admin makes arrives masked.
    let mut watch = Command::new(&s.env.bins.kubectl)
        .arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .args([
            "get",
            "secret",
            "db",
            "--watch",
            "-o",
            "json",
            "--request-timeout=20s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    s.admin(&[
        "patch",
        "secret",
        "db",
        "-p",
        r#"{"stringData":{"token":"second-value-xyz"}}"#,
    ]);
    std::thread::sleep(Duration::from_secs(2));
    watch.kill()?;
    let out = watch.wait_with_output()?;
    let watched = String::from_utf8_lossy(&out.stdout);
    assert!(watched.matches(MASKED_B64).count() >= 3, "{watched}");
    for clear in [
        PASSWORD,
        PASSWORD_B64,
        "second-value-xyz",
        "c2Vjb25kLXZhbHVlLXh5eg==",
    ] {
        assert!(!watched.contains(clear), "{watched}");
    }

    // A kube-rs client: typed objects decode (the masked data is valid base64).
    let client = s.env.kube()?.client_from(&s.kubeconfig).await?;
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), "default");
    let db = secrets.get("db").await?;
    let data = db.data.unwrap_or_default();
    assert_eq!(data["password"].0, b"****");
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), "default");
    let listed = cms.list(&Default::default()).await?;
    let settings = listed
        .items
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("settings"))
        .expect("settings listed");
    assert_eq!(settings.data.as_ref().unwrap()["owner"], "ops lead: ****");

    // Apply: a write in scope runs, as the agent.
    let f = s.dir.path().join("made.yaml");
    std::fs::write(
        &f,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: { name: made-by-agent, namespace: default }\ndata: { a: b }\n",
    )?;
    s.agent_ok(&["apply", "-f", f.to_str().unwrap()]);
    assert!(
        s.admin(&["get", "configmap", "made-by-agent", "-o", "name"])
            .contains("made-by-agent")
    );

    // A delete a guardrail blocks is refused, with the guardrail's reason.
    let err = s.agent_err(&["delete", "configmap", "settings"]);
    assert!(
        err.contains("refused by guardrail gitops-owns-config: ConfigMaps are managed in Git"),
        "{err}"
    );
    // A change out of scope is held for approval: an AccessGrant request is filed.
    let err = s.agent_err(&["label", "pod", "web", "touched=yes"]);
    assert!(
        err.contains("held for approval") && err.contains("AccessGrant"),
        "{err}"
    );
    assert!(
        s.admin(&["get", "configmap", "settings", "-o", "name"])
            .contains("settings")
    );
    // Deleting a namespace is held by default, even where the baseline allows it.
    let err = s.agent_err(&["delete", "namespace", "kube-public"]);
    assert!(err.contains("agentgate-hold-kube-delete"), "{err}");
    let requests = std::fs::read_dir(s.dir.path().join("policy/requests"))?.count();
    assert!(requests >= 2, "{requests} requests filed");

    // Escalation and agentgate's own resources are refused whatever the scope says.
    let err = s.agent_err(&[
        "create",
        "clusterrolebinding",
        "mine",
        "--clusterrole=cluster-admin",
        "--user=agentgate:agent:bench",
    ]);
    assert!(
        err.contains("refused") && err.contains("agentgate-block-admin"),
        "{err}"
    );
    let grant = s.dir.path().join("grant.json");
    std::fs::write(
        &grant,
        r#"{"apiVersion":"agentgate.dev/v1alpha1","kind":"AccessGrant","metadata":{"name":"self"},"spec":{"identity":"bench","target":"cluster","scope":{"operations":["Admin"]},"duration":"1h","reason":"x"}}"#,
    )?;
    let err = s.agent_err(&[
        "create",
        "--raw",
        "/apis/agentgate.dev/v1alpha1/namespaces/default/accessgrants",
        "-f",
        grant.to_str().unwrap(),
    ]);
    assert!(err.contains("agentgate's own resources"), "{err}");
    // Nor can the agent approve, widen or delete a grant that exists: every write to
    // agentgate's group (the object or its status) is refused before it leaves the pod.
    let server_url = std::fs::read_to_string(&s.kubeconfig)?
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: ").map(str::to_owned))
        .expect("a server in the kubeconfig");
    for (method, path, body) in [
        (
            "PATCH",
            "/apis/agentgate.dev/v1alpha1/namespaces/default/accessgrants/bench-write",
            r#"{"spec":{"decision":{"verdict":"Approve","decidedBy":{"username":"alice"}}}}"#,
        ),
        (
            "PATCH",
            "/apis/agentgate.dev/v1alpha1/namespaces/default/accessgrants/bench-write/status",
            r#"{"status":{"phase":"Active"}}"#,
        ),
        (
            "PUT",
            "/apis/agentgate.dev/v1alpha1/namespaces/default/agentidentities/bench",
            r#"{"apiVersion":"agentgate.dev/v1alpha1","kind":"AgentIdentity","metadata":{"name":"bench"},"spec":{"owner":"x","authentication":{},"baseline":[]}}"#,
        ),
        (
            "DELETE",
            "/apis/agentgate.dev/v1alpha1/namespaces/default/maskpolicies/pii",
            "",
        ),
    ] {
        // (A patch names its kind of patch; a replacement is JSON.)
        let content_type = if method == "PATCH" {
            "Content-Type: application/merge-patch+json"
        } else {
            "Content-Type: application/json"
        };
        let out = Command::new("curl")
            .args(["-sS", "--http1.1", "-X", method, "--cacert"])
            .arg(s.kubeconfig.with_file_name("kube-ca.crt"))
            .args(["-H", content_type, "-d", body])
            .arg(format!("{server_url}{path}"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("agentgate's own resources") && text.contains("\"code\":403"),
            "{method} {path}: {text}"
        );
    }
    // The gateway's own account may impersonate the agent and nobody else (the API server
    // says so, whatever the gateway would do).
    let kube = s.env.kube()?;
    let gw_token = std::fs::read_to_string(s.dir.path().join("targets/cluster/token"))?;
    let gw = kube.kubeconfig_with_token("gateway-sa", gw_token.trim())?;
    let as_gateway = |args: &[&str]| {
        Command::new(&s.env.bins.kubectl)
            .arg("--kubeconfig")
            .arg(&gw)
            .args(args)
            .output()
            .expect("kubectl")
    };
    for who in [
        vec!["--as=alice"],
        vec!["--as=system:admin", "--as-group=system:masters"],
        vec!["--as=system:serviceaccount:kube-system:default"],
        vec!["--as=agentgate:agent:bench", "--as-group=system:masters"],
    ] {
        let out = as_gateway(&[who.as_slice(), &["get", "configmaps", "-n", "default"]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("cannot impersonate"),
            "the gateway's account impersonated {who:?}: {err}"
        );
    }
    let out = as_gateway(&[
        "--as=agentgate:agent:bench",
        "--as-group=agentgate:agents",
        "get",
        "configmaps",
        "-n",
        "default",
    ]);
    assert!(
        out.status.success(),
        "the gateway's account cannot act as its agent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without impersonation it can do nothing at all.
    let out = as_gateway(&["get", "configmaps", "-n", "default"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "the gateway's own account reads ConfigMaps"
    );

    // Impersonation by the agent is refused; upstream, the agent is its own user, so the
    // API server's RBAC applies (nodes are not granted to it there).
    let err = s.agent_err(&["get", "pods", "--as=system:admin"]);
    assert!(err.contains("impersonation is not allowed"), "{err}");
    let err = s.agent_err(&["get", "nodes"]);
    assert!(err.contains("agentgate:agent:bench"), "{err}");

    // Evasions, sent as they are (kubectl would normalize them): encoded paths and query
    // keys, an Upgrade header and protobuf/YAML on a plain read, paths that are not the API.
    let server = std::fs::read_to_string(&s.kubeconfig)?
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: ").map(str::to_owned))
        .expect("a server in the kubeconfig");
    let curl = |path: &str, headers: &[&str]| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--http1.1", "--path-as-is", "--cacert"])
            .arg(s.kubeconfig.with_file_name("kube-ca.crt"));
        for h in headers {
            cmd.args(["-H", h]);
        }
        let out = cmd.arg(format!("{server}{path}")).output().expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let encoded = curl("/api/v1/namespaces/default/%73ecrets/db", &[]);
    assert!(
        encoded.contains("encoded characters") && !encoded.contains(PASSWORD_B64),
        "{encoded}"
    );
    let watch = curl("/api/v1/%77atch/secrets", &[]);
    assert!(watch.contains("encoded characters"), "{watch}");
    let key = curl(
        "/api/v1/namespaces/default/pods/web/exec?%63ommand=sh&command=ls",
        &[],
    );
    assert!(key.contains("parameter names must be plain"), "{key}");
    let metrics = curl("/metrics", &[]);
    assert!(metrics.contains("discovery documents only"), "{metrics}");
    let upgraded = curl(
        "/api/v1/namespaces/default/secrets/db",
        &[
            "Connection: Upgrade",
            "Upgrade: websocket",
            "Accept: application/vnd.kubernetes.protobuf, application/yaml",
        ],
    );
    assert!(
        upgraded.contains(MASKED_B64) && !upgraded.contains(PASSWORD_B64),
        "{upgraded}"
    );
    // A YAML body is judged and forwarded as the JSON the gateway read; YAML tags, which
    // the API server decodes (`!!binary` keys), are refused rather than read two ways.
    let post_yaml = |body: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--http1.1", "--cacert"])
            .arg(s.kubeconfig.with_file_name("kube-ca.crt"))
            .args(["-X", "POST", "-H", "Content-Type: application/yaml"])
            .args(["--data-binary", body])
            .arg(format!("{server}/api/v1/namespaces/default/configmaps"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tagged = post_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: tagged\n  !!binary b3duZXJSZWZlcmVuY2Vz: []\ndata: {a: b}\n",
    );
    assert!(tagged.contains("cannot read this YAML body"), "{tagged}");
    let plain = post_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-yaml\ndata:\n  greeting: hello # a comment\n",
    );
    assert!(
        plain.contains("\"name\":\"from-yaml\"") && plain.contains("\"greeting\":\"hello\""),
        "{plain}"
    );

    // Records: every request, with its decision, status, bytes and what was masked; no
    // Secret value anywhere.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let recs = s.records();
        let get_secret = recs.iter().find(|r| {
            r["protocol"] == "Kubernetes"
                && r["request"]["text"] == "get secrets db -n default"
                && r["decision"]["verdict"] == "Allowed"
        });
        let refused = recs.iter().any(|r| {
            r["request"]["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("create clusterrolebindings"))
                && r["decision"]["verdict"] == "Refused"
        });
        let masked_outcome = get_secret.and_then(|g| {
            recs.iter().find(|o| {
                o["session"] == g["session"]
                    && o["outcome"]["id"] == g["request"]["id"]
                    && o["outcome"]["status"] == 200
                    && o["outcome"]["masked"]["agentgate/secret-data"].as_u64() >= Some(1)
            })
        });
        if get_secret.is_some() && refused && masked_outcome.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "records missing: get {} refused {refused} outcome {}",
            get_secret.is_some(),
            masked_outcome.is_some(),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = std::fs::read_to_string(&s.audit)?;
    assert!(!text.contains(PASSWORD) && !text.contains(PASSWORD_B64));
    Ok(())
}

/// Approves the AccessGrant request `name` filed in the policy folder (as an approver editing
/// it would), and waits until `retry` is no longer held.
fn approve(s: &Setup, name: &str, retry: &[&str]) -> Output {
    let filed = s
        .dir
        .path()
        .join("policy/requests")
        .join(format!("{name}.yaml"));
    let text = std::fs::read_to_string(&filed).expect("the request is filed");
    let approved = text.replace(
        "spec:\n",
        &format!(
            "spec:\n  decision: {{ verdict: Approve, decidedAt: \"{}\", decidedBy: {{ username: alice }} }}\n",
            jiff::Timestamp::now()
        ),
    );
    std::fs::write(filed.with_extension("tmp"), approved).unwrap();
    std::fs::rename(filed.with_extension("tmp"), &filed).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = s.agent(retry);
        if !String::from_utf8_lossy(&out.stderr).contains("held for approval") {
            return out;
        }
        assert!(Instant::now() < deadline, "still held after approval");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_is_held_then_approved_then_recorded_as_a_terminal_session() -> anyhow::Result<()> {
    let s = setup().await?;
    // A real exec upstream: kwok serves the kubelet API of a fake node and runs the command
    // on this machine; the API server proxies exec to it.
    let kwok = testenv::kwok_env::Kwok::start(s.env.kube()?, &s.dir.path().join("kwok"))?;
    let node = s.dir.path().join("node.yaml");
    std::fs::write(&node, kwok.node_yaml("kwok-node-0"))?;
    s.admin(&["apply", "-f", node.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.admin(&["get", "pod", "web", "-o", "jsonpath={.status.phase}"]) != "Running" {
        assert!(
            Instant::now() < deadline,
            "the pod never ran on the kwok node"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let cmd = [
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo hello from the pod; echo owner: dana@example.com",
    ];
    // Held for approval of this exact command.
    let err = s.agent_err(&cmd);
    assert!(
        err.contains("held for approval") && err.contains("agentgate-hold-exec"),
        "{err}"
    );
    let (name, filed) = s.filed(&err);
    // What the approver reads is masked as the output would be: the command's e-mail too;
    // an argument with spaces is quoted, as a shell would need it.
    assert_eq!(
        Setup::command_text(&filed),
        "create pods/exec web -n default: sh -c 'echo hello from the pod; echo owner: ****' (container app)"
    );
    assert!(!filed.contains("dana@example.com"), "{filed}");
    // Approved: it runs, over WebSocket, through the API server to kwok.
    let out = approve(&s, &name, &cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("hello from the pod"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent gets the output masked too.
    assert!(
        stdout.contains("owner: ****") && !stdout.contains("dana@"),
        "{stdout}"
    );
    // Over SPDY (older clients) output cannot be masked, so with a MaskPolicy it is refused.
    let spdy = Command::new(&s.env.bins.kubectl)
        .arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .args(cmd)
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .output()?;
    let spdy_err = String::from_utf8_lossy(&spdy.stderr);
    assert!(
        !spdy.status.success() && spdy_err.contains("over WebSocket only"),
        "{spdy_err}"
    );
    // Another command is not covered by that approval.
    let err = s.agent_err(&["exec", "web", "--", "sh", "-c", "rm -rf /tmp/x"]);
    assert!(err.contains("held for approval"), "{err}");

    // The session is recorded: the request with the grant, the output (masked), the outcome.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let recs = s.records();
        let allowed = recs.iter().find(|r| {
            r["request"]["text"].as_str().is_some_and(|t| {
                t.starts_with("create pods/exec web -n default: sh -c 'echo hello")
            }) && r["decision"]["verdict"] == "Allowed"
                && r["decision"]["grant"] == name.as_str()
        });
        let output: String = allowed
            .map(|a| {
                recs.iter()
                    .filter(|r| r["session"] == a["session"] && r["kind"] == "Io")
                    .filter_map(|r| r["io"]["data"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        let upgraded = allowed.is_some_and(|a| {
            recs.iter().any(|o| {
                o["session"] == a["session"]
                    && o["outcome"]["id"] == a["request"]["id"]
                    && o["outcome"]["status"] == 101
            })
        });
        let sessions_with_output = recs
            .iter()
            .filter(|r| {
                r["kind"] == "Io"
                    && r["io"]["data"]
                        .as_str()
                        .is_some_and(|d| d.contains("hello from the pod"))
            })
            .map(|r| r["session"].to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if output.contains("hello from the pod") && upgraded && sessions_with_output >= 1 {
            assert!(output.contains("owner: ****"), "{output}");
            assert!(!output.contains("dana@example.com"), "{output}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "exec not recorded: allowed {} upgraded {upgraded} output {output:?} sessions {sessions_with_output}",
            allowed.is_some()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Port-forward carries bytes agentgate cannot read to mask: with a MaskPolicy that masks
    // values it is refused before anything is filed (without the upgrade, it is held for
    // approval like exec: see `second_review`).
    let local = free_port()?;
    let err = s.agent_err(&["port-forward", "pod/web", &format!("{local}:80")]);
    assert!(
        err.contains("create pods/portforward web -n default")
            && err.contains("would carry bytes agentgate cannot read to mask")
            && !err.contains("held for approval"),
        "{err}"
    );

    // Logs, whole and followed: each line masked as it passes.
    kwok.log_line("starting; the admin is erin@example.com")?;
    let logs = s.agent_ok(&["logs", "web"]);
    assert!(logs.contains("the admin is ****"), "{logs}");
    let mut follow = Command::new(&s.env.bins.kubectl)
        .arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .args(["logs", "-f", "web"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    kwok.log_line("later: frank@example.com logged in")?;
    std::thread::sleep(Duration::from_secs(2));
    follow.kill()?;
    let followed = String::from_utf8_lossy(&follow.wait_with_output()?.stdout).into_owned();
    assert!(followed.contains("later: **** logged in"), "{followed}");
    for out in [&logs, &followed] {
        assert!(!out.contains("erin@") && !out.contains("frank@"), "{out}");
    }
    drop(kwok);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_the_grant_that_allowed_it_is_revoked() -> anyhow::Result<()> {
    let s = setup().await?;
    // Reading Secrets needs a grant (a default guardrail): read-secrets allows the watch.
    let mut watch = Command::new(&s.env.bins.kubectl)
        .arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .args(["get", "secrets", "-n", "default", "--watch", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.records().iter().any(|r| {
        r["kind"] == "Request"
            && r["decision"]["grant"] == "read-secrets"
            && r["request"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("watch secrets"))
    }) {
        assert!(Instant::now() < deadline, "the watch never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        watch.try_wait()?.is_none(),
        "the watch runs while the grant is in force"
    );
    // An approver revokes the grant (standalone: the policy folder changes).
    let file = s.dir.path().join("policy/policy.yaml");
    let text = std::fs::read_to_string(&file)?;
    let revoked = text.replace(
        "  reason: debugging the db connection\n",
        &format!(
            "  reason: debugging the db connection\n  revocation: {{ reason: done, revokedAt: \"{}\", revokedBy: {{ username: alice }} }}\n",
            jiff::Timestamp::now()
        ),
    );
    assert_ne!(text, revoked);
    std::fs::write(file.with_extension("tmp"), revoked)?;
    std::fs::rename(file.with_extension("tmp"), &file)?;
    // The open watch ends at once, saying why (a watch ERROR event with a 403 Status).
    let deadline = Instant::now() + Duration::from_secs(20);
    while watch.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = watch.kill();
            let out = watch.wait_with_output()?;
            panic!(
                "the watch went on after the revocation: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = watch.wait_with_output()?;
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(
        events.contains(r#""kind": "Status""#)
            && events.contains("agentgate: access ended while the request ran")
            && events.contains(r#""code": 403"#),
        "{events}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A new watch is not allowed any more.
    let again = s.agent_err(&["get", "secrets", "-n", "default", "--watch", "-o", "name"]);
    assert!(
        again.contains("held for approval") || again.contains("refused"),
        "{again}"
    );
    // The watch's outcome says why it ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.records().iter().any(|r| {
        r["kind"] == "Outcome"
            && r["outcome"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("agentgate: access ended while the request ran"))
    }) {
        assert!(
            Instant::now() < deadline,
            "no outcome says the watch ended: {:?}",
            s.records()
                .iter()
                .filter(|r| r["kind"] == "Outcome")
                .map(|r| r["outcome"]["error"].clone())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_certificate_is_checked_against_tls_server_name() -> anyhow::Result<()> {
    let s = setup().await?;
    let file = s.dir.path().join("policy/policy.yaml");
    let text = std::fs::read_to_string(&file)?;
    let with = |name: &str| {
        text.replace(
            "ca: { name: c, key: ca.crt } }",
            &format!("ca: {{ name: c, key: ca.crt }}, serverName: {name} }}"),
        )
    };
    assert_ne!(with("x"), text);
    let write = |yaml: String| {
        std::fs::write(file.with_extension("tmp"), yaml).unwrap();
        std::fs::rename(file.with_extension("tmp"), &file).unwrap();
    };
    let get = [
        "get",
        "configmap",
        "settings",
        "-n",
        "default",
        "-o",
        "name",
    ];
    // The URL is https://127.0.0.1:…; the certificate also names `kubernetes`.
    write(with("kubernetes"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.agent_ok(&get).trim(), "configmap/settings");
    // A name the certificate does not carry: nothing is sent, and the agent is told why.
    write(with("api.wrong.example"));
    let deadline = Instant::now() + Duration::from_secs(15);
    let err = loop {
        let out = s.agent(&get);
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "still served with a wrong serverName"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        err.contains("cannot reach the API server") && err.contains("certificate"),
        "{err}"
    );
    Ok(())
}

/// Rewrites the policy folder's main file with `edit` (atomically, as GitOps tools do).
fn edit_policy(s: &Setup, edit: impl Fn(&str) -> String) {
    let file = s.dir.path().join("policy/policy.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let changed = edit(&text);
    assert_ne!(text, changed, "the edit changed nothing");
    std::fs::write(file.with_extension("tmp"), changed).unwrap();
    std::fs::rename(file.with_extension("tmp"), &file).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_waits_for_its_approver_within_hold_timeout() -> anyhow::Result<()> {
    let s = setup().await?;
    // The Target holds requests up to 30 s for an approver.
    edit_policy(&s, |t| {
        t.replace(
            "  protocol: Kubernetes\n",
            "  protocol: Kubernetes\n  holdTimeout: 30s\n",
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    // Creating a ConfigMap outside `default` is not in the baseline: held. kubectl waits;
    // alice approves; the create runs and kubectl succeeds.
    // kubectl waits in a thread of its own while the approver decides.
    let spawn = |args: &[&str]| {
        let mut cmd = Command::new(&s.env.bins.kubectl);
        cmd.arg("--kubeconfig").arg(&s.kubeconfig).args(args);
        std::thread::spawn(move || cmd.output().expect("kubectl"))
    };
    let policy = s.dir.path().join("policy");
    let before = testenv::approvals::filed(&policy);
    let waiting = spawn(&[
        "create",
        "configmap",
        "held-then-approved",
        "-n",
        "kube-public",
        "--from-literal=a=b",
    ]);
    let name = match testenv::approvals::wait_new(&policy, &before) {
        Ok(n) => n,
        Err(e) => {
            let out = waiting.join().expect("kubectl");
            anyhow::bail!("{e}: {}", String::from_utf8_lossy(&out.stderr));
        }
    };
    // The approver reads the body kubectl sent (protobuf, shown field by field).
    let filed = std::fs::read_to_string(policy.join("requests").join(format!("{name}.yaml")))?;
    assert!(
        filed.contains("body: (protobuf)")
            && filed.contains(r#"{1: "a", 2: "b"}"#)
            && filed.contains(r#""held-then-approved""#),
        "{filed}"
    );
    // ... and the API version and media type it is read by.
    let text = Setup::command_text(&filed);
    assert!(
        text.starts_with(
            "create configmaps -n kube-public (v1, application/vnd.kubernetes.protobuf)"
        ),
        "{text}"
    );
    std::thread::sleep(Duration::from_secs(1));
    testenv::approvals::decide(&policy, &name, "Approve", "alice", "ok")
        .map_err(anyhow::Error::msg)?;
    let out = waiting.join().expect("kubectl thread");
    assert!(
        out.status.success(),
        "the approved request failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        s.admin(&[
            "get",
            "configmap",
            "held-then-approved",
            "-n",
            "kube-public",
            "-o",
            "jsonpath={.data.a}",
        ]),
        "b"
    );
    // The approval is recorded, with the approver.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !testenv::approvals::approval_recorded(&s.records(), &name, "alice") {
        assert!(Instant::now() < deadline, "no Approval record");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Denied: kubectl gets the denial and its reason at once; nothing is created.
    let before = testenv::approvals::filed(&policy);
    let waiting = spawn(&[
        "create",
        "configmap",
        "held-then-denied",
        "-n",
        "kube-public",
        "--from-literal=a=b",
    ]);
    let name = testenv::approvals::wait_new(&policy, &before).map_err(anyhow::Error::msg)?;
    testenv::approvals::decide(&policy, &name, "Deny", "alice", "not in kube-public")
        .map_err(anyhow::Error::msg)?;
    let out = waiting.join().expect("kubectl thread");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&format!(
                "AccessGrant {name} was denied by alice: not in kube-public"
            )),
        "{err}"
    );
    assert_eq!(
        s.admin(&[
            "get",
            "configmap",
            "held-then-denied",
            "-n",
            "kube-public",
            "--ignore-not-found",
        ]),
        ""
    );

    // kubectl gives up (killed) while it waits; the approval that comes later runs nothing,
    // and the request's outcome says the client went away.
    let before = testenv::approvals::filed(&policy);
    let gave_up = Command::new(&s.env.bins.kubectl)
        .arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .args([
            "create",
            "configmap",
            "held-then-abandoned",
            "-n",
            "kube-public",
            "--from-literal=a=b",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let name = testenv::approvals::wait_new(&policy, &before).map_err(anyhow::Error::msg)?;
    testenv::approvals::give_up_then_approve(&policy, gave_up, &name, "alice")
        .map_err(anyhow::Error::msg)?;
    testenv::approvals::wait_outcome(
        || s.records(),
        // (over HTTP/2 the connection's end may answer it before the dropped handler does)
        &[
            "the client disconnected while it waited",
            "before the request was answered",
        ],
    )
    .map_err(anyhow::Error::msg)?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        s.admin(&[
            "get",
            "configmap",
            "held-then-abandoned",
            "-n",
            "kube-public",
            "--ignore-not-found",
        ]),
        "",
        "a request ran for a client that had gone"
    );

    // Nobody decides within the holdTimeout: refused, naming the grant still pending.
    edit_policy(&s, |t| t.replace("holdTimeout: 30s", "holdTimeout: 2s"));
    std::thread::sleep(Duration::from_secs(2));
    let err = s.agent_err(&[
        "create",
        "configmap",
        "held-no-answer",
        "-n",
        "kube-public",
        "--from-literal=a=b",
    ]);
    assert!(
        err.contains("held for approval")
            && err.contains("no approver decided within the Target's holdTimeout (2s)")
            && err.contains("stays pending"),
        "{err}"
    );
    // Not in any scope: the answer also says how to ask for access covering such requests.
    assert!(
        err.contains("or, for access beyond this one request: kubectl agentgate grants request <name> --identity bench --target cluster --operations Write --verb create --resource configmaps --in-namespace kube-public --reason <why>"),
        "{err}"
    );
    Ok(())
}

/// Sends one request through the gateway exactly as given (curl, nothing normalized), as
/// the agent; the answer's body.
fn raw(s: &Setup, method: &str, path: &str, headers: &[&str], body: Option<&str>) -> String {
    let server = std::fs::read_to_string(&s.kubeconfig)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: ").map(str::to_owned))
        .expect("a server in the kubeconfig");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "--path-as-is", "-X", method, "--cacert"])
        .arg(s.kubeconfig.with_file_name("kube-ca.crt"));
    for h in headers {
        cmd.args(["-H", h]);
    }
    if let Some(b) = body {
        cmd.args(["--data-binary", b]);
    }
    let out = cmd.arg(format!("{server}{path}")).output().expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The records of requests whose text starts with `text`: (operation, decision rule).
fn requests_like(s: &Setup, text: &str) -> Vec<(String, String)> {
    s.records()
        .iter()
        .filter(|r| {
            r["kind"] == "Request"
                && r["request"]["text"]
                    .as_str()
                    .is_some_and(|t| t.starts_with(text))
        })
        .map(|r| {
            (
                r["request"]["operation"].as_str().unwrap_or("").to_owned(),
                r["decision"]["rule"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_judged_is_what_the_api_server_reads() -> anyhow::Result<()> {
    let s = setup().await?;

    // A body is read by its exact media type. JSON whose Content-Type merely mentions
    // protobuf is JSON: a key given twice (the API server would merge a privileged hostPath
    // pod from the two `spec`s, where a reader keeping the last sees a plain one) is refused.
    let twice = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"merged"},"spec":{"hostPID":true,"volumes":[{"name":"r","hostPath":{"path":"/"}}],"containers":[{"name":"c","image":"x","securityContext":{"privileged":true}}]},"spec":{"automountServiceAccountToken":false,"containers":[{"name":"c","image":"x"}]}}"#;
    for content_type in [
        "Content-Type: application/json; x=protobuf",
        "Content-Type: application/json;protobuf",
    ] {
        let out = raw(
            &s,
            "POST",
            "/api/v1/namespaces/default/pods",
            &[content_type],
            Some(twice),
        );
        assert!(
            out.contains("agentgate refuses this body: it gives a key twice in one object")
                && out.contains("\"code\":400"),
            "{content_type}: {out}"
        );
    }
    // Any other media type is refused, naming those agentgate reads.
    let out = raw(
        &s,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        &["Content-Type: text/plain"],
        Some(r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"plain"}}"#),
    );
    assert!(
        out.contains(r#"its Content-Type \"text/plain\" is not one agentgate reads"#)
            && out.contains(
                "send one of: application/json, application/yaml, application/vnd.kubernetes.protobuf"
            )
            && out.contains("\"code\":415"),
        "{out}"
    );
    let out = raw(
        &s,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/settings",
        &["Content-Type: application/json"],
        Some(r#"{"data":{"level":"4"}}"#),
    );
    assert!(
        out.contains("application/merge-patch+json") && out.contains("\"code\":415"),
        "{out}"
    );
    let out = raw(
        &s,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        &["Content-Type: application/vnd.kubernetes.protobuf; x=y"],
        Some(r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"fake-proto"}}"#),
    );
    assert!(out.contains("not a Kubernetes protobuf body"), "{out}");
    // A JSON type with parameters is JSON: judged and forwarded (as the JSON agentgate read).
    let out = raw(
        &s,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        &["Content-Type: Application/JSON; charset=utf-8"],
        Some(
            r#" { "apiVersion":"v1", "kind":"ConfigMap", "metadata":{"name":"with-params"}, "data":{"a":"\u0062"} } "#,
        ),
    );
    assert!(out.contains(r#""name":"with-params""#), "{out}");
    assert_eq!(
        s.admin(&[
            "get",
            "configmap",
            "with-params",
            "-o",
            "jsonpath={.data.a}"
        ]),
        "b"
    );

    // A query the API server would read otherwise than agentgate shows it is refused: Go
    // drops a pair with an invalid escape, so this exec would run in agentgate-sidecar and
    // this namespace delete would not be a dry run.
    for (method, path) in [
        (
            "POST",
            "/api/v1/namespaces/default/pods/web/exec?command=sh&container=app%&container=agentgate-sidecar",
        ),
        ("DELETE", "/api/v1/namespaces/kube-public?dryRun=All%"),
        (
            "GET",
            "/api/v1/namespaces/default/configmaps?labelSelector=%FF%FE",
        ),
    ] {
        let out = raw(&s, method, path, &[], None);
        assert!(
            out.contains("has an invalid percent escape") && out.contains("\"code\":400"),
            "{path}: {out}"
        );
    }
    // A parameter the API server reads once may not be given twice.
    let out = raw(
        &s,
        "POST",
        "/api/v1/namespaces/default/pods/web/exec?command=id&container=app&container=agentgate-sidecar",
        &[],
        None,
    );
    assert!(
        out.contains(r#"the query parameter \"container\" is given more than once"#),
        "{out}"
    );

    // A pod that carries agentgate's own container, as an injected pod does: first among its
    // init containers (kubectl lists it, and defaults to the agent's container without -c).
    apply(
        &s.env,
        s.dir.path(),
        "carrier",
        "apiVersion: v1\nkind: Pod\nmetadata: { name: carrier, namespace: default }\nspec: { nodeName: kwok-node-0, automountServiceAccountToken: false, initContainers: [ { name: agentgate-sidecar, image: registry.example.com/agentgate:1, restartPolicy: Always } ], containers: [ { name: app, image: registry.example.com/app:1 } ] }\n",
    );
    // Exec or attach naming it is refused, whatever the policy (exec is otherwise held for
    // approval).
    let err = s.agent_err(&["exec", "carrier", "-c", "agentgate-sidecar", "--", "id"]);
    assert!(
        err.contains("agentgate-sidecar is agentgate's own container")
            && err.contains("kubectl exec -c <container>")
            && !err.contains("held for approval"),
        "{err}"
    );
    let out = raw(
        &s,
        "POST",
        "/api/v1/namespaces/default/pods/carrier/attach?container=agentgate-sidecar&stdin=true",
        &[],
        None,
    );
    assert!(
        out.contains("agentgate-sidecar is agentgate's own container")
            && out.contains("\"code\":403"),
        "{out}"
    );
    // Any exec or port-forward into that pod is refused too: it would reach the pod's
    // loopback, where the sidecar's gateways act as the pod's agent.
    let err = s.agent_err(&["exec", "carrier", "--", "id"]);
    assert!(
        err.contains("pod carrier carries agentgate-sidecar") && !err.contains("held for approval"),
        "{err}"
    );
    let out = raw(
        &s,
        "POST",
        "/api/v1/namespaces/default/pods/carrier/portforward?ports=16443",
        &[],
        None,
    );
    assert!(
        out.contains("pod carrier carries agentgate-sidecar") && out.contains("\"code\":403"),
        "{out}"
    );
    // Into a pod without it, a port-forward is held for approval as before.
    let out = raw(
        &s,
        "POST",
        "/api/v1/namespaces/default/pods/web/portforward?ports=80",
        &[],
        None,
    );
    assert!(out.contains("held for approval"), "{out}");

    // A pod the agent makes gets a service-account token unless its spec turns it off: held
    // for approval as exec is; turned off, a plain write (here out of scope: held too, but
    // not as exec).
    let pod = |name: &str, extra: &str| {
        let f = s.dir.path().join(format!("{name}.json"));
        std::fs::write(
            &f,
            format!(
                r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"default"}},"spec":{{{extra}"containers":[{{"name":"c","image":"registry.example.com/app:1"}}]}}}}"#
            ),
        )
        .unwrap();
        f
    };
    let with_token = pod("with-token", "");
    let err = s.agent_err(&["create", "-f", with_token.to_str().unwrap()]);
    assert!(
        err.contains("held for approval") && err.contains("agentgate-hold-exec"),
        "{err}"
    );
    let without = pod("without-token", r#""automountServiceAccountToken":false,"#);
    let err = s.agent_err(&["create", "-f", without.to_str().unwrap()]);
    assert!(
        err.contains("held for approval") && !err.contains("agentgate-hold-exec"),
        "{err}"
    );
    // A gitRepo volume runs git on the node: blocked as the node is.
    let git = pod(
        "git-volume",
        r#""automountServiceAccountToken":false,"volumes":[{"name":"src","gitRepo":{"repository":"https://example.com/r.git"}}],"#,
    );
    let err = s.agent_err(&["create", "-f", git.to_str().unwrap()]);
    assert!(
        err.contains("refused") && err.contains("agentgate-block-admin"),
        "{err}"
    );
    // A pod spec in any resource of any group is read the same (an Argo Workflow here).
    for (name, container, want) in [
        (
            "wf-plain",
            r#"{"image":"alpine","command":["id"]}"#,
            "agentgate-hold-exec",
        ),
        (
            "wf-privileged",
            r#"{"image":"alpine","securityContext":{"privileged":true}}"#,
            "agentgate-block-admin",
        ),
    ] {
        let body = format!(
            r#"{{"apiVersion":"argoproj.io/v1alpha1","kind":"Workflow","metadata":{{"name":"{name}"}},"spec":{{"entrypoint":"main","templates":[{{"name":"main","container":{container}}}]}}}}"#
        );
        let out = raw(
            &s,
            "POST",
            "/apis/argoproj.io/v1alpha1/namespaces/default/workflows",
            &["Content-Type: application/json"],
            Some(&body),
        );
        assert!(out.contains(want), "{name}: {out}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let token = requests_like(&s, "create pods -n default (v1, application/json)");
        let workflows = requests_like(
            &s,
            "create workflows.argoproj.io -n default (argoproj.io/v1alpha1, application/json)",
        );
        let classes: Vec<&str> = token.iter().map(|(op, _)| op.as_str()).collect();
        if classes.contains(&"Exec")
            && classes.contains(&"Write")
            && classes.contains(&"Admin")
            && workflows.len() >= 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pod creates not recorded with their classes: {token:?} {workflows:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A delete's options are part of it: the approver reads the dry run that will run.
    let err = s.agent_err(&["delete", "namespace", "kube-public", "--dry-run=server"]);
    assert!(err.contains("agentgate-hold-kube-delete"), "{err}");
    let (_, filed) = s.filed(&err);
    let text = Setup::command_text(&filed);
    assert!(
        text.starts_with(
            "delete namespaces kube-public -n kube-public (v1, application/json) body: "
        ) && text.contains(r#""dryRun":["All"]"#),
        "{text}"
    );
    second_review(&s);
    Ok(())
}

/// The second review's requests: each is judged as the API server reads it.
fn second_review(s: &Setup) {
    // A value that holds a newline and `=` is one value: an exec may give no parameter the
    // API server does not read (it would be hashed and shown, and run nothing) ...
    let out = raw(
        s,
        "POST",
        "/api/v1/namespaces/default/pods/web/exec?a=1%0Acommand%3Dsh%0Acommand%3D-c%0Acommand%3Did&command=ls&container=app",
        &[],
        None,
    );
    assert!(
        out.contains(
            r#"the query parameter \"a\" is refused: the API server does not read it for pods/exec"#
        ) && out.contains("\"code\":400"),
        "{out}"
    );
    // ... and elsewhere every parameter is shown, a value that is not one plain word quoted,
    // and hashed apart: `a` holding a dry run is not the dry run.
    let held = |query: &str| {
        let out = raw(
            s,
            "DELETE",
            &format!("/api/v1/namespaces/kube-public?{query}"),
            &[],
            None,
        );
        assert!(out.contains("agentgate-hold-kube-delete"), "{query}: {out}");
        let (name, filed) = s.filed(&out);
        (name, Setup::command_text(&filed))
    };
    let (inside, inside_text) = held("a=x%0AdryRun%3DAll");
    let (dry, dry_text) = held("a=x&dryRun=All");
    assert_ne!(inside, dry);
    assert_eq!(
        inside_text,
        r#"delete namespaces kube-public -n kube-public ?a="x\ndryRun=All""#
    );
    assert_eq!(
        dry_text,
        "delete namespaces kube-public -n kube-public ?a=x&dryRun=All"
    );
    let (_, amp_text) = held("a=x%26dryRun%3DAll");
    assert_eq!(
        amp_text,
        "delete namespaces kube-public -n kube-public ?a='x&dryRun=All'"
    );

    // A delete with a body reads its options from the body only: a dry run in its query
    // would be shown and not run.
    let out = raw(
        s,
        "DELETE",
        "/api/v1/namespaces/kube-public?dryRun=All",
        &["Content-Type: application/json"],
        Some(r#"{"kind":"DeleteOptions","apiVersion":"v1"}"#),
    );
    assert!(
        out.contains(r#"the query parameter \"dryRun\" is refused: this delete has a body"#)
            && out.contains("\"code\":400"),
        "{out}"
    );
    s.admin(&["get", "namespace", "kube-public"]);

    // automountServiceAccountToken: false counts on the pod spec only, not as a decoy
    // elsewhere (held as exec: the pod mounts its token).
    for (method, path, content_type, body) in [
        (
            "POST",
            "/api/v1/namespaces/default/pods",
            "application/json",
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"decoy"},"automountServiceAccountToken":false,"spec":{"containers":[{"name":"c","image":"registry.example.com/app:1"}]}}"#,
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/default/deployments/orders",
            "application/strategic-merge-patch+json",
            r#"{"spec":{"automountServiceAccountToken":false,"template":{"spec":{"containers":[{"name":"c","image":"evil:1"}]}}}}"#,
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/default/deployments/orders",
            "application/json-patch+json",
            r#"[{"op":"add","path":"/spec/automountServiceAccountToken","value":false},{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"evil:1"}]"#,
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/default/deployments/orders",
            "application/strategic-merge-patch+json",
            r#"{"spec":{"template":{"spec":{"$retainKeys":["nodeSelector"],"nodeSelector":{"a":"b"}}}}}"#,
        ),
    ] {
        let out = raw(
            s,
            method,
            path,
            &[&format!("Content-Type: {content_type}")],
            Some(body),
        );
        assert!(out.contains("agentgate-hold-exec"), "{body}: {out}");
    }

    // A debug container, or any change, in a pod that carries agentgate-sidecar.
    for (path, content_type, body) in [
        (
            "/api/v1/namespaces/default/pods/carrier/ephemeralcontainers",
            "application/strategic-merge-patch+json",
            r#"{"spec":{"ephemeralContainers":[{"name":"dbg","image":"busybox","targetContainerName":"app"}]}}"#,
        ),
        (
            "/api/v1/namespaces/default/pods/carrier",
            "application/strategic-merge-patch+json",
            r#"{"spec":{"containers":[{"name":"app","image":"evil:1"}]}}"#,
        ),
        (
            "/api/v1/namespaces/default/pods/carrier",
            "application/merge-patch+json",
            r#"{"metadata":{"labels":{"a":"b"}}}"#,
        ),
    ] {
        let out = raw(
            s,
            "PATCH",
            path,
            &[&format!("Content-Type: {content_type}")],
            Some(body),
        );
        assert!(
            out.contains("pod carrier carries agentgate-sidecar") && out.contains("\"code\":403"),
            "{path} {body}: {out}"
        );
    }
    // ... not in one without it (held, as a debug container is an exec).
    let out = raw(
        s,
        "PATCH",
        "/api/v1/namespaces/default/pods/web/ephemeralcontainers",
        &["Content-Type: application/strategic-merge-patch+json"],
        Some(
            r#"{"spec":{"ephemeralContainers":[{"name":"dbg","image":"busybox","targetContainerName":"app"}]}}"#,
        ),
    );
    assert!(out.contains("agentgate-hold-exec"), "{out}");
    // The kubelet's exec endpoint, through nodes/proxy, naming the sidecar.
    let out = raw(
        s,
        "POST",
        "/api/v1/nodes/kwok-node-0/proxy/exec/default/carrier/agentgate%2Dsidecar?command=id",
        &[],
        None,
    );
    assert!(
        out.contains("no kubelet path through nodes/proxy may name it")
            && out.contains("\"code\":403"),
        "{out}"
    );

    // Pod specs under a custom resource's own keys.
    for (path, body, want) in [
        (
            "/apis/sparkoperator.k8s.io/v1beta2/namespaces/default/sparkapplications",
            r#"{"apiVersion":"sparkoperator.k8s.io/v1beta2","kind":"SparkApplication","metadata":{"name":"s"},"spec":{"driver":{"securityContext":{"privileged":true}}}}"#,
            "agentgate-block-admin",
        ),
        (
            "/apis/sparkoperator.k8s.io/v1beta2/namespaces/default/sparkapplications",
            r#"{"apiVersion":"sparkoperator.k8s.io/v1beta2","kind":"SparkApplication","metadata":{"name":"s"},"spec":{"volumes":[{"name":"r","hostPath":{"path":"/"}}]}}"#,
            "agentgate-block-admin",
        ),
        (
            "/apis/sparkoperator.k8s.io/v1beta2/namespaces/default/sparkapplications",
            r#"{"apiVersion":"sparkoperator.k8s.io/v1beta2","kind":"SparkApplication","metadata":{"name":"s"},"spec":{"image":"spark:3","mainApplicationFile":"local:///x.py"}}"#,
            "agentgate-hold-exec",
        ),
        (
            "/apis/argoproj.io/v1alpha1/namespaces/default/workflows",
            r#"{"apiVersion":"argoproj.io/v1alpha1","kind":"Workflow","metadata":{"name":"p"},"spec":{"templates":[{"name":"main","automountServiceAccountToken":false,"container":{"image":"alpine"},"podSpecPatch":"{\"containers\":[{\"name\":\"main\",\"securityContext\":{\"privileged\":true}}]}"}]}}"#,
            "agentgate-block-admin",
        ),
    ] {
        let out = raw(
            s,
            "POST",
            path,
            &["Content-Type: application/json"],
            Some(body),
        );
        assert!(out.contains(want), "{body}: {out}");
    }

    // A proxied request's body is the proxied server's: not read as a Kubernetes object
    // (no 415 for a form), forwarded as it came, shown as its text with its Content-Type.
    let out = raw(
        s,
        "POST",
        "/api/v1/namespaces/default/services/web:80/proxy/login",
        &["Content-Type: application/x-www-form-urlencoded"],
        Some("user=dana&next=%2Fadmin"),
    );
    assert!(
        out.contains("held for approval") && !out.contains("\"code\":415"),
        "{out}"
    );
    let (_, filed) = s.filed(&out);
    assert_eq!(
        Setup::command_text(&filed),
        r#"create services/proxy web:80 -n default path /login (v1, application/x-www-form-urlencoded) body: "user=dana&next=%2Fadmin""#
    );
}
