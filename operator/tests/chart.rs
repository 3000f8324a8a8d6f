//! The Helm chart (`charts/agentgate`) against the real API server: `helm lint`, the
//! values schema, the rendered webhooks equal to what the operator expects, a server-side
//! dry run of everything it renders, `helm install`, the operator running with exactly the
//! chart's RBAC (its ServiceAccount's token) through a grant's whole life — requested by an
//! agent bound to the chart's sidecar role, approved by a person bound to its approver role —
//! then `helm upgrade` (caBundle and grants survive) and `helm uninstall` (the CRDs and
//! the records stay).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agentgate_crds::GrantPhase;
use agentgate_operator::webhook::pod::hash_key_volume;
use agentgate_operator::webhook::{Endpoint, configurations};
use common::{NS, OPERATOR_NS, operator_config, patch_spec, repo_path, request, wait_phase};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use testenv::process::{Proc, Spec, free_port};
use testenv::{Parts, TestEnv};

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run")
}

fn ok(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Every document of a rendered chart, as JSON.
fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_installs_upgrades_and_its_rbac_is_all_the_operator_needs() -> anyhow::Result<()>
{
    let env = TestEnv::start_async(Parts {
        kube: true,
        ..Default::default()
    })
    .await?;
    let kube = env.kube()?;
    let client = kube.client().await?;
    let helm_bin = env.bins.helm()?.to_path_buf();
    let kubeconfig = kube.kubeconfig();
    let helm = |args: &[&str]| {
        let mut cmd = Command::new(&helm_bin);
        cmd.env("KUBECONFIG", &kubeconfig)
            .env("HELM_CACHE_HOME", env.dir().join("helm/cache"))
            .env("HELM_CONFIG_HOME", env.dir().join("helm/config"))
            .env("HELM_DATA_HOME", env.dir().join("helm/data"))
            .args(args);
        run(&mut cmd)
    };
    let chart = repo_path("charts/agentgate");
    let chart = chart.to_str().expect("utf-8 path");
    let webhook_port = free_port()?;
    let url = format!("https://127.0.0.1:{webhook_port}");
    let kube_version = testenv::kubernetes_version();
    let values = [
        "--set".to_owned(),
        format!("webhook.url={url}"),
        "--set".into(),
        format!("defaults.namespaces={{{NS}}}"),
        "--set".into(),
        "targets[0].name=orders-db,targets[0].protocol=Postgres,targets[0].postgres.host=db,targets[0].postgres.database=orders,targets[0].postgres.credentials.name=orders-db-credentials".into(),
    ];
    let values: Vec<&str> = values.iter().map(String::as_str).collect();

    // Lint, strictly; the schema refuses a mistyped value and names it.
    ok("helm lint", helm(&["lint", "--strict", chart]));
    let bad = helm(&["lint", chart, "--set", "operator.replicas=two"]);
    assert!(!bad.status.success());
    let text =
        String::from_utf8_lossy(&bad.stdout).into_owned() + &String::from_utf8_lossy(&bad.stderr);
    assert!(text.contains("/operator/replicas"), "{text}");
    let bad = helm(&["lint", chart, "--set", "webhook.certMode=magic"]);
    assert!(!bad.status.success());
    // Durations are Go durations, as the operator reads them: no days.
    let bad = helm(&["lint", chart, "--set", "retention.sessions=30d"]);
    assert!(!bad.status.success());
    let text =
        String::from_utf8_lossy(&bad.stdout).into_owned() + &String::from_utf8_lossy(&bad.stderr);
    assert!(text.contains("/retention/sessions"), "{text}");
    // Only service accounts can be automation approvers.
    let bad = helm(&[
        "lint",
        chart,
        "--set",
        "approvals.automationApprovers={agentgate:agent:claude}",
    ]);
    assert!(!bad.status.success());

    // What it renders: the webhooks are exactly those the operator's code describes.
    let rendered = ok(
        "helm template",
        helm(
            &[
                &["template", "agentgate", chart, "-n", OPERATOR_NS],
                &["--kube-version", &kube_version, "--include-crds"][..],
                &values[..],
            ]
            .concat(),
        ),
    );
    let docs = documents(&rendered);
    let config = operator_config(webhook_port, 0, &[]);
    let (mutating, validating) = configurations(&config, &Endpoint::Url(url.clone()));
    let m = kind(&docs, "MutatingWebhookConfiguration");
    let v = kind(&docs, "ValidatingWebhookConfiguration");
    assert_eq!(m.len(), 1);
    assert_eq!(v.len(), 1);
    assert_eq!(m[0]["webhooks"], serde_json::to_value(&mutating.webhooks)?);
    assert_eq!(
        v[0]["webhooks"],
        serde_json::to_value(&validating.webhooks)?
    );
    assert_eq!(kind(&docs, "CustomResourceDefinition").len(), 5);
    let deploy = kind(&docs, "Deployment");
    assert_eq!(deploy[0]["spec"]["replicas"], 2);
    let container = &deploy[0]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        deploy[0]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    for k in ["PodDisruptionBudget", "NetworkPolicy", "ServiceAccount"] {
        assert_eq!(kind(&docs, k).len(), 1, "{k}");
    }

    // A server-side dry run of everything but the hooks (which need the CRDs to exist).
    kube.kubectl_run(&["create", "namespace", OPERATOR_NS])?;
    let plain = ok(
        "helm template (no hooks)",
        helm(&[
            "template",
            "agentgate",
            chart,
            "-n",
            OPERATOR_NS,
            "--kube-version",
            &kube_version,
        ]),
    );
    let path = env.dir().join("rendered.yaml");
    std::fs::write(&path, &plain)?;
    let out = kube
        .kubectl()
        .args(["apply", "--dry-run=server", "-f"])
        .arg(&path)
        .output()?;
    let dry = ok("kubectl apply --dry-run=server", out);
    assert!(
        dry.contains("deployment.apps/agentgate-operator created (server dry run)"),
        "{dry}"
    );

    // helm install: the CRDs, RBAC, webhooks, and (post-install) the defaults.
    let installed = ok(
        "helm install",
        helm(
            &[
                &["install", "agentgate", chart, "-n", OPERATOR_NS][..],
                &values[..],
            ]
            .concat(),
        ),
    );
    assert!(installed.contains("STATUS: deployed"), "{installed}");
    let out = kube.kubectl_run(&["get", "maskpolicy,target", "-n", NS, "-o", "name"])?;
    assert!(
        out.contains("maskpolicy.agentgate.dev/agentgate-default"),
        "{out}"
    );
    assert!(out.contains("target.agentgate.dev/orders-db"), "{out}");
    let guardrails = kube.kubectl_run(&[
        "get",
        "target",
        "orders-db",
        "-n",
        NS,
        "-o",
        "jsonpath={.spec.guardrails[0].name}",
    ])?;
    assert_eq!(guardrails.trim(), "no-drops");

    // The operator runs as the chart's ServiceAccount, with nothing but the chart's RBAC.
    let token =
        testenv::kube_env::sa_token(&client, OPERATOR_NS, "agentgate-operator", None).await?;
    let operator_kubeconfig = kube.kubeconfig_with_token("agentgate-operator", &token)?;
    let metrics = free_port()?;
    let mut spec = Spec::new("operator-chart", env!("CARGO_BIN_EXE_agentgate-operator"))
        .args([
            format!("--namespace={OPERATOR_NS}"),
            format!("--webhook-addr=127.0.0.1:{webhook_port}"),
            "--webhook-hosts=127.0.0.1".into(),
            format!("--metrics-addr=127.0.0.1:{metrics}"),
            "--pod-name=operator-chart".into(),
            "--session-check-interval=1s".into(),
        ])
        .env("KUBECONFIG", operator_kubeconfig.display().to_string())
        .env("RUST_LOG", "info,kube_runtime=warn");
    spec.stop_signal = "INT";
    let mut operator = Proc::start(spec, &env.dir().join("logs"))?;
    testenv::process::wait_until(&mut operator, Duration::from_secs(60), "/readyz", || {
        testenv::http::get(metrics, "/readyz").is_ok_and(|r| r.status == 200)
    })?;

    // An agent (its ServiceAccount bound to the chart's sidecar role) and an approver (bound
    // to the chart's approver role).
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({ "metadata": { "name": "claude" } }))?,
    )
    .await?;
    common::apply(&client, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": { "name": "claude" },
        "spec": { "owner": "team-orders", "authentication": { "serviceAccount": { "name": "claude" } },
            "maxGrantDuration": "1h" }
    }))
    .await?;
    kube.kubectl_run(&[
        "create",
        "rolebinding",
        "claude-sidecar",
        "-n",
        NS,
        "--clusterrole=agentgate-sidecar",
        &format!("--serviceaccount={NS}:claude"),
    ])?;
    kube.kubectl_run(&[
        "create",
        "clusterrolebinding",
        "bob-approver",
        "--clusterrole=agentgate-approver",
        "--user=bob",
    ])?;
    let agent_token = testenv::kube_env::sa_token(&client, NS, "claude", None).await?;
    let agent = kube
        .client_from(&kube.kubeconfig_with_token("claude", &agent_token)?)
        .await?;
    let bob = kube.client_as("bob").await?;

    // The webhooks answer once the operator has written caBundle.
    let deadline = Instant::now() + Duration::from_secs(60);
    let grant = loop {
        match request(&agent, "fix-order-4711", "claude", "10m", json!({})).await {
            Ok(g) => break g,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the agent's grant request was never admitted: {e}\n{}",
                    operator.log_tail(30)
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert_eq!(grant.spec.identity, "claude");
    // The agent cannot approve itself; bob can.
    let refused = patch_spec(
        &agent,
        "fix-order-4711",
        json!({ "decision": { "verdict": "Approve" } }),
    )
    .await
    .expect_err("an agent approving its own grant");
    assert!(
        refused.to_string().contains("forbidden")
            || refused.to_string().contains("no-self-approval"),
        "{refused}"
    );
    patch_spec(
        &bob,
        "fix-order-4711",
        json!({ "decision": { "verdict": "Approve" } }),
    )
    .await?;
    wait_phase(
        &client,
        "fix-order-4711",
        GrantPhase::Active,
        Duration::from_secs(20),
    )
    .await?;
    // Status is written on the other kinds too, and nothing was forbidden.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = kube.kubectl_run(&[
            "get",
            "agentidentity",
            "claude",
            "-n",
            NS,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])?;
        if ready.trim() == "True" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "identity never Ready: {ready}\n{}",
            operator.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(operator.log_path())?;
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the chart's RBAC fell short:\n{log}"
    );

    // The walkthrough applies, in order, on top of the chart (with its webhooks answering),
    // and its agent's pod is admitted with the sidecar injected under Pod Security
    // `restricted`; the GitOps overlay builds and passes a server-side dry run.
    let walkthrough = repo_path("examples/walkthrough");
    let mut files: Vec<_> = std::fs::read_dir(&walkthrough)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 8, "{files:?}");
    for file in &files {
        let out = kube.kubectl().arg("apply").arg("-f").arg(file).output()?;
        ok(&format!("kubectl apply -f {}", file.display()), out);
    }
    let deployment = std::fs::read_to_string(walkthrough.join("06-agent-pod.yaml"))?;
    let deployment = documents(&deployment)
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("06 has the agent's Deployment");
    let template = &deployment["spec"]["template"];
    let mut meta = template["metadata"].clone();
    meta["name"] = json!("coding-agent-0");
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"].clone()
    }))?;
    let admitted = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), "agents")
        .create(&PostParams::default(), &pod)
        .await
        .map_err(|e| anyhow::anyhow!("the walkthrough's agent pod was refused: {e}"))?;
    let created = admitted
        .metadata
        .creation_timestamp
        .clone()
        .expect("a creation time");
    let spec = admitted.spec.expect("a pod spec");
    let names: Vec<String> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .map(|c| c.name.clone())
        .collect();
    assert!(
        names.iter().any(|n| n == "agentgate-sidecar"),
        "not injected: {names:?}"
    );
    // The MaskPolicy's hash key reaches the sidecar (its Hash rule works in the pod).
    let key_volume = hash_key_volume("mask-hash-key")?;
    assert!(
        spec.volumes.iter().flatten().any(|v| v.name == key_volume),
        "the hash key is not mounted"
    );

    // A session whose sidecar died without closing it is marked Ended, saying why: its pod
    // is gone, or its sidecar restarted since the session began. One whose sidecar still
    // runs stays Active. (No kubelet here: the pod's status is written as a kubelet would.)
    // (a second after the pod was created, in whole seconds as Kubernetes writes times)
    // Sessions name their pod `namespace/name` and its UID, as the sidecar writes them.
    let started = created.0 + jiff::SignedDuration::from_secs(1);
    let uid = admitted.metadata.uid.clone().expect("a pod uid");
    for (name, pod, pod_uid) in [
        ("alive", "agents/coding-agent-0", uid.as_str()),
        ("gone", "agents/coding-agent-9", "9"),
        ("earlier-pod", "agents/coding-agent-0", "an-earlier-uid"),
    ] {
        let session: agentgate_crds::AgentSession = serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentSession",
            "metadata": { "name": name, "namespace": "agents" },
            "spec": { "identity": "coding-agent", "target": "orders-db", "protocol": "Postgres",
                "pod": pod, "podUid": pod_uid, "sessionId": name, "startedAt": started.to_string() } }))?;
        Api::<agentgate_crds::AgentSession>::namespaced(client.clone(), "agents")
            .create(&PostParams::default(), &session)
            .await?;
        kube.kubectl_run(&[
            "patch",
            "agentsession",
            name,
            "-n",
            "agents",
            "--subresource=status",
            "--type=merge",
            "-p",
            &json!({ "status": { "phase": "Active",
                "lastActivity": (started + jiff::SignedDuration::from_secs(5)).to_string() } })
            .to_string(),
        ])?;
    }
    // The kubelet reports the sidecar (a native sidecar: an init container) started at `at`.
    let sidecar_started = |at: jiff::Timestamp| {
        let status = json!({ "status": { "initContainerStatuses": [{
            "name": "agentgate-sidecar", "image": "agentgate", "imageID": "", "ready": true,
            "restartCount": 0,
            "state": { "running": { "startedAt": at.round(jiff::Unit::Second).unwrap_or(at).to_string() } } }] } })
        .to_string();
        kube.kubectl_run(&[
            "patch",
            "pod",
            "coding-agent-0",
            "-n",
            "agents",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ])
    };
    sidecar_started(created.0)?;
    let session = |name: &str| {
        kube.kubectl_run(&[
            "get",
            "agentsession",
            name,
            "-n",
            "agents",
            "-o",
            "jsonpath={.status.phase}|{.status.endReason}|{.status.endedAt}",
        ])
        .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !session("gone").starts_with("Ended|") {
        assert!(
            Instant::now() < deadline,
            "the session of a pod that is gone stays {}\n{}",
            session("gone"),
            operator.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gone = session("gone");
    assert!(
        gone.contains(
            "pod coding-agent-9 no longer exists: its sidecar ended without closing the session"
        ),
        "{gone}"
    );
    // It ended at its last sign of life.
    assert!(
        gone.ends_with(&(started + jiff::SignedDuration::from_secs(5)).to_string()),
        "{gone}"
    );
    // A session of an earlier pod of the same name (another UID) ended too.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !session("earlier-pod").starts_with("Ended|") {
        assert!(Instant::now() < deadline, "{}", session("earlier-pod"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        session("earlier-pod").contains("pod coding-agent-0 was deleted and created again"),
        "{}",
        session("earlier-pod")
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        session("alive").starts_with("Active|"),
        "{}",
        session("alive")
    );
    sidecar_started(jiff::Timestamp::now())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !session("alive").starts_with("Ended|") {
        assert!(
            Instant::now() < deadline,
            "the session of a restarted sidecar stays {}\n{}",
            session("alive"),
            operator.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        session("alive").contains("the sidecar in pod coding-agent-0 restarted at"),
        "{}",
        session("alive")
    );
    let log = std::fs::read_to_string(operator.log_path())?;
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the chart's RBAC fell short:\n{log}"
    );

    // A sidecar writes only its own pod's AgentSessions (the chart's ValidatingAdmissionPolicy):
    // with its service-account token bound to coding-agent-0, as the kubelet gives it.
    let bound: k8s_openapi::api::authentication::v1::TokenRequest = serde_json::from_value(
        json!({ "spec": { "audiences": [], "expirationSeconds": 3600,
            "boundObjectRef": { "kind": "Pod", "apiVersion": "v1", "name": "coding-agent-0", "uid": uid } } }),
    )?;
    let token = Api::<ServiceAccount>::namespaced(client.clone(), "agents")
        .create_token_request("claude-orders", &PostParams::default(), &bound)
        .await?
        .status
        .and_then(|s| s.token)
        .unwrap_or_default();
    let sidecar = kube
        .client_from(&kube.kubeconfig_with_token("coding-agent-0", &token)?)
        .await?;
    let sessions = Api::<agentgate_crds::AgentSession>::namespaced(sidecar, "agents");
    let session = |name: &str, pod: &str| -> anyhow::Result<agentgate_crds::AgentSession> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentSession",
            "metadata": { "name": name, "namespace": "agents" },
            "spec": { "identity": "claude-orders", "target": "orders-db", "protocol": "Postgres",
                "pod": pod, "podUid": uid, "sessionId": name, "startedAt": jiff::Timestamp::now().to_string() } }))?)
    };
    sessions
        .create(
            &PostParams::default(),
            &session("own", "agents/coding-agent-0")?,
        )
        .await
        .map_err(|e| anyhow::anyhow!("a sidecar could not write its own session: {e}"))?;
    let e = sessions
        .create(
            &PostParams::default(),
            &session("another", "agents/coding-agent-1")?,
        )
        .await
        .expect_err("a session of another pod");
    assert!(
        e.to_string()
            .contains("pod agents/coding-agent-0 may write only its own AgentSessions"),
        "{e}"
    );
    let e = sessions
        .patch_status(
            "gone",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({ "status": { "phase": "Active" } })),
        )
        .await
        .expect_err("rewriting another pod's session");
    assert!(
        e.to_string()
            .contains("may write only its own AgentSessions"),
        "{e}"
    );
    // A pod that runs as an AgentIdentity's service account without the sidecar (no
    // opt-in label, so no webhook sees it) is refused by the chart's other policy; a pod of
    // another service account is not its concern.
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), "agents");
    let plain = |name: &str, sa: &str| -> anyhow::Result<k8s_openapi::api::core::v1::Pod> {
        Ok(serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": { "serviceAccountName": sa,
                "securityContext": { "runAsNonRoot": true, "seccompProfile": { "type": "RuntimeDefault" } },
                "containers": [ { "name": "c", "image": "registry.example/tool:1",
                    "securityContext": { "allowPrivilegeEscalation": false, "capabilities": { "drop": ["ALL"] } } } ] } }))?)
    };
    let e = pods
        .create(
            &PostParams::default(),
            &plain("no-sidecar", "claude-orders")?,
        )
        .await
        .expect_err("a pod as the identity's service account without the sidecar");
    assert!(
        e.to_string().contains(
            "this pod runs as service account claude-orders, the credential of AgentIdentity claude-orders's sidecar, without the sidecar"
        ),
        "{e}"
    );
    Api::<ServiceAccount>::namespaced(client.clone(), "agents")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "tool" } }))?,
        )
        .await?;
    pods.create(&PostParams::default(), &plain("other-tool", "tool")?)
        .await
        .map_err(|e| anyhow::anyhow!("a pod of another service account was refused: {e}"))?;
    // The label is not enough: a pod the webhook never injected (here its configuration is
    // changed to select nothing) is refused, and so is an injected pod losing its label.
    let selector = kube.kubectl_run(&[
        "get",
        "mutatingwebhookconfiguration",
        "agentgate",
        "-o",
        "jsonpath={.webhooks[1].name}",
    ])?;
    assert_eq!(selector.trim(), "pods.inject.agentgate.dev");
    let select = |selector: Value| {
        kube.kubectl_run(&[
            "patch",
            "mutatingwebhookconfiguration",
            "agentgate",
            "--type=json",
            "-p",
            &json!([{ "op": "replace", "path": "/webhooks/1/objectSelector", "value": selector }])
                .to_string(),
        ])
    };
    select(json!({ "matchLabels": { "agentgate.test/never": "x" } }))?;
    let mut uninjected = plain("uninjected", "claude-orders")?;
    uninjected.metadata.labels =
        Some([("agentgate.dev/inject".to_owned(), "true".to_owned())].into());
    uninjected.metadata.annotations = Some(
        [(
            "agentgate.dev/identity".to_owned(),
            "claude-orders".to_owned(),
        )]
        .into(),
    );
    // (Dry runs until the API server has the changed configuration.)
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let e = loop {
        match pods.create(&dry, &uninjected).await {
            Err(e) => break e.to_string(),
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(_) => panic!("the webhook configuration never changed"),
        }
    };
    assert!(
        e.contains("without the sidecar: agentgate did not inject it"),
        "{e}"
    );
    let e = pods
        .patch(
            "coding-agent-0",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({ "metadata": { "labels": { "agentgate.dev/inject": null } } }),
            ),
        )
        .await
        .expect_err("an injected pod losing its label, unseen by the webhook");
    assert!(
        e.to_string()
            .contains("add the label agentgate.dev/inject=true"),
        "{e}"
    );
    select(json!({ "matchExpressions": [
        { "key": "agentgate.dev/inject", "operator": "In", "values": ["true"] } ] }))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = pods.create(&dry, &uninjected).await {
        assert!(
            Instant::now() < deadline,
            "the webhook configuration was never restored: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Other updates of an injected pod go through.
    pods.patch(
        "coding-agent-0",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({ "metadata": { "labels": { "team": "orders" } } })),
    )
    .await
    .map_err(|e| anyhow::anyhow!("an ordinary update of an injected pod was refused: {e}"))?;
    // A namespace the webhook excludes never injects: a pod there asking for it is refused.
    let mut excluded = plain("excluded", "agentgate-operator")?;
    excluded.metadata.namespace = Some(OPERATOR_NS.into());
    excluded.metadata.labels =
        Some([("agentgate.dev/inject".to_owned(), "true".to_owned())].into());
    let e = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), OPERATOR_NS)
        .create(&PostParams::default(), &excluded)
        .await
        .expect_err("a pod asking for injection where there is none");
    assert!(
        e.to_string().contains(&format!(
            "pods in namespace {OPERATOR_NS} are never injected"
        )) && e.to_string().contains("would run without the sidecar"),
        "{e}"
    );
    // An identity's approvers are people: groups of everyone or of machines, and service
    // accounts or agents as users, are refused when written.
    for (approvers, wanted) in [
        (
            json!({ "groups": ["orders-oncall", "system:authenticated"] }),
            "spec.approvers.groups lists system:authenticated, which takes in every user",
        ),
        (
            json!({ "groups": ["system:serviceaccounts:agents", "agentgate:agents"] }),
            "spec.approvers.groups lists system:serviceaccounts:agents, agentgate:agents, a group of service accounts, agents or nodes, not people",
        ),
        (
            json!({ "users": ["alice", "system:serviceaccount:agents:bot"] }),
            "spec.approvers.users lists system:serviceaccount:agents:bot, not a person",
        ),
    ] {
        let e = common::apply(&client, json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": { "name": "machine-approved" },
            "spec": { "owner": "team-orders", "authentication": { "serviceAccount": { "name": "tool" } },
                "approvers": approvers }
        }))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| "ACCEPTED".into());
        assert!(e.contains(wanted), "{approvers}: {e}");
    }
    let built = kube
        .kubectl()
        .args(["kustomize"])
        .arg(repo_path("examples/gitops/overlays/production"))
        .output()?;
    let built = ok(
        "kubectl kustomize examples/gitops/overlays/production",
        built,
    );
    let path = env.dir().join("gitops.yaml");
    std::fs::write(&path, built)?;
    let out = kube
        .kubectl()
        .args(["apply", "--dry-run=server", "-f"])
        .arg(&path)
        .output()?;
    ok("the GitOps overlay, server dry run", out);

    // helm upgrade: a changed value lands; caBundle and the grant survive.
    let upgraded = ok(
        "helm upgrade",
        helm(
            &[
                &["upgrade", "agentgate", chart, "-n", OPERATOR_NS][..],
                &values[..],
                &[
                    "--set",
                    "operator.replicas=3",
                    "--set",
                    "retention.sessions=24h",
                ][..],
            ]
            .concat(),
        ),
    );
    assert!(upgraded.contains("REVISION: 2"), "{upgraded}");
    let d: Deployment = Api::namespaced(client.clone(), OPERATOR_NS)
        .get("agentgate-operator")
        .await?;
    let spec = d.spec.expect("spec");
    assert_eq!(spec.replicas, Some(3));
    let env_vars = serde_json::to_value(&spec.template.spec.expect("pod").containers[0].env)?;
    assert!(
        env_vars
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["name"] == "AGENTGATE_SESSION_RETENTION" && e["value"] == "24h"),
        "{env_vars}"
    );
    request(&agent, "after-upgrade", "claude", "10m", json!({}))
        .await
        .map_err(|e| anyhow::anyhow!("the webhooks stopped answering after the upgrade: {e}"))?;
    wait_phase(
        &client,
        "fix-order-4711",
        GrantPhase::Active,
        Duration::from_secs(5),
    )
    .await?;

    // helm uninstall: the operator's objects go, the CRDs and the grants stay.
    ok(
        "helm uninstall",
        helm(&["uninstall", "agentgate", "-n", OPERATOR_NS]),
    );
    operator.stop(Duration::from_secs(5));
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(crds.get_opt("accessgrants.agentgate.dev").await?.is_some());
    let grants = kube.kubectl_run(&["get", "accessgrants", "-n", NS, "-o", "name"])?;
    assert!(grants.contains("fix-order-4711"), "{grants}");
    let webhooks = kube.kubectl_run(&["get", "mutatingwebhookconfigurations", "-o", "name"])?;
    assert!(!webhooks.contains("agentgate"), "{webhooks}");
    Ok(())
}
