//! One supervised server process: temp dir, log file, watchdog, readiness waits, stop.
//!
//! Every server is started as `sh -c WATCHDOG` in a process group of its own. The watchdog
//! shell starts the server in the background and reads its own stdin, a pipe whose only
//! writer is the test binary:
//! - `stop()` writes a line and closes the pipe: the watchdog sends the server its stop
//!   signal, waits up to the grace period, then kills the whole process group;
//! - when the test binary exits or dies (even by SIGKILL) the kernel closes the pipe: the
//!   watchdog reads EOF, stops the server the same way and also deletes the temp dir,
//!   which nothing else would remove for servers living in `static`s.
//!
//! The pipe is created close-on-exec by std, so no other child inherits its write end, and
//! EOF means exactly "the test binary is gone". Unlike `PR_SET_PDEATHSIG` this does not
//! depend on which thread spawned the server, and it needs no unsafe code.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{HarnessError, Result};

/// How many log lines a failure message or a panicking drop shows.
pub(crate) const LOG_TAIL_LINES: usize = 60;

/// Set to keep service temp dirs (data and logs) after the test binary ends.
pub const KEEP_DIRS_ENV: &str = "PORTCULLIS_KEEP_TEST_DIRS";

/// How often readiness probes run while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The watchdog script. Positional parameters: dir, stop signal, grace seconds, program, args.
const WATCHDOG: &str = r#"
dir=$1 sig=$2 grace=$3
shift 3
# Background lists get /dev/null as stdin unless redirected: keep the pipe on fd 3.
exec 3<&0
"$@" </dev/null 3<&- &
srv=$!
{
  # A line means "stop requested"; EOF without one means the test binary is gone.
  if read -r _; then :; else : >"$dir/.orphaned"; fi
  kill -s "$sig" "$srv" 2>/dev/null
  n=0
  while kill -0 "$srv" 2>/dev/null; do
    n=$((n + 1))
    if [ "$n" -gt $((grace * 10)) ]; then
      # Too slow: kill the server, clean up if orphaned, then kill everything left
      # in the group (its children, the main shell and this one).
      kill -s KILL "$srv" 2>/dev/null
      sleep 0.2
      if [ -e "$dir/.orphaned" ] && [ -z "${PORTCULLIS_KEEP_TEST_DIRS:-}" ]; then rm -rf "$dir"; fi
      kill -s KILL -- -$$
    fi
    sleep 0.1
  done
} <&3 &
watcher=$!
exec 3<&-
wait "$srv"
status=$?
kill "$watcher" 2>/dev/null
wait "$watcher" 2>/dev/null
if [ -e "$dir/.orphaned" ] && [ -z "${PORTCULLIS_KEEP_TEST_DIRS:-}" ]; then rm -rf "$dir"; fi
exit "$status"
"#;

/// How to launch a server; kept so `restart()` launches the same thing again.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    /// Variables of our own environment the server must not see.
    pub env_remove: Vec<String>,
    /// Signal name for a clean shutdown (`TERM`, or `INT` for Postgres' fast shutdown).
    pub stop_signal: &'static str,
    /// Seconds between the stop signal and SIGKILL of the process group.
    pub grace_secs: u64,
    /// Run as this (uid, gid) instead of our own user (Postgres refuses root).
    pub run_as: Option<(u32, u32)>,
}

impl Spec {
    pub(crate) fn new(program: impl Into<PathBuf>) -> Spec {
        Spec {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            stop_signal: "TERM",
            grace_secs: 10,
            run_as: None,
        }
    }

    pub(crate) fn arg(mut self, arg: impl Into<OsString>) -> Spec {
        self.args.push(arg.into());
        self
    }

    pub(crate) fn args<I, S>(mut self, args: I) -> Spec
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub(crate) fn env(mut self, key: &str, value: impl Into<String>) -> Spec {
        self.env.push((key.to_owned(), value.into()));
        self
    }
}

/// A running watchdog shell (and, under it, the server).
#[derive(Debug)]
struct Running {
    watchdog: Child,
    stop_pipe: Option<ChildStdin>,
    grace: Duration,
}

/// One server: its temp dir, log file, launch spec and (while running) its process.
#[derive(Debug)]
pub(crate) struct Service {
    name: String,
    dir: Option<TempDir>,
    dir_path: PathBuf,
    log: PathBuf,
    spec: Spec,
    running: Mutex<Option<Running>>,
}

// === impl Service ===

impl Service {
    /// Creates the temp dir (owned by `owner` when given) and the log file; starts nothing.
    pub(crate) fn new(name: &str, spec: Spec, owner: Option<(u32, u32)>) -> Result<Service> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("portcullis-{name}-"))
            .tempdir()
            .map_err(|e| HarnessError::io(format!("creating a temp dir for {name}"), e))?;
        let dir_path = dir.path().to_path_buf();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir_path, Some(uid), Some(gid))
                .map_err(|e| HarnessError::io(format!("chown {}", dir_path.display()), e))?;
        }
        let log = dir_path.join(format!("{name}.log"));
        File::create(&log)
            .map_err(|e| HarnessError::io(format!("creating {}", log.display()), e))?;
        Ok(Service {
            name: name.to_owned(),
            dir: Some(dir),
            dir_path,
            log,
            spec,
            running: Mutex::new(None),
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir_path
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// Appends arguments to the launch spec (for arguments naming the temp dir).
    pub(crate) fn with_args(mut self, args: impl IntoIterator<Item = OsString>) -> Service {
        self.spec.args.extend(args);
        self
    }

    /// Removes variables of our own environment from the server's.
    pub(crate) fn without_env(mut self, keys: &[&str]) -> Service {
        self.spec
            .env_remove
            .extend(keys.iter().map(|k| (*k).to_owned()));
        self
    }

    /// Adds an environment variable to the launch spec.
    pub(crate) fn with_env(mut self, key: &str, value: impl Into<String>) -> Service {
        self.spec.env.push((key.to_owned(), value.into()));
        self
    }

    fn lock(&self) -> MutexGuard<'_, Option<Running>> {
        // A panic while holding the lock leaves consistent data: recover it.
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Launches the server under its watchdog. Call `wait_until` afterwards.
    pub(crate) fn spawn(&self) -> Result<()> {
        let mut running = self.lock();
        if running.is_some() {
            return Ok(());
        }
        let spec = &self.spec;
        let log = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)
            .map_err(|e| HarnessError::io(format!("opening {}", self.log.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| HarnessError::io("duplicating a log file handle", e))?;
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(WATCHDOG)
            .arg(format!("portcullis-{}-watchdog", self.name))
            .arg(&self.dir_path)
            .arg(spec.stop_signal)
            .arg(spec.grace_secs.to_string())
            .arg(&spec.program)
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0);
        for key in &spec.env_remove {
            command.env_remove(key);
        }
        if let Some((uid, gid)) = spec.run_as {
            command.uid(uid).gid(gid);
        }
        let mut watchdog = command
            .spawn()
            .map_err(|e| HarnessError::io(format!("starting {}", spec.program.display()), e))?;
        let stop_pipe = watchdog.stdin.take();
        *running = Some(Running {
            watchdog,
            stop_pipe,
            grace: Duration::from_secs(spec.grace_secs),
        });
        Ok(())
    }

    /// Stops the server (stop signal, then SIGKILL after the grace period) and reaps it.
    /// Does nothing when it is not running.
    pub(crate) fn stop(&self) {
        let Some(mut running) = self.lock().take() else {
            return;
        };
        if let Some(mut pipe) = running.stop_pipe.take() {
            // Fails with EPIPE when the watchdog already exited; nothing to stop then.
            let _ = pipe.write_all(b"stop\n");
        }
        let deadline = Instant::now() + running.grace + Duration::from_secs(5);
        loop {
            match running.watchdog.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => break,
                Ok(None) => std::thread::sleep(POLL_INTERVAL),
            }
        }
        // The watchdog itself did not finish: kill its whole process group.
        kill_group(running.watchdog.id());
        let _ = running.watchdog.wait();
    }

    /// `Some(status)` when the server has exited on its own.
    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        let mut running = self.lock();
        let running = running.as_mut()?;
        running.watchdog.try_wait().ok().flatten()
    }

    /// Polls `probe` until it yields a value, the server exits, or `timeout` passes.
    pub(crate) fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = probe() {
                return Ok(value);
            }
            if let Some(status) = self.exit_status() {
                return Err(HarnessError::Exited {
                    service: self.name.clone(),
                    status: status.to_string(),
                    log: self.log.clone(),
                    tail: self.log_tail(LOG_TAIL_LINES),
                });
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::NotReady {
                    service: self.name.clone(),
                    what: what.to_owned(),
                    waited: timeout,
                    log: self.log.clone(),
                    tail: self.log_tail(LOG_TAIL_LINES),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// The last `lines` lines of the server's log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        tail_of_file(&self.log, lines)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- last {LOG_TAIL_LINES} lines of {} log ({}) -----\n{}\n----- end of {} log -----",
                self.name,
                self.log.display(),
                self.log_tail(LOG_TAIL_LINES),
                self.name
            );
        }
        self.stop();
        if std::env::var_os(KEEP_DIRS_ENV).is_some()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!("kept {} dir {}", self.name, kept.display());
        }
    }
}

// === helpers ===

/// Sends SIGKILL to a whole process group.
pub(crate) fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The last `lines` lines of a text file (empty when it cannot be read).
pub(crate) fn tail_of_file(path: &Path, lines: usize) -> String {
    let Ok(file) = File::open(path) else {
        return String::new();
    };
    let mut ring = std::collections::VecDeque::with_capacity(lines);
    for line in BufReader::new(file)
        .split(b'\n')
        .map_while(std::result::Result::ok)
    {
        if ring.len() == lines {
            ring.pop_front();
        }
        ring.push_back(String::from_utf8_lossy(&line).into_owned());
    }
    Vec::from(ring).join("\n")
}

/// Runs a command to completion; its stdout on success, an error with stderr otherwise.
pub(crate) fn run(command: &mut Command) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| HarnessError::io(format!("running {command:?}"), e))?;
    command_result(command, output)
}

/// [`run`] with `input` written to the command's stdin.
pub(crate) fn run_with_stdin(command: &mut Command, input: &str) -> Result<String> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HarnessError::io(format!("running {command:?}"), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| HarnessError::io(format!("writing to {command:?}"), e))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| HarnessError::io(format!("running {command:?}"), e))?;
    command_result(command, output)
}

fn command_result(command: &Command, output: std::process::Output) -> Result<String> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(HarnessError::Command {
            command: format!("{command:?}"),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            stdout: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        })
    }
}

/// Retries `start` (with fresh ports) when a server exited because its port was taken
/// by someone else between `free_port()` and its bind.
pub(crate) fn retry_on_port_clash<T>(mut start: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match start() {
            Err(HarnessError::Exited { ref tail, .. })
                if attempts < 3 && tail.to_ascii_lowercase().contains("address already in use") =>
            {
                continue;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> Spec {
        Spec::new("/bin/sh").args(["-c", script])
    }

    #[test]
    fn a_server_that_exits_is_reported_with_its_log() {
        let service = Service::new("exits", shell("echo cannot bind >&2; exit 3"), None)
            .unwrap_or_else(|e| panic!("{e}"));
        service.spawn().unwrap_or_else(|e| panic!("{e}"));

        let result = service.wait_until("never", Duration::from_secs(30), || None::<()>);

        match result {
            Err(HarnessError::Exited { status, tail, .. }) => {
                assert!(status.contains('3'), "{status}");
                assert_eq!(tail, "cannot bind");
            }
            other => panic!("expected Exited, got {other:?}"),
        }
    }

    #[test]
    fn stop_kills_a_server_that_ignores_its_stop_signal() {
        let mut spec = shell("trap '' TERM; echo started; while :; do sleep 1; done");
        spec.grace_secs = 1;
        let service = Service::new("stubborn", spec, None).unwrap_or_else(|e| panic!("{e}"));
        service.spawn().unwrap_or_else(|e| panic!("{e}"));
        let log = service.log_path().to_path_buf();
        service
            .wait_until("it logs", Duration::from_secs(30), || {
                (tail_of_file(&log, 1) == "started").then_some(())
            })
            .unwrap_or_else(|e| panic!("{e}"));

        let started = Instant::now();
        service.stop();

        assert!(
            service.exit_status().is_none(),
            "stopped services have no process"
        );
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn restart_appends_to_the_same_log() {
        let service = Service::new("twice", shell("echo run; exec sleep 60"), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let log = service.log_path().to_path_buf();
        for runs in 1..=2 {
            service.spawn().unwrap_or_else(|e| panic!("{e}"));
            service
                .wait_until("it logs", Duration::from_secs(30), || {
                    let tail = tail_of_file(&log, 10);
                    (tail.lines().filter(|l| *l == "run").count() == runs).then_some(())
                })
                .unwrap_or_else(|e| panic!("{e}"));
            service.stop();
        }
        let tail = tail_of_file(&log, 10);
        assert_eq!(tail.lines().filter(|l| *l == "run").count(), 2, "{tail}");
    }
}
