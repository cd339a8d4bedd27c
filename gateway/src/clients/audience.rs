//! Audiences: who a token is for (the JWT `aud` claim, the RFC 8707 `resource`).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ClientError;

/// Longest audience accepted.
const MAX_LEN: usize = 512;

/// An audience: either a simple name (`[A-Za-z0-9][A-Za-z0-9._-]*`, e.g. `xxl-job-admin`)
/// or an absolute URI (`scheme:rest`, e.g. `https://admin.example.com/api` or
/// `urn:portcullis:admin`) of printable ASCII without spaces, quotes, angle brackets,
/// backslashes, braces, `|`, `^` or backticks and without a fragment. `http` and `https`
/// URIs must name a host. At most 512 characters; compared exactly, case included.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Audience(String);

// === impl Audience ===

impl Audience {
    /// Parses `text`; `Invalid("audience", why)` when it is neither form.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        let invalid = |why: &str| ClientError::Invalid("audience", why.to_owned());
        if text.is_empty() {
            return Err(invalid("an audience is never empty"));
        }
        if text.len() > MAX_LEN {
            return Err(invalid("an audience is at most 512 characters long"));
        }
        match text.split_once(':') {
            None => {
                let mut chars = text.chars();
                let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
                if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
                    return Err(invalid(
                        "a simple audience name has only letters, digits, '.', '_' and '-' \
                         and starts with a letter or digit; anything else must be an absolute URI",
                    ));
                }
            }
            Some((scheme, rest)) => {
                // RFC 3986 §3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
                let mut chars = scheme.chars();
                let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
                    && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
                if !scheme_ok {
                    return Err(invalid("an absolute URI starts with a valid scheme"));
                }
                if rest.is_empty() {
                    return Err(invalid("an absolute URI has something after its scheme"));
                }
                if text
                    .chars()
                    .any(|c| !c.is_ascii_graphic() || "\"<>\\^`{|}#".contains(c))
                {
                    return Err(invalid(
                        "an absolute URI has no spaces, fragment or characters that need escaping",
                    ));
                }
                let lower = scheme.to_ascii_lowercase();
                if lower == "http" || lower == "https" {
                    let parsed: http::Uri = text
                        .parse()
                        .map_err(|_| invalid("not a valid http(s) URI"))?;
                    if parsed.host().is_none_or(str::is_empty) {
                        return Err(invalid("an http(s) URI names a host"));
                    }
                }
            }
        }
        Ok(Self(text.to_owned()))
    }

    /// The audience.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Audience {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Audience {
    type Error = ClientError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Audience> for String {
    fn from(a: Audience) -> Self {
        a.0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn audiences_are_names_or_absolute_uris() {
        for ok in [
            "xxl-job-admin",
            "Portcullis",
            "a",
            "https://admin.example.com",
            "https://admin.example.com:8443/api?x=1",
            "urn:portcullis:admin",
            "spiffe://cluster.local/ns/jobs/sa/executor",
        ] {
            assert_eq!(Audience::parse(ok).unwrap().as_str(), ok, "{ok}");
        }
        for bad in [
            "",
            "-x",
            "has space",
            "1http://x",
            "https:",
            "https:///path",
            "https://ex ample.com",
            "https://example.com/#frag",
            "urn:a<b",
            "caf\u{e9}",
            &"a".repeat(513),
        ] {
            assert!(
                matches!(
                    Audience::parse(bad),
                    Err(ClientError::Invalid("audience", _))
                ),
                "{bad:?}"
            );
        }
    }
}
