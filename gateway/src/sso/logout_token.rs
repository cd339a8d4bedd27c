//! Logout tokens (OpenID Connect Back-Channel Logout 1.0 §2.4, §2.6): the JWT a provider
//! posts to `/auth/backchannel-logout` when a user's session there ends, so the console
//! sessions that login made end too.
//!
//! Validated like an ID token (signature under a pinned algorithm by a key of the
//! provider's JWKS, `iss`, `aud`, `azp`, `iat`, `exp` when present), then as a logout
//! token: the back-channel logout event is there, no `nonce` claim at all (so an ID token
//! cannot pass for one), a `jti` (the caller makes it single use), a `sub` or a `sid` (or
//! both), and an `iat`
//! no older than [`MAX_AGE`]. `exp` is checked when present but not required: providers
//! built to the spec's earlier drafts send none, and the `iat` bound limits such a
//! token's life as `exp` would.
//!
//! A refusal's text never quotes the token (its `kid`, its `typ`): anyone may post one,
//! and the text goes back to them and into the log.

use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use serde::Deserialize;

use super::id_token::{self, IdTokenError, Registered, Trusted};

/// The member of `events` that makes a JWT a logout token (§2.4).
pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// The oldest `iat` accepted (plus leeway): a provider posts the token as it makes it.
pub const MAX_AGE: Duration = Duration::from_secs(300);

/// Why a logout token was refused. The provider is told `invalid_request` with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogoutTokenError {
    /// Signature, issuer, audience or times, as for an ID token.
    #[error("{}", jwt_refusal(.0))]
    Jwt(#[from] IdTokenError),
    /// `iss` and `aud` name no configured provider and client.
    #[error("the logout token is from no configured provider")]
    UnknownIssuer,
    /// Explicitly typed as another kind of JWT (the type it claims, for `Debug` only).
    #[error("the logout token's typ is not logout+jwt: it is another kind of JWT")]
    Type(String),
    /// `events` lacks the back-channel logout event (or is not an object).
    #[error("the logout token carries no back-channel logout event")]
    NoEvent,
    /// It carries a `nonce`: an ID token, not a logout token.
    #[error("a logout token must not carry a nonce")]
    Nonce,
    /// No `jti`.
    #[error("the logout token has no jti")]
    NoJti,
    /// Neither `sub` nor `sid`.
    #[error("the logout token names neither sub nor sid")]
    NoSubject,
    /// `iat` is older than [`MAX_AGE`].
    #[error("the logout token was issued too long ago")]
    TooOld,
}

/// What the shared checks' refusal means for a logout token, in words of its own and
/// without anything the token holds.
fn jwt_refusal(e: &IdTokenError) -> &'static str {
    match e {
        IdTokenError::Malformed => {
            "the logout token is malformed (not a JWT of the expected claims)"
        }
        IdTokenError::Algorithm(_) => {
            "the logout token is signed with an algorithm not accepted for this provider"
        }
        IdTokenError::UnknownKey(_) => "no key of the provider's JWKS has the logout token's kid",
        IdTokenError::Signature => "the logout token's signature does not verify",
        IdTokenError::Issuer => "the logout token is from another issuer",
        IdTokenError::Audience => "the logout token is for another client",
        IdTokenError::Expired => "the logout token has expired",
        IdTokenError::NotYetValid => "the logout token is not valid yet",
        IdTokenError::Nonce => "a logout token must not carry a nonce",
    }
}

/// A verified logout token: whose sessions end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logout {
    /// The subject at the provider, when named.
    pub sub: Option<String>,
    /// The provider's session, when named: only the logins of that session end. At least
    /// one of `sub` and `sid` is there.
    pub sid: Option<String>,
    /// The token's id.
    pub jti: String,
    /// When the provider issued it (its `iat`, Unix seconds by the provider's clock): a
    /// login whose ID token the provider issued no later than this is ended by it.
    pub issued_at: i64,
    /// Until when this token would be accepted (Unix seconds): how long its `jti` must be
    /// remembered.
    pub valid_until: i64,
}

#[derive(Debug, Deserialize)]
struct LogoutClaims {
    #[serde(flatten)]
    registered: Registered,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    sid: Option<String>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    events: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The unverified `iss`, `aud` and `azp` of a JWT, to pick the provider whose keys verify
/// it.
#[derive(Debug, Deserialize)]
pub struct Addressed {
    /// Issuer.
    pub iss: String,
    /// Audience(s).
    pub aud: crate::oauth::claims::Audiences,
    /// Authorized party.
    #[serde(default)]
    pub azp: Option<String>,
}

impl Addressed {
    /// Whether the token is addressed to our client `client_id` at `issuer`: the issuer,
    /// and the authorized party when named, else one of the audiences.
    pub fn to(&self, issuer: &str, client_id: &str) -> bool {
        self.iss == issuer
            && match &self.azp {
                Some(azp) => azp == client_id,
                None => self.aud.to_vec().iter().any(|a| a == client_id),
            }
    }
}

/// Reads `iss` and `aud` without verifying anything; `None` when the token is no JWT.
pub fn addressed(token: &str) -> Option<Addressed> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Validates `token` as a logout token of the provider `trusted` describes.
pub fn verify(
    token: &str,
    jwks: &JwkSet,
    trusted: &Trusted<'_>,
) -> Result<Logout, LogoutTokenError> {
    let (header, raw): (_, serde_json::Map<String, serde_json::Value>) =
        id_token::decode_signed(token, jwks, trusted, &["iss", "aud"])?;
    // §2.6: the claim must not be there at all, `null` included
    let has_nonce = raw.contains_key("nonce");
    let claims: LogoutClaims = serde_json::from_value(serde_json::Value::Object(raw))
        .map_err(|_| IdTokenError::Malformed)?;
    // §2.4: a logout token SHOULD be typed `logout+jwt`; older providers send `JWT` or
    // nothing. Any other type is another kind of token signed by the same keys.
    match header.typ.as_deref() {
        None => {}
        Some(t)
            if ["logout+jwt", "application/logout+jwt", "JWT"]
                .iter()
                .any(|ok| t.eq_ignore_ascii_case(ok)) => {}
        Some(t) => return Err(LogoutTokenError::Type(t.to_owned())),
    }
    id_token::check_registered(&claims.registered, trusted)?;
    let now = trusted.now.unix_timestamp();
    let leeway = i64::try_from(trusted.leeway.as_secs()).unwrap_or(i64::MAX);
    let max_age = i64::try_from(MAX_AGE.as_secs()).unwrap_or(i64::MAX);
    let oldest_until = claims.registered.iat.saturating_add(max_age);
    if now >= oldest_until.saturating_add(leeway) {
        return Err(LogoutTokenError::TooOld);
    }
    let event = claims
        .events
        .as_ref()
        .and_then(|e| e.get(BACKCHANNEL_LOGOUT_EVENT));
    if !matches!(event, Some(serde_json::Value::Object(_))) {
        return Err(LogoutTokenError::NoEvent);
    }
    if has_nonce {
        return Err(LogoutTokenError::Nonce);
    }
    let jti = claims
        .jti
        .filter(|j| !j.is_empty())
        .ok_or(LogoutTokenError::NoJti)?;
    let sub = claims.sub.filter(|s| !s.is_empty());
    let sid = claims.sid.filter(|s| !s.is_empty());
    if sub.is_none() && sid.is_none() {
        return Err(LogoutTokenError::NoSubject);
    }
    let valid_until = claims
        .registered
        .exp
        .map_or(oldest_until, |exp| exp.min(oldest_until))
        .saturating_add(leeway);
    Ok(Logout {
        sub,
        sid,
        jti,
        issued_at: claims.registered.iat,
        valid_until,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::json;

    const ISSUER: &str = "https://idp.example";
    const CLIENT: &str = "portcullis";

    struct Signer {
        key: EncodingKey,
        jwks: JwkSet,
    }

    fn signer() -> Signer {
        let pair = aws_lc_rs::signature::EcdsaKeyPair::generate(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        )
        .unwrap();
        let pkcs8 = pair.to_pkcs8v1().unwrap();
        let key = EncodingKey::from_ec_der(pkcs8.as_ref());
        let public = aws_lc_rs::signature::KeyPair::public_key(&pair)
            .as_ref()
            .to_vec();
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        // an uncompressed point: 0x04 || x || y
        let jwks: JwkSet = serde_json::from_value(json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
            "x": b64(&public[1..33]), "y": b64(&public[33..65]),
        }]}))
        .unwrap();
        Signer { key, jwks }
    }

    fn now() -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn trusted() -> Trusted<'static> {
        Trusted {
            issuer: ISSUER,
            client_id: CLIENT,
            algorithms: &[Algorithm::ES256],
            leeway: Duration::from_secs(30),
            now: now(),
        }
    }

    fn good_claims() -> serde_json::Value {
        let iat = now().unix_timestamp();
        json!({
            "iss": ISSUER, "aud": CLIENT, "iat": iat, "exp": iat + 120, "jti": "j-1",
            "sub": "alice", "sid": "s-1",
            "events": { BACKCHANNEL_LOGOUT_EVENT: {} },
        })
    }

    fn sign(s: &Signer, typ: Option<&str>, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".to_owned());
        header.typ = typ.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &s.key).unwrap()
    }

    fn with(
        change: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) -> serde_json::Value {
        let mut claims = good_claims();
        change(claims.as_object_mut().unwrap());
        claims
    }

    #[test]
    fn a_good_token_names_the_subject_session_and_how_long_to_remember_it() {
        let s = signer();
        for typ in [Some("logout+jwt"), Some("JWT"), None] {
            let logout = verify(&sign(&s, typ, &good_claims()), &s.jwks, &trusted()).unwrap();
            assert_eq!(logout.sub.as_deref(), Some("alice"));
            assert_eq!(logout.sid.as_deref(), Some("s-1"));
            assert_eq!(logout.jti, "j-1");
            assert_eq!(logout.issued_at, now().unix_timestamp());
            assert_eq!(logout.valid_until, now().unix_timestamp() + 120 + 30);
        }
        // a sid alone names the sessions too
        let sid_only = with(|c| {
            c.remove("sub");
        });
        let logout = verify(&sign(&s, None, &sid_only), &s.jwks, &trusted()).unwrap();
        assert_eq!((logout.sub, logout.sid.as_deref()), (None, Some("s-1")));
        // without `exp`, the token is remembered as long as its `iat` is accepted
        let no_exp = with(|c| {
            c.remove("exp");
        });
        let logout = verify(&sign(&s, None, &no_exp), &s.jwks, &trusted()).unwrap();
        assert_eq!(logout.valid_until, now().unix_timestamp() + 300 + 30);
    }

    #[test]
    fn what_is_not_a_logout_token_is_refused_precisely() {
        let s = signer();
        let refused = |typ: Option<&str>, claims: serde_json::Value| {
            verify(&sign(&s, typ, &claims), &s.jwks, &trusted()).unwrap_err()
        };
        assert_eq!(
            refused(Some("at+jwt"), good_claims()),
            LogoutTokenError::Type("at+jwt".to_owned())
        );
        assert_eq!(
            refused(
                None,
                with(|c| {
                    c.remove("events");
                })
            ),
            LogoutTokenError::NoEvent
        );
        assert_eq!(
            refused(
                None,
                with(|c| {
                    c.insert("events".into(), json!({ BACKCHANNEL_LOGOUT_EVENT: "yes" }));
                })
            ),
            LogoutTokenError::NoEvent
        );
        // an ID token of the same provider, even with an events claim added
        assert_eq!(
            refused(
                None,
                with(|c| {
                    c.insert("nonce".into(), json!("n"));
                })
            ),
            LogoutTokenError::Nonce
        );
        assert_eq!(
            refused(
                None,
                with(|c| {
                    c.remove("jti");
                })
            ),
            LogoutTokenError::NoJti
        );
        assert_eq!(
            refused(
                None,
                with(|c| {
                    c.remove("sub");
                    c.remove("sid");
                })
            ),
            LogoutTokenError::NoSubject
        );
        assert_eq!(
            refused(
                None,
                with(|c| {
                    c.insert("aud".into(), json!("another-client"));
                })
            ),
            LogoutTokenError::Jwt(IdTokenError::Audience)
        );
        assert_eq!(
            refused(
                None,
                with(|c| {
                    c.insert("iss".into(), json!("https://evil.example"));
                })
            ),
            LogoutTokenError::Jwt(IdTokenError::Issuer)
        );
        let iat = now().unix_timestamp();
        assert_eq!(
            refused(
                None,
                with(|c| {
                    c.insert("exp".into(), json!(iat - 31));
                })
            ),
            LogoutTokenError::Jwt(IdTokenError::Expired)
        );
        assert_eq!(
            refused(
                None,
                with(|c| {
                    c.insert("iat".into(), json!(iat - 331));
                    c.remove("exp");
                })
            ),
            LogoutTokenError::TooOld
        );
        assert_eq!(
            refused(
                None,
                with(|c| {
                    c.insert("iat".into(), json!(iat + 60));
                })
            ),
            LogoutTokenError::Jwt(IdTokenError::NotYetValid)
        );
        assert_eq!(
            refused(
                None,
                with(|c| {
                    c.remove("iat");
                })
            ),
            LogoutTokenError::Jwt(IdTokenError::Malformed)
        );
        // signed by a key the provider does not publish
        let other = signer();
        assert_eq!(
            verify(&sign(&other, None, &good_claims()), &s.jwks, &trusted()).unwrap_err(),
            LogoutTokenError::Jwt(IdTokenError::Signature)
        );
    }

    #[test]
    fn the_addressee_is_read_without_verification_and_garbage_is_none() {
        let s = signer();
        let a = addressed(&sign(&s, None, &good_claims())).unwrap();
        assert_eq!(a.iss, ISSUER);
        assert_eq!(a.aud.to_vec(), vec![CLIENT.to_owned()]);
        for garbage in ["", "a.b.c", "no-dots", "..", "x.eyJpc3MiOjF9.y"] {
            assert!(addressed(garbage).is_none(), "{garbage}");
        }
    }

    #[test]
    fn a_null_nonce_is_a_nonce_and_refusals_never_quote_the_token() {
        let s = signer();
        let null_nonce = with(|c| {
            c.insert("nonce".into(), serde_json::Value::Null);
        });
        assert_eq!(
            verify(&sign(&s, None, &null_nonce), &s.jwks, &trusted()).unwrap_err(),
            LogoutTokenError::Nonce
        );
        let typed = verify(
            &sign(&s, Some("evil\"typ"), &good_claims()),
            &s.jwks,
            &trusted(),
        )
        .unwrap_err();
        assert_eq!(typed, LogoutTokenError::Type("evil\"typ".to_owned()));
        assert!(!typed.to_string().contains("evil"), "{typed}");
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("evil-kid".to_owned());
        let unknown = jsonwebtoken::encode(&header, &good_claims(), &s.key).unwrap();
        let e = verify(&unknown, &s.jwks, &trusted()).unwrap_err();
        assert_eq!(
            e,
            LogoutTokenError::Jwt(IdTokenError::UnknownKey(Some("evil-kid".to_owned())))
        );
        assert!(!e.to_string().contains("evil"), "{e}");
    }

    #[test]
    fn the_authorized_party_picks_the_client_among_several_audiences() {
        let s = signer();
        let a = addressed(&sign(&s, None, &good_claims())).unwrap();
        assert!(a.to(ISSUER, CLIENT));
        assert!(!a.to(ISSUER, "other") && !a.to("https://other.example", CLIENT));
        let several = with(|c| {
            c.insert("aud".into(), json!(["other", CLIENT]));
            c.insert("azp".into(), json!(CLIENT));
        });
        let a = addressed(&sign(&s, None, &several)).unwrap();
        assert!(a.to(ISSUER, CLIENT) && !a.to(ISSUER, "other"));
        assert!(verify(&sign(&s, None, &several), &s.jwks, &trusted()).is_ok());
    }
}
