//! End-to-end throughput of `POST /oauth2/token` (client_credentials, ES256) over TLS with
//! keep-alive, and of refresh-token rotations against real Redis.
//!
//! ```sh
//! cargo bench -p portcullis --bench token_http            # needs wrk, Postgres, Redis
//! BENCH_SECONDS=20 BENCH_CONNECTIONS=64 cargo bench -p portcullis --bench token_http
//! BENCH_AUTOGROUP=off cargo bench -p portcullis --bench token_http   # session task groups off for the run (root)
//! ```
//!
//! The server runs in this process on a multi-threaded runtime; the load comes from `wrk`
//! (one thread per core, `BENCH_CONNECTIONS` keep-alive connections) on the same machine,
//! so the figures include the load generator's share of the CPU. Postgres and Redis are
//! real servers started by the test harness. After Portcullis, the same load goes to the
//! floor of its stack (`support::floor::token`: tokio, rustls and hyper around the same
//! signature, with no client authentication or audit record), the least any server built
//! from these parts spends per token here. Results go to stdout; copy them into
//! docs/benchmarks.md with the machine and date.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::env_or;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use portcullis::clients::{GrantType, NewClient, ScopeSet};
use portcullis::refresh::{NewFamily, RedisRefreshStore, RefreshSettings, RefreshStore};
use secrecy::{ExposeSecret, SecretString};

fn main() {
    // `cargo test --benches` runs benches once as tests: do nothing then
    if support::skipped() {
        return;
    }
    let _autogroup = support::Autogroup::apply();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        token_endpoint().await;
        oidc_provider_comparison();
        refresh_rotations().await;
    });
}

const HASH_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

async fn token_endpoint() {
    let connections = env_or("BENCH_CONNECTIONS", 64);
    let seconds = env_or("BENCH_SECONDS", 10);
    let pg = harness::Postgres::shared();
    let db = pg.fresh_database("bench").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = portcullis::dev::ensure_certificate(dir.path()).unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\n[database]\nurl = \"{db}\"\nmax_connections = 16\n\
         [tokens]\nhash_key = \"{HASH_KEY}\"\n[log]\nlevel = \"warn\"\n\
         [keys]\nsource = \"file\"\nfile_dir = \"{}\"\n\
         [protection.token_rate]\nburst = 1000000\nreplenish_every = \"1us\"\n",
        cert.display(),
        key.display(),
        dir.path().display()
    );
    let config =
        portcullis::config::from_table(toml::from_str(&text).unwrap(), support::portcullis_env())
            .unwrap();
    let app = portcullis::app::Application::build(config).await.unwrap();
    let state = app.state().clone();
    let addr = app.https_addr();
    tokio::spawn(app.run_until_stopped());
    while !(state.db.is_migrated() && state.keys.readiness().is_ok()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (client, secret) = state
        .clients
        .create(
            NewClient {
                id: None,
                name: "bench".to_owned(),
                grant_types: BTreeSet::from([GrantType::ClientCredentials]),
                scopes: ScopeSet::parse("jobs:run jobs:read").unwrap(),
                audiences: vec![],
                access_token_lifetime: None,
            },
            state.keys.now(),
        )
        .await
        .unwrap();
    let basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            client.id,
            secret.expose_secret()
        ))
    };
    let script = dir.path().join("token.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\n\
             wrk.body = \"grant_type=client_credentials&scope=jobs%3Arun\"\n\
             wrk.headers[\"Content-Type\"] = \"application/x-www-form-urlencoded\"\n\
             wrk.headers[\"Authorization\"] = \"Basic {basic}\"\n\
             done = function(summary, latency, requests)\n\
               io.write(string.format(\"errors (non-2xx or socket) %d\\n\", summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))\n\
             end\n"
        ),
    )
    .unwrap();
    println!(
        "== Portcullis: client_credentials, ES256, TLS keep-alive, {connections} connections, {seconds}s"
    );
    let postgres = support::NamedCpu::start("postgres");
    let requests = wrk(&script, addr.port(), "/oauth2/token");
    // read before audit_backlog's counting queries add their own
    println!(
        "Postgres CPU per token (every backend, during the load): {:.1} µs",
        postgres.seconds() * 1e6 / requests.max(1) as f64
    );
    audit_backlog(&state).await;

    // the stack's floor: the same signature and TLS with none of the endpoint's other work
    let workers = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let floor = support::floor::token(
        &cert,
        &key,
        workers,
        state.keys.clone(),
        state.config.issuer(),
    );
    println!(
        "== floor: hyper + rustls signing a token per request ({workers} workers; no client \
         authentication, no audit record)"
    );
    wrk(&script, floor.port(), "/oauth2/token");
}

/// How the audit trail kept up with the load: the `token.issue` records stored once the
/// writer has drained its queue, how long that took after the load stopped, and how many
/// events overflowed the queue (compare the first with wrk's request count).
async fn audit_backlog(state: &portcullis::state::AppState) {
    let portcullis::db::Pool::Postgres(pool) = state.db.pool() else {
        return;
    };
    let stopped = Instant::now();
    let (mut last, mut changed) = (-1_i64, Instant::now());
    loop {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM audit_events WHERE action = 'token.issue'")
                .fetch_one(pool)
                .await
                .unwrap();
        if n != last {
            (last, changed) = (n, Instant::now());
        } else if changed.elapsed() > Duration::from_millis(500) {
            break;
        }
        if stopped.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rendered = state.metrics.render();
    let dropped = rendered
        .lines()
        .find(|l| l.starts_with("portcullis_audit_dropped_total"))
        .unwrap_or("portcullis_audit_dropped_total 0");
    println!(
        "audit trail: {last} token.issue records stored, the queue drained {:.1}s after the load stopped; {dropped}\n",
        changed.duration_since(stopped).as_secs_f64()
    );
}

/// Runs wrk with one thread per core and prints its report, with the CPU time the server
/// listening on `port` spent per request (every process holding the socket; for Portcullis
/// this bench's process — the Postgres backends writing the audit trail are not in it).
fn wrk(script: &std::path::Path, port: u16, path: &str) -> u64 {
    let url = format!("https://127.0.0.1:{port}{path}");
    let server = support::ServerCpu::start(port);
    let seconds = env_or("BENCH_SECONDS", 10);
    let connections = env_or("BENCH_CONNECTIONS", 64);
    // one load-generator thread per core unless BENCH_WRK_THREADS says otherwise
    let threads = env_or(
        "BENCH_WRK_THREADS",
        std::thread::available_parallelism().map_or(2, |n| n.get() as u64),
    )
    .to_string();
    let out = support::wrk_command()
        .args([
            "-t",
            &threads,
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "-s",
            script.to_str().unwrap(),
            &url,
        ])
        .output()
        .expect("wrk is needed: apt-get install wrk");
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    let requests = support::wrk_requests(&report);
    println!(
        "server CPU per request: {:.1} µs ({:.2} s for {requests} requests)",
        server.micros_per(requests),
        server.seconds()
    );
    requests
}

/// The same load against the Node `oidc-provider` of the test harness, configured for
/// client_credentials with ES256 JWT access tokens over TLS (tests/oidc/bench-client-credentials.mjs).
fn oidc_provider_comparison() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = portcullis::dev::ensure_certificate(dir.path()).unwrap();
    let port = harness::free_port();
    let secret = "bench-secret-0123456789abcdefghijklmnopqrstuvwxyz";
    let oidc = harness::workspace_root().join("tests/oidc");
    let mut node = Command::new("node")
        .arg(oidc.join("bench-client-credentials.mjs"))
        .current_dir(&oidc)
        .env("BENCH_PORT", port.to_string())
        .env("BENCH_CERT", &cert)
        .env("BENCH_KEY", &key)
        .env("BENCH_CLIENT_SECRET", secret)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("node is needed");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the bench provider did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("bench:{secret}"))
    };
    let script = dir.path().join("token.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\n\
             wrk.body = \"grant_type=client_credentials&scope=jobs%3Arun\"\n\
             wrk.headers[\"Content-Type\"] = \"application/x-www-form-urlencoded\"\n\
             wrk.headers[\"Authorization\"] = \"Basic {basic}\"\n"
        ),
    )
    .unwrap();
    // one sample response, so the report shows the provider really issued a JWT
    let sample = Command::new("curl")
        .args([
            "-sk",
            "-u",
            &format!("bench:{secret}"),
            "-d",
            "grant_type=client_credentials&scope=jobs:run",
        ])
        .arg(format!("https://127.0.0.1:{port}/token"))
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .chars()
                .take(120)
                .collect::<String>()
        })
        .unwrap_or_default();
    println!("== Node oidc-provider (same load, same TLS pair), sample answer: {sample}…");
    wrk(&script, port, "/token");
    let _ = node.kill();
    let _ = node.wait();
}

async fn refresh_rotations() {
    let seconds = env_or("BENCH_SECONDS", 10);
    let tasks = env_or("BENCH_CONNECTIONS", 64);
    let redis = harness::Redis::start().unwrap();
    let (key, _) = portcullis::server_key::ServerKey::generate().unwrap();
    let store = Arc::new(
        RedisRefreshStore::connect(
            &SecretString::from(redis.url()),
            key,
            RefreshSettings::default(),
        )
        .await
        .unwrap(),
    );
    let now = time::OffsetDateTime::now_utc();
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut handles = Vec::new();
    for i in 0..tasks {
        let store = store.clone();
        let done = done.clone();
        handles.push(tokio::spawn(async move {
            let issued = store
                .issue(
                    NewFamily {
                        client_id: "console".to_owned(),
                        subject: format!("user-{i}"),
                        scope: "openid".to_owned(),
                        audience: vec![],
                        auth_time: now,
                        session: serde_json::json!({ "roles": ["operator"] }),
                    },
                    now,
                )
                .await
                .unwrap();
            let mut token = issued.token;
            let mut latencies = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                token = store.refresh(&token, "console", now).await.unwrap().token;
                latencies.push(t.elapsed());
                done.fetch_add(1, Ordering::Relaxed);
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    let total = done.load(Ordering::Relaxed);
    println!(
        "== refresh rotations against real Redis (store level, {tasks} concurrent chains, {seconds}s)"
    );
    println!(
        "rotations/s {:.0}   p50 {:?}   p99 {:?}   max {:?}",
        total as f64 / seconds as f64,
        pct(0.50),
        pct(0.99),
        all[all.len() - 1]
    );
}
