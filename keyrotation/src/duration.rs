//! Human-readable durations for configuration files: `"30d"`, `"7d"`, `"1h 30m"`, `"90s"`.
//!
//! Units: `w` (weeks), `d`, `h`, `m` (minutes), `s`, `ms`; components may be separated by
//! spaces. Use with serde as `#[serde(with = "keyrotation::duration")]` on a
//! `std::time::Duration` field.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Parses a duration such as `"30d"` or `"1h 30m"`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_owned());
    }
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("expected a number in duration `{text}`"));
        }
        let (number, tail) = rest.split_at(digits);
        let tail = tail.trim_start();
        let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(unit_len);
        let millis_per_unit: u128 = match unit {
            "ms" => 1,
            "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
            "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3_600_000,
            "d" | "day" | "days" => 86_400_000,
            "w" | "week" | "weeks" => 7 * 86_400_000,
            "" => {
                return Err(format!(
                    "missing unit in duration `{text}` (e.g. 30d, 12h, 90s)"
                ));
            }
            other => return Err(format!("unknown unit `{other}` in duration `{text}`")),
        };
        let number: u128 = number
            .parse()
            .map_err(|_| format!("number too large in duration `{text}`"))?;
        total = number
            .checked_mul(millis_per_unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("duration `{text}` is too large"))?;
        rest = tail;
    }
    let millis = u64::try_from(total).map_err(|_| format!("duration `{text}` is too large"))?;
    Ok(Duration::from_millis(millis))
}

/// Formats a duration in the largest units that represent it exactly, e.g. `"30d"`, `"1h 30m"`.
pub fn format(duration: Duration) -> String {
    let mut millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_owned();
    }
    let mut parts = Vec::new();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if millis >= size {
            parts.push(format!("{}{unit}", millis / size));
            millis %= size;
        }
    }
    parts.join(" ")
}

/// serde: serialises a `Duration` as a human-readable string.
pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format(*duration))
}

/// serde: deserialises a `Duration` from a human-readable string.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_units_a_config_file_uses() {
        assert_eq!(parse("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse(" 7 days "), Ok(Duration::from_secs(7 * 86_400)));
    }

    #[test]
    fn rejects_what_it_does_not_understand() {
        assert!(parse("").is_err());
        assert!(parse("30").is_err());
        assert!(parse("d").is_err());
        assert!(parse("3 fortnights").is_err());
        assert!(parse("-1d").is_err());
        assert!(parse("99999999999999999999999999999999999999999d").is_err());
    }

    #[test]
    fn format_round_trips() {
        for text in ["30d", "1h 30m", "90s", "7d 12h", "250ms", "0s"] {
            let parsed = parse(text).unwrap_or_default();
            assert_eq!(parse(&format(parsed)), Ok(parsed), "{text}");
        }
        assert_eq!(format(Duration::from_secs(90)), "1m 30s");
    }
}
