//! Operations: restarts, leader election, webhook certificate rotation, validation of
//! references, session retention and metrics — with the real operator binary.

mod common;

use std::time::{Duration, Instant};

use agentgate_crds::GrantPhase;
use common::*;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::json;

fn leader_gauge(metrics: &str) -> Option<i64> {
    metrics
        .lines()
        .find(|l| l.starts_with("agentgate_operator_leader "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

async fn wait_until<F: FnMut() -> bool>(
    what: &str,
    timeout: Duration,
    mut f: F,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_grant_and_leader_election() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&[]).await?;
    let admin = cluster.client.clone();
    let alice = cluster.client_as("alice").await?;
    let bob = cluster.client_as("bob").await?;

    request(&bob, "mid", "claude", "12s", json!({})).await?;
    patch_spec(
        &alice,
        "mid",
        json!({ "decision": { "verdict": "Approve" } }),
    )
    .await?;
    let (g, _) = wait_phase(&admin, "mid", GrantPhase::Active, Duration::from_secs(5)).await?;
    let expires = g.status.and_then(|s| s.expires_at).expect("expiresAt").0;

    // The operator goes away while the grant runs; it expires while nobody is watching.
    cluster.operators[0].stop(Duration::from_secs(5));
    let wait = expires
        .duration_since(jiff::Timestamp::now())
        .as_secs_f64()
        .max(0.0)
        + 2.0;
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    assert_eq!(
        phase(&get(&admin, "mid").await?),
        Some(GrantPhase::Active),
        "nobody ran the controller"
    );

    // A new replica takes the Lease (after the old one lapses) and catches up at once.
    let restarted = Instant::now();
    let i = cluster.start_operator().await?;
    let (g, _) = wait_phase(&admin, "mid", GrantPhase::Expired, Duration::from_secs(20)).await?;
    assert!(
        restarted.elapsed() < Duration::from_secs(15),
        "took {:?}",
        restarted.elapsed()
    );
    assert_eq!(
        g.status.and_then(|s| s.ended_at).map(|t| t.0),
        Some(expires)
    );
    wait_until("the new replica leads", Duration::from_secs(10), || {
        leader_gauge(&cluster.metrics(i)) == Some(1)
    })
    .await?;

    // A second replica serves webhooks but waits for the Lease.
    let j = cluster
        .start_operator_on(testenv::process::free_port()?)
        .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(leader_gauge(&cluster.metrics(j)), Some(0), "two leaders");
    assert_eq!(leader_gauge(&cluster.metrics(i)), Some(1));

    // The leader dies; the follower takes over within the lease duration and runs grants.
    cluster.operators[i].stop(Duration::from_secs(5));
    wait_until("the follower leads", Duration::from_secs(15), || {
        leader_gauge(&cluster.metrics(j)) == Some(1)
    })
    .await?;
    // A replacement replica serves the webhooks the API server calls, as a follower.
    let k = cluster.start_operator().await?;
    assert_eq!(leader_gauge(&cluster.metrics(k)), Some(0));
    request(&bob, "after-failover", "claude", "10m", json!({})).await?;
    patch_spec(
        &alice,
        "after-failover",
        json!({ "decision": { "verdict": "Approve" } }),
    )
    .await?;
    wait_phase(
        &admin,
        "after-failover",
        GrantPhase::Active,
        Duration::from_secs(10),
    )
    .await?;
    let lease = cluster.kube().kubectl_run(&[
        "get",
        "lease",
        "-n",
        OPERATOR_NS,
        "agentgate-operator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    assert_eq!(lease, format!("operator-{j}"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_validation_retention_and_metrics() -> anyhow::Result<()> {
    let cluster =
        Cluster::start(&["--webhook-cert-validity=30s", "--session-retention=5s"]).await?;
    let admin = cluster.client.clone();

    // Webhook TLS: the operator's CA is in both configurations' caBundle.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), OPERATOR_NS);
    let tls = secrets.get("agentgate-webhook-tls").await?;
    let data = tls.data.clone().unwrap_or_default();
    let ca = data["ca.crt"].0.clone();
    let first_cert = data["tls.crt"].0.clone();
    let m: MutatingWebhookConfiguration = Api::all(admin.clone()).get("agentgate").await?;
    let v: ValidatingWebhookConfiguration = Api::all(admin.clone()).get("agentgate").await?;
    for bundle in m
        .webhooks
        .iter()
        .flatten()
        .map(|w| &w.client_config.ca_bundle)
        .chain(
            v.webhooks
                .iter()
                .flatten()
                .map(|w| &w.client_config.ca_bundle),
        )
    {
        assert_eq!(bundle.as_ref().map(|b| &b.0), Some(&ca));
    }
    // It renews before expiry (a third of 30 s left), and admission keeps working throughout.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut n = 0;
    loop {
        let bob = cluster.client_as("bob").await?;
        request(
            &bob,
            &format!("during-rotation-{n}"),
            "claude",
            "10m",
            json!({}),
        )
        .await?;
        n += 1;
        let now = secrets
            .get("agentgate-webhook-tls")
            .await?
            .data
            .unwrap_or_default();
        if now["tls.crt"].0 != first_cert {
            assert_eq!(now["ca.crt"].0, ca, "the CA is kept across renewals");
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the serving certificate was never renewed"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let bob = cluster.client_as("bob").await?;
    request(&bob, "after-rotation", "claude", "10m", json!({})).await?;

    // References are validated, Ready says why not.
    apply(&admin, json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": { "name": "lost" },
        "spec": { "owner": "t", "authentication": { "serviceAccount": { "name": "not-yet" } } } })).await?;
    apply(&admin, json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": { "name": "oidc-ok" },
        "spec": { "owner": "t", "authentication": { "oidc": { "issuer": cluster.kube().issuer(), "audience": "agentgate", "subject": "x" } } } })).await?;
    apply(&admin, json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": { "name": "oidc-down" },
        "spec": { "owner": "t", "authentication": { "oidc": { "issuer": "https://127.0.0.1:1", "audience": "agentgate", "subject": "x" } } } })).await?;
    apply(&admin, json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": { "name": "wrong-baseline" },
        "spec": { "owner": "t", "authentication": { "oidc": { "issuer": cluster.kube().issuer(), "audience": "agentgate", "subject": "y" } },
            "baseline": [ { "target": "orders-db", "scope": { "operations": ["Read"], "ssh": { "commands": ["uptime"] } } } ] } })).await?;
    apply(&admin, json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "Target", "metadata": { "name": "no-creds" },
        "spec": { "protocol": "SSH", "ssh": { "host": "h", "user": "u", "knownHosts": "h ssh-ed25519 AAAA", "credentials": { "name": "host-key" } } } })).await?;
    apply(&admin, json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "MaskPolicy", "metadata": { "name": "bad-regex" },
        "spec": { "rules": [ { "name": "r", "patterns": ["(unclosed"], "action": "Redact" } ] } })).await?;
    apply(&admin, json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "MaskPolicy", "metadata": { "name": "no-key" },
        "spec": { "rules": [ { "name": "r", "columns": ["*.ssn"], "action": "Hash" } ], "hashKey": { "name": "mask-key", "key": "key" } } })).await?;
    let ready = |kind: &str, name: &str| -> (String, String, String) {
        let out = cluster
            .kube()
            .kubectl_run(&["get", kind, name, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}|{.status.conditions[?(@.type==\"Ready\")].reason}|{.status.conditions[?(@.type==\"Ready\")].message}"])
            .unwrap_or_default();
        let mut parts = out.splitn(3, '|').map(str::to_owned);
        (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        )
    };
    let expect = [
        (
            "agentidentity",
            "lost",
            "False",
            "ServiceAccountNotFound",
            "service account default/not-yet does not exist",
        ),
        ("agentidentity", "oidc-ok", "True", "ReferencesResolved", ""),
        (
            "agentidentity",
            "oidc-down",
            "False",
            "OIDCIssuerUnreachable",
            "cannot read the OIDC discovery document",
        ),
        ("agentidentity", "claude", "True", "ReferencesResolved", ""),
        (
            "agentidentity",
            "wrong-baseline",
            "False",
            "BaselineScopeMismatch",
            "spec.baseline[0] (Target orders-db, Postgres): scope.ssh does not apply to a Postgres Target",
        ),
        ("target", "orders-db", "True", "SecretsFound", ""),
        (
            "target",
            "no-creds",
            "False",
            "SecretsMissing",
            "Secret host-key does not exist",
        ),
        (
            "maskpolicy",
            "bad-regex",
            "False",
            "Invalid",
            "rule r patterns[0] does not compile",
        ),
        (
            "maskpolicy",
            "no-key",
            "False",
            "Invalid",
            "hash key Secret mask-key does not exist",
        ),
    ];
    for (kind, name, status, reason, msg) in expect {
        let mut last = Default::default();
        let ok = wait_until(
            &format!("{kind}/{name} Ready={status}"),
            Duration::from_secs(20),
            || {
                last = ready(kind, name);
                last.0 == status && last.1 == reason && last.2.contains(msg)
            },
        )
        .await;
        anyhow::ensure!(
            ok.is_ok(),
            "{kind}/{name}: want {status}/{reason}/{msg:?}, got {last:?}"
        );
    }
    // Fixing a reference makes it Ready.
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), NS);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({ "metadata": { "name": "not-yet" } }))?,
    )
    .await?;
    let s: Secret = serde_json::from_value(
        json!({ "metadata": { "name": "host-key" }, "stringData": { "ssh-privatekey": "k" } }),
    )?;
    Api::<Secret>::namespaced(admin.clone(), NS)
        .create(&PostParams::default(), &s)
        .await?;
    wait_until(
        "identity lost becomes Ready",
        Duration::from_secs(20),
        || ready("agentidentity", "lost").0 == "True",
    )
    .await?;
    wait_until(
        "target no-creds becomes Ready",
        Duration::from_secs(20),
        || ready("target", "no-creds").0 == "True",
    )
    .await?;

    // An identity's last seen is its sessions' latest activity.
    // (now, so that the 5 s retention of this test does not delete it first)
    let seen_at = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())?.to_string();
    let seen_at = seen_at.as_str();
    apply(&admin, json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentSession", "metadata": { "name": "seen" },
        "spec": { "identity": "claude", "target": "orders-db", "protocol": "Postgres", "sessionId": "seen", "startedAt": seen_at } })).await?;
    wait_until("lastSeen reported", Duration::from_secs(10), || {
        cluster
            .kube()
            .kubectl_run(&[
                "get",
                "agentidentity",
                "claude",
                "-o",
                "jsonpath={.status.lastSeen}",
            ])
            .is_ok_and(|s| s == seen_at)
    })
    .await?;

    // Retention: a session that ended long ago is deleted; a fresh one only after 5 s.
    let old_start = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(2)).to_string();
    let old_end = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)).to_string();
    let now = jiff::Timestamp::now().to_string();
    for (name, start) in [("old", &old_start), ("fresh", &now)] {
        apply(&admin, json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentSession", "metadata": { "name": name },
            "spec": { "identity": "claude", "target": "orders-db", "protocol": "Postgres", "sessionId": name, "startedAt": start } })).await?;
    }
    // (a session started long ago that never reported an end — a dead sidecar — goes too)
    let _ = cluster.kube().kubectl_run(&[
        "patch",
        "agentsession",
        "old",
        "--subresource=status",
        "--type=merge",
        "-p",
        &json!({ "status": { "phase": "Ended", "endedAt": old_end } }).to_string(),
    ]);
    cluster.kube().kubectl_run(&[
        "patch",
        "agentsession",
        "fresh",
        "--subresource=status",
        "--type=merge",
        "-p",
        &json!({ "status": { "phase": "Ended", "endedAt": now } }).to_string(),
    ])?;
    let sessions = |name: &str| {
        cluster
            .kube()
            .kubectl_run(&["get", "agentsession", name, "--ignore-not-found"])
            .unwrap_or_default()
    };
    wait_until(
        "the old session is deleted",
        Duration::from_secs(10),
        || sessions("old").is_empty(),
    )
    .await?;
    assert!(
        !sessions("fresh").is_empty(),
        "the fresh session went too early"
    );
    wait_until(
        "the fresh session is deleted after retention",
        Duration::from_secs(15),
        || sessions("fresh").is_empty(),
    )
    .await?;

    // Metrics and health.
    let metrics = cluster.metrics(0);
    for needle in [
        "agentgate_operator_reconciles_total{kind=\"AccessGrant\"}",
        "agentgate_operator_reconcile_duration_seconds_bucket",
        "agentgate_operator_webhook_duration_seconds_count{webhook=\"mutate/accessgrants\",allowed=\"true\"}",
        "agentgate_operator_leader 1",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle}:\n{metrics}"
        );
    }
    wait_until("grants by phase reported", Duration::from_secs(20), || {
        cluster
            .metrics(0)
            .contains("agentgate_operator_access_grants{phase=\"Pending\"}")
    })
    .await?;
    assert_eq!(
        testenv::http::get(cluster.metrics_ports[0], "/healthz")?.status,
        200
    );
    assert_eq!(
        testenv::http::get(cluster.metrics_ports[0], "/readyz")?.status,
        200
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_files_for_cert_manager() -> anyhow::Result<()> {
    // cert-manager writes tls.crt/tls.key into a folder and injects its CA into caBundle.
    let dir = tempfile::tempdir()?;
    let ca = testenv::certs::Ca::new("cert-manager CA")?;
    let cert = ca.server("agentgate-webhook", &[])?;
    std::fs::write(dir.path().join("tls.crt"), &cert.cert)?;
    std::fs::write(dir.path().join("tls.key"), &cert.key)?;
    let cluster = Cluster::start_with_ca_bundle(
        &[
            "--webhook-cert-mode=files",
            &format!("--webhook-cert-dir={}", dir.path().display()),
        ],
        Some(ca.cert_pem()),
    )
    .await?;
    let bob = cluster.client_as("bob").await?;
    request(&bob, "served-by-files", "claude", "10m", json!({})).await?;
    // No self-managed Secret in this mode.
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), OPERATOR_NS);
    assert!(secrets.get_opt("agentgate-webhook-tls").await?.is_none());

    // cert-manager renews with a new CA: new files, new caBundle; the operator reloads.
    let ca2 = testenv::certs::Ca::new("cert-manager CA 2")?;
    let cert2 = ca2.server("agentgate-webhook", &[])?;
    std::fs::write(dir.path().join("tls.key"), &cert2.key)?;
    std::fs::write(dir.path().join("tls.crt"), &cert2.cert)?;
    let bundle = k8s_openapi::ByteString(ca2.cert_pem().into_bytes());
    let m: Api<MutatingWebhookConfiguration> = Api::all(cluster.client.clone());
    let mut mw = m.get("agentgate").await?;
    for w in mw.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = Some(bundle.clone());
    }
    m.replace("agentgate", &PostParams::default(), &mw).await?;
    let v: Api<ValidatingWebhookConfiguration> = Api::all(cluster.client.clone());
    let mut vw = v.get("agentgate").await?;
    for w in vw.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = Some(bundle.clone());
    }
    v.replace("agentgate", &PostParams::default(), &vw).await?;
    // Admission works again once the operator serves the new certificate (reload <= 10 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        match request(
            &bob,
            &format!("after-renewal-{n}"),
            "claude",
            "10m",
            json!({}),
        )
        .await
        {
            Ok(_) => break,
            Err(e) => anyhow::ensure!(Instant::now() < deadline, "never reloaded: {e}"),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        cluster
            .operator_log(0)
            .contains("loaded the webhook certificate")
    );
    Ok(())
}
