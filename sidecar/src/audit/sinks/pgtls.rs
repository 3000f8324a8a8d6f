//! Connections to the audit database, for the PostgreSQL sink and for the CLI that reads it:
//! tokio-postgres's TLS hooks over rustls, with the server's certificate verified for the host
//! it connects to (system roots plus `--audit-ca-file`).
//!
//! Unless the connection string says `sslmode=disable`, a connection over the network is TLS:
//! `require`, `prefer` (the default), `verify-ca` and `verify-full` all mean what libpq's
//! `verify-full` does, and a server that does not offer TLS gets nothing. A Unix socket
//! (local) is used as it is.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, NoTls};

/// The connection string with libpq's `sslmode=verify-ca` and `verify-full` (which
/// tokio-postgres does not parse) as `require`: the certificate and its name are verified
/// whatever the mode. `sslrootcert` is not read: the CA is `ca_file`.
fn tls_modes(conninfo: &str) -> String {
    conninfo
        .replace("sslmode=verify-full", "sslmode=require")
        .replace("sslmode=verify-ca", "sslmode=require")
}

/// Connects to `conninfo` (libpq key=value or URL form), over verified TLS unless it says
/// `sslmode=disable` or names a Unix socket; `ca_file` adds CA certificates (PEM) to the
/// system's. The connection runs on a task of its own. The error says why, with its causes
/// (`connect: error performing TLS handshake: invalid peer certificate: UnknownIssuer`), and
/// never the connection string (it may carry a password).
pub async fn connect(conninfo: &str, ca_file: Option<&Path>) -> Result<Client, String> {
    let mut config: tokio_postgres::Config =
        tls_modes(conninfo)
            .parse()
            .map_err(|e: tokio_postgres::Error| {
                format!(
                    "the connection string: {e}{}",
                    std::error::Error::source(&e)
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default()
                )
            })?;
    // Over the network, plaintext only when asked for: `prefer` would go on in plaintext with
    // a server (or someone in between) that answers it has no TLS. A Unix socket is local
    // (and PostgreSQL offers no TLS on it).
    let networked = config
        .get_hosts()
        .iter()
        .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)))
        || !config.get_hostaddrs().is_empty();
    if config.get_ssl_mode() == SslMode::Prefer && networked {
        config.ssl_mode(SslMode::Require);
    }
    let failed = |e: tokio_postgres::Error| {
        let why = match e.as_db_error() {
            Some(d) => d.message().to_owned(),
            None => {
                let mut why = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    why.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                why
            }
        };
        format!("connect: {why}")
    };
    let ended = |r: Result<(), tokio_postgres::Error>| {
        if let Err(e) = r {
            tracing::debug!(error = %e, "audit database connection ended");
        }
    };
    Ok(if config.get_ssl_mode() == SslMode::Disable {
        let (client, conn) = config.connect(NoTls).await.map_err(failed)?;
        tokio::spawn(async move { ended(conn.await) });
        client
    } else {
        let tls = MakeRustls::new(crate::tls::client_config(ca_file)?);
        let (client, conn) = config.connect(tls).await.map_err(failed)?;
        tokio::spawn(async move { ended(conn.await) });
        client
    })
}

/// Makes verified TLS connections for tokio-postgres.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
}

impl MakeRustls {
    /// TLS with `config` (its roots decide which servers are trusted).
    pub fn new(mut config: rustls::ClientConfig) -> Self {
        // What PostgreSQL 17 asks for with direct TLS negotiation.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Self {
            config: Arc::new(config),
        }
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<Connect> {
        // Called for every connection, also a Unix socket's (no name): the name is checked
        // only when a handshake happens.
        Ok(Connect {
            config: self.config.clone(),
            domain: domain.to_owned(),
        })
    }
}

/// One connection's TLS handshake.
pub struct Connect {
    config: Arc<rustls::ClientConfig>,
    domain: String,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = ServerName::try_from(self.domain).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("no host name to verify the server's certificate for: {e}"),
                )
            })?;
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await?;
            Ok(Stream(Box::new(tls)))
        })
    }
}

/// A TLS connection to the audit database.
pub struct Stream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding (the certificate is verified instead).
        ChannelBinding::none()
    }
}
