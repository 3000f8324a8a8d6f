//! Who is connecting: OpenID Connect tokens (an external IdP's ID token, or the pod's projected
//! service-account token) verified against their issuer's published keys, and mapped to
//! exactly one AgentIdentity.
//!
//! Only issuers that some AgentIdentity names (or the cluster's own, when configured) are ever
//! contacted; `alg: none` and symmetric algorithms are refused, so a public key can never be
//! used as an HMAC secret; `exp`, `nbf`, `iss` and `aud` are checked; an unknown key id makes
//! the verifier fetch the issuer's keys again (rotation), at most every ten seconds.

pub mod pod;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use agentgate_crds::AgentIdentity;
use base64::Engine;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::sync::Mutex;

use crate::policy::Snapshot;

/// The audience a pod's projected token carries for agentgate.
pub const AUDIENCE: &str = "agentgate";

/// Clock skew tolerated between the issuer and this sidecar, for `exp` and `nbf`.
const LEEWAY_SECONDS: f64 = 30.0;

/// Algorithms accepted: asymmetric only.
const ALLOWED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Why a token was refused. Messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not a JWT at all.
    #[error("the password is not a token (a JWT from your identity provider is expected)")]
    NotAToken,
    /// The algorithm is not allowed.
    #[error("token algorithm {0} is not accepted (asymmetric signatures only)")]
    Algorithm(String),
    /// No AgentIdentity trusts this issuer.
    #[error("no AgentIdentity trusts issuer {0}")]
    UnknownIssuer(String),
    /// The issuer's keys could not be read.
    #[error("cannot read the keys of issuer {issuer}: {why}")]
    Keys {
        /// The issuer.
        issuer: String,
        /// Why.
        why: String,
    },
    /// The token's key is not among the issuer's.
    #[error("the token was signed with a key issuer {0} does not publish")]
    UnknownKey(String),
    /// Signature, expiry, not-before, issuer or audience failed.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// No AgentIdentity matches the verified subject.
    #[error("no AgentIdentity matches subject {subject} of issuer {issuer}")]
    NoIdentity {
        /// The subject.
        subject: String,
        /// The issuer.
        issuer: String,
    },
    /// More than one AgentIdentity matches.
    #[error(
        "subject {subject} matches several AgentIdentities ({names}): make their authentication unambiguous"
    )]
    Ambiguous {
        /// The subject.
        subject: String,
        /// The names.
        names: String,
    },
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The AgentIdentity it maps to.
    pub identity: String,
    /// Its issuer.
    pub issuer: String,
    /// Its subject.
    pub subject: String,
}

struct Keys {
    keys: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    fetched: Instant,
}

/// Verifies tokens; caches each issuer's keys.
pub struct Verifier {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// The cluster's service-account issuer, when the sidecar runs in a pod.
    sa_issuer: Option<String>,
    cache: Mutex<HashMap<String, Keys>>,
}

impl Verifier {
    /// A verifier trusting the system roots plus `extra_ca` for issuer connections.
    pub fn new(sa_issuer: Option<String>, extra_ca: Option<&Path>) -> Result<Self, String> {
        let tls = crate::tls::client_config(extra_ca)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(https),
            sa_issuer,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Pins `key` (id `kid`, for `alg` when given) as a key of `issuer`, as if its JWKS had just
    /// been read: for an issuer whose keys are known ahead. An unknown key id still makes the
    /// verifier read the issuer's JWKS (at most every ten seconds).
    pub async fn pin_key(&self, issuer: &str, kid: &str, key: DecodingKey, alg: Option<Algorithm>) {
        let mut cache = self.cache.lock().await;
        let keys = cache.entry(issuer.to_owned()).or_insert_with(|| Keys {
            keys: HashMap::new(),
            fetched: Instant::now(),
        });
        keys.keys.insert(kid.to_owned(), (key, alg));
    }

    async fn get_json(&self, url: &str) -> Result<serde_json::Value, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let fut = async {
            let resp = self
                .client
                .get(uri)
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), 1 << 20)
                .collect()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("GET {url}: HTTP {status}"));
            }
            serde_json::from_slice(&body).map_err(|e| format!("GET {url}: {e}"))
        };
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .map_err(|_| format!("GET {url}: no answer within 5s"))?
    }

    async fn fetch_keys(&self, issuer: &str) -> Result<Keys, IdentityError> {
        let err = |why: String| IdentityError::Keys {
            issuer: issuer.to_owned(),
            why,
        };
        let disco = self
            .get_json(&format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            ))
            .await
            .map_err(err)?;
        if disco["issuer"].as_str() != Some(issuer) {
            return Err(err(format!(
                "its discovery document names issuer {}",
                disco["issuer"]
            )));
        }
        let jwks_uri = disco["jwks_uri"]
            .as_str()
            .ok_or_else(|| err("no jwks_uri".into()))?;
        let set: JwkSet = serde_json::from_value(self.get_json(jwks_uri).await.map_err(err)?)
            .map_err(|e| err(format!("not a JWK set: {e}")))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            if let Ok(k) = DecodingKey::from_jwk(jwk) {
                let alg = jwk
                    .common
                    .key_algorithm
                    .and_then(|a| a.to_string().parse::<Algorithm>().ok());
                keys.insert(kid, (k, alg));
            }
        }
        Ok(Keys {
            keys,
            fetched: Instant::now(),
        })
    }

    /// Verifies `token` and maps it to exactly one AgentIdentity of `snapshot`.
    pub async fn verify(
        &self,
        token: &str,
        snapshot: &Snapshot,
    ) -> Result<Verified, IdentityError> {
        let token = token.trim();
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            // Say which algorithm was refused (`none`, or one the library does not know)
            // when the header is readable at all.
            token
                .split('.')
                .next()
                .and_then(|h| {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(h)
                        .ok()
                })
                .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
                .and_then(|h| h["alg"].as_str().map(str::to_owned))
                .map_or(IdentityError::NotAToken, IdentityError::Algorithm)
        })?;
        if !ALLOWED.contains(&header.alg) {
            return Err(IdentityError::Algorithm(format!("{:?}", header.alg)));
        }
        // Which issuer? Read it unverified only to choose the keys; everything is then
        // verified with them.
        let payload = token.split('.').nth(1).ok_or(IdentityError::NotAToken)?;
        let claims: serde_json::Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(IdentityError::NotAToken)?;
        let issuer = claims["iss"].as_str().unwrap_or_default().to_owned();
        let trusted = self.sa_issuer.as_deref() == Some(issuer.as_str())
            || snapshot.identities.values().any(|i| {
                i.spec
                    .authentication
                    .oidc
                    .as_ref()
                    .is_some_and(|o| o.issuer == issuer)
            });
        if !trusted {
            return Err(IdentityError::UnknownIssuer(issuer));
        }
        let kid = header.kid.clone().unwrap_or_default();
        let key = {
            let mut cache = self.cache.lock().await;
            let stale = cache.get(&issuer).is_none_or(|k| {
                !k.keys.contains_key(&kid) && k.fetched.elapsed() > Duration::from_secs(10)
            });
            if stale {
                let fresh = self.fetch_keys(&issuer).await?;
                cache.insert(issuer.clone(), fresh);
            }
            let keys = cache
                .get(&issuer)
                .ok_or_else(|| IdentityError::UnknownKey(issuer.clone()))?;
            let found = keys
                .keys
                .get(&kid)
                .or_else(|| {
                    if kid.is_empty() && keys.keys.len() == 1 {
                        keys.keys.values().next()
                    } else {
                        None
                    }
                })
                .ok_or_else(|| IdentityError::UnknownKey(issuer.clone()))?;
            if let Some(alg) = found.1
                && alg != header.alg
            {
                return Err(IdentityError::Algorithm(format!(
                    "{:?} (the key is for {alg:?})",
                    header.alg
                )));
            }
            found.0.clone()
        };
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&issuer]);
        v.validate_aud = false; // checked per identity below
        // Expiry and not-before are checked below against agentgate's clock, which never
        // goes back (a step back of the system clock must not revive an expired token).
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        let claims = data.claims;
        let now = crate::clock::now().as_millisecond() as f64 / 1000.0;
        let time = |name: &str| match &claims[name] {
            serde_json::Value::Null => Ok(None),
            t => t
                .as_f64()
                .map(Some)
                .ok_or_else(|| IdentityError::Invalid(format!("{name} is not a number"))),
        };
        match time("exp")? {
            Some(exp) if exp + LEEWAY_SECONDS >= now => {}
            Some(_) => return Err(IdentityError::Invalid("the token has expired".into())),
            None => return Err(IdentityError::Invalid("the token has no expiry".into())),
        }
        if time("nbf")?.is_some_and(|nbf| nbf - LEEWAY_SECONDS > now) {
            return Err(IdentityError::Invalid("the token is not valid yet".into()));
        }
        let subject = claims["sub"].as_str().unwrap_or_default().to_owned();
        let audiences: Vec<String> = match &claims["aud"] {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        let matches: Vec<&AgentIdentity> = snapshot
            .identities
            .values()
            .filter(|id| {
                let by_oidc = id.spec.authentication.oidc.as_ref().is_some_and(|o| {
                    o.issuer == issuer
                        && audiences.contains(&o.audience)
                        && o.subject.as_ref().is_none_or(|s| *s == subject)
                        && o.claims
                            .iter()
                            .all(|(k, v)| claims[k].as_str() == Some(v.as_str()))
                });
                let by_sa = self.sa_issuer.as_deref() == Some(issuer.as_str())
                    && audiences.iter().any(|a| a == AUDIENCE)
                    && id
                        .spec
                        .authentication
                        .service_account
                        .as_ref()
                        .is_some_and(|sa| {
                            let ns = sa
                                .namespace
                                .clone()
                                .or_else(|| id.metadata.namespace.clone())
                                .unwrap_or_else(|| "default".into());
                            subject == format!("system:serviceaccount:{ns}:{}", sa.name)
                        });
                by_oidc || by_sa
            })
            .collect();
        match matches.as_slice() {
            [one] => Ok(Verified {
                identity: one.metadata.name.clone().unwrap_or_default(),
                issuer,
                subject,
            }),
            [] => Err(IdentityError::NoIdentity { subject, issuer }),
            many => Err(IdentityError::Ambiguous {
                subject,
                names: many
                    .iter()
                    .map(|i| i.metadata.name.clone().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}
