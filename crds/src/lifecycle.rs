//! The AccessGrant lifecycle as a pure function of the grant, its identity and the clock.
//!
//! `Pending → Approved → Active → Expired`, or `Denied` / `Revoked`. The operator writes what
//! [`evaluate`] says and asks to be called again when the next transition is due; the sidecar
//! uses the same function to enforce expiry itself (a grant stops working at `expiresAt` even
//! when the operator is down) and, standalone, to run grants from a folder of manifests.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Resource;
use kube::ResourceExt;

use crate::common::{Condition, Time, UserRef, parse_duration};
use crate::{AccessGrant, AccessGrantStatus, AgentIdentity, GrantPhase, Verdict};

/// Builds a condition, keeping `lastTransitionTime` from `old` when the status is unchanged.
pub fn condition(
    old: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// What the lifecycle says a grant's status should be, and when to look again.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The status to write.
    pub status: AccessGrantStatus,
    /// When the next transition is due.
    pub requeue: Option<Duration>,
}

fn ts(t: &Option<Time>) -> Option<Timestamp> {
    t.as_ref().map(|t| t.0)
}

fn until(now: Timestamp, then: Timestamp) -> Duration {
    let d = then.duration_since(now);
    // A little past the instant, so the next evaluation sees it reached.
    Duration::try_from(d).unwrap_or_default() + Duration::from_millis(5)
}

fn who(u: &Option<UserRef>) -> String {
    u.as_ref()
        .map(|u| u.username.clone())
        .unwrap_or_else(|| "an unknown user".into())
}

/// When a request stops waiting for a decision: its creation plus `spec.pendingTTL` (an
/// unreadable TTL counts as the default hour; a grant not stored yet counts from `now`). A
/// decision made at or after it is too late: [`evaluate`] calls the grant expired, and the
/// operator's webhook refuses the decision.
pub fn pending_deadline(grant: &AccessGrant, now: Timestamp) -> Timestamp {
    let created = grant
        .meta()
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(now);
    let ttl = parse_duration(&grant.spec.pending_ttl).unwrap_or(Duration::from_secs(3600));
    SignedDuration::try_from(ttl)
        .ok()
        .and_then(|ttl| created.checked_add(ttl).ok())
        .unwrap_or(Timestamp::MAX)
}

/// The grant's lifecycle at `now`. `identity` is `None` when the AgentIdentity does not exist.
pub fn evaluate(
    grant: &AccessGrant,
    identity: Option<&AgentIdentity>,
    now: Timestamp,
) -> Evaluation {
    let spec = &grant.spec;
    let old = grant.status.clone().unwrap_or_default();
    let generation = grant.metadata.generation;
    let mut st = old.clone();
    st.observed_generation = generation;

    let finish = |mut st: AccessGrantStatus,
                  phase: GrantPhase,
                  reason: &str,
                  message: String,
                  at: Timestamp,
                  by: Option<UserRef>| {
        st.phase = Some(phase);
        st.ended_at = Some(Time(at));
        st.ended_by = by;
        st.conditions = vec![condition(
            &old.conditions,
            "Ready",
            false,
            reason,
            message.clone(),
            generation,
            now,
        )];
        st.message = Some(message);
        Evaluation {
            status: st,
            requeue: None,
        }
    };

    // A final phase never changes.
    if let Some(phase) = old.phase
        && phase.is_final()
    {
        return Evaluation {
            status: st,
            requeue: None,
        };
    }

    if grant.meta().deletion_timestamp.is_some() {
        let msg = "revoked: the AccessGrant was deleted".to_owned();
        return finish(st, GrantPhase::Revoked, "Deleted", msg, now, None);
    }
    if let Some(rev) = &spec.revocation {
        let at = ts(&rev.revoked_at).unwrap_or(now);
        let msg = format!(
            "revoked by {}{}",
            who(&rev.revoked_by),
            rev.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        return finish(
            st,
            GrantPhase::Revoked,
            "Revoked",
            msg,
            at,
            rev.revoked_by.clone(),
        );
    }
    match identity {
        None => {
            let msg = format!("revoked: AgentIdentity {} does not exist", spec.identity);
            return finish(st, GrantPhase::Revoked, "IdentityNotFound", msg, now, None);
        }
        Some(id) if id.spec.disabled => {
            let msg = format!("revoked: AgentIdentity {} is disabled", spec.identity);
            return finish(st, GrantPhase::Revoked, "IdentityDisabled", msg, now, None);
        }
        Some(_) => {}
    }

    let deadline = pending_deadline(grant, now);
    // An approval made after the request expired approves nothing: the request is expired.
    // (A late denial ends it all the same; it is left Denied.)
    if let Some(d) = &spec.decision
        && d.verdict == Verdict::Approve
    {
        let decided = ts(&d.decided_at).or(ts(&old.approved_at)).unwrap_or(now);
        if decided >= deadline {
            let msg = format!(
                "expired: the decision by {} came at {decided}, after the pending TTL of {} ended at {deadline}",
                who(&d.decided_by),
                spec.pending_ttl
            );
            return finish(
                st,
                GrantPhase::Expired,
                "PendingTimeout",
                msg,
                deadline,
                None,
            );
        }
    }
    match &spec.decision {
        None => {
            if now >= deadline {
                let msg = format!(
                    "expired: nobody decided within the pending TTL of {}",
                    spec.pending_ttl
                );
                return finish(
                    st,
                    GrantPhase::Expired,
                    "PendingTimeout",
                    msg,
                    deadline,
                    None,
                );
            }
            st.phase = Some(GrantPhase::Pending);
            let msg = format!(
                "waiting for an approver until {deadline}: kubectl agentgate grants approve {name}{ns} (or kubectl patch accessgrant {name}{ns} --type merge -p '{{\"spec\":{{\"decision\":{{\"verdict\":\"Approve\"}}}}}}')",
                name = grant.name_any(),
                ns = grant
                    .metadata
                    .namespace
                    .as_deref()
                    .map(|n| format!(" -n {n}"))
                    .unwrap_or_default()
            );
            st.conditions = vec![condition(
                &old.conditions,
                "Ready",
                false,
                "PendingApproval",
                msg.clone(),
                generation,
                now,
            )];
            st.message = Some(msg);
            Evaluation {
                status: st,
                requeue: Some(until(now, deadline)),
            }
        }
        Some(d) if d.verdict == Verdict::Deny => {
            let at = ts(&d.decided_at).unwrap_or(now);
            let msg = format!(
                "denied by {}{}",
                who(&d.decided_by),
                d.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
            finish(
                st,
                GrantPhase::Denied,
                "Denied",
                msg,
                at,
                d.decided_by.clone(),
            )
        }
        Some(d) => {
            // The clock starts at approval.
            let approved = ts(&d.decided_at).or(ts(&old.approved_at)).unwrap_or(now);
            let dur = match parse_duration(&spec.duration) {
                Ok(dur) => dur,
                Err(e) => {
                    let msg = format!("revoked: {e}");
                    return finish(st, GrantPhase::Revoked, "InvalidDuration", msg, now, None);
                }
            };
            // Checked: a decision dated near the end of time (a manifest edited by hand) must
            // not panic, and a grant whose end cannot be told is not in force.
            let Some(expires) = SignedDuration::try_from(dur)
                .ok()
                .and_then(|d| approved.checked_add(d).ok())
            else {
                let msg = format!(
                    "revoked: spec.duration {} from the approval at {approved} ends past the last time agentgate can represent; request the grant again",
                    spec.duration
                );
                return finish(st, GrantPhase::Revoked, "InvalidDuration", msg, now, None);
            };
            st.approved_by = d.decided_by.clone();
            st.approved_at = Some(Time(approved));
            st.expires_at = Some(Time(expires));
            if now >= expires {
                let msg = format!("expired at {expires} after {}", spec.duration);
                return finish(st, GrantPhase::Expired, "Expired", msg, expires, None);
            }
            st.phase = Some(GrantPhase::Active);
            let msg = format!("active until {expires}: approved by {}", who(&d.decided_by));
            st.conditions = vec![condition(
                &old.conditions,
                "Ready",
                true,
                "Active",
                msg.clone(),
                generation,
                now,
            )];
            st.message = Some(msg);
            Evaluation {
                status: st,
                requeue: Some(until(now, expires)),
            }
        }
    }
}

/// Whether `grant` is in force at `now`, judged by the sidecar itself: Active in status, not
/// being deleted, not revoked in spec, and before its own `expiresAt` — so a grant stops
/// working on time even when the operator is down.
pub fn in_force(grant: &AccessGrant, identity: Option<&AgentIdentity>, now: Timestamp) -> bool {
    let status = evaluate(grant, identity, now).status;
    status.phase == Some(GrantPhase::Active)
        && status.expires_at.is_some_and(|e| now < e.0)
        && grant.meta().deletion_timestamp.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        AccessGrantSpec, AccessScope, AgentIdentitySpec, GrantDecision, GrantRevocation,
        OperationClass,
    };

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn grant() -> AccessGrant {
        let mut g = AccessGrant::new(
            "g",
            AccessGrantSpec {
                identity: "claude".into(),
                target: "db".into(),
                scope: AccessScope {
                    operations: vec![OperationClass::Write],
                    ..Default::default()
                },
                duration: "30m".into(),
                reason: "r".into(),
                command: None,
                pending_ttl: "1h".into(),
                requested_by: None,
                decision: None,
                revocation: None,
            },
        );
        g.metadata.creation_timestamp = Some(Time(t("2026-11-22T10:00:00Z")));
        g
    }

    fn identity(disabled: bool) -> AgentIdentity {
        AgentIdentity::new(
            "claude",
            AgentIdentitySpec {
                owner: "team".into(),
                description: None,
                authentication: Default::default(),
                baseline: vec![],
                approvers: Default::default(),
                max_grant_duration: "1h".into(),
                disabled,
            },
        )
    }

    fn alice() -> Option<UserRef> {
        Some(UserRef {
            username: "alice".into(),
            ..Default::default()
        })
    }

    #[test]
    fn pending_until_the_ttl_then_expired() {
        let g = grant();
        let id = identity(false);
        let e = evaluate(&g, Some(&id), t("2026-11-22T10:10:00Z"));
        assert_eq!(e.status.phase, Some(GrantPhase::Pending));
        assert_eq!(e.requeue.map(|d| d.as_secs()), Some(50 * 60));
        let e = evaluate(&g, Some(&id), t("2026-11-22T11:00:00Z"));
        assert_eq!(e.status.phase, Some(GrantPhase::Expired));
        assert_eq!(e.status.conditions[0].reason, "PendingTimeout");
    }

    #[test]
    fn the_clock_starts_at_approval() {
        let mut g = grant();
        g.spec.decision = Some(GrantDecision {
            verdict: Verdict::Approve,
            reason: None,
            decided_by: alice(),
            decided_at: Some(Time(t("2026-11-22T10:40:00Z"))),
        });
        let id = identity(false);
        let e = evaluate(&g, Some(&id), t("2026-11-22T10:45:00Z"));
        assert_eq!(e.status.phase, Some(GrantPhase::Active));
        assert_eq!(e.status.expires_at, Some(Time(t("2026-11-22T11:10:00Z"))));
        assert_eq!(e.status.approved_by, alice());
        assert_eq!(e.requeue.map(|d| d.as_secs()), Some(25 * 60));
        let e = evaluate(&g, Some(&id), t("2026-11-22T11:10:00Z"));
        assert_eq!(e.status.phase, Some(GrantPhase::Expired));
        // Final phases never change, even if the decision were somehow different.
        let mut done = g.clone();
        done.status = Some(e.status.clone());
        let again = evaluate(&done, Some(&id), t("2026-11-22T12:00:00Z"));
        assert_eq!(again.status.phase, Some(GrantPhase::Expired));
    }

    #[test]
    fn a_decision_after_the_pending_ttl_is_too_late() {
        let id = identity(false);
        let decided = |verdict, at: &str| {
            let mut g = grant();
            g.spec.decision = Some(GrantDecision {
                verdict,
                reason: None,
                decided_by: alice(),
                decided_at: Some(Time(t(at))),
            });
            g
        };
        // Created 10:00 with a pending TTL of 1h: approved at 10:59:59, it runs its 30m.
        let g = decided(Verdict::Approve, "2026-11-22T10:59:59Z");
        let e = evaluate(&g, Some(&id), t("2026-11-22T11:05:00Z"));
        assert_eq!(e.status.phase, Some(GrantPhase::Active));
        assert_eq!(
            pending_deadline(&g, t("2026-11-22T12:00:00Z")),
            t("2026-11-22T11:00:00Z")
        );
        // Approved at 11:00 or later, it never starts: the request had expired.
        for at in ["2026-11-22T11:00:00Z", "2026-11-22T13:00:00Z"] {
            let g = decided(Verdict::Approve, at);
            let e = evaluate(&g, Some(&id), t("2026-11-22T13:00:01Z"));
            assert_eq!(e.status.phase, Some(GrantPhase::Expired), "{at}");
            assert_eq!(e.status.conditions[0].reason, "PendingTimeout");
            assert_eq!(e.status.ended_at, Some(Time(t("2026-11-22T11:00:00Z"))));
            assert_eq!(e.status.approved_at, None);
            assert!(
                e.status
                    .message
                    .as_deref()
                    .is_some_and(|m| m.contains("after the pending TTL of 1h ended")),
                "{:?}",
                e.status.message
            );
            assert!(!in_force(&g, Some(&id), t("2026-11-22T13:00:01Z")));
        }
        // A decision with no time (a manifest edited by hand) is dated when it is first seen.
        let mut g = decided(Verdict::Approve, "2026-11-22T10:30:00Z");
        if let Some(d) = g.spec.decision.as_mut() {
            d.decided_at = None;
        }
        let e = evaluate(&g, Some(&id), t("2026-11-22T11:30:00Z"));
        assert_eq!(e.status.phase, Some(GrantPhase::Expired));
        // A late denial stays a denial: either way nothing runs.
        let g = decided(Verdict::Deny, "2026-11-22T11:10:00Z");
        let e = evaluate(&g, Some(&id), t("2026-11-22T11:10:00Z"));
        assert_eq!(e.status.phase, Some(GrantPhase::Denied));
        // A TTL too large to add to a time does not panic.
        let mut g = grant();
        g.spec.pending_ttl = "9999999999999h".into();
        let _ = evaluate(&g, Some(&id), t("2026-11-22T11:10:00Z"));
    }

    #[test]
    fn an_end_past_the_last_representable_time_is_not_in_force_and_does_not_panic() {
        let id = identity(false);
        let mut g = grant();
        g.metadata.creation_timestamp = Some(Time(t("9999-12-29T00:00:00Z")));
        g.spec.duration = "168h".into();
        g.spec.decision = Some(GrantDecision {
            verdict: Verdict::Approve,
            reason: None,
            decided_by: alice(),
            decided_at: Some(Time(t("9999-12-29T00:30:00Z"))),
        });
        let now = t("9999-12-29T00:40:00Z");
        let e = evaluate(&g, Some(&id), now);
        assert_eq!(e.status.phase, Some(GrantPhase::Revoked));
        assert_eq!(e.status.conditions[0].reason, "InvalidDuration");
        assert!(
            e.status
                .message
                .as_deref()
                .is_some_and(|m| m.contains("ends past the last time")),
            "{:?}",
            e.status.message
        );
        assert!(!in_force(&g, Some(&id), now));
        // A duration larger than any time span: the same, no panic.
        g.spec.duration = "9999999999999h".into();
        assert!(!in_force(&g, Some(&id), now));
    }

    #[test]
    fn denial_revocation_and_disabled_identities_end_it() {
        let id = identity(false);
        let mut g = grant();
        g.spec.decision = Some(GrantDecision {
            verdict: Verdict::Deny,
            reason: Some("not now".into()),
            decided_by: alice(),
            decided_at: None,
        });
        let e = evaluate(&g, Some(&id), t("2026-11-22T10:01:00Z"));
        assert_eq!(e.status.phase, Some(GrantPhase::Denied));
        assert_eq!(
            e.status.message.as_deref(),
            Some("denied by alice: not now")
        );

        let mut g = grant();
        g.spec.decision = Some(GrantDecision {
            verdict: Verdict::Approve,
            reason: None,
            decided_by: alice(),
            decided_at: Some(Time(t("2026-11-22T10:00:00Z"))),
        });
        g.spec.revocation = Some(GrantRevocation {
            reason: Some("done".into()),
            revoked_by: alice(),
            revoked_at: Some(Time(t("2026-11-22T10:05:00Z"))),
        });
        let e = evaluate(&g, Some(&id), t("2026-11-22T10:06:00Z"));
        assert_eq!(e.status.phase, Some(GrantPhase::Revoked));
        assert_eq!(e.status.ended_by, alice());

        let g = grant();
        let e = evaluate(&g, Some(&identity(true)), t("2026-11-22T10:01:00Z"));
        assert_eq!(e.status.phase, Some(GrantPhase::Revoked));
        assert_eq!(e.status.conditions[0].reason, "IdentityDisabled");
        let e = evaluate(&g, None, t("2026-11-22T10:01:00Z"));
        assert_eq!(e.status.conditions[0].reason, "IdentityNotFound");
    }
}
