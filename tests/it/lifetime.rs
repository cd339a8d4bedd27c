//! Servers never outlive the test binary: a child copy of this binary starts a shared
//! Redis (which lives in a static and is never dropped) and is then SIGKILLed; the
//! watchdog must stop that Redis and remove its temp dir.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HELPER_ENV: &str = "PORTCULLIS_LIFETIME_HELPER";

/// Run only as the child of `shared_servers_die_with_the_test_binary`.
#[test]
#[ignore = "helper process for shared_servers_die_with_the_test_binary"]
fn lifetime_helper_starts_a_shared_redis_and_waits() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let redis = harness::Redis::shared();
    println!("READY {} {}", redis.port(), redis.dir().display());
    // Wait to be killed; the parent gives up long before this ends.
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn shared_servers_die_with_the_test_binary() {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .args([
            "--exact",
            "lifetime::lifetime_helper_starts_a_shared_redis_and_waits",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .env_remove(harness::KEEP_DIRS_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the helper");
    let stdout = child.stdout.take().expect("piped stdout");
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.find("READY ").map(|at| line[at..].to_owned()))
        .expect("the helper reports its Redis");
    let mut fields = ready.split_whitespace().skip(1);
    let port: u16 = fields.next().and_then(|p| p.parse().ok()).expect("a port");
    let dir = std::path::PathBuf::from(fields.next().expect("a dir"));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "Redis is up"
    );
    assert!(dir.is_dir());

    child.kill().expect("SIGKILL the helper");
    child.wait().expect("reap the helper");

    let deadline = Instant::now() + Duration::from_secs(20);
    while (std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() || dir.exists())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "Redis on port {port} outlived the test binary"
    );
    assert!(!dir.exists(), "{} was not removed", dir.display());
}
