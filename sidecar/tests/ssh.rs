//! The SSH gateway against a real sshd (Debian's OpenSSH) with OpenSSH's own `ssh`, `scp`
//! and `sftp`, and rsync: exec allowed, refused and held then approved; an interactive shell with a pty
//! whose lines are checked at Enter; masked output; file transfers; forwarding refused; the
//! host key checked against the Target; X11, agent and port forwarding only where granted;
//! and the records.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testenv::process::{Proc, Spec, free_port};
use testenv::{Parts, TestEnv};

/// A value the MaskPolicy masks (an email) and what it becomes.
const EMAIL: &str = "alice@example.com";

struct Setup {
    env: TestEnv,
    dir: tempfile::TempDir,
    config: PathBuf,
    audit: PathBuf,
    sidecar: Proc,
}

impl Setup {
    /// OpenSSH's `ssh` as the agent, through the gateway's ssh_config.
    fn ssh(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(&self.config)
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=20"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("ssh");
        {
            let mut input = child.stdin.take().expect("stdin");
            if let Some(bytes) = stdin {
                // Line by line, as an agent types: each line checked before the next.
                for line in bytes.split_inclusive(|b| *b == b'\n') {
                    let _ = input.write_all(line);
                    let _ = input.flush();
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }
        child.wait_with_output().expect("ssh output")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.ssh(args, None);
        assert!(
            out.status.success(),
            "ssh {args:?} failed ({:?}): {}\nsidecar: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            self.sidecar.log_tail(30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ssh`, expects the gateway's refusal (exit 126); returns stderr.
    fn refused(&self, args: &[&str]) -> String {
        let out = self.ssh(args, None);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(126),
            "ssh {args:?} should have been refused: out {} err {err}",
            String::from_utf8_lossy(&out.stdout)
        );
        err
    }

    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until the records hold a request with `text` and returns it.
    fn request(&self, text: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self
                .records()
                .into_iter()
                .find(|r| r["kind"] == "Request" && r["request"]["text"] == text)
            {
                return r;
            }
            assert!(Instant::now() < deadline, "no record of {text:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn setup() -> anyhow::Result<Setup> {
    let env = TestEnv::start(Parts {
        ssh: true,
        ..Default::default()
    })?;
    let sshd = env.ssh()?;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy");
    let targets = dir.path().join("targets");
    std::fs::create_dir_all(&policy)?;
    // Another host key: a Target whose knownHosts does not list the real one.
    let other = dir.path().join("other_key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()?;
    anyhow::ensure!(st.success(), "ssh-keygen");
    let other_pub = std::fs::read_to_string(other.with_extension("pub"))?;
    let real_pub = std::fs::read_to_string(sshd.known_hosts())?;
    let real_key = real_pub.split_whitespace().nth(2).unwrap_or_default();
    let other_key = other_pub.split_whitespace().nth(1).unwrap_or_default();
    let spoofed = sshd.target_yaml("spoofed")?.replace(real_key, other_key);
    for t in ["web", "files", "spoofed", "reports"] {
        sshd.write_credentials(&targets, t)?;
    }
    // What the `reports` Target's scope allows: reading under this folder only.
    let reports = dir.path().join("reports");
    std::fs::create_dir_all(&reports)?;
    std::fs::write(
        policy.join("policy.yaml"),
        format!(
            r#"apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: agent }}
spec:
  owner: platform-team
  authentication: {{ serviceAccount: {{ name: agent }} }}
  baseline:
    - target: web
      scope: {{ operations: [Read, Write] }}
    - target: files
      scope: {{ operations: [Read, Write], ssh: {{ portForwarding: true, agentForwarding: true, x11Forwarding: true }} }}
    - target: spoofed
      scope: {{ operations: [Read] }}
    - target: reports
      scope: {{ operations: [Read], ssh: {{ commands: ["sftp", "sftp opendir *", "sftp get {reports}/*", "cat {reports}/*"] }} }}
---
{web}---
{files}---
{spoofed}---
{reports_target}---
apiVersion: agentgate.dev/v1alpha1
kind: MaskPolicy
metadata: {{ name: pii }}
spec:
  targets: [web]
  rules: [ {{ name: emails, detectors: [Email], action: Redact }} ]
"#,
            web = sshd.target_yaml("web")?,
            files = sshd.target_yaml("files")?,
            reports_target = sshd.target_yaml("reports")?,
            reports = reports.display(),
        ),
    )?;
    let client_dir = dir.path().join("client");
    let audit_dir = dir.path().join("audit");
    let spec = Spec::new("sidecar-ssh", env!("CARGO_BIN_EXE_agentgate-sidecar"))
        .args([
            format!("--policy-dir={}", policy.display()),
            "--identity=agent".into(),
            format!("--targets-dir={}", targets.display()),
            format!("--pg-addr=127.0.0.1:{}", free_port()?),
            "--kube-addr=off".into(),
            format!("--ssh-addr=127.0.0.1:{}", free_port()?),
            format!("--client-dir={}", client_dir.display()),
            format!("--audit-dir={}", audit_dir.display()),
        ])
        .env("RUST_LOG", "info");
    let mut sidecar = Proc::start(spec, &env.dir().join("logs"))?;
    let config = client_dir.join("ssh_config");
    testenv::process::wait_until(
        &mut sidecar,
        Duration::from_secs(30),
        "the ssh_config",
        || std::fs::read_to_string(&config).is_ok_and(|c| c.contains("Host web")),
    )?;
    Ok(Setup {
        env,
        dir,
        config,
        audit: audit_dir.join("audit.jsonl"),
        sidecar,
    })
}

/// Approves the AccessGrant request a held message names (as an approver editing it in the
/// policy folder would).
fn approve(s: &Setup, held: &str) {
    let name = held
        .split("AccessGrant ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .expect("the grant is named")
        .trim()
        .to_owned();
    let filed = s
        .dir
        .path()
        .join("policy/requests")
        .join(format!("{name}.yaml"));
    let text = std::fs::read_to_string(&filed).expect("the request is filed");
    let approved = text.replace(
        "spec:\n",
        &format!(
            "spec:\n  decision: {{ verdict: Approve, decidedAt: \"{}\", decidedBy: {{ username: alice }} }}\n",
            jiff::Timestamp::now()
        ),
    );
    std::fs::write(filed.with_extension("tmp"), approved).unwrap();
    std::fs::rename(filed.with_extension("tmp"), &filed).unwrap();
}

#[test]
fn exec_through_the_gateway_checked_masked_and_recorded() -> anyhow::Result<()> {
    let s = setup()?;
    // Allowed: runs on the host as the Target's login.
    let out = s.ok(&["web", "echo hello from $(whoami)"]);
    assert_eq!(out.trim(), format!("hello from {}", s.env.ssh()?.user()));
    // Output is masked with the MaskPolicy (the value never reaches the agent).
    let out = s.ok(&[
        "web",
        &format!("echo contact {EMAIL} now; echo {EMAIL} >&2"),
    ]);
    assert!(!out.contains(EMAIL), "{out}");
    assert!(out.contains("contact ") && out.contains(" now"), "{out}");
    // Refused by the default guardrails, with the reason; nothing runs.
    let marker = s.dir.path().join("ran");
    let err = s.refused(&["web", &format!("touch {} && sudo id", marker.display())]);
    assert!(err.contains("agentgate: refused"), "{err}");
    assert!(err.contains("agentgate-block-privilege"), "{err}");
    assert!(!marker.exists(), "a refused command line ran in part");
    let err = s.refused(&["web", "r''m -r -f /"]);
    assert!(err.contains("refused"), "{err}");
    // What does not parse is refused.
    let err = s.refused(&["web", "echo 'unterminated"]);
    assert!(err.contains("cannot read this command"), "{err}");
    // Held: a person approves the exact command, then it runs; another command is held again.
    let cmd = "bash -c 'echo approved-run'";
    let held = s.refused(&["web", cmd]);
    assert!(held.contains("held for approval"), "{held}");
    approve(&s, &held);
    let deadline = Instant::now() + Duration::from_secs(15);
    let out = loop {
        let out = s.ssh(&["web", cmd], None);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(Instant::now() < deadline, "still held after approval");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(out.trim(), "approved-run");
    let held = s.refused(&["web", "bash -c 'echo another'"]);
    assert!(held.contains("held for approval"), "{held}");
    // Records: the refusal with its rule, the masked output, never the value.
    let r = s.request(&format!("touch {} && sudo id", marker.display()));
    assert_eq!(r["decision"]["verdict"], "Refused");
    let all = std::fs::read_to_string(&s.audit)?;
    assert!(!all.contains(EMAIL), "an unmasked value was recorded");
    assert!(
        s.records().iter().any(|r| r["kind"] == "Io"
            && r["io"]["data"]
                .as_str()
                .is_some_and(|d| d.contains("contact"))),
        "the output was recorded"
    );
    // A command's input without a terminal is recorded too (masked).
    let out = s.ssh(
        &["web", "wc -l"],
        Some(format!("piped-input-line {EMAIL}\n").as_bytes()),
    );
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.records().iter().any(|r| {
        r["kind"] == "Io"
            && r["io"]["stream"] == "i"
            && r["io"]["data"]
                .as_str()
                .is_some_and(|d| d.contains("piped-input-line"))
    }) {
        assert!(
            Instant::now() < deadline,
            "the exec's input was not recorded"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let all = std::fs::read_to_string(&s.audit)?;
    assert!(!all.contains(EMAIL), "an unmasked value was recorded");
    // Output is recorded as it passed, whole: line ends and tabs kept (a replay needs
    // them), long output in several records rather than cut.
    let cmd = "printf 'a\\tb\\nc\\n'; head -c 40000 /dev/zero | tr '\\0' x";
    let out = s.ssh(&["web", cmd], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let session = s.request(cmd)["session"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let recorded = loop {
        let text: String = s
            .records()
            .into_iter()
            .filter(|r| r["session"] == session.as_str() && r["io"]["stream"] == "o")
            .filter_map(|r| r["io"]["data"].as_str().map(str::to_owned))
            .collect();
        if text.matches('x').count() >= 40000 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        recorded.starts_with("a\tb\nc\n"),
        "{:?}",
        &recorded[..recorded.len().min(40)]
    );
    assert_eq!(recorded.matches('x').count(), 40000);
    Ok(())
}

#[test]
fn an_interactive_shell_is_checked_line_by_line() -> anyhow::Result<()> {
    let s = setup()?;
    let marker = s.dir.path().join("shell-ran");
    let script = format!(
        "echo one-$((40+2))\nsudo touch {m}\necho {EMAIL}\necho \"two\nlines\"\necho three\necho again!!\n#! sudo touch {m}\nfind /etc/hostname ! -name x -printf found-%f\\\\n\nls / ! sudo touch {m}\nls / #sudo touch {m}\nls 'x!sudo touch {m}\n'\nexit\n",
        m = marker.display()
    );
    let out = s.ssh(&["-tt", "web"], Some(script.as_bytes()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("one-42"), "{text}");
    assert!(text.contains("agentgate: refused"), "{text}");
    assert!(!marker.exists(), "a refused line reached the host");
    assert!(!text.contains(EMAIL), "{text}");
    assert!(text.contains("lines"), "{text}");
    assert!(text.contains("three"), "{text}");
    // History expansion would run what was not checked.
    assert!(
        text.contains("agentgate: refused: history expansion (!) is refused"),
        "{text}"
    );
    assert!(!text.contains("againecho"), "{text}");
    // A pager that a command opened would read a line as keys and run what follows `!`
    // or `#`: a comment that hides a command, and a command's `!` tail it may not run,
    // are refused; an option after `!` is no command.
    assert_eq!(text.matches("agentgate: refused").count(), 6, "{text}");
    assert!(text.contains("found-hostname"), "{text}");
    // A program run with a terminal gets its input checked the same way (a pager's `!cmd`
    // would otherwise reach a shell unseen).
    let out = s.ssh(
        &["-tt", "web", "cat"],
        Some(b"plain-text\n!sudo id\nkeep '|(sudo id'\n\x04"),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("plain-text"), "{text}");
    assert!(text.contains("agentgate: refused"), "{text}");
    // What follows an escape mark and cannot be checked is not passed on either.
    assert!(
        text.contains("what follows `|` in this line cannot be checked as a shell command"),
        "{text}"
    );
    // Recorded as a terminal session: input, output, size; replayable.
    let session = s.request(&format!("sudo touch {}", marker.display()))["session"]
        .as_str()
        .unwrap()
        .to_owned();
    let io: Vec<serde_json::Value> = s
        .records()
        .into_iter()
        .filter(|r| r["session"] == session.as_str() && r["kind"] == "Io")
        .collect();
    assert!(
        io.iter().any(|r| r["io"]["stream"] == "i"),
        "input recorded"
    );
    assert!(
        io.iter().any(|r| r["io"]["stream"] == "o"),
        "output recorded"
    );
    assert!(
        io.iter().any(|r| r["io"]["stream"] == "r"),
        "terminal size recorded"
    );
    Ok(())
}

#[test]
fn files_move_with_scp_and_sftp_and_forwarding_is_refused() -> anyhow::Result<()> {
    let s = setup()?;
    let sshd = s.env.ssh()?;
    let _ = sshd;
    let local = s.dir.path().join("payload.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&local, &data)?;
    let remote = s.dir.path().join("remote");
    std::fs::create_dir_all(&remote)?;
    let scp = |args: &[String]| -> Output {
        Command::new("scp")
            .arg("-F")
            .arg(&s.config)
            .args(["-o", "BatchMode=yes", "-q"])
            .args(args)
            .output()
            .expect("scp")
    };
    // scp (SFTP, OpenSSH's default) up and down, byte for byte.
    let up = scp(&[
        local.display().to_string(),
        format!("files:{}/up.bin", remote.display()),
    ]);
    assert!(
        up.status.success(),
        "scp up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert_eq!(std::fs::read(remote.join("up.bin"))?, data);
    let back = s.dir.path().join("back.bin");
    let down = scp(&[
        format!("files:{}/up.bin", remote.display()),
        back.display().to_string(),
    ]);
    assert!(
        down.status.success(),
        "scp down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_eq!(std::fs::read(&back)?, data);
    // The legacy scp protocol (-O) too.
    let legacy = scp(&[
        "-O".into(),
        local.display().to_string(),
        format!("files:{}/legacy.bin", remote.display()),
    ]);
    assert!(
        legacy.status.success(),
        "scp -O: {}",
        String::from_utf8_lossy(&legacy.stderr)
    );
    assert_eq!(std::fs::read(remote.join("legacy.bin"))?, data);
    // Each file of a legacy upload is checked where it lands: into a directory, under a
    // startup file's name, it is a privileged write (refused here), not a plain one.
    let startup = s.dir.path().join("startup");
    std::fs::create_dir_all(&startup)?;
    std::fs::write(startup.join(".bashrc"), b"sudo reboot\n")?;
    let legacy = scp(&[
        "-O".into(),
        startup.join(".bashrc").display().to_string(),
        format!("files:{}/", remote.display()),
    ]);
    let err = String::from_utf8_lossy(&legacy.stderr);
    assert!(!legacy.status.success(), "scp -O .bashrc: {err}");
    assert!(err.contains("agentgate"), "{err}");
    assert!(
        !remote.join(".bashrc").exists(),
        "the startup file was written"
    );
    // rsync over the gateway (its server side runs as an exec, a transfer): up and back.
    let rsync = |from: String, to: String| -> Output {
        Command::new("rsync")
            .arg("-a")
            .arg("-e")
            .arg(format!("ssh -F {} -o BatchMode=yes", s.config.display()))
            .args([from, to])
            .output()
            .expect("rsync")
    };
    let r = rsync(
        local.display().to_string(),
        format!("files:{}/rsynced.bin", remote.display()),
    );
    assert!(
        r.status.success(),
        "rsync up: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(std::fs::read(remote.join("rsynced.bin"))?, data);
    let r = rsync(
        format!("files:{}/rsynced.bin", remote.display()),
        s.dir.path().join("rsync-back.bin").display().to_string(),
    );
    assert!(
        r.status.success(),
        "rsync down: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(std::fs::read(s.dir.path().join("rsync-back.bin"))?, data);
    // Where a MaskPolicy applies, downloads would carry unmasked values: refused.
    let masked = scp(&[
        format!("web:{}/up.bin", remote.display()),
        s.dir.path().join("nope.bin").display().to_string(),
    ]);
    assert!(!masked.status.success());
    assert!(
        !s.dir.path().join("nope.bin").exists()
            || std::fs::read(s.dir.path().join("nope.bin"))?.is_empty()
    );
    // sftp in batch mode: each file operation decided and recorded.
    let batch = s.dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {l} {r}/s.bin\nls {r}\nrename {r}/s.bin {r}/t.bin\nget {r}/t.bin {b}\nrm {r}/t.bin\n",
            l = local.display(),
            r = remote.display(),
            b = s.dir.path().join("sftp-back.bin").display()
        ),
    )?;
    let sftp_batch = || {
        Command::new("sftp")
            .arg("-F")
            .arg(&s.config)
            .args(["-o", "BatchMode=yes", "-b"])
            .arg(&batch)
            .arg("files")
            .output()
    };
    let out = sftp_batch()?;
    assert!(
        out.status.success(),
        "sftp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(s.dir.path().join("sftp-back.bin"))?, data);
    assert!(!remote.join("t.bin").exists());
    s.request(&format!(
        "sftp rename {r}/s.bin {r}/t.bin",
        r = remote.display()
    ));
    s.request(&format!("sftp remove {r}/t.bin", r = remote.display()));
    // Attributes: `put -p` sets them through the upload's handle (decided by the file it
    // was opened with: allowed); a new owner is a change of privileges (refused).
    std::fs::write(
        &batch,
        format!(
            "put -p {l} {r}/p.bin\nchown 0 {r}/p.bin\n",
            l = local.display(),
            r = remote.display(),
        ),
    )?;
    let out = sftp_batch()?;
    assert!(!out.status.success(), "sftp chown was not refused");
    assert_eq!(std::fs::read(remote.join("p.bin"))?, data);
    let fsetstat = s.request(&format!("sftp fsetstat {r}/p.bin", r = remote.display()));
    assert_eq!(fsetstat["decision"]["verdict"], "Allowed", "{fsetstat}");
    let chown = s.request(&format!("sftp setstat {r}/p.bin", r = remote.display()));
    assert_eq!(chown["decision"]["verdict"], "Refused", "{chown}");
    // Port forwarding is refused unless granted (web), and works where it is (files): the
    // agent's stdin/stdout reach the host's sshd, which greets it.
    let sshd_addr = format!("127.0.0.1:{}", s.env.ssh()?.port());
    let out = s.ssh(&["-W", &sshd_addr, "web"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("administratively prohibited"), "{err}");
    let out = s.ssh(&["-W", &sshd_addr, "files"], None);
    let greeting = String::from_utf8_lossy(&out.stdout);
    assert!(
        greeting.starts_with("SSH-2.0-OpenSSH"),
        "{greeting} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.request(&format!("forward {sshd_addr}"));
    Ok(())
}

#[test]
fn the_host_key_is_checked_and_only_the_pod_key_logs_in() -> anyhow::Result<()> {
    let s = setup()?;
    // The Target's knownHosts does not list the host's key: never trusted on first use.
    let out = s.ssh(&["spoofed", "true"], None);
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not in the Target's knownHosts"), "{err}");
    // A key that is not the pod's agent key is refused.
    let other = s.dir.path().join("other_key");
    let config = std::fs::read_to_string(&s.config)?;
    let port = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("Port "))
        .expect("a port")
        .to_owned();
    let known = s.config.with_file_name("ssh").join("known_hosts");
    let out = Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args([
            "-o",
            "HostKeyAlias=agentgate-sidecar",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-i")
        .arg(&other)
        .args(["-p", &port, "web@127.0.0.1", "true"])
        .output()?;
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    // An unknown Target is refused with the list of known ones.
    let out = s.ssh(&["-l", "nobody@nowhere", "web", "true"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("knows no SSH Target nowhere"), "{err}");
    Ok(())
}

#[test]
fn agent_forwarding_only_where_granted_and_evasions_refused() -> anyhow::Result<()> {
    let s = setup()?;
    // A local ssh-agent holding a key.
    let sock = s.dir.path().join("agent.sock");
    let agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
        }
    }
    let _agent = Kill(agent);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        anyhow::ensure!(Instant::now() < deadline, "ssh-agent did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let added = Command::new("ssh-add")
        .arg(s.dir.path().join("other_key"))
        .env("SSH_AUTH_SOCK", &sock)
        .output()?;
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let with_agent = |target: &str| -> String {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(&s.config)
            .args(["-o", "BatchMode=yes", "-A", target, "ssh-add -l; true"])
            .env("SSH_AUTH_SOCK", &sock)
            .output()
            .expect("ssh");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    // Granted on files: the host sees the agent's key.
    let listed = with_agent("files");
    assert!(listed.contains("ED25519"), "{listed}");
    // Not on web: the host has no agent.
    let listed = with_agent("web");
    assert!(!listed.contains("ED25519"), "{listed}");
    assert!(
        s.records().iter().any(|r| r["kind"] == "Refusal"
            && r["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("agent forwarding is refused"))),
        "the refused forwarding is recorded"
    );
    // X11 likewise (a display that does not exist: only the asking is checked here).
    for target in ["web", "files"] {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(&s.config)
            .args(["-o", "BatchMode=yes", "-X", target, "true"])
            .env("DISPLAY", "127.0.0.1:55")
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let recs = s.records();
    assert!(recs.iter().any(|r| {
        r["kind"] == "Refusal"
            && r["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("X11 forwarding is refused"))
    }));
    assert!(recs.iter().any(|r| r["kind"] == "Request"
        && r["request"]["text"] == "X11 forwarding"
        && r["decision"]["verdict"] == "Allowed"));
    // Evasions through exec: hidden in a substitution, behind env, encoded through a pipe.
    for cmd in [
        "echo $(sudo id)",
        "env sudo id",
        "echo c3VkbyBpZAo= | base64 -d | sh",
        "x=sudo; $x id",
        "cat /etc/hostname; s''udo id",
    ] {
        let err = s.refused(&["web", cmd]);
        assert!(
            err.contains("refused") || err.contains("held for approval"),
            "{cmd}: {err}"
        );
    }
    // In a shell: a line with a tab (completion would change it on the host) is not sent.
    let out = s.ssh(&["-tt", "web"], Some(b"ech\to tab-ran\necho after\nexit\n"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tab completion is not passed"), "{text}");
    assert!(!text.contains("tab-ran\r\n"), "{text}");
    assert!(text.contains("after"), "{text}");
    Ok(())
}

#[test]
fn remote_forwarding_only_where_granted() -> anyhow::Result<()> {
    let s = setup()?;
    // What the forwarded connections reach on the agent's side.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let local = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            let _ = c.write_all(b"hello-remote\n");
        }
    });
    // Refused where no scope sets ssh.portForwarding.
    let out = s.ssh(
        &[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("0:127.0.0.1:{local}"),
            "web",
            "true",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("remote port forwarding failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Granted on files: the host listens, and a connection to it reaches the agent's side.
    let mut child = Command::new("ssh")
        .arg("-F")
        .arg(&s.config)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
        ])
        .arg(format!("0:127.0.0.1:{local}"))
        .args(["files", "sleep 6"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = child.stderr.take().expect("stderr");
    let port = {
        use std::io::Read;
        let mut seen = String::new();
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let n = stderr.read(&mut buf)?;
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if let Some(p) = seen
                .split("Allocated port ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|p| p.parse::<u16>().ok())
            {
                break p;
            }
            assert!(
                n > 0 && Instant::now() < deadline,
                "no port allocated: {seen}"
            );
        }
    };
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut got = String::new();
    std::io::Read::read_to_string(&mut c, &mut got).ok();
    assert_eq!(got, "hello-remote\n");
    drop(c);
    // Each connection the forward carried is decided and recorded, with what it carried.
    let carried = wait_record(&s, "the forwarded connection", |r| {
        r["kind"] == "Request"
            && r["request"]["text"].as_str().is_some_and(|t| {
                t.starts_with("forwarded connection to ") && t.contains(&format!(":{port} from "))
            })
    });
    assert_eq!(carried["decision"]["verdict"], "Allowed", "{carried}");
    let (session, id) = (carried["session"].clone(), carried["request"]["id"].clone());
    let done = wait_record(&s, "the forwarded connection's outcome", |r| {
        r["kind"] == "Outcome" && r["session"] == session && r["outcome"]["id"] == id
    });
    assert_eq!(done["outcome"]["bytesIn"], 13, "{done}");
    let _ = child.kill();
    let _ = child.wait();
    let forwards: Vec<String> = s
        .records()
        .iter()
        .filter(|r| r["kind"] == "Request")
        .filter_map(|r| r["request"]["text"].as_str().map(str::to_owned))
        .filter(|t| t.starts_with("remote forward "))
        .collect();
    assert_eq!(forwards.len(), 2, "both asks recorded: {forwards:?}");
    // The granted ask's outcome is the host's answer: a port the host cannot listen on (its
    // sshd's own) is a failure, recorded as one.
    let busy = s.env.ssh()?.port();
    let out = s.ssh(
        &[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("127.0.0.1:{busy}:127.0.0.1:{local}"),
            "files",
            "true",
        ],
        None,
    );
    assert!(!out.status.success());
    let asked = s.request(&format!("remote forward 127.0.0.1:{busy}"));
    let (session, id) = (asked["session"].clone(), asked["request"]["id"].clone());
    let outcome = wait_record(&s, "the refused forward's outcome", |r| {
        r["kind"] == "Outcome" && r["session"] == session && r["outcome"]["id"] == id
    });
    assert!(
        outcome["outcome"]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("the host refused the forwarding")),
        "{outcome}"
    );
    Ok(())
}

/// The X11 display the agent's `ssh -Y` forwards to: a listener on 127.0.0.1:6000+N that
/// reads an X11 connection setup and answers it with a refusal whose reason the X client on
/// the host prints. It records the cookie the setup carried.
struct FakeDisplay {
    number: u16,
    cookies: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl FakeDisplay {
    const REASON: &'static str = "agentgate-fake-display-reached";

    fn start() -> anyhow::Result<Self> {
        let (listener, number) = (40..90)
            .find_map(|n| {
                std::net::TcpListener::bind(("127.0.0.1", 6000 + n))
                    .ok()
                    .map(|l| (l, n))
            })
            .ok_or_else(|| anyhow::anyhow!("no free X display number between 40 and 90"))?;
        let (tx, cookies) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            for mut c in listener.incoming().flatten() {
                // xConnClientPrefix: byte order, pad, major, minor, name len, data len, pad.
                let mut head = [0u8; 12];
                if c.read_exact(&mut head).is_err() {
                    continue;
                }
                let big = head[0] == b'B';
                let u16_at = |i: usize| {
                    let b = [head[i], head[i + 1]];
                    if big {
                        u16::from_be_bytes(b)
                    } else {
                        u16::from_le_bytes(b)
                    }
                };
                let pad = |n: usize| n.div_ceil(4) * 4;
                let (name_len, data_len) = (usize::from(u16_at(6)), usize::from(u16_at(8)));
                let mut rest = vec![0u8; pad(name_len) + pad(data_len)];
                if c.read_exact(&mut rest).is_err() {
                    continue;
                }
                let cookie = rest[pad(name_len)..pad(name_len) + data_len].to_vec();
                let _ = tx.send(cookie);
                // xConnSetupPrefix: Failed, reason length, major 11, minor 0, length in words.
                let reason = Self::REASON.as_bytes();
                let words = pad(reason.len()) / 4;
                let enc = |v: u16| {
                    if big {
                        v.to_be_bytes()
                    } else {
                        v.to_le_bytes()
                    }
                };
                let mut reply = vec![0u8, reason.len() as u8];
                reply.extend_from_slice(&enc(11));
                reply.extend_from_slice(&enc(0));
                reply.extend_from_slice(&enc(words as u16));
                reply.extend_from_slice(reason);
                reply.resize(8 + words * 4, 0);
                let _ = c.write_all(&reply);
            }
        });
        Ok(Self { number, cookies })
    }
}

#[test]
fn an_x11_channel_reaches_the_agent_display_only_where_granted() -> anyhow::Result<()> {
    let s = setup()?;
    let display = FakeDisplay::start()?;
    // The agent's X authority: the real cookie, which only its own ssh ever sees.
    let xauthority = s.dir.path().join("agent-Xauthority");
    let cookie = "0123456789abcdef0123456789abcdef";
    let st = Command::new("xauth")
        .arg("-f")
        .arg(&xauthority)
        .args(["add", &format!("127.0.0.1:{}", display.number)])
        .args(["MIT-MAGIC-COOKIE-1", cookie])
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "xauth add");
    let with_x = |target: &str| -> String {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(&s.config)
            .args(["-o", "BatchMode=yes", "-Y", target])
            .arg("echo display=$DISPLAY; xdpyinfo")
            .env("DISPLAY", format!("127.0.0.1:{}", display.number))
            .env("XAUTHORITY", &xauthority)
            .output()
            .expect("ssh");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    // Granted on files: the host's X client reaches the agent's display through the
    // gateway, and the agent's ssh put the real cookie in place of the one the host saw.
    let out = with_x("files");
    assert!(out.contains("display=localhost:"), "{out}");
    assert!(out.contains(FakeDisplay::REASON), "{out}");
    let seen = display
        .cookies
        .recv_timeout(Duration::from_secs(10))
        .expect("the display was reached");
    assert_eq!(
        seen,
        (0..16)
            .map(|i| u8::from_str_radix(&cookie[2 * i..2 * i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
    );
    let recs = s.records();
    assert!(
        recs.iter().any(|r| r["kind"] == "Request"
            && r["request"]["text"] == "X11 forwarding"
            && r["decision"]["verdict"] == "Allowed"),
        "the granted forwarding is recorded"
    );
    // Not on web: no display on the host, and nothing reaches the agent's.
    let out = with_x("web");
    assert!(!out.contains("display=localhost:"), "{out}");
    assert!(!out.contains(FakeDisplay::REASON), "{out}");
    assert!(
        display
            .cookies
            .recv_timeout(Duration::from_millis(500))
            .is_err()
    );
    Ok(())
}

#[test]
fn a_running_command_ends_when_the_identity_is_disabled() -> anyhow::Result<()> {
    let s = setup()?;
    let mut child = Command::new("ssh")
        .arg("-F")
        .arg(&s.config)
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=20"])
        .args(["web", "echo started; sleep 61; echo finished"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&s.audit)
        .is_ok_and(|t| t.contains("echo started; sleep 61; echo finished"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the command never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(child.try_wait()?.is_none(), "it runs while allowed");
    // The identity is disabled (standalone: the policy folder changes).
    let file = s.dir.path().join("policy/policy.yaml");
    let text = std::fs::read_to_string(&file)?;
    let disabled = text.replace(
        "  owner: platform-team\n",
        "  owner: platform-team\n  disabled: true\n",
    );
    assert_ne!(text, disabled);
    std::fs::write(file.with_extension("tmp"), disabled)?;
    std::fs::rename(file.with_extension("tmp"), &file)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the command went on after the identity was disabled");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout.contains("started") && !stdout.contains("finished"),
        "{stdout}"
    );
    assert!(!out.status.success());
    assert!(
        stderr.contains("agentgate: access ended while the request ran")
            && stderr.contains("AgentIdentity agent is disabled"),
        "{stderr}"
    );
    // The host is asked to stop the command (a `signal TERM` request: without a terminal,
    // closing the channel alone would leave it running). This test's sshd runs without
    // privilege separation (not as root), so it answers that it cannot deliver signals;
    // an sshd started as root delivers it.
    let logs = s.env.dir().join("logs");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !Command::new("grep")
        .args(["-rq", "session_signal_req"])
        .arg(&logs)
        .status()?
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the host was not asked to stop the command"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for pattern in ["sleep 61; echo finished", "^sleep 61$"] {
        let _ = Command::new("pkill").args(["-f", pattern]).status();
    }
    // The outcome record says why.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&s.audit).is_ok_and(|t| {
        t.lines().any(|l| {
            l.contains(r#""kind":"Outcome""#) && l.contains("access ended while the request ran")
        })
    }) {
        assert!(std::time::Instant::now() < deadline, "no outcome says why");
        std::thread::sleep(Duration::from_millis(200));
    }
    // ... and counts what passed before the end ("started\n" reached the agent).
    let ended = s
        .records()
        .into_iter()
        .find(|r| {
            r["kind"] == "Outcome"
                && r["outcome"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("access ended while the request ran"))
        })
        .expect("the outcome");
    assert!(
        ended["outcome"]["bytesOut"]
            .as_u64()
            .is_some_and(|b| b >= 8),
        "{ended}"
    );
    Ok(())
}

#[test]
fn a_held_command_waits_for_its_approver_within_hold_timeout() -> anyhow::Result<()> {
    let s = setup()?;
    let policy = s.dir.path().join("policy");
    // The web Target holds commands up to 30 s for an approver.
    let file = policy.join("policy.yaml");
    let text = std::fs::read_to_string(&file)?;
    let waiting = text.replace(
        "metadata: { name: web }\nspec:\n  protocol: SSH\n",
        "metadata: { name: web }\nspec:\n  protocol: SSH\n  holdTimeout: 30s\n",
    );
    assert_ne!(text, waiting);
    std::fs::write(file.with_extension("tmp"), waiting)?;
    std::fs::rename(file.with_extension("tmp"), &file)?;
    std::thread::sleep(Duration::from_secs(2));
    let run = |cmd: &'static str| {
        let config = s.config.clone();
        std::thread::spawn(move || {
            Command::new("ssh")
                .arg("-F")
                .arg(config)
                .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "web", cmd])
                .stdin(Stdio::null())
                .output()
                .expect("ssh")
        })
    };
    // Held: ssh waits, told so on stderr; alice approves; the command runs.
    let before = testenv::approvals::filed(&policy);
    let waiting = run("bash -c 'echo waited-then-ran'");
    let name = testenv::approvals::wait_new(&policy, &before).map_err(anyhow::Error::msg)?;
    std::thread::sleep(Duration::from_secs(1));
    testenv::approvals::decide(&policy, &name, "Approve", "alice", "ok")
        .map_err(anyhow::Error::msg)?;
    let out = waiting.join().expect("ssh thread");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "waited-then-ran");
    assert!(
        stderr.contains("held for approval")
            && stderr.contains(&format!("AccessGrant {name}"))
            && stderr.contains("waiting up to 30s for an approver"),
        "{stderr}"
    );
    // The approval is recorded, with its approver, for that request.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !testenv::approvals::approval_recorded(&s.records(), &name, "alice") {
        assert!(Instant::now() < deadline, "no Approval record");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Denied: ssh ends with the denial and its reason; nothing runs.
    let marker = s.dir.path().join("denied-ran");
    let before = testenv::approvals::filed(&policy);
    let cmd: &'static str =
        Box::leak(format!("bash -c 'touch {}'", marker.display()).into_boxed_str());
    let waiting = run(cmd);
    let name = testenv::approvals::wait_new(&policy, &before).map_err(anyhow::Error::msg)?;
    testenv::approvals::decide(&policy, &name, "Deny", "alice", "not on web")
        .map_err(anyhow::Error::msg)?;
    let out = waiting.join().expect("ssh thread");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains(&format!(
                "AccessGrant {name} was denied by alice: not on web"
            )),
        "{stderr}"
    );
    assert!(!marker.exists(), "a denied command ran");
    // The agent gives up (ssh killed) while it waits; the approval that comes later runs
    // nothing.
    let marker = s.dir.path().join("abandoned-ran");
    let before = testenv::approvals::filed(&policy);
    let gave_up = Command::new("ssh")
        .arg("-F")
        .arg(&s.config)
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "web"])
        .arg(format!("bash -c 'touch {}'", marker.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let name = testenv::approvals::wait_new(&policy, &before).map_err(anyhow::Error::msg)?;
    testenv::approvals::give_up_then_approve(&policy, gave_up, &name, "alice")
        .map_err(anyhow::Error::msg)?;
    testenv::approvals::wait_outcome(|| s.records(), &["the agent disconnected while it waited"])
        .map_err(anyhow::Error::msg)?;
    assert!(!marker.exists(), "a command ran for an agent that had gone");
    Ok(())
}

/// Waits until a record satisfies `pred` and returns it.
fn wait_record(
    s: &Setup,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(r) = s.records().into_iter().find(|r| pred(r)) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no record of {what}\nsidecar: {}",
            s.sidecar.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn terminal_bytes_written_paths_and_wrappers_are_checked_as_the_host_runs_them()
-> anyhow::Result<()> {
    let s = setup()?;
    // With a terminal, a byte beyond ASCII can be an editing key to the host's readline (in
    // the C locale, U+2008's 0x88 is Meta-Ctrl-H, backward-kill-word): the line bash would
    // run (`sudo id`) is not the one checked (`echo …`). It is refused, with what to do.
    let marker = s.dir.path().join("non-ascii-ran");
    let script = format!(
        "echo sudo touch {m}\u{2000}\u{2008}\necho after-the-refusal\nexit\n",
        m = marker.display()
    );
    let out = s.ssh(&["-tt", "web"], Some(script.as_bytes()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("agentgate: refused: the line holds a character beyond ASCII"),
        "{text}"
    );
    assert!(
        text.contains("without a terminal (ssh HOST 'COMMAND'"),
        "{text}"
    );
    assert!(text.contains("after-the-refusal"), "{text}");
    assert!(!marker.exists(), "the line reached the host");
    wait_record(&s, "the refused line", |r| {
        r["kind"] == "Request"
            && r["decision"]["rule"] == "non-ascii-with-terminal"
            && r["decision"]["verdict"] == "Refused"
    });
    // Without a terminal the shell reads the bytes as they are: they pass.
    let out = s.ok(&["web", "echo caf\u{e9}-exec"]);
    assert_eq!(out.trim(), "caf\u{e9}-exec");
    let out = s.ssh(
        &["-T", "web"],
        Some("echo caf\u{e9}-shell\nexit\n".as_bytes()),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("caf\u{e9}-shell"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every path a program writes meets the check `tee` meets: a startup or account file is
    // Privilege, refused by the default guardrails. (`false &&`: nothing would run anyway.)
    for (cmd, tee) in [
        (
            "false && dd if=/dev/null of=.ssh/authorized_keys",
            "false && tee .ssh/authorized_keys",
        ),
        ("false && sponge -a .bashrc", "false && tee -a .bashrc"),
        (
            "false && openssl enc -d -in x -out .profile",
            "false && tee .profile",
        ),
        ("false && cp rc ~/.ssh/", "false && tee ~/.ssh/rc"),
    ] {
        for line in [cmd, tee] {
            let err = s.refused(&["web", line]);
            assert!(err.contains("agentgate-block-privilege"), "{line}: {err}");
            let r = s.request(line);
            assert_eq!(r["request"]["operation"], "Privilege", "{line}: {r}");
        }
    }
    // A program that runs the command it is given: the command is checked.
    for cmd in [
        "ssh-agent bash -c 'sudo id'",
        "xvfb-run -a sudo id",
        "some-launcher --verbose sudo id",
        "strace -f sudo id",
    ] {
        let err = s.refused(&["web", cmd]);
        assert!(err.contains("agentgate-block-privilege"), "{cmd}: {err}");
    }
    let held = s.refused(&["web", "systemd-cat sh"]);
    assert!(held.contains("held for approval"), "{held}");
    Ok(())
}

#[test]
fn sftp_links_are_judged_by_where_they_lead_and_scopes_by_normalized_paths() -> anyhow::Result<()> {
    let s = setup()?;
    let remote = s.dir.path().join("remote");
    std::fs::create_dir_all(&remote)?;
    std::fs::write(remote.join("plain.txt"), b"plain")?;
    let sftp = |target: &str, batch: &str| -> Output {
        let file = s.dir.path().join("sftp-batch");
        std::fs::write(&file, batch).expect("batch");
        Command::new("sftp")
            .arg("-F")
            .arg(&s.config)
            .args(["-o", "BatchMode=yes", "-b"])
            .arg(&file)
            .arg(target)
            .output()
            .expect("sftp")
    };
    // A link to a place where account or startup files live lets a later plain upload land
    // there (`ln -s /etc e`, then `put x e/sudoers.d/agent`): Privilege, as the shell's `ln`.
    let link = remote.join("e");
    let out = sftp("files", &format!("ln -s /etc {}\n", link.display()));
    assert!(!out.status.success(), "the link to /etc was made");
    assert!(std::fs::symlink_metadata(&link).is_err(), "the link exists");
    let r = s.request(&format!("sftp symlink /etc {}", link.display()));
    assert_eq!(r["decision"]["verdict"], "Refused", "{r}");
    assert_eq!(r["request"]["operation"], "Privilege", "{r}");
    // A relative target is read from the link's directory: `../../..` from there is `/`.
    let depth = remote.components().count() - 1;
    let up = "../".repeat(depth);
    let out = sftp(
        "files",
        &format!("ln -s {up}etc/cron.d {}/c\n", remote.display()),
    );
    assert!(!out.status.success(), "the link to /etc/cron.d was made");
    // A link among ordinary files is an ordinary write.
    let out = sftp(
        "files",
        &format!(
            "ln -s {r}/plain.txt {r}/alias.txt\nrename {r}/alias.txt {r}/alias2.txt\n",
            r = remote.display()
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::symlink_metadata(remote.join("alias2.txt")).is_ok());
    // Scopes see normalized paths: `sftp get <reports>/*` allows a file there, not one that
    // `..` climbs out to; relative paths are in the home directory.
    let reports = s.dir.path().join("reports");
    std::fs::write(reports.join("q1.txt"), b"q1")?;
    std::fs::write(s.dir.path().join("secret.txt"), b"secret")?;
    let local = s.dir.path().join("got");
    std::fs::create_dir_all(&local)?;
    let out = sftp(
        "reports",
        &format!(
            "get {}/./q1.txt {}/q1.txt\n",
            reports.display(),
            local.display()
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(local.join("q1.txt"))?, b"q1");
    let out = sftp(
        "reports",
        &format!(
            "get {}/../secret.txt {}/secret.txt\n",
            reports.display(),
            local.display()
        ),
    );
    assert!(
        !out.status.success(),
        "a path climbing out of the scope was read"
    );
    assert!(!local.join("secret.txt").exists());
    // Recorded as the path was sent, `..` and all: not allowed.
    let climbing = wait_record(&s, "the climbing read", |r| {
        r["kind"] == "Request"
            && r["request"]["text"]
                == format!("sftp get {}/../secret.txt", reports.display()).as_str()
    });
    assert_ne!(climbing["decision"]["verdict"], "Allowed", "{climbing}");
    // In a shell: a `*` of the scope stays within one argument, and never covers `..`.
    let out = s.ok(&["reports", &format!("cat {}/q1.txt", reports.display())]);
    assert_eq!(out, "q1");
    for cmd in [
        format!("cat {r}/../secret.txt", r = reports.display()),
        format!(
            "cat {r}/q1.txt {}",
            s.dir.path().join("secret.txt").display(),
            r = reports.display()
        ),
    ] {
        let err = s.refused(&["reports", &cmd]);
        assert!(err.contains("held for approval"), "{cmd}: {err}");
    }
    Ok(())
}

#[test]
fn requests_are_bounded_per_connection_and_every_refusal_recorded() -> anyhow::Result<()> {
    let s = setup()?;
    // Environment requests: at most 64 per channel, none over 4 KiB; the command runs, the
    // excess is refused and recorded.
    let many: Vec<String> = (0..70).map(|i| format!("LC_AGENTGATE_{i}=x")).collect();
    let out = s.ssh(
        &[
            "-o",
            &format!("SetEnv={}", many.join(" ")),
            "web",
            "echo env-ok",
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("env-ok"));
    wait_record(&s, "the refused environment", |r| {
        r["kind"] == "Refusal"
            && r["note"]
                .as_str()
                .is_some_and(|n| n.contains("environment variables past the first 64"))
    });
    let out = s.ssh(
        &[
            "-o",
            &format!("SetEnv=LC_BIG={}", "x".repeat(4200)),
            "web",
            "echo big-env-ok",
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("big-env-ok"));
    wait_record(&s, "the refused long variable", |r| {
        r["kind"] == "Refusal"
            && r["note"]
                .as_str()
                .is_some_and(|n| n.contains("an environment variable of 4206 bytes"))
    });
    // Channels: at most 32 open at once on one connection (each holds a connection to the
    // host); the next is refused with the reason.
    let control = s.dir.path().join("cm");
    let mut master = Command::new("ssh")
        .arg("-F")
        .arg(&s.config)
        .args(["-o", "BatchMode=yes", "-o", "ControlMaster=yes", "-o"])
        .arg(format!("ControlPath={}", control.display()))
        .args(["-N", "web"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !control.exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the control master did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let muxed = |cmd: String| {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(&s.config)
            .args(["-o", "BatchMode=yes", "-o", "ControlMaster=no", "-o"])
            .arg(format!("ControlPath={}", control.display()))
            .args(["web", &cmd])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let mut sleepers = Vec::new();
    for i in 0..32 {
        sleepers.push(muxed(format!("sleep 30; echo sleeper-{i}")).spawn()?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let running = s
            .records()
            .iter()
            .filter(|r| {
                r["kind"] == "Request"
                    && r["request"]["text"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("sleep 30; echo sleeper-"))
            })
            .count();
        if running == 32 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {running} of 32 channels started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = muxed("echo one-too-many".into()).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{err}");
    assert!(
        err.contains("already has 32 sessions and forwardings open"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("one-too-many"));
    for mut c in sleepers {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = master.kill();
    let _ = master.wait();
    // Unix socket forwarding is refused, and recorded: to a socket on the host (-L), and
    // from one (-R).
    let listen = free_port()?;
    let mut fwd = Command::new("ssh")
        .arg("-F")
        .arg(&s.config)
        .args(["-o", "BatchMode=yes", "-N", "-L"])
        .arg(format!("127.0.0.1:{listen}:/run/agentgate-test.sock"))
        .arg("files")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", listen)) {
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = [0u8; 16];
            let _ = std::io::Read::read(&mut c, &mut buf);
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "ssh -L did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_record(&s, "the refused socket forwarding", |r| {
        r["kind"] == "Refusal"
            && r["note"].as_str().is_some_and(|n| {
                n.starts_with("forwarding to the Unix socket /run/agentgate-test.sock")
            })
    });
    let _ = fwd.kill();
    let _ = fwd.wait();
    let out = s.ssh(
        &[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "/tmp/agentgate-test-remote.sock:127.0.0.1:22",
            "files",
            "true",
        ],
        None,
    );
    assert!(!out.status.success());
    wait_record(&s, "the refused remote socket forwarding", |r| {
        r["kind"] == "Refusal"
            && r["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("a remote forwarding of the Unix socket"))
    });
    // A transfer's messages on stderr are recorded (masked) as they pass.
    let out = s.ssh(
        &["files", "rsync --server --agentgate-bogus . /tmp/x"],
        None,
    );
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(said.contains("agentgate-bogus"), "{said}");
    let session = s.request("rsync --server --agentgate-bogus . /tmp/x")["session"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_record(&s, "the transfer's stderr", |r| {
        r["session"] == session.as_str()
            && r["kind"] == "Io"
            && r["io"]["data"]
                .as_str()
                .is_some_and(|d| d.contains("agentgate-bogus"))
    });
    Ok(())
}

#[test]
fn a_channel_whose_access_ends_is_recorded_though_the_agent_stops_reading() -> anyhow::Result<()> {
    let s = setup()?;
    // The agent's ssh does not read its output: the pipe fills, then its window, and the
    // gateway cannot write to it any more.
    let mut child = Command::new("ssh")
        .arg("-F")
        .arg(&s.config)
        .args([
            "-o",
            "BatchMode=yes",
            "web",
            "yes agentgate-fill-the-window",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    s.request("yes agentgate-fill-the-window");
    std::thread::sleep(Duration::from_secs(3));
    // The identity is disabled: the channel ends, its outcome is recorded and the host
    // left, whether or not the agent reads why.
    let file = s.dir.path().join("policy/policy.yaml");
    let text = std::fs::read_to_string(&file)?;
    let disabled = text.replace(
        "  owner: platform-team\n",
        "  owner: platform-team\n  disabled: true\n",
    );
    std::fs::write(file.with_extension("tmp"), disabled)?;
    std::fs::rename(file.with_extension("tmp"), &file)?;
    let r = wait_record(&s, "the ended channel's outcome", |r| {
        r["kind"] == "Outcome"
            && r["outcome"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("access ended while the request ran"))
    });
    assert!(
        r["outcome"]["bytesOut"].as_u64().is_some_and(|b| b > 0),
        "{r}"
    );
    // The host's side is closed (`yes` ends on its broken pipe); once the agent reads
    // again, its ssh sees the channel end.
    if let Some(mut out) = child.stdout.take() {
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent's channel was never closed");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
