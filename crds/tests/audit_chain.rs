//! The hash chain: a sealed trail verifies, and every kind of tampering is found and named.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;

use agentgate_crds::audit::{
    Chain, Decision, Expectations, ProblemKind, Record, RecordKind, Request, Signer, Verdict,
    hash_of, verify,
};

fn record(kind: RecordKind, session: Option<&str>, text: &str) -> Record {
    let mut r = Record::new(kind, "2026-11-23T04:00:00Z".parse().unwrap());
    r.session = session.map(str::to_owned);
    r.identity = Some("claude".to_owned());
    if kind == RecordKind::Request {
        r.request = Some(Request {
            id: 1,
            text: text.to_owned(),
            ..Default::default()
        });
        r.decision = Some(Decision {
            verdict: Verdict::Allowed,
            rule: Some("baseline".to_owned()),
            grant: None,
            approver: None,
            reason: None,
        });
    }
    r
}

/// A trail: stream start, two sessions interleaved, checkpoints, stream end.
fn trail(signer: &Signer) -> Vec<String> {
    let mut chain = Chain::new("sidecar-1");
    let mut lines = Vec::new();
    let mut push = |mut r: Record, sign: bool| {
        let line = chain.seal(&mut r, sign.then_some(signer)).unwrap();
        // The spliced line is exactly what serde writes for the sealed record.
        assert_eq!(line, serde_json::to_vec(&r).unwrap());
        assert_eq!(hash_of(&r).unwrap(), r.hash);
        lines.push(String::from_utf8(line).unwrap());
    };
    let mut start = record(RecordKind::StreamStart, None, "");
    start.key = Some(signer.public().clone());
    push(start, true);
    push(record(RecordKind::SessionStart, Some("a"), ""), false);
    push(record(RecordKind::SessionStart, Some("b"), ""), false);
    for i in 0..5 {
        push(
            record(RecordKind::Request, Some("a"), &format!("SELECT {i}")),
            false,
        );
        push(
            record(RecordKind::Request, Some("b"), &format!("SELECT {i}")),
            false,
        );
    }
    push(record(RecordKind::Checkpoint, None, ""), true);
    push(record(RecordKind::SessionEnd, Some("a"), ""), true);
    push(record(RecordKind::SessionEnd, Some("b"), ""), true);
    push(record(RecordKind::StreamEnd, None, ""), true);
    lines
}

fn run(lines: &[String], expect: &Expectations) -> agentgate_crds::audit::Report {
    verify(
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("audit.jsonl:{}", i + 1), l.as_bytes())),
        expect,
    )
}

fn kinds(report: &agentgate_crds::audit::Report) -> Vec<(ProblemKind, Option<u64>)> {
    report.problems.iter().map(|p| (p.kind, p.n)).collect()
}

fn pinned(signer: &Signer) -> Expectations {
    Expectations {
        keys: vec![signer.public().public_key.clone()],
        ..Default::default()
    }
}

#[test]
fn an_untouched_trail_verifies() {
    let (signer, _) = Signer::generate().unwrap();
    let lines = trail(&signer);
    let report = run(&lines, &pinned(&signer));
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.records, lines.len() as u64);
    assert_eq!(report.streams.len(), 1);
    assert!(report.streams[0].ended);
    assert_eq!(report.streams[0].sessions, 2);
    assert_eq!(
        report.streams[0].signed_through,
        Some(lines.len() as u64 - 1)
    );
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
}

#[test]
fn an_edited_record_is_named() {
    let (signer, _) = Signer::generate().unwrap();
    let mut lines = trail(&signer);
    lines[5] = lines[5].replace("SELECT 1", "SELECT 9");
    let report = run(&lines, &pinned(&signer));
    assert_eq!(kinds(&report), vec![(ProblemKind::Edited, Some(5))]);
    assert_eq!(report.problems[0].location, "audit.jsonl:6");
    assert!(report.problems[0].message.contains("record n=5 was edited"));
}

#[test]
fn an_edited_and_rehashed_record_breaks_the_link_after_it() {
    let (signer, _) = Signer::generate().unwrap();
    let mut lines = trail(&signer);
    let mut r: Record = serde_json::from_str(&lines[5]).unwrap();
    r.request.as_mut().unwrap().text = "SELECT 9".to_owned();
    r.hash.clear();
    r.hash = hash_of(&r).unwrap();
    lines[5] = serde_json::to_string(&r).unwrap();
    let report = run(&lines, &pinned(&signer));
    // The stream link n=6 → n=5 breaks, and so does session a's link at its next record.
    assert!(
        kinds(&report).contains(&(ProblemKind::Broken, Some(6))),
        "{:#?}",
        report.problems
    );
    assert!(
        report.problems.iter().all(|p| p.n >= Some(6)),
        "{:#?}",
        report.problems
    );
}

#[test]
fn a_deleted_record_is_named() {
    let (signer, _) = Signer::generate().unwrap();
    let mut lines = trail(&signer);
    lines.remove(7);
    let report = run(&lines, &pinned(&signer));
    assert_eq!(report.problems[0].kind, ProblemKind::Missing);
    assert!(
        report.problems[0]
            .message
            .contains("records n=7..7 are missing"),
        "{}",
        report.problems[0].message
    );
}

#[test]
fn reordered_records_are_named() {
    let (signer, _) = Signer::generate().unwrap();
    let mut lines = trail(&signer);
    lines.swap(4, 6);
    let report = run(&lines, &pinned(&signer));
    assert!(
        kinds(&report)
            .iter()
            .any(|(k, n)| *k == ProblemKind::Reordered && (*n == Some(4) || *n == Some(5))),
        "{:#?}",
        report.problems
    );
}

#[test]
fn a_truncated_trail_is_found_against_the_session_head() {
    let (signer, _) = Signer::generate().unwrap();
    let lines = trail(&signer);
    let full: Vec<Record> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last_a = full
        .iter()
        .rfind(|r| r.session.as_deref() == Some("a"))
        .unwrap();
    let mut expect = pinned(&signer);
    expect.session_heads =
        BTreeMap::from([("a".to_owned(), (last_a.seq.unwrap(), last_a.hash.clone()))]);
    // Cut the end: the last five records.
    let cut = &lines[..lines.len() - 5];
    expect.allow_open = true;
    let report = run(cut, &expect);
    assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
    assert_eq!(report.problems[0].kind, ProblemKind::Truncated);
    assert!(report.problems[0].message.contains("session a ends at seq"));
    // Without the head, the cut still shows: no StreamEnd and records no signature covers.
    let report = run(cut, &pinned(&signer));
    assert_eq!(
        kinds(&report),
        vec![
            (ProblemKind::Truncated, Some(lines.len() as u64 - 5)),
            (ProblemKind::Unsigned, Some(1))
        ]
    );
    assert!(report.problems[0].message.contains("without a StreamEnd"));
}

#[test]
fn a_deleted_session_end_is_found_when_the_stream_ended() {
    let (signer, _) = Signer::generate().unwrap();
    let mut lines = trail(&signer);
    let n = lines.len();
    // Drop session b's end and re-chain nothing: the gap and the open session both show.
    lines.remove(n - 2);
    let report = run(&lines, &pinned(&signer));
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.message.contains("session b has no SessionEnd"))
    );
}

#[test]
fn a_forged_trail_signed_with_another_key_is_refused() {
    let (signer, _) = Signer::generate().unwrap();
    let (forger, _) = Signer::generate().unwrap();
    let lines = trail(&forger);
    let report = run(&lines, &pinned(&signer));
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::BadSignature && p.message.contains("not a trusted key")),
        "{:#?}",
        report.problems
    );
    // Unpinned, it verifies against its own key, and the report says the key was not pinned.
    let report = run(&lines, &Expectations::default());
    assert!(report.ok());
    assert!(report.warnings.iter().any(|w| w.contains("--key")));
}

#[test]
fn a_tampered_signature_is_refused() {
    let (signer, _) = Signer::generate().unwrap();
    let mut lines = trail(&signer);
    let mut r: Record = serde_json::from_str(&lines[13]).unwrap();
    let (other, _) = Signer::generate().unwrap();
    r.sig = Some(other.sign(&r.hash));
    lines[13] = serde_json::to_string(&r).unwrap();
    let report = run(&lines, &pinned(&signer));
    assert_eq!(kinds(&report), vec![(ProblemKind::BadSignature, Some(13))]);
}

#[test]
fn redelivered_records_are_duplicates_not_tampering() {
    let (signer, _) = Signer::generate().unwrap();
    let mut lines = trail(&signer);
    let again: Vec<String> = lines[3..8].to_vec();
    lines.splice(8..8, again);
    let report = run(&lines, &pinned(&signer));
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.duplicates, 5);
}

#[test]
fn garbage_and_other_versions_are_malformed() {
    let (signer, _) = Signer::generate().unwrap();
    let mut lines = trail(&signer);
    lines.insert(3, "{\"v\":1,".to_owned());
    lines[5] = lines[5].replacen("{\"v\":1,", "{\"v\":2,", 1);
    lines.push("{\"v\":1,\"unknown\":true}".to_owned());
    let report = run(&lines, &pinned(&signer));
    let malformed = report
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::Malformed)
        .count();
    assert_eq!(malformed, 3, "{:#?}", report.problems);
}

/// Seals a new stream `name`: its start signed (carrying `previous`), `requests` unsigned
/// requests of session `s`, and (when `end`) a signed session and stream end.
fn stream(
    name: &str,
    signer: &Signer,
    previous: Option<agentgate_crds::audit::StreamLink>,
    requests: usize,
    end: bool,
) -> Vec<String> {
    let mut chain = Chain::new(name);
    let mut lines = Vec::new();
    let mut start = record(RecordKind::StreamStart, None, "");
    start.key = Some(signer.public().clone());
    start.previous = previous;
    lines.push(String::from_utf8(chain.seal(&mut start, Some(signer)).unwrap()).unwrap());
    for i in 0..requests {
        let mut r = record(RecordKind::Request, Some("s"), &format!("SELECT {i}"));
        lines.push(String::from_utf8(chain.seal(&mut r, None).unwrap()).unwrap());
    }
    if end {
        let mut r = record(RecordKind::SessionEnd, Some("s"), "");
        lines.push(String::from_utf8(chain.seal(&mut r, Some(signer)).unwrap()).unwrap());
        let mut r = record(RecordKind::StreamEnd, None, "");
        lines.push(String::from_utf8(chain.seal(&mut r, Some(signer)).unwrap()).unwrap());
    }
    lines
}

fn link(lines: &[String]) -> agentgate_crds::audit::StreamLink {
    let last: Record = serde_json::from_str(lines.last().unwrap()).unwrap();
    agentgate_crds::audit::StreamLink {
        stream: last.stream,
        n: last.n,
        hash: last.hash,
    }
}

#[test]
fn a_forged_stream_without_key_or_signatures_fails() {
    let (signer, _) = Signer::generate().unwrap();
    let mut chain = Chain::new("forged");
    let mut lines = Vec::new();
    for (kind, session) in [
        (RecordKind::StreamStart, None),
        (RecordKind::SessionStart, Some("s")),
        (RecordKind::Request, Some("s")),
        (RecordKind::SessionEnd, Some("s")),
        (RecordKind::StreamEnd, None),
    ] {
        let mut r = record(kind, session, "SELECT 1");
        lines.push(String::from_utf8(chain.seal(&mut r, None).unwrap()).unwrap());
    }
    let report = run(&lines, &pinned(&signer));
    let found = kinds(&report);
    assert!(
        found.contains(&(ProblemKind::BadSignature, Some(0))),
        "{found:?}"
    );
    assert!(
        found.contains(&(ProblemKind::BadSignature, Some(3))),
        "{found:?}"
    );
    assert!(
        found.contains(&(ProblemKind::Unsigned, Some(0))),
        "{found:?}"
    );
    assert!(!run(&lines, &Expectations::default()).ok());
}

#[test]
fn a_tail_replaced_after_the_last_signature_fails() {
    let (signer, _) = Signer::generate().unwrap();
    let lines = trail(&signer);
    // Keep the signed start, drop the rest, append re-hashed innocent records.
    let mut chain = Chain::new("sidecar-1");
    let mut start: Record = serde_json::from_str(&lines[0]).unwrap();
    let mut forged =
        vec![String::from_utf8(chain.seal(&mut start, Some(&signer)).unwrap()).unwrap()];
    for i in 0..3 {
        let mut r = record(RecordKind::Request, Some("a"), &format!("SELECT {i}"));
        forged.push(String::from_utf8(chain.seal(&mut r, None).unwrap()).unwrap());
    }
    let report = run(&forged, &pinned(&signer));
    assert_eq!(
        kinds(&report),
        vec![
            (ProblemKind::Truncated, Some(4)),
            (ProblemKind::Unsigned, Some(1))
        ]
    );
    // A running sidecar's trail: accepted with --open, with a warning.
    let report = run(
        &forged,
        &Expectations {
            allow_open: true,
            ..pinned(&signer)
        },
    );
    assert!(report.ok(), "{:#?}", report.problems);
    assert!(report.warnings.iter().any(|w| w.contains("not covered")));
}

#[test]
fn a_restarted_sidecar_covers_the_stream_before_and_a_deleted_stream_is_found() {
    let (signer, _) = Signer::generate().unwrap();
    // The first run is killed: its last requests are unsigned, until the next run links them.
    let first = stream("run-1", &signer, None, 5, false);
    let second = stream("run-2", &signer, Some(link(&first)), 2, true);
    let report = run(&[first.clone(), second.clone()].concat(), &pinned(&signer));
    assert!(report.ok(), "{:#?}", report.problems);
    // The whole first stream deleted.
    let report = run(&second, &pinned(&signer));
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::Missing
                && p.message.contains("stream run-1 is not in the input")),
        "{:#?}",
        report.problems
    );
    // Its end cut.
    let cut = [first[..4].to_vec(), second.clone()].concat();
    let report = run(&cut, &pinned(&signer));
    assert!(
        kinds(&report).contains(&(ProblemKind::Truncated, Some(4))),
        "{:#?}",
        report.problems
    );
    // A record appended to it after the restart.
    let mut again = Chain::new("run-1");
    let mut appended = Vec::new();
    for l in &first {
        let mut r: Record = serde_json::from_str(l).unwrap();
        let signed = r.sig.is_some();
        appended.push(
            String::from_utf8(again.seal(&mut r, signed.then_some(&signer)).unwrap()).unwrap(),
        );
    }
    let mut r = record(RecordKind::Request, Some("s"), "SELECT 99");
    appended.push(String::from_utf8(again.seal(&mut r, None).unwrap()).unwrap());
    let report = run(&[appended, second].concat(), &pinned(&signer));
    assert!(
        kinds(&report).contains(&(ProblemKind::Unsigned, Some(6))),
        "{:#?}",
        report.problems
    );
}
