//! Admission webhooks: approvals an auditor can trust, and sidecar injection.

pub mod certs;
pub mod grant;
pub mod pod;
pub mod server;

use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::Client;
use kube::core::ObjectMeta;

use crate::config::Config;
use crate::metrics::Metrics;

/// What the webhook handlers need.
pub struct WebhookContext {
    /// The API client (identity lookups, SubjectAccessReviews).
    pub client: Client,
    /// The operator's configuration.
    pub config: Config,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The serving certificate.
    pub certs: Arc<certs::CertStore>,
}

/// How the API server reaches the webhooks.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// Through a Service (in a cluster).
    Service {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Its port.
        port: i32,
    },
    /// By URL (the API server outside the cluster, e.g. tests on loopback).
    Url(String),
}

fn client_config(endpoint: &Endpoint, path: &str) -> WebhookClientConfig {
    match endpoint {
        Endpoint::Service {
            namespace,
            name,
            port,
        } => WebhookClientConfig {
            service: Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(path.to_owned()),
                port: Some(*port),
            }),
            ..Default::default()
        },
        Endpoint::Url(base) => WebhookClientConfig {
            url: Some(format!("{}{path}", base.trim_end_matches('/'))),
            ..Default::default()
        },
    }
}

fn rule(group: &str, version: &str, resource: &str, ops: &[&str]) -> RuleWithOperations {
    RuleWithOperations {
        api_groups: Some(vec![group.to_owned()]),
        api_versions: Some(vec![version.to_owned()]),
        resources: Some(vec![resource.to_owned()]),
        operations: Some(ops.iter().map(|o| (*o).to_owned()).collect()),
        scope: Some("Namespaced".into()),
    }
}

/// The label that opts a pod into injection (`"true"`) or out of it.
pub const INJECT_LABEL: &str = "agentgate.dev/inject";
/// The annotation (or label) that names the pod's AgentIdentity.
pub const IDENTITY_ANNOTATION: &str = "agentgate.dev/identity";

/// The webhook configurations agentgate needs, as the Helm chart installs them: every webhook
/// fails closed (`failurePolicy: Fail`), and the operator's own namespace is never injected.
pub fn configurations(
    config: &Config,
    endpoint: &Endpoint,
) -> (MutatingWebhookConfiguration, ValidatingWebhookConfiguration) {
    let not_system = LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "NotIn".into(),
            values: Some(vec![config.namespace.clone(), "kube-system".into()]),
        }]),
        ..Default::default()
    };
    let opted_in = LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: INJECT_LABEL.into(),
            operator: "In".into(),
            values: Some(vec!["true".into()]),
        }]),
        ..Default::default()
    };
    let mutating = MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(config.mutating_webhook.clone()),
            ..Default::default()
        },
        webhooks: Some(vec![
            MutatingWebhook {
                name: "grants.mutate.agentgate.dev".into(),
                client_config: client_config(endpoint, "/mutate/accessgrants"),
                rules: Some(vec![rule(
                    "agentgate.dev",
                    "v1alpha1",
                    "accessgrants",
                    &["CREATE", "UPDATE"],
                )]),
                failure_policy: Some("Fail".into()),
                side_effects: "None".into(),
                admission_review_versions: vec!["v1".into()],
                timeout_seconds: Some(10),
                reinvocation_policy: Some("Never".into()),
                ..Default::default()
            },
            MutatingWebhook {
                name: "pods.inject.agentgate.dev".into(),
                client_config: client_config(endpoint, "/mutate/pods"),
                rules: Some(vec![
                    rule("", "v1", "pods", &["CREATE", "UPDATE"]),
                    // `kubectl debug` adds containers through this subresource.
                    rule("", "v1", "pods/ephemeralcontainers", &["UPDATE"]),
                ]),
                failure_policy: Some("Fail".into()),
                side_effects: "None".into(),
                admission_review_versions: vec!["v1".into()],
                timeout_seconds: Some(10),
                namespace_selector: Some(not_system.clone()),
                object_selector: Some(opted_in),
                reinvocation_policy: Some("IfNeeded".into()),
                ..Default::default()
            },
        ]),
    };
    let validating = ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(config.validating_webhook.clone()),
            ..Default::default()
        },
        webhooks: Some(vec![ValidatingWebhook {
            name: "grants.validate.agentgate.dev".into(),
            client_config: client_config(endpoint, "/validate/accessgrants"),
            rules: Some(vec![rule(
                "agentgate.dev",
                "v1alpha1",
                "accessgrants",
                &["CREATE", "UPDATE"],
            )]),
            failure_policy: Some("Fail".into()),
            side_effects: "None".into(),
            admission_review_versions: vec!["v1".into()],
            timeout_seconds: Some(10),
            ..Default::default()
        }]),
    };
    (mutating, validating)
}

/// Lists in the webhooks are served from the API server's watch cache (`resourceVersion=0`).
/// A consistent list waits for that cache to catch up with etcd after any write (tens of
/// milliseconds, which every admission would pay); a list a moment old decides the same as
/// one taken when the request was sent.
pub(crate) fn from_cache() -> kube::api::ListParams {
    kube::api::ListParams::default().match_any()
}
