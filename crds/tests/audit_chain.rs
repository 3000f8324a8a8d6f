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
    let report = run(cut, &expect);
    assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
    assert_eq!(report.problems[0].kind, ProblemKind::Truncated);
    assert!(report.problems[0].message.contains("session a ends at seq"));
    // Without the head, the cut still shows: no StreamEnd and an unsigned tail.
    let report = run(cut, &pinned(&signer));
    assert!(report.warnings.iter().any(|w| w.contains("no StreamEnd")));
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("not yet covered"))
    );
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
