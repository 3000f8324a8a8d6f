//! Child processes that never outlive the test process.
//!
//! Every child is started through `setpriv --pdeathsig KILL` from one long-lived thread, so the
//! kernel kills it when that thread (and so the test process) goes away, even on SIGKILL or a
//! panic that aborts. Dropping a [`Proc`] stops it first politely, then with SIGKILL.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::Error;

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// The thread that forks every child: it lives as long as the process, which is what
/// `PR_SET_PDEATHSIG` needs (the signal fires when the forking *thread* exits).
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testenv-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .unwrap_or_else(|e| panic!("cannot start the testenv spawner thread: {e}"));
        Mutex::new(tx)
    })
}

/// How a process should be run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// A short name, used for the log file and in errors.
    pub name: String,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Run as this (user, group) instead of the current user (needs root).
    pub run_as: Option<(String, String)>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// The signal that asks it to stop cleanly.
    pub stop_signal: &'static str,
}

impl Spec {
    /// A spec for `program` named `name`, stopped with SIGTERM.
    pub fn new(name: &str, program: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_owned(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            run_as: None,
            cwd: None,
            stop_signal: "TERM",
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A running child process whose output goes to a log file.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    stop_signal: &'static str,
}

impl Proc {
    /// Starts the process described by `spec`, logging to `log_dir/<name>.log`.
    pub fn start(spec: Spec, log_dir: &Path) -> Result<Self, Error> {
        let log = log_dir.join(format!("{}.log", spec.name));
        let out =
            File::create(&log).map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io(format!("clone {}", log.display()), e))?;
        let mut cmd = Command::new("setpriv");
        cmd.arg("--pdeathsig").arg("KILL");
        if let Some((user, group)) = &spec.run_as {
            cmd.args(["--reuid", user, "--regid", group, "--init-groups"]);
        }
        cmd.arg("--").arg(&spec.program).args(&spec.args);
        cmd.envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let (tx, rx) = mpsc::channel();
        spawner()
            .lock()
            .map_err(|_| Error::Start {
                what: spec.name.clone(),
                why: "the spawner lock is poisoned".into(),
                log: String::new(),
            })?
            .send((cmd, tx))
            .map_err(|_| Error::Start {
                what: spec.name.clone(),
                why: "the spawner thread is gone".into(),
                log: String::new(),
            })?;
        let child = rx
            .recv()
            .map_err(|_| Error::Start {
                what: spec.name.clone(),
                why: "the spawner thread did not answer".into(),
                log: String::new(),
            })?
            .map_err(|e| Error::io(format!("spawn {}", spec.program.display()), e))?;
        Ok(Self {
            name: spec.name,
            child: Some(child),
            log,
            stop_signal: spec.stop_signal,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The path of its log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether its log contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.log)
            .map(|t| t.contains(needle))
            .unwrap_or(false)
    }

    /// An error if the process has exited (with its log), for start-up loops.
    pub fn check_running(&mut self) -> Result<(), Error> {
        let Some(child) = self.child.as_mut() else {
            return Err(self.start_error("it was stopped"));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.start_error(&format!("it exited with {status}"))),
            Err(e) => Err(self.start_error(&format!("cannot wait for it: {e}"))),
        }
    }

    /// A start-up error that carries the end of the log and its last error lines.
    pub fn start_error(&self, why: &str) -> Error {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| {
                let b = l.as_bytes();
                (b.first() == Some(&b'E') || b.first() == Some(&b'F'))
                    && b.get(1).is_some_and(u8::is_ascii_digit)
                    || l.contains("FATAL")
                    || l.contains("ERROR")
                    || l.starts_with("Error:")
                    || l.contains("panicked at")
                    || l.contains("\"level\":\"fatal\"")
            })
            .collect();
        let errors = errors[errors.len().saturating_sub(5)..].join("\n");
        Error::Start {
            what: self.name.clone(),
            why: why.to_owned(),
            log: format!(
                "{}:\n{}\n--- last error lines:\n{errors}",
                self.log.display(),
                self.log_tail(20)
            ),
        }
    }

    /// Stops the process: its stop signal, up to `grace`, then SIGKILL. Idempotent.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let _ = Command::new("kill")
                .arg(format!("-{}", self.stop_signal))
                .arg(child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Runs a command to completion, failing with its output when it does not succeed.
pub fn run(cmd: &mut Command, what: &str) -> Result<String, Error> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("run {what}"), e))?;
    if !out.status.success() {
        return Err(Error::Command {
            what: what.to_owned(),
            status: out.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it next).
pub fn free_port() -> Result<u16, Error> {
    let l =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind a free port", e))?;
    let port = l
        .local_addr()
        .map_err(|e| Error::io("read a free port", e))?
        .port();
    Ok(port)
}

/// Polls `probe` every 50 ms until it returns `Ok(true)`, the process dies, or `timeout`.
pub fn wait_until(
    proc: &mut Proc,
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> bool,
) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        proc.check_running()?;
        if probe() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(proc.start_error(&format!("{what} did not happen within {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until something accepts connections on `127.0.0.1:port` (or the process dies).
pub fn wait_listening(proc: &mut Proc, port: u16, timeout: Duration) -> Result<(), Error> {
    wait_until(proc, timeout, &format!("listening on port {port}"), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
}
