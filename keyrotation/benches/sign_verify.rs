//! Cost of signing and verifying one access token, per algorithm.
//!
//! `cargo bench -p keyrotation --bench sign_verify -- --warm-up-time 1 --measurement-time 3`
//!
//! `jsonwebtoken_encode/*` is for comparison only: it is what signing would cost through
//! `jsonwebtoken::encode`, which re-parses the PKCS#8 key on every call; `Keys::sign` uses
//! a key pair parsed once per ring load.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use base64::Engine as _;
use criterion::{Criterion, criterion_group, criterion_main};
use keyrotation::{KeyAlgorithm, KeyRing, Keys, Policy, TokenType, VerifyParams};
use serde::{Deserialize, Serialize};
use time::macros::datetime;

#[derive(Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: i64,
    iat: i64,
    nbf: i64,
    jti: String,
    scope: String,
    roles: Vec<String>,
}

fn bench(c: &mut Criterion) {
    let now = datetime!(2030-01-01 00:00 UTC);
    let claims = Claims {
        iss: "https://portcullis.example".to_owned(),
        sub: "executor-orders-7".to_owned(),
        aud: "xxl-job-admin".to_owned(),
        exp: now.unix_timestamp() + 3600,
        iat: now.unix_timestamp(),
        nbf: now.unix_timestamp(),
        jti: "0b8e0f7e-7a0e-4c8e-9b7a-3f1c2d4e5f60".to_owned(),
        scope: "jobs:run jobs:read".to_owned(),
        roles: vec!["operator".to_owned()],
    };
    for alg in [
        KeyAlgorithm::ES256,
        KeyAlgorithm::EdDSA,
        KeyAlgorithm::RS256,
    ] {
        let policy = Policy {
            algorithm: alg,
            ..Policy::default()
        };
        let ring = keyrotation::plan(&KeyRing::empty(), &policy, now)
            .unwrap()
            .ring;
        let keys = Keys::from_ring(ring.clone(), Some(1), now).unwrap();
        let params = VerifyParams {
            issuer: claims.iss.clone(),
            audiences: vec![claims.aud.clone()],
            leeway: Duration::from_secs(30),
            algorithms: vec![alg],
            token_type: TokenType::Jwt,
            also_accepted: None,
        };
        let token = keys.sign(&claims, now).unwrap();

        c.bench_function(&format!("sign/{alg}"), |b| {
            b.iter(|| keys.sign(black_box(&claims), now).unwrap())
        });
        c.bench_function(&format!("verify/{alg}"), |b| {
            b.iter(|| {
                keys.verify::<Claims>(black_box(&token), &params, now)
                    .unwrap()
            })
        });

        // Comparison: jsonwebtoken::encode with an EncodingKey built once (EC and Ed only:
        // its RSA signer wants PKCS#1, the ring stores PKCS#8).
        let stored = serde_json::to_value(&ring).unwrap();
        let der = base64::engine::general_purpose::STANDARD
            .decode(stored["keys"][0]["private_key"].as_str().unwrap())
            .unwrap();
        let encoding = match alg {
            KeyAlgorithm::ES256 => Some(jsonwebtoken::EncodingKey::from_ec_der(&der)),
            KeyAlgorithm::EdDSA => Some(jsonwebtoken::EncodingKey::from_ed_der(&der)),
            _ => None,
        };
        if let Some(encoding) = encoding {
            let mut header = jsonwebtoken::Header::new(alg.jwt_algorithm());
            header.kid = Some(ring.keys[0].kid.to_string());
            c.bench_function(&format!("jsonwebtoken_encode/{alg}"), |b| {
                b.iter(|| jsonwebtoken::encode(&header, black_box(&claims), &encoding).unwrap())
            });
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
