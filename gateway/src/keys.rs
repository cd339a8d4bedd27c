//! The gateway's side of signing keys: builds the key source and rotator from
//! configuration, runs the reload loop, turns transitions into audit events and the ring
//! into metrics, and answers JWKS, status and rotation requests.
//!
//! The key ring itself — its life cycle, Vault and file sources, signing and verifying —
//! is the `keyrotation` crate's.

use std::sync::Arc;
use std::time::Duration;

use keyrotation::{
    Clock, FileKeySource, KeyError, KeySource, Keys, ReloadOutcome, RingStatus, RotationMode,
    Rotator, TokenType, VaultKeySource, VerifyParams,
};
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, AuditEvent};
use crate::config::{Config, KeySourceKind, RotationKind};
use crate::cutoff::Cutoffs;
use crate::verified::{VerifiedAccess, VerifiedTokens};

/// How often, at most, tokens naming a key this instance does not hold make it reload the
/// ring: enough to pick up a key another instance just wrote, too rarely for forged kids
/// to turn into load on Vault.
pub const UNKNOWN_KID_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Access tokens accepted only because `tokens.accept_jwt_typ` takes `typ: JWT` (tokens of
/// versions before access tokens were typed `at+jwt`, and those issued while
/// `tokens.access_token_typ` is `JWT`): once it stays flat for the longest access-token
/// lifetime after issuing switched to `at+jwt`, the leniency can be turned off.
pub const LEGACY_TYP_METRIC: &str = "portcullis_access_tokens_legacy_typ_total";

/// What the reload interval is padded with to make the propagation delay: the reload
/// itself (one Vault read) and the clock skew between instances.
const PROPAGATION_MARGIN: Duration = Duration::from_secs(5);

/// Signing keys as one instance sees them. Cheap to clone.
#[derive(Clone)]
pub struct KeyService {
    rotator: Rotator,
    clock: Arc<dyn Clock>,
    verify: Arc<VerifyParams>,
    /// The `typ` access tokens are signed with (`tokens.access_token_typ`).
    access_token_typ: TokenType,
    vault: Option<VaultKeySource>,
    reload_interval: Duration,
    jwks_max_age: Duration,
    verified: Arc<VerifiedTokens>,
    /// The cutoffs of clients' tokens ([`crate::cutoff`]), checked on every verification.
    cutoffs: Arc<Cutoffs>,
    /// When a token with an unknown `kid` last made this instance reload; held across that
    /// reload, so that concurrent requests wait for the one reload instead of starting
    /// their own.
    unknown_kid_reload: Arc<tokio::sync::Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService")
            .field("source", &self.rotator.describe_source())
            .field("mode", &self.rotator.mode())
            .finish_non_exhaustive()
    }
}

impl KeyService {
    /// Builds the source and rotator `config` describes. Makes no request: the first
    /// reload does, so an instance starts while Vault is away.
    pub fn from_config(
        config: &Config,
        clock: Arc<dyn Clock>,
        rotation: RotationKind,
    ) -> Result<Self, KeyError> {
        let mut policy = config.key_policy()?;
        policy.propagation_delay = propagation_delay(config.keys.reload_interval);
        let (source, vault): (Arc<dyn KeySource>, Option<VaultKeySource>) = match config.keys.source
        {
            KeySourceKind::Vault => {
                let settings = config.vault.clone().ok_or_else(|| {
                    KeyError::InvalidConfig("keys.source = vault needs [vault]".to_owned())
                })?;
                let vault = VaultKeySource::new(settings)?;
                (Arc::new(vault.clone()), Some(vault))
            }
            KeySourceKind::File => {
                let dir = config.keys.file_dir.clone().ok_or_else(|| {
                    KeyError::InvalidConfig("keys.file_dir is not set".to_owned())
                })?;
                (Arc::new(FileKeySource::new(dir)?), None)
            }
        };
        let mode = match rotation {
            RotationKind::InProcess => RotationMode::InProcess,
            RotationKind::External => RotationMode::ReadOnly,
        };
        let rotator = Rotator::new(source, Keys::empty(), policy, mode, clock.clone());
        let verify = VerifyParams {
            issuer: config.issuer(),
            audiences: vec![config.issuer()],
            leeway: config.tokens.leeway,
            algorithms: config.accepted_algorithms(),
            // every token verified here is an access token, typed `at+jwt`; while
            // `tokens.accept_jwt_typ` is on (the default), also one typed `JWT`, as access
            // tokens were before they were typed and still are while
            // `tokens.access_token_typ` is `JWT` (the default; the configuration refuses
            // `JWT` with `accept_jwt_typ = false`), so that none issued by this or an earlier
            // version is refused (a config release's JWS is typed `JWT` too, but carries no
            // `iss`, `aud` or `exp`, so it never passes for an access token)
            token_type: TokenType::AccessToken,
            also_accepted: config.tokens.accept_jwt_typ.then_some(TokenType::Jwt),
        };
        Ok(Self {
            rotator,
            clock,
            verify: Arc::new(verify),
            access_token_typ: config.tokens.access_token_typ,
            vault,
            reload_interval: config.keys.reload_interval,
            jwks_max_age: jwks_max_age(config.keys.prepublish_lead),
            verified: Arc::new(VerifiedTokens::new(config.tokens.verified_cache_entries)),
            cutoffs: Arc::new(Cutoffs::new()),
            unknown_kid_reload: Arc::new(tokio::sync::Mutex::new(None)),
        })
    }

    /// Starts the reload loop, Vault token renewal and the audit forwarder; all stop when
    /// `stop` is cancelled.
    pub fn spawn(
        &self,
        audit: Audit,
        actor: String,
        stop: CancellationToken,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        // subscribe before the first reload, so the initial ring's transitions are audited
        let mut transitions = self.rotator.subscribe();
        tasks.push(tokio::spawn({
            let stop = stop.clone();
            async move {
                loop {
                    let t = tokio::select! {
                        () = stop.cancelled() => return,
                        t = transitions.recv() => t,
                    };
                    match t {
                        Ok(t) => audit.record(AuditEvent {
                            at: t.at,
                            actor: actor.clone(),
                            action: "key.transition".to_owned(),
                            target: t.kid.to_string(),
                            source_ip: None,
                            detail: serde_json::to_value(&t).unwrap_or_default().into(),
                        }),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::error!(missed = n, "audit of key transitions lagged");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        }));
        tasks.push(self.rotator.spawn(self.reload_interval, stop.clone()));
        if let Some(vault) = &self.vault {
            tasks.push(vault.spawn_token_renewal(stop.clone()));
        }
        tasks
    }

    /// The clock this instance signs and verifies by.
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// The live keys.
    pub fn keys(&self) -> &Keys {
        self.rotator.keys()
    }

    /// The rotator (reload now, health).
    pub fn rotator(&self) -> &Rotator {
        &self.rotator
    }

    /// What an access token of ours must satisfy.
    pub fn verify_params(&self) -> &VerifyParams {
        &self.verify
    }

    /// The Vault source of the ring, when the ring lives in Vault: its client (token
    /// renewed, AppRole logged in again) serves other Vault features too.
    pub fn vault(&self) -> Option<&VaultKeySource> {
        self.vault.as_ref()
    }

    /// Signs `claims` as an access token with the active key, typed as
    /// `tokens.access_token_typ` says: `JWT` (the default, which every relying party
    /// accepts) or `at+jwt` (RFC 9068 §2.1). `NoActiveKey` when none may sign now (e.g. the
    /// active key's window ended while Vault was unreachable): the caller answers 503.
    /// Anything else the keys sign goes through [`Keys::sign`], typed `JWT`, which
    /// access-token verification accepts only while `tokens.accept_jwt_typ` is on.
    /// The claims are signed as given (tests forge tokens with it); the token endpoint and
    /// console sessions issue through [`Self::sign_access`], which bounds `exp`.
    pub fn sign<C: serde::Serialize + ?Sized>(&self, claims: &C) -> Result<String, KeyError> {
        self.keys()
            .sign_typed(claims, self.access_token_typ, self.now())
    }

    /// Signs the access-token claims `build` makes from their `exp` and returns the token
    /// and the claims. The `exp` is `until` (Unix seconds), but never later than the
    /// signing key verifies: before its `expire_at` less `tokens.leeway`, whatever `keys.overlap`
    /// says (the instance that wrote the ring may run with another). Refused with
    /// [`KeyError::SignerNotAccepted`] when the key's algorithm is one this instance's
    /// verification leaves out (`keys.accepted_algorithms` narrowed too early), which would
    /// refuse the token.
    pub fn sign_access<C: serde::Serialize>(
        &self,
        until: i64,
        build: impl FnOnce(i64) -> C,
    ) -> Result<(String, C), KeyError> {
        let now = self.now();
        self.keys().sign_with(self.access_token_typ, now, |key| {
            let verifies_until = self.issuable(&key.kid, key.alg, key.expire_at, now)?;
            Ok(build(until.min(verifies_until)))
        })
    }

    /// Whether an access token can be issued now, as [`Self::sign_access`] would: a key
    /// held signs, its algorithm is accepted here, and it verifies beyond the leeway.
    /// What a refresh checks before it rotates, what readiness and
    /// `portcullis_keys_can_sign` report.
    pub fn check_can_issue(&self) -> Result<(), KeyError> {
        let now = self.now();
        let signer = self.keys().signer_at(now).ok_or(KeyError::NoActiveKey)?;
        self.issuable(&signer.kid, signer.alg, signer.expire_at, now)
            .map(|_| ())
    }

    /// The latest `exp` (Unix seconds) a token signed at `now` by the key `kid` may carry:
    /// the last whole second before its `expire_at`, less the leeway. Refused when the key's algorithm is not accepted
    /// here, or when no token it signs now would live (its end is within the leeway).
    fn issuable(
        &self,
        kid: &keyrotation::Kid,
        alg: keyrotation::KeyAlgorithm,
        expire_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<i64, KeyError> {
        if !self.verify.algorithms.contains(&alg) {
            return Err(KeyError::SignerNotAccepted {
                kid: kid.clone(),
                alg,
            });
        }
        // a token is taken until the instant `exp + leeway` inclusive, and its key only
        // before `expire_at`: so `exp + leeway` must come before it (a whole second)
        let leeway = i64::try_from(self.verify.leeway.as_secs()).unwrap_or(i64::MAX);
        let verifies_until = expire_at
            .unix_timestamp()
            .saturating_sub(leeway)
            .saturating_sub(1);
        if verifies_until <= now.unix_timestamp() {
            return Err(KeyError::NoActiveKey);
        }
        Ok(verifies_until)
    }

    /// Verifies one of our access tokens now, with the ring held.
    pub fn verify<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, KeyError> {
        self.verify_with(token, &self.verify)
    }

    /// [`Self::verify`] against `params`, counting a token taken only as a legacy `JWT`.
    fn verify_with<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        params: &VerifyParams,
    ) -> Result<T, KeyError> {
        let verified = self.keys().verify_detailed(token, params, self.now())?;
        note_token_type(verified.token_type);
        Ok(verified.claims)
    }

    /// [`Self::verify`], reloading the ring (rate-limited) and verifying again when the
    /// token names a key this instance does not hold yet. What request paths call.
    pub async fn verify_current<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
    ) -> Result<T, KeyError> {
        self.verify_current_with(token, &self.verify).await
    }

    /// [`Self::verify_current`] against `params` instead of [`Self::verify_params`]
    /// (introspection accepts any audience the token names).
    pub async fn verify_current_with<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        params: &VerifyParams,
    ) -> Result<T, KeyError> {
        self.reloading_for_unknown_kid(|| self.verify_with(token, params))
            .await
    }

    /// Verifies one of our access tokens now, with the ring held, through the memory of
    /// tokens verified before (see [`crate::verified`]).
    pub fn verify_access(&self, token: &str) -> Result<Arc<VerifiedAccess>, KeyError> {
        let verified = self
            .verified
            .verify(self.keys(), &self.verify, token, self.now())?;
        if self
            .cutoffs
            .refuses(&verified.claims.client_id, verified.claims.iat)
        {
            return Err(KeyError::Revoked);
        }
        Ok(verified)
    }

    /// The cutoffs of clients' tokens this instance enforces.
    pub fn cutoffs(&self) -> &Arc<Cutoffs> {
        &self.cutoffs
    }

    /// [`Self::verify_access`], reloading the ring (rate-limited) and verifying again when
    /// the token names a key this instance does not hold yet. What request paths call.
    pub async fn verify_access_current(
        &self,
        token: &str,
    ) -> Result<Arc<VerifiedAccess>, KeyError> {
        self.reloading_for_unknown_kid(|| self.verify_access(token))
            .await
    }

    /// Runs `verify` with the ring held and, should it find a `kid` this instance does not
    /// hold yet, once more after [`Self::reload_for_unknown_kid`] changed the ring. The one
    /// place every request path's verification goes through.
    ///
    /// An unknown `kid` is [`KeyError::UnknownKid`] (401) only when the ring held is the
    /// one stored; when it could not be reloaded, it is [`KeyError::RingUnavailable`]
    /// (503): an instance that restarted while Vault is away, or that cannot reach Vault
    /// after an emergency rotation elsewhere, must not tell clients to throw good tokens
    /// away.
    async fn reloading_for_unknown_kid<T>(
        &self,
        verify: impl Fn() -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let generation = self.keys().generation();
        match verify() {
            Err(KeyError::UnknownKid) => match self.reload_for_unknown_kid(generation).await {
                RingCheck::Changed => verify(),
                RingCheck::Current => Err(KeyError::UnknownKid),
                RingCheck::Unavailable(reason) => Err(KeyError::RingUnavailable(reason)),
            },
            other => other,
        }
    }

    /// A well-formed token named a key this instance does not hold, under ring generation
    /// `seen`: another instance may have written a key since this one last reloaded (an
    /// emergency rotation signs with its fresh key at once; a late reload, a rotation job
    /// elsewhere). Reloads the ring now and says whether it changed since `seen` (the
    /// caller verifies again), is the one stored (the caller refuses the token) or could
    /// not be reloaded (the caller cannot tell).
    ///
    /// At most one such reload per [`UNKNOWN_KID_RELOAD_INTERVAL`] per instance, and one
    /// at a time: a caller arriving while one runs waits for it and re-checks, and one
    /// arriving soon after it is answered from the last reload's outcome at once. A forged
    /// `kid` costs Vault one read every few seconds at worst.
    async fn reload_for_unknown_kid(&self, seen: u64) -> RingCheck {
        let mut last = self.unknown_kid_reload.lock().await;
        if self.keys().generation() != seen {
            // reloaded while this request waited (that reload, or the periodic one)
            return RingCheck::Changed;
        }
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < UNKNOWN_KID_RELOAD_INTERVAL) {
            metrics::counter!("portcullis_keys_unknown_kid_reloads_total", "result" => "skipped")
                .increment(1);
            return self.ring_held_check();
        }
        *last = Some(now);
        match self.rotator.reload_once().await {
            Ok(_) => {
                let changed = self.keys().generation() != seen;
                metrics::counter!("portcullis_keys_unknown_kid_reloads_total", "result" => if changed { "changed" } else { "unchanged" })
                    .increment(1);
                tracing::info!(
                    changed,
                    "a token named a key this instance did not hold; ring reloaded"
                );
                if changed {
                    RingCheck::Changed
                } else {
                    RingCheck::Current
                }
            }
            Err(e) => {
                metrics::counter!("portcullis_keys_unknown_kid_reloads_total", "result" => "failed")
                    .increment(1);
                tracing::warn!(source = %self.rotator.describe_source(), error = %e,
                    "a token named a key this instance did not hold; reloading the ring failed");
                if self.keys().generation() != seen {
                    // a ring was published all the same (the newest one read after
                    // check-and-set conflicts)
                    RingCheck::Changed
                } else {
                    self.ring_held_check()
                }
            }
        }
    }

    /// Without reloading: whether the ring held is the one stored as of the last reload,
    /// so that a `kid` it lacks is unknown to the key source too. A reload that read the
    /// ring and failed only to write its plan leaves the ring held current.
    fn ring_held_check(&self) -> RingCheck {
        if self.keys().ring_version().is_none() {
            return RingCheck::Unavailable("no key ring was loaded yet".to_owned());
        }
        let health = self.rotator.health();
        if health.consecutive_read_failures > 0 {
            return RingCheck::Unavailable(format!(
                "the last {} reloads could not read the ring ({})",
                health.consecutive_read_failures,
                health.last_error.as_deref().unwrap_or("no detail")
            ));
        }
        RingCheck::Current
    }

    /// The memory of verified access tokens.
    pub fn verified_tokens(&self) -> &VerifiedTokens {
        &self.verified
    }

    /// The JWKS document now.
    pub fn jwks(&self) -> serde_json::Value {
        self.keys().jwks(self.now())
    }

    /// How long relying parties may cache JWKS.
    pub fn jwks_max_age(&self) -> Duration {
        self.jwks_max_age
    }

    /// The ring now.
    pub fn status(&self) -> RingStatus {
        self.keys().status(self.now())
    }

    /// Brings the next rotation forward, or (with a note) retires the suspect keys as
    /// compromised. Every instance follows within its reload interval; a rotation brought
    /// forward signs with its new key only after [`propagation_delay`], and an instance
    /// meeting a key it does not hold reloads at once.
    pub async fn rotate(
        &self,
        emergency: Option<(String, keyrotation::Suspects)>,
    ) -> Result<ReloadOutcome, KeyError> {
        let outcome = match emergency {
            Some((note, suspects)) => self.rotator.emergency(note, suspects).await?,
            None => self.rotator.rotate_with_reason(None).await?,
        };
        self.record_metrics();
        Ok(outcome)
    }

    /// `Ok` when a key held can sign now, so that this instance serves: it signs and
    /// verifies with the ring held even while the key source fails (see
    /// [`Self::source_problem`]), which instances survive by design. `Err` says why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        match self.check_can_issue() {
            Ok(()) => Ok(()),
            Err(KeyError::SignerNotAccepted { .. }) => {
                Err("the active key's algorithm is not in keys.accepted_algorithms")
            }
            Err(_) => Err("no signing key is active"),
        }
    }

    /// The published keys (waiting, signing or verifying) whose algorithm
    /// `keys.accepted_algorithms` leaves out, in words safe to show: the tokens they sign
    /// or signed are refused here. `None` when every published key's algorithm is accepted.
    /// Narrowing the list is safe only once the keys of the dropped algorithm have expired
    /// (`docs/operations/keys.md`).
    pub fn algorithm_problem(&self) -> Option<String> {
        // the status, not the ring: no key material is copied for a readiness probe
        let refused: Vec<String> = self
            .status()
            .keys
            .iter()
            .filter(|k| k.published && !self.verify.algorithms.contains(&k.alg))
            .map(|k| {
                format!(
                    "{} ({:?}, {:?} until {})",
                    k.kid, k.alg, k.state, k.expire_at
                )
            })
            .collect();
        (!refused.is_empty()).then(|| {
            format!(
                "keys.accepted_algorithms leaves out the algorithm of published keys, whose \
                 tokens are refused: {}",
                refused.join(", ")
            )
        })
    }

    /// What is wrong with the key source, in words safe to show (the source's mount and
    /// path, never an address or a credential), while the last reload failed: whether
    /// the ring could not be read (the ring held may be older than the stored one) or
    /// only its plan not written. `None` when the last reload succeeded.
    pub fn source_problem(&self) -> Option<String> {
        let health = self.rotator.health();
        if health.consecutive_failures == 0 {
            return None;
        }
        let source = self.rotator.describe_source();
        let version = self
            .keys()
            .ring_version()
            .map_or_else(|| "none".to_owned(), |v| v.to_string());
        Some(if health.consecutive_read_failures > 0 {
            format!(
                "cannot read the key ring from {source} ({} reloads failed in a row); \
                 serving with the ring held (version {version})",
                health.consecutive_read_failures
            )
        } else {
            format!(
                "cannot write the key ring to {source} ({} reloads failed in a row); \
                 serving the ring as read (version {version})",
                health.consecutive_failures
            )
        })
    }

    /// The keys of the ring held whose key material cannot be read, in words safe to
    /// show (kids only): they neither sign nor verify here, and are not in JWKS. `None`
    /// when every key was read.
    pub fn material_problem(&self) -> Option<String> {
        let unusable = self.keys().unusable();
        (!unusable.is_empty()).then(|| {
            let kids: Vec<&str> = unusable.iter().map(|k| k.as_str()).collect();
            format!(
                "the key material of {} cannot be read: neither signs nor verifies",
                kids.join(", ")
            )
        })
    }

    /// Sets the key gauges from the ring as it is now, and the count of token cutoffs in
    /// force here. Called at every scrape, so the figures are never staler than the scrape
    /// itself.
    pub fn record_metrics(&self) {
        let status = self.status();
        let health = self.rotator.health();
        metrics::gauge!("portcullis_keys_active_key_age_seconds")
            .set(status.active_key_age_seconds.unwrap_or(0) as f64);
        if let Some(next) = status.next_rotation_at {
            metrics::gauge!("portcullis_keys_next_rotation_timestamp_seconds")
                .set(next.unix_timestamp() as f64);
        }
        metrics::gauge!("portcullis_keys_published")
            .set(status.keys.iter().filter(|k| k.published).count() as f64);
        metrics::gauge!("portcullis_keys_published_unaccepted").set(
            status
                .keys
                .iter()
                .filter(|k| k.published && !self.verify.algorithms.contains(&k.alg))
                .count() as f64,
        );
        metrics::gauge!("portcullis_keys_unusable")
            .set(status.keys.iter().filter(|k| !k.usable).count() as f64);
        metrics::gauge!("portcullis_token_cutoffs").set(self.cutoffs().len() as f64);
        // the same on every instance once they all hold the stored ring (absent before the
        // first load)
        if let Some(version) = status.ring_version {
            metrics::gauge!("portcullis_keys_ring_version").set(version as f64);
        }
        metrics::gauge!("portcullis_keys_can_sign").set(if self.check_can_issue().is_ok() {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("portcullis_keys_ring_reload_failures").set(health.reload_failures as f64);
        metrics::gauge!("portcullis_keys_ring_reload_consecutive_failures")
            .set(health.consecutive_failures as f64);
        if let Some(at) = health.last_success_at {
            metrics::gauge!("portcullis_keys_ring_last_reload_timestamp_seconds")
                .set(at.unix_timestamp() as f64);
        }
        // present from the first scrape, at zero until a legacy-typed token comes: "stays
        // at zero" is then something a query can see
        metrics::counter!(LEGACY_TYP_METRIC).increment(0);
        // the one writer of this label (the readiness checks write database and redis):
        // whether the key source answered the last reload, as in `source_problem`
        metrics::gauge!("portcullis_dependency_up", "dependency" => "keys").set(
            if health.consecutive_failures == 0 {
                1.0
            } else {
                0.0
            },
        );
    }
}

/// What [`KeyService::reload_for_unknown_kid`] learnt about a `kid` the ring lacked.
enum RingCheck {
    /// The ring changed since the token was checked: check it again.
    Changed,
    /// The ring held is the one stored: the `kid` is unknown.
    Current,
    /// The ring could not be reloaded (why, secret-free): whether the `kid` is known to
    /// the key source cannot be told.
    Unavailable(String),
}

/// Notes what a verified access token was taken as: one taken as `JWT` (issued by an
/// earlier version, or while `tokens.access_token_typ` is `JWT`) was accepted only because
/// `tokens.accept_jwt_typ` is on, and is counted in [`LEGACY_TYP_METRIC`]. Nothing happens
/// for an `at+jwt` token, so that path costs a comparison.
pub(crate) fn note_token_type(taken_as: TokenType) {
    if taken_as != TokenType::AccessToken {
        metrics::counter!(LEGACY_TYP_METRIC).increment(1);
    }
}

/// How long a key published by a rotation brought forward waits before it signs: two
/// reload intervals (an instance that missed one reload, e.g. Vault answered slowly, still
/// has the key) plus [`PROPAGATION_MARGIN`]. 65 s with the default 30 s interval.
pub fn propagation_delay(reload_interval: Duration) -> Duration {
    reload_interval
        .saturating_mul(2)
        .saturating_add(PROPAGATION_MARGIN)
}

/// JWKS may be cached for a quarter of the pre-publication lead (a new key is then in
/// every cache well before it signs), and never longer than 15 minutes, so that a key
/// withdrawn in an emergency leaves caches soon too.
fn jwks_max_age(lead: Duration) -> Duration {
    (lead / 4).min(Duration::from_secs(15 * 60))
}
