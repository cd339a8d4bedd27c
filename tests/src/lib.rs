//! The Portcullis test harness: starts **real** Redis, Redis Cluster, Postgres, OpenBao
//! (the Vault API), an OpenID Connect provider and nginx for every crate's tests.
//!
//! Nothing here is a stand-in: each type runs the real server binary on a free port in a
//! temp dir of its own, waits (with a deadline) until it answers its own protocol, and
//! kills it when dropped. See `/work/shared/TESTING.md` for why.
//!
//! # Use
//!
//! Add `portcullis-tests = { workspace = true }` to a crate's `[dev-dependencies]`, then:
//!
//! ```no_run
//! # fn main() -> harness::Result<()> {
//! // One server per test binary, started on first use (slow servers: share them) ...
//! let redis = harness::Redis::shared();
//! let url = redis.url(); // redis://127.0.0.1:P/ — isolate tests by key prefix
//! let pg = harness::Postgres::shared();
//! let db_url = pg.fresh_database("refresh_tokens")?; // a new, empty database
//! let bao = harness::OpenBao::shared(); // dev mode, kv-v2 at secret/
//! bao.bao(&["secrets", "enable", "-path=transit-mytest", "transit"])?;
//!
//! // ... or one of your own when a test stops, restarts or breaks it.
//! let own = harness::Redis::start_persistent()?;
//! own.restart()?; // same port, same data
//! # Ok(()) }
//! ```
//!
//! The OIDC provider ([`OidcProvider`]) runs `tests/oidc/provider.mjs` (oidc-provider)
//! with the users in [`TEST_USERS`]; [`OidcProvider::browser_login`] drives its HTML
//! login like a browser. [`Nginx::start`] takes a full `nginx.conf`, usually rendered
//! from `deploy/nginx` with [`render_template`].
//!
//! # Failures and logs
//!
//! Each server's stdout and stderr go to a log file in its temp dir. Readiness failures
//! carry the last lines of that log; a server dropped during a panic prints them to
//! stderr. Shared servers are never dropped: use their `log_path()` to read the log. Set
//! `PORTCULLIS_KEEP_TEST_DIRS=1` to keep the temp dirs (data and logs) afterwards.
//!
//! # Process lifetime
//!
//! Every server runs under a small `sh` watchdog (see `process.rs`) that holds the read
//! end of a pipe whose write end only the test binary has. When the test binary exits —
//! normally, by panic, or killed — the pipe closes and the watchdog stops the server and
//! removes its temp dir, so no server outlives the test binary, including the `shared()`
//! ones that live in statics.
//!
//! Missing binaries produce an error that says to run `scripts/install-prereqs.sh`.

mod forwarder;
mod http;
mod nginx;
mod oidc;
mod openbao;
mod postgres;
mod process;
mod redis;
mod template;

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

pub use forwarder::Forwarder;
pub use nginx::Nginx;
pub use oidc::{OidcOptions, OidcProvider, TEST_USERS, TestUser, browser_client, pkce_s256};
pub use openbao::OpenBao;
pub use postgres::Postgres;
pub use process::KEEP_DIRS_ENV;
pub use redis::{Redis, RedisCluster};
pub use template::render_template;

/// The harness's result type.
pub type Result<T> = std::result::Result<T, HarnessError>;

/// What can go wrong while starting or driving a test server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// A program the harness runs is not installed.
    #[error("{program} not found (looked for {looked_in}): run scripts/install-prereqs.sh")]
    MissingBinary {
        /// The program's name.
        program: String,
        /// Where it was looked for.
        looked_in: String,
    },
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A server did not become ready before its deadline.
    #[error("{service} was not ready ({what}) after {waited:?}; log {log:?} ends with:\n{tail}")]
    NotReady {
        /// Which server.
        service: String,
        /// What was being waited for.
        what: String,
        /// How long the harness waited.
        waited: Duration,
        /// The server's log file.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },
    /// A server exited while the harness was waiting for it.
    #[error("{service} exited ({status}) while starting; log {log:?} ends with:\n{tail}")]
    Exited {
        /// Which server.
        service: String,
        /// Its exit status.
        status: String,
        /// The server's log file.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },
    /// A helper command (`initdb`, `psql`, `bao`, `redis-cli`, ...) failed.
    #[error("{command} failed ({status}): {stderr} {stdout}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr.
        stderr: String,
        /// What it wrote to stdout.
        stdout: String,
    },
    /// `render_template` found placeholders without a value.
    #[error("template placeholders without a value: {}", missing.join(", "))]
    Template {
        /// The unfilled placeholder names.
        missing: Vec<String>,
    },
    /// An HTTP request made by a harness helper failed.
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The OIDC provider's login form rejected the credentials.
    #[error("login rejected by the identity provider: {0}")]
    LoginRejected(String),
    /// A server or helper answered something the harness did not expect.
    #[error("{0}")]
    Unexpected(String),
}

impl HarnessError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> HarnessError {
        HarnessError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    // Cargo sets CARGO_MANIFEST_DIR when it runs a test binary: the crate under test, one
    // level below the root. It is preferred over the compile-time value, which names the
    // checkout this crate was built in — a build cache shared between checkouts (CI
    // clones) would otherwise point at another one.
    let runtime = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .and_then(|dir| dir.parent().map(Path::to_path_buf))
        .filter(|root| root.join("Cargo.lock").is_file());
    // a bench or test binary run by hand (no cargo, so no CARGO_MANIFEST_DIR): the
    // checkout it is run from, found by this very crate's file
    let from_cwd = || {
        std::env::current_dir().ok().and_then(|dir| {
            dir.ancestors()
                .find(|a| a.join("Cargo.lock").is_file() && a.join("tests/src/lib.rs").is_file())
                .map(Path::to_path_buf)
        })
    };
    runtime.or_else(from_cwd).unwrap_or_else(|| {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        manifest_dir
            .parent()
            .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
    })
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a server that binds it itself
/// later (a spawned process, a config file naming it).
///
/// The port is drawn at random from below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`): the kernel hands out the ports of every `bind` to
/// port 0 (the in-process instances of other tests) and of every outgoing connection from
/// that range only, so none of them can take the port between now and the server's own
/// bind. (A port taken the old way, by binding port 0 and dropping the listener, was
/// sometimes given to another test's instance in that gap: a spawned `portcullis serve`
/// then could not listen, and its readiness poll was answered by the other instance.)
/// Falls back to a kernel-chosen port when the range leaves no room below it.
///
/// Never returns a port that another test process running now was given, nor the same
/// port twice in one process: each port handed out is reserved for the life of the
/// process ([`reserve`]), so test binaries run side by side (several `cargo test`
/// invocations, or a runner that starts a process per test) do not race each other for it.
pub fn free_port() -> u16 {
    let below = ports_below_ephemeral();
    let mut draws = 0_u32;
    loop {
        draws += 1;
        let port = match &below {
            // a few hundred draws find a free one unless nearly all are taken
            Some(range) if draws <= 500 => {
                let span = u128::from(range.end - range.start);
                let offset = uuid::Uuid::new_v4().as_u128() % span;
                let port = range.start + u16::try_from(offset).unwrap_or(0);
                if !port_is_free(port) {
                    continue;
                }
                port
            }
            _ => match TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()) {
                Ok(addr) => addr.port(),
                Err(e) => panic!("cannot bind any port on 127.0.0.1: {e}"),
            },
        };
        if reserve(port) {
            return port;
        }
    }
}

/// Reserves `port` for this process until it exits, by binding UDP port `port` on
/// 127.0.0.1 and keeping the socket: the servers of the harness listen on TCP only, so the
/// reservation never stands in their way, while a second reservation of the same port —
/// from this process or any other — fails. The kernel lets go of it when the process
/// ends, however it ends, so a crashed test leaves nothing behind. False when the port is
/// reserved already.
pub(crate) fn reserve(port: u16) -> bool {
    static HELD: Mutex<Vec<UdpSocket>> = Mutex::new(Vec::new());
    match UdpSocket::bind(("127.0.0.1", port)) {
        Ok(socket) => {
            HELD.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(socket);
            true
        }
        Err(_) => false,
    }
}

/// The ports [`free_port`] draws from: from 15000 (above the usual fixed service ports)
/// to the start of the ephemeral range, when that leaves at least a thousand.
/// Says so once per test binary when there is no such room: ports are then chosen the
/// racy way, and a server may now and then find its port taken.
fn ports_below_ephemeral() -> Option<std::ops::Range<u16>> {
    const FLOOR: u16 = 15_000;
    static WARNED: std::sync::Once = std::sync::Once::new();
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let low = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok());
    let range = low
        .filter(|&low| low >= FLOOR + 1_000)
        .map(|low| FLOOR..low);
    if range.is_none() {
        WARNED.call_once(|| {
            eprintln!(
                "harness: {path} leaves fewer than 1,000 ports between {FLOOR} and the \
                 ephemeral range ({low:?}); test servers' ports are chosen by binding port 0, \
                 and another test may take one before its server binds it"
            );
        });
    }
    range
}

/// Whether `port` on 127.0.0.1 can be bound right now.
pub(crate) fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Finds `program` on `PATH` or in `extra` directories.
pub(crate) fn find_program(program: &str, extra: &[&str]) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .collect();
    dirs.iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| HarnessError::MissingBinary {
            program: program.to_owned(),
            looked_in: format!("PATH and {}", extra.join(", ")),
        })
}

/// Our effective user id, from `/proc/self/status` (no libc, no unsafe).
pub(crate) fn effective_uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| HarnessError::io("reading /proc/self/status", e))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .ok_or_else(|| HarnessError::Unexpected("no Uid line in /proc/self/status".into()))
}

/// The (uid, gid) of a local user, from `/etc/passwd`.
pub(crate) fn user_ids(name: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| HarnessError::io("reading /etc/passwd", e))?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&name))
        .and_then(|fields| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
        .ok_or_else(|| HarnessError::MissingBinary {
            program: format!("the `{name}` user"),
            looked_in: "/etc/passwd".into(),
        })
}

/// Runs the ignored test `name` (its full path, `module::test`) alone in a child process
/// of the calling test binary and panics unless it ran and passed: for checks that need
/// what is process-wide (the tracing subscriber, the metrics recorder) to themselves.
#[allow(clippy::expect_used)] // an assertion helper: failing the calling test is its job
pub fn run_alone(name: &str) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .expect("the test binary runs again");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{name} ran: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether another process can bind UDP `port` on 127.0.0.1, as its own reservation
    /// of that port would.
    fn another_process_can_reserve(port: u16) -> bool {
        let probe = "import socket, sys\n\
                     s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                     s.bind(('127.0.0.1', int(sys.argv[1])))";
        let status = std::process::Command::new("python3")
            .args(["-c", probe, &port.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
        match status {
            Ok(status) => status.success(),
            Err(e) => panic!("cannot run python3: {e}"),
        }
    }

    #[test]
    fn a_port_handed_out_is_refused_to_other_processes_and_its_server_can_listen_on_it() {
        let port = free_port();
        assert!(!reserve(port), "reserved twice in one process");
        assert!(
            !another_process_can_reserve(port),
            "another process could reserve port {port}, handed out here"
        );
        // the server the port was drawn for binds it over TCP, reservation or not
        let listener = TcpListener::bind(("127.0.0.1", port));
        assert!(listener.is_ok(), "{listener:?}");

        // and the probe is not refusing every port: one nobody holds is open to it
        let Some(other) =
            (port.saturating_add(1)..u16::MAX).find(|&p| UdpSocket::bind(("127.0.0.1", p)).is_ok())
        else {
            panic!("no UDP port above {port} is free")
        };
        assert!(
            another_process_can_reserve(other),
            "the probe could not bind port {other}, which nobody reserved"
        );
    }
}
