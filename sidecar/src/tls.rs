//! TLS client configuration shared by the sidecar's HTTPS clients (issuers' keys, audit sinks).

use std::path::Path;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A client configuration trusting the system's roots plus the PEM certificates in `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(p) = extra_ca {
        let pem = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        for c in CertificateDer::pem_slice_iter(&pem) {
            roots
                .add(c.map_err(|e| format!("{}: {e}", p.display()))?)
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}
