//! The grant lifecycle and approvals, against a real API server and the real operator binary.

mod common;

use std::time::Duration;

use agentgate_crds::GrantPhase;
use common::*;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_lifecycle_in_real_time() -> anyhow::Result<()> {
    let cluster = Cluster::start(&[]).await?;
    let admin = cluster.client.clone();
    let alice = cluster.client_as("alice").await?;
    let bob = cluster.client_as("bob").await?;

    // bob asks; the request is Pending and says how to approve it.
    let g = request(&bob, "write-1", "claude", "10s", json!({})).await?;
    assert_eq!(
        g.spec.requested_by.as_ref().map(|u| u.username.as_str()),
        Some("bob")
    );
    let (g, _) = wait_phase(
        &admin,
        "write-1",
        GrantPhase::Pending,
        Duration::from_secs(10),
    )
    .await?;
    let msg = g.status.and_then(|s| s.message).unwrap_or_default();
    assert!(msg.contains("kubectl patch accessgrant write-1"), "{msg}");

    // alice approves, typing someone else's name: the webhook records alice.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let g = patch_spec(
        &alice,
        "write-1",
        json!({ "decision": { "verdict": "Approve", "reason": "go",
        "decidedBy": { "username": "the-ceo" } } }),
    )
    .await?;
    let d = g.spec.decision.clone().expect("decision");
    assert_eq!(
        d.decided_by.as_ref().map(|u| u.username.as_str()),
        Some("alice")
    );
    assert!(
        d.decided_by
            .as_ref()
            .is_some_and(|u| u.groups.contains(&"agentgate-approvers".to_owned()))
    );
    let (g, _) = wait_phase(
        &admin,
        "write-1",
        GrantPhase::Active,
        Duration::from_secs(5),
    )
    .await?;
    let st = g.status.clone().expect("status");
    // The clock starts at approval, not creation.
    let created = g.metadata.creation_timestamp.clone().expect("created").0;
    let approved = st.approved_at.clone().expect("approvedAt").0;
    let expires = st.expires_at.clone().expect("expiresAt").0;
    assert!(approved > created, "approved {approved} created {created}");
    assert_eq!(expires.duration_since(approved).as_secs(), 10);
    assert_eq!(
        st.approved_by.as_ref().map(|u| u.username.as_str()),
        Some("alice")
    );

    // Expiry takes effect within 1 s of expiresAt.
    let (g, seen) = wait_phase(
        &admin,
        "write-1",
        GrantPhase::Expired,
        Duration::from_secs(20),
    )
    .await?;
    let lag = seen.duration_since(expires).as_secs_f64();
    assert!(
        (0.0..1.0).contains(&lag),
        "expired {lag:.3}s after expiresAt"
    );
    assert_eq!(
        g.status.and_then(|s| s.ended_at).map(|t| t.0),
        Some(expires)
    );

    // Nobody decides: it expires after its pending TTL, which nobody can extend meanwhile.
    request(
        &bob,
        "ignored",
        "claude",
        "10m",
        json!({ "pendingTTL": "10s" }),
    )
    .await?;
    for client in [&bob, &admin] {
        let e = patch_spec(client, "ignored", json!({ "pendingTTL": "168h" }))
            .await
            .err()
            .map(err_text)
            .unwrap_or_else(|| "ACCEPTED".into());
        assert!(e.contains("spec.pendingTTL is immutable"), "{e}");
    }
    let (g, _) = wait_phase(
        &admin,
        "ignored",
        GrantPhase::Expired,
        Duration::from_secs(20),
    )
    .await?;
    let c = &g.status.expect("status").conditions[0];
    assert_eq!(c.reason, "PendingTimeout");
    // A decision after that is refused: the request stays expired.
    let e = patch_spec(
        &alice,
        "ignored",
        json!({ "decision": { "verdict": "Approve" } }),
    )
    .await
    .err()
    .map(err_text)
    .unwrap_or_else(|| "ACCEPTED".into());
    assert!(
        e.contains("rule decided-in-time")
            && e.contains("the request expired at")
            && e.contains("ask the agent to request again"),
        "{e}"
    );
    let g = get(&admin, "ignored").await?;
    assert!(g.spec.decision.is_none());
    assert_eq!(phase(&g), Some(GrantPhase::Expired));

    // Denied, with who and why.
    request(&bob, "denied", "claude", "10m", json!({})).await?;
    patch_spec(
        &alice,
        "denied",
        json!({ "decision": { "verdict": "Deny", "reason": "use the replica" } }),
    )
    .await?;
    let (g, _) = wait_phase(&admin, "denied", GrantPhase::Denied, Duration::from_secs(5)).await?;
    let st = g.status.expect("status");
    assert_eq!(st.ended_by.map(|u| u.username), Some("alice".into()));
    assert_eq!(
        st.message.as_deref(),
        Some("denied by alice: use the replica")
    );

    // Revoked by an approver at once, and status says who and when.
    request(&bob, "revoked", "claude", "30m", json!({})).await?;
    patch_spec(
        &alice,
        "revoked",
        json!({ "decision": { "verdict": "Approve" } }),
    )
    .await?;
    wait_phase(
        &admin,
        "revoked",
        GrantPhase::Active,
        Duration::from_secs(5),
    )
    .await?;
    patch_spec(
        &alice,
        "revoked",
        json!({ "revocation": { "reason": "incident over" } }),
    )
    .await?;
    let (g, _) = wait_phase(
        &admin,
        "revoked",
        GrantPhase::Revoked,
        Duration::from_secs(2),
    )
    .await?;
    let st = g.status.expect("status");
    assert_eq!(st.ended_by.map(|u| u.username), Some("alice".into()));
    assert!(st.ended_at.is_some());
    assert_eq!(
        st.message.as_deref(),
        Some("revoked by alice: incident over")
    );

    // Deleting an active grant revokes it (the finalizer records it) and then it is gone.
    request(&bob, "deleted", "claude", "30m", json!({})).await?;
    patch_spec(
        &alice,
        "deleted",
        json!({ "decision": { "verdict": "Approve" } }),
    )
    .await?;
    wait_phase(
        &admin,
        "deleted",
        GrantPhase::Active,
        Duration::from_secs(5),
    )
    .await?;
    let api: Api<agentgate_crds::AccessGrant> = Api::namespaced(admin.clone(), NS);
    api.delete("deleted", &DeleteParams::default()).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while api.get_opt("deleted").await?.is_some() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the deleted grant is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        cluster
            .operator_log(0)
            .contains("the AccessGrant was deleted"),
        "{}",
        cluster.operator_log(0)
    );

    // Deleting an identity revokes its grants (the grant controller re-evaluates them on the
    // deletion, though it ignores the identity's status updates).
    apply(&admin, json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": { "name": "gemini" },
        "spec": { "owner": "team-orders", "authentication": { "serviceAccount": { "name": "gemini" } },
            "approvers": { "groups": ["agentgate-approvers"] }, "maxGrantDuration": "1h" } }))
    .await?;
    request(&bob, "before-delete", "gemini", "30m", json!({})).await?;
    patch_spec(
        &alice,
        "before-delete",
        json!({ "decision": { "verdict": "Approve" } }),
    )
    .await?;
    wait_phase(
        &admin,
        "before-delete",
        GrantPhase::Active,
        Duration::from_secs(5),
    )
    .await?;
    Api::<agentgate_crds::AgentIdentity>::namespaced(admin.clone(), NS)
        .delete("gemini", &DeleteParams::default())
        .await?;
    let (g, _) = wait_phase(
        &admin,
        "before-delete",
        GrantPhase::Revoked,
        Duration::from_secs(5),
    )
    .await?;
    let message = g.status.and_then(|s| s.message).unwrap_or_default();
    assert!(
        message.contains("AgentIdentity gemini does not exist"),
        "{message}"
    );

    // Disabling the identity revokes its grants.
    request(&bob, "before-disable", "claude", "30m", json!({})).await?;
    patch_spec(
        &alice,
        "before-disable",
        json!({ "decision": { "verdict": "Approve" } }),
    )
    .await?;
    wait_phase(
        &admin,
        "before-disable",
        GrantPhase::Active,
        Duration::from_secs(5),
    )
    .await?;
    // The identity reports its active grants.
    let ids: Api<agentgate_crds::AgentIdentity> = Api::namespaced(admin.clone(), NS);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let id = ids.get("claude").await?;
        let st = id.status.unwrap_or_default();
        if st.active_grants == vec!["before-disable".to_owned()] {
            assert_eq!(st.conditions[0].type_, "Ready");
            assert_eq!(st.conditions[0].status, "True", "{:?}", st.conditions);
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "activeGrants never listed the grant: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    apply(&admin, json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": { "name": "claude" },
        "spec": { "owner": "team-orders", "authentication": { "serviceAccount": { "name": "claude" } },
            "approvers": { "groups": ["agentgate-approvers"] }, "maxGrantDuration": "1h", "disabled": true } }))
    .await?;
    let (g, _) = wait_phase(
        &admin,
        "before-disable",
        GrantPhase::Revoked,
        Duration::from_secs(3),
    )
    .await?;
    assert_eq!(
        g.status.expect("status").conditions[0].reason,
        "IdentityDisabled"
    );
    // A disabled identity gets no new grants.
    let err = request(&bob, "after-disable", "claude", "30m", json!({}))
        .await
        .err()
        .map(err_text);
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("rule identity-enabled")),
        "{err:?}"
    );

    // Events tell the story.
    let events = cluster.kube().kubectl_run(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=revoked",
        "-o",
        "json",
    ])?;
    assert!(
        events.contains("Revoked") && events.contains("revoked by alice"),
        "{events}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_are_authenticated_and_authorized() -> anyhow::Result<()> {
    // One automation account the installation lets decide (the chart's
    // approvals.automationApprovers).
    let cluster = Cluster::start(&[&format!(
        "--automation-approvers=system:serviceaccount:{NS}:release-bot"
    )])
    .await?;
    let admin = cluster.client.clone();
    let alice = cluster.client_as("alice").await?;
    let bob = cluster.client_as("bob").await?;
    let mallory = cluster.client_as("mallory").await?;
    let agent = cluster.agent_client().await?;

    let refused = |r: Result<agentgate_crds::AccessGrant, kube::Error>| {
        r.err().map(err_text).unwrap_or_else(|| "ACCEPTED".into())
    };

    // The agent asks for itself: fine, stamped as its service account.
    let g = request(&agent, "agent-ask", "claude", "10m", json!({})).await?;
    assert_eq!(
        g.spec.requested_by.map(|u| u.username),
        Some("system:serviceaccount:default:claude".into())
    );
    // ... but not for another identity.
    let e = refused(request(&agent, "agent-other", "gpt", "10m", json!({})).await);
    assert!(
        e.contains("rule own-identity") && e.contains("not for gpt"),
        "{e}"
    );
    // A grant bound to one command is filed by the gateway (the identity's service account)
    // only: from anyone else its text need not be the command its fingerprint lets through.
    let command = json!({ "scope": { "operations": ["Write"] }, "command": {
        "text": "SELECT 1", "fingerprint": "5f1e8c0a9b2d4e6f", "operation": "Write" } });
    for (client, who) in [(&bob, "bob")] {
        let e = refused(
            request(
                client,
                &format!("{who}-command"),
                "claude",
                "10m",
                command.clone(),
            )
            .await,
        );
        assert!(
            e.contains("rule command-filed-by-gateway")
                && e.contains("command grants are filed by the gateway")
                && e.contains("as system:serviceaccount:default:claude"),
            "{who}: {e}"
        );
    }
    let g = request(&agent, "agent-command", "claude", "10m", command.clone()).await?;
    assert_eq!(
        g.spec.command.map(|c| c.fingerprint),
        Some("5f1e8c0a9b2d4e6f".to_owned())
    );
    // A sidecar that serves identities by token runs as a service account of its own: RBAC's
    // custom verb `hold` on accessgrants (the chart's sidecar role has it) says it is one.
    {
        use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
        let role: ClusterRole = serde_json::from_value(json!({
            "metadata": { "name": "agentgate-gateway-test" },
            "rules": [ { "apiGroups": ["agentgate.dev"], "resources": ["accessgrants"], "verbs": ["create", "hold"] } ]
        }))?;
        Api::<ClusterRole>::all(admin.clone())
            .create(&PostParams::default(), &role)
            .await?;
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": { "name": "agentgate-gateway-test" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "agentgate-gateway-test" },
            "subjects": [ { "kind": "ServiceAccount", "name": "gateway", "namespace": NS } ]
        }))?;
        Api::<ClusterRoleBinding>::all(admin.clone())
            .create(&PostParams::default(), &binding)
            .await?;
    }
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(admin.clone(), NS);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({ "metadata": { "name": "gateway" } }))?,
    )
    .await?;
    let token = sas
        .create_token_request(
            "gateway",
            &PostParams::default(),
            &serde_json::from_value(json!({ "spec": { "expirationSeconds": 3600 } }))?,
        )
        .await?
        .status
        .and_then(|s| s.token)
        .unwrap_or_default();
    let kube = cluster.kube();
    let gate = kube
        .client_from(&kube.kubeconfig_with_token("gateway", &token)?)
        .await?;
    let g = request(&gate, "gateway-command", "claude", "10m", command.clone()).await?;
    assert_eq!(
        g.spec.requested_by.map(|u| u.username),
        Some(format!("system:serviceaccount:{NS}:gateway"))
    );
    // A request cannot carry its own decision.
    let e = refused(
        request(
            &agent,
            "self-decided",
            "claude",
            "10m",
            json!({ "decision": { "verdict": "Approve" } }),
        )
        .await,
    );
    assert!(e.contains("rule no-decision-at-creation"), "{e}");
    // Longer than the identity's maxGrantDuration (1h).
    let e = refused(request(&bob, "too-long", "claude", "2h", json!({})).await);
    assert!(
        e.contains("rule max-duration") && e.contains("maxGrantDuration 1h"),
        "{e}"
    );
    // An identity that does not exist.
    let e = refused(request(&bob, "ghost", "nobody", "10m", json!({})).await);
    assert!(e.contains("rule identity-exists"), "{e}");
    // A scope limited with another protocol's settings, which orders-db (PostgreSQL) would
    // ignore: it would allow every Write while it reads as a few pods.
    let e = refused(
        request(
            &bob,
            "wrong-scope",
            "claude",
            "10m",
            json!({ "scope": { "operations": ["Write"],
                "kubernetes": [{ "verbs": ["delete"], "resources": ["pods"] }] } }),
        )
        .await,
    );
    assert!(
        e.contains("rule scope-fits-target")
            && e.contains("Target orders-db is Postgres: scope.kubernetes does not apply")
            && e.contains("limit it with scope.tables"),
        "{e}"
    );
    request(
        &bob,
        "right-scope",
        "claude",
        "10m",
        json!({ "scope": { "operations": ["Write"], "tables": ["public.orders"] } }),
    )
    .await?;

    // The agent approves its own request: refused, naming the rule.
    let e = refused(
        patch_spec(
            &agent,
            "agent-ask",
            json!({ "decision": { "verdict": "Approve" } }),
        )
        .await,
    );
    assert!(
        e.contains("rule no-self-approval")
            && e.contains("service account of AgentIdentity claude"),
        "{e}"
    );
    // bob has RBAC to patch grants but neither the approve verb nor a place in spec.approvers.
    let e = refused(
        patch_spec(
            &bob,
            "agent-ask",
            json!({ "decision": { "verdict": "Approve" } }),
        )
        .await,
    );
    assert!(
        e.contains("rule approver-authorization") && e.contains("bob may not decide"),
        "{e}"
    );
    // mallory cannot even patch (the API server's RBAC).
    let e = refused(
        patch_spec(
            &mallory,
            "agent-ask",
            json!({ "decision": { "verdict": "Approve" } }),
        )
        .await,
    );
    assert!(e.contains("forbidden") || e.contains("Forbidden"), "{e}");
    // Nothing was decided by any of that.
    let (g, _) = wait_phase(
        &admin,
        "agent-ask",
        GrantPhase::Pending,
        Duration::from_secs(5),
    )
    .await?;
    assert!(g.spec.decision.is_none());

    // alice is an approver (group listed in the identity).
    patch_spec(
        &alice,
        "agent-ask",
        json!({ "decision": { "verdict": "Approve" } }),
    )
    .await?;
    wait_phase(
        &admin,
        "agent-ask",
        GrantPhase::Active,
        Duration::from_secs(5),
    )
    .await?;
    // A decided grant cannot be flipped, by anyone, admin included.
    for client in [&alice, &admin] {
        let e = refused(
            patch_spec(
                client,
                "agent-ask",
                json!({ "decision": { "verdict": "Deny" } }),
            )
            .await,
        );
        assert!(e.contains("immutable"), "{e}");
    }
    let e = refused(patch_spec(&alice, "agent-ask", json!({ "decision": null })).await);
    assert!(e.contains("immutable"), "{e}");
    // Nor can its recorded approver be rewritten: the typed name is replaced by the record.
    let _ = patch_spec(
        &admin,
        "agent-ask",
        json!({ "decision": { "decidedBy": { "username": "mallory" } } }),
    )
    .await;
    let g = get(&admin, "agent-ask").await?;
    assert_eq!(
        g.spec
            .decision
            .and_then(|d| d.decided_by)
            .map(|u| u.username),
        Some("alice".into())
    );

    // Machines never decide, whatever RBAC says. Two service accounts with the `approve`
    // verb (and patch): one is refused, saying why and what to do; the one the installation
    // names in --automation-approvers may.
    let mut bots = Vec::new();
    for bot in ["ci-bot", "release-bot"] {
        sas.create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": bot } }))?,
        )
        .await?;
        let user = format!("system:serviceaccount:{NS}:{bot}");
        grant_approve_verb(&admin, &user).await?;
        bind(
            &admin,
            "agentgate-requester",
            &format!("{bot}-requests"),
            json!({ "kind": "ServiceAccount", "name": bot, "namespace": NS }),
        )
        .await?;
        let token = sas
            .create_token_request(
                bot,
                &PostParams::default(),
                &serde_json::from_value(json!({ "spec": { "expirationSeconds": 3600 } }))?,
            )
            .await?
            .status
            .and_then(|s| s.token)
            .unwrap_or_default();
        bots.push(
            kube.client_from(&kube.kubeconfig_with_token(bot, &token)?)
                .await?,
        );
    }
    request(&alice, "bot-ask", "claude", "10m", json!({})).await?;
    let approve = json!({ "decision": { "verdict": "Approve" } });
    let e = refused(patch_spec(&bots[0], "bot-ask", approve.clone()).await);
    assert!(
        e.contains("rule human-decider")
            && e.contains(
                "system:serviceaccount:default:ci-bot is a service account, not a person"
            )
            && e.contains("grants are decided by people")
            && e.contains("--automation-approvers"),
        "{e}"
    );
    // The agents the gateway acts as (its impersonated user and group), even given RBAC's
    // approve verb by mistake; and an OIDC agent behind the API server's user-name prefix.
    bind(&admin, "agentgate-requester", "agents-request", json!({ "kind": "Group", "name": "agentgate:agents", "apiGroup": "rbac.authorization.k8s.io" })).await?;
    bind(&admin, "agentgate-approver", "agents-approve", json!({ "kind": "Group", "name": "agentgate:agents", "apiGroup": "rbac.authorization.k8s.io" })).await?;
    apply(
        &admin,
        json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": { "name": "robot" },
        "spec": { "owner": "team-orders", "authentication": { "oidc": {
            "issuer": "https://idp.example", "audience": "agentgate", "subject": "robot-7" } } } }),
    )
    .await?;
    let robot = "https://idp.example#robot-7";
    bind(
        &admin,
        "agentgate-requester",
        "robot-requests",
        json!({ "kind": "User", "name": robot, "apiGroup": "rbac.authorization.k8s.io" }),
    )
    .await?;
    bind(
        &admin,
        "agentgate-approver",
        "robot-approves",
        json!({ "kind": "User", "name": robot, "apiGroup": "rbac.authorization.k8s.io" }),
    )
    .await?;
    for (who, groups, wanted) in [
        (
            "agentgate:agent:default:claude",
            vec!["agentgate:agents"],
            "rule human-decider: agentgate:agent:default:claude is an agent",
        ),
        (
            "alice-the-agent",
            vec!["agentgate:agents"],
            "is in group agentgate:agents",
        ),
        (
            robot,
            vec![],
            "rule no-self-approval: https://idp.example#robot-7 acts for an AgentIdentity",
        ),
    ] {
        let mut cmd = kube.kubectl();
        cmd.arg(format!("--as={who}"));
        for g in &groups {
            cmd.arg(format!("--as-group={g}"));
        }
        let out = cmd
            .args([
                "patch",
                "accessgrant",
                "bot-ask",
                "-n",
                NS,
                "--type=merge",
                "-p",
            ])
            .arg(json!({ "spec": approve }).to_string())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(wanted),
            "{who}: {stderr}"
        );
    }
    // Nothing was decided by any of that; the named automation account decides.
    assert!(get(&admin, "bot-ask").await?.spec.decision.is_none());
    let g = patch_spec(&bots[1], "bot-ask", approve.clone()).await?;
    assert_eq!(
        g.spec
            .decision
            .and_then(|d| d.decided_by)
            .map(|u| u.username),
        Some(format!("system:serviceaccount:{NS}:release-bot"))
    );
    wait_phase(
        &admin,
        "bot-ask",
        GrantPhase::Active,
        Duration::from_secs(5),
    )
    .await?;

    // A group that takes in everyone makes no one an approver, and the identity says so.
    apply(&admin, json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": { "name": "open" },
        "spec": { "owner": "team-orders", "authentication": { "serviceAccount": { "name": "open" } },
            "approvers": { "groups": ["system:authenticated", "system:serviceaccounts"] }, "maxGrantDuration": "1h" } }))
    .await?;
    request(&alice, "open-ask", "open", "10m", json!({})).await?;
    let e = refused(patch_spec(&bob, "open-ask", approve.clone()).await);
    assert!(
        e.contains("rule approver-authorization") && e.contains("bob may not decide"),
        "{e}"
    );
    let ids: Api<agentgate_crds::AgentIdentity> = Api::namespaced(admin.clone(), NS);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let st = ids.get("open").await?.status.unwrap_or_default();
        if let Some(c) = st
            .conditions
            .iter()
            .find(|c| c.reason == "ApproversNotPeople")
        {
            assert_eq!(c.status, "False");
            assert!(
                c.message
                    .contains("spec.approvers.groups lists system:authenticated")
                    && c.message.contains("system:serviceaccounts")
                    && c.message
                        .contains("until then those entries approve nothing"),
                "{}",
                c.message
            );
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "identity open never reported its approvers: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A listed human still approves.
    patch_spec(&alice, "right-scope", approve.clone()).await?;
    wait_phase(
        &admin,
        "right-scope",
        GrantPhase::Active,
        Duration::from_secs(5),
    )
    .await?;

    // RBAC's `approve` verb makes bob an approver (checked with a SubjectAccessReview) ...
    grant_approve_verb(&admin, "bob").await?;
    request(&alice, "alice-ask", "claude", "10m", json!({})).await?;
    patch_spec(
        &bob,
        "alice-ask",
        json!({ "decision": { "verdict": "Approve" } }),
    )
    .await?;
    wait_phase(
        &admin,
        "alice-ask",
        GrantPhase::Active,
        Duration::from_secs(5),
    )
    .await?;
    // ... but never of his own request (four-eyes).
    request(&bob, "bob-ask", "claude", "10m", json!({})).await?;
    let e = refused(
        patch_spec(
            &bob,
            "bob-ask",
            json!({ "decision": { "verdict": "Approve" } }),
        )
        .await,
    );
    assert!(
        e.contains("rule no-self-approval") && e.contains("four-eyes"),
        "{e}"
    );

    // The agent may give up its own grant; bob (now an approver) may revoke too.
    patch_spec(
        &agent,
        "agent-ask",
        json!({ "revocation": { "reason": "done" } }),
    )
    .await?;
    let (g, _) = wait_phase(
        &admin,
        "agent-ask",
        GrantPhase::Revoked,
        Duration::from_secs(3),
    )
    .await?;
    assert_eq!(
        g.status.and_then(|s| s.ended_by).map(|u| u.username),
        Some("system:serviceaccount:default:claude".into())
    );
    // mallory cannot revoke (RBAC), gpt's service account is another agent.
    request(&alice, "to-revoke", "claude", "10m", json!({})).await?;
    let e = refused(patch_spec(&mallory, "to-revoke", json!({ "revocation": {} })).await);
    assert!(e.contains("forbidden") || e.contains("Forbidden"), "{e}");
    Ok(())
}

/// Binds ClusterRole `role` to one subject (as JSON) cluster-wide.
async fn bind(
    admin: &kube::Client,
    role: &str,
    name: &str,
    subject: serde_json::Value,
) -> anyhow::Result<()> {
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": name },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role },
        "subjects": [ subject ]
    }))?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}
