//! The one error type of this crate.
//!
//! Messages never carry key material, tokens or Vault credentials: they are safe to log and
//! safe to show an operator (the gateway still maps them to opaque HTTP bodies).

/// Everything that can go wrong with signing keys, their life cycle and their storage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    // --- configuration ----------------------------------------------------------------
    /// The rotation policy is not acceptable (the message names the field).
    #[error("invalid key rotation policy: {0}")]
    InvalidPolicy(String),
    /// Key source settings (Vault address, credentials, paths, …) are not usable.
    #[error("invalid key source configuration: {0}")]
    InvalidConfig(String),
    /// A key id is not acceptable.
    #[error("invalid key id: {0}")]
    InvalidKid(String),
    /// The verification parameters cannot verify anything (e.g. no audience, no algorithm).
    #[error("invalid verification parameters: {0}")]
    InvalidVerifyParams(&'static str),

    // --- signing ----------------------------------------------------------------------
    /// No key of the ring may sign at this instant (nothing loaded yet, or the active key's
    /// window ended while the key source was unreachable). The gateway answers 503.
    #[error("no signing key is active")]
    NoActiveKey,
    /// The token verified, but its client's tokens issued before a cutoff were revoked (the
    /// gateway's cutoffs: a client disabled, deleted, or its tokens revoked).
    #[error("the token was revoked")]
    Revoked,
    /// The key that signs now uses an algorithm this instance's verification does not
    /// accept (`keys.accepted_algorithms` was narrowed while the ring still signs with the
    /// old algorithm): a token signed with it would be refused, so none is. The gateway
    /// answers 503.
    #[error(
        "the signing key {kid} uses {alg:?}, which the accepted algorithms leave out; its tokens would be refused"
    )]
    SignerNotAccepted {
        /// The key that signs now.
        kid: crate::Kid,
        /// Its algorithm.
        alg: crate::KeyAlgorithm,
    },
    /// A cryptographic operation failed (key generation, key parsing, signing).
    #[error("cryptographic failure: {0}")]
    Crypto(&'static str),
    /// The claims could not be serialised to JSON.
    #[error("claims cannot be serialised: {0}")]
    Claims(String),

    // --- verification -----------------------------------------------------------------
    /// The token is not a well-formed compact JWS/JWT.
    #[error("malformed token: {0}")]
    MalformedToken(&'static str),
    /// The token's `alg` is not in the pinned set (this covers `none` and every HS*).
    #[error("token algorithm is not allowed")]
    DisallowedAlgorithm,
    /// The token's `alg` is allowed but is not the algorithm of the key named by its `kid`.
    #[error("token algorithm does not match its key")]
    AlgorithmMismatch,
    /// The token header carries no `kid`.
    #[error("token has no key id")]
    MissingKid,
    /// No key published at this instant has the token's `kid`.
    #[error("token key id is unknown")]
    UnknownKid,
    /// The token header's `typ` is missing or names another kind of token than the one
    /// verified (e.g. a plain `JWT` where an `at+jwt` access token is expected).
    #[error("token type (`typ`) is not the one expected")]
    WrongTokenType,
    /// The token header lists critical extensions this verifier does not understand.
    #[error("token uses unsupported critical header parameters")]
    UnsupportedCritical,
    /// The signature does not verify.
    #[error("token signature is invalid")]
    InvalidSignature,
    /// The token expired (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// The token is not valid yet (`nbf` beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// The token's `iss` is not the expected issuer.
    #[error("token issuer is not accepted")]
    InvalidIssuer,
    /// None of the token's audiences is accepted.
    #[error("token audience is not accepted")]
    InvalidAudience,
    /// A required claim is missing or has the wrong type.
    #[error("token claim `{0}` is missing or malformed")]
    InvalidClaim(&'static str),
    /// The verified claims do not deserialise into the requested type.
    #[error("token claims do not have the expected shape: {0}")]
    ClaimsShape(String),

    // --- storage and life cycle ----------------------------------------------------------
    /// The key source holds no ring and this instance may not create one.
    #[error("the key source holds no key ring")]
    NoRing,
    /// This instance runs read-only and refuses to write the ring.
    #[error("this instance is read-only for the key ring")]
    ReadOnly,
    /// The key source cannot be reached (network error, server down or sealed).
    #[error("key source {source_name} is unavailable: {message}")]
    SourceUnavailable {
        /// Which source ([`KeySource::describe`](crate::KeySource::describe)).
        source_name: String,
        /// What failed (secret-free).
        message: String,
    },
    /// The key source refused the operation (e.g. a Vault policy without write access).
    #[error("key source {source_name} denied the operation: {message}")]
    SourceDenied {
        /// Which source.
        source_name: String,
        /// What was refused (secret-free).
        message: String,
    },
    /// Any other failure of the key source.
    #[error("key source {source_name} failed: {message}")]
    Source {
        /// Which source.
        source_name: String,
        /// What failed (secret-free).
        message: String,
    },
    /// The stored ring cannot be decoded (the message never echoes stored values).
    #[error("stored key ring is corrupt: {0}")]
    CorruptRing(String),
    /// An emergency rotation names a key the ring does not hold.
    #[error("the key ring holds no key with id {0}")]
    NotInRing(String),
    /// Check-and-set kept failing because other writers kept winning.
    #[error("gave up writing the key ring after {0} check-and-set conflicts")]
    TooManyConflicts(u32),
    /// A token names a key the ring held does not, and the ring could not be reloaded to
    /// learn whether the key source holds it (the source failed, or no ring was ever
    /// loaded): the token can be neither accepted nor refused now. The gateway answers
    /// 503, so that a client keeps a token that may well be valid. The message says why
    /// (secret-free, like every message here).
    #[error("the token's key is not in the ring held, and the key ring cannot be reloaded: {0}")]
    RingUnavailable(String),
}

impl KeyError {
    /// True when the key source could not be reached at all (as opposed to refusing, or
    /// holding bad data): the instance keeps serving with the ring it holds.
    pub fn is_source_unavailable(&self) -> bool {
        matches!(self, KeyError::SourceUnavailable { .. })
    }

    /// True for errors that mean "this token is not acceptable" (the gateway answers 401),
    /// as opposed to server-side failures.
    pub fn is_token_rejection(&self) -> bool {
        matches!(
            self,
            KeyError::MalformedToken(_)
                | KeyError::DisallowedAlgorithm
                | KeyError::AlgorithmMismatch
                | KeyError::MissingKid
                | KeyError::UnknownKid
                | KeyError::UnsupportedCritical
                | KeyError::WrongTokenType
                | KeyError::InvalidSignature
                | KeyError::Expired
                | KeyError::NotYetValid
                | KeyError::InvalidIssuer
                | KeyError::InvalidAudience
                | KeyError::InvalidClaim(_)
                | KeyError::ClaimsShape(_)
                | KeyError::Revoked
        )
    }
}

/// Describes a JSON error by its category and position only: serde messages may quote the
/// offending value, which for a key ring could be key material.
pub(crate) fn json_error_summary(e: &serde_json::Error) -> String {
    let category = match e.classify() {
        serde_json::error::Category::Io => "i/o error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected structure",
        serde_json::error::Category::Eof => "unexpected end of input",
    };
    format!("{category} at line {} column {}", e.line(), e.column())
}
