//! The test environment itself: every part starts for real, answers like the real thing, and
//! leaves no process behind.

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use testenv::{Parts, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_part_starts_answers_and_stops_cleanly() -> anyhow::Result<()> {
    let env = TestEnv::start_async(Parts::all()).await?;
    let kube = env.kube()?;

    // /version is the real release, stamped at build time.
    let version: serde_json::Value = serde_json::from_str(kube.version_json())?;
    assert_eq!(
        version["gitVersion"].as_str(),
        Some(format!("v{}", testenv::kubernetes_version()).as_str()),
        "{version}"
    );
    assert_eq!(version["major"], "1");

    // RBAC is on: a token user without bindings is forbidden; the admin is not.
    let out = kube
        .kubectl_as("mallory")
        .args(["get", "pods", "-A"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("forbidden") && err.contains("\"mallory\""),
        "{err}"
    );
    kube.kubectl_run(&["get", "namespaces"])?;

    // TokenRequest and OIDC discovery work: the API server is a real issuer.
    let client = kube.client().await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("agent".into());
    sas.create(&PostParams::default(), &sa).await?;
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["agentgate".into()]),
            expiration_seconds: Some(600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = sas
        .create_token_request("agent", &PostParams::default(), &req)
        .await?;
    let jwt = token.status.and_then(|s| s.token).unwrap_or_default();
    assert_eq!(jwt.split('.').count(), 3, "a JWT");
    let tls = testenv::http::TlsClient::new(&kube.ca_pem(), None)?;
    let disco = tls.get(kube.port(), "/.well-known/openid-configuration")?;
    assert_eq!(disco.status, 200, "{}", disco.body);
    let disco: serde_json::Value = serde_json::from_str(&disco.body)?;
    assert_eq!(disco["issuer"], kube.issuer());
    let jwks = tls.get(kube.port(), "/openid/v1/jwks")?;
    assert_eq!(jwks.status, 200, "unauthenticated JWKS: {}", jwks.body);
    assert!(jwks.body.contains("\"keys\""));

    // PostgreSQL: TLS verified against the test CA, SCRAM for the gateway role, md5 for the
    // md5 role.
    let pg = env.postgres()?;
    let out = pg.psql_run("app", "SHOW ssl")?;
    assert_eq!(out.trim(), "on");
    for user in [
        testenv::postgres_env::GATEWAY_USER,
        testenv::postgres_env::MD5_USER,
    ] {
        let out = Command::new(env.bins.pg_bin.join("psql"))
            .arg(pg.url(user, "app"))
            .args([
                "-XAt",
                "-c",
                "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            ])
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{user}|t")
        );
    }
    let methods = pg.psql_run(
        "app",
        "SELECT rolname, left(rolpassword, 6) FROM pg_authid WHERE rolname LIKE 'agentgate%' ORDER BY 1",
    )?;
    assert!(methods.contains("agentgate|SCRAM-"), "{methods}");
    assert!(methods.contains("agentgate_md5|md5"), "{methods}");

    // sshd: a real login with strict host key checking.
    let ssh = env.ssh()?;
    let out = ssh.ssh().arg("echo hello-from-$(whoami)").output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("hello-from-{}", ssh.user())
    );

    // Dropping the environment stops every process and removes its directory.
    let pids = env.pids();
    let dir = env.dir().to_owned();
    assert!(pids.len() >= 4, "{pids:?}");
    drop(env);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} survived"
        );
    }
    assert!(!dir.exists(), "{} survived", dir.display());
    Ok(())
}
