//! Sidecar injection into real Pod objects on a real API server (no kubelet runs them: the
//! stored spec is what is checked), and the pod boundary it enforces.

#![allow(clippy::expect_used)]

mod common;

use agentgate_operator::webhook::pod::{hash_key_volume, target_volume};
use common::*;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

fn pod(name: &str, extra_spec: Value) -> Pod {
    let mut spec = json!({
        "serviceAccountName": "claude",
        "containers": [ { "name": "agent", "image": "registry.example/agent:1",
            "env": [ { "name": "PGHOST", "value": "db.internal" } ] } ]
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "labels": { "agentgate.dev/inject": "true" },
            "annotations": { "agentgate.dev/identity": "claude" } },
        "spec": spec
    }))
    .expect("a pod")
}

async fn create(client: &kube::Client, ns: &str, p: &Pod) -> Result<Pod, String> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), p)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_into_real_pods() -> anyhow::Result<()> {
    let cluster = Cluster::start(&[
        "--sidecar-audit-otlp=http://collector.observability:4318/v1/logs",
        "--sidecar-audit-secret=agentgate-audit",
        "--sidecar-audit-credentials=agentgate-audit-credentials",
        "--sidecar-audit-ca=agentgate-audit-ca",
    ])
    .await?;
    let admin = cluster.client.clone();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);

    // Injected: the sidecar first, as a native sidecar.
    let stored = create(&admin, NS, &pod("agent-0", json!({})))
        .await
        .map_err(anyhow::Error::msg)?;
    let spec = stored.spec.clone().expect("spec");
    let inits = spec.init_containers.clone().unwrap_or_default();
    assert_eq!(inits[0].name, "agentgate-sidecar");
    assert_eq!(
        inits[0].image.as_deref(),
        Some("registry.example/agentgate-sidecar:test")
    );
    assert_eq!(inits[0].restart_policy.as_deref(), Some("Always"));
    // The installation's audit sinks, for the sidecar only.
    let sidecar_env = inits[0].env.clone().unwrap_or_default();
    let value = |name: &str| sidecar_env.iter().find(|e| e.name == name).cloned();
    assert_eq!(
        value("AGENTGATE_AUDIT_OTLP").and_then(|e| e.value),
        Some("http://collector.observability:4318/v1/logs".to_owned())
    );
    assert_eq!(
        value("AGENTGATE_AUDIT_DIR").and_then(|e| e.value),
        Some("/var/lib/agentgate/audit".to_owned())
    );
    let pg = value("AGENTGATE_AUDIT_POSTGRES")
        .and_then(|e| e.value_from)
        .and_then(|v| v.secret_key_ref)
        .expect("the PostgreSQL sink from a Secret");
    assert_eq!(
        (pg.name.as_str(), pg.key.as_str()),
        ("agentgate-audit", "postgres")
    );
    // The OTLP and webhook sinks' credentials, from a Secret, each key optional.
    for (name, key) in [
        ("AGENTGATE_AUDIT_WEBHOOK_TOKEN", "webhook-token"),
        ("AGENTGATE_AUDIT_OTLP_HEADERS", "otlp-headers"),
    ] {
        let r = value(name)
            .and_then(|e| e.value_from)
            .and_then(|v| v.secret_key_ref)
            .expect("a sink credential from a Secret");
        assert_eq!(
            (r.name.as_str(), r.key.as_str(), r.optional),
            ("agentgate-audit-credentials", key, Some(true))
        );
    }
    // The pod's name, namespace and UID (its AgentSessions name that pod).
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_UID", "metadata.uid"),
    ] {
        let field = value(name)
            .and_then(|e| e.value_from)
            .and_then(|v| v.field_ref)
            .map(|f| f.field_path);
        assert_eq!(field.as_deref(), Some(path), "{name}");
    }
    // The sinks' CA, from a ConfigMap that must exist, mounted into the sidecar only.
    assert_eq!(
        value("AGENTGATE_AUDIT_CA_FILE").and_then(|e| e.value),
        Some("/var/run/agentgate/audit-ca/ca.crt".to_owned())
    );
    let ca = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "agentgate-audit-ca")
        .and_then(|v| v.config_map.clone())
        .expect("the audit CA volume");
    assert_eq!(
        (ca.name.as_str(), ca.optional),
        ("agentgate-audit-ca", Some(false))
    );
    assert!(
        inits[0]
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "agentgate-audit-ca"
                && m.mount_path == "/var/run/agentgate/audit-ca"
                && m.read_only == Some(true))
    );
    assert!(
        spec.containers
            .iter()
            .flat_map(|c| c.volume_mounts.iter().flatten())
            .all(|m| m.name != "agentgate-audit-ca")
    );
    assert!(
        stored.spec.as_ref().expect("spec").containers[0]
            .env
            .iter()
            .flatten()
            .all(|e| !e.name.starts_with("AGENTGATE_AUDIT")),
        "the agent container gets no audit settings"
    );
    let sc = inits[0].security_context.clone().expect("securityContext");
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    // The sidecar has the agentgate-audience token, the API token and the credentials.
    let sidecar_mounts: Vec<String> = inits[0]
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.clone())
        .collect();
    let orders_volume = target_volume("orders-db")?;
    for v in [
        "agentgate-token",
        "agentgate-api-token",
        "agentgate-spill",
        "agentgate-client",
        orders_volume.as_str(),
    ] {
        assert!(
            sidecar_mounts.contains(&v.to_owned()),
            "sidecar lacks {v}: {sidecar_mounts:?}"
        );
    }
    let volumes = spec.volumes.clone().unwrap_or_default();
    let token = volumes
        .iter()
        .find(|v| v.name == "agentgate-token")
        .expect("token volume");
    let proj = token
        .projected
        .clone()
        .expect("projected")
        .sources
        .unwrap_or_default();
    assert_eq!(
        proj[0]
            .service_account_token
            .as_ref()
            .and_then(|t| t.audience.as_deref()),
        Some("agentgate")
    );
    let creds = volumes
        .iter()
        .find(|v| v.name == orders_volume)
        .expect("creds volume");
    assert_eq!(
        creds.secret.as_ref().and_then(|s| s.secret_name.as_deref()),
        Some("orders-db-credentials")
    );
    // No API token in the pod's automatic mount, and none in the agent container.
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert!(
        !volumes
            .iter()
            .any(|v| v.name.starts_with("kube-api-access-")),
        "{volumes:?}"
    );
    let agent = &spec.containers[0];
    let agent_mounts: Vec<(String, String)> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.clone(), m.mount_path.clone()))
        .collect();
    assert_eq!(
        agent_mounts,
        vec![(
            "agentgate-client".to_owned(),
            "/var/run/agentgate/client".to_owned()
        )]
    );
    assert!(
        agent
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.read_only == Some(true))
    );
    // The agent is pointed at the sidecar (its own PGHOST is overridden).
    let env: std::collections::BTreeMap<String, String> = agent
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    // No raw sockets next to the sidecar's upstream traffic.
    let dropped = agent
        .security_context
        .as_ref()
        .and_then(|sc| sc.capabilities.as_ref())
        .and_then(|c| c.drop.clone())
        .unwrap_or_default();
    assert!(dropped.contains(&"NET_RAW".to_owned()), "{dropped:?}");
    assert_eq!(env["PGHOST"], "127.0.0.1");
    assert_eq!(env["PGPORT"], "15432");
    assert_eq!(env["KUBECONFIG"], "/var/run/agentgate/client/kubeconfig");
    assert!(env["GIT_SSH_COMMAND"].contains("/var/run/agentgate/client/ssh_config"));

    // A second admission changes nothing: the injected spec, submitted again, is stored as is.
    let mut again = stored.clone();
    again.metadata = kube::core::ObjectMeta {
        name: Some("agent-0-again".into()),
        labels: stored.metadata.labels.clone(),
        annotations: stored.metadata.annotations.clone(),
        ..Default::default()
    };
    let stored_again = create(&admin, NS, &again)
        .await
        .map_err(anyhow::Error::msg)?;
    let (a, b) = (
        serde_json::to_value(&stored.spec)?,
        serde_json::to_value(&stored_again.spec)?,
    );
    assert_eq!(a, b, "a second admission changed the spec");
    // An update of an injected pod keeps it as it is.
    let patched = pods
        .patch(
            "agent-0",
            &PatchParams::default(),
            &Patch::Merge(&json!({ "metadata": { "labels": { "x": "y" } } })),
        )
        .await?;
    assert_eq!(serde_json::to_value(&patched.spec)?, a);
    // Nobody swaps the sidecar's image afterwards.
    let e = pods
        .patch("agent-0", &PatchParams::default(), &Patch::Json::<()>(serde_json::from_value(json!([
            { "op": "replace", "path": "/spec/initContainers/0/image", "value": "evil.example/sidecar:1" }
        ]))?))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("agentgate-sidecar is managed by agentgate"),
        "{e}"
    );

    // Opt-out: no label, no injection.
    let mut plain = pod("plain", json!({}));
    plain.metadata.labels = None;
    let stored = create(&admin, NS, &plain)
        .await
        .map_err(anyhow::Error::msg)?;
    assert!(stored.spec.expect("spec").init_containers.is_none());
    let mut off = pod("opted-out", json!({}));
    off.metadata.labels = Some([("agentgate.dev/inject".to_owned(), "false".to_owned())].into());
    let stored = create(&admin, NS, &off).await.map_err(anyhow::Error::msg)?;
    assert!(stored.spec.expect("spec").init_containers.is_none());

    // The operator's own namespace is never injected.
    let stored = create(&admin, OPERATOR_NS, &{
        let mut p = pod("in-operator-ns", json!({ "serviceAccountName": "default" }));
        p.metadata.namespace = Some(OPERATOR_NS.into());
        p
    })
    .await;
    // (the ServiceAccount does not exist there without a controller manager; either way, no sidecar)
    if let Ok(p) = stored {
        assert!(p.spec.expect("spec").init_containers.is_none());
    }

    // The pod boundary: each of these is refused, with the reason.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    secrets
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": { "name": "audit-signing-key", "labels": { "agentgate.dev/sensitive": "true" } },
            "stringData": { "key": "k" } }))?)
        .await?;
    // A long-lived token of the agent's own service account (the sidecar's credential) in
    // a Secret: no controller manager runs here to fill it, and none is needed to refuse it.
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
            "metadata": { "name": "claude-token",
                "annotations": { "kubernetes.io/service-account.name": "claude" } },
            "type": "kubernetes.io/service-account-token" }))?,
        )
        .await?;
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
            "metadata": { "name": "agent-llm-key" }, "stringData": { "key": "k" } }))?,
        )
        .await?;
    let token_mount = |volume: Value| {
        json!({ "volumes": [ volume ],
        "containers": [ { "name": "agent", "image": "a", "volumeMounts": [ { "name": "t", "mountPath": "/t" } ] } ] })
    };
    let creds_volume = json!({ "volumes": [ { "name": "creds", "secret": { "secretName": "orders-db-credentials" } } ],
        "containers": [ { "name": "agent", "image": "a", "volumeMounts": [ { "name": "creds", "mountPath": "/creds" } ] } ] });
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "creds-mount",
            creds_volume,
            "uses Secret orders-db-credentials, the credentials of Target orders-db",
        ),
        (
            "creds-env",
            json!({ "containers": [ { "name": "agent", "image": "a",
            "env": [ { "name": "PGPASSWORD", "valueFrom": { "secretKeyRef": { "name": "orders-db-credentials", "key": "password" } } } ] } ] }),
            "the credentials of Target orders-db",
        ),
        (
            "creds-envfrom",
            json!({ "containers": [ { "name": "agent", "image": "a",
            "envFrom": [ { "secretRef": { "name": "orders-db-credentials" } } ] } ] }),
            "the credentials of Target orders-db",
        ),
        (
            "signing-key",
            json!({ "volumes": [ { "name": "k", "secret": { "secretName": "audit-signing-key" } } ],
            "containers": [ { "name": "agent", "image": "a", "volumeMounts": [ { "name": "k", "mountPath": "/k" } ] } ] }),
            "labelled agentgate.dev/sensitive",
        ),
        (
            "audit-credentials",
            json!({ "containers": [ { "name": "agent", "image": "a",
            "env": [ { "name": "T", "valueFrom": { "secretKeyRef": { "name": "agentgate-audit-credentials", "key": "webhook-token" } } } ] } ] }),
            "the audit sinks' connection or credentials",
        ),
        (
            "sa-token-env",
            json!({ "containers": [ { "name": "agent", "image": "a",
            "env": [ { "name": "T", "valueFrom": { "secretKeyRef": { "name": "claude-token", "key": "token" } } } ] } ] }),
            "uses Secret claude-token, a token of service account claude (kubernetes.io/service-account-token)",
        ),
        (
            "sa-token-envfrom",
            json!({ "containers": [ { "name": "agent", "image": "a",
            "envFrom": [ { "secretRef": { "name": "claude-token" } } ] } ] }),
            "uses Secret claude-token, a token of service account claude",
        ),
        (
            "sa-token-volume",
            token_mount(json!({ "name": "t", "secret": { "secretName": "claude-token" } })),
            "uses Secret claude-token, a token of service account claude",
        ),
        (
            "sa-token-projected",
            token_mount(
                json!({ "name": "t", "projected": { "sources": [ { "secret": { "name": "claude-token" } } ] } }),
            ),
            "uses Secret claude-token, a token of service account claude",
        ),
        (
            "sa-token-init",
            json!({ "initContainers": [ { "name": "prepare", "image": "a",
            "envFrom": [ { "secretRef": { "name": "claude-token" } } ] } ] }),
            "container prepare uses Secret claude-token, a token of service account claude",
        ),
        (
            "missing-secret",
            json!({ "containers": [ { "name": "agent", "image": "a",
            "envFrom": [ { "secretRef": { "name": "created-later", "optional": true } } ] } ] }),
            "uses Secret created-later, which does not exist",
        ),
        (
            "dac-read-search",
            json!({ "containers": [ { "name": "agent", "image": "a",
            "securityContext": { "capabilities": { "add": ["DAC_READ_SEARCH"] } } } ] }),
            "adds capability DAC_READ_SEARCH: agent containers may not; the capabilities the Pod Security Standards baseline allows",
        ),
        (
            "net-raw",
            json!({ "containers": [ { "name": "agent", "image": "a",
            "securityContext": { "capabilities": { "add": ["NET_RAW"] } } } ] }),
            "adds capability NET_RAW",
        ),
        (
            "shared-pid",
            json!({ "shareProcessNamespace": true }),
            "shareProcessNamespace",
        ),
        ("host-net", json!({ "hostNetwork": true }), "hostNetwork"),
        ("host-pid", json!({ "hostPID": true }), "hostPID"),
        (
            "host-path",
            json!({ "volumes": [ { "name": "h", "hostPath": { "path": "/" } } ] }),
            "hostPath",
        ),
        (
            "privileged",
            json!({ "containers": [ { "name": "agent", "image": "a", "securityContext": { "privileged": true } } ] }),
            "container agent is privileged",
        ),
        (
            "ptrace",
            json!({ "containers": [ { "name": "agent", "image": "a",
            "securityContext": { "capabilities": { "add": ["SYS_PTRACE"] } } } ] }),
            "adds capability SYS_PTRACE",
        ),
        (
            "own-token",
            json!({ "volumes": [ { "name": "tok", "projected": { "sources": [ { "serviceAccountToken": { "path": "t" } } ] } } ],
            "containers": [ { "name": "agent", "image": "a", "volumeMounts": [ { "name": "tok", "mountPath": "/t" } ] } ] }),
            "mounts a service-account token",
        ),
        (
            "own-sidecar",
            json!({ "initContainers": [ { "name": "agentgate-sidecar", "image": "evil.example/sidecar:1", "restartPolicy": "Always" } ] }),
            "container agentgate-sidecar is managed by agentgate",
        ),
        (
            "wrong-sa",
            json!({ "serviceAccountName": "other" }),
            "authenticates service account claude",
        ),
    ];
    let mut failures = Vec::new();
    for (name, extra, wanted) in &cases {
        match create(&admin, NS, &pod(name, extra.clone())).await {
            Ok(_) => failures.push(format!("{name}: ACCEPTED")),
            Err(e) if e.contains("agentgate injection refused") && e.contains(wanted) => {}
            Err(e) => failures.push(format!("{name}: wanted {wanted:?}, got {e}")),
        }
    }
    // A pod that names no identity, or an unknown one.
    let mut anonymous = pod("anonymous", json!({}));
    anonymous.metadata.annotations = None;
    match create(&admin, NS, &anonymous).await {
        Err(e) if e.contains("names no AgentIdentity") => {}
        other => failures.push(format!("anonymous: {other:?}")),
    }
    let mut unknown = pod("unknown", json!({}));
    unknown.metadata.annotations =
        Some([("agentgate.dev/identity".to_owned(), "nobody".to_owned())].into());
    match create(&admin, NS, &unknown).await {
        Err(e) if e.contains("AgentIdentity default/nobody does not exist") => {}
        other => failures.push(format!("unknown: {other:?}")),
    }
    // An identity known by OIDC tokens only: its injected sidecar could never tell who the
    // pod is, so no pod runs as it.
    common::apply(&admin, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": { "name": "oidc-only" },
        "spec": { "owner": "team-orders", "authentication": { "oidc": { "issuer": "https://idp.example", "audience": "agentgate", "subject": "robot" } } }
    }))
    .await?;
    let mut oidc = pod("oidc-only", json!({}));
    oidc.metadata.annotations =
        Some([("agentgate.dev/identity".to_owned(), "oidc-only".to_owned())].into());
    match create(&admin, NS, &oidc).await {
        Err(e) if e.contains("names no service account") => {}
        other => failures.push(format!("oidc-only: {other:?}")),
    }
    // An identity of the namespace's default service account: every pod that names no
    // service account would hold its sidecar's credential.
    common::apply(&admin, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": { "name": "defaulted" },
        "spec": { "owner": "team-orders", "authentication": { "serviceAccount": { "name": "default" } } }
    }))
    .await?;
    let mut defaulted = pod("defaulted", json!({ "serviceAccountName": "default" }));
    defaulted.metadata.annotations =
        Some([("agentgate.dev/identity".to_owned(), "defaulted".to_owned())].into());
    match create(&admin, NS, &defaulted).await {
        Err(e) if e.contains("the namespace's default service account") => {}
        other => failures.push(format!("defaulted: {other:?}")),
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // What stays allowed: a Secret of the agent's own, and capabilities of the baseline.
    let fine = pod(
        "own-secret",
        json!({ "containers": [ { "name": "agent", "image": "a",
            "securityContext": { "capabilities": { "add": ["NET_BIND_SERVICE", "CAP_CHOWN"], "drop": ["SYS_ADMIN"] } },
            "env": [ { "name": "K", "valueFrom": { "secretKeyRef": { "name": "agent-llm-key", "key": "key" } } } ] } ] }),
    );
    let stored = create(&admin, NS, &fine)
        .await
        .map_err(anyhow::Error::msg)?;
    let dropped = stored.spec.expect("spec").containers[0]
        .security_context
        .clone()
        .and_then(|sc| sc.capabilities)
        .and_then(|c| c.drop)
        .unwrap_or_default();
    assert_eq!(dropped, ["SYS_ADMIN", "NET_RAW"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_and_keys_with_dots_in_their_names_get_valid_volumes() -> anyhow::Result<()> {
    let cluster = Cluster::start(&[]).await?;
    let admin = cluster.client.clone();
    // Dots are allowed in Target and Secret names (DNS subdomains), not in volume names
    // (RFC 1123 labels); long names must not be cut into one another either.
    let long = format!("reports.{}", "x".repeat(70));
    for name in ["reports.v2", long.as_str()] {
        common::apply(&admin, json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "Target", "metadata": { "name": name },
            "spec": { "protocol": "Postgres", "postgres": { "host": "reports", "database": "reports",
                "credentials": { "name": format!("{name}.credentials") } } }
        }))
        .await?;
    }
    common::apply(&admin, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "MaskPolicy", "metadata": { "name": "ids" },
        "spec": { "rules": [ { "name": "customer-ids", "columns": ["public.customers.id"], "action": "Hash" } ],
            "hashKey": { "name": "mask.hash.key", "key": "key" } }
    }))
    .await?;
    let stored = create(&admin, NS, &pod("dotted", json!({})))
        .await
        .map_err(|e| anyhow::anyhow!("a pod with Targets named with dots was refused: {e}"))?;
    let spec = stored.spec.expect("spec");
    let sidecar = &spec.init_containers.as_ref().expect("the sidecar")[0];
    let mounts: Vec<(String, String)> = sidecar
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.clone(), m.mount_path.clone()))
        .collect();
    // The folders keep the real names; the volumes are named by digest.
    for (volume, path) in [
        (
            target_volume("reports.v2")?,
            "/var/run/agentgate/targets/reports.v2".to_owned(),
        ),
        (
            target_volume(&long)?,
            format!("/var/run/agentgate/targets/{long}"),
        ),
        (
            target_volume("orders-db")?,
            "/var/run/agentgate/targets/orders-db".to_owned(),
        ),
        (
            hash_key_volume("mask.hash.key")?,
            "/var/run/agentgate/targets/mask-keys/mask.hash.key".to_owned(),
        ),
    ] {
        assert!(
            mounts.contains(&(volume.clone(), path.clone())),
            "{volume} at {path}: {mounts:?}"
        );
    }
    let secret_of = |volume: &str| {
        spec.volumes
            .iter()
            .flatten()
            .find(|v| v.name == volume)
            .and_then(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.clone())
    };
    assert_eq!(
        secret_of(&target_volume("reports.v2")?).as_deref(),
        Some("reports.v2.credentials")
    );
    assert_eq!(
        secret_of(&target_volume(&long)?),
        Some(format!("{long}.credentials"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_containers_cannot_reach_into_the_sidecar() -> anyhow::Result<()> {
    let cluster = Cluster::start(&[]).await?;
    let admin = cluster.client.clone();
    // Volumes no agent container mounts (allowed at creation: nothing reads them) are still
    // out of a debug container's reach.
    create(
        &admin,
        NS,
        &pod(
            "debugged",
            json!({ "volumes": [
                { "name": "creds", "secret": { "secretName": "orders-db-credentials" } },
                { "name": "tok", "projected": { "sources": [ { "serviceAccountToken": { "path": "t" } } ] } } ] }),
        ),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    Api::<Secret>::namespaced(admin.clone(), NS)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
            "metadata": { "name": "signing-key", "labels": { "agentgate.dev/sensitive": "true" } },
            "stringData": { "key": "k" } }))?,
        )
        .await?;
    common::apply(&admin, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "MaskPolicy", "metadata": { "name": "ids" },
        "spec": { "rules": [ { "name": "customer-ids", "columns": ["public.customers.id"], "action": "Hash" } ],
            "hashKey": { "name": "mask-hash-key", "key": "key" } }
    }))
    .await?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let add = |name: &str, extra: Value| {
        let mut c = json!({ "name": name, "image": "busybox" });
        if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                o.insert(k.clone(), v.clone());
            }
        }
        json!({ "spec": { "ephemeralContainers": [c] } })
    };
    let pp = PatchParams::default();
    let attempt = |patch: Value| {
        let pods = pods.clone();
        let pp = pp.clone();
        async move {
            pods.patch_subresource(
                "ephemeralcontainers",
                "debugged",
                &pp,
                &Patch::Strategic(patch),
            )
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "ACCEPTED".into())
        }
    };
    let e = attempt(add(
        "peek",
        json!({ "targetContainerName": "agentgate-sidecar" }),
    ))
    .await;
    assert!(e.contains("targets agentgate-sidecar"), "{e}");
    let e = attempt(add(
        "root",
        json!({ "securityContext": { "privileged": true } }),
    ))
    .await;
    assert!(e.contains("is privileged"), "{e}");
    let e = attempt(add(
        "steal",
        json!({ "volumeMounts": [ { "name": "agentgate-token", "mountPath": "/t" } ] }),
    ))
    .await;
    assert!(
        e.contains("mounts agentgate's volume agentgate-token"),
        "{e}"
    );
    // The client files and the PostgreSQL socket: read-only, never writable.
    let e = attempt(add(
        "plant",
        json!({ "volumeMounts": [ { "name": "agentgate-client", "mountPath": "/c" } ] }),
    ))
    .await;
    assert!(
        e.contains("ephemeral container plant mounts agentgate's volume agentgate-client writable"),
        "{e}"
    );
    // What an agent container may not use, a debug container may not either: a Target's
    // credentials by env, envFrom or a pod volume, a token volume, the sidecar's volumes,
    // a hash key, a Secret labelled sensitive.
    Api::<Secret>::namespaced(admin.clone(), NS)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
            "metadata": { "name": "claude-token",
                "annotations": { "kubernetes.io/service-account.name": "claude" } },
            "type": "kubernetes.io/service-account-token" }))?,
        )
        .await?;
    let secret_env = |secret: &str| json!({ "env": [ { "name": "S", "valueFrom": { "secretKeyRef": { "name": secret, "key": "k" } } } ] });
    let orders_volume = target_volume("orders-db")?;
    let creds_sidecar_volume =
        format!("mounts agentgate's volume {orders_volume}: only the sidecar may");
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "creds-env",
            secret_env("orders-db-credentials"),
            "ephemeral container creds-env uses Secret orders-db-credentials, the credentials of Target orders-db",
        ),
        (
            "creds-envfrom",
            json!({ "envFrom": [ { "secretRef": { "name": "orders-db-credentials" } } ] }),
            "the credentials of Target orders-db",
        ),
        (
            "creds-volume",
            json!({ "volumeMounts": [ { "name": "creds", "mountPath": "/c", "readOnly": true } ] }),
            "the credentials of Target orders-db",
        ),
        (
            "creds-sidecar-volume",
            json!({ "volumeMounts": [ { "name": orders_volume, "mountPath": "/c", "readOnly": true } ] }),
            creds_sidecar_volume.as_str(),
        ),
        (
            "sa-token",
            secret_env("claude-token"),
            "ephemeral container sa-token uses Secret claude-token, a token of service account claude",
        ),
        (
            "missing",
            secret_env("nowhere"),
            "uses Secret nowhere, which does not exist",
        ),
        (
            "dac",
            json!({ "securityContext": { "capabilities": { "add": ["DAC_READ_SEARCH"] } } }),
            "adds capability DAC_READ_SEARCH: debug containers may not",
        ),
        (
            "token-volume",
            json!({ "volumeMounts": [ { "name": "tok", "mountPath": "/t", "readOnly": true } ] }),
            "mounts a service-account token (volume tok)",
        ),
        (
            "api-token",
            json!({ "volumeMounts": [ { "name": "agentgate-api-token", "mountPath": "/t", "readOnly": true } ] }),
            "mounts agentgate's volume agentgate-api-token",
        ),
        (
            "hash-key",
            secret_env("mask-hash-key"),
            "a MaskPolicy's hash key",
        ),
        (
            "sensitive",
            secret_env("signing-key"),
            "labelled agentgate.dev/sensitive",
        ),
        (
            "capable",
            json!({ "securityContext": { "capabilities": { "add": ["SYS_PTRACE"] } } }),
            "adds capability SYS_PTRACE: debug containers may not",
        ),
    ];
    let mut failures = Vec::new();
    for (name, extra, wanted) in cases {
        let e = attempt(add(name, extra)).await;
        if !(e.contains("agentgate injection refused") && e.contains(wanted)) {
            failures.push(format!("{name}: wanted {wanted:?}, got {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing of that was added.
    let names: Vec<String> = pods
        .get("debugged")
        .await?
        .spec
        .and_then(|s| s.ephemeral_containers)
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert!(names.is_empty(), "{names:?}");
    let e = attempt(add(
        "read",
        json!({ "volumeMounts": [ { "name": "agentgate-client", "mountPath": "/c", "readOnly": true } ] }),
    ))
    .await;
    assert_eq!(e, "ACCEPTED");
    // An ordinary debug container next to the agent is fine, also with a Secret of its own
    // (which exists).
    Api::<Secret>::namespaced(admin.clone(), NS)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
            "metadata": { "name": "debug-tools" }, "stringData": { "token": "t" } }))?,
        )
        .await?;
    let e = attempt(add(
        "look",
        json!({ "targetContainerName": "agent", "env": [ { "name": "T",
            "valueFrom": { "secretKeyRef": { "name": "debug-tools", "key": "token" } } } ] }),
    ))
    .await;
    assert_eq!(e, "ACCEPTED");
    // Those admitted before are not checked again: a Target created since that names their
    // Secret does not make the pod impossible to debug.
    common::apply(&admin, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "Target", "metadata": { "name": "tools" },
        "spec": { "protocol": "Postgres", "postgres": { "host": "tools", "database": "tools",
            "credentials": { "name": "debug-tools" } } }
    }))
    .await?;
    let e = attempt(add("look-again", json!({}))).await;
    assert_eq!(e, "ACCEPTED");
    // Debug containers lose NET_RAW as agent containers do.
    let debugged = pods.get("debugged").await?;
    let ephemeral = debugged
        .spec
        .and_then(|s| s.ephemeral_containers)
        .unwrap_or_default();
    assert_eq!(ephemeral.len(), 3, "{ephemeral:?}");
    for c in &ephemeral {
        let dropped = c
            .security_context
            .as_ref()
            .and_then(|sc| sc.capabilities.as_ref())
            .and_then(|caps| caps.drop.clone())
            .unwrap_or_default();
        assert_eq!(dropped, ["NET_RAW"], "{}", c.name);
    }
    // The label that has agentgate see the pod stays: without it, a debug container added
    // later would not be checked.
    for removal in [json!(null), json!("false")] {
        let e = pods
            .patch(
                "debugged",
                &pp,
                &Patch::Merge(
                    &json!({ "metadata": { "labels": { "agentgate.dev/inject": removal } } }),
                ),
            )
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "ACCEPTED".into());
        assert!(
            e.contains("the pod is injected: it keeps the label agentgate.dev/inject=true"),
            "{e}"
        );
    }
    // An init container of the agent's may not write there either.
    let writer = pod(
        "init-writes",
        json!({ "initContainers": [ { "name": "prepare", "image": "busybox",
            "volumeMounts": [ { "name": "agentgate-client", "mountPath": "/c" } ] } ] }),
    );
    match create(&admin, NS, &writer).await {
        Err(e)
            if e.contains(
                "container prepare mounts agentgate's volume agentgate-client writable",
            ) => {}
        other => panic!("an init container writing the client volume: {other:?}"),
    }
    // Nor may an agent container mount a volume the pod names like the sidecar's, which
    // injection would fill with a Target's credentials.
    let squatter = pod(
        "pre-named",
        json!({ "volumes": [ { "name": orders_volume, "emptyDir": {} } ],
            "containers": [ { "name": "agent", "image": "a",
                "volumeMounts": [ { "name": orders_volume, "mountPath": "/c" } ] } ] }),
    );
    match create(&admin, NS, &squatter).await {
        Err(e) if e.contains(&format!("container agent {creds_sidecar_volume}")) => {}
        other => panic!("an agent container mounting a pre-named sidecar volume: {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_keys_and_a_separate_ca_reach_the_sidecar_only() -> anyhow::Result<()> {
    let cluster = Cluster::start(&[]).await?;
    let admin = cluster.client.clone();
    common::apply(&admin, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "Target", "metadata": { "name": "reports-db" },
        "spec": { "protocol": "Postgres", "postgres": { "host": "reports", "database": "reports",
            "tls": { "mode": "VerifyFull", "ca": { "name": "reports-ca", "key": "ca.crt" } },
            "credentials": { "name": "reports-credentials" } } }
    }))
    .await?;
    common::apply(&admin, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "MaskPolicy", "metadata": { "name": "ids" },
        "spec": { "rules": [ { "name": "customer-ids", "columns": ["public.customers.id"], "action": "Hash" } ],
            "hashKey": { "name": "mask-hash-key", "key": "key" } }
    }))
    .await?;
    let stored = create(&admin, NS, &pod("agent-keys", json!({})))
        .await
        .map_err(anyhow::Error::msg)?;
    let spec = stored.spec.expect("spec");
    let volumes = spec.volumes.unwrap_or_default();
    // The hash key: its own volume, under the sidecar's targets folder.
    let key_volume = hash_key_volume("mask-hash-key")?;
    let key = volumes
        .iter()
        .find(|v| v.name == key_volume)
        .expect("the hash key's volume");
    assert_eq!(
        key.secret.as_ref().and_then(|s| s.secret_name.as_deref()),
        Some("mask-hash-key")
    );
    // The CA from another Secret, projected into the Target's folder with its credentials.
    let reports_volume = target_volume("reports-db")?;
    let reports = volumes
        .iter()
        .find(|v| v.name == reports_volume)
        .expect("the Target's volume");
    let sources = reports
        .projected
        .as_ref()
        .and_then(|p| p.sources.clone())
        .expect("a projected volume");
    let names: Vec<&str> = sources
        .iter()
        .filter_map(|s| s.secret.as_ref().map(|s| s.name.as_str()))
        .collect();
    assert_eq!(names, ["reports-credentials", "reports-ca"]);
    let inits = spec.init_containers.unwrap_or_default();
    let mounts: Vec<(String, String)> = inits[0]
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.clone(), m.mount_path.clone()))
        .collect();
    assert!(
        mounts.contains(&(
            key_volume.clone(),
            "/var/run/agentgate/targets/mask-keys/mask-hash-key".into()
        )),
        "{mounts:?}"
    );
    // Neither reaches an agent container, and an agent that asks for the key is refused.
    assert!(
        spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != key_volume && m.name != reports_volume)
    );
    let err = create(
        &admin,
        NS,
        &pod(
            "agent-steals-key",
            json!({ "containers": [ { "name": "agent", "image": "registry.example/agent:1",
                "env": [ { "name": "K", "valueFrom": { "secretKeyRef": { "name": "mask-hash-key", "key": "key" } } } ] } ] }),
        ),
    )
    .await
    .expect_err("an agent reading the hash key");
    assert!(err.contains("a MaskPolicy's hash key"), "{err}");
    Ok(())
}
