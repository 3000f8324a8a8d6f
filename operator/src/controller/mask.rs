//! The MaskPolicy controller: patterns compile, the hash key exists.

use std::sync::Arc;

use agentgate_crds::{MaskAction, MaskPolicy, MaskPolicyStatus};
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

/// The most a custom pattern may compile to: a bound on the cost of masking every value.
pub const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// The shortest accepted key for the `Hash` action.
pub const MIN_HASH_KEY_BYTES: usize = 32;

/// Problems with a policy's rules that need no API call: patterns that do not compile.
pub fn check_patterns(policy: &MaskPolicy) -> Vec<String> {
    let mut problems = Vec::new();
    for rule in &policy.spec.rules {
        for (i, p) in rule.patterns.iter().enumerate() {
            if let Err(e) = regex::RegexBuilder::new(p)
                .size_limit(PATTERN_SIZE_LIMIT)
                .build()
            {
                problems.push(format!(
                    "rule {} patterns[{i}] does not compile: {}",
                    rule.name,
                    e.to_string().lines().last().unwrap_or_default()
                ));
            }
        }
    }
    problems
}

async fn reconcile(policy: Arc<MaskPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let res = reconcile_inner(policy.clone(), ctx.clone()).await;
    if res.is_ok() {
        ctx.succeeded("MaskPolicy", &*policy);
    }
    res
}

async fn reconcile_inner(policy: Arc<MaskPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started("MaskPolicy");
    let ns = policy.namespace().unwrap_or_default();
    let old = policy.status.clone().unwrap_or_default();
    let mut problems = check_patterns(&policy);
    let uses_hash = policy
        .spec
        .rules
        .iter()
        .any(|r| r.action == MaskAction::Hash);
    if uses_hash && let Some(key) = &policy.spec.hash_key {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        match secrets.get_opt(&key.name).await? {
            None => problems.push(format!("hash key Secret {} does not exist", key.name)),
            Some(s) => match s.data.as_ref().and_then(|d| d.get(&key.key)) {
                None => problems.push(format!(
                    "hash key Secret {} has no key {}",
                    key.name, key.key
                )),
                Some(v) if v.0.len() < MIN_HASH_KEY_BYTES => problems.push(format!(
                    "hash key {}/{} is {} bytes; at least {MIN_HASH_KEY_BYTES} are needed",
                    key.name,
                    key.key,
                    v.0.len()
                )),
                Some(_) => {}
            },
        }
    }
    let generation = policy.metadata.generation;
    let ready = problems.is_empty();
    let cond = condition(
        &old.conditions,
        "Ready",
        ready,
        if ready { "Valid" } else { "Invalid" },
        if ready {
            format!("{} rules valid", policy.spec.rules.len())
        } else {
            format!(
                "{}; sidecars refuse traffic this policy covers until it is fixed",
                problems.join("; ")
            )
        },
        generation,
        Timestamp::now(),
    );
    let status = MaskPolicyStatus {
        conditions: vec![cond.clone()],
        observed_generation: generation,
        rules: u32::try_from(policy.spec.rules.len()).ok(),
    };
    let old_reason = old.conditions.first().map(|c| c.reason.clone());
    write_validation(
        &ctx,
        &*policy,
        serde_json::to_value(&status)?,
        status != old,
        old_reason.as_deref(),
        &cond,
    )
    .await
}

/// Runs the MaskPolicy controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<MaskPolicy> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |o, e, ctx| error_policy("MaskPolicy", &*o, e, &ctx),
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}
