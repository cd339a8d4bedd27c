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

use harness::{Nginx, render_template};
use portcullis::config::TlsConfig;
use reqwest::StatusCode;

use super::proxy::{AdminNode, proxy_to};
use super::support::*;

const TEMPLATE: &str = include_str!("../../../deploy/nginx/portcullis.conf.template");

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// One CA for everything: nginx's edge certificate, and the instances' certificate that
/// nginx verifies when it re-encrypts.
struct Certs {
    pki: Pki,
    dir: tempfile::TempDir,
    instance_cert: PathBuf,
    instance_key: PathBuf,
}

impl Certs {
    fn new() -> Self {
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

    fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }
}

/// nginx from the template in front of `instances`, and a client that trusts it.
struct Edge {
    nginx: Nginx,
    client: reqwest::Client,
}

impl Edge {
    async fn start(certs: &Certs, instances: [SocketAddr; 3]) -> Self {
        let edge_leaf = certs.pki.leaf();
        let path = |p: PathBuf| p.display().to_string();
        let listen = harness::free_port();
        let config = render_template(
            TEMPLATE,
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

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.nginx.port())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.nginx.log_path()).unwrap_or_default()
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

async fn refuses_connections(addr: SocketAddr) {
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
    let discovery = edge
        .client
        .get(edge.url("/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap();
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
