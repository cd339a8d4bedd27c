//! `portcullis users …`: break-glass local accounts, straight against the database (and,
//! for a change that ends the account's sessions, the Redis refresh-token store).
//! Passwords are read from standard input (one line), never from the command line, where
//! `ps` and shell history would see them.
//!
//! Any change to an account — password, roles, disable, delete — ends the console
//! sessions it started: at once when the shared refresh-token store is reachable (they
//! are revoked there), else at their next renewal, which reads the account (see
//! `sso::session`). Every change is audited as `operator:cli:<user>`.

use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;

use clap::Subcommand;
use secrecy::SecretString;
use serde_json::{Value, json};

use super::clients::{Target, load_config, shared_refresh_store};
use super::{EXIT_CONFIG, EXIT_FAILURE, instant, runtime};
use crate::accounts::{self, AccountError, AccountView, Change};
use crate::config::Config;
use crate::db::Database;
use crate::refresh::RefreshStore;
use crate::server_key::ServerKey;
use crate::sso::roles::Role;

#[derive(Debug, Subcommand)]
pub(super) enum UsersCommand {
    /// Create a local account; the password is read from standard input.
    Create {
        #[command(flatten)]
        target: Target,
        /// The account name (a-z, 0-9, '.', '_', '-').
        name: String,
        /// A console role (repeat for several): admin, operator, viewer.
        #[arg(long = "role", required = true, value_parser = parse_role)]
        roles: Vec<Role>,
    },
    /// List the local accounts (never a password or its hash).
    List {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Give an account a new password, read from standard input; ends its sessions.
    SetPassword {
        #[command(flatten)]
        target: Target,
        /// The account name.
        name: String,
    },
    /// Replace an account's roles; ends its sessions (the next login has the new roles).
    SetRoles {
        #[command(flatten)]
        target: Target,
        /// The account name.
        name: String,
        /// A console role (repeat for several): admin, operator, viewer.
        #[arg(long = "role", required = true, value_parser = parse_role)]
        roles: Vec<Role>,
    },
    /// Refuse an account's logins from now on; ends its sessions.
    Disable {
        #[command(flatten)]
        target: Target,
        /// The account name.
        name: String,
    },
    /// Let a disabled account log in again.
    Enable {
        #[command(flatten)]
        target: Target,
        /// The account name.
        name: String,
    },
    /// Remove an account for good; ends its sessions.
    Delete {
        #[command(flatten)]
        target: Target,
        /// The account name.
        name: String,
    },
}

fn parse_role(text: &str) -> Result<Role, String> {
    match text {
        "admin" => Ok(Role::Admin),
        "operator" => Ok(Role::Operator),
        "viewer" => Ok(Role::Viewer),
        other => Err(format!("unknown role `{other}`: admin, operator or viewer")),
    }
}

impl UsersCommand {
    fn target(&self) -> &Target {
        match self {
            Self::Create { target, .. }
            | Self::List { target, .. }
            | Self::SetPassword { target, .. }
            | Self::SetRoles { target, .. }
            | Self::Disable { target, .. }
            | Self::Enable { target, .. }
            | Self::Delete { target, .. } => target,
        }
    }

    fn reads_password(&self) -> bool {
        matches!(self, Self::Create { .. } | Self::SetPassword { .. })
    }
}

/// Runs `portcullis users …`.
pub(super) fn run(cmd: UsersCommand) -> ExitCode {
    let config = match load_config(cmd.target()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let dev = cmd.target().dev;
    // read once, for the whole command (see `shared_refresh_store`)
    let key = match config.server_key() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    super::quiet_logging();
    let password = if cmd.reads_password() {
        // a terminal would show the password as it is typed, and keep it in its scrollback
        if std::io::stdin().is_terminal() {
            eprintln!(
                "portcullis: the password is read from standard input, not typed at a \
                 terminal (which would show it): pipe it in, e.g. \
                 printf '%s\\n' \"$PASSWORD\" | portcullis users …"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        let mut line = String::new();
        if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
            eprintln!("portcullis: cannot read the password from standard input: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        // trimmed in place: the secret type wipes the one buffer when it is dropped
        let len = line.trim_end_matches(['\r', '\n']).len();
        line.truncate(len);
        Some(SecretString::from(line))
    } else {
        None
    };
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let db = match Database::connect_lazy(&config.database) {
            Ok(db) => db,
            Err(e) => {
                eprintln!("portcullis: database: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        if let Err(e) = db.migrate().await {
            eprintln!("portcullis: database: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
        let ctx = Ctx {
            config,
            dev,
            db,
            key,
        };
        let outcome = execute(cmd, password, &ctx).await;
        ctx.db.close().await;
        match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(
                e @ (AccountError::InvalidName | AccountError::WeakPassword | AccountError::NoRole),
            ) => {
                eprintln!("portcullis: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
            Err(e) => {
                eprintln!("portcullis: {}", crate::error::chain(&e));
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

/// What the commands work with.
struct Ctx {
    config: Config,
    dev: bool,
    db: Database,
    /// The server key, read once for the whole command.
    key: ServerKey,
}

async fn execute(
    cmd: UsersCommand,
    password: Option<SecretString>,
    ctx: &Ctx,
) -> Result<(), AccountError> {
    let now = time::OffsetDateTime::now_utc();
    let password = password.unwrap_or_else(|| SecretString::from(String::new()));
    match cmd {
        UsersCommand::Create { name, roles, .. } => {
            accounts::create(&ctx.db, &name, &password, &roles, now).await?;
            audit(
                ctx,
                "local_account.create",
                &name,
                json!({ "roles": role_names(&roles) }),
            )
            .await;
            println!("created local account {name}");
            if !ctx.config.sso.local_accounts {
                println!("note: sso.local_accounts is off; the account cannot log in yet");
            }
        }
        UsersCommand::List { json, .. } => {
            let all = accounts::list(&ctx.db).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "accounts": all })).unwrap_or_default()
                );
            } else {
                print_table(&all);
            }
        }
        UsersCommand::SetPassword { name, .. } => {
            let change = Change::Password(password);
            changed(
                ctx,
                &name,
                &change,
                "local_account.set_password",
                json!({}),
                now,
            )
            .await?;
        }
        UsersCommand::SetRoles { name, roles, .. } => {
            let detail = json!({ "roles": role_names(&roles) });
            let change = Change::Roles(roles);
            changed(ctx, &name, &change, "local_account.set_roles", detail, now).await?;
        }
        UsersCommand::Disable { name, .. } => {
            let change = Change::Enabled(false);
            changed(ctx, &name, &change, "local_account.disable", json!({}), now).await?;
        }
        UsersCommand::Enable { name, .. } => {
            accounts::change(&ctx.db, &name, &Change::Enabled(true), now).await?;
            audit(ctx, "local_account.enable", &name, json!({})).await;
            println!("{name}: enabled");
        }
        UsersCommand::Delete { name, .. } => {
            accounts::delete(&ctx.db, &name).await?;
            let revoked = end_sessions(ctx, &name).await;
            audit(
                ctx,
                "local_account.delete",
                &name,
                json!({ "sessions_revoked": revoked }),
            )
            .await;
            report(&name, "deleted", revoked);
        }
    }
    Ok(())
}

/// Applies a change that ends the account's sessions, ends them, audits and reports it.
async fn changed(
    ctx: &Ctx,
    name: &str,
    change: &Change,
    action: &str,
    mut detail: Value,
    now: time::OffsetDateTime,
) -> Result<(), AccountError> {
    accounts::change(&ctx.db, name, change, now).await?;
    let revoked = end_sessions(ctx, name).await;
    if let Some(d) = detail.as_object_mut() {
        d.insert("sessions_revoked".to_owned(), json!(revoked));
    }
    audit(ctx, action, name, detail).await;
    let what = match change {
        Change::Password(_) => "password changed",
        Change::Roles(_) => "roles changed",
        Change::Enabled(_) => "disabled",
    };
    report(name, what, revoked);
    Ok(())
}

/// Revokes the console sessions of the account `name` in the shared refresh-token store:
/// how many, or `None` when it could not (said on stderr). Either way they cannot be
/// renewed: a renewal reads the account.
async fn end_sessions(ctx: &Ctx, name: &str) -> Option<usize> {
    let later = "its console sessions end at their next renewal instead (within \
                 sso.access_token_lifetime)";
    let store = match shared_refresh_store(&ctx.config, ctx.dev, &ctx.key) {
        None => {
            eprintln!("portcullis: note: no shared refresh-token store to reach; {later}");
            return None;
        }
        Some(Err(e)) => {
            eprintln!("portcullis: note: Redis: {e}; {later}");
            return None;
        }
        Some(Ok(store)) => store,
    };
    match store.revoke_subject(&format!("local:{name}")).await {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("portcullis: note: Redis: {e}; {later}");
            None
        }
    }
}

async fn audit(ctx: &Ctx, action: &str, target: &str, detail: Value) {
    super::audit_change(&ctx.db, &ctx.config, action, target, detail).await;
}

fn role_names(roles: &[Role]) -> Vec<&'static str> {
    roles.iter().map(|r| r.as_str()).collect()
}

fn report(name: &str, what: &str, revoked: Option<usize>) {
    match revoked {
        Some(n) => println!("{name}: {what}; {n} console session(s) ended"),
        None => println!("{name}: {what}"),
    }
}

fn print_table(all: &[AccountView]) {
    println!(
        "{:<24} {:<8} {:<24} {:<20} UPDATED",
        "NAME", "ENABLED", "ROLES", "CREATED"
    );
    for a in all {
        println!(
            "{:<24} {:<8} {:<24} {:<20} {}",
            a.name,
            if a.enabled { "yes" } else { "no" },
            role_names(&a.roles).join(","),
            instant(a.created_at),
            instant(a.updated_at),
        );
    }
    if all.is_empty() {
        println!("(no local accounts)");
    }
}
