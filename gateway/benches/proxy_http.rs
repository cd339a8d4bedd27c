//! Proxied requests per second and latency with JWT validation through Portcullis, against
//! nginx proxying the same upstream with no authentication at all and HAProxy verifying
//! the same ES256 token with `jwt_verify`, in one run with the same worker count.
//!
//! ```sh
//! cargo bench -p portcullis --bench proxy_http     # needs wrk, nginx, haproxy (2.6+)
//! BENCH_SECONDS=20 BENCH_CONNECTIONS=64 BENCH_WORKERS=2 cargo bench -p portcullis --bench proxy_http
//! BENCH_AUTOGROUP=off cargo bench -p portcullis --bench proxy_http   # session task groups off for the run (root)
//! ```
//!
//! All three terminate TLS (the same certificate) with keep-alive and proxy over pooled
//! HTTP/1.1 keep-alive connections to one upstream: an nginx answering `200 ok` from
//! memory. Each front runs `BENCH_WORKERS` workers (nginx `worker_processes`, HAProxy
//! `nbthread`, Portcullis's runtime worker threads). The load comes from `wrk` on the
//! same machine (`BENCH_WRK_THREADS`, default one per core; `BENCH_CONNECTIONS`
//! keep-alive connections), every request carrying the same bearer token — an executor
//! or console polling the admin cluster. Each run is checked to have received no
//! error answer, so a front that refused the token cannot look fast. Besides throughput
//! and latency, each front's own CPU time per request is read from `/proc` (every
//! process holding its listening socket; for Portcullis, this bench's process): a figure
//! the run-to-run noise of a shared 2-core machine moves far less. A fourth front is the
//! floor of Portcullis's own stack (`support::floor::proxy`: tokio, rustls and hyper
//! forwarding, served the way Portcullis serves, with no token check or header work), so
//! that each run also says how much of the gap to nginx is the stack's and how much is
//! Portcullis's. Results go to stdout;
//! copy them into docs/benchmarks.md with the machine and date.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::env_or;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use portcullis::oauth::claims::{AccessClaims, Audiences};

fn main() {
    // `cargo test --benches` runs benches once as tests: do nothing then
    if support::skipped() {
        return;
    }
    let _autogroup = support::Autogroup::apply();
    let workers = env_or("BENCH_WORKERS", 2) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(workers));
}

const HASH_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const PATH: &str = "/api/registry";

async fn run(workers: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = portcullis::dev::ensure_certificate(dir.path()).unwrap();
    let (cert_pem, key_pem) = (
        std::fs::read_to_string(&cert).unwrap(),
        std::fs::read_to_string(&key).unwrap(),
    );

    let upstream_port = harness::free_port();
    let _upstream = harness::Nginx::start(&format!(
        "worker_processes 1;\nevents {{ worker_connections 4096; }}\n\
         http {{\n access_log off;\n keepalive_requests 1000000;\n\
          server {{\n  listen 127.0.0.1:{upstream_port};\n\
           location / {{ default_type text/plain; return 200 \"ok\\n\"; }}\n }}\n}}\n"
    ))
    .unwrap();
    let upstream = format!("http://127.0.0.1:{upstream_port}");

    // Portcullis, in this process
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [database]\nurl = \"sqlite://{d}/portcullis.db\"\n\
         [tokens]\nhash_key = \"{HASH_KEY}\"\n[log]\nlevel = \"warn\"\n\
         [keys]\nsource = \"file\"\nfile_dir = \"{d}\"\n\
         [proxy]\nupstreams = [\"{upstream}\"]\n\
         [[proxy.routes]]\nprefix = \"/api/\"\nauth = \"bearer\"\nscopes = [\"scheduler:executor\"]\n",
        cert.display(),
        key.display(),
        d = dir.path().display(),
    );
    let config =
        portcullis::config::from_table(toml::from_str(&text).unwrap(), support::portcullis_env())
            .unwrap();
    let app = portcullis::app::Application::build(config).await.unwrap();
    let state = app.state().clone();
    let portcullis_addr = app.https_addr();
    tokio::spawn(app.run_until_stopped());
    while !(state.db.is_migrated() && state.keys.readiness().is_ok()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = state.keys.now().unix_timestamp();
    let token = state
        .keys
        .sign(&AccessClaims {
            iss: state.config.issuer(),
            sub: "executor-orders".to_owned(),
            aud: Audiences::One(state.config.issuer()),
            exp: now + 3600,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: "scheduler:executor".to_owned(),
            client_id: "executor-orders".to_owned(),
            roles: vec![],
            sid: None,
        })
        .unwrap();
    let public_pem = public_key_pem(&state.keys.jwks());
    std::fs::write(dir.path().join("jwt.pub.pem"), &public_pem).unwrap();
    std::fs::write(
        dir.path().join("haproxy.pem"),
        format!("{cert_pem}\n{key_pem}"),
    )
    .unwrap();

    // nginx, no authentication
    let nginx_port = harness::free_port();
    let _nginx = harness::Nginx::start(&format!(
        "worker_processes {workers};\nevents {{ worker_connections 4096; }}\n\
         http {{\n access_log off;\n\
          upstream admin {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}\n\
          server {{\n  listen 127.0.0.1:{nginx_port} ssl;\n\
           ssl_certificate {cert};\n  ssl_certificate_key {key};\n\
           keepalive_requests 1000000;\n\
           location / {{ proxy_pass http://admin; proxy_http_version 1.1; \
                         proxy_set_header Connection \"\"; }}\n }}\n}}\n",
        cert = cert.display(),
        key = key.display(),
    ))
    .unwrap();

    // HAProxy verifying the token: algorithm, signature, expiry, issuer, audience
    let haproxy_port = harness::free_port();
    let issuer = state.config.issuer();
    let haproxy_cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &haproxy_cfg,
        format!(
            "global\n  nbthread {workers}\n  maxconn 4096\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
               http-reuse always\n\
             frontend fe\n  bind 127.0.0.1:{haproxy_port} ssl crt {d}/haproxy.pem\n\
               http-request set-var(txn.bearer) http_auth_bearer\n\
               http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')\n\
               http-request deny deny_status 401 unless {{ var(txn.alg) -m str ES256 }}\n\
               http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,\"{d}/jwt.pub.pem\") -m int 1 }}\n\
               http-request set-var(txn.now) date()\n\
               http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')\n\
               http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}\n\
               http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.iss') -m str {issuer} }}\n\
               http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.aud') -m str {issuer} }}\n\
               default_backend admin\n\
             backend admin\n  server a 127.0.0.1:{upstream_port}\n",
            d = dir.path().display(),
        ),
    )
    .unwrap();
    let haproxy = Haproxy::start(&haproxy_cfg, haproxy_port);

    // the stack's floor: tokio, rustls and hyper forwarding with none of Portcullis's
    // work, bare and behind the framework Portcullis runs
    let upstream_addr = format!("127.0.0.1:{upstream_port}").parse().unwrap();
    let floor = |stack| support::floor::proxy(&cert, &key, workers, upstream_addr, stack);
    let floor_addr = floor(support::floor::Stack::Bare);
    let framework_addr = floor(support::floor::Stack::Framework);

    // each front must pass the token through (and HAProxy must refuse a bad one)
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .no_proxy()
        .build()
        .unwrap();
    for port in [
        portcullis_addr.port(),
        nginx_port,
        haproxy_port,
        floor_addr.port(),
        framework_addr.port(),
    ] {
        let r = http
            .get(format!("https://127.0.0.1:{port}{PATH}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "port {port}: {}", r.text().await.unwrap());
    }
    for port in [portcullis_addr.port(), haproxy_port] {
        // change one character inside the signature (not the last, whose low bits a
        // lenient base64 decoder may ignore)
        let mut forged = token.clone().into_bytes();
        let at = token.rfind('.').unwrap() + 10;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        let r = http
            .get(format!("https://127.0.0.1:{port}{PATH}"))
            .bearer_auth(forged)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "port {port} accepted a forged signature");
    }

    println!(
        "# {workers} workers per front; wrk {} connections, {} s per run\n",
        env_or("BENCH_CONNECTIONS", 64),
        env_or("BENCH_SECONDS", 10)
    );
    let mut rows = Vec::new();
    for (name, port) in [
        ("nginx, no auth", nginx_port),
        ("HAProxy 2.6, jwt_verify ES256", haproxy_port),
        ("Portcullis, full validation", portcullis_addr.port()),
        ("floor: hyper + rustls, no auth", floor_addr.port()),
        ("floor + axum and tower-http layers", framework_addr.port()),
    ] {
        // the front's own CPU time: what it costs per request, whatever the machine's
        // noise does to the throughput of one run
        let front = support::ServerCpu::start(port);
        let mut report = wrk(&token, &format!("https://127.0.0.1:{port}{PATH}"));
        report.cpu_us_per_request = front.micros_per(report.requests);
        println!("## {name}\n{}", report.raw);
        assert_eq!(
            report.errors, 0,
            "{name}: error answers or socket errors during the run"
        );
        rows.push((name, report));
    }
    let nginx_rps = rows[0].1.requests_per_second;
    let haproxy_rps = rows[1].1.requests_per_second;
    println!("| front | requests/s | p50 | p99 | front CPU per request | × nginx | × HAProxy |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, r) in &rows {
        println!(
            "| {name} | {:.0} | {} | {} | {:.1} µs | {:.2} | {:.2} |",
            r.requests_per_second,
            r.p50,
            r.p99,
            r.cpu_us_per_request,
            r.requests_per_second / nginx_rps,
            r.requests_per_second / haproxy_rps
        );
    }
    let cache = state.keys.verified_tokens().len();
    println!("\nPortcullis verified-token memory after the run: {cache} entries");
    drop(haproxy);
}

/// The SubjectPublicKeyInfo PEM of the ring's P-256 key, from its JWK (what HAProxy reads).
fn public_key_pem(jwks: &serde_json::Value) -> String {
    let jwk = &jwks["keys"][0];
    assert_eq!(jwk["crv"], "P-256", "the bench expects an ES256 ring");
    let coordinate = |name: &str| URL_SAFE_NO_PAD.decode(jwk[name].as_str().unwrap()).unwrap();
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING 04 || x || y }
    let mut der = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04,
    ];
    der.extend(coordinate("x"));
    der.extend(coordinate("y"));
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        lines.join("\n")
    )
}

/// HAProxy in the foreground, killed on drop.
struct Haproxy(Child);

impl Haproxy {
    fn start(config: &Path, port: u16) -> Self {
        let check = Command::new("haproxy")
            .args(["-c", "-f", config.to_str().unwrap()])
            .output()
            .expect("haproxy is needed: apt-get install haproxy");
        assert!(
            check.status.success(),
            "haproxy -c: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new("haproxy")
            .args(["-db", "-f", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "haproxy did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self(child)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one wrk run measured.
struct Report {
    raw: String,
    /// Requests completed in the run.
    requests: u64,
    requests_per_second: f64,
    /// The front's CPU time (user + system, all its processes and threads) per request.
    cpu_us_per_request: f64,
    p50: String,
    p99: String,
    /// Non-2xx answers plus socket errors.
    errors: u64,
}

/// Runs wrk against `url` with the bearer token and parses its report.
fn wrk(token: &str, url: &str) -> Report {
    let seconds = env_or("BENCH_SECONDS", 10);
    let connections = env_or("BENCH_CONNECTIONS", 64);
    let threads = env_or(
        "BENCH_WRK_THREADS",
        std::thread::available_parallelism().map_or(2, |n| n.get() as u64),
    );
    let out = support::wrk_command()
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "-H",
            &format!("Authorization: Bearer {token}"),
            url,
        ])
        .output()
        .expect("wrk is needed: apt-get install wrk");
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |prefix: &str| -> Option<String> {
        raw.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|rest| rest.trim().to_owned())
    };
    let requests_per_second = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let p50 = field("50%").unwrap_or_default();
    let p99 = field("99%").unwrap_or_default();
    let non_2xx: u64 = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let socket: u64 = field("Socket errors:")
        .map(|v| {
            v.split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let requests = support::wrk_requests(&raw);
    Report {
        raw,
        requests,
        cpu_us_per_request: 0.0,
        requests_per_second,
        p50,
        p99,
        errors: non_2xx + socket,
    }
}
