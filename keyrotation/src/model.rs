//! The stored key ring: keys, their algorithms, private keys and planned instants.
//!
//! Nothing here decides *when* things happen (that is [`crate::plan`]); this module only says
//! what a key's state is at a given instant, from the instants stored with it.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretSlice};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;

use crate::KeyError;

/// The current format of the serialised ring; bumped on incompatible changes.
pub(crate) const RING_FORMAT: u32 = 1;

/// A JWS signing algorithm a ring key may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[default]
    ES256,
    /// Ed25519.
    EdDSA,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048-bit keys.
    RS256,
}

/// The life-cycle state of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Published in JWKS, not signing yet.
    Next,
    /// Signing (and verifying).
    Active,
    /// No longer signing, still published to verify tokens issued before.
    Retiring,
    /// Gone: neither published nor verifying.
    Retired,
}

/// A key id (`kid`): 1–128 characters of `A–Z a–z 0–9 - _ .`.
///
/// Generated kids are the RFC 7638 JWK thumbprint (SHA-256, base64url) of the public key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Kid(String);

/// Why a key stopped being trusted before its time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compromise {
    /// When the key was declared compromised.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The operator's reason, for the audit log.
    pub reason: String,
}

/// A PKCS#8 DER private key. Serialised as base64 (that is how it is stored), never shown by
/// `Debug`, zeroised on drop.
#[derive(Clone)]
pub struct PrivateKey(SecretSlice<u8>);

/// One key of the ring, with the instants planned for each of its transitions.
///
/// Instants always satisfy `publish_at <= activate_at <= retire_at <= expire_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Key id.
    pub kid: Kid,
    /// Signing algorithm.
    pub alg: KeyAlgorithm,
    /// When the key was generated.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// From this instant the key is in JWKS (state `next`).
    #[serde(with = "time::serde::rfc3339")]
    pub publish_at: OffsetDateTime,
    /// From this instant the key signs (state `active`).
    #[serde(with = "time::serde::rfc3339")]
    pub activate_at: OffsetDateTime,
    /// From this instant the key no longer signs (state `retiring`).
    #[serde(with = "time::serde::rfc3339")]
    pub retire_at: OffsetDateTime,
    /// From this instant the key no longer verifies and leaves JWKS (state `retired`).
    #[serde(with = "time::serde::rfc3339")]
    pub expire_at: OffsetDateTime,
    /// The state last recorded by a writer: it lags the effective state ([`Self::state_at`])
    /// until the next planned write, which emits the missing [`Transition`](crate::Transition)s.
    pub recorded_state: KeyState,
    /// Set when the key was retired by an emergency rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compromised: Option<Compromise>,
    /// The private key.
    pub private_key: PrivateKey,
}

/// The key ring as stored in the key source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRing {
    /// Serialisation format version.
    pub format: u32,
    /// The keys, oldest first.
    pub keys: Vec<KeyRecord>,
}

// === impl Kid ===

impl Kid {
    /// Parses a key id.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let ok_len = (1..=128).contains(&text.len());
        let ok_chars = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok_len && ok_chars {
            Ok(Self(text.to_owned()))
        } else {
            Err(KeyError::InvalidKid(
                "a key id has 1 to 128 characters among A-Z a-z 0-9 - _ .".to_owned(),
            ))
        }
    }

    /// The key id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Kid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Kid {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for Kid {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Kid::parse(&text).map_err(serde::de::Error::custom)
    }
}

// === impl KeyAlgorithm ===

impl KeyAlgorithm {
    /// The JWS `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::ES256 => "ES256",
            KeyAlgorithm::EdDSA => "EdDSA",
            KeyAlgorithm::RS256 => "RS256",
        }
    }

    /// The matching `jsonwebtoken` algorithm.
    pub fn jwt_algorithm(self) -> jsonwebtoken::Algorithm {
        match self {
            KeyAlgorithm::ES256 => jsonwebtoken::Algorithm::ES256,
            KeyAlgorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
            KeyAlgorithm::RS256 => jsonwebtoken::Algorithm::RS256,
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = KeyError;
    /// Exact JWS names only (`ES256`, `EdDSA`, `RS256`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ES256" => Ok(KeyAlgorithm::ES256),
            "EdDSA" => Ok(KeyAlgorithm::EdDSA),
            "RS256" => Ok(KeyAlgorithm::RS256),
            _ => Err(KeyError::InvalidPolicy(format!(
                "unsupported signing algorithm `{s}` (ES256, EdDSA or RS256)"
            ))),
        }
    }
}

// === impl KeyState ===

impl KeyState {
    /// The lower-case name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Next => "next",
            KeyState::Active => "active",
            KeyState::Retiring => "retiring",
            KeyState::Retired => "retired",
        }
    }

    /// The state after this one in the normal life cycle.
    pub(crate) fn successor(self) -> Option<KeyState> {
        match self {
            KeyState::Next => Some(KeyState::Active),
            KeyState::Active => Some(KeyState::Retiring),
            KeyState::Retiring => Some(KeyState::Retired),
            KeyState::Retired => None,
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl PrivateKey ===

impl PrivateKey {
    /// Wraps PKCS#8 DER bytes.
    pub fn from_pkcs8_der(der: Vec<u8>) -> Self {
        Self(SecretSlice::from(der))
    }

    /// The PKCS#8 DER bytes. Only key loading calls this.
    pub(crate) fn pkcs8_der(&self) -> &[u8] {
        self.0.expose_secret()
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey([redacted])")
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        // Only used to tell whether a reloaded ring differs from the loaded one.
        self.pkcs8_der() == other.pkcs8_der()
    }
}

impl Eq for PrivateKey {}

impl Serialize for PrivateKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(self.pkcs8_der()))
    }
}

impl<'de> Deserialize<'de> for PrivateKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let encoded = secrecy::SecretString::deserialize(deserializer)?;
        let der = STANDARD
            .decode(encoded.expose_secret().as_bytes())
            // Not the decoder's message: it could quote the offending input.
            .map_err(|_| serde::de::Error::custom("private_key is not valid base64"))?;
        Ok(Self::from_pkcs8_der(der))
    }
}

// === impl KeyRecord ===

impl KeyRecord {
    /// The effective state at `now`, from the stored instants alone.
    pub fn state_at(&self, now: OffsetDateTime) -> KeyState {
        if self.compromised.is_some() || now >= self.expire_at {
            KeyState::Retired
        } else if now >= self.retire_at {
            KeyState::Retiring
        } else if now >= self.activate_at {
            KeyState::Active
        } else {
            KeyState::Next
        }
    }

    /// Whether the key is in JWKS and may verify tokens at `now`.
    pub fn is_published_at(&self, now: OffsetDateTime) -> bool {
        self.compromised.is_none() && self.publish_at <= now && now < self.expire_at
    }

    /// Whether the key signs at `now`.
    pub fn signs_at(&self, now: OffsetDateTime) -> bool {
        self.state_at(now) == KeyState::Active
    }

    /// When the key stopped being usable: the compromise instant, else its expiry.
    pub fn retired_at(&self) -> OffsetDateTime {
        self.compromised
            .as_ref()
            .map_or(self.expire_at, |c| c.at.min(self.expire_at))
    }

    /// The planned instant at which the key enters `state`.
    pub fn instant_of(&self, state: KeyState) -> OffsetDateTime {
        match state {
            KeyState::Next => self.publish_at,
            KeyState::Active => self.activate_at,
            KeyState::Retiring => self.retire_at,
            KeyState::Retired => self.retired_at(),
        }
    }
}

// === impl KeyRing ===

impl KeyRing {
    /// A ring without keys.
    pub fn empty() -> Self {
        Self {
            format: RING_FORMAT,
            keys: Vec::new(),
        }
    }

    /// The key that signs at `now`: the active one (if a damaged ring has several, the most
    /// recently activated — the same choice on every instance).
    pub fn signing_key_at(&self, now: OffsetDateTime) -> Option<&KeyRecord> {
        self.keys
            .iter()
            .filter(|k| k.signs_at(now))
            .max_by_key(|k| k.activate_at)
    }

    /// The key with this id.
    pub fn key(&self, kid: &Kid) -> Option<&KeyRecord> {
        self.keys.iter().find(|k| &k.kid == kid)
    }

    /// Decodes a ring from JSON, refusing formats this build does not know.
    pub fn from_json_value(value: serde_json::Value) -> Result<Self, KeyError> {
        let ring: KeyRing = serde_json::from_value(value)
            .map_err(|e| KeyError::CorruptRing(crate::error::json_error_summary(&e)))?;
        ring.check()?;
        Ok(ring)
    }

    /// Checks what serde cannot: the format and the order of each key's instants.
    pub(crate) fn check(&self) -> Result<(), KeyError> {
        if self.format != RING_FORMAT {
            return Err(KeyError::CorruptRing(format!(
                "unknown ring format {} (this build reads {RING_FORMAT})",
                self.format
            )));
        }
        for key in &self.keys {
            let ordered = key.publish_at <= key.activate_at
                && key.activate_at <= key.retire_at
                && key.retire_at <= key.expire_at;
            if !ordered {
                return Err(KeyError::CorruptRing(format!(
                    "key {} has instants out of order",
                    key.kid
                )));
            }
        }
        let mut kids: Vec<&Kid> = self.keys.iter().map(|k| &k.kid).collect();
        kids.sort();
        if kids.windows(2).any(|w| w[0] == w[1]) {
            return Err(KeyError::CorruptRing("duplicate key id".to_owned()));
        }
        Ok(())
    }
}

impl Default for KeyRing {
    fn default() -> Self {
        Self::empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn record() -> KeyRecord {
        KeyRecord {
            kid: Kid::parse("k1").unwrap(),
            alg: KeyAlgorithm::ES256,
            created_at: datetime!(2030-01-01 0:00 UTC),
            publish_at: datetime!(2030-01-01 0:00 UTC),
            activate_at: datetime!(2030-01-08 0:00 UTC),
            retire_at: datetime!(2030-02-07 0:00 UTC),
            expire_at: datetime!(2030-03-09 0:00 UTC),
            recorded_state: KeyState::Next,
            compromised: None,
            private_key: PrivateKey::from_pkcs8_der(b"not really a key".to_vec()),
        }
    }

    #[test]
    fn state_follows_the_stored_instants() {
        let k = record();
        assert_eq!(k.state_at(datetime!(2029-12-31 0:00 UTC)), KeyState::Next);
        assert!(!k.is_published_at(datetime!(2029-12-31 0:00 UTC)));
        assert_eq!(k.state_at(datetime!(2030-01-01 0:00 UTC)), KeyState::Next);
        assert!(k.is_published_at(datetime!(2030-01-01 0:00 UTC)));
        assert_eq!(k.state_at(datetime!(2030-01-08 0:00 UTC)), KeyState::Active);
        assert_eq!(
            k.state_at(datetime!(2030-02-07 0:00 UTC)),
            KeyState::Retiring
        );
        assert!(k.is_published_at(datetime!(2030-03-08 23:59 UTC)));
        assert_eq!(
            k.state_at(datetime!(2030-03-09 0:00 UTC)),
            KeyState::Retired
        );
        assert!(!k.is_published_at(datetime!(2030-03-09 0:00 UTC)));
    }

    #[test]
    fn a_compromised_key_is_retired_whatever_its_instants() {
        let mut k = record();
        k.compromised = Some(Compromise {
            at: datetime!(2030-01-10 0:00 UTC),
            reason: "leaked".to_owned(),
        });
        assert_eq!(
            k.state_at(datetime!(2030-01-09 0:00 UTC)),
            KeyState::Retired
        );
        assert!(!k.is_published_at(datetime!(2030-01-20 0:00 UTC)));
    }

    #[test]
    fn kid_parse_accepts_thumbprints_and_refuses_odd_characters() {
        assert!(Kid::parse("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs").is_ok());
        assert!(Kid::parse("").is_err());
        assert!(Kid::parse("a/b").is_err());
        assert!(Kid::parse(&"a".repeat(129)).is_err());
    }

    #[test]
    fn debug_never_shows_the_private_key() {
        let k = record();
        let encoded = STANDARD.encode(b"not really a key");
        let ring = KeyRing {
            format: RING_FORMAT,
            keys: vec![k],
        };
        let debug = format!("{ring:?} {:#?}", ring.keys[0]);
        assert!(!debug.contains(&encoded), "{debug}");
        assert!(debug.contains("redacted"));
        // ...while serialisation (storage) does carry it.
        let json = serde_json::to_string(&ring).unwrap();
        assert!(json.contains(&encoded));
    }

    #[test]
    fn ring_round_trips_through_json_and_rejects_bad_instants() {
        let ring = KeyRing {
            format: RING_FORMAT,
            keys: vec![record()],
        };
        let value = serde_json::to_value(&ring).unwrap();
        assert_eq!(KeyRing::from_json_value(value.clone()).unwrap(), ring);

        let mut bad = value;
        bad["keys"][0]["retire_at"] = serde_json::json!("2029-01-01T00:00:00Z");
        assert!(matches!(
            KeyRing::from_json_value(bad),
            Err(KeyError::CorruptRing(_))
        ));
    }

    #[test]
    fn corrupt_private_key_error_does_not_quote_the_value() {
        let ring = KeyRing {
            format: RING_FORMAT,
            keys: vec![record()],
        };
        let mut value = serde_json::to_value(&ring).unwrap();
        value["keys"][0]["private_key"] = serde_json::json!("SECRET!!notbase64");
        let err = KeyRing::from_json_value(value).unwrap_err().to_string();
        assert!(!err.contains("SECRET"), "{err}");
    }
}
