//! The PostgreSQL gateway's records: a `Request` record for every statement decided (before it
//! is forwarded), an `Approval` record when a held one is decided, and an `Outcome` record
//! (rows, bytes, masked values, latency, error) when an allowed one completes.

use std::collections::BTreeMap;
use std::time::Instant;

use agentgate_crds::audit::{self, Outcome, RecordKind};

use crate::audit::SessionRecorder;
use crate::policy::{Decision, Verdict};
use crate::sql::{Classified, Fingerprint};

/// What an allowed request produced so far; recorded as its `Outcome` when it completes.
#[derive(Debug)]
pub struct Tally {
    /// The request's number.
    pub id: u64,
    started: Instant,
    bytes_in: u64,
    /// Rows returned or affected.
    pub rows: u64,
    /// Bytes relayed to the agent.
    pub bytes_out: u64,
    /// Values masked, by rule.
    pub masked: BTreeMap<String, u64>,
    /// The error the server answered.
    pub error: Option<String>,
    /// The command, when a grant allowed it: decided again while it runs.
    pub command: Option<std::sync::Arc<crate::policy::Command>>,
    /// Why agentgate canceled it while it ran (its grant ended), when it did.
    pub ended: Option<String>,
}

impl Tally {
    /// A tally for request `id`, which was `bytes_in` bytes from the agent.
    pub fn new(id: u64, bytes_in: usize) -> Self {
        Self {
            id,
            started: Instant::now(),
            bytes_in: bytes_in as u64,
            rows: 0,
            bytes_out: 0,
            masked: BTreeMap::new(),
            error: None,
            command: None,
            ended: None,
        }
    }

    /// Records the outcome.
    pub fn finish(self, rec: &SessionRecorder) {
        let mut r = rec.base(RecordKind::Outcome);
        r.outcome = Some(Outcome {
            id: self.id,
            rows: self.rows,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            masked: self.masked,
            latency_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            error: self.ended.or(self.error),
            status: None,
        });
        if let Err(e) = rec.emit(r) {
            tracing::error!(session = rec.id(), error = %e, "a request's outcome could not be recorded");
        }
    }
}

/// The record's form of a policy decision.
pub fn decision(d: &Decision) -> audit::Decision {
    let verdict = match d.verdict {
        Verdict::Allow => audit::Verdict::Allowed,
        Verdict::Refuse => audit::Verdict::Refused,
        Verdict::Hold => audit::Verdict::Held,
    };
    audit::Decision {
        verdict,
        rule: Some(d.rule.clone()),
        grant: d.grant.clone(),
        approver: None,
        reason: (d.verdict != Verdict::Allow).then(|| reason(d)),
    }
}

/// A decision's reason as recorded: the parser's error quotes the token it stopped at, which
/// may be a literal (`ALTER ROLE app PASSWORD 'old' 'N3wSecret'`), so what follows
/// "at or near" stays out of the record (the agent was told it).
fn reason(d: &Decision) -> String {
    match d.message.find(" at or near ") {
        Some(i) if d.rule == "unparsable" => format!(
            "{} at or near a token not recorded (it may hold a value)",
            &d.message[..i]
        ),
        _ => d.message.clone(),
    }
}

/// Records a request and its decision. `Err` (why) when the record cannot be taken: the
/// request must then be refused.
pub fn request(
    rec: &SessionRecorder,
    id: u64,
    sql: &str,
    c: Option<&Classified>,
    via: &str,
    d: &Decision,
) -> Result<(), String> {
    let mut r = rec.base(RecordKind::Request);
    r.request = Some(audit::Request {
        id,
        // Text and fingerprint are filled by the audit writer, off the request path.
        text: String::new(),
        operation: c.map(|c| c.class),
        fingerprint: None,
        via: Some(via.to_owned()),
    });
    r.decision = Some(decision(d));
    let sql_fp = c.map_or_else(|| Fingerprint::of(sql), |c| c.fingerprint.clone());
    rec.emit_statement(r, sql_fp, c.and_then(|c| c.redacted.clone()))
}

/// Records the end of a hold: approved (and by whom) or not (`Denied`, its rule and message
/// saying why: denied by an approver, no decision in time, a cancel, the client gone). The
/// PostgreSQL gateway records every end so (a statement that did not run has no outcome);
/// the Kubernetes and SSH gateways, whose every request has an outcome, only an approver's
/// decision. `Err` (why) when the record cannot be taken: an approved command must then be
/// refused.
pub fn approval(
    rec: &SessionRecorder,
    id: u64,
    d: &Decision,
    grant: Option<&str>,
    approver: Option<String>,
) -> Result<(), String> {
    let mut r = rec.base(RecordKind::Approval);
    let mut dec = decision(d);
    dec.verdict = if d.verdict == Verdict::Allow {
        audit::Verdict::Approved
    } else {
        audit::Verdict::Denied
    };
    dec.grant = dec.grant.or(grant.map(str::to_owned));
    dec.approver = approver;
    r.decision = Some(dec);
    r.request = Some(audit::Request {
        id,
        ..Default::default()
    });
    if d.verdict == Verdict::Allow {
        rec.auditor().admit()?;
    }
    rec.emit(r)
}

/// Who decided grant `name`, from the policy snapshot.
pub fn approver(s: Option<&crate::policy::Snapshot>, name: &str) -> Option<String> {
    let g = s?.grants.get(name)?;
    g.spec
        .decision
        .as_ref()?
        .decided_by
        .as_ref()
        .map(|u| u.username.clone())
}
