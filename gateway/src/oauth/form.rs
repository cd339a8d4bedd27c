//! Strict `application/x-www-form-urlencoded` parsing for the OAuth endpoints.
//!
//! Stricter than a general form parser on purpose where RFC 6749 asks for it: a
//! parameter the endpoint knows, sent twice, is an error, not "the first one wins"
//! (§3.1, §3.2); bytes that do not decode to UTF-8 are an error, not replacement
//! characters; empty values count as absent. A parameter the endpoint does not know is
//! ignored, however often it appears and whatever it holds (§3.1: "The authorization
//! server MUST ignore unrecognized request parameters").

use percent_encoding::percent_decode;

/// Why a form was refused; each maps to `invalid_request` with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// The same parameter appeared more than once.
    #[error("parameter `{0}` is repeated")]
    Duplicate(String),
    /// A name or value is not UTF-8 once decoded.
    #[error("the form is not valid UTF-8")]
    NotUtf8,
    /// Too many parameters.
    #[error("too many parameters")]
    TooMany,
}

/// Most parameters accepted in one form.
const MAX_PARAMS: usize = 64;

/// A parsed form: the endpoint's known names to values, each name at most once, empty
/// values dropped. A handful of pairs searched in order: an OAuth form has two to five
/// parameters, and `MAX_PARAMS` bounds the search.
#[derive(Debug, Default, Clone)]
pub struct Form {
    params: Vec<(String, String)>,
}

impl Form {
    /// Parses a body, keeping the parameters named in `known` and ignoring every other.
    pub fn parse(body: &[u8], known: &[&str]) -> Result<Self, FormError> {
        let mut params: Vec<(String, String)> = Vec::with_capacity(4);
        let mut pairs = 0;
        for pair in body.split(|b| *b == b'&') {
            if pair.is_empty() {
                continue;
            }
            // unknown pairs count too: the work per form stays bounded
            pairs += 1;
            if pairs > MAX_PARAMS {
                return Err(FormError::TooMany);
            }
            let (name, value) = match pair.iter().position(|b| *b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &pair[..0]),
            };
            // a name that does not decode is no name the endpoint knows
            let Ok(name) = decode(name) else { continue };
            if !known.contains(&name.as_str()) {
                continue;
            }
            let value = decode(value)?;
            if params.iter().any(|(n, _)| *n == name) {
                return Err(FormError::Duplicate(name));
            }
            // an empty value still claims the name: `a=&a=x` is a duplicate
            params.push((name, value));
        }
        params.retain(|(_, v)| !v.is_empty());
        Ok(Self { params })
    }

    /// The value of `name`, if present and non-empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Removes and returns `name`.
    pub fn take(&mut self, name: &str) -> Option<String> {
        let i = self.params.iter().position(|(n, _)| n == name)?;
        Some(self.params.swap_remove(i).1)
    }
}

/// `+` is a space, `%XX` a byte; the result must be UTF-8.
fn decode(raw: &[u8]) -> Result<String, FormError> {
    if raw.contains(&b'+') {
        let plus: Vec<u8> = raw
            .iter()
            .map(|b| if *b == b'+' { b' ' } else { *b })
            .collect();
        return utf8(percent_decode(&plus));
    }
    // the usual case (`grant_type=client_credentials`): one exact-size copy
    utf8(percent_decode(raw))
}

fn utf8(decoded: percent_encoding::PercentDecode<'_>) -> Result<String, FormError> {
    decoded
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| FormError::NotUtf8)
}

/// Decodes one `application/x-www-form-urlencoded` component (used for the parts of
/// HTTP Basic client credentials, RFC 6749 §2.3.1).
pub fn decode_component(raw: &str) -> Result<String, FormError> {
    decode(raw.as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KNOWN: &[&str] = &["grant_type", "scope", "x", "a", "b"];

    #[test]
    fn decodes_plus_and_percent() {
        let f = Form::parse(
            b"grant_type=client_credentials&scope=a+b%20c&x=%C3%A9",
            KNOWN,
        )
        .unwrap();
        assert_eq!(f.get("grant_type"), Some("client_credentials"));
        assert_eq!(f.get("scope"), Some("a b c"));
        assert_eq!(f.get("x"), Some("é"));
    }

    #[test]
    fn known_duplicates_are_refused_even_when_one_is_empty() {
        assert_eq!(
            Form::parse(b"scope=a&scope=b", KNOWN).unwrap_err(),
            FormError::Duplicate("scope".into())
        );
        assert!(Form::parse(b"scope=&scope=b", KNOWN).is_err());
        // percent-encoded names are the same name
        assert!(Form::parse(b"scope=a&%73cope=b", KNOWN).is_err());
    }

    #[test]
    fn unknown_parameters_are_ignored_however_they_look() {
        // repeated, empty, not UTF-8 in the value or in the name: none of it matters
        let f = Form::parse(
            b"grant_type=client_credentials&extra=1&extra=2&extra=&odd=%FF&%FE=1&__main__",
            KNOWN,
        )
        .unwrap();
        assert_eq!(f.get("grant_type"), Some("client_credentials"));
        assert_eq!(f.get("extra"), None);
        assert_eq!(f.get("odd"), None);
    }

    #[test]
    fn invalid_utf8_in_a_known_parameter_is_refused() {
        assert_eq!(
            Form::parse(b"a=%FF%FE", KNOWN).unwrap_err(),
            FormError::NotUtf8
        );
        assert_eq!(
            Form::parse(b"a=\xff", KNOWN).unwrap_err(),
            FormError::NotUtf8
        );
    }

    #[test]
    fn empty_values_are_absent_and_flooding_is_bounded() {
        let f = Form::parse(b"a=&b=1&&", KNOWN).unwrap();
        assert_eq!(f.get("a"), None);
        assert_eq!(f.get("b"), Some("1"));
        // unknown names count toward the bound as well
        let many: Vec<String> = (0..100).map(|i| format!("p{i}=1")).collect();
        assert_eq!(
            Form::parse(many.join("&").as_bytes(), KNOWN).unwrap_err(),
            FormError::TooMany
        );
    }
}
