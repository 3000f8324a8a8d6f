//! One SSH session channel: its requests (pty, env, exec, shell, sftp) read, the command
//! decided, then the two directions relayed: the agent's input line by line through the
//! guardrails (shells), or packet by packet (sftp); the host's output masked and recorded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use agentgate_crds::audit::{self as records, IoChunk, Outcome, RecordKind};
use agentgate_crds::{OperationClass, Protocol};
use bytes::Bytes;
use russh::{ChannelMsg, ChannelWriteHalf, Sig, client, server};
use sha2::Digest;
use tokio::sync::mpsc;

use super::scp;
use super::sftp;
use super::terminal::{Input, LineDiscipline, OutputMasker};
use super::upstream::{self, Connection};
use super::{Agent, SshGateway, command, parse_user, refusal_record};
use crate::audit::{SessionRecorder, agent_text};
use crate::mask::MaskSet;
use crate::policy::approval::Request as ApprovalRequest;
use crate::policy::{self, Decision, Snapshot, SshAccess, SshForwarding, Verdict};
use crate::sql::Fingerprint;

/// Exit status of a command agentgate did not run (as a shell's "cannot execute").
pub const REFUSED_EXIT: u32 = 126;
/// How long a partial line of output waits for its end before it is masked and sent.
const FLUSH_AFTER: Duration = Duration::from_millis(25);
/// Environment variables passed to the host (locale only: `BASH_ENV`, `LD_PRELOAD` and the
/// like would run code no guardrail saw).
fn passed_env(name: &str) -> bool {
    name == "LANG" || name == "TZ" || name == "COLORTERM" || name.starts_with("LC_")
}

/// The most environment requests one channel may make (each is kept until the command
/// starts).
pub const MAX_ENV: usize = 64;
/// The longest environment variable, name and value together, a channel may send.
pub const MAX_ENV_BYTES: usize = 4096;

/// Why an environment request is refused, if it is: `seen` is how many the channel made
/// before it. The connection's handler answers it with this rule, and the channel's task
/// keeps what it allows by the same rule.
pub fn env_refused(seen: usize, name: &str, value: &str) -> Option<String> {
    if seen >= MAX_ENV {
        Some(format!(
            "agentgate refuses environment variables past the first {MAX_ENV} of a channel; send fewer (only LANG, LC_*, TZ and COLORTERM reach the host)"
        ))
    } else if name.len() + value.len() > MAX_ENV_BYTES {
        Some(format!(
            "agentgate refuses an environment variable of {} bytes (at most {MAX_ENV_BYTES}, name and value together); send a shorter one",
            name.len() + value.len()
        ))
    } else {
        None
    }
}

/// The most session channels and forwardings one agent connection may have open at once:
/// each holds a connection of its own to the host.
pub const MAX_OPEN: usize = 32;

/// What the agent is told when its connection has [`MAX_OPEN`] channels and forwardings
/// open already.
pub fn too_many_open() -> String {
    format!(
        "agentgate: refused: this SSH connection already has {MAX_OPEN} sessions and forwardings open, the most agentgate allows on one connection (each holds its own connection to the host): close some (idle ControlMaster sessions, forwards), or open another SSH connection"
    )
}

/// One of a connection's [`MAX_OPEN`] places, given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes a place of `open` (the connection's count), if one is free.
    pub fn take(open: &Arc<AtomicUsize>) -> Option<Self> {
        open.fetch_update(Relaxed, Relaxed, |n| (n < MAX_OPEN).then_some(n + 1))
            .ok()
            .map(|_| Self(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Whether a locale value keeps the host's shell reading bytes as the gateway does: UTF-8,
/// or the C/POSIX locale. In a multi-byte locale such as GBK, a `\` byte can be the second
/// half of a character, so the shell would read quotes where the check reads escapes.
fn safe_locale(name: &str, value: &str) -> bool {
    if name == "TZ" || name == "COLORTERM" {
        return true;
    }
    let v = value.to_ascii_lowercase();
    v.is_empty()
        || matches!(v.as_str(), "c" | "posix")
        || v.ends_with(".utf-8")
        || v.ends_with(".utf8")
        || v.contains(".utf-8@")
        || v.contains(".utf8@")
}

/// What the agent's side of a channel is, once it asked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// An interactive shell (or a bare shell reading commands from stdin): lines checked.
    Shell,
    /// One command; its stdin and output are data.
    Exec(String),
    /// A file transfer by command (`scp -t/-f`, `rsync --server`): bytes pass unmasked and
    /// are not recorded as terminal output.
    Transfer {
        /// The command.
        command: String,
        /// Whether files flow from the host to the agent.
        download: bool,
    },
    /// The sftp subsystem: each file operation checked and recorded.
    Sftp,
}

/// Everything a channel needs to decide and record.
pub struct Ctx {
    gw: Arc<SshGateway>,
    agent: Agent,
    snapshot: Arc<Snapshot>,
    target: String,
    login: String,
    default_login: String,
    spec: agentgate_crds::target::SshTarget,
    masks: Arc<MaskSet>,
    rec: Arc<SessionRecorder>,
    /// The paths of this channel's open SFTP handles.
    sftp_handles: std::sync::Mutex<sftp::Handles>,
    /// The host's answers to a legacy scp upload.
    scp_answers: scp::Answers,
    /// Where this channel's shell may be (`cd` on an earlier line): relative paths written
    /// are checked there.
    cwds: std::sync::Mutex<command::Cwds>,
    /// What a grant allowed on this channel (shell lines, sftp operations, scp uploads): the
    /// channel ends when any of it is no longer allowed (a program it started may still run).
    granted: std::sync::Mutex<Vec<policy::Command>>,
}

/// The fingerprint of an SSH command (what a grant bound to it carries).
fn fingerprint(kind: &str, target: &str, login: &str, text: &str) -> Fingerprint {
    let mut h = sha2::Sha256::new();
    for part in ["ssh", kind, target, login, text.trim()] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    Fingerprint::known(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl Ctx {
    /// Resolves the Target, the login, the MaskPolicies and the session for `agent`.
    fn resolve(gw: &Arc<SshGateway>, agent: &Agent) -> Result<Self, String> {
        let snapshot = gw.core.policy.get().ok_or_else(|| {
            let why = gw
                .core
                .policy
                .error()
                .unwrap_or_else(|| "no policy loaded yet".into());
            format!("agentgate refuses every command until its policy is loaded: {why}; retry in a moment")
        })?;
        let (login, target) = parse_user(&agent.user, &snapshot)?;
        let spec = snapshot
            .targets
            .get(&target)
            .filter(|t| t.spec.protocol == Protocol::Ssh)
            .and_then(|t| t.spec.ssh.clone())
            .ok_or_else(|| {
                format!(
                    "agentgate knows no SSH Target {target}; use a Host of the ssh_config it wrote"
                )
            })?;
        let default_login = spec.user.clone();
        let login = login.unwrap_or_else(|| default_login.clone());
        let masks = gw
            .mask_set(&snapshot, &agent.identity, &target)
            .map_err(|why| format!("agentgate refuses commands while {why}"))?;
        let rec = Arc::new(gw.core.audit.session(
            &agent.identity,
            &target,
            Protocol::Ssh,
            Some(agent.client.clone()),
        )?);
        Ok(Self {
            gw: gw.clone(),
            agent: agent.clone(),
            snapshot,
            target,
            login,
            default_login,
            spec,
            masks,
            rec,
            cwds: std::sync::Mutex::new(command::home()),
            granted: std::sync::Mutex::new(Vec::new()),
            sftp_handles: std::sync::Mutex::default(),
            scp_answers: scp::Answers::default(),
        })
    }

    fn access(&self, commands: Vec<String>, forwarding: Option<SshForwarding>) -> SshAccess {
        SshAccess {
            login: self.login.clone(),
            default_login: self.default_login.clone(),
            commands,
            forwarding,
        }
    }

    /// Decides a command with the policy in force now (a grant revoked mid-session stops
    /// the next command).
    /// Remembers a request a grant allowed on this channel, to end the channel with it.
    fn remember_granted(&self, cmd: &policy::Command, decision: &Decision) {
        if decision.verdict == Verdict::Allow
            && decision.grant.is_some()
            && let Ok(mut g) = self.granted.lock()
            && g.len() < 1024
        {
            g.push(cmd.clone());
        }
    }

    /// Whether this channel may go on: its own request, what a grant allowed on it, and the
    /// forwarding it asked for, decided again.
    fn still_allowed(
        &self,
        cmd: &policy::Command,
        forwarding: &[SshForwarding],
        snapshot: Option<&Snapshot>,
    ) -> Decision {
        let d = self.decide(cmd);
        if d.verdict != Verdict::Allow {
            return d;
        }
        let granted: Vec<policy::Command> =
            self.granted.lock().map(|g| g.clone()).unwrap_or_default();
        for c in &granted {
            let d = self.decide(c);
            if d.verdict != Verdict::Allow {
                return d;
            }
        }
        for kind in forwarding {
            let access = SshAccess {
                login: self.login.clone(),
                default_login: self.default_login.clone(),
                commands: Vec::new(),
                forwarding: Some(*kind),
            };
            if !snapshot
                .is_some_and(|s| forwarding_granted(s, &self.agent.identity, &self.target, &access))
            {
                return Decision {
                    verdict: Verdict::Refuse,
                    rule: "ssh-forwarding".into(),
                    grant: None,
                    message: format!("{kind:?} forwarding is no longer granted"),
                };
            }
        }
        d
    }

    /// Asks the API server about the session's service-account token again first when its
    /// last answer is old (a session idle for a while): what follows is decided on it.
    async fn fresh_token(&self) {
        if let (Some(v), Some(verifier)) = (&self.agent.token, self.gw.core.verifier.as_ref()) {
            let _ = verifier.still_valid_now(v).await;
        }
    }

    fn decide(&self, cmd: &policy::Command) -> Decision {
        let snapshot = self.gw.core.policy.get();
        let mut d = policy::decide(
            snapshot.as_deref(),
            &self.agent.identity,
            &self.target,
            cmd,
            crate::clock::now(),
        );
        // A session begun with a token: the token must still stand (unexpired, and the API
        // server's word for a service-account token) and still map to the identity.
        if let (Some(v), Some(verifier)) = (&self.agent.token, self.gw.core.verifier.as_ref())
            && let Err(why) = verifier.still_valid(v)
        {
            return Decision {
                verdict: Verdict::Refuse,
                rule: "token-ended".into(),
                grant: None,
                message: format!("agentgate: {why}"),
            };
        }
        if let (Some(v), Some(verifier), Some(s)) = (
            &self.agent.token,
            self.gw.core.verifier.as_ref(),
            snapshot.as_deref(),
        ) && let Err(why) = verifier.still_maps(v, s)
        {
            return Decision {
                verdict: Verdict::Refuse,
                rule: "identity-changed".into(),
                grant: None,
                message: format!(
                    "agentgate: this session's token no longer maps to AgentIdentity {} ({why}); connect again",
                    self.agent.identity
                ),
            };
        }
        // The pod must be the identity it serves, before anything runs or is filed for it.
        if d.verdict != Verdict::Refuse
            && let Some(pod_user) = &self.gw.core.pod_user
            && let Some(s) = &snapshot
            && let Err(why) = crate::identity::pod::check(pod_user, s, &self.agent.identity)
        {
            d = Decision {
                verdict: Verdict::Refuse,
                rule: "pod-identity".into(),
                grant: None,
                message: why,
            };
        }
        d
    }

    /// Records a request and its decision; returns the request's number, or why it could not
    /// be recorded (then nothing runs).
    fn record(
        &self,
        via: &str,
        text: &str,
        cmd: &policy::Command,
        decision: &Decision,
    ) -> Result<u64, String> {
        let id = self.rec.next_request();
        let mut r = self.rec.base(RecordKind::Request);
        r.request = Some(records::Request {
            id,
            text: self.masked_text(text),
            operation: Some(cmd.class),
            fingerprint: (decision.verdict == Verdict::Hold)
                .then(|| cmd.fingerprint.get().to_owned()),
            via: Some(via.to_owned()),
        });
        let mut d = crate::gateway::postgres::audit::decision(decision);
        // A reason may quote the command (a word the parser stopped at): masked as it is.
        d.reason = d.reason.map(|why| self.masked_text(&why));
        r.decision = Some(d);
        self.gw.core.audit.admit().and_then(|()| self.rec.emit(r))?;
        Ok(id)
    }

    /// A command as records and approvers see it: masked, control characters replaced,
    /// whole (the parser refuses commands longer than [`super::command::MAX_LEN`]).
    fn masked_text(&self, text: &str) -> String {
        let text = agent_text(text, super::command::MAX_LEN);
        self.masked(text)
    }

    fn masked(&self, text: String) -> String {
        match self.masks.mask(None, &text).0 {
            crate::mask::Masked::Clear => text,
            crate::mask::Masked::Text(t) => t,
            crate::mask::Masked::Null => String::new(),
        }
    }

    fn outcome(&self, id: u64, started: Instant, bytes: (u64, u64), error: Option<String>) {
        let mut r = self.rec.base(RecordKind::Outcome);
        r.outcome = Some(Outcome {
            id,
            rows: 0,
            bytes_in: bytes.0,
            bytes_out: bytes.1,
            masked: BTreeMap::new(),
            latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            error,
            status: None,
        });
        if let Err(e) = self.rec.emit(r) {
            tracing::error!(session = self.rec.id(), error = %e, "an SSH outcome could not be recorded");
        }
    }

    /// Records terminal input or output as it passed: masked, control characters kept (a
    /// replay needs the terminal's own sequences; records are JSON, and `show` escapes
    /// them), in records of at most [`crate::audit::IO_RECORD_MAX`] bytes, so nothing is cut.
    fn io(&self, stream: &str, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let text = self.masked(String::from_utf8_lossy(data).into_owned());
        for piece in crate::audit::pieces(&text, crate::audit::IO_RECORD_MAX) {
            let mut r = self.rec.base(RecordKind::Io);
            r.io = Some(IoChunk {
                stream: stream.to_owned(),
                data: piece.to_owned(),
            });
            if let Err(e) = self.rec.emit(r) {
                tracing::error!(session = self.rec.id(), error = %e, "terminal I/O could not be recorded");
            }
        }
    }

    /// A request of this channel as the policy sees it; `kind` and `text` make its
    /// fingerprint (what a grant bound to it carries).
    fn ssh_command(
        &self,
        class: OperationClass,
        kind: &str,
        text: &str,
        keys: std::collections::BTreeSet<String>,
        ssh: Option<SshAccess>,
    ) -> policy::Command {
        policy::Command {
            class,
            fingerprint: fingerprint(kind, &self.target, &self.login, text),
            keys,
            tables: Default::default(),
            unresolved: None,
            parts: Vec::new(),
            kube: None,
            ssh,
        }
    }

    /// Classifies a command line. Unparsable lines are refused (never sent).
    fn command(&self, kind: &str, text: &str) -> Result<policy::Command, String> {
        let cwds = self
            .cwds
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|_| vec![None]);
        let parsed = command::classify_in(text, &cwds).map_err(|e| {
            format!("agentgate cannot read this command as a shell would ({e}), so it is not run")
        })?;
        // Whether or not this line runs, the places only grow: checking later lines under one
        // more place is only stricter.
        if let Ok(mut c) = self.cwds.lock() {
            c.clone_from(&parsed.cwds);
        }
        let mut keys = parsed.keys.clone();
        if kind == "shell" {
            keys.insert("shell".into());
        }
        // Each simple command meets the guardrails on its own too (a guardrail that allows
        // one never lets another of the line pass), besides the line as a whole (what only
        // the whole shows: `curl | sh`, a fork bomb). A command that does not read back as a
        // line of its own leaves the line as one.
        let parts = command::parts(&parsed, &keys, &cwds);
        let access = self.access(parsed.commands, None);
        let mut cmd = self.ssh_command(parsed.class, kind, text, keys, Some(access));
        cmd.parts = parts;
        Ok(cmd)
    }

    /// The message for a refused or held command (holds file an AccessGrant request).
    async fn refusal(&self, cmd: &policy::Command, text: &str, decision: &Decision) -> String {
        self.refusal_filed(cmd, text, decision).await.0
    }

    /// For a command that is not allowed: a hold files its AccessGrant request and, when the
    /// Target's `holdTimeout` allows, waits for an approver (telling the agent on `to_agent`).
    /// `Ok` with the approval (recorded) to run it; `Err` with what to tell the agent.
    async fn settle(
        &self,
        id: u64,
        cmd: &policy::Command,
        text: &str,
        decision: &Decision,
        (to_agent, from_agent): (&ChannelWriteHalf<server::Msg>, &mut russh::ChannelReadHalf),
    ) -> Result<(Decision, Vec<ChannelMsg>), String> {
        let (msg, filed) = self.refusal_filed(cmd, text, decision).await;
        let wait = crate::policy::approval::hold_timeout(Some(&self.snapshot), &self.target);
        let Some(name) = filed.filter(|_| !wait.is_zero()) else {
            return Err(msg);
        };
        let waiting = agentgate_crds::common::format_duration(wait);
        tell_stderr(
            to_agent,
            format!("{msg}\r\nagentgate: waiting up to {waiting} for an approver…\r\n"),
        )
        .await;
        let decided = crate::policy::approval::await_decision(
            &self.gw.core.policy,
            &self.agent.identity,
            &name,
            wait,
            || self.decide(cmd),
        );
        tokio::pin!(decided);
        // The agent's channel is watched while it waits: closed, nothing may run for it. What
        // it sends meanwhile (input, an EOF) is kept, up to a bound, and passed on if it runs.
        let (mut early, mut kept, mut watching) = (Vec::new(), 0usize, true);
        let after = loop {
            tokio::select! {
                d = &mut decided => break d,
                m = from_agent.wait(), if watching => match m {
                    None | Some(ChannelMsg::Close) => {
                        return Err(format!(
                            "the agent disconnected while it waited; AccessGrant {name} stays as it is"
                        ));
                    }
                    Some(msg) => {
                        if let ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } = &msg {
                            kept += data.len();
                        }
                        early.push(msg);
                        watching = early.len() < 1024 && kept < 1 << 20;
                    }
                },
            }
        };
        if after.verdict == Verdict::Hold {
            return Err(format!(
                "agentgate: no approver decided within the Target's holdTimeout ({waiting}), so it was not run: AccessGrant {name} stays pending; run it again once it is approved"
            ));
        }
        // An Approval record for what an approver decided (approved, or denied); any other
        // end of the wait (the identity disabled, say) is the outcome's error alone.
        if after.verdict == Verdict::Allow || after.rule == "denied" {
            let by = crate::gateway::postgres::audit::approver(
                self.gw.core.policy.get().as_deref(),
                &name,
            );
            crate::gateway::postgres::audit::approval(&self.rec, id, &after, Some(&name), by)
                .map_err(|why| format!("agentgate: {why}"))?;
        }
        if after.verdict != Verdict::Allow {
            return Err(format!("agentgate: refused: {}", after.message));
        }
        // Nothing runs for an agent that has gone while it waited (a delete approved an hour
        // later would run with nobody there).
        if !tell_stderr(
            to_agent,
            format!("agentgate: AccessGrant {name} approved: running it\r\n"),
        )
        .await
        {
            return Err(format!(
                "the agent disconnected while it waited; AccessGrant {name} was approved and is unused"
            ));
        }
        tracing::info!(identity = %self.agent.identity, target = %self.target, grant = %name, "held command approved: running it");
        self.remember_granted(cmd, &after);
        Ok((after, early))
    }

    /// [`Ctx::refusal`], and the AccessGrant request filed for a hold.
    async fn refusal_filed(
        &self,
        cmd: &policy::Command,
        text: &str,
        decision: &Decision,
    ) -> (String, Option<String>) {
        let msg = match decision.verdict {
            Verdict::Hold => {
                let masked = self.masked_text(text);
                let req = ApprovalRequest {
                    identity: &self.agent.identity,
                    target: &self.target,
                    class: cmd.class,
                    fingerprint: cmd.fingerprint.get(),
                    text: &masked,
                    rule: &decision.rule,
                    message: &decision.message,
                };
                match self
                    .gw
                    .core
                    .approvals
                    .file(Some(&self.snapshot), &req)
                    .await
                {
                    Ok(f) => {
                        let msg = format!(
                            "agentgate: held for approval ({}): AccessGrant {}; {}{}",
                            decision.message,
                            f.name,
                            f.how_to_approve,
                            policy::hint::scoped(
                                &self.agent.identity,
                                &self.target,
                                cmd,
                                decision,
                                |c| self.masked_text(c)
                            )
                        );
                        return (msg, Some(f.name));
                    }
                    Err(e) => format!(
                        "agentgate: {} and the request for approval could not be filed ({e}); run the command again once it can be (requests bound to one command, fingerprint {}, are filed by the gateway)",
                        decision.message,
                        cmd.fingerprint.get()
                    ),
                }
            }
            _ => {
                let how = if decision.rule == "not-in-scope" {
                    format!(
                        "; to ask for it: {}",
                        crate::policy::hint::request_hint(
                            &self.agent.identity,
                            &self.target,
                            cmd,
                            |c| self.masked_text(c)
                        )
                    )
                } else {
                    String::new()
                };
                format!("agentgate: refused: {}{how}", decision.message)
            }
        };
        (msg, None)
    }
}

/// The longest command an approver is shown whole (records keep 4096 characters).
const MAX_APPROVABLE: usize = 4000;

/// A hold of a command too long to be shown whole to an approver becomes a refusal: a grant
/// bound to its fingerprint would approve what nobody read.
fn approvable(d: Decision, text: &str) -> Decision {
    if d.verdict == Verdict::Hold && text.chars().count() > MAX_APPROVABLE {
        Decision {
            verdict: Verdict::Refuse,
            rule: d.rule,
            grant: None,
            message: format!(
                "{}; and the command is longer than {MAX_APPROVABLE} characters, more than an approver is shown, so it cannot be approved: split it, or put it in a script reviewed another way",
                d.message
            ),
        }
    } else {
        d
    }
}

/// How long a message to the agent may wait for it to read (its window full): a channel
/// that ends, or a refusal, goes on without it then.
const TELL_WITHIN: Duration = Duration::from_secs(5);

/// Writes `message` on the agent's stderr, waiting at most [`TELL_WITHIN`] for its window;
/// `false` when the channel is gone (an agent that only does not read in time is still
/// there: the message is dropped, and logged).
async fn tell_stderr(out: &ChannelWriteHalf<server::Msg>, message: String) -> bool {
    match tokio::time::timeout(
        TELL_WITHIN,
        out.extended_data_bytes(1, Bytes::from(message)),
    )
    .await
    {
        Ok(sent) => sent.is_ok(),
        Err(_) => {
            tracing::info!(
                "the agent did not read a message from agentgate within {} s; its channel goes on without it",
                TELL_WITHIN.as_secs()
            );
            true
        }
    }
}

/// Ends a channel the agent opened with a message on stderr and an exit status. Bounded: an
/// agent that does not read its channel gets it closed without the message (callers record
/// the outcome and leave the host first).
async fn fail(out: &ChannelWriteHalf<server::Msg>, message: &str, status: u32) {
    tell_stderr(out, format!("{message}\r\n")).await;
    let _ = tokio::time::timeout(TELL_WITHIN, async {
        let _ = out.exit_status(status).await;
        let _ = out.eof().await;
        let _ = out.close().await;
    })
    .await;
}

/// Whether `command` is a bare shell reading its commands from stdin (`bash`, `sh -s`).
fn bare_shell(command: &str) -> bool {
    let mut words = command.split_whitespace();
    let Some(first) = words.next() else {
        return false;
    };
    let name = first.rsplit('/').next().unwrap_or(first);
    matches!(name, "sh" | "bash" | "zsh" | "dash" | "ksh" | "ash")
        && words.all(|w| {
            matches!(
                w,
                "-s" | "-l" | "-i" | "--login" | "-" | "--noprofile" | "--norc"
            )
        })
}

/// A file transfer by command: (`scp -t|-f …`, `rsync --server [--sender] …`).
fn transfer(command: &str) -> Option<bool> {
    // Only a plain command: `scp -t x; cat secrets` is a shell line, checked and masked.
    if command.contains([
        ';', '&', '|', '$', '`', '<', '>', '(', ')', '{', '}', '\n', '\r', '\\', '\'', '"', '#',
        '*', '?', '~',
    ]) {
        return None;
    }
    let words: Vec<&str> = command.split_whitespace().collect();
    let name = words.first()?.rsplit('/').next()?;
    match name {
        "scp" => {
            let flags: Vec<&str> = words[1..]
                .iter()
                .copied()
                .take_while(|w| w.starts_with('-'))
                .collect();
            let has = |c: char| flags.iter().any(|f| !f.starts_with("--") && f.contains(c));
            if has('f') {
                Some(true)
            } else if has('t') {
                Some(false)
            } else {
                None
            }
        }
        "rsync" if words.contains(&"--server") => Some(words.contains(&"--sender")),
        _ => None,
    }
}

/// Serves one session channel to its end, holding `slot` (one of the connection's places)
/// while it is open.
pub async fn run(
    gw: Arc<SshGateway>,
    agent: Agent,
    channel: russh::Channel<server::Msg>,
    handle: server::Handle,
    slot: Slot,
) {
    let _slot = slot;
    let (mut from_agent, to_agent) = channel.split();
    let to_agent = Arc::new(to_agent);
    let ctx = match Ctx::resolve(&gw, &agent) {
        Ok(c) => Arc::new(c),
        Err(why) => {
            refusal_record(&gw.core, Some(&agent.identity), "", &agent.client, &why);
            fail(&to_agent, &why, REFUSED_EXIT).await;
            return;
        }
    };
    // The requests before the session starts.
    let mut pty = None;
    let mut env: Vec<(String, String)> = Vec::new();
    let mut env_seen = 0usize;
    let mut agent_forwarding = false;
    let mut x11 = None;
    let mode = loop {
        match from_agent.wait().await {
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            }) => {
                pty = Some((
                    term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    terminal_modes,
                ));
            }
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => {
                // The connection's handler refused those past the bounds (by the same rule).
                let refused = env_refused(env_seen, &variable_name, &variable_value).is_some();
                env_seen += 1;
                if !refused
                    && passed_env(&variable_name)
                    && safe_locale(&variable_name, &variable_value)
                {
                    match env.iter_mut().find(|(k, _)| *k == variable_name) {
                        Some(e) => e.1 = variable_value,
                        None => env.push((variable_name, variable_value)),
                    }
                }
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            }) => {
                if let Some(p) = &mut pty {
                    p.1 = col_width;
                    p.2 = row_height;
                    p.3 = pix_width;
                    p.4 = pix_height;
                }
            }
            Some(ChannelMsg::AgentForward { .. }) => {
                agent_forwarding = ctx.forwarding(SshForwarding::Agent, "agent forwarding");
            }
            Some(ChannelMsg::RequestX11 {
                single_connection,
                x11_authentication_protocol,
                x11_authentication_cookie,
                x11_screen_number,
                ..
            }) => {
                if ctx.forwarding(SshForwarding::X11, "X11 forwarding") {
                    x11 = Some(X11 {
                        single_connection,
                        protocol: x11_authentication_protocol,
                        cookie: x11_authentication_cookie,
                        screen: x11_screen_number,
                    });
                }
            }
            Some(ChannelMsg::RequestShell { .. }) => break Mode::Shell,
            Some(ChannelMsg::Exec { command, .. }) => match String::from_utf8(command) {
                Ok(c) if bare_shell(&c) => break Mode::Shell,
                Ok(c) => match transfer(&c) {
                    Some(download) => {
                        break Mode::Transfer {
                            command: c,
                            download,
                        };
                    }
                    None => break Mode::Exec(c),
                },
                Err(_) => {
                    fail(&to_agent, "agentgate: the command is not valid UTF-8, so it cannot be checked; it is not run", REFUSED_EXIT).await;
                    return;
                }
            },
            Some(ChannelMsg::RequestSubsystem { name, .. }) if name == "sftp" => break Mode::Sftp,
            Some(ChannelMsg::RequestSubsystem { .. }) | Some(ChannelMsg::Eof) => {}
            Some(ChannelMsg::Close) | None => return,
            Some(_) => {}
        }
    };
    let started = Instant::now();
    // The channel's own request: the command, or the login for a shell or sftp.
    let (via, text, cmd) = match &mode {
        Mode::Shell => {
            let mut keys = std::collections::BTreeSet::new();
            keys.insert("shell".to_owned());
            (
                "shell",
                "(interactive shell)".to_owned(),
                ctx.ssh_command(
                    OperationClass::Read,
                    "shell",
                    "",
                    keys,
                    Some(ctx.access(Vec::new(), None)),
                ),
            )
        }
        Mode::Exec(c) | Mode::Transfer { command: c, .. } => match ctx.command("exec", c) {
            Ok(mut cmd) => {
                // A plain `scp -t` upload is checked file by file as it passes (below); only
                // elsewhere is it a privileged write of names the sender chooses.
                if matches!(
                    mode,
                    Mode::Transfer {
                        download: false,
                        ..
                    }
                ) && scp::Upload::new(c).is_some()
                    && cmd.keys.remove(command::SCP_UNCHECKED)
                    && cmd.class == OperationClass::Privilege
                {
                    cmd.class = OperationClass::Write;
                }
                ("exec", c.clone(), cmd)
            }
            Err(why) => {
                let d = Decision {
                    verdict: Verdict::Refuse,
                    rule: "unparsable".into(),
                    grant: None,
                    message: why.clone(),
                };
                let probe =
                    ctx.ssh_command(OperationClass::Exec, "exec", c, Default::default(), None);
                let _ = ctx.record("exec", c, &probe, &d);
                fail(&to_agent, &why, REFUSED_EXIT).await;
                return;
            }
        },
        Mode::Sftp => {
            let mut keys = std::collections::BTreeSet::new();
            keys.insert("sftp".to_owned());
            (
                "sftp",
                "sftp".to_owned(),
                ctx.ssh_command(
                    OperationClass::Read,
                    "sftp",
                    "",
                    keys,
                    Some(ctx.access(vec!["sftp".into()], None)),
                ),
            )
        }
    };
    ctx.fresh_token().await;
    let mut decision = approvable(ctx.decide(&cmd), &text);
    let downloads = matches!(mode, Mode::Transfer { download: true, .. });
    // Refused whatever an approver would say (a hold would only be approved into this).
    if decision.verdict != Verdict::Refuse && downloads && ctx.masks.has_value_rules() {
        decision = Decision {
            verdict: Verdict::Refuse,
            rule: "mask-downloads".into(),
            grant: None,
            message: "files copied from the host would reach the agent unmasked, and a MaskPolicy applies to this Target".into(),
        };
    }
    let id = match ctx.record(via, &text, &cmd, &decision) {
        Ok(id) => id,
        Err(why) => {
            fail(&to_agent, &format!("agentgate: {why}"), REFUSED_EXIT).await;
            return;
        }
    };
    // What the agent sent while its command was held, passed on (checked as always) once it
    // runs.
    let mut early = Vec::new();
    if decision.verdict != Verdict::Allow {
        match ctx
            .settle(id, &cmd, &text, &decision, (&to_agent, &mut from_agent))
            .await
        {
            // Approved while it waited (recorded): it runs as approved.
            Ok((_, sent)) => early = sent,
            Err(msg) => {
                ctx.outcome(id, started, (0, 0), Some(msg.clone()));
                fail(&to_agent, &msg, REFUSED_EXIT).await;
                return;
            }
        }
    }
    // The host.
    let back = upstream::Back {
        agent: Some(handle),
        agent_forwarding,
        x11: x11.is_some(),
        remote: false,
        log: Some(ctx.clone()),
    };
    let up = match upstream::connect(
        &ctx.spec,
        &ctx.gw.core.targets_dir.join(&ctx.target),
        &ctx.login,
        back,
    )
    .await
    {
        Ok(c) => c,
        Err(why) => {
            let msg = format!("agentgate cannot reach the host of {}: {why}", ctx.target);
            ctx.outcome(id, started, (0, 0), Some(msg.clone()));
            fail(&to_agent, &msg, 255).await;
            return;
        }
    };
    let asks = Asks {
        pty: pty.as_ref(),
        env: &env,
        agent_forwarding,
        x11: x11.as_ref(),
    };
    let up_channel = match open_session(&up, &asks, &mode).await {
        Ok(c) => c,
        Err(why) => {
            let msg = format!("agentgate: the host of {} refused: {why}", ctx.target);
            ctx.outcome(id, started, (0, 0), Some(msg.clone()));
            fail(&to_agent, &msg, 255).await;
            return;
        }
    };
    if let Some(p) = &pty {
        ctx.io("r", format!("{}x{}", p.1, p.2).as_bytes());
    }
    let (from_host, to_host) = up_channel.split();
    let (inject_tx, inject_rx) = mpsc::channel::<Vec<u8>>(16);
    // What passed each way, counted as it passes (a channel cut short records it too).
    let (sent_in, sent_out) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut output = tokio::spawn(host_to_agent(
        ctx.clone(),
        mode.clone(),
        pty.is_some(),
        from_host,
        to_agent.clone(),
        inject_rx,
        sent_out.clone(),
    ));
    // The channel ends when the access that allowed it does (a grant expired or revoked,
    // the identity disabled), with the forwarding it asked for.
    let forwarding: Vec<SshForwarding> = [
        (agent_forwarding, SshForwarding::Agent),
        (x11.is_some(), SshForwarding::X11),
    ]
    .into_iter()
    .filter_map(|(on, kind)| on.then_some(kind))
    .collect();
    let live = {
        let ctx = ctx.clone();
        let store = ctx.gw.core.policy.clone();
        async move {
            let identity = ctx.agent.identity.clone();
            policy::live::ended_when(store, &identity, |snapshot, _| {
                ctx.still_allowed(&cmd, &forwarding, snapshot)
            })
            .await
        }
    };
    let relayed = async {
        let bytes_in = agent_to_host(
            &ctx,
            &mode,
            pty.is_some(),
            (early, &mut from_agent),
            &to_host,
            &to_agent,
            inject_tx,
            &sent_in,
        )
        .await;
        let (bytes_out, exit) = (&mut output).await.unwrap_or((0, None));
        (bytes_in, bytes_out, exit)
    };
    let (bytes_in, bytes_out, error, ended) = tokio::select! {
        (bytes_in, bytes_out, exit) = relayed => {
            (bytes_in, bytes_out, exit.filter(|s| *s != 0).map(|s| format!("exit status {s}")), None)
        }
        d = live => {
            tracing::info!(identity = %ctx.agent.identity, target = %ctx.target, rule = %d.rule, reason = %d.message, "an SSH channel ended: its access ended");
            let msg = policy::live::message(&d);
            (sent_in.load(Relaxed), sent_out.load(Relaxed), Some(msg.clone()), Some(msg))
        }
    };
    if ended.is_some() {
        output.abort();
        // The command is stopped on the host too (without a terminal, closing the channel
        // alone would leave it running).
        let _ = tokio::time::timeout(TELL_WITHIN, async {
            let _ = to_host.signal(russh::Sig::TERM).await;
            let _ = to_host.close().await;
        })
        .await;
    }
    // The record and the host first: telling the agent may wait on it (bounded).
    ctx.outcome(id, started, (bytes_in, bytes_out), error);
    let _ = tokio::time::timeout(
        TELL_WITHIN,
        up.disconnect(russh::Disconnect::ByApplication, "", "en"),
    )
    .await;
    if let Some(msg) = ended {
        fail(&to_agent, &msg, REFUSED_EXIT).await;
    }
    ctx.rec.end("the channel closed");
}

type Pty = (String, u32, u32, u32, u32, Vec<(russh::Pty, u32)>);

/// An X11 forwarding request, passed on as the agent's client made it.
struct X11 {
    single_connection: bool,
    protocol: String,
    cookie: String,
    screen: u32,
}

/// The requests the agent made before its command, to make again on the host's side.
struct Asks<'a> {
    pty: Option<&'a Pty>,
    env: &'a [(String, String)],
    agent_forwarding: bool,
    x11: Option<&'a X11>,
}

/// Opens the host's side of the channel and makes the same requests.
async fn open_session(
    up: &Connection,
    asks: &Asks<'_>,
    mode: &Mode,
) -> Result<russh::Channel<client::Msg>, String> {
    let ch = up
        .channel_open_session()
        .await
        .map_err(|e| format!("no session channel: {e}"))?;
    if asks.agent_forwarding {
        ch.agent_forward(false).await.map_err(|e| e.to_string())?;
    }
    if let Some(x) = asks.x11 {
        ch.request_x11(
            false,
            x.single_connection,
            x.protocol.clone(),
            x.cookie.clone(),
            x.screen,
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    let env = asks.env;
    if let Some((term, w, h, pw, ph, _modes)) = asks.pty {
        // The client's terminal modes are not passed: erase, kill, werase or lnext set to
        // printable characters would let the host's line editing rewrite a line after it was
        // checked. The host's defaults apply.
        ch.request_pty(false, term, *w, *h, *pw, *ph, &[])
            .await
            .map_err(|e| e.to_string())?;
    }
    for (k, v) in env {
        let _ = ch.set_env(false, k.clone(), v.clone()).await;
    }
    match mode {
        Mode::Shell => ch.request_shell(true).await,
        Mode::Exec(c) | Mode::Transfer { command: c, .. } => ch.exec(true, c.as_bytes()).await,
        Mode::Sftp => ch.request_subsystem(true, "sftp").await,
    }
    .map_err(|e| e.to_string())?;
    Ok(ch)
}

/// How long a legacy scp upload waits for the host's answer to a header.
const SCP_ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// How much of an exec's input (without a terminal) is recorded.
const MAX_EXEC_INPUT_RECORDED: u64 = 1 << 20;

/// The agent's input, to the host: returns the bytes sent.
#[allow(clippy::too_many_arguments)]
async fn agent_to_host(
    ctx: &Arc<Ctx>,
    mode: &Mode,
    pty: bool,
    (early, from_agent): (Vec<ChannelMsg>, &mut russh::ChannelReadHalf),
    to_host: &ChannelWriteHalf<client::Msg>,
    to_agent: &ChannelWriteHalf<server::Msg>,
    inject: mpsc::Sender<Vec<u8>>,
    sent: &AtomicU64,
) -> u64 {
    let lines_checked = *mode == Mode::Shell || (matches!(mode, Mode::Exec(_)) && pty);
    let mut lines = LineDiscipline::default();
    lines.no_terminal = !pty;
    let mut packets = sftp::Framer::default();
    // A legacy scp upload: each file is checked where it lands.
    let mut upload = match mode {
        Mode::Transfer {
            command,
            download: false,
        } => scp::Upload::new(command),
        _ => None,
    };
    // After a refused upload: the host's input is closed, the agent's is dropped.
    let mut dropping = false;
    let mut early = early.into_iter();
    loop {
        let msg = match early.next() {
            Some(m) => m,
            None => match from_agent.wait().await {
                Some(m) => m,
                None => break,
            },
        };
        match msg {
            ChannelMsg::Data { data } => match mode {
                Mode::Transfer { .. } if upload.is_some() => {
                    let items = upload.as_mut().map(|u| u.feed(&data)).unwrap_or_default();
                    for item in items {
                        let refused = match item {
                            scp::Item::Pass(bytes) => {
                                sent.fetch_add(bytes.len() as u64, Relaxed);
                                if to_host.data_bytes(Bytes::from(bytes)).await.is_err() {
                                    return sent.load(Relaxed);
                                }
                                continue;
                            }
                            scp::Item::Entry { paths, setid } => {
                                match scp_entry(ctx, &paths, setid).await {
                                    Ok(()) => continue,
                                    Err(why) => why,
                                }
                            }
                            scp::Item::Refuse(why) => format!("agentgate: refused: {why}"),
                            scp::Item::Await(n) => {
                                // The host answers a header at once; one that does not
                                // within a minute ends the upload rather than the channel
                                // waiting forever.
                                if tokio::time::timeout(SCP_ANSWER_WITHIN, ctx.scp_answers.wait(n))
                                    .await
                                    .unwrap_or(false)
                                {
                                    continue;
                                }
                                // The host refused something (and told the agent why): what
                                // the agent sends next would be read differently there.
                                tracing::info!(
                                    session = ctx.rec.id(),
                                    "scp upload ended after the host refused a file"
                                );
                                let _ = to_host.eof().await;
                                upload = None;
                                dropping = true;
                                break;
                            }
                        };
                        // The sink's answer to the header: a fatal error for the agent's scp.
                        let _ = inject
                            .send(format!("\x02{}\n", refused.replace('\n', " ")).into_bytes())
                            .await;
                        tracing::info!(session = ctx.rec.id(), why = %refused, "scp upload refused");
                        // The host's sink reads to the end of its input and exits; its exit
                        // ends the channel as usual. Whatever else the agent sends is dropped.
                        let _ = to_host.eof().await;
                        upload = None;
                        dropping = true;
                        break;
                    }
                }
                _ if dropping => {}
                // A shell; or a program run with a terminal, whose input may reach a shell
                // escape (a pager's `!cmd`): each line is checked as a command.
                Mode::Shell | Mode::Exec(_) if lines_checked => {
                    for input in lines.feed(&data, command::is_incomplete) {
                        match input {
                            Input::Control(bytes) => {
                                if !bytes.is_empty()
                                    && to_host
                                        .data_bytes(Bytes::from(bytes.clone()))
                                        .await
                                        .is_err()
                                {
                                    return sent.load(Relaxed);
                                }
                                sent.fetch_add(bytes.len() as u64, Relaxed);
                            }
                            Input::Line { text, raw } => {
                                let verdict = shell_line(ctx, &text, *mode != Mode::Shell).await;
                                match verdict {
                                    Ok(()) => {
                                        ctx.io("i", &raw);
                                        sent.fetch_add(raw.len() as u64, Relaxed);
                                        if to_host.data_bytes(Bytes::from(raw)).await.is_err() {
                                            return sent.load(Relaxed);
                                        }
                                    }
                                    Err(msg) => {
                                        tell(to_agent, pty, &msg).await;
                                    }
                                }
                            }
                            Input::Refused { text, why } => {
                                let rule = if why == super::terminal::NON_ASCII_WITH_TERMINAL {
                                    "non-ascii-with-terminal"
                                } else {
                                    "line-editing"
                                };
                                let why = refuse_line(ctx, &text, rule, why);
                                tell(to_agent, pty, &format!("agentgate: refused: {why}")).await;
                            }
                        }
                    }
                }
                Mode::Sftp => {
                    packets.feed(&data);
                    loop {
                        match packets.packet() {
                            Ok(Some(packet)) => match sftp_request(ctx, &packet).await {
                                Ok(()) => {
                                    if let Ok(mut h) = ctx.sftp_handles.lock() {
                                        h.request(&packet);
                                    }
                                    sent.fetch_add(packet.len() as u64, Relaxed);
                                    if to_host.data_bytes(packet).await.is_err() {
                                        return sent.load(Relaxed);
                                    }
                                }
                                Err(status) => {
                                    if inject.send(status).await.is_err() {
                                        return sent.load(Relaxed);
                                    }
                                }
                            },
                            Ok(None) => break,
                            Err(why) => {
                                tracing::info!(session = ctx.rec.id(), %why, "sftp stream refused");
                                // The server exits at the end of its input; that ends the
                                // channel as usual.
                                let _ = to_host.eof().await;
                                dropping = true;
                                break;
                            }
                        }
                    }
                }
                Mode::Shell | Mode::Exec(_) | Mode::Transfer { .. } => {
                    // A command's input (a script piped to it) is part of its record, up to
                    // a bound; a transfer's bytes are files, counted only.
                    if matches!(mode, Mode::Exec(_)) {
                        let room = MAX_EXEC_INPUT_RECORDED.saturating_sub(sent.load(Relaxed));
                        let n = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
                        ctx.io("i", &data[..n]);
                        if n < data.len() && room > 0 {
                            ctx.io(
                                "i",
                                format!("\n[agentgate: input past {MAX_EXEC_INPUT_RECORDED} bytes is counted, not recorded]\n").as_bytes(),
                            );
                        }
                    }
                    sent.fetch_add(data.len() as u64, Relaxed);
                    if to_host.data_bytes(data).await.is_err() {
                        return sent.load(Relaxed);
                    }
                }
            },
            ChannelMsg::Eof => {
                let _ = to_host.eof().await;
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => {
                ctx.io("r", format!("{col_width}x{row_height}").as_bytes());
                let _ = to_host
                    .window_change(col_width, row_height, pix_width, pix_height)
                    .await;
            }
            ChannelMsg::Signal { signal } => {
                let _ = to_host.signal(signal).await;
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    let _ = to_host.close().await;
    sent.load(Relaxed)
}

/// Decides one interactive line; `Err` is what to tell the agent. What follows a `!`, `|` or
/// `#` is also checked as a command, as a pager or console would run it (`!sudo id` in
/// `less`): with `escapes` (the input of a program that is not a shell) and for a line bash
/// reads as nothing to run, strictly; otherwise a rest that does not parse is bash's.
async fn shell_line(ctx: &Arc<Ctx>, text: &str, escapes: bool) -> Result<(), String> {
    if text.trim().is_empty() {
        return Ok(());
    }
    // An interactive bash expands history (`!!`, `!$`, `^a^b`) before it parses the line:
    // what would run is not what was checked.
    if !escapes && let Some(why) = command::history_expansion(text) {
        let why = refuse_line(ctx, text, "history-expansion", why);
        return Err(format!("agentgate: refused: {why}"));
    }
    let mut cmd = match ctx.command("line", text) {
        Ok(c) => c,
        Err(why) => return Err(refuse_line(ctx, text, "unparsable", why)),
    };
    ctx.fresh_token().await;
    let mut decision = approvable(ctx.decide(&cmd), text);
    // At a shell prompt the line may still reach another program: a pager that a command
    // started (`journalctl`, `systemctl status`, `git log` open `less`) reads it as keys,
    // and runs what follows `!`, `|` or `#` (up to the Enter) through a shell. A line that
    // bash reads as nothing to run (a comment: `#! rm -rf ~`) is checked as strictly as a
    // console's input. Otherwise a rest of the line that parses as a command it may not
    // run is refused (a comment too: `w #sudo reboot`); one that does not parse is
    // bash's to read.
    let silent = cmd.ssh.as_ref().is_some_and(|a| a.commands.is_empty());
    let strict = escapes || silent;
    if decision.verdict == Verdict::Allow {
        // Each place a console could take the rest of the line as a command: after the
        // `!`, `|` or `#`, and after the mark that follows it (`!!`, `|!`).
        // A pager's command ends at the first Enter: what follows a mark is read up to there.
        let tails = text
            .char_indices()
            .filter(|(_, c)| matches!(c, '!' | '|' | '#'))
            .flat_map(|(i, c)| {
                let after = &text[i + c.len_utf8()..];
                let after = after.split(['\n', '\r']).next().unwrap_or(after);
                let skip_mark = after.chars().next().map_or(0, char::len_utf8);
                [(c, after), (c, &after[skip_mark..])]
            });
        for (mark, tail) in tails {
            // An option after a `!` (`find . ! -name x`, `[ ! -f x ]`) is no command anything
            // could run.
            if tail.trim_start().starts_with('-') {
                continue;
            }
            match ctx.command("line", tail) {
                Ok(c) => {
                    let d = approvable(ctx.decide(&c), text);
                    if d.verdict != Verdict::Allow {
                        cmd.class = c.class;
                        cmd.keys.extend(c.keys);
                        decision = d;
                        break;
                    }
                }
                Err(_) if !strict => {}
                // What cannot be checked is not passed to a program that may run it.
                Err(_) => {
                    let why = format!(
                        "what follows `{mark}` in this line cannot be checked as a shell command, and this program may run it as one (a pager's `!`, an editor's `:!`); type the command in a shell instead"
                    );
                    let why = refuse_line(ctx, text, "unparsable", why);
                    return Err(format!("agentgate: refused: {why}"));
                }
            }
        }
    }
    ctx.record("line", text, &cmd, &decision)
        .map_err(|why| format!("agentgate: {why}"))?;
    ctx.remember_granted(&cmd, &decision);
    if decision.verdict == Verdict::Allow {
        Ok(())
    } else {
        Err(ctx.refusal(&cmd, text, &decision).await)
    }
}

/// Records a line refused before it could be decided as a command (rule `rule`) and returns
/// `why`, what the agent is told.
fn refuse_line(ctx: &Ctx, text: &str, rule: &str, why: String) -> String {
    let probe = ctx.ssh_command(OperationClass::Exec, "line", text, Default::default(), None);
    let d = Decision {
        verdict: Verdict::Refuse,
        rule: rule.into(),
        grant: None,
        message: why.clone(),
    };
    // Nothing runs either way; a failed record is reported by the audit health check.
    let _ = ctx.record("line", text, &probe, &d);
    why
}

/// Decides one sftp request; `Err` is the STATUS packet to answer it with.
async fn sftp_request(ctx: &Arc<Ctx>, packet: &[u8]) -> Result<(), Vec<u8>> {
    let Some(mut op) = sftp::Op::parse(packet) else {
        // Reads and writes of open handles, stat, readdir: decided when the file was opened.
        return Ok(());
    };
    // A change through a handle is a change of the file it was opened with; a handle this
    // channel did not see opened could be any file.
    let mut unknown_handle = false;
    if let Some(h) = &op.handle {
        match ctx
            .sftp_handles
            .lock()
            .ok()
            .and_then(|t| t.path(h).map(str::to_owned))
        {
            Some(path) => op.paths = vec![path],
            None => unknown_handle = true,
        }
    }
    if op.name == sftp::MALFORMED {
        return Err(sftp::status(
            op.id,
            sftp::PERMISSION_DENIED,
            "agentgate: a malformed SFTP request is refused",
        ));
    }
    let text = op.describe();
    let class = if unknown_handle {
        OperationClass::Privilege
    } else if op.writes {
        // Uploading over an account, sudo or startup file is what the shell path calls it
        // (relative paths are in the login's home); a setuid or setgid bit is `chmod u+s`,
        // an owner `chown`.
        let landing = command::landing_class(&op.paths, op.setid || op.chown);
        // A link or a rename is judged as the shell's `ln` and `mv` are: by where a later
        // plain write through it would land (`symlink .ssh s`, then `put x s/rc`).
        let linked = match (op.name.as_str(), op.paths.as_slice()) {
            // OpenSSH sends the target first, the link second; the draft standard the other
            // way round: both readings are checked.
            ("symlink", [a, b]) => {
                command::more_severe(command::symlink_class(a, b), command::symlink_class(b, a))
            }
            ("link", [existing, link]) => command::hardlink_class(existing, link),
            ("rename", [_, to]) => command::rename_class(to),
            _ => OperationClass::Write,
        };
        command::more_severe(landing, linked)
    } else {
        OperationClass::Read
    };
    let mut keys = std::collections::BTreeSet::new();
    keys.insert(format!("sftp {}", op.name));
    keys.insert(text.clone());
    let cmd = ctx.ssh_command(
        class,
        "sftp",
        &text,
        keys,
        Some(ctx.access(vec![text.clone()], None)),
    );
    ctx.fresh_token().await;
    let mut decision = approvable(ctx.decide(&cmd), &text);
    if decision.verdict != Verdict::Refuse && op.reads && ctx.masks.has_value_rules() {
        decision = Decision {
            verdict: Verdict::Refuse,
            rule: "mask-downloads".into(),
            grant: None,
            message: "files read from the host would reach the agent unmasked, and a MaskPolicy applies to this Target".into(),
        };
    }
    ctx.remember_granted(&cmd, &decision);
    if let Err(why) = ctx.record("sftp", &text, &cmd, &decision) {
        return Err(sftp::status(
            op.id,
            sftp::PERMISSION_DENIED,
            &format!("agentgate: {why}"),
        ));
    }
    if decision.verdict == Verdict::Allow {
        return Ok(());
    }
    let msg = ctx.refusal(&cmd, &text, &decision).await;
    Err(sftp::status(op.id, sftp::PERMISSION_DENIED, &msg))
}

/// Decides one file or directory of a legacy scp upload, by where it may land (the command
/// itself was decided as a write); `Err` is what to tell the agent.
async fn scp_entry(ctx: &Arc<Ctx>, paths: &[String], setid: bool) -> Result<(), String> {
    let class = command::landing_class(paths, setid);
    if class == OperationClass::Write {
        return Ok(());
    }
    let text = format!("scp upload {}", paths.last().map_or("", String::as_str));
    let mut keys = std::collections::BTreeSet::new();
    keys.insert("scp upload".to_owned());
    keys.insert(text.clone());
    let cmd = ctx.ssh_command(
        class,
        "scp",
        &text,
        keys,
        Some(ctx.access(vec![text.clone()], None)),
    );
    ctx.fresh_token().await;
    let decision = approvable(ctx.decide(&cmd), &text);
    ctx.record("scp", &text, &cmd, &decision)
        .map_err(|why| format!("agentgate: {why}"))?;
    ctx.remember_granted(&cmd, &decision);
    if decision.verdict == Verdict::Allow {
        return Ok(());
    }
    Err(ctx.refusal(&cmd, &text, &decision).await)
}

/// Writes a message to the agent's terminal (stdout with a pty, stderr without).
async fn tell(to_agent: &ChannelWriteHalf<server::Msg>, pty: bool, msg: &str) {
    if pty {
        let text = format!("\r\n{}\r\n", msg.replace('\n', "\r\n"));
        if tokio::time::timeout(TELL_WITHIN, to_agent.data_bytes(Bytes::from(text)))
            .await
            .is_err()
        {
            tracing::info!("the agent did not read a refusal's message in time");
        }
    } else {
        tell_stderr(to_agent, format!("{msg}\n")).await;
    }
}

/// The host's output, to the agent (masked, recorded): returns the bytes sent and the exit
/// status.
async fn host_to_agent(
    ctx: Arc<Ctx>,
    mode: Mode,
    _pty: bool,
    mut from_host: russh::ChannelReadHalf,
    to_agent: Arc<ChannelWriteHalf<server::Msg>>,
    mut inject: mpsc::Receiver<Vec<u8>>,
    sent: Arc<AtomicU64>,
) -> (u64, Option<u32>) {
    let terminal = matches!(mode, Mode::Shell | Mode::Exec(_));
    // A legacy scp upload: the host's answers release what the agent sends next.
    let scp_upload = match &mode {
        Mode::Transfer {
            command,
            download: false,
        } => scp::Upload::new(command).is_some(),
        _ => false,
    };
    let mut out = OutputMasker::default();
    let mut err = OutputMasker::default();
    let mut packets = sftp::Framer::default();
    let mut exit = None;
    let mut inject_open = true;
    loop {
        let pending = out.has_pending() || err.has_pending();
        let msg = tokio::select! {
            m = from_host.wait() => m,
            Some(status) = inject.recv(), if inject_open => {
                // A refused sftp request's answer, between two whole packets.
                sent.fetch_add(status.len() as u64, Relaxed);
                if to_agent.data_bytes(Bytes::from(status)).await.is_err() {
                    break;
                }
                continue;
            }
            () = tokio::time::sleep(FLUSH_AFTER), if pending => {
                let o = out.flush(&ctx.masks);
                let e = err.flush(&ctx.masks);
                sent.fetch_add(send_output(&ctx, &to_agent, o, e).await, Relaxed);
                continue;
            }
        };
        if inject.is_closed() {
            inject_open = false;
        }
        match msg {
            Some(ChannelMsg::Data { data }) => {
                if terminal {
                    let o = out.feed(&ctx.masks, &data);
                    sent.fetch_add(send_output(&ctx, &to_agent, o, Vec::new()).await, Relaxed);
                } else if mode == Mode::Sftp {
                    packets.feed(&data);
                    loop {
                        match packets.packet() {
                            Ok(Some(p)) => {
                                if let Ok(mut h) = ctx.sftp_handles.lock() {
                                    h.answer(&p);
                                }
                                sent.fetch_add(p.len() as u64, Relaxed);
                                if to_agent.data_bytes(p).await.is_err() {
                                    return (sent.load(Relaxed), exit);
                                }
                            }
                            Ok(None) => break,
                            Err(_) => return (sent.load(Relaxed), exit),
                        }
                    }
                } else {
                    if scp_upload {
                        ctx.scp_answers.feed(&data);
                    }
                    sent.fetch_add(data.len() as u64, Relaxed);
                    if to_agent.data_bytes(data).await.is_err() {
                        break;
                    }
                }
            }
            Some(ChannelMsg::ExtendedData { data, ext }) => {
                if terminal {
                    let e = err.feed(&ctx.masks, &data);
                    sent.fetch_add(send_output(&ctx, &to_agent, Vec::new(), e).await, Relaxed);
                } else {
                    // A transfer's or sftp server's messages: recorded as they pass, masked.
                    let e = err.feed(&ctx.masks, &data);
                    if !e.is_empty() {
                        ctx.io("o", &e);
                        sent.fetch_add(e.len() as u64, Relaxed);
                        let _ = to_agent.extended_data_bytes(ext, Bytes::from(e)).await;
                    }
                }
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => {
                let o = out.flush(&ctx.masks);
                let e = err.flush(&ctx.masks);
                sent.fetch_add(send_output(&ctx, &to_agent, o, e).await, Relaxed);
                exit = Some(exit_status);
                let _ = to_agent.exit_status(exit_status).await;
            }
            Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                let code = 128 + signal_number(&signal_name);
                exit = Some(code);
                let _ = to_agent.exit_status(code).await;
            }
            Some(ChannelMsg::Eof) => {
                let o = out.flush(&ctx.masks);
                let e = err.flush(&ctx.masks);
                sent.fetch_add(send_output(&ctx, &to_agent, o, e).await, Relaxed);
                let _ = to_agent.eof().await;
            }
            Some(ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
    }
    ctx.scp_answers.close();
    let o = out.flush(&ctx.masks);
    let e = err.flush(&ctx.masks);
    sent.fetch_add(send_output(&ctx, &to_agent, o, e).await, Relaxed);
    let _ = to_agent.eof().await;
    let _ = to_agent.close().await;
    let _ = &mode;
    (sent.load(Relaxed), exit)
}

fn signal_number(s: &Sig) -> u32 {
    match s {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        _ => 0,
    }
}

async fn send_output(
    ctx: &Ctx,
    to_agent: &ChannelWriteHalf<server::Msg>,
    out: Vec<u8>,
    err: Vec<u8>,
) -> u64 {
    let n = (out.len() + err.len()) as u64;
    if !out.is_empty() {
        ctx.io("o", &out);
        let _ = to_agent.data_bytes(Bytes::from(out)).await;
    }
    if !err.is_empty() {
        ctx.io("o", &err);
        let _ = to_agent.extended_data_bytes(1, Bytes::from(err)).await;
    }
    n
}

/// A local port forwarding the agent asked for (`ssh -L`).
#[derive(Debug, Clone)]
pub struct Forward {
    /// Where the host should connect.
    pub host: String,
    /// Its port.
    pub port: u32,
    /// The agent's side.
    pub from: String,
}

/// Decides and opens a forwarding: the host connects to `host:port` for the agent. Refused
/// unless a baseline or grant allows port forwarding.
pub async fn open_forward(
    gw: &Arc<SshGateway>,
    agent: &Agent,
    forward: &Forward,
) -> Result<Forwarded, String> {
    let ctx = Arc::new(Ctx::resolve(gw, agent)?);
    let text = format!("forward {}:{}", forward.host, forward.port);
    let mut keys = std::collections::BTreeSet::new();
    keys.insert("port forwarding".to_owned());
    keys.insert(text.clone());
    let cmd = ctx.ssh_command(
        OperationClass::Exec,
        "forward",
        &text,
        keys,
        Some(ctx.access(vec![text.clone()], Some(SshForwarding::Port))),
    );
    let decision = forward_decision(&ctx, &cmd, &ctx.snapshot);
    let id = ctx.record("forward", &text, &cmd, &decision)?;
    if decision.verdict != Verdict::Allow {
        let msg = ctx.refusal(&cmd, &text, &decision).await;
        ctx.outcome(id, Instant::now(), (0, 0), Some(msg.clone()));
        ctx.rec.end("the forwarding was refused");
        return Err(msg);
    }
    let failed = |why: String| {
        ctx.outcome(id, Instant::now(), (0, 0), Some(why.clone()));
        ctx.rec.end("the forwarding failed");
        why
    };
    let up = upstream::connect(
        &ctx.spec,
        &gw.core.targets_dir.join(&ctx.target),
        &ctx.login,
        upstream::Back::default(),
    )
    .await
    .map_err(|e| failed(format!("agentgate cannot reach the host: {e}")))?;
    let ch = up
        .channel_open_direct_tcpip(forward.host.clone(), forward.port, "127.0.0.1", 0)
        .await
        .map_err(|e| failed(format!("the host refused the forwarding: {e}")))?;
    Ok((ch, ctx.clone(), up, cmd, id))
}

/// An opened port forward: the host's channel, the context, the host connection, the
/// request that allowed it and its number in the record.
pub type Forwarded = (
    russh::Channel<client::Msg>,
    Arc<Ctx>,
    Connection,
    policy::Command,
    u64,
);

/// The decision on a port forward: as any request, and allowed also (it is Exec-class, held
/// by default) when a baseline entry or grant in `snapshot` sets ssh.portForwarding.
fn forward_decision(ctx: &Ctx, cmd: &policy::Command, snapshot: &Snapshot) -> Decision {
    let decided = ctx.decide(cmd);
    if decided.verdict == Verdict::Allow {
        decided
    } else if decided.verdict == Verdict::Hold
        && cmd
            .ssh
            .as_ref()
            .is_some_and(|a| forwarding_granted(snapshot, &ctx.agent.identity, &ctx.target, a))
    {
        // Forwarding is an Exec-class request (held by default); a baseline entry or grant
        // that sets ssh.portForwarding allows it without a per-forward approval.
        Decision {
            verdict: Verdict::Allow,
            rule: "ssh-port-forwarding".into(),
            grant: None,
            message: String::new(),
        }
    } else if decided.verdict == Verdict::Hold {
        Decision {
            verdict: Verdict::Hold,
            rule: decided.rule,
            grant: None,
            message: format!(
                "{}; port forwarding is refused unless a baseline entry or an AccessGrant sets ssh.portForwarding",
                decided.message
            ),
        }
    } else {
        decided
    }
}

/// Whether a baseline entry or an AccessGrant in force explicitly allows `access` (its
/// forwarding flag, and its login): a Target guardrail that allows everything does not.
pub fn forwarding_granted(
    snapshot: &Snapshot,
    identity: &str,
    target: &str,
    access: &SshAccess,
) -> bool {
    let Some(id) = snapshot.identities.get(identity) else {
        return false;
    };
    if id.spec.disabled {
        return false;
    }
    let now = crate::clock::now();
    let flag = |scope: &agentgate_crds::AccessScope| {
        let s = scope.ssh.as_ref();
        let set = match access.forwarding {
            Some(SshForwarding::Port) => s.is_some_and(|s| s.port_forwarding),
            Some(SshForwarding::Agent) => s.is_some_and(|s| s.agent_forwarding),
            Some(SshForwarding::X11) => s.is_some_and(|s| s.x11_forwarding),
            None => false,
        };
        set && access.allowed_by(s)
    };
    id.spec
        .baseline
        .iter()
        .any(|b| b.target == target && flag(&b.scope))
        || snapshot.grants.values().any(|g| {
            g.spec.identity == identity
                && g.spec.target == target
                && g.spec.command.is_none()
                && agentgate_crds::lifecycle::in_force(g, Some(id), now)
                && flag(&g.spec.scope)
        })
}

/// Whether `agent` may use forwarding `kind` on the Target its user name chose (no record).
pub fn may_forward(gw: &SshGateway, agent: &Agent, kind: SshForwarding) -> bool {
    let Some(snapshot) = gw.core.policy.get() else {
        return false;
    };
    let Ok((login, target)) = parse_user(&agent.user, &snapshot) else {
        return false;
    };
    let Some(spec) = snapshot
        .targets
        .get(&target)
        .and_then(|t| t.spec.ssh.clone())
    else {
        return false;
    };
    let access = SshAccess {
        login: login.unwrap_or_else(|| spec.user.clone()),
        default_login: spec.user.clone(),
        commands: Vec::new(),
        forwarding: Some(kind),
    };
    forwarding_granted(&snapshot, &agent.identity, &target, &access)
}

impl Ctx {
    /// Records a forwarding asked for on this channel and whether it is granted.
    fn forwarding(&self, kind: SshForwarding, text: &str) -> bool {
        match self.forwarding_asked(kind, text, false) {
            Ok(id) => {
                self.outcome(id, Instant::now(), (0, 0), None);
                true
            }
            Err(_) => false,
        }
    }

    /// Decides and records a forwarding of `kind` described by `text`: `Ok` with the
    /// request's number when it is granted (its outcome is the caller's to record), `Err`
    /// with why not (its outcome recorded). With `strict`, the request is also decided as
    /// any other (a token that ended, a pod that is not the identity refuse it).
    fn forwarding_asked(
        &self,
        kind: SshForwarding,
        text: &str,
        strict: bool,
    ) -> Result<u64, String> {
        let access = self.access(Vec::new(), Some(kind));
        let snapshot = self.gw.core.policy.get();
        let granted = snapshot.as_deref().is_some_and(|now| {
            forwarding_granted(now, &self.agent.identity, &self.target, &access)
        });
        let cmd = self.ssh_command(
            OperationClass::Exec,
            "forward",
            text,
            std::iter::once(text.to_owned()).collect(),
            Some(access),
        );
        let flag = match kind {
            SshForwarding::Port => "ssh.portForwarding",
            SshForwarding::Agent => "ssh.agentForwarding",
            SshForwarding::X11 => "ssh.x11Forwarding",
        };
        let mut decision = Decision {
            verdict: Verdict::Allow,
            rule: "ssh-forwarding".into(),
            grant: None,
            message: String::new(),
        };
        if !granted {
            decision = Decision {
                verdict: Verdict::Refuse,
                rule: "ssh-forwarding".into(),
                grant: None,
                message: format!(
                    "{text} is refused unless a baseline entry or an AccessGrant sets {flag}"
                ),
            };
        } else if strict {
            // A grant's flag allows what the guardrails would hold; a refusal (a token
            // that ended, a pod that is not the identity, a guardrail) stands.
            let d = match snapshot.as_deref() {
                Some(s) => forward_decision(self, &cmd, s),
                None => self.decide(&cmd),
            };
            if d.verdict != Verdict::Allow {
                decision = Decision {
                    verdict: Verdict::Refuse,
                    ..d
                };
            }
        }
        // Recorded either way; granted only when the record was taken.
        let id = self
            .record("forward", text, &cmd, &decision)
            .map_err(|why| format!("agentgate: {why}"))?;
        if decision.verdict != Verdict::Allow {
            self.outcome(id, Instant::now(), (0, 0), Some(decision.message.clone()));
            return Err(decision.message);
        }
        Ok(id)
    }
}

/// A connection the host opens back (a remote forward's, an agent or X11 forwarding's) is
/// decided again, as the forwarding that allowed it would be now, and recorded with what
/// passed.
impl upstream::BackLog for Ctx {
    fn opened(&self, kind: SshForwarding, what: &str) -> Result<u64, String> {
        self.forwarding_asked(kind, what, true)
    }

    fn closed(&self, id: u64, started: Instant, bytes: (u64, u64), error: Option<String>) {
        self.outcome(id, started, bytes, error);
    }
}

/// Decides, records and sets up a remote forwarding (`ssh -R`): the host listens on
/// `address:port` and passes each connection back to the agent. Returns the port bound and
/// the connection carrying it (kept open as long as the agent's connection).
pub async fn remote_forward(
    gw: &Arc<SshGateway>,
    agent: &Agent,
    address: &str,
    port: u32,
    handle: server::Handle,
) -> Result<(u32, Arc<Connection>), String> {
    let ctx = Arc::new(Ctx::resolve(gw, agent)?);
    let text = format!("remote forward {address}:{port}");
    let id = match ctx.forwarding_asked(SshForwarding::Port, &text, false) {
        Ok(id) => id,
        Err(why) => {
            ctx.rec.end("the forwarding was refused");
            return Err(why);
        }
    };
    // The outcome is the host's answer: a forward it refuses is a failure.
    let started = Instant::now();
    let failed = |why: String| {
        ctx.outcome(id, started, (0, 0), Some(why.clone()));
        ctx.rec.end("the forwarding failed");
        why
    };
    // Each connection the host passes back is decided again and recorded in this session.
    let back = upstream::Back {
        agent: Some(handle),
        remote: true,
        log: Some(ctx.clone()),
        ..Default::default()
    };
    let up = upstream::connect(
        &ctx.spec,
        &gw.core.targets_dir.join(&ctx.target),
        &ctx.login,
        back,
    )
    .await
    .map_err(|e| {
        failed(format!(
            "agentgate cannot reach the host of {}: {e}",
            ctx.target
        ))
    })?;
    let bound = match up.tcpip_forward(address, port).await {
        Ok(bound) => bound,
        Err(e) => {
            let why = failed(format!("the host refused the forwarding: {e}"));
            let _ = up
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
            return Err(why);
        }
    };
    ctx.outcome(id, started, (0, 0), None);
    let up = Arc::new(up);
    // The forward ends when port forwarding is no longer granted: the host connection that
    // listens for it is closed. The watch ends with the agent's connection.
    let weak = Arc::downgrade(&up);
    let (gw2, agent2) = (gw.clone(), agent.clone());
    tokio::spawn(async move {
        let watched = weak.clone();
        let d = policy::live::ended_when(gw2.core.policy.clone(), &agent2.identity, |_, _| {
            let (verdict, rule, message) = if watched.strong_count() == 0 {
                (Verdict::Refuse, "gone", "the agent's connection closed")
            } else if may_forward(&gw2, &agent2, SshForwarding::Port) {
                (Verdict::Allow, "ssh-port-forwarding", "")
            } else {
                (
                    Verdict::Refuse,
                    "ssh-forwarding",
                    "port forwarding is no longer granted",
                )
            };
            Decision {
                verdict,
                rule: rule.into(),
                grant: None,
                message: message.into(),
            }
        })
        .await;
        if let Some(up) = weak.upgrade() {
            tracing::info!(identity = %agent2.identity, rule = %d.rule, reason = %d.message, "a remote forward ended: its access ended");
            let _ = up
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
    });
    Ok((if port == 0 { bound } else { port }, up))
}

/// Relays a granted forwarding's bytes both ways, holding `slot` (one of the connection's
/// places) while it is open.
pub async fn relay_forward(
    agent: russh::Channel<server::Msg>,
    (up, ctx, conn, cmd, id): Forwarded,
    slot: Slot,
) {
    let _slot = slot;
    let started = Instant::now();
    // Counted as they pass, so that a forward cut short still records what it carried.
    let (sent, received) = (Arc::default(), Arc::default());
    let mut a = ReadCounter::new(agent.into_stream(), Arc::clone(&sent));
    let mut u = ReadCounter::new(up.into_stream(), Arc::clone(&received));
    // The forward closes when the access that allowed it ends.
    let live = {
        let ctx = ctx.clone();
        let store = ctx.gw.core.policy.clone();
        async move {
            let identity = ctx.agent.identity.clone();
            policy::live::ended_when(store, &identity, |s, _| match s {
                Some(s) => forward_decision(&ctx, &cmd, s),
                None => ctx.decide(&cmd),
            })
            .await
        }
    };
    let error = tokio::select! {
        result = tokio::io::copy_bidirectional(&mut a, &mut u) => result.err().map(|e| e.to_string()),
        d = live => {
            tracing::info!(identity = %ctx.agent.identity, target = %ctx.target, rule = %d.rule, reason = %d.message, "a port forward ended: its access ended");
            Some(policy::live::message(&d))
        }
    };
    let bytes = (sent.load(Relaxed), received.load(Relaxed));
    ctx.outcome(id, started, bytes, error);
    let _ = conn
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    ctx.rec.end("the forwarding closed");
}

/// A stream that counts the bytes read from it.
pub(super) struct ReadCounter<S> {
    inner: S,
    read: Arc<AtomicU64>,
}

impl<S> ReadCounter<S> {
    /// `inner`, adding what is read from it to `read`.
    pub(super) fn new(inner: S, read: Arc<AtomicU64>) -> Self {
        Self { inner, read }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ReadCounter<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        self.read.fetch_add(n, Relaxed);
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ReadCounter<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_shells_and_transfers_are_recognised() {
        assert!(bare_shell("bash"));
        assert!(bare_shell("/bin/sh -s"));
        assert!(!bare_shell("bash -c 'rm -rf /'"));
        assert!(!bare_shell("bash script.sh"));
        assert_eq!(transfer("scp -t /tmp"), Some(false));
        assert_eq!(transfer("scp -v -f /etc/passwd"), Some(true));
        assert_eq!(transfer("scp -r -t -- /tmp"), Some(false));
        assert_eq!(
            transfer("rsync --server --sender -vlogDtpre.iLsfxCIvu . /x"),
            Some(true)
        );
        assert_eq!(
            transfer("rsync --server -vlogDtpre.iLsfxCIvu . /x"),
            Some(false)
        );
        assert_eq!(transfer("ls -t"), None);
        assert_eq!(transfer("scp -t /tmp; cat /etc/app.env"), None);
        assert_eq!(transfer("rsync --server x && journalctl"), None);
    }

    #[test]
    fn only_locale_variables_pass() {
        assert!(safe_locale("LC_ALL", "en_US.UTF-8"));
        assert!(safe_locale("LANG", "C.utf8"));
        assert!(safe_locale("LC_ALL", "C"));
        assert!(!safe_locale("LC_ALL", "zh_CN.GBK"));
        assert!(!safe_locale("LANG", "ja_JP.SJIS"));
        assert!(passed_env("LANG"));
        assert!(passed_env("LC_ALL"));
        assert!(!passed_env("BASH_ENV"));
        assert!(!passed_env("LD_PRELOAD"));
        assert!(!passed_env("PATH"));
    }

    #[test]
    fn a_command_too_long_to_show_is_not_held_but_refused() {
        let hold = Decision {
            verdict: Verdict::Hold,
            rule: "agentgate-hold-exec".into(),
            grant: None,
            message: "held".into(),
        };
        assert_eq!(
            approvable(hold.clone(), "bash -c 'x'").verdict,
            Verdict::Hold
        );
        let long = format!("bash -c 'echo {}'", "a".repeat(5000));
        let d = approvable(hold, &long);
        assert_eq!(d.verdict, Verdict::Refuse);
        assert!(d.message.contains("cannot be approved"));
    }
}
