//! The refresh-token wire format and the keyed derivations behind it.
//!
//! `rt1.<family_id>.<body>`, where `family_id` is 16 random bytes and `body` is
//! `secret (32 random bytes) ‖ tag (16 bytes)`, both base64url without padding (22 and 64
//! characters: 91 characters in all). See the module docs of [`crate::refresh`] for why.

use aws_lc_rs::constant_time::verify_slices_are_equal;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::SecretString;

use super::{InvalidReason, RefreshError};
use crate::server_key::{ServerKey, random_bytes};

/// The version prefix of every refresh token.
const PREFIX: &str = "rt1";
const FAMILY_ID_BYTES: usize = 16;
const FAMILY_ID_CHARS: usize = 22;
const SECRET_BYTES: usize = 32;
const TAG_BYTES: usize = 16;
/// Anything longer is not one of ours; refuse before doing any work.
const MAX_TOKEN_CHARS: usize = 128;

// Domain-separation labels: one key, three unrelated functions.
const LABEL_TAG: &[u8] = b"portcullis/refresh/v1/tag";
const LABEL_HASH: &[u8] = b"portcullis/refresh/v1/hash";
const LABEL_WRAP: &[u8] = b"portcullis/refresh/v1/wrap";

/// The public, random identifier of a token family (one login session): 16 random bytes,
/// base64url (22 characters). Safe to log, show in session lists and use in admin APIs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct FamilyId(String);

/// A string that is not a family id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a refresh-token family id")]
pub struct InvalidFamilyId;

// === impl FamilyId ===

impl FamilyId {
    /// Parses the 22-character base64url form.
    pub fn parse(text: &str) -> Result<Self, InvalidFamilyId> {
        if text.len() != FAMILY_ID_CHARS {
            return Err(InvalidFamilyId);
        }
        match URL_SAFE_NO_PAD.decode(text) {
            // re-encoding rejects non-canonical trailing bits
            Ok(bytes)
                if bytes.len() == FAMILY_ID_BYTES && URL_SAFE_NO_PAD.encode(&bytes) == text =>
            {
                Ok(Self(text.to_owned()))
            }
            _ => Err(InvalidFamilyId),
        }
    }

    /// A fresh random id.
    pub(crate) fn generate() -> Result<Self, RefreshError> {
        let mut bytes = [0u8; FAMILY_ID_BYTES];
        random_bytes(&mut bytes).map_err(|_| RefreshError::Internal("random number generator"))?;
        Ok(Self(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The 22-character text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for FamilyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for FamilyId {
    type Err = InvalidFamilyId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for FamilyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The 256-bit secret of one token. No `Debug`, no `Display`.
#[derive(Clone)]
pub(crate) struct Secret([u8; SECRET_BYTES]);

impl Secret {
    fn random() -> Result<Self, RefreshError> {
        let mut bytes = [0u8; SECRET_BYTES];
        random_bytes(&mut bytes).map_err(|_| RefreshError::Internal("random number generator"))?;
        Ok(Self(bytes))
    }
}

/// A token presented by a client whose tag checked out: it was minted by a holder of the
/// server key for this family (so it is a current, a rotated or a revoked one — never a
/// guess).
pub(crate) struct Presented {
    pub family: FamilyId,
    secret: Secret,
}

/// A token about to be issued: its secret, the hash to store, and (for a rotation) the
/// secret wrapped under the predecessor.
pub(crate) struct Minted {
    pub family: FamilyId,
    secret: Secret,
    /// `hash(family, secret)`, base64url: what the store keeps.
    pub hash: String,
}

// === impl Presented ===

impl Presented {
    /// Parses and authenticates a presented token. Every failure is `Malformed`.
    pub fn parse(key: &ServerKey, text: &str) -> Result<Self, RefreshError> {
        let malformed = RefreshError::Invalid(InvalidReason::Malformed);
        if text.len() > MAX_TOKEN_CHARS {
            return Err(malformed);
        }
        let mut parts = text.split('.');
        let (Some(PREFIX), Some(family), Some(body), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed);
        };
        let family =
            FamilyId::parse(family).map_err(|_| RefreshError::Invalid(InvalidReason::Malformed))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| RefreshError::Invalid(InvalidReason::Malformed))?;
        if bytes.len() != SECRET_BYTES + TAG_BYTES {
            return Err(malformed);
        }
        let mut secret = [0u8; SECRET_BYTES];
        secret.copy_from_slice(&bytes[..SECRET_BYTES]);
        let secret = Secret(secret);
        let expected = tag(key, &family, &secret);
        verify_slices_are_equal(&expected, &bytes[SECRET_BYTES..]).map_err(|_| malformed)?;
        Ok(Self { family, secret })
    }

    /// What the store keeps for this token.
    pub fn hash(&self, key: &ServerKey) -> String {
        hash(key, &self.family, &self.secret)
    }

    /// The one-time pad that wraps this token's successor: only a holder of this token
    /// (and the server key) can compute it.
    fn pad(&self, key: &ServerKey) -> [u8; SECRET_BYTES] {
        key.mac(&[LABEL_WRAP, self.family.as_str().as_bytes(), &self.secret.0])
    }

    /// A fresh successor and its secret wrapped under this token, base64url.
    pub fn successor(&self, key: &ServerKey) -> Result<(Minted, String), RefreshError> {
        let next = Minted::new(key, self.family.clone())?;
        let wrapped = xor(&next.secret.0, &self.pad(key));
        Ok((next, URL_SAFE_NO_PAD.encode(wrapped)))
    }

    /// Recovers the successor stored (wrapped under this token) by whichever concurrent
    /// refresh won the rotation.
    pub fn unwrap_successor(
        &self,
        key: &ServerKey,
        wrapped: &str,
    ) -> Result<SecretString, RefreshError> {
        let corrupt = RefreshError::Internal("stored successor is not well formed");
        let bytes = URL_SAFE_NO_PAD
            .decode(wrapped)
            .map_err(|_| RefreshError::Internal("stored successor is not well formed"))?;
        let bytes: [u8; SECRET_BYTES] = bytes.try_into().map_err(|_| corrupt)?;
        let secret = Secret(xor(&bytes, &self.pad(key)));
        Ok(encode(key, &self.family, &secret))
    }
}

// === impl Minted ===

impl Minted {
    /// A token with a fresh random secret in `family`.
    pub fn new(key: &ServerKey, family: FamilyId) -> Result<Self, RefreshError> {
        let secret = Secret::random()?;
        let hash = hash(key, &family, &secret);
        Ok(Self {
            family,
            secret,
            hash,
        })
    }

    /// The token to hand to the client.
    pub fn token(&self, key: &ServerKey) -> SecretString {
        encode(key, &self.family, &self.secret)
    }
}

fn encode(key: &ServerKey, family: &FamilyId, secret: &Secret) -> SecretString {
    let mut body = Vec::with_capacity(SECRET_BYTES + TAG_BYTES);
    body.extend_from_slice(&secret.0);
    body.extend_from_slice(&tag(key, family, secret));
    SecretString::from(format!(
        "{PREFIX}.{family}.{}",
        URL_SAFE_NO_PAD.encode(body)
    ))
}

fn tag(key: &ServerKey, family: &FamilyId, secret: &Secret) -> [u8; TAG_BYTES] {
    let mac = key.mac(&[LABEL_TAG, family.as_str().as_bytes(), &secret.0]);
    let mut out = [0u8; TAG_BYTES];
    out.copy_from_slice(&mac[..TAG_BYTES]);
    out
}

fn hash(key: &ServerKey, family: &FamilyId, secret: &Secret) -> String {
    URL_SAFE_NO_PAD.encode(key.mac(&[LABEL_HASH, family.as_str().as_bytes(), &secret.0]))
}

fn xor(a: &[u8; SECRET_BYTES], b: &[u8; SECRET_BYTES]) -> [u8; SECRET_BYTES] {
    let mut out = [0u8; SECRET_BYTES];
    for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b.iter())) {
        *o = x ^ y;
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn tokens_round_trip_and_tampering_is_malformed() {
        let (key, _) = ServerKey::generate().unwrap();
        let minted = Minted::new(&key, FamilyId::generate().unwrap()).unwrap();
        let token = minted.token(&key);
        let text = token.expose_secret();
        assert_eq!(text.len(), 3 + 1 + 22 + 1 + 64);
        let presented = Presented::parse(&key, text).unwrap();
        assert_eq!(presented.family, minted.family);
        assert_eq!(presented.hash(&key), minted.hash);

        let mut flipped = text.to_owned().into_bytes();
        let last = flipped.len() - 2;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(Presented::parse(&key, &flipped).is_err());
        let (other, _) = ServerKey::generate().unwrap();
        assert!(Presented::parse(&other, text).is_err());
        assert!(Presented::parse(&key, "rt1.x.y").is_err());
        assert!(Presented::parse(&key, "").is_err());
    }

    #[test]
    fn a_wrapped_successor_opens_only_with_its_predecessor() {
        let (key, _) = ServerKey::generate().unwrap();
        let first = Minted::new(&key, FamilyId::generate().unwrap()).unwrap();
        let presented = Presented::parse(&key, first.token(&key).expose_secret()).unwrap();
        let (next, wrapped) = presented.successor(&key).unwrap();
        let again = presented.unwrap_successor(&key, &wrapped).unwrap();
        assert_eq!(again.expose_secret(), next.token(&key).expose_secret());

        let stranger = Minted::new(&key, first.family.clone()).unwrap();
        let stranger = Presented::parse(&key, stranger.token(&key).expose_secret()).unwrap();
        let wrong = stranger.unwrap_successor(&key, &wrapped).unwrap();
        assert_ne!(wrong.expose_secret(), next.token(&key).expose_secret());
    }
}
