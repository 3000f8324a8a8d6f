//! The tools the audit tests check agentgate's records with: a real OpenTelemetry Collector
//! that receives OTLP/HTTP logs (and can go away and come back), and NIST's OSCAL JSON schema.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use testenv::OtelCollector;

/// POSTs an OTLP/HTTP JSON logs request with curl; returns curl's exit code and the body.
fn post_logs(endpoint: &str, body: &serde_json::Value) -> anyhow::Result<(i32, String)> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-X", "POST"])
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(body.to_string())
        .args(["-w", "\n%{http_code}"])
        .arg(endpoint)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

fn one_record(body: &str) -> serde_json::Value {
    serde_json::json!({"resourceLogs": [{
        "resource": {"attributes": []},
        "scopeLogs": [{"scope": {"name": "t"}, "logRecords": [
            {"timeUnixNano": "1", "body": {"stringValue": body}}
        ]}]
    }]})
}

#[test]
fn the_collector_receives_otlp_http_logs_and_survives_an_outage() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut collector = OtelCollector::start(dir.path())?;
    let endpoint = collector.logs_endpoint();
    assert_eq!(
        endpoint,
        format!("http://127.0.0.1:{}/v1/logs", collector.port())
    );

    // The request from the issue, as any OTLP/HTTP JSON exporter sends it.
    let (code, answer) = post_logs(&endpoint, &one_record("hello-agentgate"))?;
    assert_eq!(code, 0, "curl failed: {answer}");
    assert!(answer.ends_with("\n200"), "{answer}");
    collector.wait_for_log("hello-agentgate", Duration::from_secs(10))?;
    let text = collector.received_logs_text();
    assert!(text.contains("Body: Str(hello-agentgate)\n"), "{text}");

    // A record with a severity, a timestamp, and resource and record attributes: every part
    // comes back, exactly.
    let audit = serde_json::json!({"resourceLogs": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "agentgate-sidecar"}}
        ]},
        "scopeLogs": [{"scope": {"name": "agentgate"}, "logRecords": [{
            "timeUnixNano": "1795428000000000000",
            "severityNumber": 9,
            "severityText": "INFO",
            "body": {"stringValue": "audit-record-1"},
            "attributes": [
                {"key": "agentgate.decision", "value": {"stringValue": "allow"}},
                {"key": "agentgate.seq", "value": {"intValue": "7"}}
            ]
        }]}]
    }]});
    let (code, answer) = post_logs(&endpoint, &audit)?;
    assert!(code == 0 && answer.ends_with("\n200"), "{code}: {answer}");
    collector.wait_for_log("audit-record-1", Duration::from_secs(10))?;
    let text = collector.received_logs_text();
    let expected = "ResourceLog #0
Resource SchemaURL: 
Resource attributes:
     -> service.name: Str(agentgate-sidecar)
ScopeLogs #0
ScopeLogs SchemaURL: 
InstrumentationScope agentgate 
LogRecord #0
ObservedTimestamp: 1970-01-01 00:00:00 +0000 UTC
Timestamp: 2026-11-23 10:00:00 +0000 UTC
SeverityText: INFO
SeverityNumber: Info(9)
Body: Str(audit-record-1)
Attributes:
     -> agentgate.decision: Str(allow)
     -> agentgate.seq: Int(7)
Trace ID: 
Span ID: 
Flags: 0
";
    assert!(text.contains(expected), "expected\n{expected}\nin\n{text}");
    assert_eq!(collector.received_log_records(), 2);

    // An outage: the endpoint refuses connections, then the collector is back on the same
    // port, and what it received before is still there.
    let pid = collector.pid();
    collector.stop();
    assert!(!collector.is_running());
    if let Some(pid) = pid {
        assert!(!Path::new(&format!("/proc/{pid}/status")).exists() || is_zombie(pid));
    }
    let (code, answer) = post_logs(&endpoint, &one_record("lost-during-outage"))?;
    assert_eq!(
        code, 7,
        "curl should not connect during the outage: {answer}"
    );
    collector.start_again()?;
    assert_eq!(collector.logs_endpoint(), endpoint);
    let (code, answer) = post_logs(&endpoint, &one_record("after-the-outage"))?;
    assert!(code == 0 && answer.ends_with("\n200"), "{code}: {answer}");
    collector.wait_for_log("after-the-outage", Duration::from_secs(10))?;
    let text = collector.received_logs_text();
    assert!(text.contains("hello-agentgate") && text.contains("audit-record-1"));
    assert!(!text.contains("lost-during-outage"), "{text}");
    assert_eq!(collector.received_log_records(), 3);
    assert_eq!(collector.log_paths().len(), 2);
    Ok(())
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    })
}

/// A minimal OSCAL assessment-results document: the fields the schema requires.
fn assessment_results() -> serde_json::Value {
    serde_json::json!({
        "assessment-results": {
            "uuid": "5d2c7f5e-8a5b-4c1e-9f3a-2b7d4e6f8a90",
            "metadata": {
                "title": "agentgate audit export",
                "last-modified": "2026-11-23T10:00:00Z",
                "version": "1",
                "oscal-version": "1.1.2"
            },
            "import-ap": {"href": "#"},
            "results": [{
                "uuid": "0b6c3e2a-1f4d-4a8b-9c7e-5d3f2a1b0c9d",
                "title": "Audit records of agentgate",
                "description": "Every request of every agent session, with its decision.",
                "start": "2026-11-23T09:00:00Z",
                "reviewed-controls": {
                    "control-selections": [{"include-controls": [{"control-id": "au-2"}]}]
                }
            }]
        }
    })
}

fn write_json(
    dir: &Path,
    name: &str,
    doc: &serde_json::Value,
) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(doc)?)?;
    Ok(path)
}

#[test]
fn oscal_documents_are_checked_against_nists_schema() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;

    let valid = write_json(dir.path(), "valid.json", &assessment_results())?;
    testenv::oscal_validate(&valid).map_err(anyhow::Error::msg)?;
    testenv::oscal::oscal_validate_model(&valid, "assessment-results")
        .map_err(anyhow::Error::msg)?;
    let err = testenv::oscal::oscal_validate_model(&valid, "catalog")
        .err()
        .unwrap_or_default();
    assert!(err.contains("not \"catalog\""), "{err}");

    // The schema's token pattern is Unicode (\p{L}): a non-ASCII control id is valid…
    let mut doc = assessment_results();
    doc["assessment-results"]["results"][0]["reviewed-controls"]["control-selections"][0]["include-controls"]
        [0]["control-id"] = "ü-2_ñ.1".into();
    let unicode = write_json(dir.path(), "unicode.json", &doc)?;
    testenv::oscal_validate(&unicode).map_err(anyhow::Error::msg)?;

    // …and one that starts with a hyphen is not.
    doc["assessment-results"]["results"][0]["reviewed-controls"]["control-selections"][0]["include-controls"]
        [0]["control-id"] = "-au-2".into();
    let bad_token = write_json(dir.path(), "bad-token.json", &doc)?;
    let err = testenv::oscal_validate(&bad_token)
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("/control-id: '-au-2' does not match pattern"),
        "{err}"
    );

    // Missing metadata: invalid, and the report names it.
    let mut doc = assessment_results();
    if let Some(ar) = doc["assessment-results"].as_object_mut() {
        ar.remove("metadata");
    }
    let no_metadata = write_json(dir.path(), "no-metadata.json", &doc)?;
    let err = testenv::oscal_validate(&no_metadata)
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("at /assessment-results: missing property 'metadata'"),
        "{err}"
    );

    // Formats are asserted: a start that is not a date-time with a time zone is refused.
    let mut doc = assessment_results();
    doc["assessment-results"]["results"][0]["start"] = "2026-11-23 09:00".into();
    let bad_time = write_json(dir.path(), "bad-time.json", &doc)?;
    let err = testenv::oscal_validate(&bad_time).err().unwrap_or_default();
    assert!(err.contains("/results/0/start"), "{err}");

    // Not JSON at all.
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{")?;
    assert!(testenv::oscal_validate(&garbage).is_err());
    Ok(())
}
