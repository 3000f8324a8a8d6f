//! The pod's own identity: its projected service-account token (audience `agentgate`),
//! verified by the API server (TokenReview), re-checked as the kubelet rotates it.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use super::AUDIENCE;

/// Why a TokenReview did not confirm a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The API server could not be asked, or did not answer in time: nothing is known.
    #[error("{0}")]
    Unreachable(String),
    /// The API server answered: the token is not good (its pod or account is gone, another
    /// audience, not a service account's).
    #[error("{0}")]
    Refused(String),
}

/// How long a TokenReview may take.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the API server who `token` belongs to (for audience `agentgate`).
pub async fn review(client: &kube::Client, token: &str) -> Result<String, String> {
    review_for(client, token, &[AUDIENCE.to_owned()])
        .await
        .map_err(|e| e.to_string())
}

/// Asks the API server who `token` belongs to, for one of `audiences`.
pub async fn review_for(
    client: &kube::Client,
    token: &str,
    audiences: &[String],
) -> Result<String, ReviewError> {
    match tokio::time::timeout(REVIEW_TIMEOUT, ask(client, token, audiences)).await {
        Ok(r) => r,
        Err(_) => Err(ReviewError::Unreachable(format!(
            "TokenReview did not answer within {} s",
            REVIEW_TIMEOUT.as_secs()
        ))),
    }
}

async fn ask(
    client: &kube::Client,
    token: &str,
    audiences: &[String],
) -> Result<String, ReviewError> {
    let api: Api<TokenReview> = Api::all(client.clone());
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: token.trim().to_owned(),
            audiences: Some(audiences.to_vec()),
        },
        ..Default::default()
    };
    let out = api
        .create(&PostParams::default(), &tr)
        .await
        .map_err(|e| ReviewError::Unreachable(format!("TokenReview failed: {e}")))?;
    let status = out.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(ReviewError::Refused(format!(
            "the API server did not accept the pod's token: {}",
            status
                .error
                .unwrap_or_else(|| "not authenticated".to_owned())
        )));
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| audiences.contains(x)))
    {
        return Err(ReviewError::Refused(format!(
            "the token is not for audience {}",
            audiences.join(" or ")
        )));
    }
    status
        .user
        .and_then(|u| u.username)
        .filter(|u| u.starts_with("system:serviceaccount:"))
        .ok_or_else(|| {
            ReviewError::Refused("the pod's token does not belong to a service account".to_owned())
        })
}

/// Verifies the token in `file` now and then every `every`, keeping the result in `slot`.
pub async fn keep_verified(
    client: kube::Client,
    file: PathBuf,
    slot: Arc<RwLock<Result<String, String>>>,
    every: Duration,
) {
    loop {
        let result = match tokio::fs::read_to_string(&file).await {
            Ok(token) => review(&client, &token).await,
            Err(e) => Err(format!("cannot read {}: {e}", file.display())),
        };
        match &result {
            Ok(user) => tracing::debug!(%user, "pod token verified"),
            Err(e) => tracing::warn!(error = %e, "pod token not verified"),
        }
        let wait = if result.is_ok() {
            every
        } else {
            Duration::from_secs(2)
        };
        if let Ok(mut s) = slot.write() {
            *s = result;
        }
        tokio::time::sleep(wait).await;
    }
}

/// Whether the pod, verified as `pod_user`, may act as AgentIdentity `identity`: its service
/// account must be the one the identity names.
pub fn check(
    pod_user: &RwLock<Result<String, String>>,
    snapshot: &crate::policy::Snapshot,
    identity: &str,
) -> Result<(), String> {
    let verified = pod_user
        .read()
        .map_err(|_| "the pod identity check failed".to_owned())?
        .clone()
        .map_err(|e| format!("the pod's service-account token is not verified: {e}"))?;
    let Some(id) = snapshot.identities.get(identity) else {
        return Err(format!(
            "no AgentIdentity {identity} is known to this gateway"
        ));
    };
    let expected = id.spec.authentication.service_account.as_ref().map(|sa| {
        let ns = sa
            .namespace
            .clone()
            .or_else(|| id.metadata.namespace.clone())
            .unwrap_or_else(|| "default".into());
        format!("system:serviceaccount:{ns}:{}", sa.name)
    });
    match expected {
        // Every pod of the namespace that names no service account runs as `default`.
        Some(e) if e.ends_with(":default") => Err(format!(
            "AgentIdentity {identity} is bound to {e}, the namespace's default service account, which every pod that names none runs as: give the agent a service account of its own"
        )),
        Some(e) if e == verified => Ok(()),
        Some(e) => Err(format!(
            "this pod runs as {verified}, but AgentIdentity {identity} is bound to {e}: refusing to act as it"
        )),
        None => Err(format!(
            "AgentIdentity {identity} names no service account, so this pod ({verified}) cannot act as it"
        )),
    }
}
