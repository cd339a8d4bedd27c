//! `deploy/nginx/portcullis.conf.template`, rendered with test ports and certificates,
//! run by a real nginx in front of three instances of this process, each proxying to two
//! admin nodes of the test: requests go through, nginx's X-Forwarded-For is believed,
//! and stopping an instance loses no idempotent request.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use harness::{Nginx, render_template};
use portcullis::config::TlsConfig;
use reqwest::StatusCode;

use super::proxy::{AdminNode, proxy_to};
use super::support::*;

const TEMPLATE: &str = include_str!("../../../deploy/nginx/portcullis.conf.template");

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn nginx_fronts_three_instances_and_stopping_one_loses_no_get() {
    // one CA for everything: nginx's edge certificate, and the instances' certificates
    // nginx verifies when it re-encrypts
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    let instance_leaf = pki.leaf();
    let instance_cert = write(certs.path(), "instance.pem", &instance_leaf.cert_pem);
    let instance_key = write(certs.path(), "instance.key", &instance_leaf.key_pem);
    let edge_leaf = pki.leaf();
    let edge_cert = write(certs.path(), "edge.pem", &edge_leaf.cert_pem);
    let edge_key = write(certs.path(), "edge.key", &edge_leaf.key_pem);
    let ca = write(certs.path(), "ca.pem", &pki.ca_pem());

    let (a, b) = (AdminNode::start("a").await, AdminNode::start("b").await);
    let mut instances = Vec::new();
    for _ in 0..3 {
        let (cert, key) = (instance_cert.clone(), instance_key.clone());
        let app = spawn_app(|c| {
            c.tls = Some(TlsConfig {
                cert: cert.into(),
                key: key.into(),
                reload_interval: Duration::from_secs(10),
            });
            c.protection.trusted_proxies = vec!["127.0.0.1/32".to_owned()];
            proxy_to(c, &[&a, &b]);
        })
        .await;
        instances.push(app);
    }

    let listen = harness::free_port();
    let config = render_template(
        TEMPLATE,
        &[
            ("LISTEN", format!("127.0.0.1:{listen}")),
            ("SERVER_NAME", "localhost".to_owned()),
            ("TLS_CERT", edge_cert),
            ("TLS_KEY", edge_key),
            ("UPSTREAM_CA", ca),
            ("UPSTREAM_TLS_NAME", "localhost".to_owned()),
            ("INSTANCE_1", instances[0].https.to_string()),
            ("INSTANCE_2", instances[1].https.to_string()),
            ("INSTANCE_3", instances[2].https.to_string()),
            (
                "ACCESS_LOG",
                certs.path().join("access.log").display().to_string(),
            ),
        ],
    )
    .unwrap();
    let nginx = tokio::task::spawn_blocking(move || Nginx::start(&config))
        .await
        .unwrap()
        .unwrap();
    let edge = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve("localhost", ([127, 0, 0, 1], nginx.port()).into())
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = |path: &str| format!("https://localhost:{}{path}", nginx.port());

    // Portcullis's own endpoints and proxied ones both answer through nginx
    let discovery = edge
        .get(url("/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap();
    assert_eq!(discovery.status(), StatusCode::OK);
    let proxied = edge
        .get(url("/public/hello"))
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
    let done = Arc::new(AtomicUsize::new(0));
    let stop_load = Arc::new(AtomicBool::new(false));
    let load = {
        let (edge, done, stop_load) = (edge.clone(), done.clone(), stop_load.clone());
        let urls = [
            url("/public/load"),
            url("/.well-known/openid-configuration"),
        ];
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut i = 0usize;
            while !stop_load.load(Ordering::SeqCst) {
                let target = &urls[i % 2];
                match edge.get(target).send().await {
                    Ok(r) if r.status() == StatusCode::OK => {}
                    Ok(r) => failures.push(format!("{target}: {}", r.status())),
                    Err(e) => failures.push(format!("{target}: {e}")),
                }
                i += 1;
                done.fetch_add(1, Ordering::SeqCst);
            }
            failures
        })
    };
    let reached = |n: usize| {
        let done = done.clone();
        async move { done.load(Ordering::SeqCst) >= n }
    };
    eventually(
        Duration::from_secs(30),
        "20 requests before the stop",
        || reached(20),
    )
    .await;
    let stopped = instances.pop().unwrap();
    let stopped_addr = stopped.https;
    stopped.stop.cancel();
    eventually(
        Duration::from_secs(20),
        "the instance refuses connections",
        || async move { tokio::net::TcpStream::connect(stopped_addr).await.is_err() },
    )
    .await;
    let at_stop = done.load(Ordering::SeqCst);
    eventually(
        Duration::from_secs(60),
        "60 requests after the stop",
        || reached(at_stop + 60),
    )
    .await;
    stop_load.store(true, Ordering::SeqCst);
    let failures = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "requests failed while an instance stopped: {failures:?}\nnginx log:\n{}",
        std::fs::read_to_string(nginx.log_path()).unwrap_or_default()
    );
    // the stopped instance had its share before, and nginx moved requests that met it
    // on to another one (`$upstream_addr` lists both)
    let log = std::fs::read_to_string(certs.path().join("access.log")).unwrap();
    let served_by_stopped = format!("upstream={stopped_addr} ");
    let moved_on = format!("upstream={stopped_addr}, ");
    assert!(log.contains(&served_by_stopped), "{log}");
    assert!(log.contains(&moved_on), "{log}");
    drop(stopped);
}
