//! Request limits: body size, slow clients, request ids.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::support::*;

#[tokio::test]
async fn oversized_body_gets_413_with_a_json_error() {
    let app = spawn_app(|c| c.server.max_body_bytes = 1024).await;
    let mut conn = Conn::over(app.tls().await).await;
    let req = http::Request::post("/anything")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .unwrap();
    let (parts, body) = conn.request(req).await.unwrap();
    assert_eq!(parts.status, 413);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "payload_too_large");
    assert!(parts.headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn body_at_the_limit_is_not_refused_for_size() {
    let app = spawn_app(|c| c.server.max_body_bytes = 1024).await;
    let mut conn = Conn::over(app.tls().await).await;
    let req = http::Request::post("/anything")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(vec![b'x'; 1024])))
        .unwrap();
    let (parts, _) = conn.request(req).await.unwrap();
    assert_eq!(
        parts.status, 404,
        "within the limit the request reaches routing"
    );
}

#[tokio::test]
async fn client_that_never_finishes_its_headers_is_cut_off_while_others_are_served() {
    let app = spawn_app(|c| c.server.header_read_timeout = Duration::from_millis(500)).await;
    let mut slow = app.tls().await;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();

    // meanwhile a well-behaved client is served
    let mut good = Conn::over(app.tls().await).await;
    assert_eq!(good.get("/").await.unwrap().0.status, 200);

    // the slow one is closed by the server (after at most an error response)
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server never closed the slow connection");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "closed before the header timeout: {waited:?}"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "unexpected answer to a slow client: {text}"
    );
}

#[tokio::test]
async fn client_that_never_starts_tls_is_cut_off() {
    let app = spawn_app(|c| c.server.tls_handshake_timeout = Duration::from_millis(300)).await;
    let mut raw = tokio::net::TcpStream::connect(app.https).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut buf))
        .await
        .expect("the server never closed a connection that sent nothing");
    assert_eq!(n.unwrap_or(0), 0);
}

#[tokio::test]
async fn oversized_request_head_is_refused() {
    let app = spawn_app(|c| c.server.max_header_bytes = 8192).await;
    let mut conn = Conn::over(app.tls().await).await;
    let req = http::Request::get("/")
        .header("host", "localhost")
        .header("x-big", "a".repeat(20_000))
        .body(Full::default())
        .unwrap();
    // hyper answers 431, or may close the connection instead
    if let Ok((parts, _)) = conn.request(req).await {
        assert_eq!(parts.status, 431);
    }
    // a fresh, normal request still works
    let mut again = Conn::over(app.tls().await).await;
    assert_eq!(again.get("/").await.unwrap().0.status, 200);
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_sane_client_id_is_kept() {
    let app = spawn_app(|_| {}).await;
    let mut conn = Conn::over(app.tls().await).await;
    let (parts, _) = conn.get("/").await.unwrap();
    let generated = parts.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");

    let kept = http::Request::get("/nowhere")
        .header("host", "localhost")
        .header("x-request-id", "nginx-5f2b9c")
        .body(Full::default())
        .unwrap();
    let (parts, body) = conn.request(kept).await.unwrap();
    assert_eq!(parts.status, 404);
    assert_eq!(parts.headers["x-request-id"], "nginx-5f2b9c");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "not_found");

    let replaced = http::Request::get("/")
        .header("host", "localhost")
        .header("x-request-id", "bad id with spaces")
        .body(Full::default())
        .unwrap();
    let (parts, _) = conn.request(replaced).await.unwrap();
    assert_ne!(parts.headers["x-request-id"], "bad id with spaces");
}

#[tokio::test]
async fn requests_are_counted_by_route_template_including_early_refusals() {
    let app = spawn_app(|c| c.server.max_body_bytes = 1024).await;
    let mut conn = Conn::over(app.tls().await).await;
    // two different applications, one template; no token, so 401
    for app_name in ["metrics-probe-a", "metrics-probe-b"] {
        let (parts, _) = conn
            .get(&format!("/config/v1/metrics-env/{app_name}"))
            .await
            .unwrap();
        assert_eq!(parts.status, 401);
    }
    // refused for its declared size before the handler runs: still counted, by template
    let req = http::Request::put("/config/v1/metrics-env/metrics-probe-a")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .unwrap();
    assert_eq!(conn.request(req).await.unwrap().0.status, 413);

    let metrics = app.metrics().await;
    let counted = |method: &str, status: &str| {
        metrics.lines().any(|l| {
            l.starts_with("portcullis_http_requests_total{")
                && l.contains(&format!("method=\"{method}\""))
                && l.contains("route=\"/config/v1/{env}/{app}\"")
                && l.contains(&format!("status=\"{status}\""))
        })
    };
    assert!(counted("GET", "401"), "{metrics}");
    assert!(counted("PUT", "413"), "{metrics}");
    assert!(
        !metrics.contains("metrics-probe-"),
        "a raw path became a label: {metrics}"
    );
}
