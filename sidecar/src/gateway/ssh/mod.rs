//! The SSH gateway: an SSH server on loopback that `ssh`, `scp`, `sftp` and `rsync` reach
//! through the `ssh_config` the sidecar writes. The agent logs in with the key the sidecar
//! made for its pod (or, with `--pg-auth token`, its token as the password); the user name
//! chooses the Target and the remote login (`<target>` or `<login>@<target>`). Every exec
//! command and every interactive line is parsed as a shell reads it and checked against the
//! identity's baseline, grants and guardrails before it reaches the host; output is masked
//! with the MaskPolicies; every channel is recorded as a terminal session. Upstream, agentgate
//! logs in with the Target's key, after checking the host's key against the Target's
//! `knownHosts`.

pub mod channel;
pub mod command;
pub mod scp;
pub mod sftp;
pub mod terminal;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use agentgate_crds::Protocol;
use agentgate_crds::audit::{self as records, RecordKind};
use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
use russh::keys::ssh_key::{LineEnding, PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use tokio::net::TcpListener;

use crate::audit::agent_text;
use crate::gateway::postgres::session::Gateway;
use crate::mask::MaskSet;
use crate::policy::{self, Snapshot};

/// The name the agent's `known_hosts` gives the gateway's host key (every Target is reached
/// at the same loopback address, so one alias serves them all).
pub const HOST_KEY_ALIAS: &str = "agentgate-sidecar";

/// The SSH gateway's state.
pub struct SshGateway {
    /// Identity, policy, approvals and audit, shared with the other gateways.
    pub core: Arc<Gateway>,
    /// The gateway's host key (made at start).
    host_key: PrivateKey,
    /// The key the pod's agent logs in with (pod identity mode).
    agent_key: PrivateKey,
    /// Compiled MaskPolicies per identity and Target, with the snapshot they came from.
    masks: crate::mask::MaskCache,
}

fn random_key() -> Result<PrivateKey, String> {
    let mut seed = [0u8; 32];
    aws_lc_rs::rand::fill(&mut seed).map_err(|_| "no randomness for a key".to_owned())?;
    PrivateKey::new(
        KeypairData::Ed25519(Ed25519Keypair::from_seed(&seed)),
        "agentgate",
    )
    .map_err(|e| format!("make a key: {e}"))
}

impl SshGateway {
    /// A gateway with fresh host and agent keys.
    pub fn new(core: Arc<Gateway>) -> Result<Self, String> {
        Ok(Self {
            core,
            host_key: random_key()?,
            agent_key: random_key()?,
            masks: crate::mask::MaskCache::default(),
        })
    }

    /// The gateway's host key, public half.
    pub fn host_public_key(&self) -> PublicKey {
        self.host_key.public_key().clone()
    }

    /// The agent's key (what the injected `ssh_config` names), OpenSSH format.
    pub fn agent_key_openssh(&self) -> Result<String, String> {
        self.agent_key
            .to_openssh(LineEnding::LF)
            .map(|k| k.to_string())
            .map_err(|e| format!("encode the agent's key: {e}"))
    }

    /// The MaskPolicies that apply to `identity` on `target`, compiled.
    pub fn mask_set(
        &self,
        snapshot: &Arc<Snapshot>,
        identity: &str,
        target: &str,
    ) -> Result<Arc<MaskSet>, String> {
        self.masks
            .get(snapshot, identity, target, &self.core.targets_dir)
    }

    fn server_config(&self) -> server::Config {
        let mut methods = MethodSet::empty();
        if self.core.verifier.is_some() {
            methods.push(MethodKind::Password);
        } else {
            methods.push(MethodKind::PublicKey);
        }
        server::Config {
            server_id: russh::SshId::Standard("SSH-2.0-agentgate".into()),
            methods,
            auth_rejection_time: std::time::Duration::from_millis(300),
            auth_rejection_time_initial: Some(std::time::Duration::from_millis(0)),
            keys: vec![self.host_key.clone()],
            inactivity_timeout: None,
            keepalive_interval: Some(std::time::Duration::from_secs(30)),
            keepalive_max: 4,
            max_auth_attempts: 6,
            nodelay: true,
            window_size: 8 << 20,
            maximum_packet_size: 65535,
            ..Default::default()
        }
    }
}

/// Splits the SSH user name into the remote login and the Target: `<login>@<target>`, or
/// `<target>` (the Target's default login); a plain login is taken for the only SSH Target.
pub fn parse_user(user: &str, snapshot: &Snapshot) -> Result<(Option<String>, String), String> {
    let ssh_targets: Vec<&String> = snapshot
        .targets
        .iter()
        .filter(|(_, t)| t.spec.protocol == Protocol::Ssh)
        .map(|(n, _)| n)
        .collect();
    if let Some((login, target)) = user.rsplit_once('@') {
        return Ok((Some(login.to_owned()), target.to_owned()));
    }
    if snapshot
        .targets
        .get(user)
        .is_some_and(|t| t.spec.protocol == Protocol::Ssh)
    {
        return Ok((None, user.to_owned()));
    }
    match ssh_targets.as_slice() {
        [one] => Ok((Some(user.to_owned()), (*one).clone())),
        _ => Err(format!(
            "agentgate does not know which SSH Target \"{user}\" means: log in as <target> or <login>@<target> (the ssh_config agentgate wrote has a Host entry per Target: {})",
            ssh_targets
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The agent's `ssh_config`: one `Host` per SSH Target, reaching the gateway at `addr`.
pub fn ssh_config(
    addr: SocketAddr,
    dir: &std::path::Path,
    targets: &[String],
    token: bool,
) -> String {
    let mut out = String::from(
        "# Written by agentgate: every SSH Target is reached through its gateway.\n# ssh -F <this file> <target> [command]; another login: ssh -F <this file> -l <login>@<target> <target>\n",
    );
    for t in targets {
        out.push_str(&format!(
            "\nHost {t}\n  HostName {ip}\n  Port {port}\n  User {t}\n  HostKeyAlias {HOST_KEY_ALIAS}\n  UserKnownHostsFile {kh}\n  StrictHostKeyChecking yes\n  ForwardAgent no\n  ForwardX11 no\n",
            ip = addr.ip(),
            port = addr.port(),
            kh = dir.join("ssh").join("known_hosts").display(),
        ));
        if token {
            out.push_str("  PreferredAuthentications password\n  PubkeyAuthentication no\n");
        } else {
            out.push_str(&format!(
                "  IdentityFile {}\n  IdentitiesOnly yes\n  PreferredAuthentications publickey\n",
                dir.join("ssh").join("id_ed25519").display()
            ));
        }
    }
    out
}

/// The uid the operator runs an injected sidecar as.
const INJECTED_UID: u32 = 65532;

/// This process's uid (the owner of `/proc/self`).
fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Keeps `<dir>/ssh_config`, `<dir>/ssh/known_hosts` and (pod identity) `<dir>/ssh/id_ed25519`
/// up to date with the SSH Targets of the current policy.
pub async fn write_client_files(
    dir: PathBuf,
    addr: SocketAddr,
    gw: Arc<SshGateway>,
    in_cluster: bool,
) {
    let mut last: Option<Vec<String>> = None;
    loop {
        let targets: Vec<String> = gw
            .core
            .policy
            .get()
            .map(|s| {
                s.targets
                    .iter()
                    .filter(|(_, t)| t.spec.protocol == Protocol::Ssh)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default();
        if targets.is_empty() && last.is_none() {
            last = Some(targets);
        } else if last.as_ref() != Some(&targets) {
            let token = gw.core.verifier.is_some();
            let write = || -> Result<(), String> {
                let ssh = dir.join("ssh");
                std::fs::create_dir_all(&ssh).map_err(|e| e.to_string())?;
                let host = gw
                    .host_public_key()
                    .to_openssh()
                    .map_err(|e| e.to_string())?;
                std::fs::write(
                    ssh.join("known_hosts"),
                    format!("{HOST_KEY_ALIAS} {host}\n"),
                )
                .map_err(|e| e.to_string())?;
                if !token {
                    let key_file = ssh.join("id_ed25519");
                    let _ = std::fs::remove_file(&key_file);
                    // OpenSSH accepts a key file readable by others only when another user
                    // owns it: the injected sidecar runs as uid 65532 and the agent as
                    // another user; anywhere else (a workstation, the demo) they may be the
                    // same user, and the key stays private.
                    let mode = if in_cluster && own_uid() == Some(INJECTED_UID) {
                        0o644
                    } else {
                        0o600
                    };
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(mode)
                        .open(&key_file)
                        .map_err(|e| e.to_string())?;
                    std::io::Write::write_all(&mut f, gw.agent_key_openssh()?.as_bytes())
                        .map_err(|e| e.to_string())?;
                }
                let tmp = dir.join(".ssh_config.tmp");
                std::fs::write(&tmp, ssh_config(addr, &dir, &targets, token))
                    .map_err(|e| e.to_string())?;
                std::fs::rename(&tmp, dir.join("ssh_config")).map_err(|e| e.to_string())
            };
            match write() {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), targets = ?targets, "ssh_config written")
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot write the ssh_config")
                }
            }
            last = Some(targets);
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// Accepts connections forever.
pub async fn serve(listener: TcpListener, gw: Arc<SshGateway>) {
    let config = Arc::new(gw.server_config());
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let handler = Conn {
            gw: gw.clone(),
            peer,
            agent: None,
            remote: Vec::new(),
            open: Arc::default(),
            env_seen: std::collections::HashMap::new(),
        };
        let config = config.clone();
        tokio::spawn(async move {
            match server::run_stream(config, sock, handler).await {
                Ok(session) => {
                    if let Err(e) = session.await {
                        tracing::debug!(%peer, error = %e, "SSH connection ended");
                    }
                }
                Err(e) => tracing::debug!(%peer, error = %e, "SSH handshake failed"),
            }
        });
    }
}

/// Who is on an authenticated connection, and where to.
#[derive(Debug, Clone)]
pub struct Agent {
    /// The AgentIdentity.
    pub identity: String,
    /// The SSH user name as given (`<login>@<target>` or `<target>`).
    pub user: String,
    /// The agent's address and client version.
    pub client: String,
    /// The token it authenticated with, mapped again when the policy changes (none for the
    /// pod's key).
    pub token: Option<crate::identity::Verified>,
}

/// A granted remote forwarding (`ssh -R`): the connection to the host that listens for it.
struct RemoteForward {
    address: String,
    /// The port asked for, and the one the host bound (they differ for port 0).
    ports: (u32, u32),
    conn: Arc<upstream::Connection>,
    _slot: channel::Slot,
}

/// One agent connection.
struct Conn {
    gw: Arc<SshGateway>,
    peer: SocketAddr,
    agent: Option<Agent>,
    /// The agent's granted remote forwardings.
    remote: Vec<RemoteForward>,
    /// How many session channels and forwardings are open (each holds a connection to the
    /// host): at most [`channel::MAX_OPEN`].
    open: Arc<std::sync::atomic::AtomicUsize>,
    /// Environment requests made so far, per open channel.
    env_seen: std::collections::HashMap<ChannelId, usize>,
}

impl Conn {
    fn refusal(&self, identity: Option<&str>, why: &str) {
        refusal_record(&self.gw.core, identity, "", &self.peer.to_string(), why);
    }

    /// Records a request refused on this connection once its agent is known (a forwarding,
    /// a channel past the bound), and logs it.
    fn refused(&self, why: &str) {
        tracing::info!(peer = %self.peer, %why, "an SSH request was refused");
        if let Some(a) = &self.agent {
            refusal_record(&self.gw.core, Some(&a.identity), "", &a.client, why);
        }
    }

    /// One of the connection's places for a channel or forwarding; `None` (refused and
    /// recorded) when [`channel::MAX_OPEN`] are open.
    fn slot(&mut self, what: &str) -> Option<channel::Slot> {
        // A remote forward whose host connection has ended (its grant did) holds no place.
        self.remote.retain(|f| !f.conn.is_closed());
        let slot = channel::Slot::take(&self.open);
        if slot.is_none() {
            self.refused(&format!(
                "{what} refused: the connection already has {} sessions and forwardings open",
                channel::MAX_OPEN
            ));
        }
        slot
    }

    fn authenticated(
        &mut self,
        identity: String,
        token: Option<crate::identity::Verified>,
        user: &str,
    ) -> Auth {
        self.agent = Some(Agent {
            identity,
            user: user.to_owned(),
            client: self.peer.to_string(),
            token,
        });
        Auth::Accept
    }

    fn reject() -> Auth {
        Auth::Reject {
            proceed_with_methods: None,
            partial_success: false,
        }
    }
}

/// Records a refusal outside any session (authentication, a forwarding).
pub fn refusal_record(
    core: &Gateway,
    identity: Option<&str>,
    target: &str,
    client: &str,
    why: &str,
) {
    let mut r = records::Record::new(RecordKind::Refusal, crate::clock::now());
    r.identity = identity.map(str::to_owned);
    if !target.is_empty() {
        r.target = Some(agent_text(target, 253));
    }
    r.protocol = Some(Protocol::Ssh);
    r.client = Some(agent_text(client, 256));
    r.note = Some(agent_text(why, 512));
    if let Err(e) = core.audit.admit().and_then(|()| core.audit.record(r)) {
        tracing::warn!(error = %e, "a refused SSH request could not be recorded");
    }
}

impl server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Self::reject())
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.gw.core.verifier.is_none()
            && offer.public_key.key_data() == self.gw.agent_key.public_key().key_data()
        {
            Ok(Auth::Accept)
        } else {
            Ok(Self::reject())
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let core = &self.gw.core;
        match (&core.verifier, &core.identity) {
            (None, Some(identity))
                if key.public_key.key_data() == self.gw.agent_key.public_key().key_data() =>
            {
                let identity = identity.clone();
                Ok(self.authenticated(identity, None, user))
            }
            _ => {
                self.refusal(None, "an SSH key that is not the pod's agent key");
                Ok(Self::reject())
            }
        }
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        let Some(verifier) = self.gw.core.verifier.clone() else {
            return Ok(Self::reject());
        };
        let Some(snapshot) = self.gw.core.policy.get() else {
            self.refusal(
                None,
                "policy not loaded: the token cannot be mapped to an identity",
            );
            return Ok(Self::reject());
        };
        match verifier.verify(password, &snapshot).await {
            Ok(v) => Ok(self.authenticated(v.identity.clone(), Some(v), user)),
            Err(e) => {
                self.refusal(None, &format!("agentgate refuses the token: {e}"));
                Ok(Self::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(agent) = self.agent.clone() else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        reply.accept().await;
        let Some(slot) = self.slot("a session channel") else {
            // Accepted only to say why, on stderr, with the exit status of a refusal.
            tokio::spawn(async move {
                let (_, out) = channel.split();
                let msg = format!("{}\r\n", channel::too_many_open());
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    let _ = out.extended_data_bytes(1, bytes::Bytes::from(msg)).await;
                    let _ = out.exit_status(channel::REFUSED_EXIT).await;
                    let _ = out.eof().await;
                    let _ = out.close().await;
                })
                .await;
            });
            return Ok(());
        };
        tokio::spawn(channel::run(
            self.gw.clone(),
            agent,
            channel,
            session.handle(),
            slot,
        ));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(agent) = self.agent.clone() else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let forward = channel::Forward {
            host: host_to_connect.to_owned(),
            port: port_to_connect,
            from: format!("{originator_address}:{originator_port}"),
        };
        let Some(slot) = self.slot(&format!("forward {host_to_connect}:{port_to_connect}")) else {
            // ssh shows the reason: "open failed: resource shortage".
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        };
        match channel::open_forward(&self.gw, &agent, &forward).await {
            Ok(upstream) => {
                reply.accept().await;
                tokio::spawn(channel::relay_forward(channel, upstream, slot));
            }
            Err(why) => {
                tracing::info!(identity = %agent.identity, %why, "port forwarding refused");
                reply
                    .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
            }
        }
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Only a server opens X11 channels; the agent's client has no display to offer here.
        self.refused("an X11 channel opened by the agent's client is refused (only the host opens X11 channels, with ssh -X where granted)");
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_forwarded_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refused(&format!(
            "a forwarded-tcpip channel to {host_to_connect}:{port_to_connect} opened by the agent's client is refused (only the host opens those, for ssh -R where granted)"
        ));
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        socket_path: &str,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refused(&format!(
            "forwarding to the Unix socket {socket_path} on the host (ssh -L …:/path) is refused: agentgate forwards TCP ports only, where a baseline entry or an AccessGrant sets ssh.portForwarding"
        ));
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refused(&format!(
            "a remote forwarding of the Unix socket {socket_path} on the host (ssh -R /path:…) is refused: agentgate forwards TCP ports only, where a baseline entry or an AccessGrant sets ssh.portForwarding"
        ));
        Ok(false)
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        _socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(false)
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.env_seen.remove(&channel);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Bounded (the channel's task keeps what it allows by the same rule), the first
        // refusal of a channel recorded. Within the bounds, only locale variables are passed
        // on (the channel task filters); others are dropped.
        let seen = self.env_seen.entry(channel).or_default();
        let refused = channel::env_refused(*seen, variable_name, variable_value);
        *seen += 1;
        // Past the count, only the first is recorded; each one too long is (up to the count).
        let record =
            *seen == channel::MAX_ENV + 1 || (refused.is_some() && *seen <= channel::MAX_ENV);
        match refused {
            Some(why) => {
                if record {
                    self.refused(&why);
                }
                session.channel_failure(channel)
            }
            None => session.channel_success(channel),
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Decided in the channel's task: a refusal is a message on stderr and exit status 126.
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            session.channel_success(channel)
        } else {
            if let Some(a) = &self.agent {
                let why = format!("the SSH subsystem {name:?} is not served (only sftp)");
                refusal_record(
                    &self.gw.core,
                    Some(&a.identity),
                    "",
                    &a.client,
                    &agent_text(&why, 200),
                );
            }
            session.channel_failure(channel)
        }
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Recorded by the channel's task when granted (it passes it on); here when not.
        match &self.agent {
            Some(a) if channel::may_forward(&self.gw, a, policy::SshForwarding::X11) => {
                session.channel_success(channel)
            }
            Some(a) => {
                refusal_record(
                    &self.gw.core,
                    Some(&a.identity),
                    "",
                    &a.client,
                    "X11 forwarding is refused unless a baseline entry or an AccessGrant sets ssh.x11Forwarding",
                );
                session.channel_failure(channel)
            }
            None => session.channel_failure(channel),
        }
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // Recorded by the channel's task when granted (it passes it on); here when not.
        let Some(a) = &self.agent else {
            return Ok(false);
        };
        if channel::may_forward(&self.gw, a, policy::SshForwarding::Agent) {
            return Ok(true);
        }
        refusal_record(
            &self.gw.core,
            Some(&a.identity),
            "",
            &a.client,
            "agent forwarding is refused unless a baseline entry or an AccessGrant sets ssh.agentForwarding",
        );
        Ok(false)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(agent) = self.agent.clone() else {
            return Ok(false);
        };
        let Some(slot) = self.slot(&format!("remote forward {address}:{port}")) else {
            return Ok(false);
        };
        let asked = *port;
        match channel::remote_forward(&self.gw, &agent, address, *port, session.handle()).await {
            Ok((bound, conn)) => {
                *port = bound;
                self.remote.push(RemoteForward {
                    address: address.to_owned(),
                    ports: (asked, bound),
                    conn,
                    _slot: slot,
                });
                Ok(true)
            }
            Err(why) => {
                tracing::info!(identity = %agent.identity, %why, "remote forwarding refused");
                Ok(false)
            }
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // The forward's own connection to the host is cancelled and closed; its place is
        // free again.
        let mut done = false;
        let mut kept = Vec::with_capacity(self.remote.len());
        for f in std::mem::take(&mut self.remote) {
            if f.address == address && (f.ports.0 == port || f.ports.1 == port) {
                done |= f
                    .conn
                    .cancel_tcpip_forward(address, f.ports.1)
                    .await
                    .is_ok();
                let _ = f
                    .conn
                    .disconnect(russh::Disconnect::ByApplication, "", "en")
                    .await;
            } else {
                kept.push(f);
            }
        }
        self.remote = kept;
        Ok(done)
    }

    async fn window_change_request(
        &mut self,
        _channel: ChannelId,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
}
