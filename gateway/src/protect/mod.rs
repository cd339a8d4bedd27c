//! Login protection: per-IP token buckets on the login and token endpoints, per-account
//! (per client address and account-wide) and per-client failure counters with backoff and lockout, and the client address they
//! are keyed by (see `docs/sso.md`, "Login protection").

pub mod client_ip;
pub mod lockout;
pub mod rate;

use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub use client_ip::{ClientIp, TrustedProxies};
pub use lockout::{AccountAttempt, Kind, Lockout, LockoutSettings, Refusal, Scope, Verdict};

/// `[protection]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtectionSettings {
    /// Proxies (CIDRs; a bare address is one host) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// Per-IP bucket of `/auth/*`.
    pub auth_rate: RateSettings,
    /// Per-IP bucket of `/oauth2/token`.
    pub token_rate: RateSettings,
    /// Failure counters.
    pub lockout: LockoutSettings,
}

impl Default for ProtectionSettings {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            auth_rate: RateSettings {
                burst: 20,
                replenish_every: Duration::from_secs(3),
            },
            // executors behind one NAT address share this bucket: generous, it is there
            // to blunt secret guessing floods, not to meter legitimate traffic
            token_rate: RateSettings {
                burst: 300,
                replenish_every: Duration::from_millis(10),
            },
            lockout: LockoutSettings::default(),
        }
    }
}

/// A token bucket: `burst` requests at once, one more every `replenish_every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSettings {
    /// Bucket size.
    pub burst: u32,
    /// One request is added back this often.
    #[serde(with = "humantime_serde")]
    pub replenish_every: Duration,
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
