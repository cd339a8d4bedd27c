//! ID token validation (OpenID Connect Core §3.1.3.7): signature by a key of the
//! provider's JWKS under a pinned algorithm, `iss`, `aud`, `azp`, `exp`, `iat`, `nbf`
//! (against the instance's clock, with leeway) and `nonce`.

use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::oauth::claims::Audiences;

/// Why an ID token was refused. Logged; the browser is told only that the login failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    /// Not a JWT, or claims of the wrong shape.
    #[error("the ID token is malformed")]
    Malformed,
    /// Signed with an algorithm not configured for this provider (`none`, HS256, …).
    #[error("ID token algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    /// No key of the provider's JWKS has this `kid` (the caller refetches once).
    #[error("no provider key has kid {0:?}")]
    UnknownKey(Option<String>),
    /// The signature does not verify, or the key does not fit the algorithm.
    #[error("the ID token signature does not verify")]
    Signature,
    /// `iss` is not the provider.
    #[error("the ID token is from another issuer")]
    Issuer,
    /// `aud` does not include our client id, or `azp` names another client.
    #[error("the ID token is for another client")]
    Audience,
    /// Past `exp` (plus leeway).
    #[error("the ID token has expired")]
    Expired,
    /// `iat` or `nbf` in the future (beyond leeway).
    #[error("the ID token is not valid yet")]
    NotYetValid,
    /// `nonce` missing or not the one this login sent.
    #[error("the ID token nonce does not match this login")]
    Nonce,
}

/// What any JWT the provider signs for us must satisfy: an ID token, a logout token.
#[derive(Debug, Clone)]
pub struct Trusted<'a> {
    /// The provider's issuer, exactly.
    pub issuer: &'a str,
    /// Our client id at the provider.
    pub client_id: &'a str,
    /// Accepted algorithms.
    pub algorithms: &'a [Algorithm],
    /// Tolerated clock skew.
    pub leeway: Duration,
    /// Now, by the instance's clock.
    pub now: OffsetDateTime,
}

/// What the ID token must satisfy.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    /// Issuer, audience, algorithms and clock.
    pub trusted: Trusted<'a>,
    /// The nonce sent with this login.
    pub nonce: &'a str,
}

/// The registered claims of a provider's JWT that [`check_registered`] checks.
#[derive(Debug, Clone, Deserialize)]
pub struct Registered {
    /// Issuer.
    pub iss: String,
    /// Audience(s).
    pub aud: Audiences,
    /// Authorized party.
    #[serde(default)]
    pub azp: Option<String>,
    /// Expiry (Unix seconds); required of ID tokens by the decoding step.
    #[serde(default)]
    pub exp: Option<i64>,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    #[serde(default)]
    pub nbf: Option<i64>,
}

/// The claims Portcullis uses; everything else is kept in `extra` for role mapping.
#[derive(Debug, Clone, Deserialize)]
pub struct IdClaims {
    /// Issuer.
    pub iss: String,
    /// Subject at the provider.
    pub sub: String,
    /// Audience(s).
    pub aud: Audiences,
    /// Expiry (Unix seconds).
    pub exp: i64,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    #[serde(default)]
    pub nbf: Option<i64>,
    /// The login's nonce.
    #[serde(default)]
    pub nonce: Option<String>,
    /// Authorized party.
    #[serde(default)]
    pub azp: Option<String>,
    /// Email.
    #[serde(default)]
    pub email: Option<String>,
    /// Whether the provider verified the email.
    #[serde(default)]
    pub email_verified: Option<bool>,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Login name.
    #[serde(default)]
    pub preferred_username: Option<String>,
    /// Every other claim (groups and the like).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The token's `kid`, if it has a readable header.
pub fn kid_of(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid)
}

/// Validates `token` against `jwks` and `expected`.
pub fn verify(
    token: &str,
    jwks: &JwkSet,
    expected: &Expected<'_>,
) -> Result<IdClaims, IdTokenError> {
    let (_, claims): (_, IdClaims) = decode_signed(
        token,
        jwks,
        &expected.trusted,
        &["exp", "iss", "aud", "sub"],
    )?;
    let registered = Registered {
        iss: claims.iss.clone(),
        aud: claims.aud.clone(),
        azp: claims.azp.clone(),
        exp: Some(claims.exp),
        iat: claims.iat,
        nbf: claims.nbf,
    };
    check_registered(&registered, &expected.trusted)?;
    let nonce_ok = claims.nonce.as_deref().is_some_and(|n| {
        n.len() == expected.nonce.len()
            && aws_lc_rs::constant_time::verify_slices_are_equal(
                n.as_bytes(),
                expected.nonce.as_bytes(),
            )
            .is_ok()
    });
    if !nonce_ok {
        return Err(IdTokenError::Nonce);
    }
    Ok(claims)
}

/// The header and claims of `token` once its signature verifies under a key of `jwks` and
/// an algorithm of `trusted`'s, and `iss` and `aud` are `trusted`'s; the `required` claims
/// must be present. Times are not checked here: see [`check_registered`].
pub fn decode_signed<T: serde::de::DeserializeOwned>(
    token: &str,
    jwks: &JwkSet,
    trusted: &Trusted<'_>,
    required: &[&str],
) -> Result<(jsonwebtoken::Header, T), IdTokenError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| IdTokenError::Malformed)?;
    // the algorithm set is ours; the header only picks within it
    if !trusted.algorithms.contains(&header.alg) {
        return Err(IdTokenError::Algorithm(header.alg));
    }
    let jwk = match &header.kid {
        Some(kid) => jwks.find(kid),
        // without a kid, only a JWKS of exactly one key is unambiguous
        None if jwks.keys.len() == 1 => jwks.keys.first(),
        None => None,
    }
    .ok_or_else(|| IdTokenError::UnknownKey(header.kid.clone()))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| IdTokenError::Signature)?;

    let mut validation = Validation::new(header.alg);
    validation.algorithms = vec![header.alg];
    validation.set_issuer(&[trusted.issuer]);
    validation.set_audience(&[trusted.client_id]);
    validation.set_required_spec_claims(required);
    // times are checked by `check_registered` against the instance's (injectable) clock
    validation.validate_exp = false;
    validation.validate_nbf = false;
    let data = jsonwebtoken::decode::<T>(token, &key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::InvalidIssuer => IdTokenError::Issuer,
            K::InvalidAudience => IdTokenError::Audience,
            K::InvalidAlgorithm => IdTokenError::Algorithm(header.alg),
            K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => {
                IdTokenError::Signature
            }
            _ => IdTokenError::Malformed,
        }
    })?;
    Ok((header, data.claims))
}

/// `iss`, `aud` and `azp` (Core §3.1.3.7 2-5), `exp` when present, `iat` and `nbf` against
/// the instance's clock with leeway.
pub fn check_registered(claims: &Registered, trusted: &Trusted<'_>) -> Result<(), IdTokenError> {
    // belt and braces: the library checked these, but they are the heart of the matter
    if claims.iss != trusted.issuer {
        return Err(IdTokenError::Issuer);
    }
    let audiences = claims.aud.to_vec();
    if !audiences.iter().any(|a| a == trusted.client_id) {
        return Err(IdTokenError::Audience);
    }
    // Core §3.1.3.7 (4, 5): with several audiences azp must be present, and when present
    // it must be us
    match &claims.azp {
        Some(azp) if azp != trusted.client_id => return Err(IdTokenError::Audience),
        None if audiences.len() > 1 => return Err(IdTokenError::Audience),
        _ => {}
    }

    let now = trusted.now.unix_timestamp();
    let leeway = i64::try_from(trusted.leeway.as_secs()).unwrap_or(i64::MAX);
    if claims
        .exp
        .is_some_and(|exp| now >= exp.saturating_add(leeway))
    {
        return Err(IdTokenError::Expired);
    }
    if claims.iat > now.saturating_add(leeway)
        || claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(leeway))
    {
        return Err(IdTokenError::NotYetValid);
    }
    Ok(())
}
