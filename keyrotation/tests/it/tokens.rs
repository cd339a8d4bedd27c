//! Signing and verifying: round trips for every algorithm, and every rejection.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use keyrotation::{KeyAlgorithm, KeyError, KeyRing, Keys, Policy, TokenType, VerifyParams};
use serde_json::json;

use crate::common::{
    AUDIENCE, Claims, HOUR, ISSUER, LEEWAY, all_algorithms, claims, header_of, jwks_kids,
    keys_with, params, t0,
};

/// Re-assembles a token from a header and claims, with the given signature bytes.
fn forge(header: &serde_json::Value, claims: &serde_json::Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

fn kid_of(keys: &Keys) -> String {
    keys.jwks(t0())["keys"][0]["kid"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn tokens_round_trip_for_every_algorithm() {
    for alg in all_algorithms() {
        let now = t0();
        let (_, keys) = keys_with(alg, now);
        let issued = claims(now, HOUR);
        let token = keys.sign(&issued, now).unwrap();

        let header = header_of(&token);
        assert_eq!(header["alg"], alg.as_str());
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], kid_of(&keys).as_str());

        let verified: Claims = keys.verify(&token, &params(&[alg]), now).unwrap();
        assert_eq!(verified, issued, "{alg}");
        // Pinning several algorithms works too.
        let verified: Claims = keys
            .verify(&token, &params(&all_algorithms()), now)
            .unwrap();
        assert_eq!(verified, issued);
    }
}

#[test]
fn a_relying_party_verifies_our_tokens_from_the_jwks_alone() {
    for alg in all_algorithms() {
        let now = t0();
        let (_, keys) = keys_with(alg, now);
        let token = keys.sign(&claims(now, HOUR), now).unwrap();

        // What a relying party does: fetch JWKS, pick the key by kid, verify.
        let jwks: JwkSet = serde_json::from_value(keys.jwks(now)).unwrap();
        let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
        let jwk = jwks.find(&kid).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(alg.jwt_algorithm());
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        // The tokens are dated 2030; jsonwebtoken checks exp against the real clock, which
        // is earlier, so that passes; nbf is in the future for it, so skip that check.
        validation.validate_nbf = false;
        let data = jsonwebtoken::decode::<Claims>(&token, &key, &validation).unwrap();
        assert_eq!(data.claims.sub, "executor-orders", "{alg}");
    }
}

#[test]
fn jwks_carries_public_members_only() {
    let now = t0();
    for (alg, expected) in [
        (KeyAlgorithm::ES256, json!({"kty": "EC", "crv": "P-256"})),
        (KeyAlgorithm::EdDSA, json!({"kty": "OKP", "crv": "Ed25519"})),
        (KeyAlgorithm::RS256, json!({"kty": "RSA", "e": "AQAB"})),
    ] {
        let (_, keys) = keys_with(alg, now);
        let jwk = &keys.jwks(now)["keys"][0];
        for (member, value) in expected.as_object().unwrap() {
            assert_eq!(&jwk[member], value, "{alg} {member}");
        }
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["alg"], alg.as_str());
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(jwk.get(private).is_none(), "{alg} leaks {private}");
        }
    }
}

#[test]
fn alg_none_is_rejected() {
    let now = t0();
    let (_, keys) = keys_with(KeyAlgorithm::ES256, now);
    let header = json!({"alg": "none", "kid": kid_of(&keys), "typ": "JWT"});
    let body = serde_json::to_value(claims(now, HOUR)).unwrap();
    for token in [
        forge(&header, &body, b""),
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(body.to_string())
        ),
    ] {
        let err = keys
            .verify::<Claims>(&token, &params(&all_algorithms()), now)
            .unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::DisallowedAlgorithm | KeyError::MalformedToken(_)
            ),
            "{err}"
        );
        assert!(err.is_token_rejection());
    }
}

#[test]
fn hs256_signed_with_the_public_key_is_rejected() {
    let now = t0();
    for alg in all_algorithms() {
        let (_, keys) = keys_with(alg, now);
        let jwk = keys.jwks(now)["keys"][0].clone();
        let kid = kid_of(&keys);
        // The classic confusion attack: use public key material as an HMAC secret.
        let mut candidates = vec![jwk.to_string().into_bytes()];
        for member in ["x", "y", "n"] {
            if let Some(v) = jwk[member].as_str() {
                candidates.push(v.as_bytes().to_vec());
                candidates.push(URL_SAFE_NO_PAD.decode(v).unwrap());
            }
        }
        for secret in candidates {
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            header.kid = Some(kid.clone());
            let token = jsonwebtoken::encode(
                &header,
                &claims(now, HOUR),
                &jsonwebtoken::EncodingKey::from_secret(&secret),
            )
            .unwrap();
            let err = keys
                .verify::<Claims>(&token, &params(&all_algorithms()), now)
                .unwrap_err();
            assert!(matches!(err, KeyError::DisallowedAlgorithm), "{alg}: {err}");
        }
    }
}

#[test]
fn unknown_or_missing_kid_is_rejected() {
    let now = t0();
    let (_, keys) = keys_with(KeyAlgorithm::ES256, now);
    // Signed by a key of another ring.
    let (_, other) = keys_with(KeyAlgorithm::ES256, now);
    let foreign = other.sign(&claims(now, HOUR), now).unwrap();
    let err = keys
        .verify::<Claims>(&foreign, &params(&[KeyAlgorithm::ES256]), now)
        .unwrap_err();
    assert!(matches!(err, KeyError::UnknownKid), "{err}");

    let token = keys.sign(&claims(now, HOUR), now).unwrap();
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut header = header_of(&token);
    header.as_object_mut().unwrap().remove("kid");
    parts[0] = URL_SAFE_NO_PAD.encode(header.to_string());
    let err = keys
        .verify::<Claims>(&parts.join("."), &params(&[KeyAlgorithm::ES256]), now)
        .unwrap_err();
    assert!(matches!(err, KeyError::MissingKid), "{err}");
}

/// RFC 8725 §3.11: a token verifies only as the kind (`typ`) it was signed as, so that an
/// access token verifier never takes another JWT the same keys signed for one.
#[test]
fn a_token_verifies_only_as_the_kind_it_was_signed_as() {
    let now = t0();
    let (_, keys) = keys_with(KeyAlgorithm::ES256, now);
    let as_jwt = params(&[KeyAlgorithm::ES256]);
    let as_access = VerifyParams {
        token_type: TokenType::AccessToken,
        ..params(&[KeyAlgorithm::ES256])
    };
    let jwt = keys.sign(&claims(now, HOUR), now).unwrap();
    let access = keys
        .sign_typed(&claims(now, HOUR), TokenType::AccessToken, now)
        .unwrap();
    assert_eq!(header_of(&jwt)["typ"], "JWT");
    assert_eq!(header_of(&access)["typ"], "at+jwt");
    assert_eq!(header_of(&access)["kid"], header_of(&jwt)["kid"]);

    keys.verify::<Claims>(&jwt, &as_jwt, now).unwrap();
    keys.verify::<Claims>(&access, &as_access, now).unwrap();
    for (token, params) in [(&jwt, &as_access), (&access, &as_jwt)] {
        let err = keys.verify::<Claims>(token, params, now).unwrap_err();
        assert!(matches!(err, KeyError::WrongTokenType), "{err}");
        assert!(err.is_token_rejection());
    }

    // without `typ`, or another one: refused, before the key is even looked up
    for typ in [None, Some("JWT"), Some("JOSE"), Some("id+jwt"), Some("")] {
        let mut header = json!({ "alg": "ES256", "kid": "no-such-key" });
        if let Some(typ) = typ {
            header["typ"] = json!(typ);
        }
        let body = serde_json::to_value(claims(now, HOUR)).unwrap();
        let err = keys
            .verify::<Claims>(&forge(&header, &body, b"sig"), &as_access, now)
            .unwrap_err();
        assert!(matches!(err, KeyError::WrongTokenType), "{typ:?}: {err}");
    }
}

/// A transition from one kind to another (access tokens issued as `JWT` before they were
/// typed `at+jwt`): `also_accepted` takes the earlier kind too, and the verification says
/// which kind the token was taken as; a missing or third `typ` is still refused.
#[test]
fn a_kind_also_accepted_is_taken_and_reported_as_such() {
    let now = t0();
    let (_, keys) = keys_with(KeyAlgorithm::ES256, now);
    let transition = VerifyParams {
        token_type: TokenType::AccessToken,
        also_accepted: Some(TokenType::Jwt),
        ..params(&[KeyAlgorithm::ES256])
    };
    let jwt = keys.sign(&claims(now, HOUR), now).unwrap();
    let access = keys
        .sign_typed(&claims(now, HOUR), TokenType::AccessToken, now)
        .unwrap();
    let taken_as = |token: &str| {
        keys.verify_detailed::<Claims>(token, &transition, now)
            .unwrap()
            .token_type
    };
    assert_eq!(taken_as(&access), TokenType::AccessToken);
    assert_eq!(taken_as(&jwt), TokenType::Jwt);
    // the same `also_accepted` on a verification of plain JWTs changes nothing for them
    let plain = VerifyParams {
        also_accepted: Some(TokenType::Jwt),
        ..params(&[KeyAlgorithm::ES256])
    };
    let verified = keys.verify_detailed::<Claims>(&jwt, &plain, now).unwrap();
    assert_eq!(verified.token_type, TokenType::Jwt);

    // `JWT` in its other spellings is the same kind; no `typ`, or another, is not
    for typ in ["jwt", "application/jwt", "Application/JWT"] {
        let header = json!({ "alg": "ES256", "kid": "no-such-key", "typ": typ });
        let body = serde_json::to_value(claims(now, HOUR)).unwrap();
        let err = keys
            .verify::<Claims>(&forge(&header, &body, b"sig"), &transition, now)
            .unwrap_err();
        // past the type check: refused for its key
        assert!(matches!(err, KeyError::UnknownKid), "{typ}: {err}");
    }
    for typ in [None, Some("JOSE"), Some("id_token+jwt"), Some("jwt ")] {
        let mut header = json!({ "alg": "ES256", "kid": "no-such-key" });
        if let Some(typ) = typ {
            header["typ"] = json!(typ);
        }
        let body = serde_json::to_value(claims(now, HOUR)).unwrap();
        let err = keys
            .verify::<Claims>(&forge(&header, &body, b"sig"), &transition, now)
            .unwrap_err();
        assert!(matches!(err, KeyError::WrongTokenType), "{typ:?}: {err}");
    }
}

#[test]
fn a_type_is_named_by_its_name_or_media_type_in_any_case() {
    for typ in [
        "at+jwt",
        "AT+JWT",
        "application/at+jwt",
        "Application/At+Jwt",
    ] {
        assert!(TokenType::AccessToken.matches(typ), "{typ}");
        assert!(!TokenType::Jwt.matches(typ), "{typ}");
    }
    for typ in ["JWT", "jwt", "application/jwt"] {
        assert!(TokenType::Jwt.matches(typ), "{typ}");
        assert!(!TokenType::AccessToken.matches(typ), "{typ}");
    }
    for typ in [
        "",
        "application/",
        "at+jwt ",
        " at+jwt",
        "applicationat+jwt",
        "text/at+jwt",
        "application/application/at+jwt",
        "at+jwt\0",
        "\u{e9}t+jwt",
    ] {
        assert!(!TokenType::AccessToken.matches(typ), "{typ:?}");
    }
}

#[test]
fn wrong_issuer_or_audience_is_rejected() {
    let now = t0();
    let (_, keys) = keys_with(KeyAlgorithm::EdDSA, now);
    let p = params(&[KeyAlgorithm::EdDSA]);

    let mut wrong_iss = claims(now, HOUR);
    wrong_iss.iss = "https://evil.test".to_owned();
    let token = keys.sign(&wrong_iss, now).unwrap();
    assert!(matches!(
        keys.verify::<Claims>(&token, &p, now),
        Err(KeyError::InvalidIssuer)
    ));

    let mut wrong_aud = claims(now, HOUR);
    wrong_aud.aud = "someone-else".to_owned();
    let token = keys.sign(&wrong_aud, now).unwrap();
    assert!(matches!(
        keys.verify::<Claims>(&token, &p, now),
        Err(KeyError::InvalidAudience)
    ));

    // An audience array passes when one member is accepted.
    let mut many = serde_json::to_value(claims(now, HOUR)).unwrap();
    many["aud"] = json!(["someone-else", AUDIENCE]);
    let token = keys.sign(&many, now).unwrap();
    keys.verify::<serde_json::Value>(&token, &p, now).unwrap();
    many["aud"] = json!(["someone-else", "nobody"]);
    let token = keys.sign(&many, now).unwrap();
    assert!(matches!(
        keys.verify::<serde_json::Value>(&token, &p, now),
        Err(KeyError::InvalidAudience)
    ));

    // Missing iss or aud are rejected too.
    for member in ["iss", "aud", "exp"] {
        let mut missing = serde_json::to_value(claims(now, HOUR)).unwrap();
        missing.as_object_mut().unwrap().remove(member);
        let token = keys.sign(&missing, now).unwrap();
        assert!(
            matches!(
                keys.verify::<serde_json::Value>(&token, &p, now),
                Err(KeyError::InvalidClaim(m)) if m == member
            ),
            "{member}"
        );
    }
}

#[test]
fn expired_tokens_are_rejected_after_the_leeway() {
    let now = t0();
    let (_, keys) = keys_with(KeyAlgorithm::ES256, now);
    let p = params(&[KeyAlgorithm::ES256]);
    let token = keys.sign(&claims(now, HOUR), now).unwrap();
    let exp = now + HOUR;
    keys.verify::<Claims>(&token, &p, exp).unwrap();
    let leeway = time::Duration::try_from(LEEWAY).unwrap();
    keys.verify::<Claims>(&token, &p, exp + leeway).unwrap();
    let late = exp + leeway + time::Duration::seconds(1);
    assert!(matches!(
        keys.verify::<Claims>(&token, &p, late),
        Err(KeyError::Expired)
    ));
}

#[test]
fn tokens_not_yet_valid_are_rejected_beyond_the_leeway() {
    let now = t0();
    let (_, keys) = keys_with(KeyAlgorithm::RS256, now);
    let p = params(&[KeyAlgorithm::RS256]);
    let leeway = time::Duration::try_from(LEEWAY).unwrap();
    let mut future = claims(now, HOUR);
    future.nbf = (now + leeway).unix_timestamp();
    let token = keys.sign(&future, now).unwrap();
    keys.verify::<Claims>(&token, &p, now).unwrap();
    future.nbf = (now + leeway + time::Duration::seconds(1)).unix_timestamp();
    let token = keys.sign(&future, now).unwrap();
    assert!(matches!(
        keys.verify::<Claims>(&token, &p, now),
        Err(KeyError::NotYetValid)
    ));
}

#[test]
fn an_algorithm_outside_the_pinned_set_or_unlike_the_key_is_rejected() {
    let now = t0();
    // One ring holding an ES256 key and an EdDSA key.
    let es = keyrotation::plan(&KeyRing::empty(), &Policy::default(), now)
        .unwrap()
        .ring;
    // the EdDSA key signs at once: this test is about algorithms, not propagation
    let ed_policy = Policy {
        algorithm: KeyAlgorithm::EdDSA,
        propagation_delay: std::time::Duration::ZERO,
        ..Policy::default()
    };
    let mut ring = keyrotation::rotate_now(&es, &ed_policy, now).unwrap().ring;
    ring.keys.sort_by_key(|k| k.alg == KeyAlgorithm::EdDSA);
    assert_eq!(ring.keys.len(), 2);
    let keys = Keys::from_ring(ring.clone(), None, now).unwrap();
    let token = keys.sign(&claims(now, HOUR), now).unwrap();
    assert_eq!(header_of(&token)["alg"], "EdDSA");

    // Not pinned.
    let err = keys
        .verify::<Claims>(
            &token,
            &params(&[KeyAlgorithm::ES256, KeyAlgorithm::RS256]),
            now,
        )
        .unwrap_err();
    assert!(matches!(err, KeyError::DisallowedAlgorithm), "{err}");

    // Pinned, but the header claims ES256 for the EdDSA key.
    let mut header = header_of(&token);
    header["alg"] = json!("ES256");
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        parts[1],
        parts[2]
    );
    let err = keys
        .verify::<Claims>(&forged, &params(&all_algorithms()), now)
        .unwrap_err();
    assert!(matches!(err, KeyError::AlgorithmMismatch), "{err}");
}

#[test]
fn tampering_and_garbage_are_rejected() {
    let now = t0();
    let (_, keys) = keys_with(KeyAlgorithm::ES256, now);
    let p = params(&[KeyAlgorithm::ES256]);
    let token = keys.sign(&claims(now, HOUR), now).unwrap();
    let parts: Vec<&str> = token.split('.').collect();

    let mut tampered = serde_json::to_value(claims(now, HOUR)).unwrap();
    tampered["scope"] = json!("admin");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(tampered.to_string()),
        parts[2]
    );
    assert!(matches!(
        keys.verify::<Claims>(&forged, &p, now),
        Err(KeyError::InvalidSignature)
    ));

    let mut header = header_of(&token);
    header["crit"] = json!(["exp"]);
    let crit = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        parts[1],
        parts[2]
    );
    assert!(matches!(
        keys.verify::<Claims>(&crit, &p, now),
        Err(KeyError::UnsupportedCritical)
    ));

    for garbage in [
        "",
        "a.b",
        "a.b.c.d",
        "!!.??.**",
        &format!("{}.e30", parts[0]),
    ] {
        let err = keys.verify::<Claims>(garbage, &p, now).unwrap_err();
        assert!(err.is_token_rejection(), "{garbage}: {err}");
    }
}

#[test]
fn verify_refuses_parameters_that_accept_nothing() {
    let now = t0();
    let (_, keys) = keys_with(KeyAlgorithm::ES256, now);
    let token = keys.sign(&claims(now, HOUR), now).unwrap();
    let no_audience = VerifyParams {
        audiences: Vec::new(),
        ..params(&[KeyAlgorithm::ES256])
    };
    assert!(matches!(
        keys.verify::<Claims>(&token, &no_audience, now),
        Err(KeyError::InvalidVerifyParams(_))
    ));
    assert!(matches!(
        keys.verify::<Claims>(&token, &params(&[]), now),
        Err(KeyError::InvalidVerifyParams(_))
    ));
}

#[test]
fn an_empty_handle_signs_nothing_and_publishes_nothing() {
    let keys = Keys::empty();
    let now = t0();
    assert!(matches!(
        keys.sign(&claims(now, HOUR), now),
        Err(KeyError::NoActiveKey)
    ));
    assert_eq!(keys.jwks(now), json!({"keys": []}));
    assert_eq!(keys.generation(), 0);
    assert_eq!(keys.loaded_at(), None);
    assert!(keys.status(now).active_kid.is_none());
}

#[test]
fn debug_output_never_contains_private_keys() {
    let now = t0();
    for alg in all_algorithms() {
        let (ring, keys) = keys_with(alg, now);
        let stored = serde_json::to_value(&ring).unwrap();
        let private = stored["keys"][0]["private_key"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(private.len() > 40);
        for shown in [
            format!("{ring:?}"),
            format!("{ring:#?}"),
            format!("{:?}", ring.keys[0]),
            format!("{keys:?}"),
            serde_json::to_string(&keys.status(now)).unwrap(),
            keys.jwks(now).to_string(),
        ] {
            assert!(!shown.contains(&private), "{alg}: private key shown");
            assert!(
                !shown.contains(&private[..24]),
                "{alg}: private key prefix shown"
            );
        }
    }
}

#[test]
fn status_reports_each_key_and_the_next_rotation() {
    let now = t0();
    let (ring, keys) = keys_with(KeyAlgorithm::ES256, now);
    let later = now + HOUR * 5;
    let status = keys.status(later);
    assert_eq!(status.keys.len(), 1);
    assert_eq!(status.active_kid.as_ref(), Some(&ring.keys[0].kid));
    assert_eq!(status.active_key_age_seconds, Some(5 * 3600 + 60));
    assert_eq!(status.next_rotation_at, Some(ring.keys[0].retire_at));
    assert_eq!(status.generation, 1);
    assert_eq!(status.loaded_at, Some(now));
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["keys"][0]["state"], "active");
    assert!(json["keys"][0]["activate_at"].is_string());
}

#[test]
fn a_detailed_verification_names_the_key_and_the_window_a_cache_must_respect() {
    let now = t0();
    let (_, keys) = keys_with(KeyAlgorithm::ES256, now);
    let p = params(&[KeyAlgorithm::ES256]);
    let issued = claims(now, HOUR);
    let token = keys.sign(&issued, now).unwrap();

    let verified = keys.verify_detailed::<Claims>(&token, &p, now).unwrap();
    assert_eq!(verified.claims, issued);
    assert_eq!(verified.kid, kid_of(&keys));
    assert!(keys.trusts(&verified.kid, now));
    assert!(!keys.trusts("no-such-kid", now));

    // the window is exactly what a fresh verification accepts, leeway included
    let leeway = time::Duration::try_from(LEEWAY).unwrap();
    let last = now + HOUR + leeway;
    assert!(verified.window.contains(last));
    keys.verify::<Claims>(&token, &p, last).unwrap();
    let late = last + time::Duration::seconds(1);
    assert!(!verified.window.contains(late));
    assert!(keys.verify::<Claims>(&token, &p, late).is_err());
    let early = now - leeway - time::Duration::seconds(1);
    assert!(!verified.window.contains(early));
    assert!(keys.verify::<Claims>(&token, &p, early).is_err());
}

/// `ring` with the stored material of key `index` replaced by bytes that are no key.
fn with_damaged_key(ring: &KeyRing, index: usize) -> KeyRing {
    let mut value = serde_json::to_value(ring).unwrap();
    value["keys"][index]["private_key"] =
        json!(base64::engine::general_purpose::STANDARD.encode(b"not a PKCS#8 key at all"));
    serde_json::from_value(value).unwrap()
}

/// A key whose stored material cannot be parsed is left out (it neither signs nor
/// verifies, and is not in JWKS) and said to be, while the rest of the ring is served:
/// one damaged key no longer keeps an instance on an older ring, or without any.
#[test]
fn a_key_whose_material_cannot_be_read_is_left_out_and_the_rest_is_served() {
    let policy = Policy::default();
    let first = keyrotation::plan(&KeyRing::empty(), &policy, t0())
        .unwrap()
        .ring;
    let active = first.keys[0].clone();
    let now = active.retire_at - HOUR * 24 * 2;
    let ring = keyrotation::plan(&first, &policy, now).unwrap().ring;
    let waiting = ring
        .keys
        .iter()
        .find(|k| k.kid != active.kid)
        .unwrap()
        .clone();
    let index = |kid| ring.keys.iter().position(|k| &k.kid == kid).unwrap();
    let good = Keys::from_ring(ring.clone(), Some(1), now).unwrap();
    let signed = good.sign(&claims(now, HOUR), now).unwrap();
    assert!(good.unusable().is_empty());

    // the waiting key damaged: the active key signs and verifies as before
    let keys = Keys::from_ring(with_damaged_key(&ring, index(&waiting.kid)), Some(2), now).unwrap();
    assert_eq!(keys.unusable(), vec![waiting.kid.clone()]);
    assert_eq!(jwks_kids(&keys, now), vec![active.kid.to_string()]);
    let p = params(&all_algorithms());
    keys.verify::<Claims>(&signed, &p, now).unwrap();
    keys.verify::<Claims>(&keys.sign(&claims(now, HOUR), now).unwrap(), &p, now)
        .unwrap();
    let status = keys.status(now);
    let of = |kid: &keyrotation::Kid| status.keys.iter().find(|k| &k.kid == kid).unwrap();
    assert!(of(&active.kid).usable && of(&active.kid).published);
    assert!(!of(&waiting.kid).usable && !of(&waiting.kid).published);

    // the active key damaged: nothing signs, its tokens are not verified, the waiting key
    // is still published
    let keys = Keys::from_ring(with_damaged_key(&ring, index(&active.kid)), Some(3), now).unwrap();
    assert_eq!(keys.unusable(), vec![active.kid.clone()]);
    assert!(!keys.can_sign(now));
    assert!(matches!(
        keys.sign(&claims(now, HOUR), now),
        Err(KeyError::NoActiveKey)
    ));
    assert!(matches!(
        keys.verify::<Claims>(&signed, &p, now),
        Err(KeyError::UnknownKid)
    ));
    assert_eq!(jwks_kids(&keys, now), vec![waiting.kid.to_string()]);
}
