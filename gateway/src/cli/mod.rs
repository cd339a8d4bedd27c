//! The command line. `main` only calls [`run`]; every subcommand lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::app::{Application, shutdown_signal};
use crate::config::{self, Config};
use crate::dev;
use crate::telemetry;

mod audit;
mod clients;
mod config_center;
mod config_files;
mod users;

/// Exit status for invalid configuration, or input the commands' own checks refuse
/// (sysexits `EX_USAGE`); a command line that does not parse exits 2 (clap's usage error).
pub const EXIT_CONFIG: u8 = 64;
/// Exit status when the instance could not start or failed.
pub const EXIT_FAILURE: u8 = 1;

/// Portcullis: the secure front door and configuration plane of the job scheduler.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve HTTPS and the admin listener.
    Serve(ServeArgs),
    /// Validate a configuration file (and PORTCULLIS_* overrides) and exit.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Signing keys: status and rotation, straight against the key source.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// OAuth clients: register, list, show, rotate secrets, disable, enable, delete —
    /// straight against the database.
    #[command(subcommand)]
    Clients(clients::ClientsCommand),
    /// The config center: get, set, rm, import, export, history, diff, rollback, gray,
    /// promote, abort, watch —
    /// through a gateway's HTTPS API with a `config:*` scoped token.
    #[command(subcommand)]
    Config(config_center::ConfigCommand),
    /// Break-glass local console accounts (used only when `sso.local_accounts` is on).
    #[command(subcommand)]
    Users(users::UsersCommand),
    /// The audit trail: verify its hash chain, list records — straight against the
    /// database (read only).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Show the ring: every key, its state and the instants of its transitions.
    Status {
        #[command(flatten)]
        target: KeysTarget,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rotate: bring the next rotation forward (default), run the scheduled planning
    /// pass (`--scheduled`, for a timer job holding the write policy), or retire every
    /// key that still verifies as compromised (`--emergency --reason …`; `--kid` for one
    /// key only).
    Rotate {
        #[command(flatten)]
        target: KeysTarget,
        /// Only apply what the schedule says is due (publish the next key, switch keys on
        /// time, drop expired ones). Run it from a timer more often than the lead time.
        #[arg(long, conflicts_with = "emergency")]
        scheduled: bool,
        /// The keys are compromised: every key that still verifies (the active one and those
        /// retiring, stored with it) stops signing and verifying at once, on every
        /// instance within its reload interval; a fresh key signs.
        #[arg(long, requires = "reason")]
        emergency: bool,
        /// Why (recorded in the ring and the audit log).
        #[arg(long)]
        reason: Option<String>,
        /// With --emergency: only this key is compromised (its id, as `keys status` shows);
        /// repeat it to name several. Key ids are base64url, so one may begin with `-`:
        /// taken as the value, not a flag. A key already retired is left as it is, so an
        /// emergency naming its keys can be run again safely.
        #[arg(long, requires = "emergency", allow_hyphen_values = true)]
        kid: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct KeysTarget {
    /// Configuration file of the instances whose ring to use [default: PORTCULLIS_CONFIG,
    /// unless --dev].
    #[arg(long, short = 'c', conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Use the ring of a `serve --dev` data directory.
    #[arg(long)]
    dev: bool,
    /// Data directory of --dev.
    #[arg(long, default_value = dev::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Configuration file (TOML) [default: PORTCULLIS_CONFIG, unless --dev].
    #[arg(long, short = 'c', conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Run everything locally with no external service (SQLite, local key ring,
    /// in-process stores, a self-signed certificate).
    #[arg(long)]
    dev: bool,
    /// HTTPS listener (default 0.0.0.0:8443; 127.0.0.1:8443 with --dev).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin listener for /healthz, /readyz, /metrics (default 127.0.0.1:9090).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Data directory of --dev (certificate, SQLite database, key ring).
    #[arg(long, default_value = dev::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
}

/// Parses the command line and runs the chosen command.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Serve(args) => serve(args),
        Command::Keys(cmd) => keys(cmd),
        Command::Clients(cmd) => clients::run(cmd),
        Command::Config(cmd) => config_center::run(cmd),
        Command::Users(cmd) => users::run(cmd),
        Command::Audit(cmd) => audit::run(cmd),
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match config::load(file, std::env::vars()) {
        Ok(_) => {
            println!("{}: configuration is valid", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("portcullis: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match serve_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // before the runtime: the span exporter's blocking HTTP client must not be made
    // inside it
    if let Err(e) = telemetry::init_telemetry(&config.log, &config.tracing) {
        eprintln!("portcullis: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let code = runtime.block_on(async move {
        let app = match Application::build(config.clone()).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("portcullis: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        if args.dev {
            let credentials = match dev::bootstrap_admin(app.state(), &args.data_dir).await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("portcullis: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            print_dev_banner(&app, &config, &args.data_dir, &credentials);
        }
        let stop = app.shutdown_token();
        tokio::spawn(async move {
            shutdown_signal().await;
            stop.cancel();
        });
        match app.run_until_stopped().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("portcullis: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    });
    // outside the runtime: the exporter's last batch goes out on its own thread
    telemetry::flush_spans();
    code
}

/// Logging for the operator commands: warnings only (or `RUST_LOG`), for a terminal.
fn quiet_logging() {
    let _ = telemetry::init_logging(&config::LogConfig {
        level: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        format: config::LogFormat::Pretty,
    });
}

/// The configuration file: `--config`, else `PORTCULLIS_CONFIG` unless `--dev` (read here,
/// not by clap, so that an exported `PORTCULLIS_CONFIG` does not make `--dev` a conflict;
/// `--config` and `--dev` together still are).
pub(super) fn config_file(given: Option<&PathBuf>, dev: bool) -> Option<PathBuf> {
    match given {
        Some(file) => Some(file.clone()),
        None if dev => None,
        None => std::env::var_os("PORTCULLIS_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
    }
}

/// Builds a runtime, or says why not and gives the exit status.
fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("portcullis: cannot start the runtime: {e}");
        ExitCode::from(EXIT_FAILURE)
    })
}

/// The configuration `serve` runs with: `--dev`'s, or the file's plus environment, then
/// the listener flags on top; validated before anything is bound.
fn serve_config(args: &ServeArgs) -> Result<Config, String> {
    let mut config = if args.dev {
        let listen = args.listen.unwrap_or(dev::DEFAULT_LISTEN);
        let admin = args
            .admin_listen
            .unwrap_or(config::ServerConfig::default().admin_listen);
        dev::dev_config(&args.data_dir, listen, admin).map_err(|e| e.to_string())?
    } else {
        let file = config_file(args.config.as_ref(), false).ok_or(
            "no configuration: pass --config FILE (or PORTCULLIS_CONFIG), or --dev to run \
             locally with no external service",
        )?;
        config::load(&file, std::env::vars()).map_err(|e| e.to_string())?
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(admin) = args.admin_listen {
        config.server.admin_listen = admin;
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn print_dev_banner(
    app: &Application,
    config: &Config,
    data_dir: &std::path::Path,
    credentials: &dev::DevCredentials,
) {
    let https = app.https_addr();
    let admin = app.admin_addr();
    let cert = config
        .tls
        .as_ref()
        .map(|t| t.cert.display().to_string())
        .unwrap_or_default();
    let host = if https.ip().is_loopback() || https.ip().is_unspecified() {
        "localhost".to_owned()
    } else {
        https.ip().to_string()
    };
    println!(
        "\nPortcullis is running in development mode (no external services).\n\
         \n  HTTPS  https://{host}:{port}/          (self-signed certificate: {cert})\
         \n  admin  http://{admin}/healthz   /readyz   /metrics\
         \n  data   {data}   (SQLite database, key ring, certificate)\
         \n\nTry:\
         \n  curl --cacert {cert} https://{host}:{port}/\
         \n  curl http://{admin}/readyz\
         \n\nA bootstrap admin client ({creds_file}, mode 0600):\
         \n  curl --cacert {cert} -u '{id}:<secret from {creds_file}>' \\\
         \n       -d grant_type=client_credentials https://{host}:{port}/oauth2/token\
         \n\nWith that token ($TOKEN), the config center (docs/config-center.md):\
         \n  PORTCULLIS_URL=https://{host}:{port} PORTCULLIS_TOKEN=$TOKEN PORTCULLIS_CACERT={cert} \\\
         \n    portcullis config set dev executor-orders db.pool.size 8\
         \n  curl --cacert {cert} -H \"authorization: Bearer $TOKEN\" \\\
         \n       https://{host}:{port}/config/v1/dev/executor-orders/watch\
         \n\nStop with Ctrl-C.\n",
        port = https.port(),
        data = data_dir.display(),
        id = credentials.client_id,
        creds_file = credentials.path.display(),
    );
}

// === keys ===

fn keys(cmd: KeysCommand) -> ExitCode {
    let target = match &cmd {
        KeysCommand::Status { target, .. } | KeysCommand::Rotate { target, .. } => target,
    };
    let config = match keys_config(target) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    quiet_logging();
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        match run_keys(cmd, &config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("portcullis: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

fn keys_config(target: &KeysTarget) -> Result<Config, String> {
    if target.dev {
        let admin = config::ServerConfig::default().admin_listen;
        dev::dev_config(&target.data_dir, dev::DEFAULT_LISTEN, admin).map_err(|e| e.to_string())
    } else {
        let file = config_file(target.config.as_ref(), false)
            .ok_or("pass --config FILE (or PORTCULLIS_CONFIG), or --dev")?;
        config::load(&file, std::env::vars()).map_err(|e| e.to_string())
    }
}

async fn run_keys(cmd: KeysCommand, config: &Config) -> Result<(), String> {
    use crate::config::RotationKind;
    use crate::keys::KeyService;
    let clock: std::sync::Arc<dyn keyrotation::Clock> =
        std::sync::Arc::new(keyrotation::SystemClock);
    match cmd {
        KeysCommand::Status { json, .. } => {
            // looking writes nothing: not a transition that falls due (which would then
            // reach no audit record), not a first ring in an empty store, and a read-only
            // policy is enough
            let service = KeyService::from_config(config, clock, RotationKind::External)
                .map_err(|e| e.to_string())?;
            service
                .rotator()
                .reload_once()
                .await
                .map_err(|e| e.to_string())?;
            print_status(&service.status(), json);
        }
        KeysCommand::Rotate {
            scheduled,
            emergency,
            reason,
            kid,
            target,
        } => {
            // the CLI is the rotation job: it writes even when the instances only read
            let service = KeyService::from_config(config, clock, RotationKind::InProcess)
                .map_err(|e| e.to_string())?;
            let (action, outcome) = if scheduled {
                let o = service.rotator().reload_once().await;
                ("key.rotate.scheduled", o)
            } else {
                // load first, so the rotation acts on the current ring; what that load
                // wrote (transitions that had fallen due) is audited as the scheduled job
                // would audit it
                let due = service
                    .rotator()
                    .reload_once()
                    .await
                    .map_err(|e| e.to_string())?;
                audit_cli(config, "key.rotate.scheduled", &due, None).await;
                let suspects = keyrotation::Suspects::named_all(&kid).map_err(|e| e.to_string())?;
                // the keys this emergency acts on, as loaded: named again, they make a
                // retry safe whether or not this attempt's write landed
                let retry =
                    emergency.then(|| retry_command(reason.as_deref(), &kid, &target, &service));
                let note = emergency.then(|| (reason.clone().unwrap_or_default(), suspects));
                let action = if emergency {
                    "key.rotate.emergency"
                } else {
                    "key.rotate"
                };
                let outcome = service.rotate(note).await;
                // only a failure of the key source itself may hide a write that landed
                let unknown = matches!(
                    &outcome,
                    Err(keyrotation::KeyError::SourceUnavailable { .. }
                        | keyrotation::KeyError::Source { .. })
                );
                if let (true, Err(e), Some(retry)) = (unknown, &outcome, retry) {
                    return Err(format!(
                        "{e}\nWhether the emergency was stored is not known. Check with \
                         `portcullis keys status`; to try again without retiring a key this \
                         attempt may have made, name the keys it acted on:\n  {retry}"
                    ));
                }
                (action, outcome)
            };
            let outcome = outcome.map_err(|e| e.to_string())?;
            for t in &outcome.transitions {
                println!(
                    "{}  {}: {} -> {}  ({:?})",
                    instant(t.at),
                    t.kid,
                    t.from
                        .map_or("new".to_owned(), |s| format!("{s:?}").to_lowercase()),
                    t.to.map_or("dropped".to_owned(), |s| format!("{s:?}").to_lowercase()),
                    t.reason
                );
            }
            if outcome.transitions.is_empty() {
                println!("nothing was due");
            }
            audit_cli(config, action, &outcome, reason).await;
            print_status(&service.status(), false);
        }
    }
    Ok(())
}

/// The command that retries an emergency on the same keys: those named, else every key
/// that verifies or waits to sign in the ring `service` loaded (a key that is already
/// retired is left as it is, so it is safe to run after an attempt that landed).
fn retry_command(
    reason: Option<&str>,
    named: &[String],
    target: &KeysTarget,
    service: &crate::keys::KeyService,
) -> String {
    let kids: Vec<String> = if named.is_empty() {
        service
            .status()
            .keys
            .iter()
            .filter(|k| k.compromised_at.is_none() && k.state != keyrotation::KeyState::Retired)
            .map(|k| k.kid.to_string())
            .collect()
    } else {
        named.to_vec()
    };
    let mut command = format!(
        "portcullis keys rotate --emergency --reason {}",
        shell_quote(reason.unwrap_or_default())
    );
    // the same ring: the configuration file used (also when it came from
    // PORTCULLIS_CONFIG), or the --dev data directory
    match config_file(target.config.as_ref(), target.dev) {
        Some(file) => {
            command.push_str(" --config ");
            command.push_str(&shell_quote(&file.to_string_lossy()));
        }
        _ => {
            command.push_str(" --dev --data-dir ");
            command.push_str(&shell_quote(&target.data_dir.to_string_lossy()));
        }
    }
    for kid in kids {
        command.push_str(" --kid ");
        command.push_str(&shell_quote(&kid));
    }
    command
}

/// `value` as one POSIX shell word.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

/// Records a CLI rotation in the audit trail; a database that is away does not undo the
/// rotation, it is reported.
async fn audit_cli(
    config: &Config,
    action: &str,
    outcome: &keyrotation::ReloadOutcome,
    reason: Option<String>,
) {
    if outcome.transitions.is_empty() {
        return;
    }
    let event = crate::audit::AuditEvent {
        at: time::OffsetDateTime::now_utc(),
        actor: operator(),
        action: action.to_owned(),
        target: outcome
            .transitions
            .first()
            .map(|t| t.kid.to_string())
            .unwrap_or_default(),
        source_ip: None,
        detail: serde_json::json!({ "reason": reason, "transitions": outcome.transitions }).into(),
    };
    let stored = async {
        let not_stored = |e: crate::db::DbError| format!("its audit record was not stored: {e}");
        let db = crate::db::Database::connect_lazy(&config.database).map_err(not_stored)?;
        db.migrate().await.map_err(not_stored)?;
        crate::audit::store(&db, &config.audit.sink, &event)
            .await
            .map_err(|e| e.to_string())
    };
    if let Err(e) = stored.await {
        eprintln!("portcullis: warning: the rotation is done, but {e}");
    }
}

/// Who a CLI command acts as in the audit trail: `operator:cli:<user>`, the login name
/// from `USER` (`unknown` when it is not set).
pub(crate) fn operator() -> String {
    format!(
        "operator:cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned())
    )
}

/// Records a change a CLI command made, as `operator:cli:<user>`; a database that fails
/// here does not undo the change, it is reported.
async fn audit_change(
    db: &crate::db::Database,
    config: &Config,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) {
    let event = crate::audit::AuditEvent {
        at: time::OffsetDateTime::now_utc(),
        actor: operator(),
        action: action.to_owned(),
        target: target.to_owned(),
        source_ip: None,
        detail: detail.into(),
    };
    if let Err(e) = crate::audit::store(db, &config.audit.sink, &event).await {
        eprintln!("portcullis: warning: done, but {e}");
    }
}

/// An instant to the second, RFC 3339.
fn instant(t: time::OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn print_status(status: &keyrotation::RingStatus, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(status).unwrap_or_default()
        );
        return;
    }
    println!(
        "ring version {}   active {}   next rotation {}",
        status
            .ring_version
            .map_or("-".to_owned(), |v| v.to_string()),
        status
            .active_kid
            .as_ref()
            .map_or("NONE".to_owned(), |k| k.to_string()),
        status.next_rotation_at.map_or("-".to_owned(), instant),
    );
    println!(
        "{:<44} {:<6} {:<9} {:<8} {:<21} {:<21} {:<21}",
        "kid", "alg", "state", "in JWKS", "activates", "stops signing", "stops verifying"
    );
    for k in &status.keys {
        println!(
            "{:<44} {:<6} {:<9} {:<8} {:<21} {:<21} {:<21}{}{}",
            k.kid.to_string(),
            k.alg.to_string(),
            format!("{:?}", k.state).to_lowercase(),
            if k.published { "yes" } else { "no" },
            instant(k.activate_at),
            instant(k.retire_at),
            instant(k.expire_at),
            k.compromise_reason
                .as_ref()
                .map_or(String::new(), |r| format!("  COMPROMISED: {r}")),
            if k.usable {
                ""
            } else {
                "  KEY MATERIAL UNREADABLE: neither signs nor verifies"
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shell_word_survives_quotes_and_spaces() {
        assert_eq!(shell_quote("plain"), "'plain'");
        assert_eq!(
            shell_quote("it's a leak; rm -rf /"),
            "'it'\\''s a leak; rm -rf /'"
        );
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn a_kid_that_begins_with_a_hyphen_is_the_value_of_kid() {
        let cli = Cli::try_parse_from([
            "portcullis",
            "keys",
            "rotate",
            "--emergency",
            "--reason",
            "leaked",
            "--kid",
            "-fQ1x",
            "--dev",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Keys(KeysCommand::Rotate { kid, target, .. }) = cli.command else {
            panic!("not keys rotate: {cli:?}");
        };
        assert_eq!(kid, ["-fQ1x"]);
        assert!(target.dev, "the flag after the kid was still read");
    }
}
