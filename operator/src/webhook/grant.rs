//! Approvals an auditor can trust.
//!
//! The mutating webhook stamps *who* asked, decided or revoked from the authenticated admission
//! request (never a name typed into the object). The validating webhook then enforces, each
//! refusal naming its rule:
//!
//! - `no-decision-at-creation`: a request cannot carry its own decision or revocation;
//! - `own-identity`: a service account bound to an AgentIdentity may request grants only for
//!   that identity;
//! - `identity-exists` / `identity-enabled`: the identity exists and is not disabled;
//! - `max-duration`: the duration is within the identity's `maxGrantDuration`;
//! - `command-filed-by-gateway`: a grant bound to one command (`spec.command`) is created only
//!   by the identity's own service account, i.e. its sidecar, which holds the command, or by a
//!   gateway that RBAC allows the custom verb `hold` on accessgrants (a sidecar serving
//!   identities by token runs as a service account of its own);
//! - `scope-fits-target`: the scope limits access only with settings its Target's protocol
//!   reads (`tables`, `kubernetes` or `ssh`), never with another's it would ignore;
//! - `no-self-approval`: the identity, its service account or OIDC principal (also behind an
//!   API server's user-name prefix), any agent, and the requester cannot decide;
//! - `human-decider`: a decision is a person's: service accounts, the agents the gateway
//!   acts as (`agentgate:agent:*`, group `agentgate:agents`), nodes and anonymous requests
//!   cannot decide, unless the installation names the service account in
//!   `--automation-approvers`;
//! - `approver-authorization`: the decider has the RBAC verb `approve` on the grant
//!   (SubjectAccessReview) or is listed in the identity's `spec.approvers` (a listed group
//!   of service accounts, agents or everyone makes no one an approver);
//! - `decided-in-time`: a decision comes before the request's `pendingTTL` has passed;
//! - `immutable-decision`: a decision, once made, never changes;
//! - `stamped-by-agentgate`: the recorded decider is the authenticated user.

use agentgate_crds::common::parse_duration;
use agentgate_crds::common::{Time, UserRef};
use agentgate_crds::lifecycle::pending_deadline;
use agentgate_crds::{AccessGrant, AgentIdentity, Target};
use jiff::Timestamp;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};

use super::{WebhookContext, from_cache};
use crate::approvers;

fn user_of(req: &AdmissionRequest<DynamicObject>) -> UserRef {
    UserRef {
        username: req.user_info.username.clone().unwrap_or_default(),
        uid: req.user_info.uid.clone(),
        groups: req.user_info.groups.clone().unwrap_or_default(),
    }
}

fn as_grant(
    obj: &Option<DynamicObject>,
) -> Result<Option<(serde_json::Value, AccessGrant)>, String> {
    let Some(obj) = obj else { return Ok(None) };
    let value =
        serde_json::to_value(obj).map_err(|e| format!("cannot read the AccessGrant: {e}"))?;
    let grant = serde_json::from_value(value.clone())
        .map_err(|e| format!("not a valid AccessGrant: {e}"))?;
    Ok(Some((value, grant)))
}

fn deny(
    req: &AdmissionRequest<DynamicObject>,
    rule: &str,
    msg: impl std::fmt::Display,
) -> AdmissionResponse {
    AdmissionResponse::from(req).deny(format!("agentgate rule {rule}: {msg}"))
}

/// Stamps `requestedBy`, `decision.decidedBy/At` and `revocation.revokedBy/At` from the
/// authenticated request.
pub async fn mutate(
    _ctx: &WebhookContext,
    req: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    let (value, mut grant) = match as_grant(&req.object) {
        Ok(Some(g)) => g,
        Ok(None) => return AdmissionResponse::from(req),
        Err(e) => return deny(req, "well-formed", e),
    };
    let old = match as_grant(&req.old_object) {
        Ok(o) => o.map(|(_, g)| g),
        Err(e) => return deny(req, "well-formed", e),
    };
    let user = user_of(req);
    let now = Time(Timestamp::now());
    match (&req.operation, old) {
        (Operation::Create, _) => {
            if grant.spec.decision.is_some() || grant.spec.revocation.is_some() {
                return deny(
                    req,
                    "no-decision-at-creation",
                    "a grant request cannot carry its own decision or revocation: create it without spec.decision, then an approver patches it",
                );
            }
            grant.spec.requested_by = Some(user);
        }
        (Operation::Update, Some(old)) => {
            // Keep what was stamped before; stamp what is new.
            grant.spec.requested_by = old.spec.requested_by.clone();
            match (&old.spec.decision, grant.spec.decision.as_mut()) {
                (None, Some(d)) => {
                    d.decided_by = Some(user.clone());
                    d.decided_at = Some(now.clone());
                }
                (Some(o), Some(d)) if o.verdict == d.verdict && o.reason == d.reason => {
                    d.decided_by = o.decided_by.clone();
                    d.decided_at = o.decided_at.clone();
                }
                _ => {}
            }
            match (&old.spec.revocation, grant.spec.revocation.as_mut()) {
                (None, Some(r)) => {
                    r.revoked_by = Some(user);
                    r.revoked_at = Some(now);
                }
                (Some(o), Some(r)) if o.reason == r.reason => {
                    r.revoked_by = o.revoked_by.clone();
                    r.revoked_at = o.revoked_at.clone();
                }
                _ => {}
            }
        }
        _ => return AdmissionResponse::from(req),
    }
    let mut new_value = value.clone();
    match serde_json::to_value(&grant.spec) {
        Ok(spec) => new_value["spec"] = spec,
        Err(e) => {
            return deny(
                req,
                "well-formed",
                format!("cannot encode the AccessGrant: {e}"),
            );
        }
    }
    let patch = json_patch::diff(&value, &new_value);
    match AdmissionResponse::from(req).with_patch(patch) {
        Ok(r) => r,
        Err(e) => deny(req, "well-formed", format!("cannot encode the patch: {e}")),
    }
}

fn sa_name(ns: &str, id: &AgentIdentity) -> Option<String> {
    id.spec.authentication.service_account.as_ref().map(|sa| {
        format!(
            "system:serviceaccount:{}:{}",
            sa.namespace.clone().unwrap_or_else(|| ns.to_owned()),
            sa.name
        )
    })
}

/// Whether `username` is identity `id`'s agent: its service account, or its OIDC principal
/// (bare or behind the API server's user-name prefix).
fn acts_for(ns: &str, id: &AgentIdentity, username: &str) -> bool {
    sa_name(ns, id).as_deref() == Some(username)
        || id
            .spec
            .authentication
            .oidc
            .as_ref()
            .is_some_and(|o| approvers::is_oidc_principal(username, o))
}

/// The identities (in `ns`) whose agent `username` is.
fn identities_of<'a>(ns: &str, ids: &'a [AgentIdentity], username: &str) -> Vec<&'a AgentIdentity> {
    ids.iter().filter(|id| acts_for(ns, id, username)).collect()
}

fn name_of(id: &AgentIdentity) -> String {
    id.metadata.name.clone().unwrap_or_default()
}

async fn may_approve(
    ctx: &WebhookContext,
    user: &UserRef,
    id: &AgentIdentity,
    ns: &str,
    grant: &str,
) -> Result<bool, String> {
    // A group of machines or of everyone makes no one an approver (the chart's admission
    // policy refuses such a list; an identity stored before it still has one).
    let listed = id.spec.approvers.users.iter().any(|u| u == &user.username)
        || id
            .spec
            .approvers
            .groups
            .iter()
            .filter(|g| approvers::approver_group_counts(g))
            .any(|g| user.groups.contains(g));
    if listed {
        return Ok(true);
    }
    rbac_allows(ctx, user, "approve", ns, grant).await
}

/// Whether RBAC lets `user` use `verb` on AccessGrant `grant` in `ns` (a SubjectAccessReview).
async fn rbac_allows(
    ctx: &WebhookContext,
    user: &UserRef,
    verb: &str,
    ns: &str,
    grant: &str,
) -> Result<bool, String> {
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.username.clone()),
            uid: user.uid.clone(),
            groups: Some(user.groups.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some("agentgate.dev".into()),
                resource: Some("accessgrants".into()),
                verb: Some(verb.into()),
                namespace: Some(ns.to_owned()),
                name: Some(grant.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(ctx.client.clone());
    let res = api
        .create(&PostParams::default(), &sar)
        .await
        .map_err(|e| format!("cannot check RBAC with a SubjectAccessReview: {e}"))?;
    Ok(res.status.is_some_and(|s| s.allowed))
}

/// `None` when `user` may decide `id`'s grants; otherwise the refusal (`why` says what they
/// may not do). A failed check refuses: it fails closed.
async fn require_approver(
    ctx: &WebhookContext,
    req: &AdmissionRequest<DynamicObject>,
    user: &UserRef,
    id: &AgentIdentity,
    ns: &str,
    why: impl FnOnce() -> String,
) -> Option<AdmissionResponse> {
    match may_approve(ctx, user, id, ns, &req.name).await {
        Ok(true) => None,
        Ok(false) => Some(deny(req, "approver-authorization", why())),
        Err(e) => Some(deny(
            req,
            "approver-authorization",
            format!("{e} (failing closed)"),
        )),
    }
}

/// Enforces the approval rules.
pub async fn validate(
    ctx: &WebhookContext,
    req: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    let grant = match as_grant(&req.object) {
        Ok(Some((_, g))) => g,
        Ok(None) => return AdmissionResponse::from(req),
        Err(e) => return deny(req, "well-formed", e),
    };
    let old = match as_grant(&req.old_object) {
        Ok(o) => o.map(|(_, g)| g),
        Err(e) => return deny(req, "well-formed", e),
    };
    let ns = req.namespace.clone().unwrap_or_default();
    let user = user_of(req);
    let ids_api: Api<AgentIdentity> = Api::namespaced(ctx.client.clone(), &ns);
    let ids = match ids_api.list(&from_cache()).await {
        Ok(l) => l.items,
        Err(e) => {
            return deny(
                req,
                "identity-exists",
                format!("cannot read AgentIdentities (failing closed): {e}"),
            );
        }
    };
    let identity = ids.iter().find(|i| name_of(i) == grant.spec.identity);
    let callers_identities = identities_of(&ns, &ids, &user.username);
    let max_ok = |id: &AgentIdentity| {
        // Unreadable values fail closed: no maximum, an infinite request.
        let max = parse_duration(&id.spec.max_grant_duration).unwrap_or_default();
        let want = parse_duration(&grant.spec.duration).unwrap_or(std::time::Duration::MAX);
        if want > max {
            Err(format!(
                "spec.duration {} is longer than AgentIdentity {}'s maxGrantDuration {}",
                grant.spec.duration,
                name_of(id),
                id.spec.max_grant_duration
            ))
        } else {
            Ok(())
        }
    };

    match (&req.operation, old) {
        (Operation::Create, _) => {
            if grant.spec.decision.is_some() || grant.spec.revocation.is_some() {
                return deny(
                    req,
                    "no-decision-at-creation",
                    "a grant request cannot carry its own decision or revocation",
                );
            }
            if grant.spec.requested_by.as_ref().map(|u| &u.username) != Some(&user.username) {
                return deny(
                    req,
                    "stamped-by-agentgate",
                    "spec.requestedBy must be the authenticated requester (is agentgate's mutating webhook installed?)",
                );
            }
            if !callers_identities.is_empty()
                && !callers_identities
                    .iter()
                    .any(|i| name_of(i) == grant.spec.identity)
            {
                let own: Vec<String> = callers_identities.iter().map(|i| name_of(i)).collect();
                return deny(
                    req,
                    "own-identity",
                    format!(
                        "{} acts for AgentIdentity {} and may request grants only for it, not for {}",
                        user.username,
                        own.join(", "),
                        grant.spec.identity
                    ),
                );
            }
            let Some(id) = identity else {
                return deny(
                    req,
                    "identity-exists",
                    format!("AgentIdentity {ns}/{} does not exist", grant.spec.identity),
                );
            };
            if id.spec.disabled {
                return deny(
                    req,
                    "identity-enabled",
                    format!("AgentIdentity {} is disabled", grant.spec.identity),
                );
            }
            if let Err(e) = max_ok(id) {
                return deny(req, "max-duration", e);
            }
            // A grant bound to one command is the gateway's request for the command it held:
            // the sidecar files it as the identity's service account. From anyone else the
            // text an approver reads need not be the command the fingerprint lets through.
            let own_sa = sa_name(&ns, id);
            let gateway = match &grant.spec.command {
                None => true,
                Some(_) if own_sa.as_deref() == Some(user.username.as_str()) => true,
                // A sidecar serving identities by token runs as a service account of its
                // own: RBAC's custom verb `hold` on accessgrants says it is a gateway.
                Some(_) => match rbac_allows(ctx, &user, "hold", &ns, &req.name).await {
                    Ok(allowed) => allowed,
                    Err(e) => {
                        return deny(req, "command-filed-by-gateway", e);
                    }
                },
            };
            if !gateway {
                return deny(
                    req,
                    "command-filed-by-gateway",
                    format!(
                        "command grants are filed by the gateway: spec.command is set only by the sidecar of AgentIdentity {}{}, or a gateway RBAC allows the verb `hold` on accessgrants, when a guardrail holds a command; {} is neither: request access without spec.command (operations in spec.scope)",
                        grant.spec.identity,
                        own_sa
                            .as_deref()
                            .map(|sa| format!(" (as {sa})"))
                            .unwrap_or_default(),
                        user.username
                    ),
                );
            }
            // The scope is read as the Target's gateway reads it. (A Target not created yet
            // is no reason to refuse: GitOps may apply the grant first.)
            let targets: Api<Target> = Api::namespaced(ctx.client.clone(), &ns);
            match targets.get_opt(&grant.spec.target).await {
                Ok(Some(t)) => {
                    if let Some(why) = grant.spec.scope.mismatch(t.spec.protocol) {
                        return deny(
                            req,
                            "scope-fits-target",
                            format!(
                                "Target {} is {:?}: {why}",
                                grant.spec.target, t.spec.protocol
                            ),
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    return deny(
                        req,
                        "scope-fits-target",
                        format!(
                            "cannot read Target {} (failing closed): {e}",
                            grant.spec.target
                        ),
                    );
                }
            }
            AdmissionResponse::from(req)
        }
        (Operation::Update, Some(old)) => {
            // A decision, once made, never changes (the CRD's CEL rule says so too).
            if let Some(o) = &old.spec.decision
                && grant.spec.decision.as_ref() != Some(o)
            {
                return deny(
                    req,
                    "immutable-decision",
                    format!(
                        "this grant was already {} by {}: a decision cannot be changed; to end an approved grant set spec.revocation",
                        if o.verdict == agentgate_crds::Verdict::Approve {
                            "approved"
                        } else {
                            "denied"
                        },
                        o.decided_by
                            .as_ref()
                            .map(|u| u.username.as_str())
                            .unwrap_or("someone")
                    ),
                );
            }
            if let Some(o) = &old.spec.revocation
                && grant.spec.revocation.as_ref() != Some(o)
            {
                return deny(
                    req,
                    "immutable-decision",
                    "a revocation cannot be changed once set",
                );
            }
            let deciding = old.spec.decision.is_none() && grant.spec.decision.is_some();
            let revoking = old.spec.revocation.is_none() && grant.spec.revocation.is_some();
            if !deciding && !revoking {
                return AdmissionResponse::from(req);
            }
            let Some(id) = identity else {
                return deny(
                    req,
                    "identity-exists",
                    format!("AgentIdentity {ns}/{} does not exist", grant.spec.identity),
                );
            };
            if deciding {
                let d = grant.spec.decision.as_ref();
                if d.and_then(|d| d.decided_by.as_ref()).map(|u| &u.username)
                    != Some(&user.username)
                {
                    return deny(
                        req,
                        "stamped-by-agentgate",
                        "spec.decision.decidedBy must be the authenticated user (is agentgate's mutating webhook installed?)",
                    );
                }
                // Decided in time, or not at all: an expired request stays expired.
                let now = Timestamp::now();
                let deadline = pending_deadline(&old, now);
                let at = d
                    .and_then(|d| d.decided_at.as_ref())
                    .map_or(now, |t| t.0.max(now));
                if at >= deadline {
                    return deny(
                        req,
                        "decided-in-time",
                        format!(
                            "the request expired at {deadline} (spec.pendingTTL {} after its creation); ask the agent to request again",
                            old.spec.pending_ttl
                        ),
                    );
                }
                // Self-approval, in every form.
                let own_sa = sa_name(&ns, id);
                let own_oidc = id
                    .spec
                    .authentication
                    .oidc
                    .as_ref()
                    .is_some_and(|o| approvers::is_oidc_principal(&user.username, o));
                let requester = grant.spec.requested_by.as_ref().map(|u| u.username.clone());
                let why_self = if own_sa.as_deref() == Some(user.username.as_str()) {
                    Some(format!(
                        "{} is the service account of AgentIdentity {}",
                        user.username, grant.spec.identity
                    ))
                } else if own_oidc {
                    Some(format!(
                        "{} is the OIDC principal of AgentIdentity {}",
                        user.username, grant.spec.identity
                    ))
                } else if !callers_identities.is_empty() {
                    Some(format!(
                        "{} acts for an AgentIdentity: agents never decide grants",
                        user.username
                    ))
                } else if requester.as_deref() == Some(user.username.as_str()) {
                    Some(format!(
                        "{} requested this grant: a second person must decide (four-eyes)",
                        user.username
                    ))
                } else {
                    None
                };
                if let Some(why) = why_self {
                    return deny(req, "no-self-approval", why);
                }
                if let Some(why) =
                    approvers::refuse_decider(&user, &ctx.config.automation_approvers)
                {
                    return deny(req, "human-decider", why);
                }
                if let Some(refused) = require_approver(ctx, req, &user, id, &ns, || {
                    format!(
                        "{} may not decide grants of AgentIdentity {}: it needs the RBAC verb `approve` on accessgrants.agentgate.dev, or to be listed in the identity's spec.approvers",
                        user.username, grant.spec.identity
                    )
                })
                .await
                {
                    return refused;
                }
                if d.is_some_and(|d| d.verdict == agentgate_crds::Verdict::Approve)
                    && let Err(e) = max_ok(id)
                {
                    return deny(req, "max-duration", e);
                }
            }
            if revoking {
                let r = grant.spec.revocation.as_ref();
                if r.and_then(|r| r.revoked_by.as_ref()).map(|u| &u.username)
                    != Some(&user.username)
                {
                    return deny(
                        req,
                        "stamped-by-agentgate",
                        "spec.revocation.revokedBy must be the authenticated user",
                    );
                }
                // Anyone who may approve may revoke; an agent may give up its own access.
                let own = sa_name(&ns, id).as_deref() == Some(user.username.as_str());
                let requester = grant
                    .spec
                    .requested_by
                    .as_ref()
                    .is_some_and(|u| u.username == user.username);
                if !own
                    && !requester
                    && let Some(refused) = require_approver(ctx, req, &user, id, &ns, || {
                        format!(
                            "{} may not revoke grants of AgentIdentity {}: only approvers, the requester and the identity itself may",
                            user.username, grant.spec.identity
                        )
                    })
                    .await
                    {
                        return refused;
                    }
            }
            AdmissionResponse::from(req)
        }
        _ => AdmissionResponse::from(req),
    }
}
