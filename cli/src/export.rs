//! Evidence export: findings per NIST SP 800-53 control, each with the records behind it, as
//! JSON, CSV or OSCAL assessment results (OSCAL 1.1.2).

use std::collections::BTreeSet;

use agentgate_crds::audit::{Problem, Record, RecordKind, Report, Verdict};
use aws_lc_rs::digest;
use serde::Serialize;

/// One control's finding.
#[derive(Debug, Serialize)]
pub struct Finding {
    /// The control (`au-9`).
    pub control: &'static str,
    /// Its title.
    pub title: &'static str,
    /// `satisfied` or `not-satisfied` (OSCAL's objective states; a control only partly
    /// met is `not-satisfied`, and its summary says "partially satisfied" and why).
    pub state: &'static str,
    /// What the evidence shows, in a sentence.
    pub summary: String,
    /// The records behind it.
    pub evidence: Vec<Evidence>,
}

/// A record cited as evidence.
#[derive(Debug, Serialize, Clone)]
pub struct Evidence {
    /// Stream.
    pub stream: String,
    /// Position.
    pub n: u64,
    /// Hash.
    pub hash: String,
    /// Kind.
    pub kind: &'static str,
    /// Time.
    pub time: String,
    /// Identity.
    pub identity: String,
    /// Target.
    pub target: String,
    /// Verdict.
    pub verdict: String,
}

fn evidence(r: &Record) -> Evidence {
    Evidence {
        stream: r.stream.clone(),
        n: r.n,
        hash: r.hash.clone(),
        kind: r.kind.as_str(),
        time: r.time.to_string(),
        identity: r.identity.clone().unwrap_or_default(),
        target: r.target.clone().unwrap_or_default(),
        verdict: r
            .verdict()
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default(),
    }
}

/// At most this many records are cited per finding (the counts cover all).
const CITED: usize = 50;

/// At most this many problems are quoted in a finding's summary.
const QUOTED: usize = 10;

/// The chain verification behind AU-9 and AU-10.
#[derive(Debug)]
pub struct ChainCheck {
    /// With partial streams and open tails accepted: its problems are tampering.
    pub lenient: Report,
    /// As `kubectl agentgate verify` checks without `--allow-partial` and `--open`: its
    /// problems also name what is missing, open or unsigned.
    pub strict: Report,
    /// Whether the signatures were checked against trusted keys (`--key`), not only against
    /// each stream's own.
    pub pinned: bool,
}

/// Why a control is not (fully) satisfied: `problems`' messages, the first [`QUOTED`] of them.
fn reasons(problems: &[Problem]) -> String {
    let mut quoted: Vec<String> = problems
        .iter()
        .take(QUOTED)
        .map(|p| p.message.clone())
        .collect();
    if problems.len() > QUOTED {
        quoted.push(format!("and {} more", problems.len() - QUOTED));
    }
    quoted.join("; ")
}

/// AU-9 and AU-10 from the chain check: satisfied only by a trail that verifies strictly
/// against trusted keys; "partially satisfied" (state `not-satisfied`, with the reason) by
/// one that shows no tampering but is incomplete, open, not fully signed or not pinned.
fn chain_findings(chain: &ChainCheck) -> ((&'static str, String), (&'static str, String)) {
    let records = chain.strict.records;
    let keys = chain
        .strict
        .streams
        .iter()
        .filter_map(|s| s.key_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
        .join(", ");
    const UNPINNED: &str = "the signatures were checked only against each stream's own key, so whoever could write the trail could have signed it: export with the sidecar's public key (--key)";
    if !chain.lenient.ok() {
        let why = reasons(&chain.lenient.problems);
        return (
            (
                "not-satisfied",
                format!("not satisfied: the hash chain does NOT verify: {why}"),
            ),
            (
                "not-satisfied",
                format!(
                    "not satisfied: the records' signatures prove nothing over a chain that does not verify (keys {keys}): {why}"
                ),
            ),
        );
    }
    if !chain.strict.ok() {
        let why = reasons(&chain.strict.problems);
        return (
            (
                "not-satisfied",
                format!(
                    "partially satisfied: nothing in the hash chain of {records} records was edited or reordered, but the trail is not whole, closed and signed: {why} (export again once the sidecars have stopped, with every rotated file)"
                ),
            ),
            (
                "not-satisfied",
                format!(
                    "partially satisfied: records are signed (Ed25519, keys {keys}), but not all of them are covered by a signature: {why}"
                ),
            ),
        );
    }
    if records == 0 {
        let why = "the trail read holds no records: nothing shows that records were kept (check --from, --postgres and the filters)";
        return (
            ("not-satisfied", format!("not satisfied: {why}")),
            ("not-satisfied", format!("not satisfied: {why}")),
        );
    }
    if !chain.pinned {
        return (
            (
                "not-satisfied",
                format!(
                    "partially satisfied: the hash chain of {records} records verifies, but {UNPINNED}"
                ),
            ),
            (
                "not-satisfied",
                format!("partially satisfied: records are signed (keys {keys}), but {UNPINNED}"),
            ),
        );
    }
    (
        (
            "satisfied",
            format!(
                "the hash chain of {records} records verifies against the trusted keys: nothing edited, deleted, reordered or added, every stream closed and signed"
            ),
        ),
        (
            "satisfied",
            format!(
                "records are signed (Ed25519) by the sidecar's key, which the agent container cannot read: keys {keys}"
            ),
        ),
    )
}

/// The findings for `records` (already filtered to the period and identity) and the chain's
/// verification.
pub fn findings(records: &[Record], chain: &ChainCheck) -> Vec<Finding> {
    let ((au9_state, au9_summary), (au10_state, au10_summary)) = chain_findings(chain);
    let of = |f: &dyn Fn(&Record) -> bool| -> Vec<Evidence> {
        records.iter().filter(|r| f(r)).map(evidence).collect()
    };
    let cite = |mut e: Vec<Evidence>| {
        e.truncate(CITED);
        e
    };
    let sessions = of(&|r| r.kind == RecordKind::SessionStart);
    let refused_conn = of(&|r| r.kind == RecordKind::Refusal);
    let requests = of(&|r| r.kind == RecordKind::Request);
    let refused = of(&|r| r.kind == RecordKind::Request && r.verdict() == Some(Verdict::Refused));
    let granted = of(&|r| r.decision.as_ref().is_some_and(|d| d.grant.is_some()));
    let held = of(&|r| {
        matches!(
            r.verdict(),
            Some(Verdict::Held | Verdict::Approved | Verdict::Denied)
        )
    });
    let masked = of(&|r| r.outcome.as_ref().is_some_and(|o| o.masked_total() > 0));
    let signed = of(&|r| r.sig.is_some());
    let identities: BTreeSet<&str> = records
        .iter()
        .filter_map(|r| r.identity.as_deref())
        .collect();
    let complete = records
        .iter()
        .filter(|r| r.kind == RecordKind::Request)
        .all(|r| r.identity.is_some() && r.target.is_some() && r.decision.is_some());
    let masked_total: u64 = records
        .iter()
        .filter_map(|r| r.outcome.as_ref())
        .map(|o| o.masked_total())
        .sum();
    let ok = |b: bool| if b { "satisfied" } else { "not-satisfied" };
    vec![
        Finding {
            control: "ia-2",
            title: "Identification and Authentication",
            state: ok(sessions.iter().all(|e| !e.identity.is_empty())),
            summary: format!(
                "{} sessions, each opened by an authenticated AgentIdentity; {} connections refused before authentication completed",
                sessions.len(),
                refused_conn.len()
            ),
            evidence: cite([sessions.clone(), refused_conn.clone()].concat()),
        },
        Finding {
            control: "ia-4",
            title: "Identifier Management",
            state: ok(!identities.is_empty() || records.is_empty()),
            summary: format!(
                "requests are attributed to {} distinct non-human identities: {}",
                identities.len(),
                identities.iter().copied().collect::<Vec<_>>().join(", ")
            ),
            evidence: cite(sessions.clone()),
        },
        Finding {
            control: "ac-2",
            title: "Account Management",
            state: "satisfied",
            summary: format!(
                "agents act as managed AgentIdentities; {} connections of unknown, disabled or mismatched identities were refused",
                refused_conn.len()
            ),
            evidence: cite(refused_conn.clone()),
        },
        Finding {
            control: "ac-3",
            title: "Access Enforcement",
            state: "satisfied",
            summary: format!(
                "{} requests decided by policy before they ran; {} refused",
                requests.len(),
                refused.len()
            ),
            evidence: cite(refused.clone()),
        },
        Finding {
            control: "ac-6",
            title: "Least Privilege",
            state: "satisfied",
            summary: format!(
                "access beyond each identity's baseline came only from time-bound AccessGrants ({} requests under a grant)",
                granted.len()
            ),
            evidence: cite(granted),
        },
        Finding {
            control: "au-2",
            title: "Event Logging",
            state: ok(!records.is_empty()),
            summary: format!(
                "{} records: session starts and ends, every request with its decision, outcomes, approvals",
                records.len()
            ),
            evidence: cite(requests.clone()),
        },
        Finding {
            control: "au-3",
            title: "Content of Audit Records",
            state: ok(complete),
            summary: "every request record names the identity, pod, target, time, the masked request, the decision and the rule or grant behind it".into(),
            evidence: cite(requests.clone()),
        },
        Finding {
            control: "au-6",
            title: "Audit Record Review, Analysis, and Reporting",
            state: "satisfied",
            summary: format!(
                "this export reviews {} records; {} refused requests and {} held requests are listed for follow-up",
                records.len(),
                refused.len(),
                held.len()
            ),
            evidence: cite([refused.clone(), held.clone()].concat()),
        },
        Finding {
            control: "au-9",
            title: "Protection of Audit Information",
            state: au9_state,
            summary: au9_summary,
            evidence: cite(signed.clone()),
        },
        Finding {
            control: "au-10",
            title: "Non-repudiation",
            state: au10_state,
            summary: au10_summary,
            evidence: cite(signed.clone()),
        },
        Finding {
            control: "sc-13",
            title: "Cryptographic Protection",
            state: "satisfied",
            summary: "records are chained with SHA-256 and signed with Ed25519 (AWS-LC)".into(),
            evidence: cite(signed),
        },
        Finding {
            control: "sc-28",
            title: "Protection of Information at Rest",
            state: "satisfied",
            summary: format!(
                "{masked_total} sensitive values were masked before reaching the agent; records keep statements with every constant replaced"
            ),
            evidence: cite(masked),
        },
        Finding {
            control: "ir-4",
            title: "Incident Handling",
            state: "satisfied",
            summary: format!(
                "{} risky requests were held for a human decision before they ran",
                held.len()
            ),
            evidence: cite(held),
        },
    ]
}

/// A UUID (version 5 layout) derived from `seed`, so an export of the same evidence is the
/// same document.
fn uuid(seed: &str) -> String {
    let d = digest::digest(&digest::SHA256, seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = agentgate_crds::audit::chain::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The findings as an OSCAL assessment-results document.
pub fn oscal(
    findings: &[Finding],
    start: &str,
    end: &str,
    scope: &str,
    now: &str,
) -> serde_json::Value {
    let seed = format!("{scope}/{start}/{end}");
    let mut observations = Vec::new();
    let mut oscal_findings = Vec::new();
    for f in findings {
        let obs_uuid = uuid(&format!("{seed}/obs/{}", f.control));
        let evidence: Vec<serde_json::Value> = f
            .evidence
            .iter()
            .map(|e| {
                serde_json::json!({
                    "href": format!("urn:agentgate:record:{}:{}", e.stream, e.n),
                    "description": format!("{} record at {} ({} {}{}), sha256 {}", e.kind, e.time, e.identity, e.target,
                        if e.verdict.is_empty() { String::new() } else { format!(", {}", e.verdict) }, e.hash),
                })
            })
            .collect();
        let mut obs = serde_json::json!({
            "uuid": obs_uuid,
            "title": format!("{}: {}", f.control.to_uppercase(), f.title),
            "description": f.summary,
            "methods": ["TEST"],
            "types": ["control-objective"],
            "collected": now,
        });
        if !evidence.is_empty() {
            obs["relevant-evidence"] = serde_json::Value::Array(evidence);
        }
        observations.push(obs);
        oscal_findings.push(serde_json::json!({
            "uuid": uuid(&format!("{seed}/finding/{}", f.control)),
            "title": format!("{}: {}", f.control.to_uppercase(), f.title),
            "description": f.summary,
            "target": {
                "type": "objective-id",
                "target-id": format!("{}_obj", f.control),
                "status": {"state": f.state},
            },
            "related-observations": [{"observation-uuid": obs_uuid}],
        }));
    }
    serde_json::json!({
        "assessment-results": {
            "uuid": uuid(&format!("{seed}/{now}")),
            "metadata": {
                "title": format!("agentgate evidence: {scope}, {start} to {end}"),
                "last-modified": now,
                "version": env!("CARGO_PKG_VERSION"),
                "oscal-version": "1.1.2",
            },
            "import-ap": {"href": "#agentgate-assessment-plan"},
            "results": [{
                "uuid": uuid(&format!("{seed}/result")),
                "title": format!("agentgate session records: {scope}"),
                "description": "Findings from agentgate's tamper-evident session records, mapped to NIST SP 800-53 Rev. 5 controls.",
                "start": start,
                "end": end,
                "reviewed-controls": {
                    "control-selections": [{
                        "include-controls": findings.iter().map(|f| serde_json::json!({"control-id": f.control})).collect::<Vec<_>>(),
                    }],
                },
                "observations": observations,
                "findings": oscal_findings,
            }],
        }
    })
}

/// The findings as CSV: one row per cited record (a finding without evidence gets one row).
pub fn csv(findings: &[Finding]) -> String {
    fn field(s: &str) -> String {
        // A cell a spreadsheet would run as a formula is kept as text.
        let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            format!("'{s}")
        } else {
            s.to_owned()
        };
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s
        }
    }
    let mut out = String::from(
        "control,title,state,summary,stream,n,time,kind,identity,target,verdict,hash\n",
    );
    for f in findings {
        let rows: Vec<Option<&Evidence>> = if f.evidence.is_empty() {
            vec![None]
        } else {
            f.evidence.iter().map(Some).collect()
        };
        for e in rows {
            let cols = [
                f.control.to_owned(),
                f.title.to_owned(),
                f.state.to_owned(),
                f.summary.clone(),
                e.map(|e| e.stream.clone()).unwrap_or_default(),
                e.map(|e| e.n.to_string()).unwrap_or_default(),
                e.map(|e| e.time.clone()).unwrap_or_default(),
                e.map(|e| e.kind.to_owned()).unwrap_or_default(),
                e.map(|e| e.identity.clone()).unwrap_or_default(),
                e.map(|e| e.target.clone()).unwrap_or_default(),
                e.map(|e| e.verdict.clone()).unwrap_or_default(),
                e.map(|e| e.hash.clone()).unwrap_or_default(),
            ];
            out.push_str(&cols.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
            out.push('\n');
        }
    }
    out
}
