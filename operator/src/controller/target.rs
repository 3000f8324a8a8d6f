//! The Target controller: referenced Secrets exist and hold the keys agentgate needs.

use std::sync::Arc;

use agentgate_crds::target::TargetStatus;
use agentgate_crds::{Protocol, Target};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;

use super::{Context, error_policy, write_validation};
use crate::conditions::condition;
use crate::error::Result;

/// The Secrets a Target refers to and the keys each must hold (any one of each group).
pub fn required_secrets(t: &Target) -> Vec<(String, Vec<Vec<&'static str>>)> {
    let mut out = Vec::new();
    let spec = &t.spec;
    let tls = match spec.protocol {
        Protocol::Postgres => spec.postgres.as_ref().map(|p| &p.tls),
        Protocol::Kubernetes => spec.kubernetes.as_ref().map(|k| &k.tls),
        Protocol::Ssh => None,
    };
    if let Some(ca) = tls.and_then(|t| t.ca.as_ref()) {
        out.push((ca.name.clone(), vec![vec![]]));
    }
    match spec.protocol {
        Protocol::Postgres => {
            if let Some(p) = &spec.postgres {
                out.push((
                    p.credentials.name.clone(),
                    vec![vec!["username"], vec!["password"]],
                ));
            }
        }
        Protocol::Kubernetes => {
            if let Some(c) = spec
                .kubernetes
                .as_ref()
                .and_then(|k| k.credentials.as_ref())
            {
                out.push((c.name.clone(), vec![vec!["token", "tls.crt"]]));
            }
        }
        Protocol::Ssh => {
            if let Some(s) = &spec.ssh {
                out.push((s.credentials.name.clone(), vec![vec!["ssh-privatekey"]]));
            }
        }
    }
    out
}

async fn reconcile(target: Arc<Target>, ctx: Arc<Context>) -> Result<Action> {
    let res = reconcile_inner(target.clone(), ctx.clone()).await;
    if res.is_ok() {
        ctx.succeeded("Target", &*target);
    }
    res
}

async fn reconcile_inner(target: Arc<Target>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started("Target");
    let ns = target.namespace().unwrap_or_default();
    let old = target.status.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut problems = Vec::new();
    // The CA reference names its key explicitly.
    let ca_key = match target.spec.protocol {
        Protocol::Postgres => target.spec.postgres.as_ref().and_then(|p| p.tls.ca.clone()),
        Protocol::Kubernetes => target
            .spec
            .kubernetes
            .as_ref()
            .and_then(|k| k.tls.ca.clone()),
        Protocol::Ssh => None,
    };
    for (secret, groups) in required_secrets(&target) {
        match secrets.get_opt(&secret).await? {
            None => problems.push(format!("Secret {secret} does not exist")),
            Some(s) => {
                let data = s.data.unwrap_or_default();
                for group in groups {
                    let group: Vec<String> = if group.is_empty() {
                        ca_key
                            .iter()
                            .filter(|c| c.name == secret)
                            .map(|c| c.key.clone())
                            .collect()
                    } else {
                        group.iter().map(|k| (*k).to_owned()).collect()
                    };
                    if !group.is_empty() && !group.iter().any(|k| data.contains_key(k)) {
                        problems.push(format!("Secret {secret} has no key {}", group.join(" or ")));
                    }
                }
            }
        }
    }
    let generation = target.metadata.generation;
    let ready = problems.is_empty();
    let cond = condition(
        &old.conditions,
        "Ready",
        ready,
        if ready {
            "SecretsFound"
        } else {
            "SecretsMissing"
        },
        if ready {
            "every referenced Secret exists with the expected keys".to_owned()
        } else {
            format!(
                "{}: sidecars cannot connect upstream until this is fixed",
                problems.join("; ")
            )
        },
        generation,
        Timestamp::now(),
    );
    let status = TargetStatus {
        conditions: vec![cond.clone()],
        observed_generation: generation,
    };
    let old_reason = old.conditions.first().map(|c| c.reason.clone());
    write_validation(
        &ctx,
        &*target,
        serde_json::to_value(&status)?,
        status != old,
        old_reason.as_deref(),
        &cond,
    )
    .await
}

/// Runs the Target controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<Target> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |o, e, ctx| error_policy("Target", &*o, e, &ctx),
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}
