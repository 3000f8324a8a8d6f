//! The OTLP/HTTP and webhook sinks against real receivers: an OpenTelemetry Collector that
//! goes away for 60 s while agents keep working, and an HTTP endpoint that fails before it
//! accepts. Nothing is lost: every record in the file sink reaches them.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cli, setup, stderr, stdout};
use testenv::OtelCollector;
use testenv::process::wait_until;

/// The hashes of the distinct records in the file sink.
fn file_hashes(s: &common::Setup) -> HashSet<String> {
    s.file()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["hash"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn otlp_a_60s_collector_outage_under_load_loses_nothing() {
    let s = setup();
    let mut collector = OtelCollector::start(&s.env.dir().join("otel")).unwrap();
    let (mut sidecar, port) = s.start(
        "sidecar",
        &[format!("--audit-otlp={}", collector.logs_endpoint())],
    );
    let out = s.psql(port, "SELECT email FROM customers WHERE id = 3");
    assert_eq!(common::stdout(&out).trim(), "****");
    collector
        .wait_for_log("\"kind\":\"SessionEnd\"", Duration::from_secs(20))
        .unwrap();
    let text = collector.received_logs_text();
    assert!(
        text.contains("-> agentgate.identity: Str(claude)"),
        "{text}"
    );
    assert!(text.contains("-> agentgate.kind: Str(Request)"), "{text}");
    assert!(
        text.contains("service.name: Str(agentgate-sidecar)"),
        "{text}"
    );
    assert!(!text.contains("@example.com"), "{text}");

    // The collector goes away for 60 s while pgbench keeps the gateway busy.
    collector.stop();
    let script = s.env.dir().join("select.sql");
    std::fs::write(&script, "SELECT id FROM customers WHERE id = 1;\n").unwrap();
    let started = Instant::now();
    let bench = Command::new(s.env.bins.pg_bin.join("pgbench"))
        // 61 s: with -R, pgbench ends a client whose next scheduled transaction falls past
        // the end, up to a moment before -T; the load must outlast the 60 s outage.
        .args(["-n", "-c", "2", "-T", "61", "-R", "40", "-f"])
        .arg(&script)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "claude",
            "db",
        ])
        .env("PGSSLMODE", "disable")
        .output()
        .unwrap();
    assert!(bench.status.success(), "{bench:?}");
    assert!(started.elapsed() >= Duration::from_secs(60));
    let during = file_hashes(&s);
    assert!(
        during.len() > 1000,
        "only {} records under load",
        during.len()
    );
    collector.start_again().unwrap();

    // Every record the file has reaches the collector once it is back.
    let missing = |c: &OtelCollector| {
        let text = c.received_logs_text();
        let got: HashSet<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("-> agentgate.hash: Str("))
            .filter_map(|l| l.strip_suffix(')'))
            .collect();
        file_hashes(&s)
            .iter()
            .filter(|h| !got.contains(h.as_str()))
            .count()
    };
    let caught_up = wait_until(
        &mut sidecar,
        Duration::from_secs(90),
        "the collector catches up",
        || missing(&collector) == 0,
    );
    assert!(
        caught_up.is_ok(),
        "{} records never reached the collector",
        missing(&collector)
    );
    sidecar.stop(Duration::from_secs(5));
}

/// The webhook's accepted requests: (authorization header, body).
type Received = Arc<Mutex<Vec<(String, String)>>>;

/// A minimal HTTP/1.1 endpoint: answers 503 to the first `fail` requests, then 200 (each
/// answer `delay` late), and keeps the bodies it accepted.
fn webhook(fail: usize, delay: Duration) -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got: Received = Arc::default();
    let seen = got.clone();
    std::thread::spawn(move || {
        let mut count = 0;
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut head = Vec::new();
                let mut len = 0;
                let mut auth = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if lower.starts_with("authorization:") {
                        auth = line[14..].trim().to_owned();
                    }
                    head.push(line);
                }
                if head.is_empty() {
                    break;
                }
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_err() {
                    break;
                }
                count += 1;
                std::thread::sleep(delay);
                let mut w = conn.try_clone().unwrap();
                if count <= fail {
                    let _ = w.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy",
                    );
                } else {
                    seen.lock()
                        .unwrap()
                        .push((auth, String::from_utf8_lossy(&body).into_owned()));
                    let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
            }
        }
    });
    (port, got)
}

/// The records the webhook accepted (each checked for the bearer token), as JSON text.
fn delivered(got: &Received) -> HashSet<String> {
    let mut lines = HashSet::new();
    for (auth, body) in got.lock().unwrap().iter() {
        assert_eq!(auth, "Bearer s3cret-token");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        for r in v["records"].as_array().unwrap() {
            lines.insert(r.to_string());
        }
    }
    lines
}

/// The file sink's records, as JSON text (normalized as `delivered` has them).
fn file_records(s: &common::Setup) -> HashSet<String> {
    s.file()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap()
                .to_string()
        })
        .collect()
}

/// A webhook that takes seconds to answer each delivery: the agent's statements do not wait
/// for it (records are delivered off the request path), and every record still arrives.
#[test]
fn a_slow_webhook_neither_slows_the_agent_nor_loses_records() {
    let s = setup();
    let (hook, got) = webhook(0, Duration::from_secs(3));
    // The token given itself (as an injected sidecar gets it from a Secret), not in a file.
    let (mut sidecar, port) = s.start(
        "sidecar-slow-sink",
        &[
            format!("--audit-webhook=http://127.0.0.1:{hook}/records"),
            "--audit-webhook-token=s3cret-token".into(),
        ],
    );
    for i in 0..20 {
        assert!(s.psql(port, &format!("SELECT {i}")).status.success());
    }
    // Every statement was answered while the webhook still lagged behind.
    let file = file_records(&s);
    assert!(
        !file.is_subset(&delivered(&got)),
        "the statements waited for the slow webhook"
    );
    wait_until(
        &mut sidecar,
        Duration::from_secs(90),
        "the slow webhook catches up",
        || {
            let file = file_records(&s);
            !file.is_empty() && file.is_subset(&delivered(&got))
        },
    )
    .unwrap();
    sidecar.stop(Duration::from_secs(5));
}

#[test]
fn the_webhook_gets_every_record_verbatim_after_failures() {
    let s = setup();
    let (hook, got) = webhook(3, Duration::ZERO);
    let token = s.env.dir().join("webhook-token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let (mut sidecar, port) = s.start(
        "sidecar",
        &[
            format!("--audit-webhook=http://127.0.0.1:{hook}/records"),
            format!("--audit-webhook-token-file={}", token.display()),
        ],
    );
    for i in 0..5 {
        assert!(s.psql(port, &format!("SELECT {i}")).status.success());
    }
    wait_until(
        &mut sidecar,
        Duration::from_secs(30),
        "the webhook catches up",
        || {
            let file = file_records(&s);
            !file.is_empty() && file.is_subset(&delivered(&got))
        },
    )
    .unwrap();
    // The records arrive verbatim: a receiver can verify the chain itself.
    let dir = s.env.dir().join("from-webhook");
    std::fs::create_dir_all(&dir).unwrap();
    let mut all: Vec<serde_json::Value> = delivered(&got)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    all.sort_by_key(|v| v["n"].as_u64());
    let lines: Vec<String> = all.iter().map(|v| v.to_string()).collect();
    std::fs::write(dir.join("audit.jsonl"), lines.join("\n")).unwrap();
    let out = common::cli(&[
        "verify",
        "--key",
        &s.key(),
        "--open",
        &dir.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", common::stdout(&out));
    sidecar.stop(Duration::from_secs(5));
}

/// The PostgreSQL sink over TLS (`sslmode=require`): the server's certificate is verified,
/// so a server whose CA the sidecar does not trust gets nothing, and the sidecar says why;
/// with the CA given (`--audit-ca-file`) the records arrive, over TLS.
#[test]
fn the_postgres_sink_verifies_the_server_over_tls() {
    let s = setup();
    let pg = s.env.postgres().unwrap();
    let rows = || -> u64 {
        pg.psql_run("app", "SELECT count(*) FROM agentgate_audit")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let tls = s.sink.replace("sslmode=disable", "sslmode=require");
    assert_ne!(tls, s.sink);
    // No sslmode at all (libpq's default, `prefer`): TLS and verified just the same.
    let default = s.sink.replace(" sslmode=disable", "");
    let (mut untrusted, port) = s.start_with_sink("sidecar-pg-sink-untrusted", &default, &[]);
    assert!(s.psql(port, "SELECT 1").status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !untrusted.log_contains("invalid peer certificate") {
        assert!(
            Instant::now() < deadline,
            "no certificate error: {}",
            untrusted.log_tail(60)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(rows(), 0, "nothing reaches a server that is not trusted");
    untrusted.stop(Duration::from_secs(5));

    // libpq's verify-full reads as require (the name is always verified).
    let (mut trusted, port) = s.start_with_sink(
        "sidecar-pg-sink-tls",
        &tls.replace("sslmode=require", "sslmode=verify-full"),
        &[format!("--audit-ca-file={}", pg.ca_path().display())],
    );
    assert!(s.psql(port, "SELECT 2").status.success());
    wait_until(
        &mut trusted,
        Duration::from_secs(30),
        "records reach the table over TLS",
        || rows() > 0,
    )
    .unwrap();
    let over_tls = pg
        .psql_run(
            "app",
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'agentgate_audit_writer' AND s.ssl",
        )
        .unwrap();
    assert_ne!(over_tls.trim(), "0", "the sink's connection is TLS");
    trusted.stop(Duration::from_secs(5));

    // The CLI reads the table as the sink writes it: verified TLS unless told otherwise.
    let reader = s.reader().replace(" sslmode=disable", "");
    let out = cli(&["sessions", "--postgres", &reader]);
    assert!(!out.status.success(), "an untrusted server was read");
    assert!(
        stderr(&out).contains("invalid peer certificate"),
        "{}",
        stderr(&out)
    );
    let ca = pg.ca_path().display().to_string();
    let out = cli(&["verify", "--open", "--postgres", &reader, "--ca-file", &ca]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("OK: "), "{}", stdout(&out));
    let out = cli(&["sessions", "--postgres", &reader, "--ca-file", &ca]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("claude"), "{}", stdout(&out));
}
