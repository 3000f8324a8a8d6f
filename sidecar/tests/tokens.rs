//! Agents authenticate with tokens: the API server's own issuer (projected service-account
//! tokens, and the same issuer standing in for an external IdP), verified against its
//! published keys, mapped to exactly one AgentIdentity. Bad tokens are refused with a reason.

#![allow(clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use testenv::process::{Proc, Spec, free_port};
use testenv::{Parts, TestEnv};

async fn token(client: &kube::Client, sa: &str, audience: &str) -> anyhow::Result<String> {
    Ok(testenv::kube_env::sa_token(client, "default", sa, Some(audience)).await?)
}

/// The UID the sidecar is told its pod has.
const SIDECAR_POD_UID: &str = "5b1f0c4e-0000-4000-8000-00000000a9e7";

fn b64(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_a_real_issuer() -> anyhow::Result<()> {
    let env = TestEnv::start_async(Parts {
        kube: true,
        postgres: true,
        ssh: true,
    })
    .await?;
    let kube = env.kube()?;
    let client = kube.client().await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    for name in ["claude", "robot", "other"] {
        let sa: ServiceAccount =
            serde_json::from_value(serde_json::json!({ "metadata": { "name": name } }))?;
        sas.create(&PostParams::default(), &sa).await?;
    }
    let pg = env.postgres()?;
    let issuer = kube.issuer();
    let targets = tempfile::tempdir()?;
    let cluster = kube
        .gateway_target(
            "claude",
            &[r#"{ apiGroups: [""], resources: [configmaps], verbs: [get, list] }"#],
            targets.path(),
            "cluster",
        )
        .await?;
    let policy = tempfile::tempdir()?;
    std::fs::write(
        policy.path().join("p.yaml"),
        format!(
            r#"
apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: db }}
spec:
  protocol: Postgres
  postgres: {{ host: 127.0.0.1, port: {port}, database: app, tls: {{ mode: VerifyFull, ca: {{ name: c, key: ca.crt }} }}, credentials: {{ name: c }} }}
---
apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: cluster }}
spec: {{ protocol: Kubernetes, kubernetes: {cluster} }}
---
{host}---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: claude, namespace: default }}
spec:
  owner: t
  authentication: {{ serviceAccount: {{ name: claude }} }}
  baseline: [ {{ target: db, scope: {{ operations: [Read] }} }}, {{ target: cluster, scope: {{ operations: [Read] }} }}, {{ target: host, scope: {{ operations: [Read] }} }} ]
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: external-robot }}
spec:
  owner: t
  authentication: {{ oidc: {{ issuer: "{issuer}", audience: ext-aud, subject: "system:serviceaccount:default:robot" }} }}
  baseline: [ {{ target: db, scope: {{ operations: [Read] }} }} ]
"#,
            port = pg.port(),
            host = env.ssh()?.target_yaml("host")?,
        ),
    )?;
    pg.write_credentials(targets.path(), "db", "agentgate")?;
    env.ssh()?.write_credentials(targets.path(), "host")?;
    let client_dir = env.dir().join("client");
    let port = free_port()?;
    let spec = Spec::new("sidecar", env!("CARGO_BIN_EXE_agentgate-sidecar"))
        .args([
            format!("--policy-dir={}", policy.path().display()),
            "--pg-auth=token".into(),
            format!("--sa-issuer={issuer}"),
            format!("--oidc-ca-file={}", kube.ca_path().display()),
            format!("--targets-dir={}", targets.path().display()),
            format!("--pg-addr=127.0.0.1:{port}"),
            "--kube-addr=127.0.0.1:0".into(),
            "--ssh-addr=127.0.0.1:0".into(),
            format!("--client-dir={}", client_dir.display()),
            format!(
                "--audit-dir={}",
                env.dir().join(format!("audit-{port}")).display()
            ),
        ])
        // Service-account tokens are also checked with the API server (TokenReview).
        .env("KUBECONFIG", kube.kubeconfig().display().to_string())
        // The pod the sidecar would run in: a token bound to another pod is refused.
        .env("POD_UID", SIDECAR_POD_UID);
    let mut proc = Proc::start(spec, &env.dir().join("logs"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        proc.check_running()?;
        anyhow::ensure!(Instant::now() < deadline, "sidecar not listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let psql = |password: &str, sql: &str| {
        let out = Command::new(env.bins.pg_bin.join("psql"))
            .arg(format!(
                "host=127.0.0.1 port={port} dbname=db user=agent sslmode=disable"
            ))
            .args(["-X", "-At", "-c", sql])
            .env("PGPASSWORD", password)
            .output()
            .expect("psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // A projected token with audience agentgate: the pod's service account → claude.
    let good = token(&client, "claude", "agentgate").await?;
    let (ok, out, err) = psql(&good, "SELECT 1");
    assert!(ok && out == "1", "{err}");
    assert!(
        proc.log_contains("token verified") && proc.log_contains("identity=claude"),
        "{}",
        proc.log_tail(20)
    );
    // The same issuer as an external IdP: subject and audience map to external-robot.
    let ext = token(&client, "robot", "ext-aud").await?;
    let (ok, _, err) = psql(&ext, "SELECT 1");
    assert!(ok, "{err}");
    assert!(
        proc.log_contains("identity=external-robot"),
        "{}",
        proc.log_tail(20)
    );

    // The Kubernetes gateway takes the same tokens as bearer tokens.
    let kubeconfig = client_dir.join("kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !kubeconfig.exists() {
        anyhow::ensure!(Instant::now() < deadline, "no kubeconfig");
        std::thread::sleep(Duration::from_millis(100));
    }
    let kubectl = |token: Option<&str>| {
        let mut cmd = Command::new(&env.bins.kubectl);
        cmd.arg("--kubeconfig").arg(&kubeconfig);
        if let Some(t) = token {
            cmd.arg(format!("--token={t}"));
        }
        let out = cmd
            .args(["get", "configmaps", "-n", "default", "-o", "name"])
            .output()
            .expect("kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = kubectl(Some(&good));
    assert!(ok, "{err}");

    // The SSH gateway takes them as the password (OpenSSH's ssh, through SSH_ASKPASS).
    let ssh_config = client_dir.join("ssh_config");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&ssh_config).is_ok_and(|c| c.contains("Host host")) {
        anyhow::ensure!(Instant::now() < deadline, "no ssh_config");
        std::thread::sleep(Duration::from_millis(100));
    }
    let askpass = env.dir().join("askpass.sh");
    std::fs::write(
        &askpass,
        "#!/bin/sh\nprintf '%s\\n' \"$AGENTGATE_TEST_TOKEN\"\n",
    )?;
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let ssh = |token: &str| {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(&ssh_config)
            .args(["-o", "NumberOfPasswordPrompts=1", "host", "echo via-ssh"])
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("AGENTGATE_TEST_TOKEN", token)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ssh");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = ssh(&good);
    assert!(ok && out == "via-ssh", "{err}\n{}", proc.log_tail(20));
    let (ok, err) = kubectl(None);
    assert!(!ok && err.contains("agentgate refuses the token"), "{err}");

    // Refusals, each with its reason.
    let wrong_aud = token(&client, "claude", "something-else").await?;
    let stranger = token(&client, "other", "agentgate").await?;
    let parts: Vec<&str> = good.split('.').collect();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(parts[0])?,
    )?;
    let mut claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(parts[1])?,
    )?;
    claims["sub"] = "system:serviceaccount:default:admin".into();
    let tampered = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]);
    let none = format!(
        "{}.{}.",
        b64(&serde_json::json!({ "alg": "none", "typ": "JWT" })),
        parts[1]
    );
    let mut hs = header.clone();
    hs["alg"] = "HS256".into();
    let hs256 = format!("{}.{}.{}", b64(&hs), parts[1], parts[2]);
    let mut evil_claims = claims.clone();
    evil_claims["iss"] = "https://evil.example".into();
    let evil = format!("{}.{}.{}", parts[0], b64(&evil_claims), parts[2]);
    let cases = [
        (
            "no token",
            "hunter2".to_owned(),
            "the password is not a token",
        ),
        (
            "wrong audience",
            wrong_aud,
            "no AgentIdentity matches subject system:serviceaccount:default:claude",
        ),
        (
            "unmapped",
            stranger,
            "no AgentIdentity matches subject system:serviceaccount:default:other",
        ),
        ("tampered", tampered, "invalid token"),
        ("alg none", none, "token algorithm none is not accepted"),
        (
            "HMAC confusion",
            hs256,
            "token algorithm HS256 is not accepted",
        ),
        (
            "unknown issuer",
            evil,
            "no AgentIdentity trusts issuer https://evil.example",
        ),
    ];
    for (name, tok, want) in cases {
        let (ok, _, err) = psql(&tok, "SELECT 1");
        assert!(!ok && err.contains(want), "{name}: {err}");
        if name != "no token" {
            let (ok, err) = kubectl(Some(&tok));
            assert!(!ok && err.contains(want), "kube, {name}: {err}");
        }
        // SSH says only "Permission denied" (the protocol has no reason field); the reason
        // is in the refusal record.
        let (ok, _, ssh_err) = ssh(&tok);
        assert!(
            !ok && ssh_err.contains("Permission denied"),
            "ssh, {name}: {ssh_err}"
        );
        assert!(
            !err.contains(&tok[..tok.len().min(40)]) || tok.len() < 20,
            "{name}: the token leaked into the message"
        );
    }

    // A session begun with a token ends its access when the identity no longer names the
    // token's subject: the next statement on the open connection is refused, with why.
    let (db, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} dbname=db user=robot password={ext} sslmode=disable"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    assert_eq!(db.query_one("SELECT 7", &[]).await?.get::<_, i32>(0), 7);
    let file = policy.path().join("p.yaml");
    let text = std::fs::read_to_string(&file)?;
    std::fs::write(
        &file,
        text.replace(
            r#"subject: "system:serviceaccount:default:robot""#,
            r#"subject: "system:serviceaccount:default:other""#,
        ),
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        match db.query_one("SELECT 7", &[]).await {
            Err(e) => {
                break e
                    .as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_default();
            }
            Ok(_) => {
                anyhow::ensure!(Instant::now() < deadline, "the session went on");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(
        refused.contains("this session's token no longer maps to AgentIdentity external-robot"),
        "{refused}"
    );

    // A token bound to another pod (taken from it) is refused, though its signature holds.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "default");
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "elsewhere" },
        "spec": { "serviceAccountName": "claude", "containers": [ { "name": "c", "image": "busybox" } ] }
    }))?;
    let pod = pods.create(&PostParams::default(), &pod).await?;
    let request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(serde_json::json!({
            "spec": {
                "audiences": ["agentgate"],
                "boundObjectRef": { "kind": "Pod", "apiVersion": "v1", "name": "elsewhere",
                    "uid": pod.metadata.uid.clone().unwrap_or_default() }
            }
        }))?;
    let bound = sas
        .create_token_request("claude", &PostParams::default(), &request)
        .await?
        .status
        .map(|s| s.token)
        .unwrap_or_default()
        .unwrap_or_default();
    let (ok, _, err) = psql(&bound, "SELECT 1");
    assert!(
        !ok && err.contains(
            "the service-account token is bound to pod elsewhere, not to this agent's pod"
        ),
        "{err}"
    );

    // A service account deleted: its tokens stop working, on new connections and in open
    // sessions (the API server is asked again while they last), though they stay signed.
    let (db, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={port} dbname=db user=claude password={good} sslmode=disable"
        ),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    assert_eq!(db.query_one("SELECT 8", &[]).await?.get::<_, i32>(0), 8);
    sas.delete("claude", &Default::default()).await?;
    let deadline = Instant::now() + Duration::from_secs(40);
    let ended = loop {
        match db.query_one("SELECT 8", &[]).await {
            Err(e) => {
                break e
                    .as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_default();
            }
            Ok(_) => {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the session outlived its service account"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    assert!(
        ended.contains("the API server does not accept this service-account token now"),
        "{ended}"
    );
    let (ok, _, err) = psql(&good, "SELECT 1");
    assert!(
        !ok && err.contains("the API server does not accept this service-account token now"),
        "{err}"
    );
    let (ok, err) = kubectl(Some(&good));
    assert!(
        !ok && err.contains("does not accept this service-account token"),
        "{err}"
    );
    Ok(())
}
