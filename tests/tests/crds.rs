//! The agentgate.dev API on a real kube-apiserver: the generated CRDs install, every kind
//! round-trips (status too), invalid objects are refused with messages that name the field,
//! decisions stay decided, and `kubectl explain` reads the doc comments.

use agentgate_crds::{AccessGrant, AgentIdentity, AgentSession, MaskPolicy, Target};
use kube::Resource;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use testenv::{KubeEnv, Parts, TestEnv};

const NS: &str = "default";

fn api_for<K: Resource<DynamicType = ()>>(
    client: &kube::Client,
) -> (Api<DynamicObject>, ApiResource) {
    let ar = ApiResource::erase::<K>(&());
    (Api::namespaced_with(client.clone(), NS, &ar), ar)
}

fn object(ar: &ApiResource, name: &str, spec: Value) -> anyhow::Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": ar.api_version,
        "kind": ar.kind,
        "metadata": { "name": name },
        "spec": spec,
    }))?)
}

fn valid_specs() -> Vec<(&'static str, Value)> {
    vec![
        (
            "Target",
            json!({
                "protocol": "Postgres",
                "postgres": {
                    "host": "db.internal", "database": "app",
                    "tls": { "mode": "VerifyFull", "ca": { "name": "db-ca", "key": "ca.crt" } },
                    "credentials": { "name": "db-credentials" }
                },
                "guardrails": [
                    { "name": "no-drop", "matches": ["DROP TABLE"], "action": "Block" },
                    { "name": "writes-need-approval", "operations": ["Write"], "action": "RequireApproval" }
                ]
            }),
        ),
        (
            "AgentIdentity",
            json!({
                "owner": "team-payments",
                "authentication": {
                    "serviceAccount": { "name": "claude" },
                    "oidc": { "issuer": "https://idp.example.com/realms/agents", "audience": "agentgate", "subject": "claude" }
                },
                "baseline": [ { "target": "orders-db", "scope": { "operations": ["Read"] } } ],
                "approvers": { "groups": ["agentgate-approvers"] },
                "maxGrantDuration": "2h"
            }),
        ),
        (
            "AccessGrant",
            json!({
                "identity": "claude", "target": "orders-db",
                "scope": { "operations": ["Write"], "tables": ["public.orders"] },
                "duration": "30m",
                "reason": "fix the stuck order 4711"
            }),
        ),
        (
            "MaskPolicy",
            json!({
                "targets": ["orders-db"],
                "rules": [
                    { "name": "emails", "columns": ["*.email"], "detectors": ["Email"], "action": "Redact" },
                    { "name": "cards", "detectors": ["CardNumber"], "action": "Partial", "keepLast": 4 },
                    { "name": "customer-ids", "columns": ["public.customers.id"], "action": "Hash" },
                    { "name": "secrets", "kubernetes": [ { "kind": "Secret", "paths": ["data.*"] } ], "action": "SetNull" }
                ],
                "hashKey": { "name": "mask-key", "key": "key" }
            }),
        ),
        (
            "AgentSession",
            json!({
                "identity": "claude", "target": "orders-db", "protocol": "Postgres",
                "sessionId": "s-0001", "startedAt": "2026-11-22T10:00:00Z", "pod": "agent-0"
            }),
        ),
    ]
}

async fn setup() -> anyhow::Result<(TestEnv, kube::Client)> {
    let env = TestEnv::start_async(Parts {
        kube: true,
        ..Default::default()
    })
    .await?;
    let client = env.kube()?.client().await?;
    testenv::install_crds(&client).await?;
    Ok((env, client))
}

fn api(client: &kube::Client, kind: &str) -> (Api<DynamicObject>, ApiResource) {
    match kind {
        "Target" => api_for::<Target>(client),
        "AgentIdentity" => api_for::<AgentIdentity>(client),
        "AccessGrant" => api_for::<AccessGrant>(client),
        "MaskPolicy" => api_for::<MaskPolicy>(client),
        _ => api_for::<AgentSession>(client),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_install_and_every_kind_round_trips() -> anyhow::Result<()> {
    let (env, client) = setup().await?;
    let kube = env.kube()?;

    // Served, with short names and the `agentgate` category.
    let resources =
        kube.kubectl_run(&["api-resources", "--api-group=agentgate.dev", "-o", "wide"])?;
    for (plural, short) in [
        ("agentidentities", "agid"),
        ("accessgrants", "agrant"),
        ("maskpolicies", "mpol"),
        ("targets", "agtarget"),
        ("agentsessions", "agsess"),
    ] {
        let line = resources
            .lines()
            .find(|l| l.starts_with(plural))
            .unwrap_or_else(|| panic!("{plural} not served:\n{resources}"));
        assert!(
            line.contains(short) && line.contains("agentgate") && line.contains("true"),
            "{line}"
        );
    }

    for (kind, spec) in valid_specs() {
        let (api, ar) = api(&client, kind);
        let name = format!("{}-1", kind.to_lowercase());
        // Create and read back: defaults are applied by the API server.
        api.create(&PostParams::default(), &object(&ar, &name, spec.clone())?)
            .await?;
        let got = api.get(&name).await?;
        assert!(
            is_subset(&spec, &got.data["spec"]),
            "{kind}: sent {spec}\nstored {}",
            got.data["spec"]
        );
        // Update the spec.
        let labels = json!({ "metadata": { "labels": { "team": "payments" } } });
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&labels))
            .await?;
        // Status goes through the status subresource only.
        let status = json!({ "status": { "conditions": [ {
            "type": "Ready", "status": "True", "reason": "Tested", "message": "set by the test",
            "lastTransitionTime": "2026-11-22T10:00:00Z" } ] } });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        let got = api.get(&name).await?;
        assert_eq!(
            got.data["status"]["conditions"][0]["reason"], "Tested",
            "{kind}"
        );
        assert_eq!(got.metadata.labels.unwrap_or_default()["team"], "payments");
        // A status sent to the main resource is ignored.
        let sneaky =
            json!({ "status": { "conditions": [] }, "metadata": { "annotations": { "x": "y" } } });
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&sneaky))
            .await?;
        let got = api.get(&name).await?;
        assert_eq!(
            got.data["status"]["conditions"][0]["reason"], "Tested",
            "{kind} status via main resource"
        );
    }

    // Defaults from the types.
    let (grants, _) = api(&client, "AccessGrant");
    let g = grants.get("accessgrant-1").await?;
    assert_eq!(g.data["spec"]["pendingTTL"], "1h");
    let (targets, _) = api(&client, "Target");
    let t = targets.get("target-1").await?;
    assert_eq!(t.data["spec"]["postgres"]["port"], 5432);
    assert_eq!(t.data["spec"]["holdTimeout"], "0s");

    // The typed client reads them too.
    let typed: Api<AccessGrant> = Api::namespaced(client.clone(), NS);
    let g = typed.get("accessgrant-1").await?;
    assert_eq!(g.spec.reason, "fix the stuck order 4711");
    assert_eq!(
        g.spec.scope.operations,
        vec![agentgate_crds::OperationClass::Write]
    );

    // `kubectl get agentgate` lists every kind; printer columns are there.
    let all = kube.kubectl_run(&["get", "agentgate"])?;
    for name in [
        "accessgrant-1",
        "agentidentity-1",
        "maskpolicy-1",
        "target-1",
        "agentsession-1",
    ] {
        assert!(
            all.contains(name),
            "{name} missing from `kubectl get agentgate`:\n{all}"
        );
    }
    let table = kube.kubectl_run(&["get", "accessgrants"])?;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "IDENTITY", "TARGET", "EXPIRES", "AGE"],
        "{table}"
    );
    let table = kube.kubectl_run(&["get", "agentsessions"])?;
    assert!(
        table.starts_with("NAME") && table.contains("IDENTITY") && table.contains("REQUESTS"),
        "{table}"
    );

    // Delete every kind.
    for (kind, _) in valid_specs() {
        let (api, _) = api(&client, kind);
        let name = format!("{}-1", kind.to_lowercase());
        api.delete(&name, &DeleteParams::default()).await?;
        assert!(api.get_opt(&name).await?.is_none(), "{kind} still there");
    }
    Ok(())
}

async fn refused(client: &kube::Client, kind: &str, spec: Value) -> String {
    let (api, ar) = api(client, kind);
    let obj = match object(&ar, "invalid", spec) {
        Ok(o) => o,
        Err(e) => return format!("could not build: {e}"),
    };
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => {
            let _ = api.delete("invalid", &DeleteParams::default()).await;
            "ACCEPTED".into()
        }
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_are_refused_naming_the_field() -> anyhow::Result<()> {
    let (_env, client) = setup().await?;
    let grant = |patch: Value| {
        let mut spec = json!({ "identity": "claude", "target": "orders-db",
            "scope": { "operations": ["Write"] }, "reason": "because" });
        merge(&mut spec, patch);
        spec
    };
    let identity = |auth: Value| json!({ "owner": "team", "authentication": auth });
    let mask = |rule: Value| json!({ "rules": [rule] });
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "AccessGrant",
            json!({ "identity": "claude", "target": "db", "scope": { "operations": ["Read"] } }),
            &["spec.reason", "Required value"],
        ),
        (
            "AccessGrant",
            grant(json!({ "duration": "forever" })),
            &["spec.duration", "should match"],
        ),
        (
            "AccessGrant",
            grant(json!({ "duration": "200h" })),
            &["spec.duration", "between 10s and 168h"],
        ),
        (
            "AccessGrant",
            grant(json!({ "duration": "5s" })),
            &["spec.duration", "between 10s and 168h"],
        ),
        (
            "AccessGrant",
            grant(json!({ "scope": { "operations": [] } })),
            &["spec.scope.operations", "at least 1"],
        ),
        (
            "AccessGrant",
            grant(json!({ "scope": { "operations": ["Everything"] } })),
            &["spec.scope.operations[0]", "Unsupported value"],
        ),
        (
            "AccessGrant",
            grant(json!({ "scope": { "operations": ["Read", "Read"] } })),
            &["spec.scope.operations", "must not repeat"],
        ),
        (
            "AccessGrant",
            grant(json!({ "identity": "Claude_The_Agent" })),
            &["spec.identity", "should match"],
        ),
        (
            "AccessGrant",
            grant(json!({ "reason": "" })),
            &["spec.reason", "at least 1"],
        ),
        (
            "AccessGrant",
            grant(json!({ "pendingTTL": "1s" })),
            &["spec.pendingTTL", "between 10s and 168h"],
        ),
        (
            "AccessGrant",
            grant(json!({ "decision": { "verdict": "Maybe" } })),
            &["spec.decision.verdict", "Unsupported value"],
        ),
        (
            "AgentIdentity",
            identity(json!({})),
            &["spec.authentication", "needs serviceAccount or oidc"],
        ),
        (
            "AgentIdentity",
            identity(
                json!({ "oidc": { "issuer": "http://idp", "audience": "a", "subject": "s" } }),
            ),
            &["spec.authentication.oidc.issuer", "should match"],
        ),
        (
            "AgentIdentity",
            identity(json!({ "oidc": { "issuer": "https://idp.example.com", "audience": "a" } })),
            &[
                "spec.authentication.oidc",
                "needs a subject or at least one claim",
            ],
        ),
        (
            "AgentIdentity",
            json!({ "authentication": { "serviceAccount": { "name": "a" } } }),
            &["spec.owner", "Required value"],
        ),
        (
            "AgentIdentity",
            json!({ "owner": "t", "authentication": { "serviceAccount": { "name": "a" } }, "maxGrantDuration": "720h" }),
            &["spec.maxGrantDuration", "between 1m and 168h"],
        ),
        (
            "MaskPolicy",
            mask(json!({ "name": "nothing", "action": "Redact" })),
            &["spec.rules[0]", "must match something"],
        ),
        (
            "MaskPolicy",
            mask(json!({ "name": "r", "detectors": ["Email"], "action": "Redact", "keepLast": 4 })),
            &[
                "spec.rules[0]",
                "keepLast applies only to the Partial action",
            ],
        ),
        (
            "MaskPolicy",
            mask(json!({ "name": "r", "detectors": ["Horoscope"], "action": "Redact" })),
            &["spec.rules[0].detectors[0]", "Unsupported value"],
        ),
        (
            "MaskPolicy",
            mask(json!({ "name": "r", "columns": ["*.ssn"], "action": "Hash" })),
            &["spec", "spec.hashKey is required"],
        ),
        (
            "MaskPolicy",
            json!({ "rules": [] }),
            &["spec.rules", "at least 1"],
        ),
        (
            "MaskPolicy",
            mask(
                json!({ "name": "r", "detectors": ["Email"], "action": "Partial", "keepLast": 0 }),
            ),
            &["spec.rules[0].keepLast", "greater than or equal to 1"],
        ),
        (
            "Target",
            json!({ "protocol": "Postgres" }),
            &[
                "spec",
                "spec.postgres is required exactly when protocol is Postgres",
            ],
        ),
        (
            "Target",
            json!({ "protocol": "Postgres", "postgres": { "host": "h", "database": "d", "port": 70000,
            "credentials": { "name": "c" } } }),
            &["spec.postgres.port", "less than or equal to 65535"],
        ),
        (
            "Target",
            json!({ "protocol": "Kubernetes", "kubernetes": { "server": "https://api.example:6443",
            "tls": { "mode": "VerifyCA" } } }),
            &["spec.kubernetes.tls.mode must be VerifyFull"],
        ),
        (
            "Target",
            json!({ "protocol": "Telnet" }),
            &["spec.protocol", "Unsupported value"],
        ),
        (
            "Target",
            json!({ "protocol": "SSH", "ssh": { "host": "h", "user": "u", "credentials": { "name": "c" } } }),
            &["spec.ssh.knownHosts", "Required value"],
        ),
        (
            "Target",
            json!({ "protocol": "Postgres", "postgres": { "host": "h", "database": "d", "credentials": { "name": "c" } },
            "guardrails": [ { "name": "g", "action": "Block" } ] }),
            &["spec.guardrails[0]", "must match something"],
        ),
        (
            "AgentSession",
            json!({ "identity": "a", "target": "t", "protocol": "Postgres", "startedAt": "2026-11-22T10:00:00Z" }),
            &["spec.sessionId", "Required value"],
        ),
    ];
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for (kind, spec, wanted) in &cases {
        let msg = refused(&client, kind, spec.clone()).await;
        if !wanted.iter().all(|w| msg.contains(w)) {
            failures.push(format!(
                "{kind} {spec}\n  wanted {wanted:?}\n  got    {msg}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_and_requests_are_immutable() -> anyhow::Result<()> {
    let (_env, client) = setup().await?;
    let (grants, ar) = api(&client, "AccessGrant");
    let spec = json!({ "identity": "claude", "target": "orders-db",
        "scope": { "operations": ["Write"] }, "reason": "fix order 4711" });
    grants
        .create(&PostParams::default(), &object(&ar, "g1", spec)?)
        .await?;
    let pp = PatchParams::default();
    let patch = |v: Value| Patch::Merge(v);

    // A decision can be made once ...
    grants
        .patch(
            "g1",
            &pp,
            &patch(json!({ "spec": { "decision": { "verdict": "Approve", "reason": "ok" } } })),
        )
        .await?;
    // ... and never flipped, edited or removed.
    for (change, wanted) in [
        (
            json!({ "spec": { "decision": { "verdict": "Deny" } } }),
            "spec.decision is immutable once made",
        ),
        (
            json!({ "spec": { "decision": { "reason": "changed my mind" } } }),
            "spec.decision is immutable once made",
        ),
        (
            json!({ "spec": { "decision": null } }),
            "spec.decision is immutable once made",
        ),
        (
            json!({ "spec": { "identity": "someone-else" } }),
            "spec.identity is immutable",
        ),
        (
            json!({ "spec": { "target": "prod-db" } }),
            "spec.target is immutable",
        ),
        (
            json!({ "spec": { "scope": { "operations": ["Admin"] } } }),
            "spec.scope is immutable",
        ),
        (
            json!({ "spec": { "duration": "2h" } }),
            "spec.duration is immutable",
        ),
        (
            json!({ "spec": { "reason": "another reason" } }),
            "spec.reason is immutable",
        ),
        (
            json!({ "spec": { "command": { "text": "DROP TABLE x", "fingerprint": "ab" } } }),
            "spec.command is immutable",
        ),
    ] {
        let err = grants
            .patch("g1", &pp, &patch(change.clone()))
            .await
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains(wanted)),
            "{change} should be refused with {wanted:?}, got {err:?}"
        );
    }
    // Revocation is a separate, one-time field.
    grants
        .patch(
            "g1",
            &pp,
            &patch(json!({ "spec": { "revocation": { "reason": "done early" } } })),
        )
        .await?;
    let err = grants
        .patch(
            "g1",
            &pp,
            &patch(json!({ "spec": { "revocation": { "reason": "edited" } } })),
        )
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("spec.revocation is immutable once set")),
        "{err:?}"
    );

    // A denied grant cannot be revoked.
    let spec = json!({ "identity": "claude", "target": "orders-db",
        "scope": { "operations": ["Write"] }, "reason": "r", "decision": { "verdict": "Deny" } });
    grants
        .create(&PostParams::default(), &object(&ar, "g2", spec)?)
        .await?;
    let err = grants
        .patch(
            "g2",
            &pp,
            &patch(json!({ "spec": { "revocation": { "reason": "x" } } })),
        )
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("a denied grant cannot be revoked")),
        "{err:?}"
    );

    // A Target's protocol is fixed.
    let (targets, ar) = api(&client, "Target");
    let t = json!({ "protocol": "SSH", "ssh": { "host": "h", "user": "u", "knownHosts": "h ssh-ed25519 AAAA",
        "credentials": { "name": "c" } } });
    targets
        .create(&PostParams::default(), &object(&ar, "t1", t)?)
        .await?;
    let err = targets
        .patch(
            "t1",
            &pp,
            &patch(json!({ "spec": { "protocol": "Postgres", "ssh": null,
            "postgres": { "host": "h", "database": "d", "credentials": { "name": "c" } } } })),
        )
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("spec.protocol is immutable")),
        "{err:?}"
    );
    Ok(())
}

/// `kubectl explain`, retried while the API server publishes the new schemas (OpenAPI v3 is
/// aggregated a few seconds after a CRD is Established).
fn explain(kube: &KubeEnv, what: &str) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match kube.kubectl_run(&["explain", what]) {
            Ok(out) => return Ok(out),
            Err(e)
                if std::time::Instant::now() < deadline
                    && e.to_string().contains("couldn't find resource") =>
            {
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether every field of `sent` is in `stored` with the same value (the API server adds
/// defaults).
fn is_subset(sent: &Value, stored: &Value) -> bool {
    match (sent, stored) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .all(|(k, v)| b.get(k).is_some_and(|w| is_subset(v, w))),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(v, w)| is_subset(v, w))
        }
        (a, b) => a == b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_explain_reads_the_doc_comments() -> anyhow::Result<()> {
    let (env, _client) = setup().await?;
    let kube = env.kube()?;
    let out = explain(kube, "accessgrant")?;
    assert!(
        out.contains("Just-in-time access for one AgentIdentity to one Target"),
        "{out}"
    );
    let out = explain(kube, "accessgrant.spec")?;
    for text in [
        "Why the access is needed: shown to approvers and kept in the audit trail",
        "How long the access lasts once approved",
        "The approver's decision",
        "kubectl patch accessgrant NAME --type merge",
        "Ends an approved (or still pending) grant early",
    ] {
        assert!(
            out.contains(text),
            "explain accessgrant.spec lacks {text:?}:\n{out}"
        );
    }
    let out = explain(kube, "accessgrant.spec.decision.verdict")?;
    assert!(
        out.contains("`Approve` or `Deny`") && out.contains("Approve") && out.contains("Deny"),
        "{out}"
    );
    let out = explain(kube, "agentidentity.spec.authentication.oidc.issuer")?;
    assert!(
        out.contains("exactly as in the token's `iss` claim"),
        "{out}"
    );
    let out = explain(kube, "maskpolicy.spec.rules.action")?;
    assert!(out.contains("What to do with a match"), "{out}");
    let out = explain(kube, "target.spec.ssh.knownHosts")?;
    assert!(out.contains("never trusts on first use"), "{out}");
    let out = explain(kube, "agentsession.status.chainHead")?;
    assert!(out.contains("head of the session's audit chain"), "{out}");
    Ok(())
}

fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}
