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

/// The shared error policy: count, log, back off.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    kind: &'static str,
    obj: &K,
    err: &Error,
    ctx: &Context,
) -> Action {
    ctx.metrics.reconcile_error(kind, err.metric_label());
    tracing::warn!(
        kind,
        name = obj.meta().name.as_deref().unwrap_or(""),
        namespace = obj.meta().namespace.as_deref().unwrap_or(""),
        error = %err,
        "reconcile failed; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}
