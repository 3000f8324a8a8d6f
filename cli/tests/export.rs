//! `kubectl agentgate export` over trails built in the test (no environment needed): a control
//! is `satisfied` only when the records show it and the chain verifies against the trusted
//! key; with no records, or a chain that does not verify, no control is.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Command, Output};

use agentgate_crds::audit::{
    Chain, Decision, Outcome, Record, RecordKind, Request, Signer, Verdict,
};

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-agentgate"))
        .args(args)
        .output()
        .expect("run kubectl-agentgate")
}

fn record(kind: RecordKind, session: Option<&str>) -> Record {
    let mut r = Record::new(kind, "2026-11-23T04:00:00Z".parse().unwrap());
    r.session = session.map(str::to_owned);
    if session.is_some() {
        r.identity = Some("claude".to_owned());
        r.target = Some("orders-db".to_owned());
    }
    r
}

fn request(id: u64, verdict: Verdict, grant: Option<&str>) -> Record {
    let mut r = record(RecordKind::Request, Some("s"));
    r.request = Some(Request {
        id,
        text: "SELECT $1".to_owned(),
        ..Default::default()
    });
    r.decision = Some(Decision {
        verdict,
        rule: Some("baseline".to_owned()),
        grant: grant.map(str::to_owned),
        approver: None,
        reason: None,
    });
    r
}

/// A closed, signed stream that shows every control the export reports: a session, a refused
/// connection, requests refused, held and allowed under a grant, an outcome with masked
/// values.
fn trail(signer: &Signer) -> Vec<String> {
    let mut chain = Chain::new("run-1");
    let mut start = record(RecordKind::StreamStart, None);
    start.key = Some(signer.public().clone());
    let mut masked = record(RecordKind::Outcome, Some("s"));
    masked.outcome = Some(Outcome {
        id: 3,
        masked: BTreeMap::from([("MaskPolicy/pii/emails".to_owned(), 2)]),
        ..Default::default()
    });
    let mut refusal = record(RecordKind::Refusal, None);
    refusal.identity = Some("unknown".to_owned());
    let records = [
        (start, true),
        (refusal, false),
        (record(RecordKind::SessionStart, Some("s")), false),
        (request(1, Verdict::Refused, None), false),
        (request(2, Verdict::Held, None), false),
        (
            request(3, Verdict::Allowed, Some("agents/claude-orders")),
            false,
        ),
        (masked, false),
        (record(RecordKind::SessionEnd, Some("s")), true),
        (record(RecordKind::StreamEnd, None), true),
    ];
    records
        .into_iter()
        .map(|(mut r, sign)| {
            String::from_utf8(chain.seal(&mut r, sign.then_some(signer)).unwrap()).unwrap()
        })
        .collect()
}

/// Each control's state and summary in `export -o json`.
fn states(args: &[&str]) -> BTreeMap<String, (String, String)> {
    let out = cli(&[&["export", "-o", "json"][..], args].concat());
    assert!(out.status.success(), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["control"].as_str().unwrap().to_owned(),
                (
                    f["state"].as_str().unwrap().to_owned(),
                    f["summary"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

#[test]
fn controls_are_satisfied_only_by_records_in_a_chain_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = Signer::generate().unwrap();
    let key = signer.public().public_key.clone();
    let lines = trail(&signer);
    let write = |name: &str, lines: &[String]| {
        let path = dir.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path.display().to_string()
    };
    let whole = write("whole.jsonl", &lines);

    // Whole, closed, signed, checked against the key: every control is shown.
    let found = states(&["--from", &whole, "--key", &key]);
    assert_eq!(found.len(), 13, "{found:#?}");
    for (control, (state, summary)) in &found {
        assert_eq!(state, "satisfied", "{control}: {summary}");
    }
    // Masking is reported as information flow enforcement (AC-4), not SC-28.
    assert!(!found.contains_key("sc-28"), "{found:#?}");
    assert!(found["ac-4"].1.contains("2 sensitive values"), "{found:#?}");

    // Not checked against a trusted key: partially satisfied at best.
    for (control, (state, summary)) in states(&["--from", &whole]) {
        assert_eq!(state, "not-satisfied", "{control}: {summary}");
        assert!(
            summary.starts_with("partially satisfied") && summary.contains("--key"),
            "{control}: {summary}"
        );
    }

    // A record deleted: the chain does not verify, and no control is satisfied.
    let mut cut = lines.clone();
    cut.remove(4);
    let cut = write("cut.jsonl", &cut);
    for (control, (state, summary)) in states(&["--from", &cut, "--key", &key]) {
        assert_eq!(state, "not-satisfied", "{control}: {summary}");
        assert!(
            summary.starts_with("not satisfied: "),
            "{control}: {summary}"
        );
    }

    // No records at all (an empty source, or filters that keep none).
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let empty = empty.display().to_string();
    let none = states(&["--from", &whole, "--key", &key, "--identity", "nobody"]);
    for (control, (state, summary)) in states(&["--from", &empty, "--key", &key])
        .into_iter()
        .chain(
            none.into_iter()
                .filter(|(c, _)| c != "au-9" && c != "au-10"),
        )
    {
        assert_eq!(state, "not-satisfied", "{control}: {summary}");
        assert!(
            summary.starts_with("not satisfied: "),
            "{control}: {summary}"
        );
    }

    // The OSCAL document names the controls reported.
    let out = cli(&["export", "--from", &whole, "--key", &key, "-o", "oscal"]);
    assert!(out.status.success(), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = doc["assessment-results"]["results"][0]["reviewed-controls"]
        ["control-selections"][0]["include-controls"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["control-id"].as_str())
        .collect();
    assert!(ids.contains(&"ac-4") && !ids.contains(&"sc-28"), "{ids:?}");
}
