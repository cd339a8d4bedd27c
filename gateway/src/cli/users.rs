//! `portcullis users create NAME --role admin`: break-glass local accounts, straight
//! against the database. The password is read from standard input (one line), never from
//! the command line, where `ps` and shell history would see it.

use std::io::BufRead;
use std::process::ExitCode;

use clap::Subcommand;
use secrecy::SecretString;

use super::clients::{Target, load_config};
use super::{EXIT_CONFIG, EXIT_FAILURE, runtime};
use crate::accounts::{self, AccountError};
use crate::audit::AuditEvent;
use crate::db::Database;
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
}

fn parse_role(text: &str) -> Result<Role, String> {
    match text {
        "admin" => Ok(Role::Admin),
        "operator" => Ok(Role::Operator),
        "viewer" => Ok(Role::Viewer),
        other => Err(format!("unknown role `{other}`: admin, operator or viewer")),
    }
}

/// Runs `portcullis users …`.
pub(super) fn run(cmd: UsersCommand) -> ExitCode {
    let UsersCommand::Create {
        target,
        name,
        roles,
    } = cmd;
    let config = match load_config(&target) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    super::quiet_logging();
    let mut line = String::new();
    if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
        eprintln!("portcullis: cannot read the password from standard input: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let password = SecretString::from(line.trim_end_matches(['\r', '\n']).to_owned());
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
        let now = time::OffsetDateTime::now_utc();
        let outcome = accounts::create(&db, &name, &password, &roles, now).await;
        let code = match outcome {
            Ok(()) => {
                let event = AuditEvent {
                    at: now,
                    actor: super::operator(),
                    action: "local_account.create".to_owned(),
                    target: name.clone(),
                    source_ip: None,
                    detail: serde_json::json!({
                        "roles": roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                    })
                    .into(),
                };
                if let Err(e) = crate::audit::store(&db, &config.audit.sink, &event).await {
                    eprintln!("portcullis: warning: account created, but {e}");
                }
                println!("created local account {name}");
                if !config.sso.local_accounts {
                    println!("note: sso.local_accounts is off; the account cannot log in yet");
                }
                ExitCode::SUCCESS
            }
            Err(
                e @ (AccountError::InvalidName | AccountError::WeakPassword | AccountError::NoRole),
            ) => {
                eprintln!("portcullis: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
            Err(e) => {
                eprintln!("portcullis: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
        db.close().await;
        code
    })
}
