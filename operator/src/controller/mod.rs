//! The controllers, one per kind, and what they share.

pub mod grant;
pub mod identity;
pub mod mask;
pub mod session;
pub mod target;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;

/// What every reconciler gets.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The operator's configuration.
    pub config: Config,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Extra trust roots for OIDC issuer checks.
    pub http: crate::http::HttpClient,
    /// Consecutive failures per object, for back-off.
    pub failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl Context {
    /// A context for `client` and `config`.
    pub fn new(client: Client, config: Config, metrics: Arc<Metrics>) -> Result<Self, Error> {
        let reporter = Reporter {
            controller: "agentgate-operator".into(),
            instance: Some(config.identity()),
        };
        let http = crate::http::HttpClient::new(config.oidc_ca_file.as_deref())?;
        Ok(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            metrics,
            http,
            failures: Default::default(),
        })
    }

    /// Publishes an Event about `obj`; failures are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish an Event");
        }
    }
}

/// Writes a validated object's status when it changed, with an Event when its Ready reason
/// changes; then asks to be called again soon while not ready (referenced Secrets are not
/// watched: the operator never lists them).
pub async fn write_validation<K>(
    ctx: &Context,
    obj: &K,
    status: serde_json::Value,
    changed: bool,
    old_reason: Option<&str>,
    ready: &agentgate_crds::common::Condition,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let ok = ready.status == "True";
    if changed {
        let api: kube::Api<K> = kube::Api::namespaced(
            ctx.client.clone(),
            obj.meta().namespace.as_deref().unwrap_or_default(),
        );
        let name = obj.meta().name.clone().unwrap_or_default();
        api.patch_status(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&serde_json::json!({ "status": status })),
        )
        .await?;
        if old_reason != Some(ready.reason.as_str()) {
            ctx.event(obj, !ok, &ready.reason, "Validate", ready.message.clone())
                .await;
        }
    }
    Ok(Action::requeue(Duration::from_secs(if ok {
        300
    } else {
        10
    })))
}

/// The shared error policy: count, log, back off.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    kind: &'static str,
    obj: &K,
    err: &Error,
    ctx: &Context,
) -> Action {
    ctx.metrics.reconcile_error(kind, err.metric_label());
    let key = format!(
        "{kind}/{}/{}",
        obj.meta().namespace.as_deref().unwrap_or(""),
        obj.meta().name.as_deref().unwrap_or("")
    );
    // Exponential back-off per object: 1 s, 2 s, 4 s … up to 5 min; a success resets it.
    let failures = ctx
        .failures
        .lock()
        .map(|mut m| {
            let n = m.entry(key).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = Duration::from_secs(1u64 << failures.min(9).saturating_sub(1))
        .min(Duration::from_secs(300));
    tracing::warn!(
        kind,
        name = obj.meta().name.as_deref().unwrap_or(""),
        namespace = obj.meta().namespace.as_deref().unwrap_or(""),
        error = %err,
        retry_in = ?delay,
        "reconcile failed; retrying"
    );
    Action::requeue(delay)
}

impl Context {
    /// Forgets an object's failures after a successful reconcile.
    pub fn succeeded<K: Resource<DynamicType = ()>>(&self, kind: &str, obj: &K) {
        let key = format!(
            "{kind}/{}/{}",
            obj.meta().namespace.as_deref().unwrap_or(""),
            obj.meta().name.as_deref().unwrap_or("")
        );
        if let Ok(mut m) = self.failures.lock() {
            m.remove(&key);
        }
    }
}
