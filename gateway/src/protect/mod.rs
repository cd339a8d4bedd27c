//! Login protection: per-IP token buckets on the login and token endpoints, per-account
//! (per client address and account-wide) and per-client failure counters with backoff and lockout, and the client address they
//! are keyed by (see `docs/sso.md`, "Login protection").

pub mod client_ip;
pub mod lockout;
pub mod rate;

use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

pub use client_ip::{ClientIp, TrustedProxies};
pub use lockout::{AccountAttempt, Kind, Lockout, LockoutSettings, Refusal, Scope, Verdict};

/// `[protection]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtectionSettings {
    /// Proxies (CIDRs; a bare address is one host) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// Per-IP bucket of `/auth/*`; a field left out keeps [`DEFAULT_AUTH_RATE`]'s.
    #[serde(deserialize_with = "auth_rate")]
    pub auth_rate: RateSettings,
    /// Per-IP bucket of `/oauth2/token`; a field left out keeps [`DEFAULT_TOKEN_RATE`]'s.
    #[serde(deserialize_with = "token_rate")]
    pub token_rate: RateSettings,
    /// Failure counters.
    pub lockout: LockoutSettings,
}

impl Default for ProtectionSettings {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            auth_rate: DEFAULT_AUTH_RATE,
            token_rate: DEFAULT_TOKEN_RATE,
            lockout: LockoutSettings::default(),
        }
    }
}

/// The `/auth/*` bucket when `[protection.auth_rate]` does not say.
pub const DEFAULT_AUTH_RATE: RateSettings = RateSettings {
    burst: 20,
    replenish_every: Duration::from_secs(3),
};

/// The `/oauth2/token` bucket when `[protection.token_rate]` does not say. Executors
/// behind one NAT address share it: generous, it is there to blunt secret guessing
/// floods, not to meter legitimate traffic.
pub const DEFAULT_TOKEN_RATE: RateSettings = RateSettings {
    burst: 300,
    replenish_every: Duration::from_millis(10),
};

/// A token bucket: `burst` requests at once, one more every `replenish_every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSettings {
    /// Bucket size.
    pub burst: u32,
    /// One request is added back this often.
    pub replenish_every: Duration,
}

/// A `[protection.*_rate]` table as written: each field may be left out, and then keeps
/// the default of its own table (the two tables' defaults differ, so a default per field
/// alone could not say which).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateTable {
    burst: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    replenish_every: Option<Duration>,
}

impl RateTable {
    fn or(self, default: RateSettings) -> RateSettings {
        RateSettings {
            burst: self.burst.unwrap_or(default.burst),
            replenish_every: self.replenish_every.unwrap_or(default.replenish_every),
        }
    }
}

/// `[protection.auth_rate]`, its fields defaulting to [`DEFAULT_AUTH_RATE`]'s.
fn auth_rate<'de, D: Deserializer<'de>>(d: D) -> Result<RateSettings, D::Error> {
    RateTable::deserialize(d).map(|t| t.or(DEFAULT_AUTH_RATE))
}

/// `[protection.token_rate]`, its fields defaulting to [`DEFAULT_TOKEN_RATE`]'s.
fn token_rate<'de, D: Deserializer<'de>>(d: D) -> Result<RateSettings, D::Error> {
    RateTable::deserialize(d).map(|t| t.or(DEFAULT_TOKEN_RATE))
}

impl ProtectionSettings {
    /// Checks limits and counters make sense.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (name, r) in [
            ("protection.auth_rate", self.auth_rate),
            ("protection.token_rate", self.token_rate),
        ] {
            if r.burst == 0 {
                return Err((format!("{name}.burst"), "must be greater than 0".to_owned()));
            }
            if r.replenish_every.is_zero() {
                return Err((
                    format!("{name}.replenish_every"),
                    "must be greater than 0".to_owned(),
                ));
            }
        }
        for (i, p) in self.trusted_proxies.iter().enumerate() {
            parse_net(p).ok_or_else(|| {
                (
                    format!("protection.trusted_proxies[{i}]"),
                    format!("`{p}` is neither a CIDR (10.0.0.0/8) nor an address"),
                )
            })?;
        }
        self.lockout
            .validate()
            .map_err(|m| ("protection.lockout".to_owned(), m))
    }

    /// The trusted proxies as the resolver wants them (entries that do not parse were
    /// refused by [`Self::validate`]).
    pub fn trusted(&self) -> TrustedProxies {
        TrustedProxies::new(
            self.trusted_proxies
                .iter()
                .filter_map(|p| parse_net(p))
                .collect(),
        )
    }
}

/// `10.0.0.0/8`, `2001:db8::/32`, or one address.
fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}
