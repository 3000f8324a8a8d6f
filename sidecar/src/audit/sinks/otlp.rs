//! The OTLP/HTTP sink's request body: an `ExportLogsServiceRequest` with one log record per
//! audit record. The record's exact line is the body (so the chain can be verified from what
//! the collector stored), and the fields to search by are attributes (`agentgate.kind`,
//! `agentgate.identity`, `agentgate.session`, …).
//!
//! Binary protobuf (`application/x-protobuf`) by default, as OTLP exporters send it and every
//! OTLP/HTTP receiver accepts it; JSON (`application/json`) on request. The protobuf messages
//! are the few fields of `opentelemetry/proto/{collector/logs,logs,common,resource}/v1` this
//! sink sets, with their field numbers.

use std::borrow::Cow;

use agentgate_crds::audit::{RecordKind, Verdict};
use bytes::Bytes;

/// How the OTLP sink encodes its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// Binary protobuf, `application/x-protobuf` (the OTLP default).
    #[default]
    Protobuf,
    /// OTLP's JSON encoding, `application/json`.
    Json,
}

impl Encoding {
    /// The request's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Protobuf => "application/x-protobuf",
            Self::Json => "application/json",
        }
    }
}

/// The fields of a record that become attributes, read without copying the rest.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fields<'a> {
    #[serde(borrow)]
    stream: Cow<'a, str>,
    n: u64,
    time: jiff::Timestamp,
    kind: RecordKind,
    #[serde(borrow, default)]
    session: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    identity: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    target: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pod: Option<Cow<'a, str>>,
    #[serde(default)]
    decision: Option<VerdictOnly>,
    #[serde(borrow, default)]
    hash: Cow<'a, str>,
}

#[derive(serde::Deserialize)]
struct VerdictOnly {
    verdict: Verdict,
}

/// One log record, before encoding.
struct Entry<'a> {
    nanos: u64,
    refused: bool,
    line: &'a [u8],
    attributes: Vec<(&'static str, Cow<'a, str>)>,
}

fn entry(line: &Bytes) -> Result<Entry<'_>, String> {
    let f: Fields<'_> = serde_json::from_slice(line)
        .map_err(|e| format!("a spilled record does not parse: {e}"))?;
    let refused = matches!(
        f.decision.as_ref().map(|d| d.verdict),
        Some(Verdict::Refused | Verdict::Denied)
    ) || f.kind == RecordKind::Refusal;
    let mut attributes = vec![
        ("agentgate.kind", Cow::Borrowed(f.kind.as_str())),
        ("agentgate.stream", f.stream),
        ("agentgate.n", Cow::Owned(f.n.to_string())),
        ("agentgate.hash", f.hash),
    ];
    for (k, v) in [
        ("agentgate.session", f.session),
        ("agentgate.identity", f.identity),
        ("agentgate.target", f.target),
        ("agentgate.pod", f.pod),
    ] {
        if let Some(v) = v {
            attributes.push((k, v));
        }
    }
    if let Some(d) = &f.decision {
        attributes.push(("agentgate.verdict", Cow::Borrowed(d.verdict.as_str())));
    }
    Ok(Entry {
        nanos: u64::try_from(f.time.as_nanosecond()).unwrap_or(0),
        refused,
        line,
        attributes,
    })
}

/// The request carrying `lines`, encoded as `encoding` says.
pub fn body(lines: &[Bytes], encoding: Encoding) -> Result<Vec<u8>, String> {
    let entries = lines.iter().map(entry).collect::<Result<Vec<_>, _>>()?;
    let stream = entries
        .last()
        .and_then(|e| e.attributes.iter().find(|(k, _)| *k == "agentgate.stream"))
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    Ok(match encoding {
        Encoding::Protobuf => protobuf(&entries, &stream),
        Encoding::Json => json(&entries, &stream)?,
    })
}

fn resource_attributes(stream: &str) -> [(&'static str, &str); 3] {
    [
        ("service.name", "agentgate-sidecar"),
        ("service.version", env!("CARGO_PKG_VERSION")),
        ("agentgate.stream", stream),
    ]
}

fn severity(refused: bool) -> (i32, &'static str) {
    if refused { (13, "WARN") } else { (9, "INFO") }
}

fn protobuf(entries: &[Entry<'_>], stream: &str) -> Vec<u8> {
    use prost::Message;
    let kv = |key: &str, value: &str| pb::KeyValue {
        key: key.to_owned(),
        value: Some(pb::AnyValue {
            string_value: value.to_owned(),
        }),
    };
    let records = entries
        .iter()
        .map(|e| {
            let (number, text) = severity(e.refused);
            pb::LogRecord {
                time_unix_nano: e.nanos,
                observed_time_unix_nano: e.nanos,
                severity_number: number,
                severity_text: text.to_owned(),
                body: Some(pb::AnyValue {
                    string_value: String::from_utf8_lossy(e.line).into_owned(),
                }),
                attributes: e.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
            }
        })
        .collect();
    pb::ExportLogsServiceRequest {
        resource_logs: vec![pb::ResourceLogs {
            resource: Some(pb::Resource {
                attributes: resource_attributes(stream)
                    .iter()
                    .map(|(k, v)| kv(k, v))
                    .collect(),
            }),
            scope_logs: vec![pb::ScopeLogs {
                scope: Some(pb::InstrumentationScope {
                    name: "agentgate.audit".into(),
                    version: "1".into(),
                }),
                log_records: records,
            }],
        }],
    }
    .encode_to_vec()
}

fn json(entries: &[Entry<'_>], stream: &str) -> Result<Vec<u8>, String> {
    let attr =
        |key: &str, value: &str| serde_json::json!({"key": key, "value": {"stringValue": value}});
    let records: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let (number, text) = severity(e.refused);
            let nanos = e.nanos.to_string();
            serde_json::json!({
                "timeUnixNano": nanos,
                "observedTimeUnixNano": nanos,
                "severityNumber": number,
                "severityText": text,
                "body": {"stringValue": String::from_utf8_lossy(e.line)},
                "attributes": e.attributes.iter().map(|(k, v)| attr(k, v)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let body = serde_json::json!({
        "resourceLogs": [{
            "resource": {"attributes": resource_attributes(stream)
                .iter()
                .map(|(k, v)| attr(k, v))
                .collect::<Vec<_>>()},
            "scopeLogs": [{
                "scope": {"name": "agentgate.audit", "version": "1"},
                "logRecords": records,
            }]
        }]
    });
    serde_json::to_vec(&body).map_err(|e| e.to_string())
}

/// The OTLP messages this sink sends (the fields it sets; field numbers as in the
/// OpenTelemetry protocol's `.proto` files).
mod pb {
    /// `opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportLogsServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_logs: Vec<ResourceLogs>,
    }

    /// `opentelemetry.proto.logs.v1.ResourceLogs`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceLogs {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_logs: Vec<ScopeLogs>,
    }

    /// `opentelemetry.proto.resource.v1.Resource`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }

    /// `opentelemetry.proto.logs.v1.ScopeLogs`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeLogs {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub log_records: Vec<LogRecord>,
    }

    /// `opentelemetry.proto.common.v1.InstrumentationScope`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub version: String,
    }

    /// `opentelemetry.proto.logs.v1.LogRecord`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LogRecord {
        #[prost(fixed64, tag = "1")]
        pub time_unix_nano: u64,
        #[prost(int32, tag = "2")]
        pub severity_number: i32,
        #[prost(string, tag = "3")]
        pub severity_text: String,
        #[prost(message, optional, tag = "5")]
        pub body: Option<AnyValue>,
        #[prost(message, repeated, tag = "6")]
        pub attributes: Vec<KeyValue>,
        #[prost(fixed64, tag = "11")]
        pub observed_time_unix_nano: u64,
    }

    /// `opentelemetry.proto.common.v1.KeyValue`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }

    /// `opentelemetry.proto.common.v1.AnyValue` (only its `string_value`, field 1 of the
    /// `value` oneof).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(string, tag = "1")]
        pub string_value: String,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    const LINE: &str = r#"{"v":1,"stream":"pod-a","n":7,"prev":"x","time":"2026-11-23T10:00:00Z","kind":"Request","session":"pod-a/3","identity":"claude","target":"orders-db","decision":{"verdict":"Refused","rule":"block"},"hash":"h7"}"#;

    #[test]
    fn protobuf_and_json_carry_the_same_record() {
        let lines = [Bytes::from_static(LINE.as_bytes())];
        let pb = pb::ExportLogsServiceRequest::decode(
            body(&lines, Encoding::Protobuf).unwrap().as_slice(),
        )
        .unwrap();
        let rl = &pb.resource_logs[0];
        let r = &rl.scope_logs[0].log_records[0];
        assert_eq!(r.body.as_ref().unwrap().string_value, LINE);
        assert_eq!(r.time_unix_nano, 1_795_428_000_000_000_000);
        assert_eq!((r.severity_number, r.severity_text.as_str()), (13, "WARN"));
        let attrs: Vec<(&str, &str)> = r
            .attributes
            .iter()
            .map(|a| {
                (
                    a.key.as_str(),
                    a.value.as_ref().unwrap().string_value.as_str(),
                )
            })
            .collect();
        assert!(attrs.contains(&("agentgate.kind", "Request")), "{attrs:?}");
        assert!(attrs.contains(&("agentgate.n", "7")), "{attrs:?}");
        assert!(
            attrs.contains(&("agentgate.identity", "claude")),
            "{attrs:?}"
        );
        assert!(
            attrs.contains(&("agentgate.verdict", "Refused")),
            "{attrs:?}"
        );
        assert!(attrs.contains(&("agentgate.hash", "h7")), "{attrs:?}");
        let resource = &rl.resource.as_ref().unwrap().attributes;
        assert!(
            resource.iter().any(|a| a.key == "agentgate.stream"
                && a.value.as_ref().unwrap().string_value == "pod-a")
        );

        let json: serde_json::Value =
            serde_json::from_slice(&body(&lines, Encoding::Json).unwrap()).unwrap();
        let r = &json["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0];
        assert_eq!(r["body"]["stringValue"], LINE);
        assert_eq!(r["timeUnixNano"], "1795428000000000000");
        assert_eq!(r["severityText"], "WARN");
    }

    #[test]
    fn a_line_that_is_not_a_record_fails_the_batch() {
        let lines = [Bytes::from_static(b"{\"not\":\"a record\"}")];
        assert!(body(&lines, Encoding::Protobuf).is_err());
    }
}
