//! Scopes (RFC 6749 §3.3) and sets of them.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::ClientError;

/// Longest scope token accepted.
const MAX_SCOPE_LEN: usize = 128;
/// Most scopes in one set: a bound on what one request or one client can make us store.
const MAX_SCOPES: usize = 100;

/// One scope token: `1*( %x21 / %x23-5B / %x5D-7E )` — printable ASCII except space,
/// `"` and `\` — at most 128 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Scope(String);

/// A set of scopes, as a space-separated string on the wire. Ordered, so its text form is
/// stable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ScopeSet(BTreeSet<Scope>);

// === impl Scope ===

impl Scope {
    /// Parses one scope token; `Invalid("scope", why)` when it is not one.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        if text.is_empty() {
            return Err(ClientError::Invalid(
                "scope",
                "a scope is never empty".to_owned(),
            ));
        }
        if text.len() > MAX_SCOPE_LEN {
            return Err(ClientError::Invalid(
                "scope",
                format!("a scope is at most {MAX_SCOPE_LEN} characters long"),
            ));
        }
        if let Some(bad) = text
            .chars()
            .find(|&c| !matches!(c, '\x21' | '\x23'..='\x5b' | '\x5d'..='\x7e'))
        {
            return Err(ClientError::Invalid(
                "scope",
                format!("character {bad:?} is not allowed in a scope (RFC 6749 §3.3)"),
            ));
        }
        Ok(Self(text.to_owned()))
    }

    /// The token.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Scope {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Scope {
    type Error = ClientError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> Self {
        s.0
    }
}

// === impl ScopeSet ===

impl ScopeSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `scope-token *( SP scope-token )`; the empty string is the empty set.
    /// Separators are single spaces, as RFC 6749 writes them: leading, trailing or doubled
    /// spaces are refused rather than guessed at. Repeated tokens count once.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        if text.is_empty() {
            return Ok(Self::new());
        }
        let mut set = BTreeSet::new();
        for token in text.split(' ') {
            if token.is_empty() {
                return Err(ClientError::Invalid(
                    "scope",
                    "scopes are separated by single spaces".to_owned(),
                ));
            }
            set.insert(Scope::parse(token)?);
            if set.len() > MAX_SCOPES {
                return Err(ClientError::Invalid(
                    "scope",
                    format!("at most {MAX_SCOPES} scopes"),
                ));
            }
        }
        Ok(Self(set))
    }

    /// Whether there is no scope.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many scopes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `scope` is in the set.
    pub fn contains(&self, scope: &Scope) -> bool {
        self.0.contains(scope)
    }

    /// Whether the scope spelled `scope` is in the set.
    pub fn contains_str(&self, scope: &str) -> bool {
        self.0.iter().any(|s| s.as_str() == scope)
    }

    /// The scopes, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    /// Adds `scope`.
    pub fn insert(&mut self, scope: Scope) {
        self.0.insert(scope);
    }

    /// Whether every scope of `self` is in `other`.
    pub fn is_subset(&self, other: &ScopeSet) -> bool {
        self.0.is_subset(&other.0)
    }

    /// The scopes in both.
    pub fn intersection(&self, other: &ScopeSet) -> ScopeSet {
        Self(self.0.intersection(&other.0).cloned().collect())
    }

    /// The scopes of `self` that are not in `other`.
    pub fn difference(&self, other: &ScopeSet) -> ScopeSet {
        Self(self.0.difference(&other.0).cloned().collect())
    }

    /// What a token may carry when `requested` is asked of a client allowed `self`:
    /// nothing requested grants everything allowed (RFC 6749 §3.3 lets the server pick a
    /// default); a request within the allowed set is granted as asked (narrowed); a request
    /// naming any scope outside it is refused as a whole with
    /// [`ClientError::ScopeNotAllowed`], which names the offending scopes, rather than
    /// silently trimmed, so a client learns at once that it is misconfigured.
    pub fn narrow(&self, requested: &ScopeSet) -> Result<ScopeSet, ClientError> {
        if requested.is_empty() {
            return Ok(self.clone());
        }
        let extra = requested.difference(self);
        if extra.is_empty() {
            Ok(requested.clone())
        } else {
            Err(ClientError::ScopeNotAllowed(extra))
        }
    }
}

impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(s.as_str())?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ScopeSet {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for ScopeSet {
    type Error = ClientError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<ScopeSet> for String {
    fn from(s: ScopeSet) -> Self {
        s.to_string()
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a ScopeSet {
    type Item = &'a Scope;
    type IntoIter = std::collections::btree_set::Iter<'a, Scope>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn scope_tokens_follow_rfc_6749() {
        for ok in ["read", "config:read:prod", "a!#$%&'()*+,-./[]^_`{|}~", "Z"] {
            assert_eq!(Scope::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "a b",
            "a\"b",
            "a\\b",
            "caf\u{e9}",
            "a\tb",
            &"s".repeat(129),
        ] {
            assert!(
                matches!(Scope::parse(bad), Err(ClientError::Invalid("scope", _))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sets_parse_single_space_separated_and_print_sorted() {
        let set = ScopeSet::parse("b a c a").unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(set.to_string(), "a b c");
        assert!(ScopeSet::parse("").unwrap().is_empty());
        for bad in [" a", "a ", "a  b", "a\"b"] {
            assert!(ScopeSet::parse(bad).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..101).map(|i| format!("s{i}")).collect();
        assert!(ScopeSet::parse(&many.join(" ")).is_err());
    }

    #[test]
    fn narrowing_grants_a_subset_and_refuses_extras_by_name() {
        let allowed = ScopeSet::parse("config:read:prod config:read:test jobs:run").unwrap();
        assert_eq!(allowed.narrow(&ScopeSet::new()).unwrap(), allowed);
        let some = ScopeSet::parse("jobs:run").unwrap();
        assert_eq!(allowed.narrow(&some).unwrap(), some);
        let too_much = ScopeSet::parse("jobs:run portcullis:admin").unwrap();
        match allowed.narrow(&too_much) {
            Err(ClientError::ScopeNotAllowed(extra)) => {
                assert_eq!(extra.to_string(), "portcullis:admin");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(allowed.intersection(&too_much), some);
    }
}
