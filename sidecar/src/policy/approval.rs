//! Approval requests for held commands: an AccessGrant bound to the exact command (its
//! fingerprint), filed where approvers look — an AccessGrant object in the cluster, or a
//! manifest in the standalone policy folder.

use std::path::PathBuf;
use std::time::Duration;

use agentgate_crds::common::{format_duration, parse_duration};
use agentgate_crds::lifecycle::evaluate;
use agentgate_crds::{AccessGrant, GrantPhase, OperationClass};
use kube::api::{Api, PostParams};

use super::Snapshot;

/// How long an approval of one command stays usable (at most the identity's maximum).
const APPROVAL_WINDOW: Duration = Duration::from_secs(15 * 60);
/// How long a request waits for a decision before it lapses.
const PENDING_TTL: &str = "1h";

/// Where approval requests go.
#[derive(Clone, Default)]
pub enum Approvals {
    /// Nowhere: a held command is refused, naming what an approver must create.
    #[default]
    Disabled,
    /// Standalone: manifests in this folder (inside the policy folder, so approving one is
    /// editing it).
    Folder(PathBuf),
    /// In a cluster: AccessGrant objects in this namespace.
    Cluster {
        /// A client authenticated as the pod's service account.
        client: kube::Client,
        /// The pod's namespace.
        namespace: String,
    },
}

/// A command that needs approval.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The AgentIdentity that asked.
    pub identity: &'a str,
    /// The Target.
    pub target: &'a str,
    /// The command's class.
    pub class: OperationClass,
    /// The command's fingerprint (the grant is bound to it).
    pub fingerprint: &'a str,
    /// The command as an approver reads it, sensitive values masked.
    pub text: &'a str,
    /// The guardrail (or rule) that held it.
    pub rule: &'a str,
    /// Why it was held.
    pub message: &'a str,
}

/// A filed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filed {
    /// The AccessGrant's name.
    pub name: String,
    /// What an approver does to approve it.
    pub how_to_approve: String,
}

/// The grant already filed for this command and still waiting for a decision, if any.
fn pending<'a>(snapshot: Option<&'a Snapshot>, req: &Request<'_>) -> Option<&'a AccessGrant> {
    let s = snapshot?;
    let id = s.identities.get(req.identity);
    let now = crate::clock::now();
    s.grants.values().find(|g| {
        g.spec.identity == req.identity
            && g.spec.target == req.target
            && g.spec
                .command
                .as_ref()
                .is_some_and(|c| c.fingerprint == req.fingerprint)
            && evaluate(g, id, now).status.phase == Some(GrantPhase::Pending)
    })
}

fn approve_hint(name: &str, namespace: &str) -> String {
    format!(
        "an approver runs: kubectl patch accessgrant {name} -n {namespace} --type merge -p '{{\"spec\":{{\"decision\":{{\"verdict\":\"Approve\"}}}}}}' (or kubectl agentgate grants approve {name} -n {namespace}; to deny: \"verdict\":\"Deny\" or grants deny); then run the command again"
    )
}

impl Approvals {
    /// Files a request for `req` (idempotent: a command already waiting for a decision is not
    /// filed twice) and says which grant to wait for.
    pub async fn file(
        &self,
        snapshot: Option<&Snapshot>,
        req: &Request<'_>,
    ) -> Result<Filed, String> {
        let window = snapshot
            .and_then(|s| s.identities.get(req.identity))
            .and_then(|i| parse_duration(&i.spec.max_grant_duration).ok())
            .map_or(APPROVAL_WINDOW, |max| max.min(APPROVAL_WINDOW));
        let spec = serde_json::json!({
            "identity": req.identity,
            "target": req.target,
            "scope": { "operations": [req.class] },
            "duration": format_duration(window),
            "pendingTTL": PENDING_TTL,
            "reason": format!("held by {}: {}", req.rule, req.message),
            "command": {
                "text": req.text,
                "fingerprint": req.fingerprint,
                "operation": req.class,
                "rule": req.rule,
            },
        });
        match self {
            Approvals::Disabled => Err("approval requests are not enabled on this gateway".into()),
            Approvals::Folder(dir) => {
                let name = format!("{}-{}", req.identity, &req.fingerprint[..12]);
                let path = dir.join(format!("{name}.yaml"));
                if !path.exists() {
                    let mut spec = spec;
                    spec["requestedBy"] = serde_json::json!({ "username": format!("agentgate-sidecar:{}", req.identity) });
                    let grant = serde_json::json!({
                        "apiVersion": "agentgate.dev/v1alpha1",
                        "kind": "AccessGrant",
                        "metadata": { "name": name, "creationTimestamp": crate::clock::now().to_string() },
                        "spec": spec,
                    });
                    let yaml = serde_norway::to_string(&grant).map_err(|e| e.to_string())?;
                    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                    let tmp = dir.join(format!(".{name}.yaml.tmp"));
                    std::fs::write(&tmp, yaml).map_err(|e| format!("{}: {e}", tmp.display()))?;
                    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
                    tracing::info!(grant = %name, path = %path.display(), "filed an approval request");
                }
                Ok(Filed {
                    how_to_approve: format!(
                        "an approver adds to {}: spec.decision: {{verdict: Approve, decidedAt: <now>, decidedBy: {{username: <name>}}}}, then run the command again",
                        path.display()
                    ),
                    name,
                })
            }
            Approvals::Cluster { client, namespace } => {
                if let Some(g) = pending(snapshot, req) {
                    let name = g.metadata.name.clone().unwrap_or_default();
                    return Ok(Filed {
                        how_to_approve: approve_hint(&name, namespace),
                        name,
                    });
                }
                // generateName: a command denied or expired before can be asked for again.
                let prefix: String = format!("{}-{}-", req.identity, &req.fingerprint[..8])
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
                    .collect::<String>()
                    .to_ascii_lowercase();
                let prefix = prefix[prefix.len().saturating_sub(58)..].to_owned();
                let grant: AccessGrant = serde_json::from_value(serde_json::json!({
                    "apiVersion": "agentgate.dev/v1alpha1",
                    "kind": "AccessGrant",
                    "metadata": {
                        "generateName": prefix,
                        "labels": { "agentgate.dev/held-by": "sidecar" },
                    },
                    "spec": spec,
                }))
                .map_err(|e| e.to_string())?;
                let api: Api<AccessGrant> = Api::namespaced(client.clone(), namespace);
                let created =
                    api.create(&PostParams::default(), &grant)
                        .await
                        .map_err(|e| match e {
                            kube::Error::Api(s) => s.message,
                            other => other.to_string(),
                        })?;
                let name = created.metadata.name.unwrap_or_default();
                tracing::info!(grant = %name, namespace, "filed an approval request");
                Ok(Filed {
                    how_to_approve: approve_hint(&name, namespace),
                    name,
                })
            }
        }
    }
}

/// How long a held request of `target` waits for an approver (its `holdTimeout`; 0 when the
/// Target is unknown or the value unreadable: answer at once).
pub fn hold_timeout(snapshot: Option<&Snapshot>, target: &str) -> Duration {
    snapshot
        .and_then(|s| s.targets.get(target))
        .and_then(|t| parse_duration(&t.spec.hold_timeout).ok())
        .unwrap_or_default()
}

/// Why grant `name` of `identity` was denied, if it was.
pub fn denial(s: &Snapshot, identity: &str, name: &str) -> Option<String> {
    let g = s.grants.get(name)?;
    let status = evaluate(g, s.identities.get(identity), crate::clock::now()).status;
    if status.phase != Some(GrantPhase::Denied) {
        return None;
    }
    let decision = g.spec.decision.as_ref()?;
    let by = decision
        .decided_by
        .as_ref()
        .map_or("an approver".to_owned(), |u| u.username.clone());
    let reason = decision
        .reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    Some(format!("AccessGrant {name} was denied by {by}{reason}"))
}

/// Waits up to `wait` for an approver to decide on a held request whose AccessGrant request
/// is `grant`: `decide` is asked again at each policy change (and every second, for the
/// clock). Returns its answer once it is no longer a hold, a refusal (rule `denied`) once the
/// grant is denied, or the hold when the time is up.
pub async fn await_decision(
    policy: &super::PolicyStore,
    identity: &str,
    grant: &str,
    wait: Duration,
    decide: impl Fn() -> super::Decision,
) -> super::Decision {
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = policy.changes();
    loop {
        let d = decide();
        if d.verdict != super::Verdict::Hold {
            return d;
        }
        if let Some(denied) = policy.get().and_then(|s| denial(&s, identity, grant)) {
            return super::Decision {
                verdict: super::Verdict::Refuse,
                rule: "denied".into(),
                grant: Some(grant.to_owned()),
                message: denied,
            };
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return d;
        }
        let tick = (now + Duration::from_secs(1)).min(deadline);
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    // No more changes will come: the clock alone can change the answer.
                    tokio::time::sleep_until(tick).await;
                }
            }
            () = tokio::time::sleep_until(tick) => {}
        }
    }
}
