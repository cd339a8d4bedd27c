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
    /// No account of that name.
    #[error("no local account of that name")]
    NotFound,
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
    /// Which state of the account the password was checked against: its last change
    /// (Unix ms, as stored). A session remembers it, and is renewed only while the
    /// account still has it ([`standing`]); no clock is compared.
    pub stamp: i64,
}

/// An account as `portcullis users list` shows it (never its password hash).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AccountView {
    /// The account name.
    pub name: String,
    /// Its console roles.
    pub roles: Vec<Role>,
    /// Whether it may log in.
    pub enabled: bool,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When its password or roles last changed, or it was disabled: the console sessions
    /// it started before then end at their next renewal.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// A change to an existing account; each one ends the account's console sessions.
#[derive(Debug, Clone)]
pub enum Change {
    /// A new password.
    Password(SecretString),
    /// New roles (at least one).
    Roles(Vec<Role>),
    /// Refused (`false`) or allowed (`true`) to log in.
    Enabled(bool),
}

/// Whether a console session of a local account that logged in at `auth_time` may be
/// renewed: the account exists, may log in, and has not changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It may.
    Good,
    /// The account was removed.
    Removed,
    /// The account is disabled.
    Disabled,
    /// Its password, roles or state changed after the login.
    Changed,
}

impl Standing {
    /// The audit trail's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::Removed => "account_removed",
            Self::Disabled => "account_disabled",
            Self::Changed => "account_changed",
        }
    }
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

fn check_password(password: &SecretString) -> Result<(), AccountError> {
    if password.expose_secret().chars().count() < MIN_PASSWORD_CHARS {
        return Err(AccountError::WeakPassword);
    }
    Ok(())
}

async fn hash_off_thread(password: &SecretString) -> Result<String, AccountError> {
    let password = password.clone();
    tokio::task::spawn_blocking(move || hash(&password))
        .await
        .map_err(|_| AccountError::Hash)?
}

fn role_list(roles: &[Role]) -> Result<String, AccountError> {
    if roles.is_empty() {
        return Err(AccountError::NoRole);
    }
    let mut names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    Ok(names.join(" "))
}

fn parse_roles(stored: &str) -> Vec<Role> {
    stored
        .split(' ')
        .filter_map(|r| serde_json::from_value(serde_json::json!(r)).ok())
        .collect()
}

fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
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
    check_password(password)?;
    let roles = role_list(roles)?;
    let phc = hash_off_thread(password).await?;
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
    const SQL: &str = "SELECT password_hash, roles, enabled, updated_at_unix_ms \
        FROM local_accounts WHERE name = $1";
    let row: Option<(String, String, bool, i64)> = if valid_name(name) {
        crate::on_pool!(db.pool(), |p| {
            sqlx::query_as(SQL).bind(name).fetch_optional(p).await?
        })
    } else {
        None
    };
    let stored = row
        .as_ref()
        .map_or_else(|| decoy_hash().to_owned(), |(h, _, _, _)| h.clone());
    let password = password.clone();
    let matches = tokio::task::spawn_blocking(move || check(&stored, &password))
        .await
        .map_err(|_| AccountError::Hash)?;
    Ok(match row {
        Some((_, roles, true, stamp)) if matches => Some(LocalAccount {
            name: name.to_owned(),
            roles: parse_roles(&roles),
            stamp,
        }),
        _ => None,
    })
}

/// Every account, by name.
pub async fn list(db: &Database) -> Result<Vec<AccountView>, AccountError> {
    const SQL: &str = "SELECT name, roles, enabled, created_at_unix_ms, updated_at_unix_ms \
        FROM local_accounts ORDER BY name";
    let rows: Vec<(String, String, bool, i64, i64)> =
        crate::on_pool!(db.pool(), |p| sqlx::query_as(SQL).fetch_all(p).await?);
    Ok(rows
        .into_iter()
        .map(|(name, roles, enabled, created, updated)| AccountView {
            name,
            roles: parse_roles(&roles),
            enabled,
            created_at: from_ms(created),
            updated_at: from_ms(updated),
        })
        .collect())
}

/// The SQL of an account's next stamp, given the parameter holding the change's instant:
/// that instant, or one more than the stamp it has when the instant is not later (a clock
/// behind, or two changes in one millisecond), so that a change always makes a new one.
macro_rules! next_stamp {
    ($at:literal) => {
        concat!(
            "CASE WHEN ",
            $at,
            " > updated_at_unix_ms THEN ",
            $at,
            " ELSE updated_at_unix_ms + 1 END"
        )
    };
}

/// Applies `change` to the account `name` at `now` (the CLI's `users set-password`,
/// `set-roles`, `disable`, `enable`). Except for `enable`, its `updated_at` becomes `now`:
/// a new stamp, which ends the console sessions it started before (see [`standing`]).
pub async fn change(
    db: &Database,
    name: &str,
    change: &Change,
    now: OffsetDateTime,
) -> Result<(), AccountError> {
    if !valid_name(name) {
        return Err(AccountError::InvalidName);
    }
    let at = ms(now);
    let updated = match change {
        Change::Password(password) => {
            check_password(password)?;
            let phc = hash_off_thread(password).await?;
            const SQL: &str = concat!(
                "UPDATE local_accounts SET password_hash = $1, updated_at_unix_ms = ",
                next_stamp!("$2"),
                " WHERE name = $3"
            );
            crate::on_pool!(db.pool(), |p| sqlx::query(SQL)
                .bind(&phc)
                .bind(at)
                .bind(name)
                .execute(p)
                .await?
                .rows_affected())
        }
        Change::Roles(roles) => {
            let roles = role_list(roles)?;
            const SQL: &str = concat!(
                "UPDATE local_accounts SET roles = $1, updated_at_unix_ms = ",
                next_stamp!("$2"),
                " WHERE name = $3"
            );
            crate::on_pool!(db.pool(), |p| sqlx::query(SQL)
                .bind(&roles)
                .bind(at)
                .bind(name)
                .execute(p)
                .await?
                .rows_affected())
        }
        Change::Enabled(false) => {
            const SQL: &str = concat!(
                "UPDATE local_accounts SET enabled = FALSE, updated_at_unix_ms = ",
                next_stamp!("$1"),
                " WHERE name = $2"
            );
            crate::on_pool!(db.pool(), |p| sqlx::query(SQL)
                .bind(at)
                .bind(name)
                .execute(p)
                .await?
                .rows_affected())
        }
        // no new stamp: the sessions a disable ended stay ended (their stamp is older),
        // and enabling an enabled account ends nothing
        Change::Enabled(true) => {
            const SQL: &str = "UPDATE local_accounts SET enabled = TRUE WHERE name = $1";
            crate::on_pool!(db.pool(), |p| sqlx::query(SQL)
                .bind(name)
                .execute(p)
                .await?
                .rows_affected())
        }
    };
    if updated == 0 {
        return Err(AccountError::NotFound);
    }
    Ok(())
}

/// Removes the account `name` (the CLI's `users delete`).
pub async fn delete(db: &Database, name: &str) -> Result<(), AccountError> {
    if !valid_name(name) {
        return Err(AccountError::InvalidName);
    }
    const SQL: &str = "DELETE FROM local_accounts WHERE name = $1";
    let deleted = crate::on_pool!(db.pool(), |p| sqlx::query(SQL)
        .bind(name)
        .execute(p)
        .await?
        .rows_affected());
    if deleted == 0 {
        return Err(AccountError::NotFound);
    }
    Ok(())
}

/// Whether a console session of the account `name` may be renewed now (one read of the
/// account's row): the account exists, is enabled, and still has the `stamp` the session
/// logged in against. A session without one (started by an older version) is judged by
/// its login instant instead: the account must not have changed since.
pub async fn standing(
    db: &Database,
    name: &str,
    stamp: Option<i64>,
    auth_time: OffsetDateTime,
) -> Result<Standing, AccountError> {
    const SQL: &str = "SELECT enabled, updated_at_unix_ms FROM local_accounts WHERE name = $1";
    if !valid_name(name) {
        return Ok(Standing::Removed);
    }
    let row: Option<(bool, i64)> = crate::on_pool!(db.pool(), |p| {
        sqlx::query_as(SQL).bind(name).fetch_optional(p).await?
    });
    let changed = |updated: i64| match stamp {
        Some(stamp) => updated != stamp,
        None => updated > ms(auth_time),
    };
    Ok(match row {
        None => Standing::Removed,
        Some((false, _)) => Standing::Disabled,
        Some((true, updated)) if changed(updated) => Standing::Changed,
        Some(_) => Standing::Good,
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
