//! Helpers shared by the test modules.

use std::time::Duration;

use keyrotation::{
    KeyAlgorithm, KeyRing, KeySource, Keys, Policy, StoreOutcome, TokenType, VerifyParams,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::macros::datetime;

pub const ISSUER: &str = "https://portcullis.test";
pub const AUDIENCE: &str = "xxl-job-admin";
pub const LEEWAY: Duration = Duration::from_secs(30);
pub const HOUR: time::Duration = time::Duration::hours(1);
pub const DAY: time::Duration = time::Duration::days(1);

/// Where simulated time starts.
pub fn t0() -> OffsetDateTime {
    datetime!(2030-01-01 00:00 UTC)
}

/// The claims the gateway puts in an access token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    pub scope: String,
}

/// Claims issued at `now` for `lifetime`.
pub fn claims(now: OffsetDateTime, lifetime: time::Duration) -> Claims {
    Claims {
        iss: ISSUER.to_owned(),
        sub: "executor-orders".to_owned(),
        aud: AUDIENCE.to_owned(),
        exp: (now + lifetime).unix_timestamp(),
        iat: now.unix_timestamp(),
        nbf: now.unix_timestamp(),
        jti: uuid::Uuid::new_v4().to_string(),
        scope: "jobs:run".to_owned(),
    }
}

/// Verification parameters pinning `algorithms`.
pub fn params(algorithms: &[KeyAlgorithm]) -> VerifyParams {
    VerifyParams {
        issuer: ISSUER.to_owned(),
        audiences: vec![AUDIENCE.to_owned(), "other-audience".to_owned()],
        leeway: LEEWAY,
        algorithms: algorithms.to_vec(),
        token_type: TokenType::Jwt,
        also_accepted: None,
    }
}

/// Every algorithm.
pub fn all_algorithms() -> Vec<KeyAlgorithm> {
    vec![
        KeyAlgorithm::ES256,
        KeyAlgorithm::EdDSA,
        KeyAlgorithm::RS256,
    ]
}

/// A ring planned once at `now` with `alg`, loaded into `Keys`.
pub fn keys_with(alg: KeyAlgorithm, now: OffsetDateTime) -> (KeyRing, Keys) {
    let policy = Policy {
        algorithm: alg,
        ..Policy::default()
    };
    let ring = keyrotation::plan(&KeyRing::empty(), &policy, now)
        .unwrap()
        .ring;
    let keys = Keys::from_ring(ring.clone(), Some(1), now).unwrap();
    (ring, keys)
}

/// The kids of the JWKS document `keys` serves at `now`.
pub fn jwks_kids(keys: &Keys, now: OffsetDateTime) -> Vec<String> {
    keys.jwks(now)["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// The header of a compact JWS, decoded.
pub fn header_of(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// The behaviour every `KeySource` must have (the file source runs it as Vault does).
pub async fn key_source_conformance(source: &dyn KeySource) {
    assert!(
        source.load().await.unwrap().is_none(),
        "a new source holds no ring"
    );

    let ring = keyrotation::plan(&KeyRing::empty(), &Policy::default(), t0())
        .unwrap()
        .ring;
    let StoreOutcome::Stored(v1) = source.store(&ring, None).await.unwrap() else {
        panic!("the first write must succeed");
    };
    assert_eq!(
        source.store(&ring, None).await.unwrap(),
        StoreOutcome::Conflict,
        "creating twice must conflict"
    );
    let loaded = source.load().await.unwrap().unwrap();
    assert_eq!(loaded.version, v1);
    assert_eq!(loaded.value, ring);

    let later = keyrotation::plan(&ring, &Policy::default(), t0() + DAY * 25)
        .unwrap()
        .ring;
    let StoreOutcome::Stored(v2) = source.store(&later, Some(v1)).await.unwrap() else {
        panic!("a write at the current version must succeed");
    };
    assert!(v2 > v1);
    assert_eq!(
        source.store(&ring, Some(v1)).await.unwrap(),
        StoreOutcome::Conflict,
        "a write at a stale version must conflict"
    );
    let loaded = source.load().await.unwrap().unwrap();
    assert_eq!((loaded.version, &loaded.value), (v2, &later));

    // Four writers racing from the same version: exactly one wins.
    let (a, b, c, d) = tokio::join!(
        source.store(&ring, Some(v2)),
        source.store(&later, Some(v2)),
        source.store(&ring, Some(v2)),
        source.store(&later, Some(v2)),
    );
    let outcomes = [a.unwrap(), b.unwrap(), c.unwrap(), d.unwrap()];
    let winners = outcomes
        .iter()
        .filter(|o| matches!(o, StoreOutcome::Stored(_)))
        .count();
    assert_eq!(winners, 1, "{outcomes:?}");
    assert_eq!(source.load().await.unwrap().unwrap().version, v2 + 1);
    assert!(!source.describe().is_empty());
}
