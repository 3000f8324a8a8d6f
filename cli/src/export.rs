//! Evidence export: findings per NIST SP 800-53 control, each with the records behind it, as
//! JSON, CSV or OSCAL assessment results (OSCAL 1.1.2).
//!
//! A finding is `satisfied` only when the records show it, and only as far as the records can
//! be relied on: every finding drawn from records is `not-satisfied` ("not satisfied", with
//! the reason) when the trail's hash chain does not verify (tampering) or when none of the
//! records its evidence needs is there, and `not-satisfied` ("partially satisfied", with the
//! reason) when the chain shows no tampering but would not satisfy AU-9: the trail is not
//! whole, closed and signed, or its signatures were not checked against a trusted key.

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

/// How far the records can be relied on as evidence, from the chain check (as AU-9 decides).
enum Trust {
    /// The chain verifies strictly against trusted keys.
    Whole,
    /// Nothing was edited, but the trail is incomplete, open, not fully signed, or its
    /// signatures were not checked against a trusted key: why.
    Partial(String),
    /// The chain does not verify (something was edited, deleted, reordered or forged): why.
    Broken(String),
}

fn trust(chain: &ChainCheck) -> Trust {
    if !chain.lenient.ok() {
        return Trust::Broken(reasons(&chain.lenient.problems));
    }
    if !chain.strict.ok() {
        return Trust::Partial(format!(
            "the trail is not whole, closed and signed: {} (export again once the sidecars have stopped, with every rotated file)",
            reasons(&chain.strict.problems)
        ));
    }
    if !chain.pinned {
        return Trust::Partial(
            "the records' signatures were checked only against each stream's own key, so whoever could write the trail could have written them: export with the sidecar's public key (--key)".into(),
        );
    }
    Trust::Whole
}

/// A finding's state and summary: `measured` is the summary when the records show the
/// control, or why they do not; `trust` says whether they can be relied on.
fn judge(trust: &Trust, measured: Result<String, String>) -> (&'static str, String) {
    match (trust, measured) {
        (Trust::Broken(why), Ok(summary) | Err(summary)) => (
            "not-satisfied",
            format!(
                "not satisfied: the hash chain does NOT verify, so these records prove nothing ({summary}): {why}"
            ),
        ),
        (_, Err(why)) => ("not-satisfied", format!("not satisfied: {why}")),
        (Trust::Partial(why), Ok(summary)) => (
            "not-satisfied",
            format!("partially satisfied: {summary}; but {why}"),
        ),
        (Trust::Whole, Ok(summary)) => ("satisfied", summary),
    }
}

/// `Ok(summary)` when `shown`, otherwise `Err(why)`.
fn shows(shown: bool, summary: String, why: impl FnOnce() -> String) -> Result<String, String> {
    if shown { Ok(summary) } else { Err(why()) }
}

/// The findings for `records` (already filtered to the period and identity) and the chain's
/// verification.
pub fn findings(records: &[Record], chain: &ChainCheck) -> Vec<Finding> {
    let ((au9_state, au9_summary), (au10_state, au10_summary)) = chain_findings(chain);
    let trust = trust(chain);
    let judge = |measured| judge(&trust, measured);
    let of = |f: &dyn Fn(&Record) -> bool| -> Vec<Evidence> {
        records.iter().filter(|r| f(r)).map(evidence).collect()
    };
    let cite = |mut e: Vec<Evidence>| {
        e.truncate(CITED);
        e
    };
    const WIDEN: &str = "check the period, the identity and the source (--since, --until, --identity, --target, --from, --postgres)";
    let sessions = of(&|r| r.kind == RecordKind::SessionStart);
    let refused_conn = of(&|r| r.kind == RecordKind::Refusal);
    let requests = of(&|r| r.kind == RecordKind::Request);
    let refused = of(&|r| r.kind == RecordKind::Request && r.verdict() == Some(Verdict::Refused));
    let not_refused =
        of(&|r| r.kind == RecordKind::Request && r.verdict() != Some(Verdict::Refused));
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
    let request_records = || records.iter().filter(|r| r.kind == RecordKind::Request);
    let undecided = request_records().filter(|r| r.decision.is_none()).count();
    let incomplete = request_records()
        .filter(|r| r.identity.is_none() || r.target.is_none() || r.decision.is_none())
        .count();
    // Allowed without a rule or a grant naming why: nothing shows what privilege allowed it.
    let unexplained = request_records()
        .filter(|r| {
            r.decision.as_ref().is_some_and(|d| {
                matches!(d.verdict, Verdict::Allowed | Verdict::Approved)
                    && d.rule.is_none()
                    && d.grant.is_none()
            })
        })
        .count();
    let anonymous = sessions.iter().filter(|e| e.identity.is_empty()).count();
    let masked_total: u64 = records
        .iter()
        .filter_map(|r| r.outcome.as_ref())
        .map(|o| o.masked_total())
        .sum();
    let finding = |control, title, (state, summary), evidence| Finding {
        control,
        title,
        state,
        summary,
        evidence,
    };
    vec![
        finding(
            "ia-2",
            "Identification and Authentication",
            judge(if sessions.is_empty() {
                Err(format!(
                    "no session starts in these records: nothing shows agents being authenticated ({WIDEN})"
                ))
            } else {
                shows(
                    anonymous == 0,
                    format!(
                        "{} sessions, each opened by an authenticated AgentIdentity; {} connections refused before authentication completed",
                        sessions.len(),
                        refused_conn.len()
                    ),
                    || {
                        format!(
                            "{anonymous} of {} sessions name no identity",
                            sessions.len()
                        )
                    },
                )
            }),
            cite([sessions.clone(), refused_conn.clone()].concat()),
        ),
        finding(
            "ia-4",
            "Identifier Management",
            judge(shows(
                !identities.is_empty(),
                format!(
                    "requests are attributed to {} distinct non-human identities: {}",
                    identities.len(),
                    identities.iter().copied().collect::<Vec<_>>().join(", ")
                ),
                || format!("no record in these names an identity ({WIDEN})"),
            )),
            cite(sessions.clone()),
        ),
        finding(
            "ac-2",
            "Account Management",
            judge(shows(
                !sessions.is_empty() || !refused_conn.is_empty(),
                format!(
                    "agents act as managed AgentIdentities ({} sessions); {} connections of unknown, disabled or mismatched identities were refused",
                    sessions.len(),
                    refused_conn.len()
                ),
                || {
                    format!(
                        "no session start or refused connection in these records: nothing shows how agents' accounts were used ({WIDEN})"
                    )
                },
            )),
            cite([refused_conn.clone(), sessions.clone()].concat()),
        ),
        finding(
            "ac-3",
            "Access Enforcement",
            judge(if requests.is_empty() {
                Err(format!(
                    "no request records in these: nothing shows access being enforced ({WIDEN})"
                ))
            } else {
                shows(
                    undecided == 0,
                    format!(
                        "{} requests decided by policy before they ran; {} refused",
                        requests.len(),
                        refused.len()
                    ),
                    || {
                        format!(
                            "{undecided} of {} request records carry no decision",
                            requests.len()
                        )
                    },
                )
            }),
            cite([refused.clone(), not_refused].concat()),
        ),
        finding(
            "ac-4",
            "Information Flow Enforcement",
            judge(shows(
                masked_total > 0,
                format!(
                    "{masked_total} sensitive values (MaskPolicy rules, Secret data) were masked in responses before they reached the agent"
                ),
                || {
                    format!(
                        "no response in these records had a value masked: nothing shows sensitive values being kept from the agent (check that MaskPolicies cover the sensitive data; {WIDEN})"
                    )
                },
            )),
            cite(masked),
        ),
        finding(
            "ac-6",
            "Least Privilege",
            judge(if requests.is_empty() {
                Err(format!(
                    "no request records in these: nothing shows what privilege requests ran with ({WIDEN})"
                ))
            } else {
                shows(
                    unexplained == 0 && undecided == 0,
                    format!(
                        "every request ran under the identity's baseline or a time-bound AccessGrant, named in its decision ({} of {} requests under a grant)",
                        granted.len(),
                        requests.len()
                    ),
                    || {
                        format!(
                            "{} of {} requests were allowed without a decision naming the rule or grant behind them",
                            unexplained + undecided,
                            requests.len()
                        )
                    },
                )
            }),
            cite(granted),
        ),
        finding(
            "au-2",
            "Event Logging",
            judge(shows(
                !records.is_empty(),
                format!(
                    "{} records: session starts and ends, every request with its decision, outcomes, approvals",
                    records.len()
                ),
                || format!("no records: nothing shows events being logged ({WIDEN})"),
            )),
            cite(requests.clone()),
        ),
        finding(
            "au-3",
            "Content of Audit Records",
            judge(if requests.is_empty() {
                Err(format!(
                    "no request records in these: nothing shows their content ({WIDEN})"
                ))
            } else {
                shows(
                    incomplete == 0,
                    format!(
                        "every one of {} request records names the identity, pod, target, time, the request (statements with every constant replaced), the decision and the rule or grant behind it",
                        requests.len()
                    ),
                    || {
                        format!(
                            "{incomplete} of {} request records lack an identity, a target or a decision",
                            requests.len()
                        )
                    },
                )
            }),
            cite(requests.clone()),
        ),
        finding(
            "au-6",
            "Audit Record Review, Analysis, and Reporting",
            judge(shows(
                !records.is_empty(),
                format!(
                    "this export reviews {} records; {} refused requests and {} held requests are listed for follow-up",
                    records.len(),
                    refused.len(),
                    held.len()
                ),
                || format!("no records to review ({WIDEN})"),
            )),
            cite([refused.clone(), held.clone()].concat()),
        ),
        finding(
            "au-9",
            "Protection of Audit Information",
            (au9_state, au9_summary),
            cite(signed.clone()),
        ),
        finding(
            "au-10",
            "Non-repudiation",
            (au10_state, au10_summary),
            cite(signed.clone()),
        ),
        finding(
            "sc-13",
            "Cryptographic Protection",
            judge(shows(
                !signed.is_empty(),
                format!(
                    "{} records are chained with SHA-256 and signed with Ed25519 (AWS-LC)",
                    signed.len()
                ),
                || {
                    format!(
                        "no signed records in these: nothing shows cryptographic protection ({WIDEN})"
                    )
                },
            )),
            cite(signed),
        ),
        finding(
            "ir-4",
            "Incident Handling",
            judge(shows(
                !held.is_empty(),
                format!(
                    "{} risky requests were held for a human decision before they ran",
                    held.len()
                ),
                || {
                    format!(
                        "no request in these records was held for a decision: nothing shows risky requests being stopped for a person ({WIDEN})"
                    )
                },
            )),
            cite(held),
        ),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use agentgate_crds::audit::{Decision, Outcome, ProblemKind, Request};

    use super::*;

    /// Every control reported, with its state and summary.
    fn states(records: &[Record], chain: &ChainCheck) -> BTreeMap<&'static str, (String, String)> {
        findings(records, chain)
            .into_iter()
            .map(|f| (f.control, (f.state.to_owned(), f.summary)))
            .collect()
    }

    fn report(records: u64, problems: &[&str]) -> Report {
        Report {
            records,
            problems: problems
                .iter()
                .map(|m| Problem {
                    kind: ProblemKind::Missing,
                    stream: "run-1".into(),
                    n: Some(3),
                    location: "trail:4".into(),
                    message: (*m).to_owned(),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// A chain check: `lenient` and `strict` problems, keys pinned or not.
    fn chain(records: u64, lenient: &[&str], strict: &[&str], pinned: bool) -> ChainCheck {
        ChainCheck {
            lenient: report(records, lenient),
            strict: report(records, strict),
            pinned,
        }
    }

    fn record(kind: RecordKind, n: u64) -> Record {
        let mut r = Record::new(kind, "2026-11-23T04:00:00Z".parse().unwrap());
        r.stream = "run-1".into();
        r.n = n;
        r.hash = format!("{n:064x}");
        r.sig = Some("c2ln".into());
        r.session = Some("claude-1".into());
        r.identity = Some("claude".into());
        r.target = Some("orders-db".into());
        r
    }

    fn request(n: u64, verdict: Verdict, grant: Option<&str>) -> Record {
        let mut r = record(RecordKind::Request, n);
        r.request = Some(Request {
            id: n,
            text: "SELECT $1".into(),
            ..Default::default()
        });
        r.decision = Some(Decision {
            verdict,
            rule: Some("baseline".into()),
            grant: grant.map(str::to_owned),
            approver: None,
            reason: None,
        });
        r
    }

    /// A trail that shows every control: a session, a refused connection, requests allowed,
    /// refused, held and under a grant, and an outcome with masked values.
    fn trail() -> Vec<Record> {
        let mut masked = record(RecordKind::Outcome, 6);
        masked.outcome = Some(Outcome {
            id: 2,
            masked: BTreeMap::from([("MaskPolicy/pii/emails".to_owned(), 3)]),
            ..Default::default()
        });
        vec![
            record(RecordKind::SessionStart, 1),
            record(RecordKind::Refusal, 2),
            request(3, Verdict::Refused, None),
            request(4, Verdict::Held, None),
            request(5, Verdict::Allowed, Some("agents/claude-orders")),
            masked,
        ]
    }

    #[test]
    fn a_whole_pinned_trail_that_shows_every_control_satisfies_them() {
        let found = states(&trail(), &chain(6, &[], &[], true));
        assert_eq!(found.len(), 13);
        for (control, (state, summary)) in &found {
            assert_eq!(state, "satisfied", "{control}: {summary}");
        }
        // Masking is information flow enforcement, not protection at rest.
        assert!(!found.contains_key("sc-28"));
        assert!(
            found["ac-4"].1.contains("3 sensitive values"),
            "{:?}",
            found["ac-4"]
        );
    }

    #[test]
    fn no_records_satisfy_no_control() {
        for (control, (state, summary)) in states(&[], &chain(0, &[], &[], true)) {
            assert_eq!(state, "not-satisfied", "{control}: {summary}");
            assert!(
                summary.starts_with("not satisfied: "),
                "{control}: {summary}"
            );
        }
    }

    #[test]
    fn a_chain_that_does_not_verify_satisfies_no_control() {
        let broken = chain(
            6,
            &["record n=3 is missing"],
            &["record n=3 is missing"],
            true,
        );
        for (control, (state, summary)) in states(&trail(), &broken) {
            assert_eq!(state, "not-satisfied", "{control}: {summary}");
            assert!(
                summary.starts_with("not satisfied: ") && summary.contains("record n=3 is missing"),
                "{control}: {summary}"
            );
        }
    }

    #[test]
    fn an_open_or_unpinned_trail_satisfies_controls_only_partially() {
        let open = chain(6, &[], &["the trail ends at n=6 without a StreamEnd"], true);
        let unpinned = chain(6, &[], &[], false);
        for (check, why) in [(open, "without a StreamEnd"), (unpinned, "--key")] {
            for (control, (state, summary)) in states(&trail(), &check) {
                assert_eq!(state, "not-satisfied", "{control}: {summary}");
                assert!(
                    summary.starts_with("partially satisfied") && summary.contains(why),
                    "{control}: {summary}"
                );
            }
        }
    }

    #[test]
    fn a_control_without_its_evidence_is_not_satisfied_saying_why() {
        let whole = chain(3, &[], &[], true);
        // Only a session and an allowed request: nothing masked, held, refused or granted.
        let mut undecided = request(3, Verdict::Allowed, None);
        undecided.decision = None;
        let plain = vec![
            record(RecordKind::SessionStart, 1),
            request(2, Verdict::Allowed, None),
        ];
        let found = states(&plain, &whole);
        for (control, cause) in [
            ("ac-4", "no response in these records had a value masked"),
            ("ir-4", "was held for a decision"),
        ] {
            let (state, summary) = &found[control];
            assert_eq!(state, "not-satisfied", "{control}: {summary}");
            assert!(summary.contains(cause), "{control}: {summary}");
        }
        // Least privilege holds with no grant used: the baseline allowed the request.
        for control in ["ac-2", "ac-3", "ac-6", "au-6", "sc-13"] {
            assert_eq!(
                found[control].0, "satisfied",
                "{control}: {:?}",
                found[control]
            );
        }
        // A request that carries no decision: access enforcement is not shown.
        let found = states(&[plain, vec![undecided]].concat(), &whole);
        for control in ["ac-3", "ac-6", "au-3"] {
            let (state, summary) = &found[control];
            assert_eq!(state, "not-satisfied", "{control}: {summary}");
            assert!(summary.contains("1 of 2"), "{control}: {summary}");
        }
        // Records but no requests: nothing shows enforcement.
        let found = states(&[record(RecordKind::SessionStart, 1)], &whole);
        for control in ["ac-3", "ac-6", "au-3"] {
            let (state, summary) = &found[control];
            assert_eq!(state, "not-satisfied", "{control}: {summary}");
            assert!(
                summary.contains("no request records"),
                "{control}: {summary}"
            );
        }
    }
}
