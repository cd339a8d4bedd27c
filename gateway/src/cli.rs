//! The command line. `main` only calls [`run`]; every subcommand lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::app::{Application, shutdown_signal};
use crate::config::{self, Config};
use crate::dev;
use crate::telemetry;

/// Exit status for invalid configuration or usage (sysexits `EX_USAGE`).
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
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long, short = 'c', env = "PORTCULLIS_CONFIG", conflicts_with = "dev")]
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
    if let Err(e) = telemetry::init_logging(&config.log) {
        eprintln!("portcullis: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portcullis: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(async move {
        let app = match Application::build(config.clone()).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("portcullis: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        if args.dev {
            print_dev_banner(&app, &config, &args.data_dir);
        }
        let stop = app.shutdown_token();
        tokio::spawn(async move {
            shutdown_signal().await;
            stop.cancel();
        });
        app.run_until_stopped().await;
        ExitCode::SUCCESS
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
        let file = args.config.as_ref().ok_or(
            "no configuration: pass --config FILE (or PORTCULLIS_CONFIG), or --dev to run \
             locally with no external service",
        )?;
        config::load(file, std::env::vars()).map_err(|e| e.to_string())?
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

fn print_dev_banner(app: &Application, config: &Config, data_dir: &std::path::Path) {
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
         \n\nStop with Ctrl-C.\n",
        port = https.port(),
        data = data_dir.display(),
    );
}
