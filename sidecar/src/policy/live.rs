//! Access that outlives its request: a watch, a followed log, an exec or attach session, a
//! port forward, an SSH channel, a running statement. Each was decided when it began; it ends
//! as soon as the same request would no longer be allowed: a grant it used expired or was
//! revoked, the identity was disabled, a guardrail now blocks it, or the policy could no
//! longer be kept current (fail closed).

use std::sync::Arc;
use std::time::Duration;

use super::{Command, Decision, PolicyStore, Snapshot, Verdict, decide};

/// Resolves when `cmd`, for `identity` on `target`, is no longer allowed, with the decision
/// that says why. It is decided again each time the policy changes and when the grant that
/// allows it reaches its expiry (the sidecar's clock, whatever the operator does).
pub async fn ended(
    store: Arc<PolicyStore>,
    identity: String,
    target: String,
    cmd: Command,
) -> Decision {
    ended_when(store, &identity.clone(), move |snapshot, now| {
        decide(snapshot, &identity, &target, &cmd, now)
    })
    .await
}

/// How often a request allowed by something other than a grant with a known expiry is
/// decided again, besides at each policy change.
const RECHECK: Duration = Duration::from_secs(10);

/// Resolves when `check` (a gateway's own decision for a request of `identity`) no longer
/// allows it. Decided again at each policy change, when the grant it names expires, and at
/// least every ten seconds.
pub async fn ended_when(
    store: Arc<PolicyStore>,
    identity: &str,
    check: impl Fn(Option<&Snapshot>, jiff::Timestamp) -> Decision,
) -> Decision {
    let mut changes = store.changes();
    loop {
        changes.borrow_and_update();
        let snapshot = store.get();
        let now = crate::clock::now();
        let d = check(snapshot.as_deref(), now);
        if d.verdict != Verdict::Allow {
            return d;
        }
        // When the grant that allows it runs out, unless the policy changes first.
        let expires = snapshot.as_deref().and_then(|s| {
            let grant = s.grants.get(d.grant.as_deref()?)?;
            let status =
                agentgate_crds::lifecycle::evaluate(grant, s.identities.get(identity), now).status;
            status.expires_at.map(|e| e.0)
        });
        let wait = expires.map_or(RECHECK, |e| {
            Duration::try_from(e.duration_since(now))
                .unwrap_or_default()
                .saturating_add(Duration::from_millis(1))
                .min(RECHECK)
        });
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    // The store is gone: the sidecar is stopping.
                    std::future::pending::<()>().await;
                }
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// What an agent is told when its access ended mid-request.
pub fn message(d: &Decision) -> String {
    format!(
        "agentgate: access ended while the request ran: {} (rule {}); the request was stopped",
        d.message, d.rule
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;
    use crate::policy::folder;
    use crate::sql::classify;

    fn policy(disabled: bool, grant_decided: jiff::Timestamp) -> crate::policy::Snapshot {
        folder::load_str(&format!(
            r#"
apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: db }}
spec: {{ protocol: Postgres, postgres: {{ host: h, database: d, credentials: {{ name: c }} }} }}
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: claude }}
spec:
  owner: t
  disabled: {disabled}
  authentication: {{ serviceAccount: {{ name: claude }} }}
  baseline: [ {{ target: db, scope: {{ operations: [Read] }} }} ]
---
apiVersion: agentgate.dev/v1alpha1
kind: AccessGrant
metadata: {{ name: write-db, creationTimestamp: "{grant_decided}" }}
spec:
  identity: claude
  target: db
  scope: {{ operations: [Write] }}
  duration: 10s
  reason: fix
  decision: {{ verdict: Approve, decidedAt: "{grant_decided}", decidedBy: {{ username: alice }} }}
"#
        ))
        .expect("the policy loads")
    }

    fn command(sql: &str) -> Command {
        Command::from(&classify(sql).expect("classified"))
    }

    #[tokio::test]
    async fn a_request_ends_when_its_grant_expires_or_the_identity_is_disabled() {
        let store = Arc::new(PolicyStore::default());
        let now = crate::clock::now();
        // Decided 8 s ago for 10 s: it runs out 2 s from now.
        let decided = now - jiff::SignedDuration::from_secs(8);
        store.set(policy(false, decided));
        let write = command("UPDATE orders SET state = 'x' WHERE id = 1");
        let read = command("SELECT * FROM orders");
        let snapshot = store.get().unwrap();
        assert_eq!(
            decide(Some(&snapshot), "claude", "db", &write, now).verdict,
            Verdict::Allow
        );
        let ends = |cmd: &Command| {
            tokio::spawn(ended(
                store.clone(),
                "claude".into(),
                "db".into(),
                cmd.clone(),
            ))
        };
        let writing = ends(&write);
        let reading = ends(&read);
        // The grant runs out by the sidecar's clock (2 s), with no change to the policy.
        let d = tokio::time::timeout(Duration::from_secs(10), writing)
            .await
            .expect("the write ends when its grant expires")
            .unwrap();
        assert_ne!(d.verdict, Verdict::Allow);
        assert!(
            d.message
                .contains("no baseline or active grant allows Write"),
            "{d:?}"
        );
        // The read, allowed by the baseline, goes on through an unrelated change…
        store.set(policy(false, crate::clock::now()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!reading.is_finished());
        // …and ends when the identity is disabled.
        store.set(policy(true, crate::clock::now()));
        let d = tokio::time::timeout(Duration::from_secs(5), reading)
            .await
            .expect("the read ends when the identity is disabled")
            .unwrap();
        assert_eq!(d.rule, "identity-disabled");
        // Dropping the policy (it could not be kept current) ends everything.
        store.set(policy(false, crate::clock::now()));
        let again = ends(&read);
        tokio::time::sleep(Duration::from_millis(50)).await;
        store.clear("the watch broke".into());
        let d = tokio::time::timeout(Duration::from_secs(5), again)
            .await
            .expect("ends when the policy is dropped")
            .unwrap();
        assert_eq!(d.rule, "policy-not-loaded");
    }
}
