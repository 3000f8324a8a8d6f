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
        "--identity",
        "claude",
        "-o",
        "json",
    ]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings = doc["findings"].as_array().unwrap();
    let au9 = findings.iter().find(|f| f["control"] == "au-9").unwrap();
    assert_eq!(au9["state"], "satisfied");
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
