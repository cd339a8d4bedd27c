//! Config hot reload at fleet size: the time from a config write to its arrival at N SSE
//! watchers (p50/p99/max), the memory each idle watcher costs the server, and snapshot
//! reads per second.
//!
//! ```sh
//! ulimit -n 20000   # each process needs a descriptor per watcher
//! BENCH_WATCHERS=1000 BENCH_INSTANCES=1 cargo bench -p portcullis --bench config_watch
//! BENCH_WATCHERS=10000 BENCH_INSTANCES=1 cargo bench -p portcullis --bench config_watch
//! BENCH_WATCHERS=10000 BENCH_INSTANCES=3 cargo bench -p portcullis --bench config_watch
//! ```
//!
//! Each instance is the release `portcullis` binary in its own process (so its RSS is its
//! own), all on one real Postgres from the test harness; the watchers are raw HTTP/1.1
//! streams over TLS from this process, spread evenly over the instances. A round is: PUT a
//! new release on instance 0, then wait until every watcher has read the event carrying
//! its version; rounds are `BENCH_ROUNDS` (5) with `BENCH_ROUND_GAP_MS` (500) of quiet
//! between them. `BENCH_PORTCULLIS_BIN` runs another build of the binary (for an A/B).
//! Watchers connect `BENCH_CONNECTING` (256) at a time. The watchers run like wrk's
//! connections: one single-threaded event loop per core (`BENCH_WATCHER_LOOPS` sets how
//! many; they run as `SCHED_BATCH` unless `BENCH_WATCHER_SCHED=normal`, see
//! `schedule_as_batch`), each watcher on one loop for
//! good, and each notes its own arrival time (the orchestration looks every millisecond
//! whether all have arrived), so the load generator spends no work stealing or wake-ups
//! per event.
//! The latency of a watcher is from just before the PUT to the moment its event was
//! read, so it includes the write (encryption, the Postgres commit and NOTIFY) and the
//! other instances' change feeds. Results go to stdout; copy them into docs/benchmarks.md
//! with the machine and date.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::env_or;

use std::collections::BTreeSet;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use portcullis::clients::{GrantType, NewClient, ScopeSet};
use rustls::pki_types::ServerName;
use secrecy::ExposeSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};

const HASH_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const APP: &str = "executor-orders";

struct Instance {
    child: Child,
    https: u16,
    admin: u16,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Instance {
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

fn main() {
    if support::skipped() {
        return;
    }
    let _autogroup = support::Autogroup::apply();
    // the orchestration (writes, counting arrivals) on this thread; the watchers on their
    // own loops (`Loops`)
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let watchers = env_or("BENCH_WATCHERS", 1000) as usize;
    let instances = env_or("BENCH_INSTANCES", 1) as usize;
    let rounds = env_or("BENCH_ROUNDS", 5) as usize;
    // the quiet time between rounds; in production changes are minutes apart
    let round_gap_ms = env_or("BENCH_ROUND_GAP_MS", 500);
    let pg = harness::Postgres::shared();
    let db = pg.fresh_database("bench_watch").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = portcullis::dev::ensure_certificate(dir.path()).unwrap();
    let master = dir.path().join("config-master.key");

    // the client every watcher and the writer use, created straight in the database
    let config_text = |https: u16, admin: u16, keys: &std::path::Path| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{https}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             public_url = \"https://localhost:{https}\"\nmax_connections = 50000\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\n[database]\nurl = \"{db}\"\nmax_connections = 8\n\
             [tokens]\nhash_key = \"{HASH_KEY}\"\n[log]\nlevel = \"warn\"\n\
             [keys]\nsource = \"file\"\nfile_dir = \"{}\"\n\
             [config_center]\nmaster_key_file = \"{}\"\nreconcile_interval = \"1h\"\n\
             max_watches_per_client = 0\n",
            cert.display(),
            key.display(),
            keys.display(),
            master.display()
        )
    };
    let config = portcullis::config::from_table(
        toml::from_str(&config_text(0, 0, dir.path())).unwrap(),
        support::portcullis_env(),
    )
    .unwrap();
    let database = portcullis::db::Database::connect_lazy(&config.database).unwrap();
    database.migrate().await.unwrap();
    let clients = portcullis::clients::ClientStore::with_cache_ttl(
        database.clone(),
        config.server_key().unwrap(),
        Duration::ZERO,
    );
    let (client, secret) = clients
        .create(
            NewClient {
                id: None,
                name: "bench".to_owned(),
                grant_types: BTreeSet::from([GrantType::ClientCredentials]),
                scopes: ScopeSet::parse("config:read:prod config:write:prod").unwrap(),
                audiences: vec![],
                access_token_lifetime: None,
            },
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();

    let mut fleet = Vec::new();
    for i in 0..instances {
        let (https, admin) = (harness::free_port(), harness::free_port());
        let keys = dir.path().join(format!("keys-{i}"));
        std::fs::create_dir_all(&keys).unwrap();
        let file = dir.path().join(format!("portcullis-{i}.toml"));
        std::fs::write(&file, config_text(https, admin, &keys)).unwrap();
        let log = std::fs::File::create(dir.path().join(format!("portcullis-{i}.log"))).unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 20000 2>/dev/null; exec {} serve --config {}",
                // another build of the binary, for an A/B with the same bench
                std::env::var("BENCH_PORTCULLIS_BIN")
                    .unwrap_or_else(|_| env!("CARGO_BIN_EXE_portcullis").to_owned()),
                file.display()
            ))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        fleet.push(Instance {
            child,
            https,
            admin,
        });
    }
    let http = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    for inst in &fleet {
        let url = format!("http://127.0.0.1:{}/readyz", inst.admin);
        let end = Instant::now() + Duration::from_secs(30);
        while !http
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(Instant::now() < end, "instance not ready: {url}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut tokens = Vec::new();
    for inst in &fleet {
        let r: serde_json::Value = http
            .post(format!("https://localhost:{}/oauth2/token", inst.https))
            .basic_auth(client.id.as_str(), Some(secret.expose_secret()))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tokens.push(r["access_token"].as_str().unwrap().to_owned());
    }
    let publish = |n: u64| {
        let (http, https, token) = (http.clone(), fleet[0].https, tokens[0].clone());
        async move {
            let entries: Vec<serde_json::Value> = (0..20)
                .map(|k| serde_json::json!({ "key": format!("key.{k}"), "value": format!("value {k} of release {n}") }))
                .collect();
            let r = http
                .put(format!("https://localhost:{https}/config/v1/prod/{APP}"))
                .bearer_auth(token)
                .json(&serde_json::json!({ "entries": entries }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201);
            let v: serde_json::Value = r.json().await.unwrap();
            v["version"].as_u64().unwrap()
        }
    };
    let first = publish(0).await;

    let baseline: Vec<u64> = fleet.iter().map(Instance::rss_kib).collect();
    let tls = Arc::new(tls_config(&std::fs::read(&cert).unwrap()));
    let loops = Loops::start();
    let arrivals = Arc::new(Arrivals::new(watchers));
    let connecting = Arc::new(Semaphore::new(env_or("BENCH_CONNECTING", 256) as usize));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let started = Instant::now();
    // the first half connects, then the RSS is read again before the second half: what
    // the second half adds is what a watcher costs, without the one-off growth (allocator
    // pages, buffers, caches) the first connections bring, which varies from run to run
    let half = watchers / 2;
    let mut midway: Vec<u64> = Vec::new();
    for w in 0..watchers {
        if w == half {
            for _ in 0..half {
                ready_rx.recv().await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            midway = fleet.iter().map(Instance::rss_kib).collect();
        }
        let inst = w % instances;
        let (port, token) = (fleet[inst].https, tokens[inst].clone());
        let (tls, arrivals, ready, gate) = (
            tls.clone(),
            arrivals.clone(),
            ready_tx.clone(),
            connecting.clone(),
        );
        loops.spawn(w, async move {
            let permit = gate.acquire_owned().await.unwrap();
            let stream = open_watch(&tls, port, &token, first).await;
            drop(permit);
            let _ = ready.send(());
            let (mut tcp, mut records) = Records::take(stream);
            // written now, so its pages are mapped while connecting: a zeroed buffer
            // comes from calloc untouched, and the first event would pay its page faults
            // (10,000 watchers × 4 pages, measured as part of round 1)
            let mut buf = vec![0xffu8; 16 * 1024];
            let mut filled = 0;
            // a line not complete at the end of a record; events are scanned as bytes, in
            // the record itself unless a line spans two records
            let mut tail: Vec<u8> = Vec::with_capacity(16 * 1024);
            loop {
                if filled == buf.len() {
                    buf.resize(buf.len() * 2, 0xff);
                }
                let n = match tcp.read(&mut buf[filled..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                filled += n;
                let at = Instant::now();
                let mut start = 0;
                while let Some(len) = record_len(&buf[start..filled]) {
                    let (kind, plain) = records.open(&mut buf[start..start + len]);
                    start += len;
                    if kind != APPLICATION_DATA {
                        // close_notify: the server is shutting down
                        return;
                    }
                    let found = |v| arrivals.arrived(w, v, at);
                    if tail.is_empty() {
                        let done = scan_ids(plain, found);
                        tail.extend_from_slice(&plain[done..]);
                    } else {
                        tail.extend_from_slice(plain);
                        let done = scan_ids(&tail, found);
                        tail.drain(..done);
                    }
                }
                buf.copy_within(start..filled, 0);
                filled -= start;
            }
        });
    }
    for _ in half..watchers {
        ready_rx.recv().await.unwrap();
    }
    println!(
        "{watchers} watchers connected over {instances} instance(s) in {:.1}s (not counting \
         the 2 s pause at half)",
        started.elapsed().as_secs_f64() - 2.0
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let loaded: Vec<u64> = fleet.iter().map(Instance::rss_kib).collect();
    for (i, ((b, m), l)) in baseline.iter().zip(&midway).zip(&loaded).enumerate() {
        let per = (l.saturating_sub(*b)) as f64 * 1024.0 / (watchers / instances) as f64;
        let second_half = (watchers - half) / instances;
        let marginal = (l.saturating_sub(*m)) as f64 * 1024.0 / second_half.max(1) as f64;
        println!(
            "instance {i}: RSS {b} KiB idle, {m} KiB with {} watchers, {l} KiB with {}: \
             {per:.0} bytes per watcher from idle, {marginal:.0} per watcher of the second half",
            half / instances,
            watchers / instances,
        );
    }

    // the CPU both sides spend on the rounds (the gaps between them are idle)
    let instances_cpu = support::ServerCpu::of(fleet.iter().map(|i| i.child.id()).collect());
    let watchers_cpu = support::ServerCpu::of(vec![std::process::id()]);
    let mut all = Vec::new();
    for round in 1..=rounds as u64 {
        let t0 = Instant::now();
        let version = publish(round).await;
        let write = t0.elapsed();
        // each watcher noted its own arrival time; this only looks every millisecond
        // whether all have arrived (so counting costs no wake-up per event)
        loop {
            let count = arrivals.count(version);
            if count == watchers {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "round {round}: only {count} of {watchers} watchers got version {version}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut lat = arrivals.latencies(t0);
        lat.sort();
        println!(
            "round {round} (version {version}): the write answered in {:.1} ms; arrivals p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            ms(write),
            ms(lat[lat.len() / 2]),
            ms(lat[lat.len() * 99 / 100]),
            ms(lat[lat.len() - 1])
        );
        all.extend(lat);
        tokio::time::sleep(Duration::from_millis(round_gap_ms)).await;
    }
    let events = (rounds * watchers) as u64;
    println!(
        "CPU per delivered event: the instances {:.1} µs, the watchers (this process) {:.1} µs",
        instances_cpu.micros_per(events),
        watchers_cpu.micros_per(events)
    );
    all.sort();
    println!(
        "== {watchers} watchers, {instances} instance(s), {rounds} rounds: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        ms(all[all.len() / 2]),
        ms(all[all.len() * 99 / 100]),
        ms(all[all.len() - 1])
    );

    if Command::new("wrk").arg("--version").output().is_ok() && instances == 1 {
        let script = dir.path().join("read.lua");
        std::fs::write(
            &script,
            format!(
                "wrk.headers[\"Authorization\"] = \"Bearer {}\"\n",
                tokens[0]
            ),
        )
        .unwrap();
        println!(
            "== snapshot reads (GET /config/v1/prod/{APP}), 64 connections, 10 s, while the watchers stay connected"
        );
        let out = Command::new("wrk")
            .args(["-t2", "-c64", "-d10s", "--latency", "-s"])
            .arg(&script)
            .arg(format!(
                "https://127.0.0.1:{}/config/v1/prod/{APP}",
                fleet[0].https
            ))
            .output()
            .unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
}

/// The watchers' event loops, built like wrk's: one single-threaded runtime per core, each
/// watcher on one of them for good, no work stealing and no wake-ups between them.
struct Loops(Vec<tokio::runtime::Handle>);

impl Loops {
    fn start() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        let loops = env_or("BENCH_WATCHER_LOOPS", cores as u64).max(1);
        let batch = std::env::var("BENCH_WATCHER_SCHED").as_deref() != Ok("normal");
        println!(
            "watchers on {loops} event loop(s), scheduled as {}",
            if batch { "SCHED_BATCH" } else { "SCHED_OTHER" }
        );
        Self(
            (0..loops)
                .map(|i| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let handle = rt.handle().clone();
                    std::thread::Builder::new()
                        .name(format!("watchers-{i}"))
                        .spawn(move || {
                            if batch {
                                schedule_as_batch();
                            }
                            rt.block_on(std::future::pending::<()>())
                        })
                        .unwrap();
                    handle
                })
                .collect(),
        )
    }

    fn spawn(&self, w: usize, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.0[w % self.0.len()].spawn(task);
    }
}

/// Puts the calling thread in the `SCHED_BATCH` class (`chrt`, util-linux): a load
/// generator on the server's own two cores then does not preempt the instance each time
/// an event wakes it, but reads the events that arrived while it waited for its turn, as a
/// node on a machine of its own would not take the instance's CPU at all. The instance
/// keeps the normal class. `BENCH_WATCHER_SCHED=normal` leaves the watchers in it too.
fn schedule_as_batch() {
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|t| t.to_string_lossy().into_owned()));
    let done = tid.is_some_and(|tid| {
        Command::new("chrt")
            .args(["--batch", "--pid", "0", &tid])
            .status()
            .is_ok_and(|s| s.success())
    });
    if !done {
        eprintln!("warning: the watchers stay in the normal scheduling class (chrt failed)");
    }
}

/// Each watcher's newest version and when it was read, written by the watcher itself.
struct Arrivals {
    epoch: Instant,
    version: Vec<AtomicU64>,
    at_nanos: Vec<AtomicU64>,
}

impl Arrivals {
    fn new(watchers: usize) -> Self {
        Self {
            epoch: Instant::now(),
            version: (0..watchers).map(|_| AtomicU64::new(0)).collect(),
            at_nanos: (0..watchers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn arrived(&self, w: usize, version: u64, at: Instant) {
        if version > self.version[w].load(Ordering::Relaxed) {
            let nanos = u64::try_from(at.duration_since(self.epoch).as_nanos()).unwrap();
            self.at_nanos[w].store(nanos, Ordering::Relaxed);
            self.version[w].store(version, Ordering::Release);
        }
    }

    fn count(&self, version: u64) -> usize {
        self.version
            .iter()
            .filter(|v| v.load(Ordering::Acquire) == version)
            .count()
    }

    /// Every watcher's time from `t0` to reading the version it holds.
    fn latencies(&self, t0: Instant) -> Vec<Duration> {
        let from = t0.duration_since(self.epoch);
        self.at_nanos
            .iter()
            .map(|a| Duration::from_nanos(a.load(Ordering::Relaxed)).saturating_sub(from))
            .collect()
    }
}

/// Hands the version of every complete `id: <version>` line in `data` to `found`;
/// returns how many leading bytes are done with: everything up to the last line end (the
/// rest is a line still arriving). `data` begins at a line start, so after an ordinary
/// record, which ends with the event's blank line, nothing is left over.
fn scan_ids(data: &[u8], mut found: impl FnMut(u64)) -> usize {
    let Some(last) = memchr::memrchr(b'\n', data) else {
        return 0;
    };
    let lines = &data[..=last];
    let mut parse = |at: usize| {
        let end = at + memchr::memchr(b'\n', &lines[at..]).unwrap_or(0);
        if let Some(v) = std::str::from_utf8(&lines[at..end])
            .ok()
            .and_then(|t| t.parse::<u64>().ok())
        {
            found(v);
        }
    };
    if lines.starts_with(b"id: ") {
        parse(4);
    }
    for i in memchr::memmem::find_iter(lines, b"\nid: ") {
        parse(i + 5);
    }
    last + 1
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn tls_config(cert_pem: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(cert_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // the watchers open the server's records themselves once the head is read (`Records`)
    config.enable_secret_extraction = true;
    config
}

const APPLICATION_DATA: u8 = 0x17;

/// The length of the TLS record at the start of `data` (header included), once all of it
/// is there.
fn record_len(data: &[u8]) -> Option<usize> {
    let header = data.get(..5)?;
    let len = 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
    (data.len() >= len).then_some(len)
}

/// A watcher's reading side of TLS 1.3 after the handshake and the response head: it opens
/// the server's records itself (RFC 8446 §5.2), in the read buffer, so an event costs one
/// `read` and one decryption in place — as wrk's connections read through OpenSSL with
/// nothing in between. Every record is still authenticated, in sequence.
struct Records {
    key: aws_lc_rs::aead::LessSafeKey,
    iv: [u8; aws_lc_rs::aead::NONCE_LEN],
    seq: u64,
}

impl Records {
    /// Takes the socket and the server's traffic key from a TLS stream whose reads are
    /// all done (nothing is sent on a watch between its head and its first event).
    fn take(stream: tokio_rustls::client::TlsStream<TcpStream>) -> (TcpStream, Self) {
        use aws_lc_rs::aead::{
            AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305, LessSafeKey, UnboundKey,
        };
        use rustls::ConnectionTrafficSecrets as S;
        let (tcp, connection) = stream.into_inner();
        assert_eq!(
            connection.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3),
            "records are opened as TLS 1.3 records"
        );
        let (seq, secrets) = connection.dangerous_extract_secrets().unwrap().rx;
        let (algorithm, key, iv) = match &secrets {
            S::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            S::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            S::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => panic!("a cipher the bench does not open"),
        };
        let records = Self {
            key: LessSafeKey::new(UnboundKey::new(algorithm, key.as_ref()).unwrap()),
            iv: iv.as_ref().try_into().unwrap(),
            seq,
        };
        (tcp, records)
    }

    /// Opens the record `record` (header and body) in place: its real content type and
    /// its plaintext.
    fn open<'a>(&mut self, record: &'a mut [u8]) -> (u8, &'a [u8]) {
        let (header, body) = record.split_at_mut(5);
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        let aad: [u8; 5] = (*header).try_into().unwrap();
        let inner = self
            .key
            .open_in_place(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(aad),
                body,
            )
            .expect("a record sealed by the server, in sequence");
        self.seq += 1;
        // the inner plaintext: content, its real type, zero padding
        let end = inner.iter().rposition(|&b| b != 0).expect("a content type");
        (inner[end], &inner[..end])
    }
}

async fn open_watch(
    tls: &Arc<rustls::ClientConfig>,
    port: u16,
    token: &str,
    from: u64,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let r: Result<_, std::io::Error> = async {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
            let mut s = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await?;
            s.write_all(
                format!(
                    "GET /config/v1/prod/{APP}/watch?version={from} HTTP/1.1\r\nhost: localhost\r\n\
                     authorization: Bearer {token}\r\naccept: text/event-stream\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
            // the head, up to the blank line
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut byte).await? == 0 {
                    return Err(std::io::Error::other("closed before the head"));
                }
                head.push(byte[0]);
            }
            if !head.starts_with(b"HTTP/1.1 200") {
                return Err(std::io::Error::other(
                    String::from_utf8_lossy(&head).into_owned(),
                ));
            }
            Ok(s)
        }
        .await;
        match r {
            Ok(s) => return s,
            Err(e) if attempt < 20 => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(e) => panic!("cannot open a watch: {e}"),
        }
    }
}
