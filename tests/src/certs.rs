//! A throwaway certificate authority for one environment.

use std::net::{IpAddr, Ipv4Addr};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use crate::Error;

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Clone, Debug)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// The private key.
    pub key: String,
}

/// A CA that signs the serving and client certificates of one test environment.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    /// A new CA with a fresh P-256 key.
    pub fn new(name: &str) -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = dn(name, None);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(cert_err)?;
        Ok(Self { issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A serving certificate for `127.0.0.1`, `::1` and `localhost` plus `extra_dns` names.
    pub fn server(&self, name: &str, extra_dns: &[&str]) -> Result<Pem, Error> {
        let mut sans = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress("::1".parse().map_err(|_| Error::Cert("::1".into()))?),
            SanType::DnsName("localhost".try_into().map_err(cert_err)?),
        ];
        for d in extra_dns {
            sans.push(SanType::DnsName((*d).try_into().map_err(cert_err)?));
        }
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params.subject_alt_names = sans;
        params.distinguished_name = dn(name, None);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate for user `cn` in the groups `orgs` (Kubernetes reads O as groups).
    pub fn client(&self, cn: &str, orgs: &[&str]) -> Result<Pem, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        let mut name = dn(cn, None);
        for o in orgs {
            name.push(DnType::OrganizationName, *o);
        }
        params.distinguished_name = name;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<Pem, Error> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// A fresh P-256 key pair as PEM `(private PKCS#8, public SPKI)`, e.g. for service-account
/// token signing.
pub fn signing_key_pem() -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(cert_err)?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

fn dn(cn: &str, o: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = o {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

fn cert_err(e: impl std::fmt::Display) -> Error {
    Error::Cert(e.to_string())
}
