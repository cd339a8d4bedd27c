//! Span export: a `portcullis serve` process with `[tracing] otlp_endpoint` sends its
//! request spans over OTLP/HTTP to a collector (a small recorder here), in the caller's
//! W3C trace, and the admin node's `traceparent` names Portcullis's span as its parent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use reqwest::StatusCode;
use tokio::net::TcpListener;

use super::proxy::AdminNode;
use super::support::*;

/// One OTLP export request as the collector received it.
#[derive(Clone)]
struct Export {
    path: String,
    content_type: String,
    body: Vec<u8>,
}

/// Accepts OTLP/HTTP exports and keeps them.
async fn collector() -> (SocketAddr, Arc<Mutex<Vec<Export>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let keep = keep.clone();
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let keep = keep.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let content_type = req
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let body: hyper::body::Incoming = req.into_body();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    keep.lock().unwrap().push(Export {
                        path,
                        content_type,
                        body: body.to_vec(),
                    });
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn request_spans_are_exported_in_the_callers_trace_and_parent_the_nodes_span() {
    let node = AdminNode::start("a").await;
    let (otlp, exports) = collector().await;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = install_leaf(dir.path(), &pki.leaf());
    let (https, admin) = (harness::free_port(), harness::free_port());
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{https}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [log]\nlevel = \"warn\"\n\
         [tracing]\notlp_endpoint = \"http://{otlp}/v1/traces\"\nservice_name = \"portcullis-spans-test\"\n\
         [database]\nurl = \"sqlite://{d}/portcullis.db\"\n\
         [tokens]\nhash_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n\
         [keys]\nsource = \"file\"\nfile_dir = \"{d}\"\n\
         [proxy]\nupstreams = [\"{node}\"]\n\
         [[proxy.routes]]\nprefix = \"/public/\"\nauth = \"public\"\n",
        cert = cert.display(),
        key = key.display(),
        d = dir.path().display(),
        node = node.url(),
    );
    let file = dir.path().join("portcullis.toml");
    std::fs::write(&file, config).unwrap();
    let mut process = Child::spawn(&["serve", "--config", &file.display().to_string()]);
    let admin_addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    eventually(Duration::from_secs(30), "the process is ready", || {
        let plain = plain.clone();
        async move {
            plain
                .get(format!("http://{admin_addr}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        }
    })
    .await;

    // a caller already in a trace
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve("localhost", ([127, 0, 0, 1], https).into())
        .no_proxy()
        .build()
        .unwrap();
    let r = http
        .get(format!("https://localhost:{https}/public/hello"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // the node is in the same trace, its parent a span of ours (not the caller's)
    let seen = node.seen();
    let traceparent = seen[0].header("traceparent").unwrap().to_owned();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts[1], trace_id, "{traceparent}");
    let our_span = parts[2].to_owned();
    assert_ne!(our_span, caller_span, "{traceparent}");
    assert_eq!(parts[3], "01", "sampled, as the caller decided");

    // stopping flushes the batch; the export carries the trace, our span and its parent
    process.signal("TERM");
    assert!(process.wait(Duration::from_secs(20)).await.is_some());
    let exports = exports.lock().unwrap().clone();
    let ours = exports
        .iter()
        .find(|e| contains(&e.body, &unhex(&our_span)))
        .unwrap_or_else(|| panic!("no export holds span {our_span}: {} exports", exports.len()));
    assert_eq!(ours.path, "/v1/traces");
    assert_eq!(ours.content_type, "application/x-protobuf");
    assert!(
        contains(&ours.body, &unhex(trace_id)),
        "the caller's trace id"
    );
    assert!(
        contains(&ours.body, &unhex(caller_span)),
        "the caller's span as parent"
    );
    assert!(
        contains(&ours.body, b"portcullis-spans-test"),
        "service.name"
    );
    assert!(
        contains(&ours.body, b"GET /public"),
        "the span is named by its route"
    );
}
