//! In-cluster policy: watches of AgentIdentity, AccessGrant, MaskPolicy and Target in the
//! pod's namespace, kept in local caches (reflectors). The gateways never call the API server
//! on the hot path: every change rebuilds the snapshot they read.
//!
//! Fail closed: nothing is served until all four kinds are listed, and when a watch has been
//! broken for longer than the staleness limit the policy is dropped (a revocation could be
//! missed), so everything is refused, with the reason, until the watch is back.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate_crds::{AccessGrant, AgentIdentity, MaskPolicy, Target};
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector::store::Writer};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::{PolicyStore, Snapshot};

/// What a watch reports to the loop that builds snapshots.
enum Signal {
    /// A kind's cache changed; `listed` when a full list has completed.
    Changed { kind: &'static str, listed: bool },
    /// A kind's watch failed (it retries with back-off).
    Failed { kind: &'static str, error: String },
}

fn spawn_watch<K>(api: Api<K>, writer: Writer<K>, kind: &'static str, tx: mpsc::Sender<Signal>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    tokio::spawn(async move {
        let stream = reflector::reflector(
            writer,
            watcher::watcher(api, watcher::Config::default()).default_backoff(),
        );
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let signal = match event {
                Ok(Event::InitDone) => Signal::Changed { kind, listed: true },
                Ok(Event::Apply(_) | Event::Delete(_)) => Signal::Changed {
                    kind,
                    listed: false,
                },
                Ok(Event::Init | Event::InitApply(_)) => continue,
                Err(e) => Signal::Failed {
                    kind,
                    error: e.to_string(),
                },
            };
            if tx.send(signal).await.is_err() {
                break;
            }
        }
    });
}

fn by_name<K: Resource + Clone>(store: &Store<K>) -> BTreeMap<String, K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store
        .state()
        .into_iter()
        .filter_map(|o| o.meta().name.clone().map(|n| (n, (*o).clone())))
        .collect()
}

/// Watches the policy kinds in `namespace` and keeps `store` current. Runs until the process
/// ends. `stale_after` is how long a broken watch is tolerated before the policy is dropped.
pub async fn watch(
    client: Client,
    namespace: String,
    store: Arc<PolicyStore>,
    stale_after: Duration,
) {
    const KINDS: [&str; 4] = ["AgentIdentity", "AccessGrant", "MaskPolicy", "Target"];
    let (tx, mut rx) = mpsc::channel(256);
    let (identities, w) = reflector::store::<AgentIdentity>();
    spawn_watch(
        Api::namespaced(client.clone(), &namespace),
        w,
        KINDS[0],
        tx.clone(),
    );
    let (grants, w) = reflector::store::<AccessGrant>();
    spawn_watch(
        Api::namespaced(client.clone(), &namespace),
        w,
        KINDS[1],
        tx.clone(),
    );
    let (masks, w) = reflector::store::<MaskPolicy>();
    spawn_watch(
        Api::namespaced(client.clone(), &namespace),
        w,
        KINDS[2],
        tx.clone(),
    );
    let (targets, w) = reflector::store::<Target>();
    spawn_watch(Api::namespaced(client, &namespace), w, KINDS[3], tx);
    store.set_error(format!(
        "listing AgentIdentities, AccessGrants, MaskPolicies and Targets in namespace {namespace}"
    ));

    let mut listed: BTreeMap<&'static str, bool> = BTreeMap::new();
    let mut failing: BTreeMap<&'static str, (Instant, String)> = BTreeMap::new();
    let mut dropped = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let mut changed = false;
        tokio::select! {
            signal = rx.recv() => {
                let Some(first) = signal else { return };
                let mut next = Some(first);
                // Take everything already queued, then rebuild once.
                while let Some(s) = next {
                    match s {
                        Signal::Changed { kind, listed: l } => {
                            if l {
                                listed.insert(kind, true);
                            }
                            failing.remove(kind);
                            changed = true;
                        }
                        Signal::Failed { kind, error } => {
                            tracing::warn!(kind, %error, "policy watch failed; retrying");
                            store.set_error(format!("the watch on {kind} failed: {error}"));
                            failing.entry(kind).or_insert((Instant::now(), error));
                        }
                    }
                    next = rx.try_recv().ok();
                }
            }
            _ = tick.tick() => {}
        }
        if let Some((kind, (since, error))) = failing
            .iter()
            .find(|(_, (since, _))| since.elapsed() >= stale_after)
        {
            if !dropped {
                let why = format!(
                    "the watch on {kind} has been failing for {}s ({error}): policy may be stale, so everything is refused until it is back",
                    since.elapsed().as_secs()
                );
                tracing::error!("{why}");
                store.clear(why);
                dropped = true;
            }
            continue;
        }
        let all_listed = KINDS.iter().all(|k| listed.contains_key(k));
        if all_listed && (changed || dropped) {
            let s = Snapshot {
                identities: by_name(&identities),
                grants: by_name(&grants),
                masks: by_name(&masks),
                targets: by_name(&targets),
                source: format!("namespace {namespace} on the API server"),
                warnings: Vec::new(),
            };
            if dropped {
                tracing::info!("policy watches are back: serving again");
            }
            tracing::debug!(
                identities = s.identities.len(),
                grants = s.grants.len(),
                masks = s.masks.len(),
                targets = s.targets.len(),
                "policy updated"
            );
            store.set(s);
            dropped = false;
        }
    }
}
