//! A tiny blocking HTTP(S) GET for readiness probes, without a client library.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::Error;

/// A status code and body.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The body (chunked encoding is not decoded).
    pub body: String,
}

/// TLS material for [`get_tls`].
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

impl TlsClient {
    /// A client that trusts `ca_pem` and, when given, presents a client certificate.
    pub fn new(ca_pem: &str, client: Option<(&str, &str)>) -> Result<Self, Error> {
        crate::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| Error::Cert(format!("CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Cert(format!("CA certificate: {e}")))?;
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => {
                let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::Cert(format!("client certificate PEM: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                    .map_err(|e| Error::Cert(format!("client key PEM: {e}")))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| Error::Cert(format!("client certificate: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// GET `https://127.0.0.1:port{path}`.
    pub fn get(&self, port: u16, path: &str) -> Result<Response, Error> {
        let server = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let conn = rustls::ClientConnection::new(self.config.clone(), server)
            .map_err(|e| Error::Cert(format!("TLS: {e}")))?;
        let sock = connect(port)?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        exchange(&mut tls, port, path)
    }
}

/// GET `http://127.0.0.1:port{path}`.
pub fn get(port: u16, path: &str) -> Result<Response, Error> {
    let mut sock = connect(port)?;
    exchange(&mut sock, port, path)
}

fn connect(port: u16) -> Result<TcpStream, Error> {
    let sock = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .map_err(|e| Error::io(format!("connect to 127.0.0.1:{port}"), e))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| Error::io("set a read timeout", e))?;
    Ok(sock)
}

fn exchange(stream: &mut (impl Read + Write), port: u16, path: &str) -> Result<Response, Error> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .map_err(|e| Error::io(format!("send GET {path}"), e))?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // Servers that close without close_notify: keep what arrived.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(Error::io(format!("read the answer to GET {path}"), e)),
    }
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Http(format!("no HTTP status in the answer to GET {path}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok(Response { status, body })
}
