//! What the HTTP benches share: their knobs come from the environment, and `cargo test
//! --benches` runs them once as tests, when they do nothing.

#[allow(
    dead_code,
    reason = "each bench binary compiles this module; not all compare with the floor"
)]
pub mod floor;

/// The number in the environment variable `name`, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `wrk` command the benches run. `BENCH_WRK_SCHED=batch` starts it in the
/// `SCHED_BATCH` class (`chrt`, util-linux): on the server's own cores it then waits for
/// its turn instead of preempting the server each time an answer wakes it, as the
/// config_watch load generator does by default. The default leaves wrk in the normal class.
#[allow(
    dead_code,
    reason = "each bench binary compiles this module; not all run wrk"
)]
pub fn wrk_command() -> std::process::Command {
    if std::env::var("BENCH_WRK_SCHED").as_deref() == Ok("batch") {
        println!("wrk runs in the SCHED_BATCH class (BENCH_WRK_SCHED=batch)");
        let mut c = std::process::Command::new("chrt");
        c.args(["--batch", "0", "wrk"]);
        c
    } else {
        std::process::Command::new("wrk")
    }
}

/// Where the kernel keeps its task-group switch for sessions.
const AUTOGROUP: &str = "/proc/sys/kernel/sched_autogroup_enabled";

/// The kernel's session task groups for the length of a run, as found or as
/// `BENCH_AUTOGROUP` sets them; the value found is put back when this is dropped.
///
/// With `kernel.sched_autogroup_enabled = 1` (the default of many kernels) every session
/// is scheduled as one group: this bench's process and its wrk in one, and each server it
/// starts that calls `setsid` (Postgres, a daemonised nginx or HAProxy) in its own. A
/// group's weight on a core follows its recent load, so a Postgres that wakes in bursts to
/// append the audit trail gets a small share of a core for tens of milliseconds at a time:
/// on the fourteenth sitting's machine it waited 50–500 ms for a core while the token bench
/// ran, its appends took up to 6.5 s, and the audit queue overflowed (docs/benchmarks.md,
/// fifteenth sitting). A gateway deployed as a service runs in its own control group, with
/// its database on another host. `BENCH_AUTOGROUP=off` switches the session groups off for
/// the run (root only; the value found is restored at the end); every run prints which
/// way it ran.
#[allow(
    dead_code,
    reason = "each bench binary compiles this module; not all set the scheduler"
)]
pub struct Autogroup {
    restore: Option<String>,
}

#[allow(dead_code)]
impl Autogroup {
    /// Applies `BENCH_AUTOGROUP` (`on` or `off`; unset leaves the machine as it is) and
    /// prints the setting the run has.
    pub fn apply() -> Self {
        let found = std::fs::read_to_string(AUTOGROUP)
            .map(|v| v.trim().to_owned())
            .ok();
        let wanted = match std::env::var("BENCH_AUTOGROUP").as_deref() {
            Ok("off") => Some("0"),
            Ok("on") => Some("1"),
            _ => None,
        };
        let mut restore = None;
        if let (Some(wanted), Some(found)) = (wanted, &found)
            && wanted != found
        {
            match std::fs::write(AUTOGROUP, wanted) {
                Ok(()) => restore = Some(found.clone()),
                Err(e) => println!("BENCH_AUTOGROUP: cannot write {AUTOGROUP}: {e}"),
            }
        }
        let now = std::fs::read_to_string(AUTOGROUP)
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|_| "unknown (no such setting)".to_owned());
        println!(
            "scheduler: kernel.sched_autogroup_enabled = {now}{}",
            if restore.is_some() {
                " for this run (BENCH_AUTOGROUP), restored at the end"
            } else {
                ""
            }
        );
        Self { restore }
    }
}

impl Drop for Autogroup {
    fn drop(&mut self) {
        if let Some(value) = &self.restore
            && let Err(e) = std::fs::write(AUTOGROUP, value)
        {
            println!("BENCH_AUTOGROUP: could not restore {AUTOGROUP} to {value}: {e}");
        }
    }
}

/// Whether this run is `cargo test --benches` (or `BENCH_SKIP` is set): then skip.
pub fn skipped() -> bool {
    std::env::args().any(|a| a == "--test") || std::env::var_os("BENCH_SKIP").is_some()
}

/// The `PORTCULLIS_*` variables of the environment, applied over each bench's
/// configuration (`PORTCULLIS_SERVER__WORKERS=0` serves on the shared runtime).
pub fn portcullis_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars().filter(|(k, _)| k.starts_with(portcullis::config::ENV_PREFIX))
}

/// The CPU time a server spends from the moment this is made: every process holding the
/// listening TCP socket on its port (IPv4) — for nginx its master and workers, for HAProxy
/// its process, for an in-process Portcullis this bench itself — read from `/proc`.
#[allow(
    dead_code,
    reason = "each bench binary compiles this module; not all read CPU times"
)]
pub struct ServerCpu {
    pids: Vec<u32>,
    start: f64,
}

#[allow(
    dead_code,
    reason = "each bench binary compiles this module; not all read CPU times"
)]
impl ServerCpu {
    /// Starts counting for the server listening on `port`.
    pub fn start(port: u16) -> Self {
        Self::of(listeners(port))
    }

    /// Starts counting for the processes `pids`.
    pub fn of(pids: Vec<u32>) -> Self {
        let start = cpu_seconds(&pids);
        Self { pids, start }
    }

    /// The CPU time spent since the start, in seconds.
    pub fn seconds(&self) -> f64 {
        cpu_seconds(&self.pids) - self.start
    }

    /// The CPU time spent since the start per request, in microseconds.
    pub fn micros_per(&self, requests: u64) -> f64 {
        self.seconds() * 1e6 / requests.max(1) as f64
    }
}

/// The CPU time every process named `comm` spends from the moment this is made, those
/// started meanwhile included (their whole time): the Postgres backends appending the
/// audit trail, which a bench's server CPU leaves out.
#[allow(
    dead_code,
    reason = "each bench binary compiles this module; not all read CPU times"
)]
pub struct NamedCpu {
    comm: &'static str,
    start: std::collections::HashMap<u32, f64>,
}

#[allow(dead_code)]
impl NamedCpu {
    /// Starts counting for the processes named `comm`.
    pub fn start(comm: &'static str) -> Self {
        let start = named(comm)
            .into_iter()
            .map(|pid| (pid, cpu_seconds(&[pid])))
            .collect();
        Self { comm, start }
    }

    /// The CPU time spent since the start, in seconds (exited processes' time is lost).
    pub fn seconds(&self) -> f64 {
        named(self.comm)
            .into_iter()
            .map(|pid| cpu_seconds(&[pid]) - self.start.get(&pid).copied().unwrap_or(0.0))
            .sum()
    }
}

/// The processes whose command name is `comm`.
#[allow(dead_code)]
fn named(comm: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// The requests a wrk report says it completed ("  329345 requests in 10.01s, …").
#[allow(
    dead_code,
    reason = "each bench binary compiles this module; not all run wrk"
)]
pub fn wrk_requests(report: &str) -> u64 {
    report
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The processes holding the listening TCP socket on `port`.
#[allow(dead_code)]
fn listeners(port: u16) -> Vec<u32> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    // "sl local_address rem_address st ... inode": local "0100007F:1F90", state 0A = LISTEN
    let inode = tcp.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        (local_port == port && *f.get(3)? == "0A").then(|| f.get(9).map(|s| s.to_string()))?
    });
    let Some(inode) = inode else {
        return Vec::new();
    };
    let wanted = format!("socket:[{inode}]");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let holds = std::fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str())
            });
        if holds {
            pids.push(pid);
        }
    }
    pids
}

/// CPU time (user + system, every thread) used so far by `pids`, in seconds.
#[allow(dead_code)]
fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // the fields after the command name's closing parenthesis start at field 3;
            // utime and stime are fields 14 and 15
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / clock_ticks_per_second()
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), asked once.
#[allow(dead_code)]
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}
