//! `server.idle_timeout`: a connection with no request in flight is closed gracefully
//! once the timeout has passed, over HTTP/1.1 and HTTP/2; a connection that keeps
//! making requests, or holds a config watch open, is not.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::config_api::{APP, Api, entries_v1, open_watch, read_events, token};
use super::support::*;

/// Short enough for a quick test, long enough that a request every 100 ms on a loaded
/// 2-core machine never leaves a connection idle for that long.
const IDLE: Duration = Duration::from_millis(500);
/// A close may come late on a loaded machine, never early.
const LATE: Duration = Duration::from_secs(5);

async fn spawn_idle_app() -> TestApp {
    spawn_app(|c| c.server.idle_timeout = IDLE).await
}

/// Waits `how_long` on a streaming response, failing if the server ends it meanwhile;
/// whatever arrives (an SSE keep-alive) is read and set aside.
async fn stays_open(resp: &mut reqwest::Response, how_long: Duration) {
    let end = tokio::time::Instant::now() + how_long;
    loop {
        match tokio::time::timeout_at(end, resp.chunk()).await {
            Err(_) => return,
            Ok(Ok(Some(_))) => {}
            Ok(other) => panic!("the watch ended while it was open: {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_idle_http1_connection_is_closed_with_close_notify_after_the_timeout() {
    let app = spawn_idle_app().await;
    let mut tls = app.tls().await;
    tls.write_all(b"GET /oauth2/jwks HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let sent = Instant::now();

    // the answer, then nothing until the server closes: read_to_end returns only at the
    // server's close_notify (a bare TCP close is an UnexpectedEof error)
    let mut seen = Vec::new();
    let read = tokio::time::timeout(LATE, tls.read_to_end(&mut seen))
        .await
        .expect("the idle connection was closed within 5 s");
    let closed_after = sent.elapsed();
    read.expect("the server closed the connection with close_notify");
    let answer = String::from_utf8_lossy(&seen);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("connection: close"),
        "the answer itself was not meant to end the connection: {answer}"
    );
    assert!(
        closed_after >= IDLE,
        "closed {closed_after:?} after the request, before the idle timeout"
    );
}

/// Reads one HTTP/1.1 answer with a `Content-Length` body off a raw connection.
async fn read_answer(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(LATE, tls.read(&mut chunk))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "the connection closed before the answer");
        seen.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a content-length");
            if seen.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn an_idle_http1_connection_outlives_the_header_timeout_until_the_idle_timeout() {
    // the wait for the next request is the idle timeout's, not the header timeout's
    let idle = Duration::from_millis(1500);
    let app = spawn_app(|c| {
        c.server.idle_timeout = idle;
        c.server.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut tls = app.tls().await;
    tls.write_all(b"GET /oauth2/jwks HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let sent = Instant::now();
    assert!(read_answer(&mut tls).await.starts_with("HTTP/1.1 200"));

    let mut rest = Vec::new();
    let read = tokio::time::timeout(LATE, tls.read_to_end(&mut rest))
        .await
        .expect("the idle connection was closed within 5 s");
    let closed_after = sent.elapsed();
    read.expect("the server closed the connection with close_notify");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        closed_after >= idle,
        "closed {closed_after:?} after the request, before the idle timeout"
    );
}

#[tokio::test]
async fn a_head_started_after_a_long_idle_wait_must_still_arrive_within_the_header_timeout() {
    let header = Duration::from_millis(300);
    let app = spawn_app(|c| {
        c.server.idle_timeout = Duration::from_secs(60);
        c.server.header_read_timeout = header;
    })
    .await;
    let mut tls = app.tls().await;
    tls.write_all(b"GET /oauth2/jwks HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert!(read_answer(&mut tls).await.starts_with("HTTP/1.1 200"));

    // idle for twice the header timeout: the connection stays open, nothing arrives
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(header * 2, tls.read(&mut byte))
            .await
            .is_err(),
        "the server closed or wrote to a connection waiting for its next request"
    );

    // then half a head, and no more: cut off after the header timeout, not the idle one
    tls.write_all(b"GET /oauth2/jwks HTTP/1.1\r\nhost: loc")
        .await
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(LATE, tls.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the slow head was not cut off within 5 s");
    let waited = started.elapsed();
    assert!(
        waited >= header,
        "cut off {waited:?} after the head began, before the header timeout"
    );
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

#[tokio::test]
async fn a_connection_making_a_request_every_100ms_stays_open_across_several_timeouts() {
    let app = spawn_idle_app().await;
    // one TLS connection, never replaced: a request after a close would fail
    let mut conn = Conn::over(app.tls().await).await;
    let start = Instant::now();
    let mut answered = 0;
    while start.elapsed() < IDLE * 4 {
        let (parts, _) = conn
            .get("/oauth2/jwks")
            .await
            .expect("the busy connection is still open");
        assert_eq!(parts.status, 200);
        answered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered >= 4, "only {answered} requests in {:?}", IDLE * 4);
}

#[tokio::test]
async fn an_sse_watch_outlives_the_idle_timeout_and_still_gets_the_next_release() {
    let app = spawn_idle_app().await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let mut watch = open_watch(&api, None).await;
    assert_eq!(read_events(&mut watch, 1).await[0].0, 1);

    // nothing happens on the watch's connection for several idle timeouts
    stays_open(&mut watch, IDLE * 4).await;

    api.publish(json!([{ "key": "db.url", "value": "postgres://v2" }]))
        .await;
    let next = read_events(&mut watch, 1).await;
    assert_eq!(next[0].0, 2);
}

#[tokio::test]
async fn a_long_poll_outlives_the_idle_timeout_and_its_connection_then_serves_the_next_request() {
    let app = spawn_idle_app().await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let mut conn = Conn::over(app.tls().await).await;
    let bearer = format!("Bearer {}", token(&app, "config:read:prod"));
    let poll = http::Request::get(Api::path("prod", APP, "/poll?version=1"))
        .header("host", "localhost")
        .header("authorization", &bearer)
        .body(http_body_util::Full::default())
        .unwrap();
    let mut parked = tokio::spawn(async move {
        let answer = conn.request(poll).await;
        (conn, answer)
    });

    // parked for several idle timeouts; the connection is busy, not idle
    assert!(
        tokio::time::timeout(IDLE * 4, &mut parked).await.is_err(),
        "the long-poll ended before a release was made"
    );
    api.publish(json!([{ "key": "db.url", "value": "postgres://v2" }]))
        .await;
    let (mut conn, answer) = tokio::time::timeout(LATE, parked)
        .await
        .expect("the long-poll answered the release within 5 s")
        .unwrap();
    let (parts, body) = answer.expect("the long-poll was answered");
    assert_eq!(parts.status, 200);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["version"], 2);

    // the idle time starts when the answer has been sent, not when the request came in:
    // the same connection is still good for the next request
    let (parts, _) = conn
        .get("/oauth2/jwks")
        .await
        .expect("the connection stayed open after the long-poll");
    assert_eq!(parts.status, 200);
}

#[tokio::test]
async fn an_http2_connection_stays_open_while_a_watch_streams_and_closes_once_idle() {
    let app = spawn_idle_app().await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let mut h2 = app.http2().await;
    let watch = http::Request::get(app.url(&Api::path("prod", APP, "/watch")))
        .header(
            "authorization",
            format!("Bearer {}", token(&app, "config:read:prod")),
        )
        .body(http_body_util::Full::default())
        .unwrap();
    let resp = h2.send_request(watch).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let mut body = resp.into_body();
    let mut parser = config_center::client::SseParser::default();
    let mut releases = Vec::new();

    // the watch stream is the only one on the connection: quiet for several timeouts
    let quiet_until = tokio::time::Instant::now() + IDLE * 4;
    loop {
        match tokio::time::timeout_at(quiet_until, body.frame()).await {
            Err(_) => break,
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    releases.extend(parser.feed(data).unwrap().into_iter().map(|e| e.event));
                }
            }
            Ok(other) => panic!("the watch stream ended while it was open: {other:?}"),
        }
    }
    assert!(!h2.is_closed(), "the connection closed under an open watch");

    api.publish(json!([{ "key": "db.url", "value": "postgres://v2" }]))
        .await;
    while releases.iter().filter(|e| *e == "release").count() < 2 {
        let frame = tokio::time::timeout(LATE, body.frame())
            .await
            .expect("the next release within 5 s")
            .expect("the stream stays open")
            .unwrap();
        if let Some(data) = frame.data_ref() {
            releases.extend(parser.feed(data).unwrap().into_iter().map(|e| e.event));
        }
    }

    // the watcher leaves (RST_STREAM): nothing is in flight, the server sends GOAWAY and
    // closes the connection after the idle timeout
    drop(body);
    let left = Instant::now();
    eventually(LATE, "the idle HTTP/2 connection closed", || {
        let closed = h2.is_closed();
        async move { closed }
    })
    .await;
    let closed_after = left.elapsed();
    assert!(
        closed_after >= IDLE,
        "closed {closed_after:?} after the stream ended, before the idle timeout"
    );
}

/// A request answered before its body was read (here refused for want of a token) may
/// still be sending that body: the server reads it out after the answer instead of
/// closing on the sender ("EOF in violation of protocol" over TLS), the connection then
/// serves the next request, and the body's bytes are not taken for the start of a slow
/// next head (the header timeout does not cut the connection off while it waits).
#[tokio::test]
async fn a_body_its_answer_left_unread_is_read_out_and_the_connection_kept() {
    let header = Duration::from_millis(300);
    let app = spawn_app(|c| {
        c.server.idle_timeout = Duration::from_secs(60);
        c.server.header_read_timeout = header;
    })
    .await;
    let mut tls = app.tls().await;
    let body = vec![b'x'; 200_000];
    tls.write_all(
        format!(
            "PUT /config/v1/dev/orders HTTP/1.1\r\nhost: localhost\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let refused = read_answer(&mut tls).await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // the rest of the request, after its answer
    tls.write_all(&body).await.expect("the body is taken");
    tls.flush().await.unwrap();

    // waiting past the header timeout, then a head in two parts
    tokio::time::sleep(header * 3).await;
    tls.write_all(b"GET /oauth2/jwks HTTP/1.1\r\nhost: loc")
        .await
        .expect("the connection is still open");
    tokio::time::sleep(header / 3).await;
    tls.write_all(b"alhost\r\n\r\n").await.unwrap();
    let next = read_answer(&mut tls).await;
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
}

/// The bound of that: a body declared longer than what the server reads out for an
/// answer (4 MiB) is not waited for; the answer is sent and the connection closed.
#[tokio::test]
async fn a_body_too_long_to_read_out_gets_its_answer_and_the_connection_closes() {
    let app = spawn_app(|c| c.server.max_body_bytes = 64 * 1024 * 1024).await;
    let mut tls = app.tls().await;
    tls.write_all(
        b"PUT /config/v1/dev/orders HTTP/1.1\r\nhost: localhost\r\n\
          content-type: application/json\r\ncontent-length: 10000000\r\n\r\n",
    )
    .await
    .unwrap();
    let refused = read_answer(&mut tls).await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let mut rest = [0u8; 64];
    let read = tokio::time::timeout(LATE, tls.read(&mut rest))
        .await
        .expect("the connection was closed within 5 s");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the connection stayed open: {read:?}"
    );
}

/// A client that asked to be told before it sends its body (`Expect: 100-continue`) and is
/// refused is not invited to send it: the refusal comes with no `100 Continue` before it,
/// and the connection closes at once instead of waiting for a body that will not come.
#[tokio::test]
async fn a_refused_request_that_expects_100_continue_is_not_asked_for_its_body() {
    let app = spawn_app(|_| {}).await;
    let mut tls = app.tls().await;
    tls.write_all(
        b"PUT /config/v1/dev/orders HTTP/1.1\r\nhost: localhost\r\n\
          content-type: application/json\r\ncontent-length: 200000\r\n\
          expect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = read_answer(&mut tls).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let answered = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LATE, tls.read_to_end(&mut rest))
        .await
        .expect("the connection was closed within 5 s");
    assert!(
        answered.elapsed() < Duration::from_secs(2),
        "the connection waited {:?} for a body the client was never asked for",
        answered.elapsed()
    );
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}
