//! The HA drill (issue 7 item 5): nginx rendered from `deploy/nginx` → three
//! `portcullis serve` processes sharing one Postgres, one Redis (append-only file on) and
//! the signing keys in OpenBao → two admin nodes that echo the identity they were given.
//!
//! A continuous mixed load runs through the whole drill, every request through nginx:
//!
//! - `get`: proxied GETs with a JWT (idempotent), checked for the identity the node echoes;
//! - `token`: `client_credentials` issuance (POST);
//! - `refresh`: independent refresh-token rotation chains (POST); a chain has **lost** its
//!   token when a refresh token the gateway handed out with a 200 is later refused as
//!   `invalid_grant`;
//! - `write`: a writer publishing a config release at a steady pace (PUT, each release
//!   carrying its sequence number);
//! - watchers: SSE watches and a long-poller on the same application. A watcher **missed**
//!   an acknowledged version when, once the phase settled, it holds an older version. The
//!   protocol delivers the newest snapshot (a reconnecting watcher skips intermediate
//!   releases by design), so a skipped intermediate version is not missed; a version
//!   that goes backwards, or a snapshot whose content is not what the writer published
//!   under that version, is counted as well and must be 0 too.
//!
//! Phases: baseline; `kill -9` of one Portcullis process; kill of one admin node; both
//! started again; Redis restarted. Each request is counted in the phase it ended in.
//! One table line per phase is printed (prefix `HA-DRILL`), and asserted: no failed
//! idempotent request, no lost refresh token, no missed version, and failed POST/PUTs
//! bounded by the requests in flight at the fault plus those nginx sent to the dead
//! process before it noticed (its access log shows them: 502 with only the dead process
//! as upstream). Such a request may or may not have taken effect; nginx never resends a
//! POST, and the client retries (a refresh chain presents the same token again, which
//! within `refresh.reuse_grace` yields the same successor).
//!
//! Figures are timed as follows: `nginx marks it down` is the second request nginx sent
//! to the killed process (`max_fails=2`), from its access log (`$msec`); `every instance
//! took the node out` is when `portcullis_upstream_healthy{node}` read 0 on every live
//! instance; `nginx sends to it again` is the first request a restarted process answered
//! (nginx tries a failed peer again after `fail_timeout`, 10 s); the Redis figures come
//! from `/readyz` of every instance and from the first refresh answered 200. Each of these
//! is waited for with a deadline and asserted to have happened (a Redis that never comes
//! back fails the drill, as does a chain that is not served again after it is back);
//! nginx's last request to the killed process must be within 5 s of the kill (it reads
//! the log 7 s after), and its 502s from it within 2 s.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use portcullis::clients::GrantType;
use portcullis::config::{KeySourceKind, RedisConfig};
use portcullis::refresh::NewFamily;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::nginx_ha::{Certs, Edge, refuses_connections, write};
use super::proxy::AdminNode;
use super::support::*;

const PHASES: [&str; 5] = [
    "baseline",
    "kill -9 portcullis",
    "kill admin node",
    "restart both",
    "restart redis",
];
const APP: &str = "drill-app";
const CHAINS: usize = 4;
const SSE_WATCHERS: usize = 3;

/// Request kinds that are counted per phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Get,
    Token,
    Refresh,
    Write,
}

const KINDS: [Kind; 4] = [Kind::Get, Kind::Token, Kind::Refresh, Kind::Write];

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Get => "get",
            Kind::Token => "token",
            Kind::Refresh => "refresh",
            Kind::Write => "write",
        }
    }
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// 503 from the gateway: a shared dependency is away; the feature said so.
    Unavailable,
    Failed,
}

#[derive(Debug, Default, Clone, Copy)]
struct Count {
    ok: u64,
    unavailable: u64,
    failed: u64,
}

#[derive(Debug, Default, Clone)]
struct PhaseFigures {
    counts: [Count; 4],
    watch_events: u64,
    watch_reconnects: u64,
    in_flight_at_fault: [i64; 4],
    /// Requests nginx answered 502 after sending them to a dead instance.
    not_retried: u64,
    fault_at: Option<Instant>,
    /// The last failed or 503 answer of the phase (any kind).
    last_error_at: Option<Instant>,
    refresh_lost: u64,
    versions_missed: u64,
    /// Detection and recovery figures of the phase, named, in milliseconds.
    timings: Vec<(&'static str, Option<u128>)>,
}

/// Everything the load tasks report into.
struct Drill {
    phase: AtomicUsize,
    stop: AtomicBool,
    /// The writer stops first, so the watchers can be checked against its last release.
    writes_stopped: AtomicBool,
    figures: Mutex<Vec<PhaseFigures>>,
    in_flight: [AtomicI64; 4],
    failures: Mutex<Vec<String>>,
    /// version → sequence number, for every release the writer got a 201 for.
    acked: Mutex<BTreeMap<u64, u64>>,
    watchers: Vec<Watcher>,
    refresh_lost: AtomicU64,
    /// Refreshes answered 200, per chain.
    chain_ok: Vec<AtomicU64>,
    /// Why watchers reconnected.
    reconnects: Mutex<Vec<String>>,
    /// Snapshots whose content was not what the writer published under that version,
    /// and versions that went backwards.
    watch_violations: Mutex<Vec<String>>,
}

/// What one watcher holds.
struct Watcher {
    name: String,
    latest: AtomicU64,
    /// (version, seq) of every release it received.
    seen: Mutex<Vec<(u64, u64)>>,
}

impl Drill {
    fn new(watchers: usize) -> Arc<Self> {
        let mut list = Vec::new();
        for i in 0..watchers {
            list.push(Watcher {
                name: if i < SSE_WATCHERS {
                    format!("sse-{i}")
                } else {
                    "long-poll".to_owned()
                },
                latest: AtomicU64::new(0),
                seen: Mutex::new(Vec::new()),
            });
        }
        Arc::new(Self {
            phase: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            writes_stopped: AtomicBool::new(false),
            figures: Mutex::new(vec![PhaseFigures::default(); PHASES.len()]),
            in_flight: Default::default(),
            failures: Mutex::new(Vec::new()),
            acked: Mutex::new(BTreeMap::new()),
            watchers: list,
            refresh_lost: AtomicU64::new(0),
            chain_ok: (0..CHAINS).map(|_| AtomicU64::new(0)).collect(),
            reconnects: Mutex::new(Vec::new()),
            watch_violations: Mutex::new(Vec::new()),
        })
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Marks a request of `kind` as in flight.
    fn begin(&self, kind: Kind) {
        self.in_flight[kind.index()].fetch_add(1, Ordering::SeqCst);
    }

    /// Books a request in the phase it ended in: a request in flight at a fault is
    /// counted with the fault.
    fn end(&self, kind: Kind, outcome: Outcome, detail: impl FnOnce() -> String) {
        self.in_flight[kind.index()].fetch_sub(1, Ordering::SeqCst);
        let phase = self.phase.load(Ordering::SeqCst);
        let mut figures = self.figures.lock().unwrap();
        let f = &mut figures[phase];
        let c = &mut f.counts[kind.index()];
        match outcome {
            Outcome::Ok => c.ok += 1,
            Outcome::Unavailable => c.unavailable += 1,
            Outcome::Failed => c.failed += 1,
        }
        if outcome != Outcome::Ok {
            f.last_error_at = Some(Instant::now());
        }
        if outcome == Outcome::Failed {
            self.failures.lock().unwrap().push(format!(
                "[{}] {}: {}",
                PHASES[phase],
                kind.name(),
                detail()
            ));
        }
    }

    fn count_watch(&self, event: bool) {
        self.count_watch_because(event, String::new);
    }

    /// Counts a watch event, or a reconnect with its reason (printed with the figures).
    fn count_watch_because(&self, event: bool, why: impl FnOnce() -> String) {
        let phase = self.phase.load(Ordering::SeqCst);
        if !event {
            self.reconnects
                .lock()
                .unwrap()
                .push(format!("[{}] {}", PHASES[phase], why()));
        }
        let mut figures = self.figures.lock().unwrap();
        if event {
            figures[phase].watch_events += 1;
        } else {
            figures[phase].watch_reconnects += 1;
        }
    }

    /// The fault of the current phase happens now: keeps the requests in flight.
    fn fault(&self) -> Instant {
        let at = Instant::now();
        let phase = self.phase.load(Ordering::SeqCst);
        let mut figures = self.figures.lock().unwrap();
        for k in KINDS {
            figures[phase].in_flight_at_fault[k.index()] =
                self.in_flight[k.index()].load(Ordering::SeqCst);
        }
        figures[phase].fault_at = Some(at);
        at
    }

    fn timing(&self, name: &'static str, from: Instant, to: Option<Instant>) {
        let phase = self.phase.load(Ordering::SeqCst);
        self.figures.lock().unwrap()[phase].timings.push((
            name,
            to.map(|t| t.saturating_duration_since(from).as_millis()),
        ));
    }

    /// A watcher received release `version` with sequence `seq`.
    fn received(&self, w: usize, version: u64, seq: Option<u64>) {
        let watcher = &self.watchers[w];
        let before = watcher.latest.load(Ordering::SeqCst);
        if version < before {
            self.watch_violations.lock().unwrap().push(format!(
                "{}: version {version} after {before}",
                watcher.name
            ));
            return;
        }
        watcher.latest.store(version, Ordering::SeqCst);
        watcher
            .seen
            .lock()
            .unwrap()
            .push((version, seq.unwrap_or(u64::MAX)));
        self.count_watch(true);
    }

    /// Waits (up to 20 s) until every watcher holds the newest acknowledged version,
    /// then counts, per watcher, the acknowledged versions newer than what it holds.
    async fn settle(&self) -> u64 {
        let newest = self
            .acked
            .lock()
            .unwrap()
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0);
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end
            && self
                .watchers
                .iter()
                .any(|w| w.latest.load(Ordering::SeqCst) < newest)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let acked = self.acked.lock().unwrap();
        self.watchers
            .iter()
            .map(|w| {
                let held = w.latest.load(Ordering::SeqCst);
                if held >= newest {
                    0
                } else {
                    acked.range(held + 1..=newest).count() as u64
                }
            })
            .sum()
    }

    /// Ends the current phase: settles the watchers and books the phase's figures.
    async fn end_phase(&self) {
        let missed = self.settle().await;
        let phase = self.phase.load(Ordering::SeqCst);
        let lost = self.refresh_lost.swap(0, Ordering::SeqCst);
        {
            let mut figures = self.figures.lock().unwrap();
            figures[phase].versions_missed = missed;
            figures[phase].refresh_lost = lost;
        }
        if phase + 1 < PHASES.len() {
            self.phase.store(phase + 1, Ordering::SeqCst);
        }
    }
}

// === the load ===

fn classify(status: StatusCode) -> Outcome {
    if status.is_success() {
        Outcome::Ok
    } else if status == StatusCode::SERVICE_UNAVAILABLE {
        Outcome::Unavailable
    } else {
        Outcome::Failed
    }
}

/// Proxied GETs with a JWT; the node must echo the token's subject as the identity.
async fn get_loop(
    drill: Arc<Drill>,
    http: reqwest::Client,
    base: String,
    jwt: String,
    sub: String,
) {
    let mut pace = tokio::time::interval(Duration::from_millis(15));
    let mut i = 0u64;
    while !drill.stopped() {
        pace.tick().await;
        i += 1;
        drill.begin(Kind::Get);
        let r = http
            .get(format!("{base}/api/jobs/{i}"))
            .bearer_auth(&jwt)
            .send()
            .await;
        let (outcome, detail) = match r {
            Ok(r) => {
                let status = r.status();
                let body: Value = r.json().await.unwrap_or_default();
                if status == StatusCode::OK && body["user"] != sub.as_str() {
                    (Outcome::Failed, format!("the node saw identity {body}"))
                } else {
                    (classify(status), format!("{status} {body}"))
                }
            }
            Err(e) => (Outcome::Failed, e.to_string()),
        };
        drill.end(Kind::Get, outcome, || detail);
    }
}

/// `client_credentials` issuance.
async fn token_loop(
    drill: Arc<Drill>,
    http: reqwest::Client,
    base: String,
    creds: (String, String),
) {
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    while !drill.stopped() {
        pace.tick().await;
        drill.begin(Kind::Token);
        let r = http
            .post(format!("{base}/oauth2/token"))
            .basic_auth(&creds.0, Some(&creds.1))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", "scheduler:executor"),
            ])
            .send()
            .await;
        let (outcome, detail) = match r {
            Ok(r) => {
                let status = r.status();
                let body: Value = r.json().await.unwrap_or_default();
                if status == StatusCode::OK && body["access_token"].as_str().is_none() {
                    (Outcome::Failed, format!("200 without a token: {body}"))
                } else {
                    (classify(status), format!("{status} {body}"))
                }
            }
            Err(e) => (Outcome::Failed, e.to_string()),
        };
        drill.end(Kind::Token, outcome, || detail);
    }
}

/// One refresh-token chain: every success hands the next token; after a transport error
/// or a 5xx the same token is presented again (within `refresh.reuse_grace` a token
/// whose rotation was lost on the way yields the same successor).
async fn refresh_chain(
    drill: Arc<Drill>,
    chain: usize,
    http: reqwest::Client,
    base: String,
    creds: (String, String),
    first: String,
) {
    let mut token = first;
    let mut pace = tokio::time::interval(Duration::from_millis(200));
    while !drill.stopped() {
        pace.tick().await;
        drill.begin(Kind::Refresh);
        let r = http
            .post(format!("{base}/oauth2/token"))
            .basic_auth(&creds.0, Some(&creds.1))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", &token)])
            .send()
            .await;
        let (outcome, detail) = match r {
            Ok(r) => {
                let status = r.status();
                let body: Value = r.json().await.unwrap_or_default();
                match (status, body["refresh_token"].as_str()) {
                    (StatusCode::OK, Some(next)) => {
                        token = next.to_owned();
                        drill.chain_ok[chain].fetch_add(1, Ordering::SeqCst);
                        (Outcome::Ok, String::new())
                    }
                    (StatusCode::BAD_REQUEST, _) if body["error"] == "invalid_grant" => {
                        // a token the gateway handed out is refused: this chain is lost
                        drill.refresh_lost.fetch_add(1, Ordering::SeqCst);
                        drill.end(Kind::Refresh, Outcome::Failed, || {
                            format!("refresh token lost: {body}")
                        });
                        return;
                    }
                    _ => (classify(status), format!("{status} {body}")),
                }
            }
            Err(e) => (Outcome::Failed, e.to_string()),
        };
        drill.end(Kind::Refresh, outcome, || detail);
    }
}

/// Publishes a release every 250 ms (no `expected_version`: a write applies to whatever
/// is current), each with its own sequence number.
async fn writer_loop(drill: Arc<Drill>, http: reqwest::Client, base: String, jwt: String) {
    let mut pace = tokio::time::interval(Duration::from_millis(250));
    let mut seq = 0u64;
    while !drill.writes_stopped.load(Ordering::SeqCst) {
        pace.tick().await;
        seq += 1;
        drill.begin(Kind::Write);
        let r = http
            .put(format!("{base}/config/v1/prod/{APP}"))
            .bearer_auth(&jwt)
            .json(&json!({
                "entries": [{ "key": "seq", "value": seq.to_string() }],
                "message": "ha drill",
            }))
            .send()
            .await;
        let (outcome, detail) = match r {
            Ok(r) => {
                let status = r.status();
                let body: Value = r.json().await.unwrap_or_default();
                if status == StatusCode::CREATED
                    && let Some(v) = body["version"].as_u64()
                {
                    drill.acked.lock().unwrap().insert(v, seq);
                }
                (classify(status), format!("{status} {body}"))
            }
            Err(e) => (Outcome::Failed, e.to_string()),
        };
        drill.end(Kind::Write, outcome, || detail);
    }
}

fn seq_of(snapshot: &Value) -> Option<u64> {
    snapshot["entries"]
        .as_array()?
        .iter()
        .find(|e| e["key"] == "seq")?["value"]
        .as_str()?
        .parse()
        .ok()
}

/// An SSE watcher that reconnects from its version whenever its stream ends.
async fn sse_watcher(
    drill: Arc<Drill>,
    w: usize,
    http: reqwest::Client,
    base: String,
    jwt: String,
) {
    let url = format!("{base}/config/v1/prod/{APP}/watch");
    let mut why: Option<String> = None;
    while !drill.stopped() {
        if let Some(why) = why.take() {
            drill.count_watch_because(false, || format!("{}: {why}", drill.watchers[w].name));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let held = drill.watchers[w].latest.load(Ordering::SeqCst);
        let mut req = http.get(&url).bearer_auth(&jwt);
        if held > 0 {
            req = req.header("last-event-id", held.to_string());
        }
        let mut resp = match req.send().await {
            Ok(r) if r.status() == StatusCode::OK => r,
            Ok(r) => {
                why = Some(format!("answered {}", r.status()));
                continue;
            }
            Err(e) => {
                why = Some(format!("connect: {e}"));
                continue;
            }
        };
        let mut parser = config_center::client::SseParser::default();
        loop {
            let chunk = tokio::select! {
                c = resp.chunk() => c,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    if drill.stopped() { return } else { continue }
                }
            };
            let chunk = match chunk {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    why = Some("the stream ended".to_owned());
                    break;
                }
                Err(e) => {
                    why = Some(format!("the stream broke: {e}"));
                    break;
                }
            };
            let Ok(events) = parser.feed(&chunk) else {
                why = Some("unparsable event".to_owned());
                break;
            };
            for e in events.into_iter().filter(|e| e.event == "release") {
                let Some(version) = e.id.as_deref().and_then(|i| i.parse().ok()) else {
                    continue;
                };
                let snapshot: Value = serde_json::from_str(&e.data).unwrap_or_default();
                drill.received(w, version, seq_of(&snapshot));
            }
        }
    }
}

/// A long-poller: `poll?version=N` again and again.
async fn long_poller(
    drill: Arc<Drill>,
    w: usize,
    http: reqwest::Client,
    base: String,
    jwt: String,
) {
    while !drill.stopped() {
        let held = drill.watchers[w].latest.load(Ordering::SeqCst);
        let r = tokio::select! {
            r = http
                .get(format!("{base}/config/v1/prod/{APP}/poll?version={held}"))
                .bearer_auth(&jwt)
                .send() => r,
            _ = async { while !drill.stopped() { tokio::time::sleep(Duration::from_millis(250)).await } } => return,
        };
        match r {
            Ok(r) if r.status() == StatusCode::OK => {
                let snapshot: Value = r.json().await.unwrap_or_default();
                if let Some(version) = snapshot["version"].as_u64() {
                    drill.received(w, version, seq_of(&snapshot));
                }
            }
            Ok(r) if r.status() == StatusCode::NOT_MODIFIED => {}
            other => {
                let why = match other {
                    Ok(r) => format!("long-poll: answered {}", r.status()),
                    Err(e) => format!("long-poll: {e}"),
                };
                drill.count_watch_because(false, || why);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

// === the system under drill ===

/// Shared services and what every process's configuration names.
struct Shared {
    database: String,
    redis: Arc<harness::Redis>,
    bao_addr: String,
    bao_token: String,
    ring_path: String,
    transit_mount: String,
    prefix: String,
}

/// One `portcullis serve` process with fixed ports, so it can be started again where
/// nginx expects it.
struct Process {
    child: Option<Child>,
    https: SocketAddr,
    admin: SocketAddr,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    fn configure(certs: &Certs, shared: &Shared, nodes: &[&AdminNode]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (https, admin) = (harness::free_port(), harness::free_port());
        let upstreams: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.url())).collect();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{https}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             shutdown_grace = \"5s\"\n\
             [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [log]\nlevel = \"warn\"\n\
             [database]\nurl = \"{db}\"\n\
             [redis]\nurl = \"{redis}\"\ncommand_timeout = \"500ms\"\n\
             [tokens]\nhash_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n\
             [refresh]\nkey_prefix = \"{prefix}\"\n\
             [keys]\nsource = \"vault\"\nreload_interval = \"2s\"\n\
             [vault]\naddr = \"{bao}\"\ntoken = \"{bao_token}\"\nring_path = \"{ring}\"\n\
             [config_center]\ntransit_mount = \"{transit}\"\nreconcile_interval = \"2s\"\n\
             [protection]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
             [proxy]\nupstreams = [{upstreams}]\nconnect_timeout = \"1s\"\nread_timeout = \"10s\"\n\
             [proxy.health]\ncooldown = \"2s\"\n\
             [[proxy.routes]]\nprefix = \"/api/\"\nauth = \"bearer\"\nscopes = [\"scheduler:executor\"]\n",
            cert = certs.instance_cert.display(),
            key = certs.instance_key.display(),
            db = shared.database,
            redis = shared.redis.url(),
            prefix = shared.prefix,
            bao = shared.bao_addr,
            bao_token = shared.bao_token,
            ring = shared.ring_path,
            transit = shared.transit_mount,
            upstreams = upstreams.join(", "),
        );
        let config = write(dir.path(), "portcullis.toml", &text);
        Self {
            child: None,
            https: ([127, 0, 0, 1], https).into(),
            admin: ([127, 0, 0, 1], admin).into(),
            config,
            _dir: dir,
        }
    }

    /// Starts the process and waits until `/readyz` answers 200.
    async fn start(&mut self) {
        self.child = Some(Child::spawn(&[
            "serve",
            "--config",
            &self.config.display().to_string(),
        ]));
        let admin = self.admin;
        eventually(
            Duration::from_secs(30),
            "the process is ready",
            || async move { readyz(admin).await.0 == 200 },
        )
        .await;
    }

    async fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.signal("KILL");
        assert!(child.wait(Duration::from_secs(10)).await.is_some());
    }
}

async fn readyz(admin: SocketAddr) -> (u16, Value) {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    match http.get(format!("http://{admin}/readyz")).send().await {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or_default()),
        Err(_) => (0, Value::Null),
    }
}

/// `portcullis_upstream_healthy{node="<addr>"}` of one process, if it reports it.
async fn node_healthy(admin: SocketAddr, node: SocketAddr) -> Option<bool> {
    let series = format!("portcullis_upstream_healthy{{node=\"{node}\"}}");
    scraped(admin, &series).await.map(|v| v == 1.0)
}

/// Polls `probe` every 20 ms until it holds (or `deadline` passes): the moment it first
/// held.
async fn when<F, Fut>(deadline: Duration, mut probe: F) -> Option<Instant>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if probe().await {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// One line of nginx's access log (format `portcullis`).
struct LogLine {
    /// `$msec`: Unix seconds with milliseconds.
    msec: f64,
    status: u16,
    /// `$upstream_addr`: every instance tried, comma-separated.
    upstream: String,
}

/// nginx access-log lines written at or after `since`.
fn access_log_since(path: &std::path::Path, since: SystemTime) -> Vec<LogLine> {
    let since = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let log = std::fs::read_to_string(path).unwrap_or_default();
    log.lines()
        .filter_map(|line| {
            let msec: f64 = line.rsplit_once("msec=")?.1.trim().parse().ok()?;
            let status = line.rsplit_once("\" ")?.1.split(' ').next()?.parse().ok()?;
            let upstream = line.split_once("upstream=")?.1;
            let upstream = upstream.split_once(" upstream_status=")?.0.to_owned();
            (msec >= since).then_some(LogLine {
                msec,
                status,
                upstream,
            })
        })
        .collect()
}

impl LogLine {
    /// Whether nginx tried `addr` for this request.
    fn tried(&self, addr: SocketAddr) -> bool {
        let addr = addr.to_string();
        self.upstream.split(", ").any(|a| a == addr)
    }
}

fn ms_after(epoch: SystemTime, msec: f64) -> u128 {
    let base = epoch
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    ((msec - base).max(0.0) * 1000.0) as u128
}

async fn a_while(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Writes a figure line straight to the process's stderr: the test harness captures
/// `println!` of passing tests, and these lines are meant for the CI log.
fn report(line: impl std::fmt::Display) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_drill_under_continuous_mixed_load() {
    let certs = Certs::new();
    let mut nodes = [AdminNode::start("a").await, AdminNode::start("b").await];
    let redis = Arc::new(harness::Redis::start_persistent().unwrap());
    let bao = harness::OpenBao::shared();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let transit_mount = format!("transit-drill-{id}");
    bao.bao(&[
        "secrets",
        "enable",
        &format!("-path={transit_mount}"),
        "transit",
    ])
    .unwrap();
    bao.bao(&[
        "write",
        "-f",
        &format!("{transit_mount}/keys/portcullis-config"),
    ])
    .unwrap();
    let shared = Shared {
        database: harness::Postgres::shared()
            .fresh_database("ha_drill")
            .unwrap(),
        redis: redis.clone(),
        bao_addr: bao.addr(),
        bao_token: bao.root_token(),
        ring_path: format!("portcullis/drill-{id}"),
        transit_mount,
        prefix: format!("drill-{id}:"),
    };

    // setup through an instance of the same deployment: schema, key ring, the client and
    // the refresh-token families the chains start from
    let setup = {
        let (db, redis_url, prefix) = (shared.database.clone(), redis.url(), shared.prefix.clone());
        let vault = format!(
            "addr = \"{}\"\ntoken = \"{}\"\nring_path = \"{}\"\n",
            shared.bao_addr, shared.bao_token, shared.ring_path
        );
        let transit = shared.transit_mount.clone();
        spawn_app(move |c| {
            c.database.url = SecretString::from(db);
            c.redis = Some(RedisConfig {
                url: SecretString::from(redis_url),
                cluster: false,
                command_timeout: Duration::from_millis(500),
            });
            c.refresh.key_prefix = prefix;
            c.keys.source = KeySourceKind::Vault;
            c.vault = Some(toml::from_str(&vault).unwrap());
            c.config_center.transit_mount = transit;
        })
        .await
    };
    let state = &setup.state;
    let now = state.keys.now();
    let scopes = format!("scheduler:executor config:read:prod:{APP} config:write:prod:{APP}");
    let creds = register_client(
        state,
        "ha-drill",
        &[GrantType::ClientCredentials, GrantType::RefreshToken],
        &scopes,
    )
    .await;
    let mut firsts = Vec::new();
    for i in 0..CHAINS {
        let issued = state
            .refresh
            .issue(
                NewFamily {
                    client_id: creds.0.clone(),
                    subject: format!("chain-{i}"),
                    scope: "scheduler:executor".to_owned(),
                    audience: vec![],
                    auth_time: now,
                    session: json!({}),
                },
                now,
            )
            .await
            .unwrap();
        firsts.push(issued.token.expose_secret().to_owned());
    }
    drop(setup);

    let mut processes = Vec::new();
    for _ in 0..3 {
        let mut p = Process::configure(&certs, &shared, &[&nodes[0], &nodes[1]]);
        p.start().await;
        processes.push(p);
    }
    let edge = Edge::start(
        &certs,
        [processes[0].https, processes[1].https, processes[2].https],
    )
    .await;
    let base = edge.url("");
    let http = edge.client.clone();
    let jwt_for = |scope: String| {
        let (http, base, creds) = (http.clone(), base.clone(), creds.clone());
        async move {
            let r = http
                .post(format!("{base}/oauth2/token"))
                .basic_auth(&creds.0, Some(&creds.1))
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("scope", scope.as_str()),
                ])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let body: Value = r.json().await.unwrap();
            body["access_token"].as_str().unwrap().to_owned()
        }
    };
    let get_jwt = jwt_for("scheduler:executor".to_owned()).await;
    let read_jwt = jwt_for(format!("config:read:prod:{APP}")).await;
    let write_jwt = jwt_for(format!("config:read:prod:{APP} config:write:prod:{APP}")).await;

    // the load, for the whole drill
    let drill = Drill::new(SSE_WATCHERS + 1);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..2 {
        tasks.spawn(get_loop(
            drill.clone(),
            http.clone(),
            base.clone(),
            get_jwt.clone(),
            creds.0.clone(),
        ));
    }
    tasks.spawn(token_loop(
        drill.clone(),
        http.clone(),
        base.clone(),
        creds.clone(),
    ));
    for (chain, first) in firsts.into_iter().enumerate() {
        tasks.spawn(refresh_chain(
            drill.clone(),
            chain,
            http.clone(),
            base.clone(),
            creds.clone(),
            first,
        ));
    }
    let writer = tokio::spawn(writer_loop(
        drill.clone(),
        http.clone(),
        base.clone(),
        write_jwt,
    ));
    // watches are held open for the whole drill: a client without an overall deadline
    let watch_http = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(certs.pki.ca_pem().as_bytes()).unwrap(),
        )
        .tls_built_in_root_certs(false)
        .resolve("localhost", ([127, 0, 0, 1], edge.nginx.port()).into())
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for w in 0..SSE_WATCHERS {
        tasks.spawn(sse_watcher(
            drill.clone(),
            w,
            watch_http.clone(),
            base.clone(),
            read_jwt.clone(),
        ));
    }
    tasks.spawn(long_poller(
        drill.clone(),
        SSE_WATCHERS,
        watch_http,
        base.clone(),
        read_jwt,
    ));

    // --- baseline ---
    a_while(Duration::from_secs(6)).await;
    drill.end_phase().await;

    // --- kill -9 one process ---
    let victim = processes[2].https;
    let wall = SystemTime::now();
    drill.fault();
    processes[2].kill().await;
    refuses_connections(victim).await;
    a_while(Duration::from_secs(7)).await;
    // nginx stops sending to an instance after max_fails (2) failed attempts: the
    // second attempt that met the dead instance is when it was detected and routed around
    let met: Vec<LogLine> = access_log_since(&certs.access_log(), wall)
        .into_iter()
        .filter(|l| l.tried(victim))
        .collect();
    let detected = met.get(1).or(met.last()).map(|l| ms_after(wall, l.msec));
    // from then on nginx sends nothing to it (until fail_timeout, 10 s, has passed)
    let last_met = met.last().map(|l| ms_after(wall, l.msec));
    // requests nginx sent to the dead instance and did not move on with: POSTs written on
    // a kept-alive connection before nginx saw it close (never resent: it may have
    // reached the instance)
    let dead_502s: Vec<u128> = met
        .iter()
        .filter(|l| l.status == 502 && l.upstream.ends_with(&victim.to_string()))
        .map(|l| ms_after(wall, l.msec))
        .collect();
    let not_retried = dead_502s.len() as u64;
    {
        let mut figures = drill.figures.lock().unwrap();
        let f = &mut figures[1];
        f.timings.push(("nginx marks it down", detected));
        f.timings.push(("nginx's last request to it", last_met));
        f.timings
            .push(("requests meeting it", Some(met.len() as u128)));
        f.not_retried = not_retried;
    }
    drill.end_phase().await;

    // --- kill one admin node ---
    let dead_node = nodes[1].addr;
    let at = drill.fault();
    nodes[1].kill().await;
    let admins: Vec<SocketAddr> = processes[..2].iter().map(|p| p.admin).collect();
    let out = when(Duration::from_secs(15), || {
        let admins = admins.clone();
        async move {
            for a in admins {
                if node_healthy(a, dead_node).await != Some(false) {
                    return false;
                }
            }
            true
        }
    })
    .await;
    drill.timing("every instance took the node out", at, out);
    a_while(Duration::from_secs(4)).await;
    drill.end_phase().await;

    // --- start both again ---
    let wall = SystemTime::now();
    let at = drill.fault();
    nodes[1].restart().await;
    processes[2].start().await;
    let started = Instant::now();
    let admins: Vec<SocketAddr> = processes.iter().map(|p| p.admin).collect();
    let node_back = when(Duration::from_secs(20), || {
        let admins = admins.clone();
        async move {
            for a in admins {
                if node_healthy(a, dead_node).await == Some(false) {
                    return false;
                }
            }
            true
        }
    })
    .await;
    drill.timing("node back in every instance", at, node_back);
    // nginx tries a failed instance again after fail_timeout (10 s)
    let log = certs.access_log();
    let instance_back = when(Duration::from_secs(25), || {
        let log = log.clone();
        async move {
            access_log_since(&log, wall)
                .iter()
                .any(|l| l.upstream == victim.to_string() && l.status == 200)
        }
    })
    .await;
    drill.timing("process ready", at, Some(started));
    drill.timing("nginx sends to it again", at, instance_back);
    a_while(Duration::from_secs(2)).await;
    drill.end_phase().await;

    // --- restart Redis ---
    let at = drill.fault();
    redis.stop();
    let admins: Vec<SocketAddr> = processes.iter().map(|p| p.admin).collect();
    let down = when(Duration::from_secs(15), || {
        let admins = admins.clone();
        async move {
            for a in admins {
                if readyz(a).await.1["checks"]["redis"]["ok"] != false {
                    return false;
                }
            }
            true
        }
    })
    .await;
    drill.timing("every /readyz says redis down", at, down);
    a_while(Duration::from_secs(2)).await;
    let restarting = Instant::now();
    {
        let redis = redis.clone();
        tokio::task::spawn_blocking(move || redis.restart().unwrap())
            .await
            .unwrap();
    }
    let back = Instant::now();
    let refreshed = |d: &Drill| d.figures.lock().unwrap()[4].counts[Kind::Refresh.index()].ok;
    let before = refreshed(&drill);
    let chain_oks = |d: &Drill| -> Vec<u64> {
        d.chain_ok
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .collect()
    };
    let chains_before = chain_oks(&drill);
    let ready = when(Duration::from_secs(20), || {
        let admins = admins.clone();
        async move {
            for a in admins {
                if readyz(a).await.0 != 200 {
                    return false;
                }
            }
            true
        }
    })
    .await;
    drill.timing("redis down for", at, Some(back));
    drill.timing("redis restart took", restarting, Some(back));
    drill.timing("every /readyz 200 again", at, ready);
    let first_ok = when(Duration::from_secs(20), || {
        let n = refreshed(&drill);
        async move { n > before }
    })
    .await;
    drill.timing("first refresh 200 after redis was back", back, first_ok);
    let every_chain = when(Duration::from_secs(20), || {
        let moved = chain_oks(&drill)
            .iter()
            .zip(&chains_before)
            .all(|(now, then)| now > then);
        async move { moved }
    })
    .await;
    drill.timing(
        "a refresh 200 on every chain after redis was back",
        back,
        every_chain,
    );
    a_while(Duration::from_secs(4)).await;
    drill.end_phase().await;

    // the writer stops; every watcher must then hold its last release
    drill.writes_stopped.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    let missed_at_end = drill.settle().await;
    drill.stop.store(true, Ordering::SeqCst);
    while tasks.join_next().await.is_some() {}

    // --- figures ---
    let figures = drill.figures.lock().unwrap().clone();
    report(
        "HA-DRILL nginx -> 3 portcullis processes -> 2 admin nodes; shared Postgres, Redis (appendonly), OpenBao",
    );
    report(format!(
        "HA-DRILL {:<20} | {:>16} | {:>17} | {:>16} | {:>16} | {:>12} | {:>17} | {:>9} | {:>7} | {:>6}",
        "phase",
        "get ok/503/fail",
        "token ok/503/fail",
        "refresh ok/503/f",
        "write ok/503/f",
        "watch ev/rec",
        "in flight g/t/r/w",
        "dead 502",
        "rt lost",
        "missed"
    ));
    for (i, f) in figures.iter().enumerate() {
        let c = |k: Kind| {
            let c = f.counts[k.index()];
            format!("{}/{}/{}", c.ok, c.unavailable, c.failed)
        };
        let inflight = if f.fault_at.is_some() {
            let n = f.in_flight_at_fault;
            format!("{}/{}/{}/{}", n[0], n[1], n[2], n[3])
        } else {
            "-".to_owned()
        };
        report(format!(
            "HA-DRILL {:<20} | {:>16} | {:>17} | {:>16} | {:>16} | {:>12} | {:>17} | {:>9} | {:>7} | {:>6}",
            PHASES[i],
            c(Kind::Get),
            c(Kind::Token),
            c(Kind::Refresh),
            c(Kind::Write),
            format!("{}/{}", f.watch_events, f.watch_reconnects),
            inflight,
            f.not_retried,
            f.refresh_lost,
            f.versions_missed
        ));
        let mut timings: Vec<String> = f
            .timings
            .iter()
            .map(|(name, ms)| match ms {
                Some(ms) if *name == "requests meeting it" => format!("{name}: {ms}"),
                Some(ms) => format!("{name}: {ms} ms"),
                None => format!("{name}: not within the deadline"),
            })
            .collect();
        if let (Some(fault), Some(last)) = (f.fault_at, f.last_error_at) {
            timings.push(format!(
                "last error/503 after the fault: {} ms",
                last.saturating_duration_since(fault).as_millis()
            ));
        }
        if !timings.is_empty() {
            report(format!("HA-DRILL {:<20}   {}", "", timings.join("; ")));
        }
    }
    let failures = drill.failures.lock().unwrap().clone();
    for f in &failures {
        report(format!("HA-DRILL failure {f}"));
    }
    for r in drill.reconnects.lock().unwrap().iter() {
        report(format!("HA-DRILL reconnect {r}"));
    }
    let violations = drill.watch_violations.lock().unwrap().clone();

    // --- targets ---
    // every detection and recovery happened, each within the deadline it was waited for:
    // nginx noticed the dead process, every instance took the dead node out and back in,
    // nginx sent to the restarted process again, every /readyz saw Redis go and come
    // back, and every refresh chain was served again once Redis was back
    for (i, f) in figures.iter().enumerate() {
        for (name, ms) in &f.timings {
            assert!(
                ms.is_some(),
                "{}: {name}: not within the deadline: {failures:?}",
                PHASES[i]
            );
        }
    }
    // nginx takes a dead process out of its pool (each worker after max_fails=2 failed
    // attempts) rather than trying it for every request until the figures are read, 7 s
    // after the kill: measured 41 to 772 ms (a worker that only carries the watches sees
    // few requests); 5 s leaves a slow CI machine room
    assert!(
        last_met.is_some_and(|ms| ms <= 5_000),
        "nginx sent to the dead process until {last_met:?} ms after the kill"
    );
    // and a POST/PUT nginx could not move on with (written to the dead process, on a
    // kept-alive connection whose close it had not seen yet, or in flight at the kill)
    // belongs to the moment of the kill, not to a window that stays open: measured
    // within 15 ms; 2 s leaves a slow CI machine room
    assert!(
        dead_502s.iter().all(|ms| *ms <= 2_000),
        "502s of the dead process at {dead_502s:?} ms after the kill"
    );
    let acked = drill.acked.lock().unwrap().clone();
    let mut wrong_content = Vec::new();
    for w in &drill.watchers {
        for (version, seq) in w.seen.lock().unwrap().iter() {
            if let Some(expected) = acked.get(version)
                && expected != seq
            {
                wrong_content.push(format!(
                    "{}: v{version} seq {seq}, published {expected}",
                    w.name
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "versions went backwards: {violations:?}"
    );
    assert!(
        wrong_content.is_empty(),
        "snapshots with the wrong content: {wrong_content:?}"
    );
    let total = |k: Kind| -> Count {
        figures.iter().fold(Count::default(), |a, f| {
            let c = f.counts[k.index()];
            Count {
                ok: a.ok + c.ok,
                unavailable: a.unavailable + c.unavailable,
                failed: a.failed + c.failed,
            }
        })
    };
    for k in KINDS {
        assert!(
            total(k).ok > 20,
            "too little {} load: {:?}",
            k.name(),
            total(k)
        );
    }
    for (i, f) in figures.iter().enumerate() {
        let phase = PHASES[i];
        assert_eq!(
            f.counts[Kind::Get.index()].failed,
            0,
            "{phase}: failed GETs: {failures:?}"
        );
        assert_eq!(
            f.counts[Kind::Get.index()].unavailable,
            0,
            "{phase}: GETs answered 503"
        );
        assert_eq!(
            f.refresh_lost, 0,
            "{phase}: refresh tokens lost: {failures:?}"
        );
        assert_eq!(f.versions_missed, 0, "{phase}: config versions missed");
        // a POST/PUT may fail only if it was in flight at the kill, or nginx sent it to
        // the dead instance before it noticed (within 2 s of the kill, asserted above);
        // a failure of any other kind (a 5xx of a live instance, a lost connection to
        // nginx) is counted in `failed` and not in either bound
        let non_idempotent = [Kind::Token, Kind::Refresh, Kind::Write];
        let failed: u64 = non_idempotent
            .iter()
            .map(|k| f.counts[k.index()].failed)
            .sum();
        let in_flight: i64 = non_idempotent
            .iter()
            .map(|k| f.in_flight_at_fault[k.index()])
            .sum();
        assert!(
            failed as i64 <= in_flight + f.not_retried as i64,
            "{phase}: {failed} POST/PUTs failed, {in_flight} were in flight and {} met the \
             dead instance: {failures:?}",
            f.not_retried
        );
        // only refreshes need Redis, and only while it restarts
        for k in [Kind::Token, Kind::Write] {
            assert_eq!(
                f.counts[k.index()].unavailable,
                0,
                "{phase}: {} answered 503",
                k.name()
            );
        }
        if i != 4 {
            assert_eq!(
                f.counts[Kind::Refresh.index()].unavailable,
                0,
                "{phase}: refreshes answered 503"
            );
        }
    }
    assert_eq!(missed_at_end, 0, "versions missed once the writer stopped");
    let watchers_end: HashMap<&str, u64> = drill
        .watchers
        .iter()
        .map(|w| (w.name.as_str(), w.latest.load(Ordering::SeqCst)))
        .collect();
    let newest = acked.keys().next_back().copied().unwrap_or(0);
    assert!(
        watchers_end.values().all(|v| *v == newest),
        "every watcher ends at {newest}: {watchers_end:?}"
    );
}
