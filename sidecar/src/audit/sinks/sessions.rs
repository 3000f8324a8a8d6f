//! The AgentSession sink: one AgentSession object per session, its status a summary of the
//! records (counters, grants, chain head), updated at most every `interval` per session and
//! at the session's end.
//!
//! Updates are idempotent: a record at or below the status's chain head is not counted again,
//! so a re-delivery after a restart does not double the counters.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentgate_crds::audit::{Record, RecordKind, Verdict};
use agentgate_crds::common::Time;
use agentgate_crds::session::ChainHead;
use agentgate_crds::{AgentSession, AgentSessionSpec, AgentSessionStatus, SessionPhase};
use bytes::Bytes;
use kube::api::{Api, Patch, PatchParams, PostParams};

struct Open {
    spec: AgentSessionSpec,
    status: AgentSessionStatus,
    dirty: bool,
    last_patch: Option<Instant>,
    exists: bool,
}

/// The AgentSession sink.
pub struct SessionSink {
    api: Api<AgentSession>,
    interval: Duration,
    open: HashMap<String, Open>,
    /// The signing key of the stream being read (from its StreamStart).
    key: Option<String>,
    /// The UID of the sidecar's pod, written into each session it creates.
    pod_uid: Option<String>,
}

impl SessionSink {
    /// A sink writing AgentSessions in `namespace`, each updated at most every `interval`.
    pub fn new(client: kube::Client, namespace: &str, interval: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            interval,
            open: HashMap::new(),
            key: None,
            pod_uid: None,
        }
    }

    /// Writes `uid` (the sidecar's pod's UID) into the sessions it creates, so that the
    /// operator tells this pod from another created under the same name.
    #[must_use]
    pub fn with_pod_uid(mut self, uid: Option<String>) -> Self {
        self.pod_uid = uid;
        self
    }

    /// Folds `lines` into the sessions' summaries and writes those that are due.
    pub async fn deliver(&mut self, lines: &[Bytes]) -> Result<(), String> {
        for line in lines {
            let r: Record = serde_json::from_slice(line)
                .map_err(|e| format!("a spilled record does not parse: {e}"))?;
            if let Some(k) = &r.key {
                self.key = Some(k.public_key.clone());
            }
            let Some(session) = r.session.clone() else {
                continue;
            };
            if !self.open.contains_key(&session) {
                let open = self.load(&session, &r).await?;
                self.open.insert(session.clone(), open);
            }
            let Some(open) = self.open.get_mut(&session) else {
                continue;
            };
            let seq = r.seq.unwrap_or(0);
            if open
                .status
                .chain_head
                .as_ref()
                .is_some_and(|h| h.seq >= seq && (h.seq > 0 || seq == 0) && !h.hash.is_empty())
            {
                continue;
            }
            fold(&mut open.status, &r);
            if open.status.signing_key.is_none() {
                open.status.signing_key.clone_from(&self.key);
            }
            open.dirty = true;
        }
        self.flush(false).await
    }

    async fn load(&self, session: &str, r: &Record) -> Result<Open, String> {
        match self.api.get_opt(session).await {
            Ok(Some(s)) => Ok(Open {
                spec: s.spec,
                status: s.status.unwrap_or_default(),
                dirty: false,
                last_patch: None,
                exists: true,
            }),
            Ok(None) => Ok(Open {
                spec: AgentSessionSpec {
                    identity: r.identity.clone().unwrap_or_default(),
                    target: r.target.clone().unwrap_or_default(),
                    protocol: r.protocol.unwrap_or(agentgate_crds::Protocol::Postgres),
                    pod: r.pod.clone(),
                    pod_uid: r.pod.as_ref().and(self.pod_uid.clone()),
                    client: r.client.clone(),
                    session_id: session.to_owned(),
                    started_at: Time(r.time),
                },
                status: AgentSessionStatus::default(),
                dirty: true,
                last_patch: None,
                exists: false,
            }),
            Err(e) => Err(format!("read AgentSession {session}: {e}")),
        }
    }

    /// Writes the summaries that are due (all dirty ones when `all`).
    pub async fn flush(&mut self, all: bool) -> Result<(), String> {
        let now = Instant::now();
        let mut done = Vec::new();
        for (name, open) in &mut self.open {
            if !open.dirty {
                continue;
            }
            let ended = open.status.phase == Some(SessionPhase::Ended);
            if !all
                && !ended
                && open
                    .last_patch
                    .is_some_and(|t| now.duration_since(t) < self.interval)
            {
                continue;
            }
            if !open.exists {
                match create(&self.api, name, &open.spec).await {
                    Ok(()) => open.exists = true,
                    // The API server will never take it (invalid): not worth blocking every
                    // later record for; the full records are in the other sinks.
                    Err(kube::Error::Api(e)) if e.code == 422 => {
                        tracing::error!(session = %name, error = %e.message, "AgentSession refused as invalid: its summary is skipped");
                        open.dirty = false;
                        continue;
                    }
                    Err(e) => return Err(format!("create AgentSession {name}: {e}")),
                }
            }
            let patch = serde_json::json!({ "status": open.status });
            self.api
                .patch_status(
                    name,
                    &PatchParams::apply("agentgate-sidecar").force(),
                    &Patch::Apply(serde_json::json!({
                        "apiVersion": "agentgate.dev/v1alpha1",
                        "kind": "AgentSession",
                        "status": patch["status"],
                    })),
                )
                .await
                .map_err(|e| format!("update AgentSession {name}'s status: {e}"))?;
            open.dirty = false;
            open.last_patch = Some(now);
            if ended {
                done.push(name.clone());
            }
        }
        for name in done {
            self.open.remove(&name);
        }
        Ok(())
    }
}

async fn create(
    api: &Api<AgentSession>,
    name: &str,
    spec: &AgentSessionSpec,
) -> Result<(), kube::Error> {
    let mut obj = AgentSession::new(name, spec.clone());
    obj.metadata.labels = Some(agentgate_crds::common::selector_labels(
        &spec.identity,
        &spec.target,
    ));
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Adds one record to a session's summary.
fn fold(status: &mut AgentSessionStatus, r: &Record) {
    let time = Time(r.time);
    match r.kind {
        RecordKind::SessionStart => status.phase = Some(SessionPhase::Active),
        RecordKind::SessionEnd => {
            status.phase = Some(SessionPhase::Ended);
            status.ended_at = Some(time.clone());
            status.end_reason.clone_from(&r.note);
        }
        RecordKind::Request | RecordKind::Approval => {
            if r.kind == RecordKind::Request {
                status.counters.requests += 1;
            }
            if let Some(d) = &r.decision {
                match d.verdict {
                    Verdict::Allowed | Verdict::Approved => status.counters.allowed += 1,
                    Verdict::Refused | Verdict::Denied => status.counters.refused += 1,
                    Verdict::Held => status.counters.held += 1,
                }
                if let Some(g) = &d.grant
                    && !status.grants.contains(g)
                {
                    status.grants.push(g.clone());
                }
            }
        }
        RecordKind::Outcome => {
            if let Some(o) = &r.outcome {
                status.counters.rows += o.rows;
                status.counters.masked_values += o.masked_total();
                status.counters.bytes_in += o.bytes_in;
                status.counters.bytes_out += o.bytes_out;
            }
        }
        _ => {}
    }
    status.last_activity = Some(time);
    status.chain_head = Some(ChainHead {
        seq: r.seq.unwrap_or(0),
        hash: r.hash.clone(),
    });
}
