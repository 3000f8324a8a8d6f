//! The connection to the real database: TLS as the Target says, and authentication with
//! credentials the agent never sees (SCRAM-SHA-256, md5 or cleartext).

use std::path::Path;
use std::sync::Arc;

use agentgate_crds::target::{PostgresTarget, TlsMode};
use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::backend::{Authentication, ErrorFields, decode_authentication};
use super::frame::{Frame, MAX_MESSAGE, SSL_REQUEST, read_frame, startup_message, write_frames};

/// A byte stream, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Why the upstream connection failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP or TLS failed.
    #[error("cannot reach {addr}: {why}")]
    Connect {
        /// host:port.
        addr: String,
        /// Why.
        why: String,
    },
    /// The server does not offer TLS but the Target requires it.
    #[error("{0} does not accept TLS, but the Target requires it (spec.postgres.tls.mode)")]
    NoTls(String),
    /// The credentials are missing.
    #[error("upstream credentials: {0}")]
    Credentials(String),
    /// The server refused the gateway's login.
    #[error("the database refused agentgate's login: {0}")]
    Refused(String),
    /// The server asked for an authentication method the gateway does not speak.
    #[error("the database asks for an unsupported authentication method ({0})")]
    Method(String),
    /// The server broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// The credentials the gateway logs in with, read from the Target's Secret (mounted as files
/// `username` and `password` under the target's folder) — never from the agent.
#[derive(Clone)]
pub struct Credentials {
    /// The upstream role.
    pub username: String,
    /// Its password.
    pub password: String,
    /// The CA bundle to verify the server with, when the Target names one.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Reads `username`, `password` and (when present) the CA file from `dir`.
    pub fn from_dir(dir: &Path, ca_key: Option<&str>) -> Result<Self, UpstreamError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                .map_err(|e| {
                    UpstreamError::Credentials(format!("{}: {e}", dir.join(name).display()))
                })
        };
        let ca_pem = match ca_key {
            Some(k) => Some(std::fs::read(dir.join(k)).map_err(|e| {
                UpstreamError::Credentials(format!("{}: {e}", dir.join(k).display()))
            })?),
            None => None,
        };
        Ok(Self {
            username: read("username")?,
            password: read("password")?,
            ca_pem,
        })
    }
}

/// A Target's folder and the name of its CA file.
type CacheKey = (std::path::PathBuf, Option<String>);

/// The Targets' credentials as last read, re-read when older than `ttl`: a client that
/// connects once per command does not read three files per connection, and a rotated Secret
/// (which the kubelet itself updates in the pod within a minute or so) is seen within `ttl`.
/// A folder that cannot be read is never cached: every connection tries again.
#[derive(Debug)]
pub struct CredentialCache {
    ttl: std::time::Duration,
    read: std::sync::Mutex<std::collections::HashMap<CacheKey, (std::time::Instant, Credentials)>>,
}

impl CredentialCache {
    /// A cache whose entries are re-read after `ttl`.
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            read: Default::default(),
        }
    }

    /// [`Credentials::from_dir`], from the cache when read less than `ttl` ago.
    pub fn get(&self, dir: &Path, ca_key: Option<&str>) -> Result<Credentials, UpstreamError> {
        let key = (dir.to_path_buf(), ca_key.map(str::to_owned));
        let now = std::time::Instant::now();
        let lock = || self.read.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, c)) = lock().get(&key)
            && now.duration_since(*at) < self.ttl
        {
            return Ok(c.clone());
        }
        let fresh = Credentials::from_dir(dir, ca_key);
        let mut read = lock();
        match &fresh {
            Ok(c) => {
                read.insert(key, (now, c.clone()));
            }
            Err(_) => {
                read.remove(&key);
            }
        }
        fresh
    }
}

/// Accepts a certificate that chains to the roots whatever name it carries (`VerifyCA`).
#[derive(Debug)]
struct IgnoreName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                ..
            })) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn tls_config(mode: TlsMode, ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for c in CertificateDer::pem_slice_iter(pem) {
                let c = c.map_err(|e| UpstreamError::Credentials(format!("CA: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| UpstreamError::Credentials(format!("CA: {e}")))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let roots = Arc::new(roots);
    let builder = rustls::ClientConfig::builder();
    Ok(if mode == TlsMode::VerifyCA {
        let inner = rustls::client::WebPkiServerVerifier::builder(roots)
            .build()
            .map_err(|e| UpstreamError::Credentials(format!("CA: {e}")))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(IgnoreName(inner)))
            .with_no_client_auth()
    } else {
        builder.with_root_certificates(roots).with_no_client_auth()
    })
}

/// An authenticated upstream connection.
pub struct Upstream {
    /// The stream.
    pub stream: Box<dyn Stream>,
    /// ParameterStatus messages the server sent during startup.
    pub params: Vec<Frame>,
    /// The server's BackendKeyData (for cancel requests).
    pub key: Option<(i32, Vec<u8>)>,
    /// When the connection was opened.
    pub created: std::time::Instant,
    /// A second handle on the TCP socket under `stream`, to see whether the server closed an
    /// idle connection (it is only ever peeked at).
    pub probe: std::net::TcpStream,
    /// The thread whose event loop watches the socket.
    pub home: std::thread::ThreadId,
    /// The session's `search_path` setting and `current_user` when it was opened or last
    /// reset (`None` when they could not be read).
    pub names: Option<(String, String)>,
}

/// Connects to the Target's server and logs in; returns after the first ReadyForQuery.
pub async fn connect(
    target: &PostgresTarget,
    creds: &Credentials,
    extra_params: &[(String, String)],
) -> Result<Upstream, UpstreamError> {
    let addr = format!("{}:{}", target.host, target.port);
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|e| UpstreamError::Connect {
            addr: addr.clone(),
            why: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let probe = std::os::fd::AsFd::as_fd(&tcp)
        .try_clone_to_owned()
        .map(std::net::TcpStream::from)
        .map_err(|e| UpstreamError::Connect {
            addr: addr.clone(),
            why: e.to_string(),
        })?;
    let mut stream: Box<dyn Stream> = if target.tls.mode == TlsMode::Disable {
        Box::new(tcp)
    } else {
        let mut tcp = tcp;
        let mut req = BytesMut::new();
        req.put_i32(8);
        req.put_u32(SSL_REQUEST);
        tcp.write_all(&req)
            .await
            .map_err(|e| UpstreamError::Connect {
                addr: addr.clone(),
                why: e.to_string(),
            })?;
        let answer = tcp.read_u8().await.map_err(|e| UpstreamError::Connect {
            addr: addr.clone(),
            why: e.to_string(),
        })?;
        if answer != b'S' {
            return Err(UpstreamError::NoTls(addr));
        }
        let config = tls_config(target.tls.mode, creds.ca_pem.as_deref())?;
        let name = target
            .tls
            .server_name
            .clone()
            .unwrap_or_else(|| target.host.clone());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|e| UpstreamError::Connect {
                addr: addr.clone(),
                why: format!("server name {name}: {e}"),
            })?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|e| UpstreamError::Connect {
                addr: addr.clone(),
                why: format!("TLS: {e}"),
            })?;
        Box::new(tls)
    };
    let mut params = vec![
        ("user".to_owned(), creds.username.clone()),
        ("database".to_owned(), target.database.clone()),
    ];
    params.extend(
        extra_params
            .iter()
            .filter(|(k, _)| k != "user" && k != "database")
            .cloned(),
    );
    let startup = startup_message(0, &params);
    stream
        .write_all(&startup)
        .await
        .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
    stream
        .flush()
        .await
        .map_err(|e| UpstreamError::Protocol(e.to_string()))?;

    let mut scram: Option<ScramSha256> = None;
    let mut out = Upstream {
        stream,
        params: Vec::new(),
        key: None,
        created: std::time::Instant::now(),
        probe,
        home: std::thread::current().id(),
        names: None,
    };
    loop {
        let frame = read_frame(&mut out.stream, MAX_MESSAGE)
            .await
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?
            .ok_or_else(|| {
                UpstreamError::Protocol("the server closed the connection during login".into())
            })?;
        match frame.tag {
            b'R' => {
                let auth = decode_authentication(&frame)
                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                let reply = match auth {
                    Authentication::Ok => None,
                    Authentication::Cleartext => {
                        let mut b = BytesMut::new();
                        super::frame::put_cstring(&mut b, &creds.password);
                        Some(Frame::new(b'p', b.freeze()))
                    }
                    Authentication::Md5(salt) => {
                        let hash = postgres_protocol::authentication::md5_hash(
                            creds.username.as_bytes(),
                            creds.password.as_bytes(),
                            salt,
                        );
                        let mut b = BytesMut::new();
                        super::frame::put_cstring(&mut b, &hash);
                        Some(Frame::new(b'p', b.freeze()))
                    }
                    Authentication::Sasl(mechs) => {
                        if !mechs.iter().any(|m| m == "SCRAM-SHA-256") {
                            return Err(UpstreamError::Method(mechs.join(", ")));
                        }
                        let s = ScramSha256::new(
                            creds.password.as_bytes(),
                            ChannelBinding::unsupported(),
                        );
                        let mut b = BytesMut::new();
                        super::frame::put_cstring(&mut b, "SCRAM-SHA-256");
                        b.put_i32(s.message().len() as i32);
                        b.put_slice(s.message());
                        scram = Some(s);
                        Some(Frame::new(b'p', b.freeze()))
                    }
                    Authentication::SaslContinue(data) => {
                        let s = scram.as_mut().ok_or_else(|| {
                            UpstreamError::Protocol("SASL continue without SASL".into())
                        })?;
                        s.update(&data)
                            .map_err(|e| UpstreamError::Refused(e.to_string()))?;
                        Some(Frame::new(b'p', Bytes::copy_from_slice(s.message())))
                    }
                    Authentication::SaslFinal(data) => {
                        let s = scram.as_mut().ok_or_else(|| {
                            UpstreamError::Protocol("SASL final without SASL".into())
                        })?;
                        // Verifies the server's signature: a server that does not know the
                        // password cannot pretend to.
                        s.finish(&data).map_err(|e| {
                            UpstreamError::Refused(format!(
                                "the server's SCRAM signature is wrong: {e}"
                            ))
                        })?;
                        None
                    }
                    Authentication::Other(n) => {
                        return Err(UpstreamError::Method(format!("code {n}")));
                    }
                };
                if let Some(r) = reply {
                    write_frames(&mut out.stream, &[r])
                        .await
                        .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                }
            }
            b'S' => out.params.push(frame),
            b'K' => {
                let mut b = frame.body.clone();
                let pid = super::frame::get_i32(&mut b, "BackendKeyData")
                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                out.key = Some((pid, b.to_vec()));
            }
            b'N' => {}
            b'Z' => return Ok(out),
            b'E' => {
                let e = ErrorFields::decode(&frame)
                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                return Err(UpstreamError::Refused(format!(
                    "{} ({})",
                    e.message, e.code
                )));
            }
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message {:?} during login",
                    other as char
                )));
            }
        }
    }
}

/// Sends a CancelRequest for `key` to the Target's server.
pub async fn cancel(target: &PostgresTarget, key: &(i32, Vec<u8>)) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
    let mut b = BytesMut::new();
    b.put_i32(12 + key.1.len() as i32);
    b.put_u32(super::frame::CANCEL_REQUEST);
    b.put_i32(key.0);
    b.put_slice(&key.1);
    tcp.write_all(&b).await?;
    tcp.shutdown().await
}
