//! A bounded memory of access tokens this instance has verified, so that a token presented
//! again (an executor calling every second, a console tab polling) costs a hash lookup
//! instead of a signature check (~35 µs of CPU for ES256).
//!
//! A remembered verification never accepts more than a fresh one would:
//! - the key is the token's exact text, compared in full, so no other token can hit it;
//! - only tokens that verified as access tokens (`typ: at+jwt`, or `JWT` while
//!   `tokens.accept_jwt_typ` is on) are remembered; refusals are not, so garbage cannot
//!   push good entries out faster than verifying it costs, and a token of a type refused
//!   never enters. A token accepted only as `JWT` is counted in
//!   `portcullis_access_tokens_legacy_typ_total` when it is verified afresh, not on each
//!   hit: once per token per instance while it stays remembered;
//! - every hit checks the token's validity window (`exp`, `nbf`, leeway) against the clock
//!   and that the signing key is still trusted by the live ring;
//! - the whole memory is dropped when the ring changes (a rotation, an emergency rotation
//!   declaring a key compromised), so nothing verified under the old ring survives it.
//!
//! Access tokens are not revocable one by one (see `oauth::revoke`); a client's tokens are
//! cut off as a whole ([`crate::cutoff`]), which `KeyService::verify_access` checks on
//! every hit here as on a fresh verification, so nothing needs flushing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use keyrotation::{KeyError, Keys, ValidityWindow, VerifyParams};
use time::OffsetDateTime;

use crate::oauth::claims::AccessClaims;
use crate::proxy::headers::Identity;

/// One remembered verification.
#[derive(Debug)]
pub struct VerifiedAccess {
    /// The token's claims.
    pub claims: AccessClaims,
    /// Granted scopes, split once.
    pub scopes: Vec<String>,
    kid: String,
    window: ValidityWindow,
    /// The identity headers a proxied request with this token carries, made on first use.
    identity: OnceLock<Identity>,
}

impl VerifiedAccess {
    /// Who the token is, as the headers a node gets: made once per remembered token, so a
    /// proxied request clones shared values instead of joining and copying strings.
    pub fn identity(&self) -> &Identity {
        self.identity.get_or_init(|| {
            let sub = &self.claims.sub;
            Identity::new(sub, sub, None, &self.claims.roles, &self.scopes)
        })
    }
}

/// The memory. Cheap to share (`Arc`).
pub struct VerifiedTokens {
    /// `None` when configured off.
    cache: Option<quick_cache::sync::Cache<Box<str>, Arc<VerifiedAccess>>>,
    /// The ring generation the entries were verified under.
    generation: AtomicU64,
    /// The hit, miss and flush counters, looked up in the registry on first use (after
    /// the recorder is installed) rather than per request.
    counters: OnceLock<Counters>,
}

struct Counters {
    hit: metrics::Counter,
    miss: metrics::Counter,
    flush: metrics::Counter,
}

impl Counters {
    fn new() -> Self {
        Self {
            hit: metrics::counter!("portcullis_verified_cache_total", "result" => "hit"),
            miss: metrics::counter!("portcullis_verified_cache_total", "result" => "miss"),
            flush: metrics::counter!("portcullis_verified_cache_flushes_total"),
        }
    }
}

impl std::fmt::Debug for VerifiedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedTokens")
            .field("entries", &self.cache.as_ref().map_or(0, |c| c.len()))
            .finish_non_exhaustive()
    }
}

impl VerifiedTokens {
    /// A memory of at most `capacity` tokens; `0` remembers nothing.
    pub fn new(capacity: usize) -> Self {
        Self {
            cache: (capacity > 0).then(|| quick_cache::sync::Cache::new(capacity)),
            generation: AtomicU64::new(0),
            counters: OnceLock::new(),
        }
    }

    /// Verifies `token` at `now`, or finds it verified before and still good.
    pub fn verify(
        &self,
        keys: &Keys,
        params: &VerifyParams,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Arc<VerifiedAccess>, KeyError> {
        let Some(cache) = &self.cache else {
            return fresh(keys, params, token, now).map(Arc::new);
        };
        let counters = self.counters.get_or_init(Counters::new);
        let generation = keys.generation();
        if self.generation.load(Ordering::Acquire) != generation {
            // the ring changed: forget everything verified under the old one
            cache.clear();
            self.generation.store(generation, Ordering::Release);
            counters.flush.increment(1);
        }
        if let Some(hit) = cache.get(token) {
            if hit.window.contains(now) && keys.trusts(&hit.kid, now) {
                counters.hit.increment(1);
                return Ok(hit);
            }
            // expired, or its key is no longer trusted: verify afresh for the precise error
            cache.remove(token);
        }
        counters.miss.increment(1);
        let verified = Arc::new(fresh(keys, params, token, now)?);
        // only entries verified under the generation in force are kept
        if keys.generation() == generation {
            cache.insert(token.into(), Arc::clone(&verified));
        }
        Ok(verified)
    }

    /// How many tokens are remembered now.
    pub fn len(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn fresh(
    keys: &Keys,
    params: &VerifyParams,
    token: &str,
    now: OffsetDateTime,
) -> Result<VerifiedAccess, KeyError> {
    let verified = keys.verify_detailed::<AccessClaims>(token, params, now)?;
    crate::keys::note_token_type(verified.token_type);
    let scopes = verified
        .claims
        .scope
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(VerifiedAccess {
        claims: verified.claims,
        scopes,
        kid: verified.kid,
        window: verified.window,
        identity: OnceLock::new(),
    })
}
