//! `deploy/nginx/portcullis.conf.template`, rendered with test ports and certificates,
//! run by a real nginx in front of three Portcullis instances, each proxying to two
//! admin nodes of the test: requests go through, nginx's X-Forwarded-For is believed,
//! and neither stopping an instance nor killing an instance's process (SIGKILL) under
//! continuous GETs loses a request.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use harness::{Nginx, OidcOptions, render_template};
use portcullis::config::{Config, TlsConfig};
use portcullis::sso::settings::SsoSettings;
use reqwest::StatusCode;

use super::proxy::{AdminNode, proxy_to};
use super::sso::{provider_settings, role_rules};
use super::support::*;

pub const TEMPLATE: &str = include_str!("../../../deploy/nginx/portcullis.conf.template");

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// One CA for everything: nginx's edge certificate, and the instances' certificate that
/// nginx verifies when it re-encrypts.
pub struct Certs {
    pub pki: Pki,
    pub dir: tempfile::TempDir,
    pub instance_cert: PathBuf,
    pub instance_key: PathBuf,
}

impl Certs {
    pub fn new() -> Self {
        let pki = Pki::new();
        let dir = tempfile::tempdir().unwrap();
        let leaf = pki.leaf();
        let instance_cert = write(dir.path(), "instance.pem", &leaf.cert_pem);
        let instance_key = write(dir.path(), "instance.key", &leaf.key_pem);
        Self {
            pki,
            dir,
            instance_cert,
            instance_key,
        }
    }

    pub fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }
}

/// nginx from the template in front of `instances`, and a client that trusts it.
pub struct Edge {
    pub nginx: Nginx,
    pub client: reqwest::Client,
}

impl Edge {
    pub async fn start(certs: &Certs, instances: [SocketAddr; 3]) -> Self {
        Self::start_with(certs, instances, None).await
    }

    /// Like [`Edge::start`], with the template's ordinary read timeout (35 s) set to
    /// `read_timeout`, one a test can outwait.
    pub async fn start_with(
        certs: &Certs,
        instances: [SocketAddr; 3],
        read_timeout: Option<&str>,
    ) -> Self {
        let line = "proxy_read_timeout 35s;";
        assert_eq!(
            TEMPLATE.matches(line).count(),
            1,
            "the template's read timeout"
        );
        let template = match read_timeout {
            Some(t) => TEMPLATE.replace(line, &format!("proxy_read_timeout {t};")),
            None => TEMPLATE.to_owned(),
        };
        Self::start_from(certs, instances, &template).await
    }

    /// Like [`Edge::start`], from `template` (the shipped one with a setting changed).
    pub async fn start_from(certs: &Certs, instances: [SocketAddr; 3], template: &str) -> Self {
        let edge_leaf = certs.pki.leaf();
        let path = |p: PathBuf| p.display().to_string();
        let listen = harness::free_port();
        let config = render_template(
            template,
            &[
                ("LISTEN", format!("127.0.0.1:{listen}")),
                ("SERVER_NAME", "localhost".to_owned()),
                (
                    "TLS_CERT",
                    path(write(certs.dir.path(), "edge.pem", &edge_leaf.cert_pem)),
                ),
                (
                    "TLS_KEY",
                    path(write(certs.dir.path(), "edge.key", &edge_leaf.key_pem)),
                ),
                (
                    "UPSTREAM_CA",
                    path(write(certs.dir.path(), "ca.pem", &certs.pki.ca_pem())),
                ),
                ("UPSTREAM_TLS_NAME", "localhost".to_owned()),
                ("INSTANCE_1", instances[0].to_string()),
                ("INSTANCE_2", instances[1].to_string()),
                ("INSTANCE_3", instances[2].to_string()),
                ("ACCESS_LOG", path(certs.access_log())),
                // nginx's stderr, which the harness keeps (`Edge::log`)
                ("ERROR_LOG", "stderr".to_owned()),
            ],
        )
        .unwrap();
        let nginx = tokio::task::spawn_blocking(move || Nginx::start(&config))
            .await
            .unwrap()
            .unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(certs.pki.ca_pem().as_bytes()).unwrap(),
            )
            .tls_built_in_root_certs(false)
            .resolve("localhost", ([127, 0, 0, 1], nginx.port()).into())
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Self { nginx, client }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.nginx.port())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.nginx.log_path()).unwrap_or_default()
    }

    /// `GET path` through nginx; the answer, whatever its status.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }
}

/// GETs through nginx, one after another, until stopped; counts them and keeps every
/// failure.
struct Load {
    done: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Load {
    fn start(edge: &Edge) -> Self {
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let urls = [
            edge.url("/public/load"),
            edge.url("/.well-known/openid-configuration"),
        ];
        let task = tokio::spawn({
            let (client, done, stop) = (edge.client.clone(), done.clone(), stop.clone());
            async move {
                let mut failures = Vec::new();
                let mut i = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let target = &urls[i % 2];
                    match client.get(target).send().await {
                        Ok(r) if r.status() == StatusCode::OK => {}
                        Ok(r) => failures.push(format!("{target}: {}", r.status())),
                        Err(e) => failures.push(format!("{target}: {e}")),
                    }
                    i += 1;
                    done.fetch_add(1, Ordering::SeqCst);
                }
                failures
            }
        });
        Self { done, stop, task }
    }

    async fn reach(&self, n: usize, what: &str) {
        let done = self.done.clone();
        eventually(Duration::from_secs(60), what, || {
            let done = done.clone();
            async move { done.load(Ordering::SeqCst) >= n }
        })
        .await;
    }

    fn count(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

pub async fn refuses_connections(addr: SocketAddr) {
    eventually(
        Duration::from_secs(20),
        "the instance refuses connections",
        || async move { tokio::net::TcpStream::connect(addr).await.is_err() },
    )
    .await;
}

/// Whether nginx's log shows requests answered by `addr`, and requests that met `addr`
/// and moved on to another instance (`$upstream_addr` lists both).
fn assert_failed_over(log_path: &Path, addr: SocketAddr) {
    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(
        log.contains(&format!("upstream={addr} ")),
        "{addr} served nothing before it went away:\n{log}"
    );
    assert!(
        log.contains(&format!("upstream={addr}, ")),
        "no request met {addr} and moved on:\n{log}"
    );
}

#[tokio::test]
async fn nginx_fronts_three_instances_and_stopping_one_loses_no_get() {
    let certs = Certs::new();
    let (a, b) = (AdminNode::start("a").await, AdminNode::start("b").await);
    let mut instances = Vec::new();
    for _ in 0..3 {
        let (cert, key) = (certs.instance_cert.clone(), certs.instance_key.clone());
        let app = spawn_app(|c| {
            c.tls = Some(TlsConfig {
                cert,
                key,
                reload_interval: Duration::from_secs(10),
            });
            c.protection.trusted_proxies = vec!["127.0.0.1/32".to_owned()];
            proxy_to(c, &[&a, &b]);
        })
        .await;
        instances.push(app);
    }
    let edge = Edge::start(
        &certs,
        [instances[0].https, instances[1].https, instances[2].https],
    )
    .await;

    // Portcullis's own endpoints and proxied ones both answer through nginx
    let discovery = edge.get("/.well-known/openid-configuration").await;
    assert_eq!(discovery.status(), StatusCode::OK);
    let proxied = edge
        .client
        .get(edge.url("/public/hello"))
        .header("X-Forwarded-For", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), StatusCode::OK);
    let echoed_id = proxied.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let seen = a
        .seen()
        .into_iter()
        .chain(b.seen())
        .find(|s| s.path == "/public/hello")
        .unwrap();
    // nginx appended the peer it saw; the instance trusts nginx (127.0.0.1) and takes
    // the first untrusted hop from the right as the client
    assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.9"));
    // nginx's $request_id: 32 hex digits, the same at the node and in the response
    let id = seen.header("x-request-id").unwrap();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(id, echoed_id);

    // continuous GETs while the third instance stops
    let load = Load::start(&edge);
    load.reach(20, "20 requests before the stop").await;
    let stopped = instances.pop().unwrap();
    let stopped_addr = stopped.https;
    stopped.stop.cancel();
    refuses_connections(stopped_addr).await;
    let at_stop = load.count();
    load.reach(at_stop + 60, "60 requests after the stop").await;
    let failures = load.finish().await;
    assert!(
        failures.is_empty(),
        "requests failed while an instance stopped: {failures:?}\nnginx log:\n{}",
        edge.log()
    );
    assert_failed_over(&certs.access_log(), stopped_addr);
    drop(stopped);
}

/// A `portcullis serve` process of its own (own SQLite database and key ring) proxying
/// public paths to `nodes`; returns it (with its HTTPS address and its directory) once
/// `/readyz` answers 200.
async fn spawn_process(
    certs: &Certs,
    nodes: &[&AdminNode],
) -> (Child, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (https, admin) = (harness::free_port(), harness::free_port());
    let upstreams: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.url())).collect();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{https}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         shutdown_grace = \"5s\"\n\
         [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [database]\nurl = \"sqlite://{d}/portcullis.db\"\n\
         [tokens]\nhash_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n\
         [keys]\nsource = \"file\"\nfile_dir = \"{d}\"\n\
         [protection]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [proxy]\nupstreams = [{upstreams}]\n\
         [[proxy.routes]]\nprefix = \"/public/\"\nauth = \"public\"\n",
        cert = certs.instance_cert.display(),
        key = certs.instance_key.display(),
        d = dir.path().display(),
        upstreams = upstreams.join(", "),
    );
    let file = write(dir.path(), "portcullis.toml", &config);
    let child = Child::spawn(&["serve", "--config", &file.display().to_string()]);
    let admin_addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    eventually(Duration::from_secs(30), "the process is ready", || {
        let http = http.clone();
        async move {
            http.get(format!("http://{admin_addr}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        }
    })
    .await;
    (child, ([127, 0, 0, 1], https).into(), dir)
}

#[tokio::test]
async fn killing_an_instance_process_under_load_loses_no_get() {
    let certs = Certs::new();
    let (a, b) = (AdminNode::start("a").await, AdminNode::start("b").await);
    let mut processes = Vec::new();
    for _ in 0..3 {
        processes.push(spawn_process(&certs, &[&a, &b]).await);
    }
    let edge = Edge::start(&certs, [processes[0].1, processes[1].1, processes[2].1]).await;

    let load = Load::start(&edge);
    load.reach(30, "30 requests before the kill").await;
    let (mut victim, victim_addr, _victim_dir) = processes.pop().unwrap();
    victim.signal("KILL");
    assert!(
        victim.wait(Duration::from_secs(10)).await.is_some(),
        "SIGKILL ends the process"
    );
    refuses_connections(victim_addr).await;
    let at_kill = load.count();
    load.reach(at_kill + 60, "60 requests after the kill").await;
    let failures = load.finish().await;
    assert!(
        failures.is_empty(),
        "requests failed around the kill: {failures:?}\nnginx log:\n{}",
        edge.log()
    );
    assert_failed_over(&certs.access_log(), victim_addr);
}

/// Refreshes through nginx, paced, each with the refresh token the last success
/// returned; plus a discovery GET each round, which needs no Redis.
struct RefreshLoad {
    ok: Arc<AtomicUsize>,
    unavailable: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl RefreshLoad {
    fn start(edge: &Edge, client: (String, String), first: String) -> Self {
        let ok = Arc::new(AtomicUsize::new(0));
        let unavailable = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (token_url, discovery_url) = (
            edge.url("/oauth2/token"),
            edge.url("/.well-known/openid-configuration"),
        );
        let task = tokio::spawn({
            let http = edge.client.clone();
            let (ok, unavailable, stop) = (ok.clone(), unavailable.clone(), stop.clone());
            async move {
                let mut failures = Vec::new();
                let mut token = first;
                // paced well under the edge's rate limit on /oauth2/token (300 r/s per address)
                let mut pace = tokio::time::interval(Duration::from_millis(30));
                while !stop.load(Ordering::SeqCst) {
                    pace.tick().await;
                    let r = http
                        .post(&token_url)
                        .basic_auth(&client.0, Some(&client.1))
                        .form(&[("grant_type", "refresh_token"), ("refresh_token", &token)])
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == StatusCode::OK => {
                            let body: serde_json::Value = r.json().await.unwrap_or_default();
                            match body["refresh_token"].as_str() {
                                Some(next) => {
                                    token = next.to_owned();
                                    ok.fetch_add(1, Ordering::SeqCst);
                                }
                                None => {
                                    failures.push(format!("refresh: 200 without a token: {body}"))
                                }
                            }
                        }
                        Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {
                            unavailable.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => {
                            let status = r.status();
                            let body = r.text().await.unwrap_or_default();
                            failures.push(format!("refresh: {status} {body}"));
                        }
                        Err(e) => failures.push(format!("refresh: {e}")),
                    }
                    match http.get(&discovery_url).send().await {
                        Ok(r) if r.status() == StatusCode::OK => {}
                        Ok(r) => failures.push(format!("discovery: {}", r.status())),
                        Err(e) => failures.push(format!("discovery: {e}")),
                    }
                }
                failures
            }
        });
        Self {
            ok,
            unavailable,
            stop,
            task,
        }
    }

    async fn until(&self, what: &str, probe: impl Fn(usize, usize) -> bool) {
        let (ok, unavailable) = (self.ok.clone(), self.unavailable.clone());
        let probe = &probe;
        eventually(Duration::from_secs(60), what, || {
            let (ok, unavailable) = (ok.clone(), unavailable.clone());
            async move {
                probe(
                    ok.load(Ordering::SeqCst),
                    unavailable.load(Ordering::SeqCst),
                )
            }
        })
        .await;
    }

    async fn finish(self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let failures = self.task.await.unwrap();
        (
            self.ok.load(Ordering::SeqCst),
            self.unavailable.load(Ordering::SeqCst),
            failures,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_under_load_delays_refreshes_and_loses_nothing() {
    use portcullis::clients::GrantType;
    use portcullis::config::RedisConfig;
    use portcullis::refresh::NewFamily;
    use secrecy::{ExposeSecret, SecretString};

    let certs = Certs::new();
    let redis = harness::Redis::start_persistent().unwrap();
    let db = harness::Postgres::shared()
        .fresh_database("ha_redis_restart")
        .unwrap();
    let prefix = format!("ha-{}:", uuid::Uuid::new_v4());
    let mut instances = Vec::new();
    for _ in 0..3 {
        let (cert, key) = (certs.instance_cert.clone(), certs.instance_key.clone());
        let (db, redis_url, prefix) = (db.clone(), redis.url(), prefix.clone());
        let app = spawn_app(move |c| {
            c.tls = Some(TlsConfig {
                cert,
                key,
                reload_interval: Duration::from_secs(10),
            });
            c.protection.trusted_proxies = vec!["127.0.0.1/32".to_owned()];
            c.database.url = SecretString::from(db);
            c.redis = Some(RedisConfig {
                url: SecretString::from(redis_url),
                cluster: false,
                command_timeout: Duration::from_millis(500),
            });
            c.refresh.key_prefix = prefix;
        })
        .await;
        instances.push(app);
    }
    let state = &instances[0].state;
    let now = state.keys.now();
    let creds = register_client(state, "ha-drill", &[GrantType::RefreshToken], "jobs:read").await;
    let issued = state
        .refresh
        .issue(
            NewFamily {
                client_id: creds.0.clone(),
                subject: "alice".to_owned(),
                scope: "jobs:read".to_owned(),
                audience: vec![],
                auth_time: now,
                session: serde_json::json!({}),
            },
            now,
        )
        .await
        .unwrap();
    let edge = Edge::start(
        &certs,
        [instances[0].https, instances[1].https, instances[2].https],
    )
    .await;

    let load = RefreshLoad::start(&edge, creds, issued.token.expose_secret().to_owned());
    load.until("20 refreshes before the restart", |ok, _| ok >= 20)
        .await;
    redis.stop();
    load.until("refreshes answered 503 while Redis is away", |_, u| u >= 12)
        .await;
    let before = load.ok.load(Ordering::SeqCst);
    redis.restart().unwrap();
    load.until("20 refreshes after the restart", |ok, _| ok >= before + 20)
        .await;
    let (ok, unavailable, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{ok} refreshed, {unavailable} answered 503, and these failed: {failures:?}\n\
         nginx log:\n{}",
        edge.log()
    );
}

#[tokio::test]
async fn an_admin_cluster_outage_does_not_take_the_instances_out_of_nginx() {
    let certs = Certs::new();
    let mut node = AdminNode::start("a").await;
    let mut instances = Vec::new();
    for _ in 0..3 {
        let (cert, key) = (certs.instance_cert.clone(), certs.instance_key.clone());
        let app = spawn_app(|c| {
            c.tls = Some(TlsConfig {
                cert,
                key,
                reload_interval: Duration::from_secs(10),
            });
            proxy_to(c, &[&node]);
        })
        .await;
        instances.push(app);
    }
    let edge = Edge::start(
        &certs,
        [instances[0].https, instances[1].https, instances[2].https],
    )
    .await;
    node.kill().await;
    // every instance answers proxied requests with its own JSON 502/503 ...
    for i in 0..9 {
        let r = edge.get(&format!("/public/{i}")).await;
        let status = r.status();
        assert!(
            status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE,
            "{status}"
        );
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            ["upstream_unavailable", "temporarily_unavailable"]
                .contains(&body["error"].as_str().unwrap_or_default()),
            "{body}"
        );
    }
    // ... and nginx keeps them all: what needs no admin node still answers
    for _ in 0..6 {
        let r = edge.get("/.well-known/openid-configuration").await;
        assert_eq!(r.status(), StatusCode::OK, "nginx log:\n{}", edge.log());
    }
}

/// The edge rate limits key clients as Portcullis keys its own buckets: an IPv4 address,
/// an IPv6 /64. The template's own `map` block, verbatim, in a real nginx that takes the
/// client address from a test header (the realip module, so `$remote_addr` is nginx's
/// canonical text of it) and answers the key it computes.
#[tokio::test]
async fn the_edge_limits_key_an_ipv6_client_by_its_64_and_an_ipv4_one_by_its_address() {
    let open = "    map $remote_addr $portcullis_limit_key {";
    let start = TEMPLATE
        .find(open)
        .expect("the template keys its limits by a map");
    let end = start + TEMPLATE[start..].find("\n    }\n").unwrap() + "\n    }\n".len();
    let map = &TEMPLATE[start..end];
    assert_eq!(
        TEMPLATE
            .matches("limit_req_zone $portcullis_limit_key ")
            .count(),
        2,
        "both edge zones use the key"
    );
    let port = harness::free_port();
    let config = format!(
        "worker_processes 1;\nevents {{ worker_connections 64; }}\nhttp {{\n{map}\
         server {{\n listen 127.0.0.1:{port};\n set_real_ip_from 127.0.0.1;\n\
         real_ip_header X-Client;\n location / {{ return 200 \"$portcullis_limit_key\"; }}\n}}\n}}\n"
    );
    let _nginx = tokio::task::spawn_blocking(move || Nginx::start(&config))
        .await
        .unwrap()
        .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let key = |client_addr: &'static str| {
        let client = client.clone();
        async move {
            let response = client
                .get(format!("http://127.0.0.1:{port}/"))
                .header("x-client", client_addr)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{client_addr}");
            let key = response.bytes().await.unwrap().to_vec();
            assert!(
                !key.is_empty(),
                "{client_addr}: an empty key is not limited"
            );
            key
        }
    };
    let same = |group: &'static [&'static str]| {
        let key = &key;
        async move {
            let first = key(group[0]).await;
            for other in &group[1..] {
                assert_eq!(
                    key(other).await,
                    first,
                    "{other} and {} share a /64",
                    group[0]
                );
            }
            first
        }
    };
    // one /64, written out or compressed in every way nginx prints it
    let a = same(&[
        "2001:db8:7:1::10",
        "2001:db8:7:1:dead:beef:0:1",
        "2001:DB8:7:1:FFFF:FFFF:FFFF:FFFF",
        "2001:db8:7:1::",
    ])
    .await;
    // a /64 with zeros in its first four groups
    let b = same(&["2001:db8::1", "2001:db8:0:0:1:2:3:4", "2001:db8::5:0:0:6"]).await;
    let c = same(&["2001:db8:0:5::1", "2001:db8:0:5:1:2:3:4"]).await;
    // neighbours are other clients
    let d = key("2001:db8:7:2::10").await;
    let e = key("2001:db9:7:1::10").await;
    let keys = [&a, &b, &c, &d, &e];
    for (i, k) in keys.iter().enumerate() {
        assert!(
            keys[i + 1..].iter().all(|other| other != k),
            "distinct /64s share a key: {keys:?}"
        );
    }
    // IPv4: one key per address, an IPv4-mapped address as the IPv4 one
    let v4 = key("192.0.2.1").await;
    assert_ne!(key("192.0.2.2").await, v4);
    assert_eq!(v4, b"v4:192.0.2.1");
    assert_eq!(key("::ffff:192.0.2.1").await, v4);
    assert!(!key("::1").await.is_empty());
}

// === nginx's own handling of what passes through it ===

/// An instance as nginx reaches it: HTTPS with the certificate nginx checks, believing
/// nginx's X-Forwarded-For.
fn behind_nginx(c: &mut Config, certs: &Certs) {
    c.tls = Some(TlsConfig {
        cert: certs.instance_cert.clone(),
        key: certs.instance_key.clone(),
        reload_interval: Duration::from_secs(10),
    });
    c.protection.trusted_proxies = vec!["127.0.0.1/32".to_owned()];
}

/// What a response said: status, headers and body text.
async fn answer(r: reqwest::Response) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let (status, headers) = (r.status(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

/// Sends `requests` at once and asserts that Portcullis answered every one, each with
/// `status` and the OAuth `error` code (so none was refused at the edge); `what` names
/// them in the failure, which quotes the first other answer's status and body.
async fn assert_portcullis_answered_all(
    requests: impl IntoIterator<Item = reqwest::RequestBuilder>,
    status: StatusCode,
    error: &str,
    what: &str,
) {
    let responses = futures::future::join_all(requests.into_iter().map(|r| r.send())).await;
    let total = responses.len();
    let mut others = Vec::new();
    for r in responses {
        let (got, _, body) = answer(r.unwrap()).await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if got != status || json["error"] != error {
            others.push(format!("{got} {body}"));
        }
    }
    assert!(
        others.is_empty(),
        "{} of {total} {what} were not answered by Portcullis; the first: {}",
        others.len(),
        others[0]
    );
}

#[tokio::test]
async fn provider_logouts_count_against_the_token_limit_at_the_edge_not_the_login_one() {
    let certs = Certs::new();
    let app = spawn_app(|c| {
        behind_nginx(c, &certs);
        // a provider, so the endpoint verifies what is posted; a token of `x` is refused
        // as malformed before the provider would be asked anything, so none runs here
        c.sso = SsoSettings {
            providers: vec![provider_settings(
                "https://idp.example",
                &OidcOptions::default(),
            )],
            roles: role_rules(),
            ..SsoSettings::default()
        };
    })
    .await;
    // one instance in every `server` line: this is about nginx's limits, not failover
    let edge = Edge::start(&certs, [app.https; 3]).await;

    // an identity provider posting the logouts of many users at once, from one address
    let posts = (0..50).map(|_| {
        edge.client
            .post(edge.url("/auth/backchannel-logout"))
            .form(&[("logout_token", "x")])
    });
    assert_portcullis_answered_all(posts, StatusCode::BAD_REQUEST, "invalid_request", "logouts")
        .await;

    // front-channel logouts neither: the provider's logout page loads one per relying
    // party in the browser, and users behind one NAT leave at the same hour. This
    // provider has front-channel logout off, which Portcullis answers with a 403
    let gets = (0..50).map(|_| {
        edge.client
            .get(edge.url("/auth/frontchannel-logout?iss=https%3A%2F%2Fidp.example&sid=session-1"))
    });
    assert_portcullis_answered_all(
        gets,
        StatusCode::FORBIDDEN,
        "frontchannel_logout_disabled",
        "front-channel logouts",
    )
    .await;

    // and they do count against the token zone: with its rate and burst made small (and
    // nothing else changed), a burst of logouts is refused at the edge, in Portcullis's
    // JSON, and empties the bucket the token endpoint draws from
    let rate = "zone=portcullis_token:10m rate=300r/s;";
    let burst = "zone=portcullis_token burst=900 nodelay;";
    assert_eq!(TEMPLATE.matches(rate).count(), 1, "the token zone's rate");
    assert_eq!(
        TEMPLATE.matches(burst).count(),
        3,
        "the token zone's three locations"
    );
    let small = TEMPLATE
        .replace(rate, "zone=portcullis_token:10m rate=1r/m;")
        .replace(burst, "zone=portcullis_token burst=4 nodelay;");
    let small_edge = Edge::start_from(&certs, [app.https; 3], &small).await;
    let posts = (0..20).map(|_| {
        small_edge
            .client
            .post(small_edge.url("/auth/backchannel-logout"))
            .form(&[("logout_token", "x")])
            .send()
    });
    let (mut answered, mut limited) = (0, 0);
    for r in futures::future::join_all(posts).await {
        let (status, headers, body) = answer(r.unwrap()).await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        match status {
            StatusCode::BAD_REQUEST => answered += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                assert_eq!(json["error"], "rate_limited", "{body}");
                assert_eq!(
                    headers.get("content-type").and_then(|v| v.to_str().ok()),
                    Some("application/json"),
                    "{body}"
                );
            }
            other => panic!("{other} {body}"),
        }
    }
    // one request and a burst of 4 pass; a rate of 1 a minute adds none meanwhile
    assert_eq!((answered, limited), (5, 15));
    let token = small_edge
        .client
        .post(small_edge.url("/oauth2/token"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(token).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the token endpoint's bucket: {body}"
    );
}

#[tokio::test]
async fn the_edge_refuses_a_login_flood_with_portcullis_json_and_retry_after() {
    let certs = Certs::new();
    let app = spawn_app(|c| {
        behind_nginx(c, &certs);
        // room for the whole flood at the instance: every 429 here is nginx's
        c.protection.auth_rate.burst = 1000;
    })
    .await;
    let edge = Edge::start(&certs, [app.https; 3]).await;

    let flood = (0..60).map(|_| edge.client.get(edge.url("/auth/login")).send());
    let mut limited = 0;
    for r in futures::future::join_all(flood).await {
        let (status, headers, body) = answer(r.unwrap()).await;
        if status != StatusCode::TOO_MANY_REQUESTS {
            continue;
        }
        limited += 1;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(header("retry-after"), Some("1"), "{headers:?} {body}");
        assert_eq!(header("content-type"), Some("application/json"), "{body}");
        assert_eq!(header("cache-control"), Some("no-store"), "{body}");
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("a 429 that is not JSON ({e}): {body}"));
        assert_eq!(json["error"], "rate_limited", "{body}");
        assert!(json["error_description"].is_string(), "{body}");
    }
    assert!(limited > 0, "the flood never passed the edge limit");
}

/// Writes `text` into an upgraded connection and reads as many bytes back.
async fn echo<S>(io: &mut S, text: &[u8]) -> Result<Vec<u8>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    io.write_all(text)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; text.len()];
    tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut back))
        .await
        .map_err(|_| "no echo within 10 s".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    Ok(back)
}

#[tokio::test]
async fn websockets_and_event_streams_outlast_the_edge_read_timeout_unbuffered() {
    use hyper_util::rt::TokioIo;

    let certs = Certs::new();
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| {
        behind_nginx(c, &certs);
        proxy_to(c, &[&node]);
    })
    .await;
    // ordinary responses get 2 s at this nginx; the streams below stay quiet for longer
    let edge = Edge::start_with(&certs, [app.https; 3], Some("2s")).await;
    const QUIET: Duration = Duration::from_secs(5);

    let websocket = async {
        let tls = tls_connect(
            ([127, 0, 0, 1], edge.nginx.port()).into(),
            certs.pki.client_config(),
        )
        .await;
        let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(connection.with_upgrades());
        let resp = send
            .send_request(super::proxy::websocket_handshake("/public/ws"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
        assert_eq!(
            echo(&mut io, b"before the quiet").await.as_deref(),
            Ok(&b"before the quiet"[..])
        );
        // the silence is what is tested: neither side sends anything for a while
        tokio::time::sleep(QUIET).await;
        echo(&mut io, b"after the quiet")
            .await
            .map(|back| String::from_utf8_lossy(&back).into_owned())
    };

    let events = async {
        let url = edge.url(&format!("/public/events?quiet_ms={}", QUIET.as_millis()));
        let mut r = edge
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|e| format!("request: {e}"))?;
        assert_eq!(r.status(), StatusCode::OK);
        // the first event arrives while the node is still quiet: nothing holds it back
        let mut got = Vec::new();
        let first = tokio::time::timeout(QUIET / 2, async {
            while !got.ends_with(b"data: first\n\n") {
                match r.chunk().await {
                    Ok(Some(chunk)) => got.extend_from_slice(&chunk),
                    other => return Err(format!("the stream ended: {other:?}")),
                }
            }
            Ok(())
        })
        .await;
        match first {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("the first event was held back".to_owned()),
        }
        // and the stream outlives the quiet to bring the last one
        loop {
            match r.chunk().await {
                Ok(Some(chunk)) => got.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => {
                    return Err(format!(
                        "cut after {:?}: {e}",
                        String::from_utf8_lossy(&got)
                    ));
                }
            }
        }
        Ok(String::from_utf8_lossy(&got).into_owned())
    };

    let (websocket, events) = tokio::join!(websocket, events);
    assert_eq!(
        (websocket.as_deref(), events.as_deref()),
        (Ok("after the quiet"), Ok("data: first\n\ndata: last\n\n")),
        "(the WebSocket, the event stream); nginx log:\n{}",
        edge.log()
    );
}

/// Neither of nginx's logs holds an authorization code or state: the access log keeps
/// `/auth/` and `/oauth2/` requests without their query, and the error log, whose lines
/// quote the whole request line (the `limiting requests` line of every edge 429, an
/// upstream failure), takes nothing below `crit` from those locations. The refusals are
/// still in the access log, by status.
#[tokio::test]
async fn nginx_logs_no_authorization_code_or_state() {
    let certs = Certs::new();
    let app = spawn_app(|c| behind_nginx(c, &certs)).await;
    let edge = Edge::start(&certs, [app.https; 3]).await;

    // whatever Portcullis answers (no login is under way), nginx logs the request; also
    // spelt as other paths nginx routes to the same location
    for path in [
        "/auth/callback?code=SECRETCODE123&state=SECRETSTATE456",
        "//auth/callback?code=SECRETCODE123&state=SECRETSTATE456",
        "/%61uth/callback?code=SECRETCODE123&state=SECRETSTATE456",
    ] {
        edge.get(path).await;
    }
    // another path keeps its whole request line
    edge.get("/.well-known/openid-configuration?probe=1").await;
    let access_log = certs.access_log();
    eventually(Duration::from_secs(10), "nginx logs both requests", || {
        let log = std::fs::read_to_string(&access_log).unwrap_or_default();
        async move { log.contains("/auth/callback") && log.contains("openid-configuration") }
    })
    .await;
    let log = std::fs::read_to_string(&access_log).unwrap();
    assert!(
        !log.contains("SECRETCODE123") && !log.contains("SECRETSTATE456"),
        "the code or state reached nginx's access log:\n{log}"
    );
    assert_eq!(
        log.matches("\"GET /auth/callback? ").count(),
        3,
        "each spelling is logged as the path nginx routes:\n{log}"
    );
    assert!(
        log.contains("\"GET /.well-known/openid-configuration?probe=1 "),
        "{log}"
    );

    // callbacks past the login zone's burst (20, then 5/s): nginx refuses the rest
    let mut refused = 0;
    for _ in 0..40 {
        let r = edge
            .get("/auth/callback?code=SECRETCODE123&state=SECRETSTATE456&burst=1")
            .await;
        refused += usize::from(r.status() == StatusCode::TOO_MANY_REQUESTS);
    }
    assert!(refused > 0, "the edge refused none of 40 callbacks at once");
    eventually(Duration::from_secs(10), "nginx logs the refusals", || {
        let log = std::fs::read_to_string(&access_log).unwrap_or_default();
        async move { log.matches("\"GET /auth/callback? HTTP/1.1\" 429 ").count() >= refused }
    })
    .await;
    let errors = edge.log();
    assert!(
        !errors.contains("SECRETCODE123") && !errors.contains("SECRETSTATE456"),
        "the code or state reached nginx's error log:\n{errors}"
    );
}
