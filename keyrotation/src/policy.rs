//! The rotation policy: how often keys rotate and how long they stay published.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{KeyAlgorithm, KeyError};

const DAY: u64 = 86_400;

/// How keys rotate. Every field has a default; in a config file durations are written like
/// `"30d"`, `"7d"`, `"12h"` (see [`crate::duration`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Algorithm of newly generated keys. Default `ES256`.
    pub algorithm: KeyAlgorithm,
    /// How long a key signs before the next one takes over. Default 30 days.
    #[serde(with = "crate::duration")]
    pub rotation_period: Duration,
    /// How long before it starts signing the next key is published in JWKS, so that relying
    /// parties' JWKS caches hold it when it signs. Default 7 days; must be positive and
    /// shorter than the rotation period. The ring must be planned at least once per lead
    /// (instances reload every few seconds, so it is).
    #[serde(with = "crate::duration")]
    pub prepublish_lead: Duration,
    /// How long a key keeps verifying after it stopped signing. Default 30 days; never
    /// shorter than the longest token lifetime plus leeway ([`Policy::validate`]).
    #[serde(with = "crate::duration")]
    pub overlap: Duration,
    /// How long a retired (or compromised) key stays in the ring, for status and audit,
    /// before it is dropped. Default 7 days.
    #[serde(with = "crate::duration")]
    pub retired_retention: Duration,
    /// How long a key must have been in the stored ring before a rotation brought forward
    /// ([`crate::rotate_now`]) lets it sign: long enough for every instance to have reloaded
    /// the ring, so that none is handed a token whose key it does not hold yet. Set it to
    /// at least twice the instances' reload interval plus the time a reload takes and the
    /// clock skew between them (the gateway derives it from `keys.reload_interval`).
    /// Default 65 s (reloads every 30 s). Never longer than the pre-publication lead is
    /// used. Emergency rotations do not wait: instances that meet the new key's `kid`
    /// before their next reload reload at once.
    #[serde(with = "crate::duration")]
    pub propagation_delay: Duration,
}

// === impl Policy ===

impl Default for Policy {
    fn default() -> Self {
        Self {
            algorithm: KeyAlgorithm::ES256,
            rotation_period: Duration::from_secs(30 * DAY),
            prepublish_lead: Duration::from_secs(7 * DAY),
            overlap: Duration::from_secs(30 * DAY),
            retired_retention: Duration::from_secs(7 * DAY),
            propagation_delay: Duration::from_secs(65),
        }
    }
}

impl Policy {
    /// Checks the policy against the longest lifetime of a token signed by these keys and
    /// the verification leeway: refuses an overlap shorter than `max_token_lifetime +
    /// leeway` (tokens would outlive their key), a zero period, and a lead that is zero or
    /// not shorter than the period.
    pub fn validate(&self, max_token_lifetime: Duration, leeway: Duration) -> Result<(), KeyError> {
        let lead = self.prepublish_lead;
        if self.rotation_period.is_zero() {
            return Err(KeyError::InvalidPolicy(
                "rotation_period must be positive".to_owned(),
            ));
        }
        if lead.is_zero() {
            return Err(KeyError::InvalidPolicy(
                "prepublish_lead must be positive".to_owned(),
            ));
        }
        if lead >= self.rotation_period {
            return Err(KeyError::InvalidPolicy(format!(
                "prepublish_lead ({}) must be shorter than rotation_period ({})",
                crate::duration::format(lead),
                crate::duration::format(self.rotation_period)
            )));
        }
        let needed = max_token_lifetime.saturating_add(leeway);
        if self.overlap < needed {
            return Err(KeyError::InvalidPolicy(format!(
                "overlap ({}) must be at least the longest token lifetime plus leeway ({})",
                crate::duration::format(self.overlap),
                crate::duration::format(needed)
            )));
        }
        // Instants are computed with `time`, whose range is far wider than any sane policy,
        // but refuse durations that would overflow it.
        for (name, d) in [
            ("rotation_period", self.rotation_period),
            ("overlap", self.overlap),
            ("retired_retention", self.retired_retention),
            ("propagation_delay", self.propagation_delay),
        ] {
            if d > Duration::from_secs(100 * 365 * DAY) {
                return Err(KeyError::InvalidPolicy(format!(
                    "{name} is unreasonably long"
                )));
            }
        }
        Ok(())
    }

    /// Builder-style setter for the pre-publication lead.
    pub fn with_lead(mut self, lead: Duration) -> Self {
        self.prepublish_lead = lead;
        self
    }

    pub(crate) fn period(&self) -> time::Duration {
        to_time(self.rotation_period)
    }

    pub(crate) fn lead(&self) -> time::Duration {
        to_time(self.prepublish_lead)
    }

    pub(crate) fn overlap_td(&self) -> time::Duration {
        to_time(self.overlap)
    }

    pub(crate) fn retention(&self) -> time::Duration {
        to_time(self.retired_retention)
    }

    /// The propagation delay in force: at most the lead, which is what keys planned on
    /// schedule get.
    pub(crate) fn propagation(&self) -> time::Duration {
        to_time(self.propagation_delay.min(self.prepublish_lead))
    }
}

/// Converts, saturating: policy durations are validated far below the limit.
fn to_time(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn defaults_match_the_design() {
        let p = Policy::default();
        assert_eq!(p.algorithm, KeyAlgorithm::ES256);
        assert_eq!(p.rotation_period, Duration::from_secs(30 * DAY));
        assert_eq!(p.prepublish_lead, Duration::from_secs(7 * DAY));
        assert_eq!(p.overlap, Duration::from_secs(30 * DAY));
        assert_eq!(p.propagation_delay, Duration::from_secs(65));
        assert!(p.validate(HOUR, MINUTE).is_ok());
    }

    #[test]
    fn refuses_an_overlap_shorter_than_a_token_lifetime_plus_leeway() {
        let p = Policy {
            overlap: HOUR,
            ..Policy::default()
        };
        assert!(p.validate(HOUR - MINUTE, MINUTE).is_ok());
        let err = p.validate(HOUR, MINUTE).unwrap_err().to_string();
        assert!(err.contains("overlap"), "{err}");
    }

    #[test]
    fn refuses_a_zero_lead_or_a_lead_not_shorter_than_the_period() {
        let zero = Policy::default().with_lead(Duration::ZERO);
        assert!(zero.validate(HOUR, MINUTE).is_err());
        let p = Policy::default();
        let equal = p.clone().with_lead(p.rotation_period);
        assert!(equal.validate(HOUR, MINUTE).is_err());
        let zero_period = Policy {
            rotation_period: Duration::ZERO,
            ..Policy::default()
        };
        assert!(zero_period.validate(HOUR, MINUTE).is_err());
    }

    #[test]
    fn deserialises_from_a_config_fragment_with_defaults() {
        let p: Policy = serde_json::from_value(serde_json::json!({
            "algorithm": "EdDSA",
            "rotation_period": "14d",
            "prepublish_lead": "2d",
        }))
        .unwrap();
        assert_eq!(p.algorithm, KeyAlgorithm::EdDSA);
        assert_eq!(p.rotation_period, Duration::from_secs(14 * DAY));
        assert_eq!(p.prepublish_lead, Duration::from_secs(2 * DAY));
        assert_eq!(p.overlap, Duration::from_secs(30 * DAY));
        let unknown = serde_json::from_value::<Policy>(serde_json::json!({"rotate": "1d"}));
        assert!(unknown.is_err());
    }
}
