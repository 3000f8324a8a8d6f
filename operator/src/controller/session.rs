//! The AgentSession controller: retention. Sessions older than the configured period after
//! they end are deleted; their records stay in the external sinks.

use std::sync::Arc;
use std::time::Duration;

use agentgate_crds::{AgentSession, SessionPhase};
use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;

use super::{Context, error_policy};
use crate::error::Result;

/// When a session may be deleted: `retention` after it ended (or after it started, for a
/// session that never reported an end: a sidecar that died).
pub fn delete_at(session: &AgentSession, retention: Duration) -> Timestamp {
    let status = session.status.clone().unwrap_or_default();
    let base = match (status.phase, status.ended_at, status.last_activity) {
        (Some(SessionPhase::Ended), Some(end), _) => end.0,
        (_, _, Some(last)) => last.0,
        _ => session.spec.started_at.0,
    };
    base + SignedDuration::try_from(retention).unwrap_or(SignedDuration::MAX)
}

async fn reconcile(session: Arc<AgentSession>, ctx: Arc<Context>) -> Result<Action> {
    let res = reconcile_inner(session.clone(), ctx.clone()).await;
    if res.is_ok() {
        ctx.succeeded("AgentSession", &*session);
    }
    res
}

async fn reconcile_inner(session: Arc<AgentSession>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started("AgentSession");
    let due = delete_at(&session, ctx.config.session_retention);
    let now = Timestamp::now();
    if now >= due {
        let api: Api<AgentSession> =
            Api::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
        tracing::info!(session = %session.name_any(), "retention period over: deleting the AgentSession");
        api.delete(&session.name_any(), &DeleteParams::default())
            .await?;
        return Ok(Action::await_change());
    }
    let wait = Duration::try_from(due.duration_since(now)).unwrap_or_default();
    Ok(Action::requeue(wait.min(Duration::from_secs(3600))))
}

/// Runs the AgentSession controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<AgentSession> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |o, e, ctx| error_policy("AgentSession", &*o, e, &ctx),
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}
