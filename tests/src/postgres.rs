//! A real Postgres 15 cluster in a temp dir.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::process::{Service, Spec, retry_on_port_clash, run, tail_of_file};
use crate::{HarnessError, Result, effective_uid, free_port, user_ids};

/// Where Debian's `postgresql` package puts the server binaries.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The superuser `initdb` creates; every connection uses it (trust auth).
const SUPERUSER: &str = "portcullis";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A Postgres server on 127.0.0.1 (trust auth, superuser `portcullis`, `fsync=off`),
/// killed on drop.
///
/// Postgres refuses to run as root, so when the tests run as root the cluster is
/// initialised and run as the `postgres` user (its temp dir is chowned to it).
#[derive(Debug)]
pub struct Postgres {
    service: Service,
    port: u16,
}

// === impl Postgres ===

impl Postgres {
    /// Runs `initdb` in a new temp dir and starts the server on a free port.
    pub fn start() -> Result<Postgres> {
        let postgres = Path::new(PG_BIN).join("postgres");
        if !postgres.is_file() {
            return Err(HarnessError::MissingBinary {
                program: "postgres".into(),
                looked_in: PG_BIN.into(),
            });
        }
        // Postgres refuses root; `runuser -u postgres` would sit between us and the
        // postmaster and turn our fast-shutdown signal into a slow one, so the harness
        // sets the uid and gid of the child directly (std's `CommandExt::uid`) instead.
        let run_as = if effective_uid()? == 0 {
            Some(user_ids("postgres")?)
        } else {
            None
        };
        retry_on_port_clash(|| Postgres::launch(&postgres, run_as))
    }

    fn launch(postgres: &Path, run_as: Option<(u32, u32)>) -> Result<Postgres> {
        let port = free_port();
        let mut spec = Spec::new(postgres);
        spec.stop_signal = "INT"; // fast shutdown: do not wait for clients to disconnect
        spec.run_as = run_as;
        let service = Service::new("postgres", spec, run_as)?;
        let dir = service.dir().to_path_buf();
        let data = dir.join("data");
        initdb(&data, &dir, run_as)?;
        let service = service.with_args(
            [
                "-D".into(),
                data.into_os_string(),
                "-p".into(),
                port.to_string().into(),
                "-c".into(),
                "listen_addresses=127.0.0.1".into(),
                "-c".into(),
                format!("unix_socket_directories={}", dir.display()).into(),
            ]
            .into_iter()
            .chain(
                [
                    // Durability is not under test; speed is welcome.
                    "fsync=off",
                    "synchronous_commit=off",
                    "full_page_writes=off",
                    // Several crates' pools may share one server.
                    "max_connections=300",
                    "log_min_messages=warning",
                ]
                .into_iter()
                .flat_map(|setting| ["-c".into(), setting.into()]),
            ),
        );
        let pg = Postgres { service, port };
        pg.service.spawn()?;
        pg.wait_ready()?;
        Ok(pg)
    }

    /// One server per test binary, started on first use. Isolate tests with
    /// [`Postgres::fresh_database`]. Panics when it cannot start (the message says why).
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<std::result::Result<Postgres, String>> = OnceLock::new();
        match SHARED.get_or_init(|| Postgres::start().map_err(|e| e.to_string())) {
            Ok(pg) => pg,
            Err(e) => panic!("the shared Postgres did not start: {e}"),
        }
    }

    fn wait_ready(&self) -> Result<()> {
        let isready = Path::new(PG_BIN).join("pg_isready");
        let port = self.port.to_string();
        self.service
            .wait_until("pg_isready succeeds", READY_TIMEOUT, || {
                Command::new(&isready)
                    .args(["-q", "-h", "127.0.0.1", "-p", &port, "-U", SUPERUSER])
                    .args(["-d", "postgres", "-t", "1"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .ok()?
                    .success()
                    .then_some(())
            })
    }

    /// `postgres://portcullis@127.0.0.1:P/postgres` — the superuser on the maintenance db.
    pub fn admin_url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of `database` on this server, as the superuser.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates an empty database with a unique name starting with `prefix` (lower-cased,
    /// non-alphanumerics replaced by `_`) and returns its `postgres://` URL.
    pub fn fresh_database(&self, prefix: &str) -> Result<String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut clean: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        if clean.is_empty() || clean.starts_with(|c: char| c.is_ascii_digit()) {
            clean.insert(0, 't');
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{clean}_{}_{n}", std::process::id());
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url_for(&name))
    }

    /// Runs `sql` with `psql` (as the superuser) in `database`; returns its unaligned,
    /// tuples-only output. Stops at the first error.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let psql = Path::new(PG_BIN).join("psql");
        run(Command::new(psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", database, "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10"))
    }

    /// Stops the server (fast shutdown, SIGKILL after a grace period). Idempotent.
    pub fn stop(&self) {
        self.service.stop();
    }

    /// Stops (if running) and starts the server again on the same port and data dir.
    pub fn restart(&self) -> Result<()> {
        self.service.stop();
        self.service.spawn()?;
        self.wait_ready()
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.service.log_path().to_path_buf()
    }
}

/// `initdb` into `data`, as `run_as` when given; fails with the tail of its output.
fn initdb(data: &Path, dir: &Path, run_as: Option<(u32, u32)>) -> Result<()> {
    use std::os::unix::process::CommandExt;

    let log_path = dir.join("initdb.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| HarnessError::io(format!("creating {}", log_path.display()), e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| HarnessError::io("duplicating a log file handle", e))?;
    let mut command = Command::new(Path::new(PG_BIN).join("initdb"));
    command
        .arg("-D")
        .arg(data)
        .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"])
        .arg("--no-sync")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if let Some((uid, gid)) = run_as {
        command.uid(uid).gid(gid);
    }
    let status = command
        .status()
        .map_err(|e| HarnessError::io("running initdb", e))?;
    if status.success() {
        Ok(())
    } else {
        Err(HarnessError::Command {
            command: format!("{command:?}"),
            status: status.to_string(),
            stderr: tail_of_file(&log_path, 30),
            stdout: String::new(),
        })
    }
}
