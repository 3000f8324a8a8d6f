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
    /// The API server no longer accepts a service-account token whose signature holds: its
    /// pod or service account was deleted, or the review could not be made.
    #[error(
        "the API server does not accept this service-account token now: {0} (a token stays signed after its pod or service account is deleted; ask for a new one)"
    )]
    Revoked(String),
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
    /// The verified claims, to map them again when the policy changes.
    pub claims: Arc<serde_json::Value>,
    /// For a service-account token: its standing with the API server, asked again while a
    /// session that began with it lasts ([`Verifier::still_valid`]).
    pub review: Option<Arc<Review>>,
}

/// A service-account token's standing with the API server, kept while sessions use it: the
/// token (never shown), the audience it was reviewed for, and the last answer.
pub struct Review {
    token: String,
    audience: String,
    subject: String,
    state: std::sync::Mutex<ReviewState>,
}

struct ReviewState {
    /// When the API server was last asked (or answered).
    at: Instant,
    /// When it last confirmed the token.
    confirmed: Instant,
    /// Why it no longer accepts the token, once it said so: for good.
    refused: Option<String>,
    /// Why it could not be asked last time (it is asked again).
    unreachable: Option<String>,
    /// A review is under way.
    asking: bool,
}

impl ReviewState {
    fn new() -> Self {
        Self {
            at: Instant::now(),
            confirmed: Instant::now(),
            refused: None,
            unreachable: None,
            asking: false,
        }
    }

    /// Takes a review's answer.
    fn answered(&mut self, answer: Result<String, pod::ReviewError>, subject: &str) {
        self.asking = false;
        self.at = Instant::now();
        match answer {
            Ok(user) if user == subject => {
                self.confirmed = Instant::now();
                self.unreachable = None;
            }
            Ok(user) => self.refused = Some(format!("the API server says it belongs to {user}")),
            Err(pod::ReviewError::Refused(why)) => self.refused = Some(why),
            Err(pod::ReviewError::Unreachable(why)) => self.unreachable = Some(why),
        }
    }
}

/// How long a session goes on without the API server confirming its service-account token
/// (it is asked every [`REVIEW_EVERY`] while the session is used): past this, requests are
/// refused until it answers.
const CONFIRMED_FOR: Duration = Duration::from_secs(30);

impl std::fmt::Debug for Review {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Review")
            .field("subject", &self.subject)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Review {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for Review {}

struct Keys {
    keys: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    /// When these keys were read from the issuer; `None`: never (the first read failed), or
    /// they were dropped, too old to trust.
    fetched: Option<Instant>,
    /// When the issuer was last asked (read, or tried and failed).
    attempted: Instant,
    /// Why the last read failed, while it does.
    error: Option<IdentityError>,
    /// Changes when a read returns a different key set: a token verified with an earlier set
    /// is verified again.
    generation: u64,
    /// SHA-256 of the key set as read (key ids, algorithms, key material).
    digest: [u8; 32],
    /// Pinned ahead ([`Verifier::pin_key`]): never read from the issuer.
    pinned: bool,
}

impl Keys {
    fn find(&self, kid: &str) -> Option<&(DecodingKey, Option<Algorithm>)> {
        self.keys.get(kid).or_else(|| {
            if kid.is_empty() && self.keys.len() == 1 {
                self.keys.values().next()
            } else {
                None
            }
        })
    }
}

/// How many verified tokens are remembered at most.
const VERIFIED_MAX: usize = 1024;

/// Tokens longer than this are verified every time, never remembered.
const REMEMBER_UP_TO: usize = 4096;

/// A token that verified and mapped to an identity, remembered by its SHA-256.
struct Remembered {
    issuer: String,
    /// The generation of the issuer's keys it verified with.
    generation: u64,
    /// Its payload (the claims' JSON), read again at each use.
    payload: Arc<[u8]>,
    /// Its `exp`: dropped once past it.
    exp: f64,
}

/// What the key cache needs before it can answer for an issuer.
#[derive(Debug, PartialEq, Eq)]
enum Need {
    /// Answer from the keys held (or with the last read's error).
    Ready,
    /// The keys are older than their maximum age but still usable: one caller reads them
    /// again, the others go on with them.
    Refresh,
    /// No usable keys, or not the one asked for: wait for a read.
    Wait,
}

/// Verifies tokens; caches each issuer's keys, and which tokens verified.
///
/// Keys are read from the issuer's JWKS at the first token, again when a token names a key id
/// the cache does not hold (a rotation), and again once they are older than the keys' maximum
/// age (a key the issuer stopped publishing is no longer trusted); an issuer is asked at most
/// every ten seconds, one read at a time, and never while another issuer's answer is awaited.
/// When the issuer cannot be reached after the maximum age, the keys read last are used (with
/// a warning) until an hour past their maximum age, then its tokens are refused.
///
/// A token that verified and mapped to an identity is remembered (by its hash, until its
/// expiry, while the issuer's key set is the one it verified with), as Envoy's `jwt_authn`
/// does: a client connecting again with the same token skips the signature check. The
/// issuer's trust, the token's times, its audience and the identity it maps to are checked at
/// every use.
pub struct Verifier {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// The cluster's service-account issuer, when the sidecar runs in a pod.
    sa_issuer: Option<String>,
    /// Each issuer's keys. Never held across an await.
    cache: std::sync::Mutex<HashMap<String, Keys>>,
    /// One read of an issuer's keys at a time.
    reading: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    verified: std::sync::Mutex<HashMap<[u8; 32], Remembered>>,
    generations: AtomicU64,
    keys_max_age: Duration,
    /// In a cluster: the API server, asked whether a service-account token is still good.
    reviewer: std::sync::OnceLock<kube::Client>,
    /// Tokens the API server accepted lately, by hash: when, and as whom.
    reviewed: std::sync::Mutex<HashMap<[u8; 32], (Instant, String)>>,
    /// The pod the sidecar runs in (its UID): a service-account token bound to another pod
    /// is refused.
    pod_uid: Option<String>,
}

/// How long the API server's acceptance of a service-account token is trusted before it is
/// asked again (the longest a deleted pod's token still works).
const REVIEW_EVERY: Duration = Duration::from_secs(10);

/// How long past their maximum age the keys read last are still used when the issuer cannot
/// be reached.
const STALE_GRACE: Duration = Duration::from_secs(3600);

/// How often an issuer's keys are read at most.
const REFETCH_EVERY: Duration = Duration::from_secs(10);

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
            cache: std::sync::Mutex::new(HashMap::new()),
            reading: std::sync::Mutex::new(HashMap::new()),
            verified: std::sync::Mutex::new(HashMap::new()),
            generations: AtomicU64::new(1),
            keys_max_age: Duration::from_secs(300),
            reviewer: std::sync::OnceLock::new(),
            reviewed: std::sync::Mutex::new(HashMap::new()),
            pod_uid: None,
        })
    }

    /// Asks the API server (TokenReview) whether each service-account token is still good
    /// before it maps to an identity, again at most every 10 s: a bound token's signature
    /// outlives the pod or service account it was issued for, and only the API server knows
    /// they are gone. A review that cannot be made refuses the token.
    pub fn review_with(&self, client: kube::Client) {
        let _ = self.reviewer.set(client);
    }

    /// Whether what `verified` was mapped from still maps to the same AgentIdentity under
    /// `snapshot`: a session that began with a token ends its access when the identity's
    /// `authentication` no longer names the token's subject (or names it twice). The token's
    /// times and standing are [`Self::still_valid`]'s.
    pub fn still_maps(&self, verified: &Verified, snapshot: &Snapshot) -> Result<(), String> {
        match map_claims(
            &verified.claims,
            verified.issuer.clone(),
            self.sa_issuer.as_deref(),
            snapshot,
        ) {
            Ok(v) if v.identity == verified.identity => Ok(()),
            Ok(v) => Err(format!(
                "subject {} of issuer {} now maps to AgentIdentity {}, not {}",
                verified.subject, verified.issuer, v.identity, verified.identity
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The API server's word on a service-account token of `subject` (see [`Self::review_with`]).
    async fn reviewed(
        &self,
        token: &str,
        digest: &[u8; 32],
        subject: &str,
        audiences: &[String],
    ) -> Result<(), IdentityError> {
        let Some(client) = self.reviewer.get() else {
            // Fail closed: the sidecar starts no verifier trusting service-account tokens
            // without a reviewer, so this is a bug, not a choice.
            return Err(IdentityError::Revoked(
                "agentgate cannot ask the API server about service-account tokens (no TokenReview client)".into(),
            ));
        };
        if lock(&self.reviewed)
            .get(digest)
            .is_some_and(|(at, user)| at.elapsed() < REVIEW_EVERY && user == subject)
        {
            return Ok(());
        }
        let user = pod::review_for(client, token, audiences)
            .await
            .map_err(|e| IdentityError::Revoked(e.to_string()))?;
        if user != subject {
            return Err(IdentityError::Revoked(format!(
                "the API server says it belongs to {user}"
            )));
        }
        let mut reviewed = lock(&self.reviewed);
        if reviewed.len() >= VERIFIED_MAX {
            reviewed.retain(|_, (at, _)| at.elapsed() < REVIEW_EVERY);
        }
        reviewed.insert(*digest, (Instant::now(), user));
        Ok(())
    }

    /// Read each issuer's keys again once they are older than `max_age` (default five
    /// minutes): how long a key the issuer withdrew is still trusted.
    #[must_use]
    pub fn with_keys_max_age(mut self, max_age: Duration) -> Self {
        self.keys_max_age = max_age;
        self
    }

    /// The UID of the pod the sidecar runs in: a service-account token bound to another pod
    /// (its `kubernetes.io.pod.uid` claim) is refused, as it was taken from that pod.
    pub fn with_pod_uid(mut self, uid: Option<String>) -> Self {
        self.pod_uid = uid.filter(|u| !u.is_empty());
        self
    }

    /// Whether the token a session began with still stands: it has not expired (a session
    /// ends with its token, as a Teleport session ends with its certificate; the agent
    /// connects again with a new one), and for a service-account token, the API server
    /// still accepts it (asked again every ten seconds while the session is used: a deleted
    /// pod or service account ends it).
    pub fn still_valid(&self, verified: &Verified) -> Result<(), String> {
        let now = crate::clock::now().as_millisecond() as f64 / 1000.0;
        match verified.claims["exp"].as_f64() {
            Some(exp) if exp + LEEWAY_SECONDS >= now => {}
            exp => {
                let when = exp
                    .and_then(|e| jiff::Timestamp::from_second(e as i64).ok())
                    .map_or_else(|| "already".to_owned(), |t| format!("at {t}"));
                return Err(format!(
                    "the token this session began with expired {when}: connect again with a new token"
                ));
            }
        }
        let Some(review) = &verified.review else {
            return Ok(());
        };
        let mut state = lock(&review.state);
        if let Some(why) = &state.refused {
            return Err(IdentityError::Revoked(why.clone()).to_string());
        }
        if state.at.elapsed() >= REVIEW_EVERY && !state.asking {
            let (Some(client), Ok(runtime)) = (
                self.reviewer.get().cloned(),
                tokio::runtime::Handle::try_current(),
            ) else {
                state.refused = Some("no TokenReview client to ask".into());
                return Err(
                    IdentityError::Revoked("no TokenReview client to ask".into()).to_string(),
                );
            };
            state.asking = true;
            let review = review.clone();
            runtime.spawn(async move {
                let answer = pod::review_for(
                    &client,
                    &review.token,
                    std::slice::from_ref(&review.audience),
                )
                .await;
                lock(&review.state).answered(answer, &review.subject);
            });
        }
        // Not confirmed lately because the API server is slow or unreachable (a session
        // merely idle is asked again first: `still_valid_now`): refused until it answers,
        // not for good.
        let age = state.confirmed.elapsed();
        if age > CONFIRMED_FOR
            && (state.unreachable.is_some() || state.at.elapsed() > CONFIRMED_FOR)
        {
            let why = state
                .unreachable
                .clone()
                .unwrap_or_else(|| "no answer yet".to_owned());
            return Err(IdentityError::Revoked(format!(
                "the API server has not confirmed it for {} s ({why}); retry in a moment",
                age.as_secs()
            ))
            .to_string());
        }
        Ok(())
    }

    /// Asks the API server about a session's service-account token now when its last
    /// confirmation is older than [`REVIEW_EVERY`] (a session idle for a while), so the
    /// request that follows is decided on a fresh answer; then [`Self::still_valid`].
    pub async fn still_valid_now(&self, verified: &Verified) -> Result<(), String> {
        if let (Some(review), Some(client)) = (&verified.review, self.reviewer.get()) {
            let ask = {
                let mut state = lock(&review.state);
                let due = state.refused.is_none()
                    && !state.asking
                    && state.confirmed.elapsed() >= REVIEW_EVERY;
                if due {
                    state.asking = true;
                }
                due
            };
            if ask {
                let answer = pod::review_for(
                    client,
                    &review.token,
                    std::slice::from_ref(&review.audience),
                )
                .await;
                lock(&review.state).answered(answer, &review.subject);
            }
        }
        self.still_valid(verified)
    }

    /// Pins `key` (id `kid`, for `alg` when given) as a key of `issuer`, and never reads that
    /// issuer's JWKS: for an issuer whose keys are known ahead. Keys read from the issuer
    /// before are dropped; the issuer's keys are the pinned ones only.
    pub async fn pin_key(&self, issuer: &str, kid: &str, key: DecodingKey, alg: Option<Algorithm>) {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let mut cache = lock(&self.cache);
        let keys = cache.entry(issuer.to_owned()).or_insert_with(|| Keys {
            keys: HashMap::new(),
            fetched: Some(Instant::now()),
            attempted: Instant::now(),
            error: None,
            generation,
            digest: [0; 32],
            pinned: true,
        });
        if !keys.pinned {
            keys.keys.clear();
            keys.pinned = true;
            keys.error = None;
        }
        keys.keys.insert(kid.to_owned(), (key, alg));
        keys.generation = generation;
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

    /// Reads the issuer's key set: the keys by id, and the set's digest.
    #[allow(clippy::type_complexity)]
    async fn fetch_keys(&self, issuer: &str) -> Result<KeysRead, IdentityError> {
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
        Ok(signing_keys(&set))
    }

    /// What the cache needs before it answers for `issuer` (and key `kid`, when given).
    fn need(&self, issuer: &str, kid: Option<&str>) -> Need {
        let cache = lock(&self.cache);
        let Some(k) = cache.get(issuer) else {
            return Need::Wait;
        };
        if k.pinned || k.attempted.elapsed() < REFETCH_EVERY {
            return Need::Ready;
        }
        let usable = k
            .fetched
            .is_some_and(|f| f.elapsed() <= self.keys_max_age + STALE_GRACE);
        if !usable || kid.is_some_and(|kid| k.find(kid).is_none()) {
            Need::Wait
        } else if k.fetched.is_none_or(|f| f.elapsed() > self.keys_max_age) {
            Need::Refresh
        } else {
            Need::Ready
        }
    }

    fn read_lock(&self, issuer: &str) -> Arc<Mutex<()>> {
        lock(&self.reading)
            .entry(issuer.to_owned())
            .or_default()
            .clone()
    }

    /// Reads the issuer's keys when [`Self::need`] says so: one read per issuer at a time;
    /// callers that can go on with the keys held do not wait for it.
    async fn ensure(&self, issuer: &str, kid: Option<&str>) {
        match self.need(issuer, kid) {
            Need::Ready => {}
            Need::Refresh => {
                let reading = self.read_lock(issuer);
                if let Ok(_one) = reading.try_lock() {
                    self.refresh(issuer).await;
                }
            }
            Need::Wait => {
                let reading = self.read_lock(issuer);
                let _one = reading.lock().await;
                // Another caller may have read them meanwhile.
                if self.need(issuer, kid) != Need::Ready {
                    self.refresh(issuer).await;
                }
            }
        }
    }

    async fn refresh(&self, issuer: &str) {
        let read = self.fetch_keys(issuer).await;
        let mut cache = lock(&self.cache);
        let now = Instant::now();
        match read {
            Ok((keys, digest)) => {
                let generation = match cache.get(issuer) {
                    Some(old) if old.digest == digest && old.fetched.is_some() => old.generation,
                    _ => self.generations.fetch_add(1, Ordering::Relaxed),
                };
                if cache.get(issuer).is_some_and(|k| k.error.is_some()) {
                    tracing::info!(%issuer, "the issuer's keys are read again");
                }
                cache.insert(
                    issuer.to_owned(),
                    Keys {
                        keys,
                        fetched: Some(now),
                        attempted: now,
                        error: None,
                        generation,
                        digest,
                        pinned: false,
                    },
                );
            }
            Err(e) => {
                let k = cache.entry(issuer.to_owned()).or_insert_with(|| Keys {
                    keys: HashMap::new(),
                    fetched: None,
                    attempted: now,
                    error: None,
                    generation: 0,
                    digest: [0; 32],
                    pinned: false,
                });
                k.attempted = now;
                match k.fetched {
                    Some(f) if f.elapsed() > self.keys_max_age + STALE_GRACE => {
                        tracing::error!(%issuer, error = %e, "the issuer's keys could not be read again for an hour past their maximum age: its tokens are refused until it answers");
                        k.keys.clear();
                        k.fetched = None;
                    }
                    Some(f) => {
                        tracing::warn!(%issuer, error = %e, age_s = f.elapsed().as_secs(), "the issuer's keys could not be read again; the keys read last are used until an hour past their maximum age");
                    }
                    None => {
                        tracing::warn!(%issuer, error = %e, "the issuer's keys could not be read");
                    }
                }
                k.error = Some(e);
            }
        }
    }

    /// The issuer's key `kid` for a token signed with `alg`, and its key set's generation.
    fn key(
        &self,
        issuer: &str,
        kid: &str,
        alg: Algorithm,
    ) -> Result<(DecodingKey, u64), IdentityError> {
        let cache = lock(&self.cache);
        let keys = self.usable(&cache, issuer)?;
        let Some(found) = keys.find(kid) else {
            // Not published, or the issuer could not be asked: say which.
            return Err(keys
                .error
                .clone()
                .unwrap_or_else(|| IdentityError::UnknownKey(issuer.to_owned())));
        };
        if let Some(key_alg) = found.1
            && key_alg != alg
        {
            return Err(IdentityError::Algorithm(format!(
                "{alg:?} (the key is for {key_alg:?})"
            )));
        }
        Ok((found.0.clone(), keys.generation))
    }

    /// The issuer's keys, when they may be used.
    fn usable<'c>(
        &self,
        cache: &'c HashMap<String, Keys>,
        issuer: &str,
    ) -> Result<&'c Keys, IdentityError> {
        let keys = cache.get(issuer).ok_or_else(|| IdentityError::Keys {
            issuer: issuer.to_owned(),
            why: "they have not been read".into(),
        })?;
        let usable = keys.pinned
            || keys
                .fetched
                .is_some_and(|f| f.elapsed() <= self.keys_max_age + STALE_GRACE);
        if usable {
            Ok(keys)
        } else {
            Err(keys.error.clone().unwrap_or_else(|| IdentityError::Keys {
                issuer: issuer.to_owned(),
                why: "they are too old to trust and could not be read again".into(),
            }))
        }
    }

    /// The generation of the issuer's current keys, read again as [`Self::need`] says.
    async fn keys_generation(&self, issuer: &str) -> Result<u64, IdentityError> {
        self.ensure(issuer, None).await;
        let cache = lock(&self.cache);
        self.usable(&cache, issuer).map(|k| k.generation)
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
        let (claims, fresh) = match remembered {
            Some(r) => {
                self.check_trusted(&r.issuer, snapshot)?;
                // The issuer's keys are read again as usual (their maximum age, a withdrawn
                // key); a token verified with another key set is verified again.
                let current = self.keys_generation(&r.issuer).await?;
                let claims = (current == r.generation)
                    .then(|| serde_json::from_slice::<serde_json::Value>(&r.payload).ok())
                    .flatten();
                match claims {
                    Some(claims) => (claims, None),
                    None => self.verify_signature(token, snapshot).await?,
                }
            }
            None => self.verify_signature(token, snapshot).await?,
        };
        let issuer = claims["iss"].as_str().unwrap_or_default().to_owned();
        let mut verified = check_claims(&claims, issuer, self.sa_issuer.as_deref(), snapshot)?;
        // A token of the cluster: the API server must still accept it (for its audiences).
        if self.sa_issuer.as_deref() == Some(verified.issuer.as_str()) {
            // Reviewed for the audience the identity was matched by, not for whatever the
            // token names: the API server then says it is good for that audience.
            let tokens = audiences(&claims);
            let auth = snapshot
                .identities
                .get(&verified.identity)
                .map(|i| &i.spec.authentication);
            let audience = match auth {
                Some(a) if a.service_account.is_some() && tokens.iter().any(|t| t == AUDIENCE) => {
                    AUDIENCE.to_owned()
                }
                Some(a) => a
                    .oidc
                    .as_ref()
                    .map_or_else(|| AUDIENCE.to_owned(), |o| o.audience.clone()),
                None => AUDIENCE.to_owned(),
            };
            // A token bound to a pod is that pod's: not this one's, when the sidecar knows
            // its own.
            let bound = claims["kubernetes.io"]["pod"]["uid"].as_str();
            if let (Some(bound), Some(mine)) = (bound, self.pod_uid.as_deref())
                && bound != mine
            {
                let pod = claims["kubernetes.io"]["pod"]["name"]
                    .as_str()
                    .unwrap_or("another pod");
                return Err(IdentityError::Invalid(format!(
                    "the service-account token is bound to pod {pod}, not to this agent's pod: present the token of the pod the agent runs in"
                )));
            }
            self.reviewed(
                token,
                &digest,
                &verified.subject,
                std::slice::from_ref(&audience),
            )
            .await?;
            verified.review = Some(Arc::new(Review {
                token: token.trim().to_owned(),
                audience,
                subject: verified.subject.clone(),
                state: std::sync::Mutex::new(ReviewState::new()),
            }));
        }
        if let Some(fresh) = fresh
            && token.len() <= REMEMBER_UP_TO
            && fresh.exp >= crate::clock::now().as_millisecond() as f64 / 1000.0
        {
            self.remember(digest, fresh);
        }
        Ok(verified)
    }

    /// The remembered verification of the token with this digest.
    fn remembered(&self, digest: &[u8; 32]) -> Option<Remembered> {
        lock(&self.verified).get(digest).map(|r| Remembered {
            issuer: r.issuer.clone(),
            generation: r.generation,
            payload: r.payload.clone(),
            exp: r.exp,
        })
    }

    fn remember(&self, digest: [u8; 32], remembered: Remembered) {
        let mut verified = lock(&self.verified);
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
            // Read before any signature was checked: shown escaped.
            Err(IdentityError::UnknownIssuer(shown(issuer)))
        }
    }

    /// Checks the token's header, issuer and signature: its claims, and what to remember of
    /// it once it maps to an identity.
    async fn verify_signature(
        &self,
        token: &str,
        snapshot: &Snapshot,
    ) -> Result<(serde_json::Value, Option<Remembered>), IdentityError> {
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
                .and_then(|h| h["alg"].as_str().map(shown))
                .map_or(IdentityError::NotAToken, IdentityError::Algorithm)
        })?;
        if !ALLOWED.contains(&header.alg) {
            return Err(IdentityError::Algorithm(format!("{:?}", header.alg)));
        }
        // Extensions the issuer marked critical must be understood (RFC 7515 §4.1.11):
        // agentgate understands none.
        if let Some(crit) = header.crit.as_ref().filter(|c| !c.is_empty()) {
            return Err(IdentityError::Invalid(format!(
                "the token's header marks extensions agentgate does not understand as critical ({})",
                shown(&crit.join(", "))
            )));
        }
        // Which issuer? Read it unverified only to choose the keys; everything is then
        // verified with them.
        let payload = token.split('.').nth(1).ok_or(IdentityError::NotAToken)?;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| IdentityError::NotAToken)?;
        let claims: serde_json::Value =
            serde_json::from_slice(&payload).map_err(|_| IdentityError::NotAToken)?;
        let issuer = claims["iss"].as_str().unwrap_or_default().to_owned();
        self.check_trusted(&issuer, snapshot)?;
        let kid = header.kid.clone().unwrap_or_default();
        self.ensure(&issuer, Some(&kid)).await;
        let (key, generation) = self.key(&issuer, &kid, header.alg)?;
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
        let remember = data.claims["exp"].as_f64().map(|exp| Remembered {
            issuer,
            generation,
            payload: payload.into(),
            exp,
        });
        Ok((data.claims, remember))
    }
}

/// Keys by id, each with the algorithm it is for (when it names one), and the digest of the
/// set they were read from.
type KeysRead = (HashMap<String, (DecodingKey, Option<Algorithm>)>, [u8; 32]);

/// The keys of a JWK set that verify signatures, by id (with the algorithm each is for, when
/// it names one), and the digest of what was read.
fn signing_keys(set: &JwkSet) -> KeysRead {
    let mut keys = HashMap::new();
    let mut read = Vec::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        // Only keys for verifying signatures: not those published for encryption (`use`,
        // `key_ops`), nor one whose `alg` is no signature algorithm (a key for RSA-OAEP
        // must not verify RS256 as if it named no algorithm).
        let for_signatures = !matches!(
            &jwk.common.public_key_use,
            Some(u) if *u != jsonwebtoken::jwk::PublicKeyUse::Signature
        ) && jwk
            .common
            .key_operations
            .as_ref()
            .is_none_or(|ops| ops.contains(&jsonwebtoken::jwk::KeyOperations::Verify));
        let alg = match jwk.common.key_algorithm {
            None => Some(None),
            Some(a) => a.to_string().parse::<Algorithm>().ok().map(Some),
        };
        if let (true, Some(alg), Ok(k)) = (for_signatures, alg, DecodingKey::from_jwk(jwk)) {
            read.push(serde_json::to_string(jwk).unwrap_or_default());
            keys.insert(kid, (k, alg));
        }
    }
    read.sort();
    let mut digest = Sha256::new();
    for k in &read {
        digest.update(k.as_bytes());
        digest.update([0]);
    }
    (keys, digest.finalize().into())
}

/// A value read from a token before its signature was checked, as messages and logs show
/// it: control characters escaped (a line break would forge a log line), at most 200
/// characters.
fn shown(unverified: &str) -> String {
    let mut out: String = unverified
        .chars()
        .take(200)
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect();
    if unverified.chars().nth(200).is_some() {
        out.push('…');
    }
    out
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
    map_claims(claims, issuer, sa_issuer, snapshot)
}

/// The token's audiences (`aud`: one string or an array of them).
fn audiences(claims: &serde_json::Value) -> Vec<String> {
    match &claims["aud"] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// Maps verified claims to exactly one AgentIdentity of `snapshot` (their times aside).
fn map_claims(
    claims: &serde_json::Value,
    issuer: String,
    sa_issuer: Option<&str>,
    snapshot: &Snapshot,
) -> Result<Verified, IdentityError> {
    let subject = claims["sub"].as_str().unwrap_or_default().to_owned();
    let audiences = audiences(claims);
    let matches: Vec<&AgentIdentity> = snapshot
        .identities
        .values()
        .filter(|id| {
            let by_oidc = id.spec.authentication.oidc.as_ref().is_some_and(|o| {
                // One that names neither a subject nor a claim would match every token of
                // its issuer (its CRD forbids it; a folder may hold one anyway).
                // (An empty subject or claim value names nothing: a token without `sub`
                // would match it.)
                let names_someone = match (o.subject.as_deref(), o.claims.is_empty()) {
                    (Some(""), _) | (None, true) => false,
                    _ => o.claims.iter().all(|(k, v)| !k.is_empty() && !v.is_empty()),
                };
                names_someone
                    && !subject.is_empty()
                    && o.issuer == issuer
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
                    // (Never the namespace's default service account: every pod that names
                    // none holds its tokens.)
                    .is_some_and(|sa| {
                        sa.name != "default" && {
                            let ns = sa
                                .namespace
                                .clone()
                                .or_else(|| id.metadata.namespace.clone())
                                .unwrap_or_else(|| "default".into());
                            subject == format!("system:serviceaccount:{ns}:{}", sa.name)
                        }
                    });
            by_oidc || by_sa
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(Verified {
            identity: one.metadata.name.clone().unwrap_or_default(),
            issuer,
            subject,
            claims: Arc::new(claims.clone()),
            review: None,
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
        token_from(key, ISSUER, kid, sub)
    }

    fn snapshot(subject: &str) -> Snapshot {
        folder::load_str(&format!(
            "apiVersion: agentgate.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{ name: robot }}\nspec:\n  owner: t\n  authentication:\n    oidc: {{ issuer: \"{ISSUER}\", audience: agents, subject: {subject} }}\n"
        ))
        .expect("the identity loads")
    }

    fn signed(key: &EcdsaKeyPair, header: &str, payload: &str) -> String {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let sig = key
            .sign(&aws_lc_rs::rand::SystemRandom::new(), message.as_bytes())
            .expect("signed");
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    #[tokio::test]
    async fn critical_extensions_and_forged_log_lines_are_refused() {
        let verifier = Verifier::new(None, None).expect("a verifier");
        let (k1, d1) = key();
        verifier
            .pin_key(ISSUER, "k1", d1, Some(Algorithm::ES256))
            .await;
        let snap = snapshot("robot-sub");
        let now = crate::clock::now().as_second();
        let payload = format!(
            r#"{{"iss":"{ISSUER}","aud":"agents","sub":"robot-sub","exp":{}}}"#,
            now + 600
        );
        let crit = signed(
            &k1,
            r#"{"alg":"ES256","kid":"k1","crit":["x-bind"],"x-bind":"z"}"#,
            &payload,
        );
        let e = verifier.verify(&crit, &snap).await.unwrap_err().to_string();
        assert!(e.contains("critical (x-bind)"), "{e}");
        // An unverified issuer or algorithm is shown escaped: no line of its own in a log.
        let forged = signed(
            &k1,
            r#"{"alg":"ES256","kid":"k1"}"#,
            r#"{"iss":"x\n2026-01-01 INFO token verified identity=admin","sub":"s","aud":"a","exp":1}"#,
        );
        let e = verifier
            .verify(&forged, &snap)
            .await
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n') && e.contains("x\\n2026"), "{e}");
        let alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode("{\"alg\":\"none\\nINFO forged\"}"),
            URL_SAFE_NO_PAD.encode(&payload)
        );
        let e = verifier.verify(&alg, &snap).await.unwrap_err().to_string();
        assert!(!e.contains('\n') && e.contains("none\\nINFO"), "{e}");
    }

    #[test]
    fn keys_published_for_encryption_verify_nothing() {
        let (k, _) = key();
        let point = k.public_key().as_ref().to_vec();
        let (x, y) = point[1..].split_at(32);
        let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
        let jwk = |kid: &str, extra: &str| {
            format!(r#"{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"{kid}"{extra}}}"#)
        };
        let set: JwkSet = serde_json::from_str(&format!(
            r#"{{"keys":[{},{},{},{},{}]}}"#,
            jwk("sig", r#","use":"sig","alg":"ES256""#),
            jwk("plain", ""),
            jwk("enc", r#","use":"enc""#),
            jwk("ops", r#","key_ops":["encrypt"]"#),
            jwk("oaep", r#","alg":"RSA-OAEP""#),
        ))
        .expect("a JWK set");
        let (keys, _) = signing_keys(&set);
        let mut ids: Vec<&str> = keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["plain", "sig"]);
    }

    #[test]
    fn a_session_ends_with_its_token() {
        let verifier = Verifier::new(None, None).expect("a verifier");
        let now = crate::clock::now().as_second();
        let with_exp = |exp: i64| Verified {
            identity: "robot".into(),
            issuer: ISSUER.into(),
            subject: "s".into(),
            claims: Arc::new(serde_json::json!({ "exp": exp })),
            review: None,
        };
        assert_eq!(verifier.still_valid(&with_exp(now + 60)), Ok(()));
        // Within the leeway still.
        assert_eq!(verifier.still_valid(&with_exp(now - 10)), Ok(()));
        let e = verifier.still_valid(&with_exp(now - 120)).unwrap_err();
        assert!(
            e.contains("the token this session began with expired at")
                && e.contains("connect again with a new token"),
            "{e}"
        );
        // A service-account token that cannot be asked about again is refused.
        let mut v = with_exp(now + 60);
        v.review = Some(Arc::new(Review {
            token: "t".into(),
            audience: AUDIENCE.into(),
            subject: "s".into(),
            state: std::sync::Mutex::new(ReviewState {
                at: Instant::now() - REVIEW_EVERY,
                ..ReviewState::new()
            }),
        }));
        let e = verifier.still_valid(&v).unwrap_err();
        assert!(e.contains("no TokenReview client"), "{e}");
        // An API server that cannot be asked refuses for a while, not for good; one that
        // says the token is gone refuses for good.
        let mut state = ReviewState::new();
        state.answered(Err(pod::ReviewError::Unreachable("timeout".into())), "s");
        assert!(state.refused.is_none() && state.unreachable.is_some());
        state.answered(Ok("s".into()), "s");
        assert!(state.refused.is_none() && state.unreachable.is_none());
        state.answered(Err(pod::ReviewError::Refused("gone".into())), "s");
        assert_eq!(state.refused.as_deref(), Some("gone"));
        // Not confirmed for too long: refused, saying why.
        let stale = Verified {
            review: Some(Arc::new(Review {
                token: "t".into(),
                audience: AUDIENCE.into(),
                subject: "s".into(),
                state: std::sync::Mutex::new(ReviewState {
                    confirmed: Instant::now() - CONFIRMED_FOR - Duration::from_secs(1),
                    unreachable: Some("TokenReview failed: connection refused".into()),
                    asking: true,
                    ..ReviewState::new()
                }),
            })),
            ..with_exp(now + 60)
        };
        let e = verifier.still_valid(&stale).unwrap_err();
        assert!(
            e.contains("has not confirmed it for") && e.contains("connection refused"),
            "{e}"
        );
        assert!(!format!("{v:?}").contains("token: \"t\""));
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
        // A token that maps to no identity is not remembered.
        let stranger = token(&k1, "k1", "stranger");
        assert!(verifier.verify(&stranger, &snap).await.is_err());
        assert_eq!(verifier.verified.lock().unwrap().len(), 1);
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
                payload: serde_json::to_vec(&serde_json::json!({
                    "iss": ISSUER, "aud": "agents", "sub": "robot-sub", "exp": past
                }))
                .unwrap()
                .into(),
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

    fn two_issuers(other: &str) -> Snapshot {
        folder::load_str(&format!(
            "apiVersion: agentgate.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{ name: robot }}\nspec:\n  owner: t\n  authentication:\n    oidc: {{ issuer: \"{ISSUER}\", audience: agents, subject: robot-sub }}\n---\napiVersion: agentgate.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{ name: other }}\nspec:\n  owner: t\n  authentication:\n    oidc: {{ issuer: \"{other}\", audience: agents, subject: other-sub }}\n"
        ))
        .expect("the identities load")
    }

    fn token_from(key: &EcdsaKeyPair, iss: &str, kid: &str, sub: &str) -> String {
        let now = crate::clock::now().as_second();
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"JWT"}}"#)),
            URL_SAFE_NO_PAD.encode(format!(
                r#"{{"iss":"{iss}","aud":"agents","sub":"{sub}","exp":{},"iat":{now}}}"#,
                now + 600
            ))
        );
        let sig = key
            .sign(&aws_lc_rs::rand::SystemRandom::new(), message.as_bytes())
            .expect("signed");
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_issuer_is_asked_at_most_every_ten_seconds_and_blocks_no_other() {
        use std::sync::atomic::AtomicUsize;
        // An "issuer" that accepts connections and never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        let verifier = Arc::new(Verifier::new(None, None).expect("a verifier"));
        let (k1, d1) = key();
        verifier
            .pin_key(ISSUER, "k1", d1, Some(Algorithm::ES256))
            .await;
        let snap = Arc::new(two_issuers(&other));
        let (k2, _) = key();
        let stuck = token_from(&k2, &other, "x", "other-sub");
        let waiting = {
            let (verifier, snap, stuck) = (verifier.clone(), snap.clone(), stuck.clone());
            tokio::spawn(async move { verifier.verify(&stuck, &snap).await })
        };
        while accepted.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // While that issuer's keys are awaited, another issuer's tokens verify.
        let good = token(&k1, "k1", "robot-sub");
        assert_eq!(
            verifier.verify(&good, &snap).await.unwrap().identity,
            "robot"
        );
        assert!(!waiting.is_finished());
        // The read gives up (5 s): refused, saying why.
        let first = waiting.await.unwrap();
        assert!(
            matches!(&first, Err(IdentityError::Keys { why, .. }) if why.contains("no answer within 5s")),
            "{first:?}"
        );
        // Asked again within ten seconds: the same answer, without asking the issuer.
        let asked = accepted.load(Ordering::SeqCst);
        for _ in 0..5 {
            assert_eq!(verifier.verify(&stuck, &snap).await, first);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), asked);
    }
}
