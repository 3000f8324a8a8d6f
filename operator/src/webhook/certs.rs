//! The webhook's serving certificate.
//!
//! Self-managed mode: the operator keeps a CA and a serving certificate in a Secret of its
//! namespace (so every replica serves the same one), writes the CA into the `caBundle` of its
//! webhook configurations, and renews the certificate when a third of its lifetime remains.
//! Files mode (cert-manager): it serves `tls.crt`/`tls.key` from a folder and reloads them
//! when they change; cert-manager's CA injector keeps `caBundle` current.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::ObjectMeta;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::aws_lc_rs::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

const NOT_AFTER: &str = "agentgate.dev/not-after";
const CA_NOT_AFTER: &str = "agentgate.dev/ca-not-after";
const HOSTS: &str = "agentgate.dev/hosts";

/// The certificate the webhook server presents; swapped in place on renewal.
#[derive(Debug, Default)]
pub struct CertStore {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CertStore {
    /// Loads a PEM certificate chain and key.
    pub fn load(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<()> {
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Cert(format!("serving certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| Error::Cert(format!("serving key: {e}")))?;
        let key = any_supported_type(&key).map_err(|e| Error::Cert(format!("serving key: {e}")))?;
        let ck = Arc::new(CertifiedKey::new(certs, key));
        if let Ok(mut cur) = self.current.write() {
            *cur = Some(ck);
        }
        Ok(())
    }

    /// Whether a certificate is loaded.
    pub fn ready(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().and_then(|c| c.clone())
    }
}

/// The names the serving certificate must carry.
pub fn hosts(config: &Config) -> Vec<String> {
    let svc = &config.webhook_service;
    let ns = &config.namespace;
    let mut hosts = vec![
        svc.clone(),
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.cluster.local"),
    ];
    hosts.extend(config.webhook_hosts.iter().cloned());
    hosts
}

struct Generated {
    ca_cert: String,
    ca_key: String,
    cert: String,
    key: String,
    not_after: Timestamp,
    ca_not_after: Timestamp,
}

fn odt(t: Timestamp) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(t.as_second()).map_err(|e| Error::Cert(e.to_string()))
}

fn rc(e: rcgen::Error) -> Error {
    Error::Cert(e.to_string())
}

/// A new serving certificate for `hosts`, signed by the given CA or by a new one.
fn generate(
    hosts: &[String],
    validity: Duration,
    ca: Option<(&str, &str, Timestamp)>,
) -> Result<Generated> {
    let now = Timestamp::now();
    let validity = SignedDuration::try_from(validity).map_err(|e| Error::Cert(e.to_string()))?;
    let (issuer, ca_key_pem, ca_cert, ca_not_after) = match ca {
        Some((cert, key, not_after)) => {
            let kp = KeyPair::from_pem(key).map_err(rc)?;
            let issuer = Issuer::from_ca_cert_pem(cert, kp).map_err(rc)?;
            (issuer, key.to_owned(), cert.to_owned(), not_after)
        }
        None => {
            let key = KeyPair::generate().map_err(rc)?;
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "agentgate webhook CA");
            params.distinguished_name = dn;
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            // (Checked: the validity comes from configuration.)
            let ca_not_after = validity
                .checked_mul(4)
                .and_then(|v| now.checked_add(v).ok())
                .ok_or_else(|| {
                    Error::Cert(format!(
                        "a CA valid four times {validity} from now ends past the year 9999: lower --webhook-cert-validity"
                    ))
                })?;
            params.not_before = odt(now - SignedDuration::from_mins(5))?;
            params.not_after = odt(ca_not_after)?;
            let cert = params.self_signed(&key).map_err(rc)?.pem();
            let key_pem = key.serialize_pem();
            (Issuer::new(params, key), key_pem, cert, ca_not_after)
        }
    };
    let key = KeyPair::generate().map_err(rc)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        hosts.first().cloned().unwrap_or_default(),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = hosts
        .iter()
        .map(|h| match h.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(h.as_str().try_into().map_err(rc)?)),
        })
        .collect::<Result<Vec<_>>>()?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let not_after = now
        .checked_add(validity)
        .map_err(|e| Error::Cert(format!("certificate validity {validity}: {e}")))?
        .min(ca_not_after);
    params.not_before = odt(now - SignedDuration::from_mins(5))?;
    params.not_after = odt(not_after)?;
    let cert = params.signed_by(&key, &issuer).map_err(rc)?;
    Ok(Generated {
        ca_cert,
        ca_key: ca_key_pem,
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after,
        ca_not_after,
    })
}

fn get(data: &BTreeMap<String, ByteString>, k: &str) -> Option<String> {
    data.get(k)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}

/// Reads or creates the certificate Secret, renewing it when due; returns (ca, cert, key).
async fn ensure_secret(client: &Client, config: &Config) -> Result<(String, String, String)> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let hosts = hosts(config);
    let hosts_joined = hosts.join(",");
    let now = Timestamp::now();
    let validity = SignedDuration::try_from(config.webhook_cert_validity)
        .unwrap_or(SignedDuration::from_hours(720));
    let existing = api.get_opt(&config.webhook_cert_secret).await?;
    if let Some(s) = &existing {
        let ann = s.metadata.annotations.clone().unwrap_or_default();
        let data = s.data.clone().unwrap_or_default();
        let not_after: Option<Timestamp> = ann.get(NOT_AFTER).and_then(|t| t.parse().ok());
        // (Checked: the annotation is read from the Secret.)
        let fresh = not_after.is_some_and(|na| na.checked_sub(validity / 3).is_ok_and(|t| t > now));
        if fresh
            && ann.get(HOSTS) == Some(&hosts_joined)
            && let (Some(ca), Some(cert), Some(key)) = (
                get(&data, "ca.crt"),
                get(&data, "tls.crt"),
                get(&data, "tls.key"),
            )
        {
            return Ok((ca, cert, key));
        }
    }
    // Renew: keep the CA while it has a full certificate lifetime left, so clients that
    // cached the old bundle keep working.
    let old_ca = existing.as_ref().and_then(|s| {
        let ann = s.metadata.annotations.clone().unwrap_or_default();
        let data = s.data.clone().unwrap_or_default();
        let ca_not_after: Timestamp = ann.get(CA_NOT_AFTER)?.parse().ok()?;
        (ca_not_after - validity > now).then_some((
            get(&data, "ca.crt")?,
            get(&data, "ca.key")?,
            ca_not_after,
        ))
    });
    let g = generate(
        &hosts,
        config.webhook_cert_validity,
        old_ca
            .as_ref()
            .map(|(c, k, t)| (c.as_str(), k.as_str(), *t)),
    )?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(config.webhook_cert_secret.clone()),
            namespace: Some(config.namespace.clone()),
            annotations: Some(BTreeMap::from([
                (NOT_AFTER.to_owned(), g.not_after.to_string()),
                (CA_NOT_AFTER.to_owned(), g.ca_not_after.to_string()),
                (HOSTS.to_owned(), hosts_joined),
            ])),
            resource_version: existing
                .as_ref()
                .and_then(|s| s.metadata.resource_version.clone()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (
                "ca.crt".to_owned(),
                ByteString(g.ca_cert.clone().into_bytes()),
            ),
            ("ca.key".to_owned(), ByteString(g.ca_key.into_bytes())),
            (
                "tls.crt".to_owned(),
                ByteString(g.cert.clone().into_bytes()),
            ),
            ("tls.key".to_owned(), ByteString(g.key.clone().into_bytes())),
        ])),
        ..Default::default()
    };
    let written = match &existing {
        None => api.create(&PostParams::default(), &secret).await,
        Some(_) => {
            api.replace(&config.webhook_cert_secret, &PostParams::default(), &secret)
                .await
        }
    };
    match written {
        Ok(_) => {
            tracing::info!(secret = %config.webhook_cert_secret, not_after = %g.not_after, "issued a webhook serving certificate");
            Ok((g.ca_cert, g.cert, g.key))
        }
        // Another replica wrote it first: use theirs.
        Err(kube::Error::Api(s)) if s.code == 409 => Box::pin(ensure_secret(client, config)).await,
        Err(e) => Err(e.into()),
    }
}

/// Writes `ca` into the caBundle of every webhook of both configurations (when they exist).
pub async fn patch_ca_bundles(client: &Client, config: &Config, ca: &str) -> Result<()> {
    let bundle = ByteString(ca.as_bytes().to_vec());
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    if let Some(mut m) = mutating.get_opt(&config.mutating_webhook).await? {
        let mut changed = false;
        for w in m.webhooks.iter_mut().flatten() {
            if w.client_config.ca_bundle.as_ref() != Some(&bundle) {
                w.client_config.ca_bundle = Some(bundle.clone());
                changed = true;
            }
        }
        if changed {
            let patch = serde_json::json!({ "webhooks": m.webhooks });
            mutating
                .patch(
                    &config.mutating_webhook,
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                )
                .await?;
            tracing::info!(name = %config.mutating_webhook, "updated the caBundle of the mutating webhooks");
        }
    } else {
        tracing::warn!(name = %config.mutating_webhook, "MutatingWebhookConfiguration not found: pods are not injected until it exists");
    }
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    if let Some(mut v) = validating.get_opt(&config.validating_webhook).await? {
        let mut changed = false;
        for w in v.webhooks.iter_mut().flatten() {
            if w.client_config.ca_bundle.as_ref() != Some(&bundle) {
                w.client_config.ca_bundle = Some(bundle.clone());
                changed = true;
            }
        }
        if changed {
            let patch = serde_json::json!({ "webhooks": v.webhooks });
            validating
                .patch(
                    &config.validating_webhook,
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                )
                .await?;
            tracing::info!(name = %config.validating_webhook, "updated the caBundle of the validating webhooks");
        }
    } else {
        tracing::warn!(name = %config.validating_webhook, "ValidatingWebhookConfiguration not found: approvals are not checked until it exists");
    }
    Ok(())
}

/// Keeps the self-managed certificate loaded, current in the Secret and in caBundle.
pub async fn run_self_managed(
    client: Client,
    config: Config,
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
) {
    loop {
        match ensure_secret(&client, &config).await {
            Ok((ca, cert, key)) => {
                if let Err(e) = store.load(cert.as_bytes(), key.as_bytes()) {
                    tracing::error!(error = %e, "cannot load the webhook certificate");
                } else {
                    metrics.set_ready(true);
                }
                if let Err(e) = patch_ca_bundles(&client, &config, &ca).await {
                    tracing::warn!(error = %e, "cannot update caBundle; retrying");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read or issue the webhook certificate; retrying")
            }
        }
        tokio::time::sleep(Duration::from_secs(if store.ready() { 30 } else { 2 })).await;
    }
}

/// Serves the certificate from files, reloading them when they change (cert-manager).
pub async fn run_files(dir: &Path, store: Arc<CertStore>, metrics: Arc<Metrics>) {
    let mut last: Option<(Vec<u8>, Vec<u8>)> = None;
    loop {
        let cert = std::fs::read(dir.join("tls.crt"));
        let key = std::fs::read(dir.join("tls.key"));
        match (cert, key) {
            (Ok(c), Ok(k)) if last.as_ref() != Some(&(c.clone(), k.clone())) => {
                match store.load(&c, &k) {
                    Ok(()) => {
                        tracing::info!(dir = %dir.display(), "loaded the webhook certificate");
                        metrics.set_ready(true);
                        last = Some((c, k));
                    }
                    Err(e) => tracing::error!(error = %e, "cannot load the webhook certificate"),
                }
            }
            (Ok(_), Ok(_)) => {}
            (c, k) => {
                if let Some(e) = c.err().or(k.err()) {
                    tracing::warn!(error = %e, dir = %dir.display(), "webhook certificate files not readable yet");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_and_reuse_the_ca() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let hosts = vec![
            "agentgate-webhook.agentgate-system.svc".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let g = generate(&hosts, Duration::from_secs(3600), None).unwrap();
        let store = CertStore::default();
        store.load(g.cert.as_bytes(), g.key.as_bytes()).unwrap();
        assert!(store.ready());
        let renewed = generate(
            &hosts,
            Duration::from_secs(3600),
            Some((&g.ca_cert, &g.ca_key, g.ca_not_after)),
        )
        .unwrap();
        assert_eq!(renewed.ca_cert, g.ca_cert);
        assert_ne!(renewed.cert, g.cert);
    }
}
