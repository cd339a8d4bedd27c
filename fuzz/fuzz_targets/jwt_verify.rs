//! JWT verification on arbitrary input, with a fixed ES256 key ring and the default
//! pinned algorithm set. The first byte picks the shape:
//! - 0: the rest is a token as it would arrive in `Authorization: Bearer`;
//! - 1: the rest, if it is JSON, is signed with the real key as the claims, so the
//!   claim checks (`iss`, `aud`, `exp`, `nbf`, shapes) see arbitrary values;
//! - 2: the rest replaces the JOSE header of a validly signed token.
//!
//! Whatever the input, verification must not panic, and what it accepts must satisfy
//! the policy: our issuer and audience, inside the validity window, the header we signed.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use keyrotation::{KeyAlgorithm, KeyRing, Keys, Policy, TokenType, VerifyParams};
use libfuzzer_sys::fuzz_target;
use portcullis::oauth::claims::{AccessClaims, Audiences};
use time::OffsetDateTime;

const ISSUER: &str = "https://portcullis.example";
const LEEWAY: Duration = Duration::from_secs(30);

struct Fixture {
    keys: Keys,
    params: VerifyParams,
    now: OffsetDateTime,
    /// A valid token: header, claims, signature.
    valid: String,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let now =
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let ring = keyrotation::plan(&KeyRing::empty(), &Policy::default(), now)
        .map(|p| p.ring)
        .unwrap_or_else(|e| panic!("planning a ring: {e}"));
    let keys = Keys::from_ring(ring, Some(1), now).unwrap_or_else(|e| panic!("loading: {e}"));
    let params = VerifyParams {
        issuer: ISSUER.to_owned(),
        audiences: vec![ISSUER.to_owned()],
        leeway: LEEWAY,
        algorithms: vec![
            KeyAlgorithm::ES256,
            KeyAlgorithm::EdDSA,
            KeyAlgorithm::RS256,
        ],
        token_type: TokenType::AccessToken,
        // as the gateway verifies by default (`tokens.accept_jwt_typ = true`): access
        // tokens typed `JWT` (issued so by default, `tokens.access_token_typ`, and by
        // earlier versions) are taken besides `at+jwt`
        also_accepted: Some(TokenType::Jwt),
    };
    let t = now.unix_timestamp();
    let claims = AccessClaims {
        iss: ISSUER.to_owned(),
        sub: "executor-orders".to_owned(),
        aud: Audiences::One(ISSUER.to_owned()),
        exp: t + 3600,
        iat: t,
        nbf: t,
        jti: "fuzz".to_owned(),
        scope: "jobs:read".to_owned(),
        client_id: "executor-orders".to_owned(),
        roles: vec![],
        sid: None,
    };
    let valid = keys
        .sign_typed(&claims, TokenType::AccessToken, now)
        .unwrap_or_else(|e| panic!("signing: {e}"));
    Fixture {
        keys,
        params,
        now,
        valid,
    }
});

/// What an accepted token must satisfy.
fn check_accepted(f: &Fixture, claims: &AccessClaims) {
    let now = f.now.unix_timestamp();
    let leeway = LEEWAY.as_secs() as i64;
    assert_eq!(claims.iss, ISSUER, "accepted a foreign issuer");
    assert!(
        claims.aud.to_vec().iter().any(|a| a == ISSUER),
        "accepted a foreign audience"
    );
    assert!(
        claims.exp.saturating_add(leeway) >= now,
        "accepted an expired token"
    );
    assert!(
        claims.nbf.saturating_sub(leeway) <= now,
        "accepted a token not yet valid"
    );
}

fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let token = String::from_utf8_lossy(rest);
            if let Ok(claims) = f.keys.verify::<AccessClaims>(&token, &f.params, f.now) {
                check_accepted(f, &claims);
            }
        }
        1 => {
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(rest) else {
                return;
            };
            let Ok(token) = f.keys.sign_typed(&value, TokenType::AccessToken, f.now) else {
                return;
            };
            if let Ok(claims) = f.keys.verify::<AccessClaims>(&token, &f.params, f.now) {
                check_accepted(f, &claims);
            }
            let _ = f.keys.verify::<serde_json::Value>(&token, &f.params, f.now);
        }
        _ => {
            use base64::Engine as _;
            let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rest);
            let (original, signed) = f.valid.split_once('.').unwrap_or_default();
            let token = format!("{header}.{signed}");
            if f.keys
                .verify::<AccessClaims>(&token, &f.params, f.now)
                .is_ok()
            {
                assert_eq!(
                    header, original,
                    "a changed header kept its signature valid"
                );
            }
        }
    }
});
