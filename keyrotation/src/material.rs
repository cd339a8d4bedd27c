//! Key material: generation (aws-lc-rs), public JWKs, and the parsed signing/verifying keys
//! built once per loaded ring.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256,
    RsaKeyPair, RsaPublicKeyComponents,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use serde_json::{Value, json};

use crate::{KeyAlgorithm, KeyError, Kid, PrivateKey, TokenType};

/// A freshly generated key: its private half and its id.
pub(crate) struct Generated {
    pub(crate) kid: Kid,
    pub(crate) private_key: PrivateKey,
}

/// The public half of a key, as JWK members.
enum PublicParams {
    Ec { x: String, y: String },
    Okp { x: String },
    Rsa { n: String, e: String },
}

/// A private key parsed once, ready to sign many times.
pub(crate) enum Signer {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
    Rs256(RsaKeyPair),
}

/// Everything needed to sign and verify with one key, built once per ring load.
pub(crate) struct Material {
    pub(crate) signer: Signer,
    pub(crate) decoding: DecodingKey,
    /// The public JWK (with `kid`, `alg`, `use`).
    pub(crate) jwk: Value,
    /// The base64url JWS protected headers (`alg`, `kid`, `typ`), one per [`TokenType`]
    /// (indexed by [`TokenType::index`]), each shared by every token of its type.
    pub(crate) headers_b64: [String; TokenType::COUNT],
}

impl Material {
    /// The base64url protected header of a token of type `typ`.
    pub(crate) fn header_b64(&self, typ: TokenType) -> &str {
        &self.headers_b64[typ.index()]
    }
}

/// Generates a new private key for `alg`.
pub(crate) fn generate(alg: KeyAlgorithm) -> Result<Generated, KeyError> {
    let rng = SystemRandom::new();
    let der = match alg {
        KeyAlgorithm::ES256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| KeyError::Crypto("P-256 key generation failed"))?
            .as_ref()
            .to_vec(),
        KeyAlgorithm::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| KeyError::Crypto("Ed25519 key generation failed"))?
            .as_ref()
            .to_vec(),
        KeyAlgorithm::RS256 => {
            let pair = RsaKeyPair::generate(KeySize::Rsa2048)
                .map_err(|_| KeyError::Crypto("RSA key generation failed"))?;
            let der: aws_lc_rs::encoding::Pkcs8V1Der<'static> = pair
                .as_der()
                .map_err(|_| KeyError::Crypto("RSA key encoding failed"))?;
            der.as_ref().to_vec()
        }
    };
    let private_key = PrivateKey::from_pkcs8_der(der);
    let (_, public) = parse(alg, &private_key)?;
    Ok(Generated {
        kid: thumbprint(&public)?,
        private_key,
    })
}

/// Parses a stored key into signing and verifying material.
pub(crate) fn load(
    alg: KeyAlgorithm,
    kid: &Kid,
    private_key: &PrivateKey,
) -> Result<Material, KeyError> {
    let (signer, public) = parse(alg, private_key)?;
    let decoding = match &public {
        PublicParams::Ec { x, y } => DecodingKey::from_ec_components(x, y),
        PublicParams::Okp { x } => DecodingKey::from_ed_components(x),
        PublicParams::Rsa { n, e } => DecodingKey::from_rsa_components(n, e),
    }
    .map_err(|_| KeyError::Crypto("cannot build a verifying key"))?;

    let mut jwk = public_members(&public);
    if let Value::Object(map) = &mut jwk {
        map.insert("kid".to_owned(), json!(kid.as_str()));
        map.insert("alg".to_owned(), json!(alg.as_str()));
        map.insert("use".to_owned(), json!("sig"));
    }
    let headers_b64 = TokenType::ALL.map(|typ| {
        let header = json!({ "alg": alg.as_str(), "kid": kid.as_str(), "typ": typ.as_str() });
        URL_SAFE_NO_PAD.encode(header.to_string())
    });
    Ok(Material {
        signer,
        decoding,
        jwk,
        headers_b64,
    })
}

fn parse(alg: KeyAlgorithm, private_key: &PrivateKey) -> Result<(Signer, PublicParams), KeyError> {
    let der = private_key.pkcs8_der();
    match alg {
        KeyAlgorithm::ES256 => {
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                .map_err(|_| KeyError::Crypto("stored ES256 key is not a P-256 PKCS#8 key"))?;
            // Uncompressed SEC1 point: 0x04 || x (32 bytes) || y (32 bytes).
            let point = pair.public_key().as_ref();
            if point.len() != 65 || point[0] != 4 {
                return Err(KeyError::Crypto("unexpected P-256 public key encoding"));
            }
            let public = PublicParams::Ec {
                x: URL_SAFE_NO_PAD.encode(&point[1..33]),
                y: URL_SAFE_NO_PAD.encode(&point[33..65]),
            };
            Ok((Signer::Es256(pair), public))
        }
        KeyAlgorithm::EdDSA => {
            let pair = Ed25519KeyPair::from_pkcs8(der)
                .map_err(|_| KeyError::Crypto("stored EdDSA key is not an Ed25519 PKCS#8 key"))?;
            let public = PublicParams::Okp {
                x: URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
            };
            Ok((Signer::EdDsa(pair), public))
        }
        KeyAlgorithm::RS256 => {
            let pair = RsaKeyPair::from_pkcs8(der)
                .map_err(|_| KeyError::Crypto("stored RS256 key is not an RSA PKCS#8 key"))?;
            if pair.public_modulus_len() < 256 {
                return Err(KeyError::Crypto(
                    "stored RS256 key is shorter than 2048 bits",
                ));
            }
            let components = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
            let public = PublicParams::Rsa {
                n: URL_SAFE_NO_PAD.encode(strip_leading_zeros(&components.n)),
                e: URL_SAFE_NO_PAD.encode(strip_leading_zeros(&components.e)),
            };
            Ok((Signer::Rs256(pair), public))
        }
    }
}

/// JWK integers are unsigned big-endian without leading zero octets (RFC 7518 §6.3.1).
fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    &bytes[start..]
}

/// The required public members only, in the lexicographic order RFC 7638 hashes.
fn public_members(public: &PublicParams) -> Value {
    match public {
        PublicParams::Ec { x, y } => json!({ "crv": "P-256", "kty": "EC", "x": x, "y": y }),
        PublicParams::Okp { x } => json!({ "crv": "Ed25519", "kty": "OKP", "x": x }),
        PublicParams::Rsa { n, e } => json!({ "e": e, "kty": "RSA", "n": n }),
    }
}

/// RFC 7638 JWK thumbprint (SHA-256, base64url): the generated key id.
fn thumbprint(public: &PublicParams) -> Result<Kid, KeyError> {
    // serde_json's map is ordered by key (no `preserve_order`), which is what RFC 7638 asks.
    let canonical = public_members(public).to_string();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    Kid::parse(&URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

// === impl Signer ===

impl Signer {
    /// Signs the JWS signing input.
    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        match self {
            Signer::Es256(pair) => pair
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Crypto("ES256 signing failed")),
            Signer::EdDsa(pair) => Ok(pair.sign(message).as_ref().to_vec()),
            Signer::Rs256(pair) => {
                let mut signature = vec![0; pair.public_modulus_len()];
                pair.sign(
                    &RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    message,
                    &mut signature,
                )
                .map_err(|_| KeyError::Crypto("RS256 signing failed"))?;
                Ok(signature)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_expected_public_jwk_members() {
        for (alg, members) in [
            (KeyAlgorithm::ES256, &["kty", "crv", "x", "y"][..]),
            (KeyAlgorithm::EdDSA, &["kty", "crv", "x"][..]),
            (KeyAlgorithm::RS256, &["kty", "n", "e"][..]),
        ] {
            let generated = generate(alg).unwrap();
            let material = load(alg, &generated.kid, &generated.private_key).unwrap();
            for m in members {
                assert!(material.jwk.get(*m).is_some(), "{alg}: {m} missing");
            }
            assert_eq!(material.jwk["alg"], alg.as_str());
            assert_eq!(material.jwk["use"], "sig");
            assert_eq!(material.jwk["kid"], generated.kid.as_str());
            assert!(material.jwk.get("d").is_none(), "private member leaked");
        }
    }

    #[test]
    fn rsa_keys_are_2048_bits_with_exponent_65537() {
        let generated = generate(KeyAlgorithm::RS256).unwrap();
        let material = load(KeyAlgorithm::RS256, &generated.kid, &generated.private_key).unwrap();
        let n = URL_SAFE_NO_PAD
            .decode(material.jwk["n"].as_str().unwrap())
            .unwrap();
        assert_eq!(n.len(), 256);
        assert_eq!(material.jwk["e"], "AQAB");
    }

    #[test]
    fn a_key_stored_under_the_wrong_algorithm_is_refused() {
        let generated = generate(KeyAlgorithm::EdDSA).unwrap();
        assert!(load(KeyAlgorithm::ES256, &generated.kid, &generated.private_key).is_err());
    }

    #[test]
    fn thumbprint_matches_rfc_7638_example() {
        // RFC 7638 §3.1 example key and thumbprint.
        let public = PublicParams::Rsa {
            n: "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw".to_owned(),
            e: "AQAB".to_owned(),
        };
        assert_eq!(
            thumbprint(&public).unwrap().as_str(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }
}
