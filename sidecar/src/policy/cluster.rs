//! In-cluster policy: watches of AgentIdentity, AccessGrant, MaskPolicy and Target in the
//! pod's namespace, kept in local caches. The gateways never call the API server on the hot
//! path: every change rebuilds the snapshot they read.
//!
//! Fail closed: nothing is served until all four kinds are listed. When a watch fails it is
//! restarted, which lists its kind again; if it has not listed successfully for longer than
//! the staleness limit the policy is dropped (a revocation could be missed) and everything is
//! refused, with the reason, until every kind has been listed again.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use agentgate_crds::{AccessGrant, AgentIdentity, MaskPolicy, Target};
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::{PolicyStore, Snapshot};

/// What a watch reports to the loop that builds snapshots.
enum Signal {
    /// A kind's cache changed; `listed` when a full list has completed.
    Changed { kind: &'static str, listed: bool },
    /// A kind's watch failed; it is restarted (and lists again).
    Failed { kind: &'static str, error: String },
}

/// One kind's cache: objects by name.
type Cache<K> = Arc<RwLock<BTreeMap<String, K>>>;

fn name_of<K: Resource>(o: &K) -> Option<String> {
    o.meta().name.clone()
}

/// Watches one kind into `cache`. After any error the watch is started again from a fresh
/// list (after a pause that grows to 5 s), so a successful list always means current data.
fn spawn_watch<K>(api: Api<K>, cache: Cache<K>, kind: &'static str, tx: mpsc::Sender<Signal>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(200);
        loop {
            let stream = watcher::watcher(api.clone(), watcher::Config::default());
            futures::pin_mut!(stream);
            let mut listing: BTreeMap<String, K> = BTreeMap::new();
            let error = loop {
                let signal = match stream.next().await {
                    None => break "the watch ended".to_owned(),
                    Some(Err(e)) => break e.to_string(),
                    Some(Ok(Event::Init)) => {
                        listing.clear();
                        continue;
                    }
                    Some(Ok(Event::InitApply(o))) => {
                        if let Some(n) = name_of(&o) {
                            listing.insert(n, o);
                        }
                        continue;
                    }
                    Some(Ok(Event::InitDone)) => {
                        if let Ok(mut c) = cache.write() {
                            *c = std::mem::take(&mut listing);
                        }
                        pause = Duration::from_millis(200);
                        Signal::Changed { kind, listed: true }
                    }
                    Some(Ok(Event::Apply(o))) => {
                        if let (Some(n), Ok(mut c)) = (name_of(&o), cache.write()) {
                            c.insert(n, o);
                        }
                        Signal::Changed {
                            kind,
                            listed: false,
                        }
                    }
                    Some(Ok(Event::Delete(o))) => {
                        if let (Some(n), Ok(mut c)) = (name_of(&o), cache.write()) {
                            c.remove(&n);
                        }
                        Signal::Changed {
                            kind,
                            listed: false,
                        }
                    }
                };
                if tx.send(signal).await.is_err() {
                    return;
                }
            };
            if tx.send(Signal::Failed { kind, error }).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    });
}

fn copy<K: Clone>(cache: &Cache<K>) -> BTreeMap<String, K> {
    cache.read().map(|c| c.clone()).unwrap_or_default()
}

/// Watches the policy kinds in `namespace` and keeps `store` current. Runs until the process
/// ends. `stale_after` is how long a kind may go without a successful list after its watch
/// failed before the policy is dropped.
pub async fn watch(
    client: Client,
    namespace: String,
    store: Arc<PolicyStore>,
    stale_after: Duration,
) {
    const KINDS: [&str; 4] = ["AgentIdentity", "AccessGrant", "MaskPolicy", "Target"];
    let (tx, mut rx) = mpsc::channel(256);
    let identities: Cache<AgentIdentity> = Cache::default();
    let grants: Cache<AccessGrant> = Cache::default();
    let masks: Cache<MaskPolicy> = Cache::default();
    let targets: Cache<Target> = Cache::default();
    let ns = namespace.as_str();
    spawn_watch(
        Api::namespaced(client.clone(), ns),
        identities.clone(),
        KINDS[0],
        tx.clone(),
    );
    spawn_watch(
        Api::namespaced(client.clone(), ns),
        grants.clone(),
        KINDS[1],
        tx.clone(),
    );
    spawn_watch(
        Api::namespaced(client.clone(), ns),
        masks.clone(),
        KINDS[2],
        tx.clone(),
    );
    spawn_watch(Api::namespaced(client, ns), targets.clone(), KINDS[3], tx);
    store.set_error(format!(
        "listing AgentIdentities, AccessGrants, MaskPolicies and Targets in namespace {namespace}"
    ));

    let mut listed: BTreeMap<&'static str, bool> = BTreeMap::new();
    // Kinds whose watch failed and that have not listed since: when it started, and why.
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
                                // A fresh list: this kind is current again.
                                failing.remove(kind);
                            }
                            changed = true;
                        }
                        Signal::Failed { kind, error } => {
                            tracing::warn!(kind, %error, "policy watch failed; listing again");
                            if !dropped {
                                store.set_error(format!("the watch on {kind} failed: {error}"));
                            }
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
                identities: copy(&identities),
                grants: copy(&grants),
                masks: copy(&masks),
                targets: copy(&targets),
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
