//! The AccessGrant controller: `Pending → Approved → Active → Expired`, or `Denied` /
//! `Revoked`, on time.
//!
//! The lifecycle is a pure function of the grant, its identity and the clock
//! ([`evaluate`]); the reconciler writes the result and asks to be called again exactly when
//! the next transition is due (the end of the pending TTL, or `expiresAt`). Because the state
//! is derived from the spec and the clock, a restarted operator catches up at once.

use std::collections::HashMap;
use std::sync::Arc;

use agentgate_crds::lifecycle::evaluate;
use agentgate_crds::{AccessGrant, AgentIdentity, GrantPhase};
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};

use super::{Context, error_policy};
use crate::error::{Error, Result};

/// The finalizer that lets a deleted grant be recorded as revoked.
pub const FINALIZER: &str = "agentgate.dev/grant";

async fn reconcile(grant: Arc<AccessGrant>, ctx: Arc<Context>) -> Result<Action> {
    let res = reconcile_inner(grant.clone(), ctx.clone()).await;
    if res.is_ok() {
        ctx.succeeded("AccessGrant", &*grant);
    }
    res
}

async fn reconcile_inner(grant: Arc<AccessGrant>, ctx: Arc<Context>) -> Result<Action> {
    let ns = grant.namespace().unwrap_or_default();
    let api: Api<AccessGrant> = Api::namespaced(ctx.client.clone(), &ns);
    let timer = ctx.metrics.reconcile_started("AccessGrant");
    let ctx2 = ctx.clone();
    let res = finalizer(&api, FINALIZER, grant, |event| async move {
        match event {
            Finalizer::Apply(g) => apply(&g, &ctx2).await,
            Finalizer::Cleanup(g) => {
                apply(&g, &ctx2).await?;
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    drop(timer);
    res
}

async fn apply(grant: &AccessGrant, ctx: &Context) -> Result<Action> {
    let ns = grant.namespace().unwrap_or_default();
    let name = grant.name_any();
    let identities: Api<AgentIdentity> = Api::namespaced(ctx.client.clone(), &ns);
    let identity = identities.get_opt(&grant.spec.identity).await?;
    let now = Timestamp::now();
    let eval = evaluate(grant, identity.as_ref(), now);
    let old = grant.status.clone().unwrap_or_default();
    if eval.status != old {
        let api: Api<AccessGrant> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({ "status": eval.status });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        if eval.status.phase != old.phase
            && let Some(phase) = eval.status.phase
        {
            let note = eval.status.message.clone().unwrap_or_default();
            tracing::info!(namespace = %ns, grant = %name, ?phase, %note, "grant phase changed");
            if phase == GrantPhase::Expired
                && let Some(exp) = eval.status.expires_at.as_ref()
            {
                let lag = now.duration_since(exp.0).as_secs_f64().max(0.0);
                ctx.metrics.expiry_lag(lag);
            }
            let warning = matches!(phase, GrantPhase::Denied | GrantPhase::Revoked);
            ctx.event(grant, warning, &format!("{phase:?}"), "Lifecycle", note)
                .await;
        }
    }
    Ok(match eval.requeue {
        Some(d) => Action::requeue(d),
        None => Action::await_change(),
    })
}

/// The identities from `events` that were added, deleted, or whose spec changed (a new
/// `metadata.generation` or uid). A status update (the identity controller's list of active
/// grants changes with every grant) would otherwise re-evaluate every grant of the identity
/// each time one of them changes phase: 1,000 grants expiring over a minute made a million
/// reconciles, and expiries waited behind them.
fn spec_changes(
    events: impl futures::Stream<Item = Result<watcher::Event<AgentIdentity>, watcher::Error>>
    + Send
    + 'static,
) -> impl futures::Stream<Item = Result<AgentIdentity, watcher::Error>> + Send + 'static {
    // uid and generation last seen, by identity.
    let mut seen: HashMap<ObjectRef<AgentIdentity>, (Option<String>, Option<i64>)> = HashMap::new();
    events.default_backoff().try_filter_map(move |event| {
        let changed = match event {
            watcher::Event::Apply(id) | watcher::Event::InitApply(id) => {
                let key = ObjectRef::from_obj(&id);
                let version = (id.metadata.uid.clone(), id.metadata.generation);
                (seen.insert(key, version.clone()) != Some(version)).then_some(id)
            }
            watcher::Event::Delete(id) => {
                seen.remove(&ObjectRef::from_obj(&id));
                Some(id)
            }
            watcher::Event::Init | watcher::Event::InitDone => None,
        };
        futures::future::ready(Ok(changed))
    })
}

/// Runs the AccessGrant controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let grants: Api<AccessGrant> = Api::all(ctx.client.clone());
    let identities: Api<AgentIdentity> = Api::all(ctx.client.clone());
    let controller = Controller::new(grants, watcher::Config::default());
    let store = controller.store();
    controller
        // A change to an identity's spec (disabled, max duration) or its deletion re-evaluates
        // its grants; its status (which lists its active grants, so changes with each of them)
        // does not.
        .watches_stream(
            spec_changes(watcher(identities, watcher::Config::default())),
            move |id: AgentIdentity| {
                let ns = id.namespace();
                let name = id.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|g| g.namespace() == ns && g.spec.identity == name)
                    .map(|g| ObjectRef::from_obj(&*g))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |g, e, ctx| error_policy("AccessGrant", &*g, e, &ctx),
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}
