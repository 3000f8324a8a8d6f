//! The AgentIdentity controller: checks its references and that its approvers are people,
//! reports its active grants.

use std::sync::Arc;
use std::time::Duration;

use agentgate_crds::common::Time;
use agentgate_crds::{AccessGrant, AgentIdentity, AgentIdentityStatus, AgentSession, GrantPhase};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use super::{Context, error_policy};
use crate::conditions::condition;
use crate::error::Result;

/// Checks the identity's references; `Ok(())` or the reason it is not ready.
async fn check_references(
    id: &AgentIdentity,
    ctx: &Context,
) -> Result<Result<(), (String, String)>> {
    let ns = id.namespace().unwrap_or_default();
    // Approvers are people: a listed group of machines or of everyone counts for nothing at
    // decision time (the approval webhook), which the identity's owner should hear here.
    let problems =
        crate::approvers::approvers_problems(&id.spec.approvers, &ctx.config.automation_approvers);
    if !problems.is_empty() {
        return Ok(Err((
            "ApproversNotPeople".into(),
            format!(
                "{}; until then those entries approve nothing",
                problems.join("; ")
            ),
        )));
    }
    if let Some(sa) = &id.spec.authentication.service_account {
        let sa_ns = sa.namespace.clone().unwrap_or_else(|| ns.clone());
        let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &sa_ns);
        if api.get_opt(&sa.name).await?.is_none() {
            return Ok(Err((
                "ServiceAccountNotFound".into(),
                format!(
                    "service account {sa_ns}/{} does not exist: create it, or fix spec.authentication.serviceAccount",
                    sa.name
                ),
            )));
        }
    }
    // A baseline entry is read as its Target's gateway reads it: limited with another
    // protocol's settings it covers nothing (the sidecar fails closed), which a person
    // should hear about here rather than from refused requests.
    let targets: Api<agentgate_crds::Target> = Api::namespaced(ctx.client.clone(), &ns);
    for (i, b) in id.spec.baseline.iter().enumerate() {
        if let Some(t) = targets.get_opt(&b.target).await?
            && let Some(why) = b.scope.mismatch(t.spec.protocol)
        {
            return Ok(Err((
                "BaselineScopeMismatch".into(),
                format!(
                    "spec.baseline[{i}] (Target {}, {:?}): {why}; until then it covers nothing",
                    b.target, t.spec.protocol
                ),
            )));
        }
    }
    if let Some(oidc) = &id.spec.authentication.oidc {
        let url = format!(
            "{}/.well-known/openid-configuration",
            oidc.issuer.trim_end_matches('/')
        );
        match ctx.http.get_json(&url, Duration::from_secs(5)).await {
            Ok(doc) if doc["issuer"].as_str() == Some(oidc.issuer.as_str()) => {}
            Ok(doc) => {
                return Ok(Err((
                    "OIDCIssuerMismatch".into(),
                    format!(
                        "the discovery document at {url} names issuer {} instead of {}",
                        doc["issuer"], oidc.issuer
                    ),
                )));
            }
            Err(e) => {
                return Ok(Err((
                    "OIDCIssuerUnreachable".into(),
                    format!("cannot read the OIDC discovery document: {e}"),
                )));
            }
        }
    }
    Ok(Ok(()))
}

async fn reconcile(id: Arc<AgentIdentity>, ctx: Arc<Context>) -> Result<Action> {
    let res = reconcile_inner(id.clone(), ctx.clone()).await;
    if res.is_ok() {
        ctx.succeeded("AgentIdentity", &*id);
    }
    res
}

async fn reconcile_inner(id: Arc<AgentIdentity>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started("AgentIdentity");
    let ns = id.namespace().unwrap_or_default();
    let name = id.name_any();
    let now = Timestamp::now();
    let old = id.status.clone().unwrap_or_default();
    let generation = id.metadata.generation;

    // From the API server's watch cache (resourceVersion=0): a consistent list would wait
    // for that cache to catch up with etcd after every write, and every grant change brings
    // the identity here. The change that did is already in that cache: watch events are sent
    // from it. (A reflector of our own could lag behind the event that triggered this.)
    let grants: Api<AccessGrant> = Api::namespaced(ctx.client.clone(), &ns);
    let mut active: Vec<String> = grants
        .list(&ListParams::default().match_any())
        .await?
        .items
        .into_iter()
        .filter(|g| {
            g.spec.identity == name
                && g.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Active)
        })
        .map(|g| g.name_any())
        .collect();
    active.sort();

    // Last seen: the latest activity of the identity's sessions (written by its sidecars).
    let sessions: Api<AgentSession> = Api::namespaced(ctx.client.clone(), &ns);
    let seen = sessions
        .list(&ListParams::default().match_any())
        .await?
        .items
        .into_iter()
        .filter(|s| s.spec.identity == name)
        .filter_map(|s| {
            let st = s.status.unwrap_or_default();
            [Some(s.spec.started_at), st.last_activity, st.ended_at]
                .into_iter()
                .flatten()
                .map(|t| t.0)
                .max()
        })
        .max();
    let last_seen = match (old.last_seen.clone(), seen) {
        (Some(a), Some(b)) => Some(Time(a.0.max(b))),
        (a, b) => a.or(b.map(Time)),
    };

    let mut conditions = Vec::new();
    match check_references(&id, &ctx).await? {
        Ok(()) => conditions.push(condition(
            &old.conditions,
            "Ready",
            !id.spec.disabled,
            if id.spec.disabled {
                "Disabled"
            } else {
                "ReferencesResolved"
            },
            if id.spec.disabled {
                "the identity is disabled: its sessions are refused and its grants revoked"
                    .to_owned()
            } else {
                "service account and OIDC issuer resolve".to_owned()
            },
            generation,
            now,
        )),
        Err((reason, msg)) => conditions.push(condition(
            &old.conditions,
            "Ready",
            false,
            &reason,
            msg,
            generation,
            now,
        )),
    }
    conditions.push(condition(
        &old.conditions,
        "Disabled",
        id.spec.disabled,
        if id.spec.disabled {
            "DisabledBySpec"
        } else {
            "Enabled"
        },
        if id.spec.disabled {
            "spec.disabled is true"
        } else {
            "spec.disabled is false"
        },
        generation,
        now,
    ));
    let status = AgentIdentityStatus {
        conditions,
        observed_generation: generation,
        active_grants: active,
        last_seen,
    };
    if status != old {
        let api: Api<AgentIdentity> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({ "status": status });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        let ready_changed = status.conditions.first().map(|c| (&c.status, &c.reason))
            != old.conditions.first().map(|c| (&c.status, &c.reason));
        if ready_changed && let Some(c) = status.conditions.first() {
            ctx.event(
                &*id,
                c.status != "True",
                &c.reason,
                "Validate",
                c.message.clone(),
            )
            .await;
        }
    }
    // Issuers can come and go: look again every few minutes.
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Runs the AgentIdentity controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ids: Api<AgentIdentity> = Api::all(ctx.client.clone());
    let grants: Api<AccessGrant> = Api::all(ctx.client.clone());
    let sas: Api<ServiceAccount> = Api::all(ctx.client.clone());
    let sessions: Api<AgentSession> = Api::all(ctx.client.clone());
    let controller = Controller::new(ids, watcher::Config::default());
    let store = controller.store();
    controller
        .watches(grants, watcher::Config::default(), |g: AccessGrant| {
            Some(ObjectRef::new(&g.spec.identity).within(&g.namespace().unwrap_or_default()))
        })
        .watches(sessions, watcher::Config::default(), |s: AgentSession| {
            Some(ObjectRef::new(&s.spec.identity).within(&s.namespace().unwrap_or_default()))
        })
        .watches(
            sas,
            watcher::Config::default(),
            move |sa: ServiceAccount| {
                let ns = sa.namespace().unwrap_or_default();
                let name = sa.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|id| {
                        id.spec
                            .authentication
                            .service_account
                            .as_ref()
                            .is_some_and(|r| {
                                r.name == name
                                    && r.namespace.clone().or_else(|| id.namespace())
                                        == Some(ns.clone())
                            })
                    })
                    .map(|id| ObjectRef::from_obj(&*id))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |o, e, ctx| error_policy("AgentIdentity", &*o, e, &ctx),
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}
