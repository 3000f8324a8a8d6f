//! The audit trail end to end: a real sidecar in front of a real PostgreSQL records a psql
//! session to the JSON-lines file and to an append-only PostgreSQL table; `kubectl agentgate`
//! lists, shows, verifies and exports it; tampering is found; a sink outage and a kill -9
//! lose nothing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{cli, setup, sidecar_bin, stdout};
use testenv::process::{Proc, Spec, free_port, wait_until};
use testenv::{Parts, TestEnv};

#[test]
fn a_session_is_recorded_verified_shown_and_exported() {
    let s = setup();
    let (mut sidecar, port) = s.start("sidecar", &[]);
    let out = s.psql(
        port,
        "SELECT email FROM customers WHERE email = 'user7@example.com'",
    );
    assert_eq!(stdout(&out).trim(), "****", "{out:?}");
    let out = s.psql(port, "DELETE FROM customers WHERE id = 1");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("held for approval"),
        "{out:?}"
    );
    let out = s.psql(port, "SELEC nonsense");
    assert!(!out.status.success());
    // Values in comments, in DDL, in an error the agent provokes: none reaches a record.
    let out = s.psql(
        port,
        "CREATE TABLE leak AS SELECT '4111111111111111' AS card /* pw hunter2 */",
    );
    assert!(!out.status.success());
    let out = s.psql(
        port,
        "SELECT (SELECT email FROM customers WHERE id = 9)::int",
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid input syntax"));

    // Every record reaches both sinks; the session ends with a signed record.
    wait_until(
        &mut sidecar,
        Duration::from_secs(20),
        "records in the file sink",
        || s.file().matches("\"kind\":\"SessionEnd\"").count() >= 5,
    )
    .unwrap();
    let caught_up = wait_until(
        &mut sidecar,
        Duration::from_secs(20),
        "records in the table",
        || s.table("SELECT count(*) FROM agentgate_audit") == s.file_records().to_string(),
    );
    assert!(
        caught_up.is_ok(),
        "table {} vs file {}: {}",
        s.table("SELECT count(*) FROM agentgate_audit"),
        s.file_records(),
        s.file()
    );
    // A clean stop ends the stream (signed) and delivers it to every sink before exiting.
    sidecar.stop(Duration::from_secs(15));
    let file = s.file();
    assert!(file.contains("\"kind\":\"StreamEnd\""), "{file}");
    assert_eq!(
        s.table("SELECT count(*) FROM agentgate_audit"),
        s.file_records().to_string()
    );
    // No value the agent sent or received is in a record.
    assert!(!file.contains("user7@example.com"), "{file}");
    assert!(!file.contains("@example.com"));
    assert!(
        !file.contains("4111111111111111") && !file.contains("hunter2"),
        "{file}"
    );
    assert!(
        file.contains("CREATE TABLE leak AS SELECT $1 AS card\""),
        "{file}"
    );
    assert!(
        file.contains("\"error\":\"22P02 invalid_text_representation\""),
        "{file}"
    );
    assert!(
        file.contains("SELECT email FROM customers WHERE email = $1"),
        "{file}"
    );
    assert!(file.contains("\"verdict\":\"Refused\""));
    assert!(file.contains("\"masked\":{\"pii/emails\":1}"), "{file}");

    // verify: the file and the table.
    let dir = s.audit_dir.display().to_string();
    let out = cli(&["verify", "--key", &s.key(), &dir]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("OK: "), "{}", stdout(&out));
    assert!(stdout(&out).contains(", ended"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("warning"), "{}", stdout(&out));
    let out = cli(&["verify", "--key", &s.key(), "--postgres", &s.reader()]);
    assert!(out.status.success(), "{}", stdout(&out));
    // A mistyped key file is an error, never a verify against each stream's own key.
    let typo = format!("{}.typo", s.audit_dir.join("signing-key.pk8.pub").display());
    let out = cli(&["verify", "--key", &typo, &dir]);
    let said = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(
        !out.status.success() && said.contains("no such file, and not an Ed25519 public key"),
        "{said}"
    );

    // sessions and show.
    let out = cli(&["sessions", "--from", &dir, "--identity", "claude"]);
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 6, "{text}");
    // By time: all of them in the last hour, none before it; by target.
    let out = cli(&["sessions", "--from", &dir, "--since", "1h", "-o", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 5, "{}", stdout(&out));
    let out = cli(&["sessions", "--from", &dir, "--until", "1h", "-o", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(rows.is_empty(), "{}", stdout(&out));
    let out = cli(&[
        "sessions", "--from", &dir, "--target", "other", "-o", "yaml",
    ]);
    assert_eq!(stdout(&out).trim(), "[]", "{}", stdout(&out));
    // csv and oscal are export formats: elsewhere refused, not printed as something else.
    let out = cli(&["sessions", "--from", &dir, "-o", "csv"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("formats of `kubectl agentgate export`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        "sessions",
        "--from",
        &dir,
        "--decision",
        "Refused",
        "-o",
        "json",
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 1, "{}", stdout(&out));
    let out = cli(&[
        "sessions",
        "--from",
        &dir,
        "--decision",
        "Held",
        "-o",
        "json",
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 2, "{}", stdout(&out));
    assert!(rows.iter().all(|r| r["held"] == 1));
    let (session, text) = rows
        .iter()
        .map(|r| {
            let session = r["session"].as_str().unwrap().to_owned();
            let text = stdout(&cli(&["show", &session, "--from", &dir]));
            (session, text)
        })
        .find(|(_, text)| text.contains("DELETE"))
        .expect("the DELETE's session");
    assert!(
        text.contains("Held (guardrail") || text.contains("Held ("),
        "{text}"
    );
    assert!(
        text.contains("DELETE FROM customers WHERE id = $1"),
        "{text}"
    );
    assert!(
        text.contains("SessionStart") && text.contains("SessionEnd"),
        "{text}"
    );
    let out = cli(&["replay", &session, "--from", &dir]);
    assert!(out.status.success());

    // The writer role cannot change what it wrote.
    let changed = Command::new(s.env.bins.pg_bin.join("psql"))
        .arg(&s.sink)
        .args(["-X", "-c", "UPDATE agentgate_audit SET kind = 'x'"])
        .output()
        .unwrap();
    assert!(!changed.status.success());
    assert!(
        String::from_utf8_lossy(&changed.stderr).contains("permission denied"),
        "{changed:?}"
    );

    // Tampering: an edited copy fails and names the record.
    let tampered = s.env.dir().join("tampered.jsonl");
    let edited = file.replacen("\"verdict\":\"Refused\"", "\"verdict\":\"Allowed\"", 1);
    std::fs::write(&tampered, edited).unwrap();
    let out = cli(&["verify", "--key", &s.key(), &tampered.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("TAMPERED Edited"), "{}", stdout(&out));
    // A deleted line.
    let lines: Vec<&str> = file.lines().collect();
    let without: Vec<&str> = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 4)
        .map(|(_, l)| *l)
        .collect();
    std::fs::write(&tampered, without.join("\n")).unwrap();
    let out = cli(&["verify", "--key", &s.key(), &tampered.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("TAMPERED Missing"),
        "{}",
        stdout(&out)
    );

    // Export: JSON, CSV and OSCAL.
    let out = cli(&[
        "export",
        "--from",
        &dir,
        "--key",
        &s.key(),
        "--identity",
        "claude",
        "-o",
        "json",
    ]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings = doc["findings"].as_array().unwrap();
    let au9 = findings.iter().find(|f| f["control"] == "au-9").unwrap();
    assert_eq!(au9["state"], "satisfied", "{au9}");
    let au10 = findings.iter().find(|f| f["control"] == "au-10").unwrap();
    assert_eq!(au10["state"], "satisfied", "{au10}");
    let ac3 = findings.iter().find(|f| f["control"] == "ac-3").unwrap();
    assert!(!ac3["evidence"].as_array().unwrap().is_empty());
    let out = cli(&["export", "--from", &dir, "-o", "csv"]);
    assert!(stdout(&out).starts_with("control,title,state"));
    let out = cli(&["export", "--from", &dir, "-o", "oscal"]);
    let oscal = s.env.dir().join("oscal.json");
    std::fs::write(&oscal, &out.stdout).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        doc["assessment-results"]["metadata"]["oscal-version"],
        "1.1.2"
    );
    // Valid against NIST's published OSCAL JSON schema.
    testenv::oscal_validate(&oscal).unwrap();
    // A trail with no records proves nothing was kept.
    let empty = s.env.dir().join("empty-trail");
    std::fs::create_dir_all(&empty).unwrap();
    let (state, summary) = export_state(
        &["--from", empty.to_str().unwrap(), "--key", &s.key()],
        "au-9",
    );
    assert_eq!(state, "not-satisfied", "{summary}");
    assert!(summary.contains("holds no records"), "{summary}");
    sidecar.stop(Duration::from_secs(5));
}

#[test]
fn a_sink_outage_and_a_kill_lose_nothing() {
    let s = setup();
    let (mut sidecar, port) = s.start("sidecar-1", &[]);
    assert!(s.psql(port, "SELECT 1").status.success());
    // The table sink goes down: its role cannot log in.
    s.sink_down();
    for i in 0..40 {
        let out = s.psql(port, &format!("SELECT {i}"));
        assert!(out.status.success(), "{out:?}");
    }
    wait_until(
        &mut sidecar,
        Duration::from_secs(10),
        "the file sink",
        || s.file().matches("\"kind\":\"SessionEnd\"").count() >= 41,
    )
    .unwrap();
    // Killed while records wait for the table: they stay spilled.
    let pid = sidecar.pid().unwrap();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.table("ALTER ROLE agentgate_audit_writer LOGIN");
    let (mut sidecar, port) = s.start("sidecar-2", &[]);
    assert!(s.psql(port, "SELECT 'after'").status.success());
    // Everything the file has, the table has: nothing was lost in the outage or the kill.
    wait_until(
        &mut sidecar,
        Duration::from_secs(30),
        "the table catches up",
        || s.table("SELECT count(*) FROM agentgate_audit") == s.file_records().to_string(),
    )
    .unwrap();
    // The killed stream's end is covered by the next start's signature; the running one is
    // verified as open.
    let out = cli(&[
        "verify",
        "--key",
        &s.key(),
        "--open",
        "--postgres",
        &s.reader(),
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert_eq!(
        stdout(&out).matches("no StreamEnd").count(),
        1,
        "{}",
        stdout(&out)
    );
    sidecar.stop(Duration::from_secs(15));
    let out = cli(&["verify", "--key", &s.key(), "--postgres", &s.reader()]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(!stdout(&out).contains("warning"), "{}", stdout(&out));
    sidecar.stop(Duration::from_secs(5));
}

#[test]
fn commands_are_refused_while_the_audit_buffer_is_full() {
    let s = setup();
    let (mut sidecar, port) = s.start("sidecar", &["--audit-max-spill-mib=1".into()]);
    s.sink_down();
    // Fill the buffer: over 1 MiB of records that cannot reach the table (one session,
    // thousands of statements; psql goes on after an error).
    let script = s.env.dir().join("many.sql");
    let sql: String = (0..6000).map(|i| format!("SELECT {i} AS n;\n")).collect();
    std::fs::write(&script, sql).unwrap();
    let out = Command::new(s.env.bins.pg_bin.join("psql"))
        .arg(format!(
            "host=127.0.0.1 port={port} dbname=db user=claude sslmode=disable"
        ))
        .args(["-X", "-At", "-f", &script.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let refused = stderr
        .lines()
        .find(|l| l.contains("audit"))
        .map(str::to_owned);
    let refused = refused.expect("the gateway kept running commands with a full audit buffer");
    assert!(
        refused.contains("agentgate refuses new commands: its audit buffer is full"),
        "{refused}"
    );
    assert!(refused.contains("sink postgres failing since"), "{refused}");
    // The sink recovers: commands run again.
    s.table("ALTER ROLE agentgate_audit_writer LOGIN");
    wait_until(
        &mut sidecar,
        Duration::from_secs(60),
        "commands run again",
        || s.psql(port, "SELECT 1").status.success(),
    )
    .unwrap();
    sidecar.stop(Duration::from_secs(5));
}

#[test]
fn the_file_sink_rotates_and_verify_reads_the_rotated_files_in_order() {
    let s = setup();
    let (mut sidecar, port) = s.start("sidecar", &["--audit-file-max-bytes=8192".into()]);
    for i in 0..30 {
        assert!(s.psql(port, &format!("SELECT {i}")).status.success());
    }
    wait_until(
        &mut sidecar,
        Duration::from_secs(20),
        "30 sessions recorded",
        || {
            let all: String = std::fs::read_dir(&s.audit_dir)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect();
            all.matches("\"kind\":\"SessionEnd\"").count() >= 30
        },
    )
    .unwrap();
    let mut rotated: Vec<_> = std::fs::read_dir(&s.audit_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("audit.") && name.ends_with(".jsonl") && name != "audit.jsonl"
        })
        .collect();
    rotated.sort();
    assert!(rotated.len() >= 3, "{rotated:?}");
    for f in &rotated {
        assert!(std::fs::metadata(f).unwrap().len() <= 8192 + 2048, "{f:?}");
    }
    sidecar.stop(Duration::from_secs(15));
    let dir = s.audit_dir.display().to_string();
    let out = cli(&["verify", "--key", &s.key(), &dir]);
    assert!(out.status.success(), "{}", stdout(&out));
    // Retention deleted the oldest file: the missing beginning is reported, and accepted
    // only when asked.
    std::fs::remove_file(&rotated[0]).unwrap();
    let out = cli(&["verify", "--key", &s.key(), &dir]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("stream begins at n="),
        "{}",
        stdout(&out)
    );
    let out = cli(&["verify", "--key", &s.key(), "--allow-partial", &dir]);
    assert!(out.status.success(), "{}", stdout(&out));
    sidecar.stop(Duration::from_secs(5));
}

/// Terminal sessions replay as asciicast v2, which asciinema itself plays.
#[test]
fn a_terminal_session_replays_as_an_asciicast_asciinema_plays() {
    use agentgate_crds::audit::{Chain, IoChunk, Record, RecordKind, Signer};
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = Signer::generate().unwrap();
    let mut chain = Chain::new("ssh-sidecar");
    let t0: jiff::Timestamp = "2026-11-23T04:00:00Z".parse().unwrap();
    let mut lines = Vec::new();
    let mut push = |mut r: Record, sign: bool| {
        lines
            .push(String::from_utf8(chain.seal(&mut r, sign.then_some(&signer)).unwrap()).unwrap());
    };
    let mut start = Record::new(RecordKind::StreamStart, t0);
    start.key = Some(signer.public().clone());
    push(start, true);
    let session = |kind, ms: i64| {
        let mut r = Record::new(kind, t0 + jiff::SignedDuration::from_millis(ms));
        r.session = Some("claude-ssh-1".into());
        r.identity = Some("claude".into());
        r
    };
    push(session(RecordKind::SessionStart, 0), false);
    for (ms, stream, data) in [
        (100, "o", "$ "),
        (900, "i", "ls\r"),
        (950, "o", "ls\r\nREADME.md  src\r\n$ "),
        (2000, "o", "exit\r\n"),
    ] {
        let mut r = session(RecordKind::Io, ms);
        r.io = Some(IoChunk {
            stream: stream.into(),
            data: data.into(),
        });
        push(r, false);
    }
    push(session(RecordKind::SessionEnd, 2100), true);
    let file = dir.path().join("audit.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = cli(&[
        "replay",
        "claude-ssh-1",
        "--from",
        &file.display().to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let cast = stdout(&out);
    let mut cast_lines = cast.lines();
    let header: serde_json::Value = serde_json::from_str(cast_lines.next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    let first: serde_json::Value = serde_json::from_str(cast_lines.next().unwrap()).unwrap();
    assert_eq!(first, serde_json::json!([0.1, "o", "$ "]));
    let cast_file = dir.path().join("session.cast");
    std::fs::write(&cast_file, &cast).unwrap();
    // asciinema reads it back: the output stream, as the agent's terminal showed it.
    // (asciinema wants a terminal: `script` gives it one.)
    let played = Command::new("script")
        .args([
            "-qec",
            &format!("asciinema cat {}", cast_file.display()),
            "/dev/null",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script and asciinema (installed by tests/env/install.sh)");
    assert!(played.status.success(), "{played:?}");
    assert_eq!(
        String::from_utf8_lossy(&played.stdout),
        "$ ls\r\nREADME.md  src\r\n$ exit\r\n"
    );
}

/// A real SSH session through the gateway (OpenSSH's ssh with a pty, to a real sshd),
/// replayed by the CLI as asciicast v2 and played back by asciinema.
#[test]
fn an_ssh_session_through_the_gateway_replays_as_it_ran() {
    let env = TestEnv::start(Parts {
        ssh: true,
        ..Default::default()
    })
    .expect("environment");
    let sshd = env.ssh().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy");
    let targets = dir.path().join("targets");
    std::fs::create_dir_all(&policy).unwrap();
    sshd.write_credentials(&targets, "host").unwrap();
    std::fs::write(
        policy.join("policy.yaml"),
        format!(
            "apiVersion: agentgate.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{ name: claude }}\nspec:\n  owner: team\n  authentication: {{ serviceAccount: {{ name: claude }} }}\n  baseline: [ {{ target: host, scope: {{ operations: [Read] }} }} ]\n---\n{}",
            sshd.target_yaml("host").unwrap()
        ),
    )
    .unwrap();
    let client = dir.path().join("client");
    let audit = dir.path().join("audit");
    let spec = Spec::new("sidecar-ssh-replay", sidecar_bin()).args([
        format!("--policy-dir={}", policy.display()),
        "--identity=claude".into(),
        format!("--targets-dir={}", targets.display()),
        format!("--pg-addr=127.0.0.1:{}", free_port().unwrap()),
        "--kube-addr=off".into(),
        format!("--ssh-addr=127.0.0.1:{}", free_port().unwrap()),
        format!("--client-dir={}", client.display()),
        format!("--audit-dir={}", audit.display()),
    ]);
    let mut sidecar = Proc::start(spec, &env.dir().join("logs")).unwrap();
    let config = client.join("ssh_config");
    testenv::process::wait_until(
        &mut sidecar,
        Duration::from_secs(30),
        "the ssh_config",
        || std::fs::read_to_string(&config).is_ok_and(|c| c.contains("Host host")),
    )
    .unwrap();
    let mut child = Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args(["-tt", "-o", "BatchMode=yes", "host"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        for line in ["echo replay-$((6*7))\n", "exit\n"] {
            std::thread::sleep(Duration::from_millis(500));
            input.write_all(line.as_bytes()).unwrap();
            input.flush().unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("replay-42"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sidecar.stop(Duration::from_secs(5));
    let file = audit.join("audit.jsonl");
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let session = records
        .iter()
        .find(|r| r["kind"] == "Io")
        .and_then(|r| r["session"].as_str())
        .expect("an SSH session with terminal I/O")
        .to_owned();
    let out = cli(&["replay", &session, "--from", &file.display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    let cast = stdout(&out);
    let header: serde_json::Value = serde_json::from_str(cast.lines().next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert!(cast.contains("\"i\""), "input events: {cast}");
    let cast_file = dir.path().join("ssh.cast");
    std::fs::write(&cast_file, &cast).unwrap();
    let played = Command::new("script")
        .args([
            "-qec",
            &format!("asciinema cat {}", cast_file.display()),
            "/dev/null",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script and asciinema");
    assert!(played.status.success(), "{played:?}");
    assert!(
        String::from_utf8_lossy(&played.stdout).contains("replay-42"),
        "{}",
        String::from_utf8_lossy(&played.stdout)
    );
    // The verification of the whole stream holds (the session's records are chained).
    let key = audit.join("signing-key.pk8.pub").display().to_string();
    let out = cli(&["verify", "--key", &key, &file.display().to_string()]);
    assert!(out.status.success(), "{}", stdout(&out));
}

/// Trails built in the test: streams sealed and signed as a sidecar seals them.
mod forged {
    use agentgate_crds::audit::{Chain, Record, RecordKind, Request, Signer, StreamLink};

    pub fn record(kind: RecordKind, session: Option<&str>) -> Record {
        let mut r = Record::new(kind, "2026-11-23T04:00:00Z".parse().unwrap());
        r.session = session.map(str::to_owned);
        r.identity = Some("claude".to_owned());
        if kind == RecordKind::Request {
            r.request = Some(Request {
                id: 1,
                text: "SELECT 1".to_owned(),
                ..Default::default()
            });
        }
        r
    }

    /// A stream: a signed start (linking `previous`), session `s` with two requests and a
    /// signed checkpoint, and when `end`, the signed session and stream ends.
    pub fn stream(
        chain: &mut Chain,
        signer: &Signer,
        previous: Option<StreamLink>,
        end: bool,
    ) -> Vec<String> {
        let mut lines = Vec::new();
        let mut push = |mut r: Record, sign: bool| {
            let line = chain.seal(&mut r, sign.then_some(signer)).unwrap();
            lines.push(String::from_utf8(line).unwrap());
        };
        let mut start = record(RecordKind::StreamStart, None);
        start.key = Some(signer.public().clone());
        start.previous = previous;
        push(start, true);
        push(record(RecordKind::SessionStart, Some("s")), false);
        push(record(RecordKind::Request, Some("s")), false);
        push(record(RecordKind::Request, Some("s")), false);
        push(record(RecordKind::Checkpoint, None), true);
        if end {
            push(record(RecordKind::SessionEnd, Some("s")), true);
            push(record(RecordKind::StreamEnd, None), true);
        }
        lines
    }

    pub fn link(lines: &[String]) -> StreamLink {
        let last: Record = serde_json::from_str(lines.last().unwrap()).unwrap();
        StreamLink {
            stream: last.stream,
            n: last.n,
            hash: last.hash,
        }
    }
}

/// Writes `lines` to a file in `dir` and returns its path.
fn trail_file(dir: &std::path::Path, name: &str, lines: &[String]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path.display().to_string()
}

/// The state and summary of `control` in `export -o json`.
fn export_state(args: &[&str], control: &str) -> (String, String) {
    let out = cli(&[&["export", "-o", "json"][..], args].concat());
    assert!(out.status.success(), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["control"] == control)
        .unwrap()
        .clone();
    (
        f["state"].as_str().unwrap().to_owned(),
        f["summary"].as_str().unwrap().to_owned(),
    )
}

/// A trail cut at its end, or missing its newest stream, fails `verify` unless the auditor
/// says a sidecar still runs (`--open`); export does not call AU-9 satisfied over it.
#[test]
fn a_trail_cut_at_its_end_or_missing_its_newest_stream_fails() {
    use agentgate_crds::audit::{Chain, Signer};
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = Signer::generate().unwrap();
    let key = signer.public().public_key.clone();
    // A killed run, continued by a second run that stopped cleanly.
    let first = forged::stream(&mut Chain::new("run-1"), &signer, None, false);
    let second = forged::stream(
        &mut Chain::new("run-2"),
        &signer,
        Some(forged::link(&first)),
        true,
    );
    let whole = trail_file(
        dir.path(),
        "whole.jsonl",
        &[first.clone(), second.clone()].concat(),
    );
    let out = cli(&["verify", "--key", &key, &whole]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(!stdout(&out).contains("warning"), "{}", stdout(&out));
    assert_eq!(
        export_state(&["--from", &whole, "--key", &key], "au-9").0,
        "satisfied"
    );
    // Cut after the second run's checkpoint: every record left is signed, the end is gone.
    let cut = trail_file(
        dir.path(),
        "cut.jsonl",
        &[first.clone(), second[..5].to_vec()].concat(),
    );
    // The newest stream deleted whole: the first is continued by nothing.
    let deleted = trail_file(dir.path(), "deleted.jsonl", &first);
    for (file, stream) in [(&cut, "run-2"), (&deleted, "run-1")] {
        let out = cli(&["verify", "--key", &key, file]);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        let text = stdout(&out);
        assert!(
            text.contains(&format!(
                "TAMPERED Truncated at -: stream {stream}: the trail ends at n=4 without a StreamEnd"
            )) && text.contains("--open"),
            "{text}"
        );
        // A sidecar still running: accepted, with a warning.
        let out = cli(&["verify", "--key", &key, "--open", file]);
        assert!(out.status.success(), "{}", stdout(&out));
        assert!(stdout(&out).contains("no StreamEnd"), "{}", stdout(&out));
        let (state, summary) = export_state(&["--from", file, "--key", &key], "au-9");
        assert_eq!(state, "not-satisfied");
        assert!(
            summary.starts_with("partially satisfied") && summary.contains("without a StreamEnd"),
            "{summary}"
        );
    }
}

/// Unsigned records chained on after a signed StreamEnd, or a whole unsigned stream that
/// "begins" past n=0, fail `verify` (also with --open and --allow-partial), and export's AU-9
/// and AU-10 are not satisfied over them; nor over a trail checked against no trusted key.
#[test]
fn forged_unsigned_records_are_not_accepted_by_verify_or_export() {
    use agentgate_crds::audit::{Chain, RecordKind, SCHEMA_VERSION, Signer, hash_of};
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = Signer::generate().unwrap();
    let key = signer.public().public_key.clone();
    let mut chain = Chain::new("run-1");
    let mut appended = forged::stream(&mut chain, &signer, None, true);
    for kind in [RecordKind::SessionStart, RecordKind::Request] {
        let mut r = forged::record(kind, Some("x"));
        appended.push(String::from_utf8(chain.seal(&mut r, None).unwrap()).unwrap());
    }
    let after_end = trail_file(dir.path(), "after-end.jsonl", &appended);
    for flags in [&[][..], &["--open", "--allow-partial"][..]] {
        let out = cli(&[
            &["verify", "--key", key.as_str()][..],
            flags,
            &[after_end.as_str()],
        ]
        .concat());
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        assert!(
            stdout(&out).contains("records n=7..=8 come after its StreamEnd (n=6)"),
            "{}",
            stdout(&out)
        );
    }
    for control in ["au-9", "au-10"] {
        let (state, summary) = export_state(&["--from", &after_end, "--key", &key], control);
        assert_eq!(state, "not-satisfied", "{control}: {summary}");
        assert!(summary.contains("after its StreamEnd"), "{summary}");
    }

    // A whole stream invented, its beginning "deleted by retention": nothing signed.
    let mut prev = "00".repeat(32);
    let mut invented = forged::stream(&mut Chain::new("run-0"), &signer, None, true);
    for (i, kind) in [RecordKind::SessionStart, RecordKind::Request]
        .into_iter()
        .enumerate()
    {
        let mut r = forged::record(kind, Some("y"));
        r.v = SCHEMA_VERSION;
        r.stream = "run-9".to_owned();
        r.n = 40 + i as u64;
        r.prev.clone_from(&prev);
        r.seq = Some(i as u64);
        r.session_prev = Some(prev.clone());
        r.hash = hash_of(&r).unwrap();
        prev.clone_from(&r.hash);
        invented.push(serde_json::to_string(&r).unwrap());
    }
    let invented = trail_file(dir.path(), "invented.jsonl", &invented);
    let out = cli(&[
        "verify",
        "--key",
        &key,
        "--open",
        "--allow-partial",
        &invented,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("stream run-9: none of its records n=40..=41 is covered"),
        "{}",
        stdout(&out)
    );
    for control in ["au-9", "au-10"] {
        let (state, summary) = export_state(&["--from", &invented, "--key", &key], control);
        assert_eq!(state, "not-satisfied", "{control}: {summary}");
        assert!(summary.contains("none of its records"), "{summary}");
    }

    // An intact trail, but no trusted key: each stream's own key proves nothing about who
    // wrote it.
    let intact = forged::stream(&mut Chain::new("run-1"), &signer, None, true);
    let intact = trail_file(dir.path(), "intact.jsonl", &intact);
    for control in ["au-9", "au-10"] {
        let (state, summary) = export_state(&["--from", &intact], control);
        assert_eq!(state, "not-satisfied", "{control}: {summary}");
        assert!(
            summary.starts_with("partially satisfied") && summary.contains("--key"),
            "{summary}"
        );
        let (state, _) = export_state(&["--from", &intact, "--key", &key], control);
        assert_eq!(state, "satisfied", "{control}");
    }
}

/// A stream name or key id carrying terminal escapes is printed escaped: it cannot hide the
/// TAMPERED and FAILED lines after it.
#[test]
fn terminal_escapes_in_the_trail_are_printed_escaped() {
    use agentgate_crds::audit::{Chain, Signer};
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = Signer::generate().unwrap();
    let (forger, _) = Signer::generate().unwrap();
    let key = signer.public().public_key.clone();
    let mut lines = forged::stream(&mut Chain::new("run-1"), &signer, None, true);
    // Signed with another key, named to hide what follows ("conceal"), its key id to set
    // the window title and erase the line.
    let mut chain = Chain::new("\u{1b}[8m\u{202e}");
    let mut other = forged::stream(&mut chain, &forger, None, false);
    let mut start: agentgate_crds::audit::Record = serde_json::from_str(&other[0]).unwrap();
    start.key.as_mut().unwrap().key_id = "\u{1b}]0;ok\u{7}\u{1b}[2K\u{9b}".to_owned();
    other[0] = String::from_utf8(
        Chain::new("\u{1b}[8m\u{202e}")
            .seal(&mut start, Some(&forger))
            .unwrap(),
    )
    .unwrap();
    lines.extend(other);
    let file = trail_file(dir.path(), "escapes.jsonl", &lines);
    for flags in [&[][..], &["--open"][..]] {
        let out = cli(&[
            &["verify", "--key", key.as_str()][..],
            flags,
            &[file.as_str()],
        ]
        .concat());
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        let text = stdout(&out);
        for bad in ['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}'] {
            assert!(!text.contains(bad), "{bad:?} printed raw: {text:?}");
        }
        assert!(
            text.contains("stream \\u{1b}[8m\\u{202e}: records"),
            "{text}"
        );
        assert!(
            text.contains("key \\u{1b}]0;ok\\u{7}\\u{1b}[2K\\u{9b}"),
            "{text}"
        );
        assert!(text.contains("TAMPERED BadSignature"), "{text}");
        assert!(
            text.lines().last().unwrap().starts_with("FAILED: "),
            "{text}"
        );
    }
}
