//! The AgentSession controller: liveness and retention.
//!
//! - An Active session whose sidecar died without closing it (its pod is gone or stopped, or
//!   its sidecar container restarted since the session began) is marked Ended, saying why.
//!   The pod is read by name, at most every `--session-check-interval`; pods are never listed.
//! - Sessions older than the configured period after they end are deleted; their records
//!   stay in the external sinks.

use std::sync::Arc;
use std::time::Duration;

use agentgate_crds::{AgentSession, SessionPhase};
use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;

use super::{Context, error_policy};
use crate::error::Result;

/// When a session may be deleted: `retention` after it ended (or after it started, for a
/// session that never reported an end: a sidecar that died). A time past the last one jiff
/// can represent (a session dated near year 9999, or a retention past it) is never: the
/// session is kept rather than the reconcile panicking.
pub fn delete_at(session: &AgentSession, retention: Duration) -> Timestamp {
    let status = session.status.clone().unwrap_or_default();
    let base = match (status.phase, status.ended_at, status.last_activity) {
        (Some(SessionPhase::Ended), Some(end), _) => end.0,
        (_, _, Some(last)) => last.0,
        _ => session.spec.started_at.0,
    };
    SignedDuration::try_from(retention)
        .ok()
        .and_then(|r| base.checked_add(r).ok())
        .unwrap_or(Timestamp::MAX)
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
    let ns = session.namespace().unwrap_or_default();
    let active = session
        .status
        .as_ref()
        .is_none_or(|s| s.phase != Some(SessionPhase::Ended));
    if active && let Some(why) = sidecar_gone(&session, &ctx).await? {
        let status = session.status.clone().unwrap_or_default();
        // It ended at its last sign of life, not when the operator noticed.
        let ended = status
            .last_activity
            .unwrap_or_else(|| session.spec.started_at.clone());
        tracing::info!(session = %session.name_any(), namespace = %ns, reason = %why, "marking an abandoned AgentSession Ended");
        let api: Api<AgentSession> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &session.name_any(),
            &PatchParams::default(),
            // Only over the version read: a sidecar that closed the session cleanly in the
            // meantime keeps its own end (the conflict requeues).
            &Patch::Merge(serde_json::json!({
                "metadata": { "resourceVersion": session.resource_version() },
                "status": {
                    "phase": "Ended",
                    "endedAt": ended,
                    "endReason": why,
                },
            })),
        )
        .await?;
        ctx.event(&*session, true, "SidecarGone", "Close", why)
            .await;
        return Ok(Action::await_change());
    }
    let due = delete_at(&session, ctx.config.session_retention);
    let now = Timestamp::now();
    if now >= due {
        let api: Api<AgentSession> = Api::namespaced(ctx.client.clone(), &ns);
        tracing::info!(session = %session.name_any(), "retention period over: deleting the AgentSession");
        api.delete(&session.name_any(), &DeleteParams::default())
            .await?;
        return Ok(Action::await_change());
    }
    let mut wait = Duration::try_from(due.duration_since(now))
        .unwrap_or_default()
        .min(Duration::from_secs(3600));
    if active && session.spec.pod.is_some() {
        wait = wait.min(
            ctx.config
                .session_check_interval
                .max(Duration::from_secs(1)),
        );
    }
    Ok(Action::requeue(wait))
}

/// The session's pod as (namespace, name): `spec.pod` is `namespace/name` (a bare name is in
/// the session's namespace). `None` without a pod, or for a pod of another namespace (a
/// sidecar writes its sessions in its own namespace: nothing to go on).
pub fn pod_of(session: &AgentSession) -> Option<(String, String)> {
    let ns = session.namespace().unwrap_or_default();
    let pod = session.spec.pod.as_deref()?;
    let (pod_ns, name) = pod.split_once('/').unwrap_or((ns.as_str(), pod));
    (pod_ns == ns && !name.is_empty() && !name.contains('/'))
        .then(|| (pod_ns.to_owned(), name.to_owned()))
}

/// Why the sidecar that wrote an Active session can no longer close it, if so: its pod is
/// gone (or is another pod of the same name), has stopped, or its sidecar container is not
/// the one that began the session. `None` while it may still be running, and for a session
/// with no pod (a sidecar outside the cluster).
async fn sidecar_gone(session: &AgentSession, ctx: &Context) -> Result<Option<String>> {
    let Some((ns, name)) = pod_of(session) else {
        return Ok(None);
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod = match pods.get_opt(&name).await {
        Ok(p) => p,
        Err(kube::Error::Api(e)) if e.code == 403 => {
            tracing::warn!(pod = %name, namespace = %ns, error = %e.message, "cannot read the session's pod: the operator needs `get` on pods to close sessions of sidecars that died");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    Ok(match pod {
        None => Some(format!(
            "pod {name} no longer exists: its sidecar ended without closing the session"
        )),
        Some(p) => why_gone(session, &name, &p),
    })
}

/// [`sidecar_gone`]'s reading of the pod it found. Times compared are the node's own (the
/// sidecar's clock and the kubelet's); the API server's clock is never compared with them.
pub fn why_gone(session: &AgentSession, name: &str, pod: &Pod) -> Option<String> {
    let started = session.spec.started_at.0;
    if let (Some(want), Some(uid)) = (&session.spec.pod_uid, &pod.metadata.uid)
        && want != uid
    {
        return Some(format!(
            "pod {name} was deleted and created again after the session began: its sidecar ended without closing the session"
        ));
    }
    let status = pod.status.as_ref()?;
    if let Some(phase @ ("Succeeded" | "Failed")) = status.phase.as_deref() {
        return Some(format!(
            "pod {name} has stopped ({phase}): its sidecar ended without closing the session"
        ));
    }
    // A native sidecar is an init container; an older injection put it among the containers.
    let sidecar = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find(|c| c.name == crate::webhook::pod::SIDECAR)?;
    let state = sidecar.state.as_ref()?;
    if let Some(running) = &state.running {
        // The kubelet writes whole seconds: a container started after the session's second
        // is another run of the sidecar. (A restart takes the kubelet longer than the rest of
        // the second the session began in.)
        return running
            .started_at
            .as_ref()
            .filter(|t| t.0 > started)
            .map(|t| {
                format!(
                    "the sidecar in pod {name} restarted at {}: the one that ran the session ended without closing it",
                    t.0
                )
            });
    }
    state.terminated.as_ref().map(|t| {
        let how = t
            .reason
            .clone()
            .unwrap_or_else(|| format!("exit code {}", t.exit_code));
        format!(
            "the sidecar in pod {name} has stopped ({how}): it ended without closing the session"
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use agentgate_crds::AgentSessionSpec;
    use agentgate_crds::common::Time;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time as KTime;

    fn session(started: &str) -> AgentSession {
        AgentSession::new(
            "s",
            AgentSessionSpec {
                identity: "claude".into(),
                target: "db".into(),
                protocol: agentgate_crds::Protocol::Postgres,
                pod: Some("agents/agent-0".into()),
                pod_uid: Some("uid-1".into()),
                client: None,
                session_id: "s".into(),
                started_at: Time(started.parse().unwrap()),
            },
        )
    }

    fn pod(uid: &str, sidecar: Option<ContainerState>, phase: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.uid = Some(uid.into());
        p.status = Some(PodStatus {
            phase: Some(phase.into()),
            init_container_statuses: sidecar.map(|state| {
                vec![ContainerStatus {
                    name: crate::webhook::pod::SIDECAR.into(),
                    state: Some(state),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        });
        p
    }

    fn running(at: &str) -> ContainerState {
        ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(KTime(at.parse().unwrap())),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_session_is_abandoned_only_when_its_sidecar_is_gone() {
        let s = session("2026-11-24T10:00:00.5Z");
        let gone = |p: &Pod| why_gone(&s, "agent-0", p);
        // The sidecar that began the session still runs.
        let same = pod("uid-1", Some(running("2026-11-24T09:00:02Z")), "Running");
        assert_eq!(gone(&same), None);
        // Started in the session's own second (the kubelet writes whole seconds): the same.
        let close = pod("uid-1", Some(running("2026-11-24T10:00:00Z")), "Running");
        assert_eq!(gone(&close), None);
        // No status yet, or no sidecar status: nothing to go on.
        assert_eq!(gone(&pod("uid-1", None, "Pending")), None);
        // The sidecar restarted after the session began.
        let restarted = pod("uid-1", Some(running("2026-11-24T10:05:00Z")), "Running");
        assert!(
            gone(&restarted)
                .unwrap()
                .contains("restarted at 2026-11-24T10:05:00Z")
        );
        // The sidecar has stopped.
        let stopped = pod(
            "uid-1",
            Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    reason: Some("OOMKilled".into()),
                    exit_code: 137,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "Running",
        );
        assert!(gone(&stopped).unwrap().contains("(OOMKilled)"));
        // The pod has stopped, or is another pod of the same name (its UID, no clock).
        assert!(
            gone(&pod("uid-1", None, "Failed"))
                .unwrap()
                .contains("has stopped (Failed)")
        );
        let again = pod("uid-2", Some(running("2026-11-24T09:00:02Z")), "Running");
        assert!(gone(&again).unwrap().contains("created again"));
        // Which pod: `namespace/name` in the session's namespace, or a bare name.
        let mut s2 = s.clone();
        s2.metadata.namespace = Some("agents".into());
        assert_eq!(pod_of(&s2), Some(("agents".into(), "agent-0".into())));
        s2.spec.pod = Some("agent-0".into());
        assert_eq!(pod_of(&s2), Some(("agents".into(), "agent-0".into())));
        s2.spec.pod = Some("other/agent-0".into());
        assert_eq!(pod_of(&s2), None);
        s2.spec.pod = Some("agents/a/b".into());
        assert_eq!(pod_of(&s2), None);
    }

    #[test]
    fn retention_past_the_end_of_time_keeps_the_session_instead_of_panicking() {
        let s = session("2026-11-24T10:00:00Z");
        assert_eq!(
            delete_at(&s, Duration::from_secs(3600)),
            "2026-11-24T11:00:00Z".parse::<Timestamp>().unwrap()
        );
        // 99999999h (what a values file once allowed) and more: no panic, never deleted.
        for retention in [Duration::from_secs(99_999_999 * 3600), Duration::MAX] {
            assert_eq!(delete_at(&s, retention), Timestamp::MAX);
        }
        let late = session("9999-12-30T00:00:00Z");
        assert_eq!(
            delete_at(&late, Duration::from_secs(3 * 86_400)),
            Timestamp::MAX
        );
    }
}
