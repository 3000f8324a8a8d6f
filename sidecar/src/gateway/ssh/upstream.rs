//! The SSH connection to a Target host: its host key checked against the Target's
//! `knownHosts` (never trusted on first use), and a login with the key (or certificate) from
//! the Target's Secret, which the agent never sees.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate_crds::target::SshTarget;
use russh::cipher;
use russh::client;
use russh::keys::ssh_key::known_hosts::{Entry, HostPatterns, KnownHosts, Marker};
use russh::keys::ssh_key::{Certificate, PublicKey, certificate::CertType};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};

/// The ciphers the gateway offers the host, in its order of preference (as the client, its
/// order decides): AES-GCM first, which aws-lc runs on the CPU's AES and carry-less multiply
/// instructions, ahead of ChaCha20-Poly1305 (russh's first choice); the rest as russh orders
/// them. Every byte of a session is encrypted twice through the gateway (agent to gateway,
/// gateway to host), so the cipher is most of what an `scp` costs it.
const UPSTREAM_CIPHERS: &[cipher::Name] = &[
    cipher::AES_256_GCM,
    cipher::AES_128_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_CTR,
    cipher::AES_192_CTR,
    cipher::AES_128_CTR,
];

/// How long connecting and logging in to a host may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The entries of a `known_hosts` text that can vouch for `host:port`.
#[derive(Debug, Clone)]
pub struct KnownHostKeys {
    /// `host` on port 22, `[host]:port` otherwise: what patterns are compared with.
    name: String,
    /// Plain keys listed for the host.
    keys: Vec<PublicKey>,
    /// Certificate authorities (`@cert-authority`) trusted to sign the host's certificate.
    authorities: Vec<PublicKey>,
    /// Keys listed as `@revoked`.
    revoked: Vec<PublicKey>,
    /// The host name certificates must name.
    host: String,
}

impl KnownHostKeys {
    /// Reads the lines of `text` that match `host`:`port`; unreadable lines are skipped.
    pub fn parse(text: &str, host: &str, port: u16) -> Self {
        let name = if port == 22 {
            host.to_owned()
        } else {
            format!("[{host}]:{port}")
        };
        let mut out = Self {
            name,
            keys: Vec::new(),
            authorities: Vec::new(),
            revoked: Vec::new(),
            host: host.to_owned(),
        };
        for entry in KnownHosts::new(text).flatten() {
            // A revoked key is revoked whatever host it is listed for.
            if matches!(entry.marker(), Some(Marker::Revoked)) {
                out.revoked.push(entry.public_key().clone());
                continue;
            }
            if !out.matches(&entry) {
                continue;
            }
            match entry.marker() {
                Some(Marker::CertAuthority) => out.authorities.push(entry.public_key().clone()),
                _ => out.keys.push(entry.public_key().clone()),
            }
        }
        out
    }

    fn matches(&self, entry: &Entry) -> bool {
        match entry.host_patterns() {
            HostPatterns::Patterns(patterns) => {
                let mut hit = false;
                for p in patterns {
                    if let Some(negated) = p.strip_prefix('!') {
                        if host_glob(negated, &self.name) || host_glob(negated, &self.host) {
                            return false;
                        }
                    } else if host_glob(p, &self.name)
                        || (!self.name.starts_with('[') && host_glob(p, &self.host))
                    {
                        hit = true;
                    }
                }
                hit
            }
            HostPatterns::HashedName { salt, hash } => {
                let key =
                    aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
                aws_lc_rs::hmac::verify(&key, self.name.as_bytes(), hash).is_ok()
            }
        }
    }

    /// Whether nothing vouches for the host.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.authorities.is_empty()
    }

    /// Checks the key (or certificate) the host presented: `Err` says why it is refused.
    pub fn check(&self, presented: &russh::keys::PublicKeyOrCertificate) -> Result<(), String> {
        match presented {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => {
                if self.revoked.iter().any(|r| r.key_data() == key.key_data()) {
                    return Err("the host presented a key listed as @revoked".into());
                }
                if self.keys.iter().any(|k| k.key_data() == key.key_data()) {
                    Ok(())
                } else {
                    Err(format!(
                        "the host key of {} ({} {}) is not in the Target's knownHosts: agentgate never trusts a host key on first use; if the host is right, add its key to the Target (ssh-keyscan, checked out of band)",
                        self.name,
                        key.algorithm().as_str(),
                        key.fingerprint(Default::default())
                    ))
                }
            }
            russh::keys::PublicKeyOrCertificate::Certificate(cert) => self.check_certificate(cert),
        }
    }

    fn check_certificate(&self, cert: &Certificate) -> Result<(), String> {
        if cert.cert_type() != CertType::Host {
            return Err("the host presented a user certificate as its host key".into());
        }
        let signer = cert.signature_key();
        if self.revoked.iter().any(|r| r.key_data() == signer)
            || self
                .revoked
                .iter()
                .any(|r| r.key_data() == cert.public_key())
        {
            return Err("the host's certificate or its authority is @revoked".into());
        }
        if !self.authorities.iter().any(|a| a.key_data() == signer) {
            return Err(format!(
                "the host certificate of {} is signed by an authority the Target's knownHosts does not list (@cert-authority)",
                self.name
            ));
        }
        let fingerprints: Vec<_> = self
            .authorities
            .iter()
            .map(|a| a.fingerprint(Default::default()))
            .collect();
        let now = u64::try_from(crate::clock::now().as_second()).unwrap_or(0);
        cert.validate_at(now, &fingerprints)
            .map_err(|e| format!("the host certificate is not valid: {e}"))?;
        // As OpenSSH: a host certificate must name the host (no principals names none).
        let principals = cert.valid_principals();
        if !principals.iter().any(|p| p == &self.host) {
            return Err(format!(
                "the host certificate does not name {} among its principals",
                self.host
            ));
        }
        Ok(())
    }
}

/// OpenSSH's host pattern glob: `*` any run, `?` one character, case-insensitive.
fn host_glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let n: Vec<char> = name.to_lowercase().chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut back: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            back = Some((pi, ni));
            pi += 1;
        } else if let Some((bp, bn)) = back {
            pi = bp + 1;
            ni = bn + 1;
            back = Some((bp, bn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Decides and records each connection the host opens back towards the agent (one a
/// remote forward carries, an agent or X11 forwarding's), as it opens and as it ends.
pub trait BackLog: Send + Sync {
    /// Decides and records one connection of forwarding `kind` (`what` says what it is):
    /// `Ok` with its request's number when it may pass, `Err` with why not (then it is
    /// refused, the refusal recorded).
    fn opened(&self, kind: crate::policy::SshForwarding, what: &str) -> Result<u64, String>;
    /// Records how the connection of request `id` ended: the bytes that passed each way
    /// (agent to host, host to agent) and what went wrong, if anything.
    fn closed(&self, id: u64, started: Instant, bytes: (u64, u64), error: Option<String>);
}

/// What the host may open back towards the agent, each only when granted (by default it may
/// open nothing: a channel the host opens is refused).
#[derive(Clone, Default)]
pub struct Back {
    /// The agent's connection, to open the channels on.
    pub agent: Option<russh::server::Handle>,
    /// The host may use the agent's SSH agent (`ssh -A`).
    pub agent_forwarding: bool,
    /// The host may open X11 channels (`ssh -X`).
    pub x11: bool,
    /// The host may pass connections to a remote forwarding (`ssh -R`).
    pub remote: bool,
    /// Where each connection is decided again and recorded; none: they pass unrecorded.
    pub log: Option<Arc<dyn BackLog>>,
}

/// The client side of the connection to the host.
pub struct HostCheck {
    known: KnownHostKeys,
    refused: Arc<Mutex<Option<String>>>,
    back: Back,
}

/// Refuses a channel the host opened that nothing was granted for.
async fn refuse_back(reply: client::ChannelOpenHandle) {
    reply
        .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
        .await;
}

/// Joins a channel the host opened with one opened towards the agent, counting what
/// passes; records the end of request `id` with `log`.
async fn join(
    host: russh::Channel<client::Msg>,
    agent: russh::Channel<russh::server::Msg>,
    logged: Option<(Arc<dyn BackLog>, u64)>,
) {
    let started = Instant::now();
    let (from_agent, from_host) = (Arc::default(), Arc::default());
    let mut h = super::channel::ReadCounter::new(host.into_stream(), Arc::clone(&from_host));
    let mut a = super::channel::ReadCounter::new(agent.into_stream(), Arc::clone(&from_agent));
    let error = tokio::io::copy_bidirectional(&mut h, &mut a)
        .await
        .err()
        .map(|e| e.to_string());
    if let Some((log, id)) = logged {
        let bytes = (
            from_agent.load(std::sync::atomic::Ordering::Relaxed),
            from_host.load(std::sync::atomic::Ordering::Relaxed),
        );
        log.closed(id, started, bytes, error);
    }
}

/// Answers a channel the host opened: joined with `towards_agent` when the forwarding is
/// granted (and, with a log, decided again and recorded) and the agent's side opened,
/// refused otherwise.
async fn open_back(
    (granted, kind, what): (bool, crate::policy::SshForwarding, String),
    log: Option<Arc<dyn BackLog>>,
    towards_agent: impl std::future::Future<
        Output = Result<russh::Channel<russh::server::Msg>, russh::Error>,
    >,
    channel: russh::Channel<client::Msg>,
    reply: client::ChannelOpenHandle,
) {
    if !granted {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        return;
    }
    let logged = match &log {
        Some(log) => match log.opened(kind, &what) {
            Ok(id) => Some((log.clone(), id)),
            Err(why) => {
                tracing::info!(%what, %why, "a connection the host opened back was refused");
                reply
                    .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                return;
            }
        },
        None => None,
    };
    match towards_agent.await {
        Ok(to_agent) => {
            reply.accept().await;
            tokio::spawn(join(channel, to_agent, logged));
        }
        Err(e) => {
            if let Some((log, id)) = logged {
                log.closed(
                    id,
                    Instant::now(),
                    (0, 0),
                    Some(format!("the agent's side did not open: {e}")),
                );
            }
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
        }
    }
}

impl client::Handler for HostCheck {
    type Error = russh::Error;

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let ask = (
            self.back.agent_forwarding,
            crate::policy::SshForwarding::Agent,
            "agent forwarding connection".to_owned(),
        );
        match &self.back.agent {
            Some(agent) => {
                open_back(
                    ask,
                    self.back.log.clone(),
                    agent.channel_open_agent(),
                    channel,
                    reply,
                )
                .await
            }
            None => refuse_back(reply).await,
        }
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        channel: russh::Channel<client::Msg>,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let ask = (
            self.back.x11,
            crate::policy::SshForwarding::X11,
            format!("X11 connection from {originator_address}:{originator_port}"),
        );
        match &self.back.agent {
            Some(agent) => {
                open_back(
                    ask,
                    self.back.log.clone(),
                    agent.channel_open_x11(originator_address, originator_port),
                    channel,
                    reply,
                )
                .await
            }
            None => refuse_back(reply).await,
        }
        Ok(())
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let ask = (
            self.back.remote,
            crate::policy::SshForwarding::Port,
            format!(
                "forwarded connection to {connected_address}:{connected_port} from {originator_address}:{originator_port}"
            ),
        );
        match &self.back.agent {
            Some(agent) => {
                open_back(
                    ask,
                    self.back.log.clone(),
                    agent.channel_open_forwarded_tcpip(
                        connected_address,
                        connected_port,
                        originator_address,
                        originator_port,
                    ),
                    channel,
                    reply,
                )
                .await
            }
            None => refuse_back(reply).await,
        }
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match self.known.check(key) {
            Ok(()) => Ok(true),
            Err(why) => {
                if let Ok(mut r) = self.refused.lock() {
                    *r = Some(why);
                }
                Ok(false)
            }
        }
    }
}

/// A logged-in connection to a host.
pub type Connection = client::Handle<HostCheck>;

/// Connects to the Target's host as `login`, with the credentials mounted under `dir`
/// (`ssh-privatekey`, optionally `ssh-certificate`).
pub async fn connect(
    target: &SshTarget,
    dir: &Path,
    login: &str,
    back: Back,
) -> Result<Connection, String> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect_inner(target, dir, login, back))
        .await
        .map_err(|_| {
            format!(
                "{}:{} did not answer within {} s",
                target.host,
                target.port,
                CONNECT_TIMEOUT.as_secs()
            )
        })?
}

async fn connect_inner(
    target: &SshTarget,
    dir: &Path,
    login: &str,
    back: Back,
) -> Result<Connection, String> {
    let known = KnownHostKeys::parse(&target.known_hosts, &target.host, target.port);
    if known.is_empty() {
        return Err(format!(
            "the Target's knownHosts lists no key for {}:{}, so its host cannot be verified",
            target.host, target.port
        ));
    }
    let key_text = std::fs::read_to_string(dir.join("ssh-privatekey")).map_err(|e| {
        format!(
            "cannot read the Target's private key ({}): {e}",
            dir.join("ssh-privatekey").display()
        )
    })?;
    let key: PrivateKey = russh::keys::decode_secret_key(&key_text, None)
        .map_err(|e| format!("the Target's private key cannot be read: {e}"))?;
    let key = Arc::new(key);
    let cert = match std::fs::read_to_string(dir.join("ssh-certificate")) {
        Ok(text) if !text.trim().is_empty() => Some(
            Certificate::from_openssh(text.trim())
                .map_err(|e| format!("the Target's certificate cannot be read: {e}"))?,
        ),
        _ => None,
    };
    let refused = Arc::new(Mutex::new(None));
    let handler = HostCheck {
        known,
        refused: refused.clone(),
        back,
    };
    let config = Arc::new(client::Config {
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(UPSTREAM_CIPHERS),
            ..Default::default()
        },
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        window_size: 8 << 20,
        maximum_packet_size: 65535,
        ..Default::default()
    });
    let mut handle =
        match client::connect(config, (target.host.as_str(), target.port), handler).await {
            Ok(h) => h,
            Err(e) => {
                let why = refused.lock().ok().and_then(|mut r| r.take());
                return Err(why.unwrap_or_else(|| {
                    format!("cannot connect to {}:{}: {e}", target.host, target.port)
                }));
            }
        };
    let result = match cert {
        Some(cert) => handle
            .authenticate_openssh_cert(login, key.clone(), cert)
            .await
            .map_err(|e| e.to_string())?,
        None => {
            let hash = handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| e.to_string())?
                .flatten();
            handle
                .authenticate_publickey(login, PrivateKeyWithHashAlg::new(key, hash))
                .await
                .map_err(|e| e.to_string())?
        }
    };
    if !result.success() {
        return Err(format!(
            "{}:{} refused agentgate's key for login {login}: the Target's key must be in that user's authorized_keys",
            target.host, target.port
        ));
    }
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    fn presented(line: &str) -> russh::keys::PublicKeyOrCertificate {
        russh::keys::PublicKeyOrCertificate::PublicKey {
            key: PublicKey::from_openssh(line).unwrap_or_else(|e| panic!("{e}")),
            hash_alg: None,
        }
    }

    #[test]
    fn a_listed_key_on_a_port_passes_and_others_do_not() {
        let text = format!("[10.0.0.5]:2222 {KEY_A}\n");
        let k = KnownHostKeys::parse(&text, "10.0.0.5", 2222);
        assert!(k.check(&presented(KEY_A)).is_ok());
        // Another port, another host: nothing vouches.
        assert!(KnownHostKeys::parse(&text, "10.0.0.5", 22).is_empty());
        assert!(KnownHostKeys::parse(&text, "10.0.0.6", 2222).is_empty());
    }

    #[test]
    fn globs_negations_and_revocations() {
        let text = format!("*.example.com,!bad.example.com {KEY_A}\n");
        assert!(!KnownHostKeys::parse(&text, "web.example.com", 22).is_empty());
        assert!(KnownHostKeys::parse(&text, "bad.example.com", 22).is_empty());
        let revoked = format!("web.example.com {KEY_A}\n@revoked * {KEY_A}\n");
        let k = KnownHostKeys::parse(&revoked, "web.example.com", 22);
        assert!(k.check(&presented(KEY_A)).is_err());
    }

    #[test]
    fn hashed_host_names() {
        // `ssh-keygen -H` form of "web.example.com".
        let salt = [7u8; 20];
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
        let tag = aws_lc_rs::hmac::sign(&key, b"web.example.com");
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD;
        let text = format!("|1|{}|{} {KEY_A}\n", b.encode(salt), b.encode(tag.as_ref()));
        assert!(!KnownHostKeys::parse(&text, "web.example.com", 22).is_empty());
        assert!(KnownHostKeys::parse(&text, "db.example.com", 22).is_empty());
    }
}
