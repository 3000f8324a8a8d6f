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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
use sha2::{Digest, Sha256};
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
    /// When these keys were read from the issuer.
    fetched: Instant,
    /// When they were last asked for (read, or tried and failed).
    attempted: Instant,
    /// Changes whenever the keys are read again: a token verified with an earlier set is
    /// verified again.
    generation: u64,
    /// Pinned ahead ([`Verifier::pin_key`]): never read from the issuer again.
    pinned: bool,
}

/// How many verified tokens are remembered at most.
const VERIFIED_MAX: usize = 4096;

/// Tokens longer than this are verified every time, never remembered.
const REMEMBER_UP_TO: usize = 8192;

/// A token whose signature verified, remembered by its SHA-256.
struct Remembered {
    issuer: String,
    /// The generation of the issuer's keys it verified with.
    generation: u64,
    claims: Arc<serde_json::Value>,
    /// Its `exp`: dropped once past it.
    exp: f64,
}

/// Verifies tokens; caches each issuer's keys, and which tokens verified.
///
/// Keys are read from the issuer's JWKS at the first token, again when a token names a key id
/// the cache does not hold (a rotation, at most every ten seconds), and again once they are
/// older than the keys' maximum age (a key the issuer stopped publishing is no longer
/// trusted). When the issuer cannot be reached at that point, the keys read last are used for
/// up to an hour more, with a warning, then tokens are refused.
///
/// A token whose signature verified is remembered (by its hash, until its expiry, while the
/// issuer's keys are the ones it verified with), as Envoy's `jwt_authn` does: a client
/// connecting again with the same token skips the signature check. The issuer's trust, the
/// token's times, its audience and the identity it maps to are checked at every use.
pub struct Verifier {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// The cluster's service-account issuer, when the sidecar runs in a pod.
    sa_issuer: Option<String>,
    cache: Mutex<HashMap<String, Keys>>,
    verified: std::sync::Mutex<HashMap<[u8; 32], Remembered>>,
    generations: AtomicU64,
    keys_max_age: Duration,
}

/// How long keys read last are still used when the issuer cannot be reached after their
/// maximum age.
const STALE_GRACE: Duration = Duration::from_secs(3600);

/// How often an issuer's keys are read again at most, for an unknown key id or after a
/// failed read.
const REFETCH_EVERY: Duration = Duration::from_secs(10);

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
            verified: std::sync::Mutex::new(HashMap::new()),
            generations: AtomicU64::new(1),
            keys_max_age: Duration::from_secs(300),
        })
    }

    /// Read each issuer's keys again once they are older than `max_age` (default five
    /// minutes): how long a key the issuer withdrew is still trusted.
    #[must_use]
    pub fn with_keys_max_age(mut self, max_age: Duration) -> Self {
        self.keys_max_age = max_age;
        self
    }

    /// Pins `key` (id `kid`, for `alg` when given) as a key of `issuer`, as if its JWKS had just
    /// been read, and never reads that issuer's JWKS: for an issuer whose keys are known ahead.
    pub async fn pin_key(&self, issuer: &str, kid: &str, key: DecodingKey, alg: Option<Algorithm>) {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let mut cache = self.cache.lock().await;
        let keys = cache.entry(issuer.to_owned()).or_insert_with(|| Keys {
            keys: HashMap::new(),
            fetched: Instant::now(),
            attempted: Instant::now(),
            generation,
            pinned: true,
        });
        keys.keys.insert(kid.to_owned(), (key, alg));
        keys.generation = generation;
        keys.pinned = true;
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
            attempted: Instant::now(),
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
            pinned: false,
        })
    }

    /// Verifies `token` and maps it to exactly one AgentIdentity of `snapshot`.
    pub async fn verify(
        &self,
        token: &str,
        snapshot: &Snapshot,
    ) -> Result<Verified, IdentityError> {
        let token = token.trim();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let remembered = self.remembered(&digest);
        let (issuer, claims) = match remembered {
            Some((issuer, generation, claims)) => {
                self.check_trusted(&issuer, snapshot)?;
                // The issuer's keys are read again as usual (their maximum age, a withdrawn
                // key); a token verified with keys since replaced is verified again.
                let current = self.keys_generation(&issuer).await?;
                if current == generation {
                    (issuer, claims)
                } else {
                    self.verify_signature(token, digest, snapshot).await?
                }
            }
            None => self.verify_signature(token, digest, snapshot).await?,
        };
        check_claims(&claims, issuer, self.sa_issuer.as_deref(), snapshot)
    }

    /// The remembered verification of the token with this digest: its issuer, the generation
    /// of the keys it verified with, its claims.
    fn remembered(&self, digest: &[u8; 32]) -> Option<(String, u64, Arc<serde_json::Value>)> {
        let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        verified
            .get(digest)
            .map(|r| (r.issuer.clone(), r.generation, r.claims.clone()))
    }

    fn remember(&self, digest: [u8; 32], remembered: Remembered) {
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= VERIFIED_MAX {
            let now = crate::clock::now().as_millisecond() as f64 / 1000.0;
            verified.retain(|_, r| r.exp + LEEWAY_SECONDS >= now);
            if verified.len() >= VERIFIED_MAX {
                verified.clear();
            }
        }
        verified.insert(digest, remembered);
    }

    fn check_trusted(&self, issuer: &str, snapshot: &Snapshot) -> Result<(), IdentityError> {
        let trusted = self.sa_issuer.as_deref() == Some(issuer)
            || snapshot.identities.values().any(|i| {
                i.spec
                    .authentication
                    .oidc
                    .as_ref()
                    .is_some_and(|o| o.issuer == issuer)
            });
        if trusted {
            Ok(())
        } else {
            Err(IdentityError::UnknownIssuer(issuer.to_owned()))
        }
    }

    /// Reads the issuer's keys again when they are missing, older than their maximum age, or
    /// lack `kid` (`None`: no particular key is needed), at most every ten seconds; returns
    /// the lock on the cache, with the issuer's keys in it.
    async fn fresh_keys(
        &self,
        issuer: &str,
        kid: Option<&str>,
    ) -> Result<tokio::sync::MutexGuard<'_, HashMap<String, Keys>>, IdentityError> {
        let mut cache = self.cache.lock().await;
        let (refetch, old) = match cache.get(issuer) {
            None => (true, false),
            Some(k) if k.pinned => (false, false),
            Some(k) => {
                let may = k.attempted.elapsed() > REFETCH_EVERY;
                let unknown = kid.is_some_and(|kid| !k.keys.contains_key(kid));
                let old = k.fetched.elapsed() > self.keys_max_age;
                (may && (unknown || old), old)
            }
        };
        if refetch {
            match self.fetch_keys(issuer).await {
                Ok(fresh) => {
                    cache.insert(issuer.to_owned(), fresh);
                }
                Err(e) => {
                    let Some(k) = cache.get_mut(issuer) else {
                        return Err(e);
                    };
                    k.attempted = Instant::now();
                    if old {
                        tracing::warn!(%issuer, error = %e, age_s = k.fetched.elapsed().as_secs(), "the issuer's keys could not be read again; the keys read last are used for up to an hour past their maximum age");
                    }
                }
            }
        }
        if let Some(k) = cache.get(issuer)
            && !k.pinned
            && k.fetched.elapsed() > self.keys_max_age + STALE_GRACE
        {
            cache.remove(issuer);
            return Err(IdentityError::Keys {
                issuer: issuer.to_owned(),
                why: format!(
                    "its keys could not be read for more than {}s past their maximum age of {}s; tokens are refused until the issuer answers",
                    STALE_GRACE.as_secs(),
                    self.keys_max_age.as_secs()
                ),
            });
        }
        Ok(cache)
    }

    /// The generation of the issuer's current keys, read again as [`Self::fresh_keys`] says.
    async fn keys_generation(&self, issuer: &str) -> Result<u64, IdentityError> {
        let cache = self.fresh_keys(issuer, None).await?;
        cache
            .get(issuer)
            .map(|k| k.generation)
            .ok_or_else(|| IdentityError::UnknownKey(issuer.to_owned()))
    }

    /// Checks the token's header, issuer and signature; remembers it when it verifies.
    async fn verify_signature(
        &self,
        token: &str,
        digest: [u8; 32],
        snapshot: &Snapshot,
    ) -> Result<(String, Arc<serde_json::Value>), IdentityError> {
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
        self.check_trusted(&issuer, snapshot)?;
        let kid = header.kid.clone().unwrap_or_default();
        let (key, generation) = {
            let cache = self.fresh_keys(&issuer, Some(&kid)).await?;
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
            (found.0.clone(), keys.generation)
        };
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&issuer]);
        v.validate_aud = false; // checked per identity
        // Expiry and not-before are checked against agentgate's clock, which never goes back
        // (a step back of the system clock must not revive an expired token).
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        let claims = Arc::new(data.claims);
        if let Some(exp) = claims["exp"].as_f64()
            && token.len() <= REMEMBER_UP_TO
        {
            self.remember(
                digest,
                Remembered {
                    issuer: issuer.clone(),
                    generation,
                    claims: claims.clone(),
                    exp,
                },
            );
        }
        Ok((issuer, claims))
    }
}

/// Checks the verified claims' times and audience against this moment and maps them to
/// exactly one AgentIdentity of `snapshot`.
fn check_claims(
    claims: &serde_json::Value,
    issuer: String,
    sa_issuer: Option<&str>,
    snapshot: &Snapshot,
) -> Result<Verified, IdentityError> {
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
            let by_sa = sa_issuer == Some(issuer.as_str())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;
    use crate::policy::folder;

    const ISSUER: &str = "https://issuer.test";

    fn key() -> (EcdsaKeyPair, DecodingKey) {
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("a key");
        let point = key.public_key().as_ref().to_vec();
        let (x, y) = point[1..].split_at(32);
        let decoding =
            DecodingKey::from_ec_components(&URL_SAFE_NO_PAD.encode(x), &URL_SAFE_NO_PAD.encode(y))
                .expect("a decoding key");
        (key, decoding)
    }

    fn token(key: &EcdsaKeyPair, kid: &str, sub: &str) -> String {
        let now = crate::clock::now().as_second();
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"JWT"}}"#)),
            URL_SAFE_NO_PAD.encode(format!(
                r#"{{"iss":"{ISSUER}","aud":"agents","sub":"{sub}","exp":{},"iat":{now}}}"#,
                now + 600
            ))
        );
        let sig = key
            .sign(&aws_lc_rs::rand::SystemRandom::new(), message.as_bytes())
            .expect("signed");
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    fn snapshot(subject: &str) -> Snapshot {
        folder::load_str(&format!(
            "apiVersion: agentgate.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{ name: robot }}\nspec:\n  owner: t\n  authentication:\n    oidc: {{ issuer: \"{ISSUER}\", audience: agents, subject: {subject} }}\n"
        ))
        .expect("the identity loads")
    }

    #[tokio::test]
    async fn a_remembered_token_is_still_checked_against_the_current_policy_and_keys() {
        let verifier = Verifier::new(None, None).expect("a verifier");
        let (k1, d1) = key();
        verifier
            .pin_key(ISSUER, "k1", d1, Some(Algorithm::ES256))
            .await;
        let good = token(&k1, "k1", "robot-sub");
        let snap = snapshot("robot-sub");
        assert_eq!(
            verifier.verify(&good, &snap).await.unwrap().identity,
            "robot"
        );
        assert_eq!(verifier.verified.lock().unwrap().len(), 1, "remembered");
        // Again, from memory: the same answer.
        assert_eq!(
            verifier.verify(&good, &snap).await.unwrap().identity,
            "robot"
        );

        // The identity is mapped against the policy of the moment.
        assert_eq!(
            verifier.verify(&good, &snapshot("someone-else")).await,
            Err(IdentityError::NoIdentity {
                subject: "robot-sub".into(),
                issuer: ISSUER.into()
            })
        );
        // An issuer no AgentIdentity trusts any more.
        let none = folder::load_str("").expect("empty policy");
        assert_eq!(
            verifier.verify(&good, &none).await,
            Err(IdentityError::UnknownIssuer(ISSUER.into()))
        );

        // Expiry is checked at every use: a remembered token past its `exp` is refused.
        let digest: [u8; 32] = Sha256::digest(good.as_bytes()).into();
        let generation = verifier.keys_generation(ISSUER).await.unwrap();
        let past = crate::clock::now().as_second() - 120;
        verifier.remember(
            digest,
            Remembered {
                issuer: ISSUER.into(),
                generation,
                claims: Arc::new(serde_json::json!({
                    "iss": ISSUER, "aud": "agents", "sub": "robot-sub", "exp": past
                })),
                exp: past as f64,
            },
        );
        assert_eq!(
            verifier.verify(&good, &snap).await,
            Err(IdentityError::Invalid("the token has expired".into()))
        );

        // The issuer's keys change (k1 is now another key): the token is verified again, and
        // its signature no longer matches.
        let (_, other) = key();
        verifier
            .pin_key(ISSUER, "k1", other, Some(Algorithm::ES256))
            .await;
        assert!(
            matches!(
                verifier.verify(&good, &snap).await,
                Err(IdentityError::Invalid(_))
            ),
            "verified again with the new keys"
        );

        // A tampered copy is never taken for the remembered one.
        let (k2, d2) = key();
        verifier
            .pin_key(ISSUER, "k2", d2, Some(Algorithm::ES256))
            .await;
        let t2 = token(&k2, "k2", "robot-sub");
        assert!(verifier.verify(&t2, &snap).await.is_ok());
        let mut parts: Vec<String> = t2.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"iss":"{ISSUER}","aud":"agents","sub":"robot-sub","exp":{}}}"#,
            crate::clock::now().as_second() + 7200
        ));
        assert!(matches!(
            verifier.verify(&parts.join("."), &snap).await,
            Err(IdentityError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn remembered_tokens_are_bounded() {
        let verifier = Verifier::new(None, None).expect("a verifier");
        let (k1, d1) = key();
        verifier
            .pin_key(ISSUER, "k1", d1, Some(Algorithm::ES256))
            .await;
        let snap = snapshot("robot-sub");
        for _ in 0..VERIFIED_MAX + 5 {
            // Each signature differs (ECDSA's nonce): a different token each time.
            assert!(
                verifier
                    .verify(&token(&k1, "k1", "robot-sub"), &snap)
                    .await
                    .is_ok()
            );
        }
        assert!(verifier.verified.lock().unwrap().len() <= VERIFIED_MAX);
    }
}
