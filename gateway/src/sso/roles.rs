//! Role mapping: from what a provider says about a user (groups, email, subject) to the
//! scheduler's console roles. A user matching no rule gets no session.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// A console role of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including user and executor management.
    Admin,
    /// Runs, pauses and edits jobs.
    Operator,
    /// Reads.
    Viewer,
}

impl Role {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Viewer => "viewer",
        }
    }
}

/// `[[sso.roles]]`: grants `role` to users who match any one of the listed criteria.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRule {
    /// The role granted.
    pub role: Role,
    /// Only users of this provider (by name); any provider when absent.
    #[serde(default)]
    pub provider: Option<String>,
    /// Members of any of these groups (the provider's `groups_claim`), matched exactly.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Users whose *verified* email is in one of these domains (`example.com`), matched
    /// case-insensitively and exactly (no subdomains).
    #[serde(default)]
    pub email_domains: Vec<String>,
    /// Users with one of these `sub` claims.
    #[serde(default)]
    pub subjects: Vec<String>,
}

/// What role mapping looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The provider's name.
    pub provider: String,
    /// The `sub` claim.
    pub subject: String,
    /// The `email` claim, only when `email_verified` is true.
    pub verified_email: Option<String>,
    /// The groups claim.
    pub groups: Vec<String>,
}

// === impl RoleRule ===

impl RoleRule {
    /// A rule that lists no criterion would match nobody; configuration refuses it.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.email_domains.is_empty() && self.subjects.is_empty()
    }

    fn matches(&self, who: &Identity) -> bool {
        if self.provider.as_ref().is_some_and(|p| *p != who.provider) {
            return false;
        }
        let group = who.groups.iter().any(|g| self.groups.contains(g));
        let subject = self.subjects.contains(&who.subject);
        let domain = who
            .verified_email
            .as_deref()
            .and_then(|e| e.rsplit_once('@'))
            .is_some_and(|(_, d)| {
                self.email_domains
                    .iter()
                    .any(|allowed| allowed.eq_ignore_ascii_case(d))
            });
        group || subject || domain
    }
}

/// Every role any rule grants `who`, sorted; empty when none matches.
pub fn map_roles(rules: &[RoleRule], who: &Identity) -> Vec<Role> {
    let roles: BTreeSet<Role> = rules
        .iter()
        .filter(|r| r.matches(who))
        .map(|r| r.role)
        .collect();
    roles.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(role: Role) -> RoleRule {
        RoleRule {
            role,
            provider: None,
            groups: vec![],
            email_domains: vec![],
            subjects: vec![],
        }
    }

    fn who(groups: &[&str], email: Option<&str>) -> Identity {
        Identity {
            provider: "corp".to_owned(),
            subject: "u1".to_owned(),
            verified_email: email.map(str::to_owned),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    #[test]
    fn groups_domains_and_subjects_each_grant_their_role() {
        let rules = vec![
            RoleRule {
                groups: vec!["ops".into()],
                ..rule(Role::Operator)
            },
            RoleRule {
                email_domains: vec!["Example.com".into()],
                ..rule(Role::Viewer)
            },
            RoleRule {
                subjects: vec!["u1".into()],
                provider: Some("other".into()),
                ..rule(Role::Admin)
            },
        ];
        assert_eq!(
            map_roles(&rules, &who(&["ops"], Some("a@example.com"))),
            vec![Role::Operator, Role::Viewer]
        );
        // the subject rule is for another provider
        assert!(map_roles(&rules, &who(&[], None)).is_empty());
    }

    #[test]
    fn a_lookalike_email_domain_does_not_match() {
        let rules = vec![RoleRule {
            email_domains: vec!["example.com".into()],
            ..rule(Role::Viewer)
        }];
        assert!(map_roles(&rules, &who(&[], Some("a@evil-example.com"))).is_empty());
        assert!(map_roles(&rules, &who(&[], Some("a@example.com.evil"))).is_empty());
    }
}
