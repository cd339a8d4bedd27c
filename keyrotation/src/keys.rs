//! The live key handle: signing, verifying, JWKS and status over the loaded ring.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::material::{self, Material};
use crate::{KeyAlgorithm, KeyError, KeyRecord, KeyRing, KeyState, Kid};

/// The live handle on the signing keys. Cheap to clone (an `Arc`); every clone sees the
/// ring the [`Rotator`](crate::Rotator) last published.
#[derive(Clone)]
pub struct Keys {
    inner: Arc<KeysInner>,
}

struct KeysInner {
    ring: ArcSwap<LoadedRing>,
    generation: AtomicU64,
}

/// A ring with its key material parsed, swapped in as a whole.
struct LoadedRing {
    ring: KeyRing,
    /// The keys of `ring` whose material was read: what signs and verifies.
    keys: Arc<[LoadedKey]>,
    /// The keys of `ring` whose material could not be read.
    unusable: Arc<[Kid]>,
    version: Option<u64>,
    generation: u64,
    loaded_at: Option<OffsetDateTime>,
}

struct LoadedKey {
    record: KeyRecord,
    material: Material,
}

impl LoadedRing {
    /// The key that signs at `now`: the newest active one among the keys read.
    fn signer(&self, now: OffsetDateTime) -> Option<&LoadedKey> {
        self.keys
            .iter()
            .filter(|k| k.record.signs_at(now))
            .max_by_key(|k| k.record.activate_at)
    }

    /// The key `kid`, if it is published at `now`: the only keys a token may be verified
    /// with (compromised and retired keys never are).
    fn published(&self, kid: &str, now: OffsetDateTime) -> Option<&LoadedKey> {
        self.keys
            .iter()
            .find(|k| k.record.kid.as_str() == kid && k.record.is_published_at(now))
    }
}

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyParams {
    /// The exact expected `iss`.
    pub issuer: String,
    /// Accepted audiences: the token's `aud` (string or array) must contain one of them.
    /// Must not be empty.
    pub audiences: Vec<String>,
    /// Clock-skew allowance for `exp` and `nbf`.
    pub leeway: Duration,
    /// The algorithms accepted, pinned by configuration (never taken from the token).
    pub algorithms: Vec<KeyAlgorithm>,
    /// The kind of token accepted: the header's `typ` must name it (or
    /// [`Self::also_accepted`]).
    pub token_type: TokenType,
    /// Another kind accepted as well, if any: for a transition from tokens signed as that
    /// kind (access tokens issued as plain `JWT` before they were typed `at+jwt`). A token
    /// taken as this kind says so in [`Verified::token_type`]. `None`: only
    /// [`Self::token_type`].
    pub also_accepted: Option<TokenType>,
}

/// The kind of a token, carried in its header's `typ` (RFC 7515 §4.1.9): set when signing,
/// required when verifying, so that a token the keys signed for one purpose is never taken
/// for another (RFC 8725 §3.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// `JWT`: a plain JWT or JWS, as [`Keys::sign`] makes.
    Jwt,
    /// `at+jwt`: an OAuth 2.0 access token (RFC 9068 §2.1).
    AccessToken,
}

/// A verified token: its claims, the key that signed it, and when it is valid.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified<T> {
    /// The claims.
    pub claims: T,
    /// The `kid` of the key that signed it.
    pub kid: String,
    /// When the token is acceptable, leeway included.
    pub window: ValidityWindow,
    /// The kind its header's `typ` named: [`VerifyParams::token_type`], or
    /// [`VerifyParams::also_accepted`] when it was taken only as that.
    pub token_type: TokenType,
}

/// When a token is acceptable, in unix seconds with the verifier's leeway applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValidityWindow {
    /// `nbf - leeway`, when the token has an `nbf`.
    pub not_before: Option<f64>,
    /// `exp + leeway`.
    pub until: f64,
}

impl ValidityWindow {
    /// Whether `now` falls inside the window, by the same rule a verification applies.
    pub fn contains(&self, now: OffsetDateTime) -> bool {
        let now_s = now.unix_timestamp_nanos() as f64 / 1e9;
        now_s <= self.until && self.not_before.is_none_or(|nb| nb <= now_s)
    }
}

/// The state of the ring at an instant, for the admin API and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingStatus {
    /// The instant the status describes.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The key signing at `at`, if any.
    pub active_kid: Option<Kid>,
    /// How long the active key has been signing, in seconds.
    pub active_key_age_seconds: Option<i64>,
    /// When the active key stops signing (the next rotation).
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_rotation_at: Option<OffsetDateTime>,
    /// Source version of the loaded ring (KV v2 version or file counter).
    pub ring_version: Option<u64>,
    /// How many rings this handle has loaded.
    pub generation: u64,
    /// When the current ring was loaded.
    #[serde(with = "time::serde::rfc3339::option")]
    pub loaded_at: Option<OffsetDateTime>,
    /// Every key of the ring, oldest first.
    pub keys: Vec<KeyStatus>,
}

/// The key that signs at an instant ([`Keys::signer_at`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// Its id.
    pub kid: Kid,
    /// Its algorithm.
    pub alg: KeyAlgorithm,
    /// When it stops verifying.
    pub expire_at: OffsetDateTime,
}

/// One key in a [`RingStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// Key id.
    pub kid: Kid,
    /// Algorithm.
    pub alg: KeyAlgorithm,
    /// Effective state at the status instant.
    pub state: KeyState,
    /// Whether the key is in JWKS at the status instant.
    pub published: bool,
    /// Whether its key material could be read. A key whose material cannot (a ring edited
    /// by hand, damaged in storage) neither signs nor verifies, nor is it in JWKS; the
    /// rest of the ring is served all the same.
    #[serde(default = "usable_by_default")]
    pub usable: bool,
    /// When it was generated.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Planned publication.
    #[serde(with = "time::serde::rfc3339")]
    pub publish_at: OffsetDateTime,
    /// Planned activation.
    #[serde(with = "time::serde::rfc3339")]
    pub activate_at: OffsetDateTime,
    /// Planned end of signing.
    #[serde(with = "time::serde::rfc3339")]
    pub retire_at: OffsetDateTime,
    /// Planned end of verification.
    #[serde(with = "time::serde::rfc3339")]
    pub expire_at: OffsetDateTime,
    /// When it was declared compromised, if it was.
    #[serde(with = "time::serde::rfc3339::option")]
    pub compromised_at: Option<OffsetDateTime>,
    /// Why it was declared compromised.
    pub compromise_reason: Option<String>,
}

fn usable_by_default() -> bool {
    true
}

/// Header members the verifier looks at.
#[derive(Deserialize)]
struct TokenHeader<'a> {
    alg: String,
    kid: Option<String>,
    crit: Option<Value>,
    /// Borrowed from the decoded header (copied only if it holds JSON escapes).
    #[serde(borrow)]
    typ: Option<Cow<'a, str>>,
}

// === impl TokenType ===

impl TokenType {
    /// How many there are.
    pub(crate) const COUNT: usize = 2;
    /// Every one, in [`Self::index`] order.
    pub(crate) const ALL: [Self; Self::COUNT] = [Self::Jwt, Self::AccessToken];

    /// The `typ` a token of this kind is signed with.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jwt => "JWT",
            Self::AccessToken => "at+jwt",
        }
    }

    /// Its place in [`Self::ALL`].
    pub(crate) fn index(self) -> usize {
        match self {
            Self::Jwt => 0,
            Self::AccessToken => 1,
        }
    }

    /// Whether a header's `typ` names this kind: its name, or its media type
    /// (`application/` prefixed), in any case (RFC 7515 §4.1.9; RFC 9068 §4 for
    /// `at+jwt`). Compares bytes in place.
    pub fn matches(self, typ: &str) -> bool {
        const MEDIA: &[u8] = b"application/";
        let typ = typ.as_bytes();
        let bare = match typ.split_at_checked(MEDIA.len()) {
            Some((head, rest)) if head.eq_ignore_ascii_case(MEDIA) => rest,
            _ => typ,
        };
        bare.eq_ignore_ascii_case(self.as_str().as_bytes())
    }
}

impl std::fmt::Display for TokenType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Keys ===

impl Keys {
    /// A handle with no ring loaded: signing fails with [`KeyError::NoActiveKey`], JWKS is
    /// empty, every token is rejected.
    pub fn empty() -> Self {
        Self {
            inner: Arc::new(KeysInner {
                ring: ArcSwap::from_pointee(LoadedRing {
                    ring: KeyRing::empty(),
                    keys: Arc::from(Vec::new()),
                    unusable: Arc::from(Vec::new()),
                    version: None,
                    generation: 0,
                    loaded_at: None,
                }),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// A handle holding `ring` (tests, tools).
    pub fn from_ring(
        ring: KeyRing,
        version: Option<u64>,
        now: OffsetDateTime,
    ) -> Result<Self, KeyError> {
        let keys = Self::empty();
        keys.publish(ring, version, now)?;
        Ok(keys)
    }

    /// Parses the key material of `ring` once and swaps it in. Does nothing (and returns
    /// `false`) when the ring equals the loaded one.
    pub fn publish(
        &self,
        ring: KeyRing,
        version: Option<u64>,
        now: OffsetDateTime,
    ) -> Result<bool, KeyError> {
        let current = self.inner.ring.load();
        if current.loaded_at.is_some() && current.ring == ring {
            if current.version == version {
                return Ok(false);
            }
            // Same content under another version number: keep the parsed material.
            self.inner.ring.store(Arc::new(LoadedRing {
                ring,
                keys: Arc::clone(&current.keys),
                unusable: Arc::clone(&current.unusable),
                version,
                generation: current.generation,
                loaded_at: Some(now),
            }));
            return Ok(false);
        }
        ring.check()?;
        // One key whose material cannot be read must not keep the others from being served
        // (a key written by an emergency elsewhere among them): it is left out, and said.
        let mut keys = Vec::with_capacity(ring.keys.len());
        let mut unusable = Vec::new();
        for record in &ring.keys {
            match material::load(record.alg, &record.kid, &record.private_key) {
                Ok(material) => keys.push(LoadedKey {
                    record: record.clone(),
                    material,
                }),
                Err(e) => {
                    tracing::error!(kid = %record.kid, alg = ?record.alg, error = %e,
                        "a key of the ring has key material that cannot be read; it neither signs nor verifies");
                    unusable.push(record.kid.clone());
                }
            }
        }
        let (keys, unusable): (Arc<[LoadedKey]>, Arc<[Kid]>) = (keys.into(), unusable.into());
        let generation = self.inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.inner.ring.store(Arc::new(LoadedRing {
            ring,
            keys,
            unusable,
            version,
            generation,
            loaded_at: Some(now),
        }));
        Ok(true)
    }

    /// Signs `claims` with the key that is effectively active at `now`. The header carries
    /// `alg`, `kid` and `typ: JWT`.
    pub fn sign<C: Serialize + ?Sized>(
        &self,
        claims: &C,
        now: OffsetDateTime,
    ) -> Result<String, KeyError> {
        self.sign_typed(claims, TokenType::Jwt, now)
    }

    /// [`Keys::sign`] for a token of kind `typ`: the header carries `alg`, `kid` and
    /// `typ`, and only a verification expecting that kind accepts the token.
    pub fn sign_typed<C: Serialize + ?Sized>(
        &self,
        claims: &C,
        typ: TokenType,
        now: OffsetDateTime,
    ) -> Result<String, KeyError> {
        self.sign_with(typ, now, |_| Ok(claims))
            .map(|(token, _)| token)
    }

    /// The key [`Keys::sign_with`] signs with at `now` (a key whose material was read),
    /// if any.
    pub fn signer_at(&self, now: OffsetDateTime) -> Option<Signer> {
        self.inner.ring.load().signer(now).map(|k| Signer {
            kid: k.record.kid.clone(),
            alg: k.record.alg,
            expire_at: k.record.expire_at,
        })
    }

    /// [`Keys::sign_typed`] for the claims `build` makes from the record of the key that
    /// signs at `now` (so that an `exp` can end before the key stops verifying, at its
    /// `expire_at`, or the key be refused: `build`'s error is returned as it is). Returns
    /// the token and the claims.
    pub fn sign_with<C: Serialize>(
        &self,
        typ: TokenType,
        now: OffsetDateTime,
        build: impl FnOnce(&KeyRecord) -> Result<C, KeyError>,
    ) -> Result<(String, C), KeyError> {
        let loaded = self.inner.ring.load();
        let key = loaded.signer(now).ok_or(KeyError::NoActiveKey)?;
        let claims = build(&key.record)?;
        let payload = serde_json::to_vec(&claims).map_err(|e| KeyError::Claims(e.to_string()))?;
        let header_b64 = key.material.header_b64(typ);
        let mut token = String::with_capacity(header_b64.len() + payload.len() * 4 / 3 + 400);
        token.push_str(header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let signature = key.material.signer.sign(token.as_bytes())?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&signature, &mut token);
        Ok((token, claims))
    }

    /// Verifies `token` at `now` and returns its claims.
    ///
    /// Rejects: a malformed token; an `alg` outside the pinned set (so `none` and HS*); a
    /// `typ` missing or naming neither `params.token_type` nor `params.also_accepted`; a
    /// missing `kid`, or one naming no key published at `now` (compromised and retired keys
    /// are never published); an `alg` other than that key's; unknown critical headers; a bad
    /// signature; a missing or past `exp`, a future `nbf`, a wrong `iss`, an `aud` naming none
    /// of the accepted audiences (with `leeway` on the times).
    pub fn verify<T: DeserializeOwned>(
        &self,
        token: &str,
        params: &VerifyParams,
        now: OffsetDateTime,
    ) -> Result<T, KeyError> {
        self.verify_detailed(token, params, now).map(|v| v.claims)
    }

    /// [`Keys::verify`], also returning what decides whether the verification still holds
    /// later: the key that signed and the token's validity window. A caller that keeps
    /// verified tokens must, on each reuse, check that window against its clock and that
    /// [`Keys::trusts`] the key still, so that a cached answer never outlives what a fresh
    /// verification would accept.
    pub fn verify_detailed<T: DeserializeOwned>(
        &self,
        token: &str,
        params: &VerifyParams,
        now: OffsetDateTime,
    ) -> Result<Verified<T>, KeyError> {
        if params.algorithms.is_empty() {
            return Err(KeyError::InvalidVerifyParams("no algorithm is allowed"));
        }
        if params.audiences.is_empty() {
            return Err(KeyError::InvalidVerifyParams("no audience is accepted"));
        }
        let header_json = decode_header(token)?;
        let header: TokenHeader<'_> = serde_json::from_slice(&header_json)
            .map_err(|_| KeyError::MalformedToken("header is not a JOSE header"))?;
        let alg = pinned_algorithm(&header.alg, &params.algorithms)?;
        if header.crit.is_some() {
            return Err(KeyError::UnsupportedCritical);
        }
        // before the key lookup: a token of another kind never makes a caller reload the
        // ring for its `kid`
        let token_type = accepted_type(header.typ.as_deref(), params)?;
        let kid = header.kid.ok_or(KeyError::MissingKid)?;

        let loaded = self.inner.ring.load();
        let key = loaded.published(&kid, now).ok_or(KeyError::UnknownKid)?;
        if key.record.alg != alg {
            return Err(KeyError::AlgorithmMismatch);
        }

        // jsonwebtoken checks the signature; its own time checks read the system clock, so
        // they are off and the registered claims are checked below against `now`.
        let mut validation = jsonwebtoken::Validation::new(alg.jwt_algorithm());
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.material.decoding, &validation)
                .map_err(map_jwt_error)?;
        let claims = data.claims;
        let window = check_registered_claims(&claims, params, now)?;
        let claims = serde_json::from_value(Value::Object(claims))
            .map_err(|e| KeyError::ClaimsShape(e.to_string()))?;
        Ok(Verified {
            claims,
            kid,
            window,
            token_type,
        })
    }

    /// Whether a token signed by `kid` may still be accepted at `now`: the key is in the
    /// ring and published (neither retired nor declared compromised).
    pub fn trusts(&self, kid: &str, now: OffsetDateTime) -> bool {
        self.inner.ring.load().published(kid, now).is_some()
    }

    /// The JWKS document at `now`: every key that may verify a live token (next, active,
    /// retiring) — never a compromised or retired one.
    pub fn jwks(&self, now: OffsetDateTime) -> Value {
        let loaded = self.inner.ring.load();
        let keys: Vec<Value> = loaded
            .keys
            .iter()
            .filter(|k| k.record.is_published_at(now))
            .map(|k| k.material.jwk.clone())
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// The ring's state at `now`.
    pub fn status(&self, now: OffsetDateTime) -> RingStatus {
        let loaded = self.inner.ring.load();
        // the key that signs, as [`Keys::sign_with`] picks it: among the keys read
        let active = loaded.signer(now).map(|k| &k.record);
        RingStatus {
            at: now,
            active_kid: active.map(|k| k.kid.clone()),
            active_key_age_seconds: active.map(|k| (now - k.activate_at).whole_seconds()),
            next_rotation_at: active.map(|k| k.retire_at),
            ring_version: loaded.version,
            generation: loaded.generation,
            loaded_at: loaded.loaded_at,
            keys: loaded
                .ring
                .keys
                .iter()
                .map(|k| KeyStatus {
                    kid: k.kid.clone(),
                    alg: k.alg,
                    state: k.state_at(now),
                    published: k.is_published_at(now) && !loaded.unusable.contains(&k.kid),
                    usable: !loaded.unusable.contains(&k.kid),
                    created_at: k.created_at,
                    publish_at: k.publish_at,
                    activate_at: k.activate_at,
                    retire_at: k.retire_at,
                    expire_at: k.expire_at,
                    compromised_at: k.compromised.as_ref().map(|c| c.at),
                    compromise_reason: k.compromised.as_ref().map(|c| c.reason.clone()),
                })
                .collect(),
        }
    }

    /// Whether a key may sign at `now` (for readiness).
    pub fn can_sign(&self, now: OffsetDateTime) -> bool {
        self.inner.ring.load().signer(now).is_some()
    }

    /// The keys of the ring held whose key material could not be read (see
    /// [`KeyStatus::usable`]); empty when every key was read.
    pub fn unusable(&self) -> Vec<Kid> {
        self.inner.ring.load().unusable.to_vec()
    }

    /// How many rings this handle has loaded (0: none yet).
    pub fn generation(&self) -> u64 {
        self.inner.ring.load().generation
    }

    /// When the current ring was loaded (`None`: never).
    pub fn loaded_at(&self) -> Option<OffsetDateTime> {
        self.inner.ring.load().loaded_at
    }

    /// The source version of the current ring.
    pub fn ring_version(&self) -> Option<u64> {
        self.inner.ring.load().version
    }

    /// A copy of the loaded ring (what the [`Rotator`](crate::Rotator) plans from).
    pub fn ring(&self) -> KeyRing {
        self.inner.ring.load().ring.clone()
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::empty()
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loaded = self.inner.ring.load();
        f.debug_struct("Keys")
            .field("generation", &loaded.generation)
            .field("version", &loaded.version)
            .field(
                "kids",
                &loaded
                    .keys
                    .iter()
                    .map(|k| k.record.kid.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The decoded JSON of `token`'s protected header.
fn decode_header(token: &str) -> Result<Vec<u8>, KeyError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(KeyError::MalformedToken(
            "a JWT has three dot-separated parts",
        ));
    };
    URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| KeyError::MalformedToken("header is not base64url"))
}

/// The kind `typ` names among those `params` accept: [`VerifyParams::token_type`] first,
/// then [`VerifyParams::also_accepted`]. A missing `typ` names none.
fn accepted_type(typ: Option<&str>, params: &VerifyParams) -> Result<TokenType, KeyError> {
    let typ = typ.ok_or(KeyError::WrongTokenType)?;
    if params.token_type.matches(typ) {
        return Ok(params.token_type);
    }
    match params.also_accepted {
        Some(also) if also.matches(typ) => Ok(also),
        _ => Err(KeyError::WrongTokenType),
    }
}

fn pinned_algorithm(alg: &str, pinned: &[KeyAlgorithm]) -> Result<KeyAlgorithm, KeyError> {
    // Only exact names of our own algorithms can ever be accepted: `none`, HS*, PS*, …
    // never parse, whatever the configuration says.
    pinned
        .iter()
        .copied()
        .find(|a| a.as_str() == alg)
        .ok_or(KeyError::DisallowedAlgorithm)
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> KeyError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => KeyError::InvalidSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            KeyError::DisallowedAlgorithm
        }
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            KeyError::MalformedToken("claims are not a JSON object")
        }
        ErrorKind::Base64(_) | ErrorKind::InvalidToken => {
            KeyError::MalformedToken("not a compact JWS")
        }
        _ => KeyError::InvalidSignature,
    }
}

/// Reads a NumericDate claim (RFC 7519: a JSON number of seconds, possibly fractional).
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<f64>, KeyError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(KeyError::InvalidClaim(name)),
        Some(_) => Err(KeyError::InvalidClaim(name)),
    }
}

fn check_registered_claims(
    claims: &Map<String, Value>,
    params: &VerifyParams,
    now: OffsetDateTime,
) -> Result<ValidityWindow, KeyError> {
    let now_s = now.unix_timestamp_nanos() as f64 / 1e9;
    let leeway = params.leeway.as_secs_f64();
    let exp = numeric_date(claims, "exp")?.ok_or(KeyError::InvalidClaim("exp"))?;
    if now_s > exp + leeway {
        return Err(KeyError::Expired);
    }
    let nbf = numeric_date(claims, "nbf")?;
    if let Some(nbf) = nbf
        && nbf > now_s + leeway
    {
        return Err(KeyError::NotYetValid);
    }
    match claims.get("iss") {
        Some(Value::String(iss)) if *iss == params.issuer => {}
        Some(Value::String(_)) => return Err(KeyError::InvalidIssuer),
        _ => return Err(KeyError::InvalidClaim("iss")),
    }
    let accepted = |aud: &str| params.audiences.iter().any(|a| a == aud);
    let aud_ok = match claims.get("aud") {
        Some(Value::String(aud)) => accepted(aud),
        Some(Value::Array(list)) => list.iter().any(|v| v.as_str().is_some_and(accepted)),
        _ => return Err(KeyError::InvalidClaim("aud")),
    };
    if !aud_ok {
        return Err(KeyError::InvalidAudience);
    }
    Ok(ValidityWindow {
        not_before: nbf.map(|n| n - leeway),
        until: exp + leeway,
    })
}
