//! Break-glass local accounts: console logins that work when the identity provider does
//! not. Off by default (`sso.local_accounts`); created only by the CLI; passwords stored as
//! Argon2id PHC strings; every use audited and subject to the account's failure counters
//! (per client address and account-wide, `protect::lockout`).

use std::sync::OnceLock;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;

use crate::db::Database;
use crate::sso::roles::Role;

/// Shortest password accepted for a break-glass account.
pub const MIN_PASSWORD_CHARS: usize = 16;

/// Local-account failures.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The name is not `[a-z0-9._-]{1,64}`.
    #[error("account names are 1-64 characters of a-z, 0-9, '.', '_', '-'")]
    InvalidName,
    /// Too short a password.
    #[error("the password must have at least {MIN_PASSWORD_CHARS} characters")]
    WeakPassword,
    /// No role given.
    #[error("give the account at least one role")]
    NoRole,
    /// An account of that name exists.
    #[error("an account of that name exists already")]
    AlreadyExists,
    /// Hashing failed.
    #[error("password hashing failed")]
    Hash,
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// A verified local account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAccount {
    /// The account name.
    pub name: String,
    /// Its console roles.
    pub roles: Vec<Role>,
}

/// Whether `name` could be an account name (`[a-z0-9._-]{1,64}`): what else is submitted
/// as one is never looked up, and never written to the audit trail as given.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

fn hash(password: &SecretString) -> Result<String, AccountError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.expose_secret().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| AccountError::Hash)
}

/// A hash nobody knows the password of: unknown names are checked against it, so an
/// attempt takes as long whether or not the account exists.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| {
        let random = uuid::Uuid::new_v4().to_string();
        hash(&SecretString::from(random)).unwrap_or_default()
    })
}

fn check(stored: &str, password: &SecretString) -> bool {
    PasswordHash::new(stored).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.expose_secret().as_bytes(), &parsed)
            .is_ok()
    })
}

fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Creates an account (the CLI's `users create`).
pub async fn create(
    db: &Database,
    name: &str,
    password: &SecretString,
    roles: &[Role],
    now: OffsetDateTime,
) -> Result<(), AccountError> {
    if !valid_name(name) {
        return Err(AccountError::InvalidName);
    }
    if password.expose_secret().chars().count() < MIN_PASSWORD_CHARS {
        return Err(AccountError::WeakPassword);
    }
    if roles.is_empty() {
        return Err(AccountError::NoRole);
    }
    let password = password.clone();
    let phc = tokio::task::spawn_blocking(move || hash(&password))
        .await
        .map_err(|_| AccountError::Hash)??;
    let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    let roles = roles.join(" ");
    let at = ms(now);
    const SQL: &str = "INSERT INTO local_accounts \
        (name, password_hash, roles, enabled, created_at_unix_ms, updated_at_unix_ms) \
        VALUES ($1, $2, $3, TRUE, $4, $5)";
    let result = crate::on_pool!(db.pool(), |p| {
        sqlx::query(SQL)
            .bind(name)
            .bind(&phc)
            .bind(&roles)
            .bind(at)
            .bind(at)
            .execute(p)
            .await
            .map(|_| ())
    });
    result.map_err(|e| match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => AccountError::AlreadyExists,
        e => AccountError::Db(e),
    })
}

/// The account `name` if it exists, is enabled and `password` is its password. Takes the
/// same time (one Argon2id verification) whatever the outcome.
#[tracing::instrument(skip_all)]
pub async fn verify(
    db: &Database,
    name: &str,
    password: &SecretString,
) -> Result<Option<LocalAccount>, AccountError> {
    const SQL: &str = "SELECT password_hash, roles, enabled FROM local_accounts WHERE name = $1";
    let row: Option<(String, String, bool)> = if valid_name(name) {
        crate::on_pool!(db.pool(), |p| {
            sqlx::query_as(SQL).bind(name).fetch_optional(p).await?
        })
    } else {
        None
    };
    let stored = row
        .as_ref()
        .map_or_else(|| decoy_hash().to_owned(), |(h, _, _)| h.clone());
    let password = password.clone();
    let matches = tokio::task::spawn_blocking(move || check(&stored, &password))
        .await
        .map_err(|_| AccountError::Hash)?;
    Ok(match row {
        Some((_, roles, true)) if matches => Some(LocalAccount {
            name: name.to_owned(),
            roles: roles
                .split(' ')
                .filter_map(|r| serde_json::from_value(serde_json::json!(r)).ok())
                .collect(),
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_hash_is_argon2id_and_checks_only_its_password() {
        let h = hash(&SecretString::from("correct horse battery".to_owned())).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(check(
            &h,
            &SecretString::from("correct horse battery".to_owned())
        ));
        assert!(!check(
            &h,
            &SecretString::from("correct horse battery!".to_owned())
        ));
        assert!(!check(decoy_hash(), &SecretString::from(String::new())));
    }

    #[test]
    fn names_are_plain() {
        assert!(valid_name("breakglass-1"));
        for bad in ["", "Admin", "a b", "a/b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
