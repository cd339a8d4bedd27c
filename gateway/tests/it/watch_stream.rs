//! A config watch on HTTP/1.1 over TLS 1.3 runs on the bare connection once its head is
//! sent (`portcullis::detach`): what a plain TLS client reads must be exactly the HTTP
//! it would read from hyper and rustls — a chunked body of SSE events, then at shutdown
//! the last chunk and a `close_notify`. A TLS 1.2 client is served by hyper to the end.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::config_api::{APP, Api, entries_v1, token, token_until};
use super::support::*;

/// A raw HTTP/1.1 watch over TLS with the given protocol versions, no ALPN; its response
/// head as text.
async fn open(
    app: &TestApp,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (TlsStream<TcpStream>, String) {
    let tcp = TcpStream::connect(app.https).await.unwrap();
    open_on(app, versions, tcp).await
}

/// [`open`] on a given TCP connection.
async fn open_on(
    app: &TestApp,
    versions: &[&'static rustls::SupportedProtocolVersion],
    tcp: TcpStream,
) -> (TlsStream<TcpStream>, String) {
    open_with(app, versions, tcp, &token(app, "config:read:prod")).await
}

/// [`open_on`] with a given bearer token.
async fn open_with(
    app: &TestApp,
    versions: &[&'static rustls::SupportedProtocolVersion],
    tcp: TcpStream,
    bearer: &str,
) -> (TlsStream<TcpStream>, String) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(app.pki.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\n\
         accept: text/event-stream\r\n\r\n",
        Api::path("prod", APP, "/watch"),
        bearer,
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut tls).await;
    (tls, head.to_ascii_lowercase())
}

/// Decodes a chunked body as it arrives.
#[derive(Default)]
struct Chunked {
    raw: Vec<u8>,
    /// Decoded body bytes not yet taken.
    body: Vec<u8>,
    /// The last chunk (size 0) and its blank line were read.
    ended: bool,
}

impl Chunked {
    fn feed(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size = usize::from_str_radix(
                std::str::from_utf8(&self.raw[..line_end]).unwrap().trim(),
                16,
            )
            .expect("a chunk size in hex");
            let needed = line_end + 2 + size + 2;
            if self.raw.len() < needed {
                return;
            }
            assert_eq!(
                &self.raw[needed - 2..needed],
                b"\r\n",
                "a chunk ends in CRLF"
            );
            self.body
                .extend_from_slice(&self.raw[line_end + 2..line_end + 2 + size]);
            self.raw.drain(..needed);
            if size == 0 {
                self.ended = true;
                return;
            }
        }
    }
}

/// An open watch as a plain client reads it.
struct Watch {
    tls: TlsStream<TcpStream>,
    chunked: Chunked,
    sse: config_center::client::SseParser,
}

impl Watch {
    /// Publishes release 1 on `app`, opens a watch with the given TLS versions, checks
    /// its head (200, chunked) and reads release 1 from it.
    async fn start(app: &TestApp, versions: &[&'static rustls::SupportedProtocolVersion]) -> Self {
        let tcp = TcpStream::connect(app.https).await.unwrap();
        Self::start_on(app, versions, tcp).await
    }

    /// [`Watch::start`] on a given TCP connection.
    async fn start_on(
        app: &TestApp,
        versions: &[&'static rustls::SupportedProtocolVersion],
        tcp: TcpStream,
    ) -> Self {
        Self::start_with(app, versions, tcp, &token(app, "config:read:prod")).await
    }

    /// [`Watch::start_on`] with a given bearer token.
    async fn start_with(
        app: &TestApp,
        versions: &[&'static rustls::SupportedProtocolVersion],
        tcp: TcpStream,
        bearer: &str,
    ) -> Self {
        Api::new(app).publish(entries_v1()).await;
        let (tls, head) = open_with(app, versions, tcp, bearer).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(head.contains("content-type: text/event-stream"), "{head}");
        let mut watch = Self {
            tls,
            chunked: Chunked::default(),
            sse: Default::default(),
        };
        assert_eq!(watch.releases(1).await, [1]);
        watch
    }

    /// Reads until `n` release events arrived; their versions.
    async fn releases(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while out.len() < n {
            let read = tokio::time::timeout(Duration::from_secs(10), self.tls.read(&mut buf))
                .await
                .expect("an event within 10 s")
                .expect("the stream reads cleanly");
            assert!(read > 0, "the stream stays open");
            self.chunked.feed(&buf[..read]);
            let body = std::mem::take(&mut self.chunked.body);
            for e in self.sse.feed(&body).unwrap() {
                if e.event == "release" {
                    out.push(e.id.unwrap().parse().unwrap());
                }
            }
        }
        out
    }

    /// Reads until the body's last chunk, within 10 s; the versions of the release
    /// events read on the way.
    async fn releases_until_the_body_ends(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !self.chunked.ended {
            let read = tokio::time::timeout(Duration::from_secs(10), self.tls.read(&mut buf))
                .await
                .expect("the body ends within 10 s")
                .expect("the stream reads cleanly");
            assert!(
                read > 0,
                "the connection closed before the body's last chunk"
            );
            self.chunked.feed(&buf[..read]);
            let body = std::mem::take(&mut self.chunked.body);
            for e in self.sse.feed(&body).unwrap() {
                if e.event == "release" {
                    out.push(e.id.unwrap().parse().unwrap());
                }
            }
        }
        out
    }

    /// Reads to the end of the TLS stream, within 10 s; whether it ended cleanly.
    async fn read_to_end(&mut self) -> (Vec<u8>, bool) {
        let mut rest = Vec::new();
        let clean = tokio::time::timeout(Duration::from_secs(10), self.tls.read_to_end(&mut rest))
            .await
            .expect("the stream ends")
            .is_ok();
        (rest, clean)
    }
}

#[tokio::test]
async fn a_watch_on_tls13_streams_chunked_events_and_ends_with_the_last_chunk_and_close_notify() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    let mut watch = Watch::start(&app, &[&rustls::version::TLS13]).await;

    // releases made after the takeover arrive on the same stream, in a record sequence
    // the client keeps verifying
    for (i, value) in ["postgres://v2", "postgres://v3"].into_iter().enumerate() {
        api.publish(json!([{ "key": "db.url", "value": value }]))
            .await;
        assert_eq!(watch.releases(1).await, [i as u64 + 2]);
    }

    // shutdown: the body ends with its last chunk, then the TLS stream ends with
    // close_notify (rustls reports a bare TCP close as an error)
    app.stop.cancel();
    let (rest, clean) = watch.read_to_end().await;
    assert!(clean, "a clean TLS close");
    watch.chunked.feed(&rest);
    assert!(watch.chunked.ended, "the body's last chunk was sent");
    assert!(watch.chunked.raw.is_empty(), "nothing after it");
}

/// On the bare connection a stream has nothing to read: whatever the client sends (here a
/// pipelined request; a `close_notify` or a TLS `KeyUpdate` alike) ends it, and its slot
/// and connection are freed. (hyper, on TLS 1.2, holds such a request instead: see below.)
#[tokio::test]
async fn a_watcher_that_sends_anything_on_tls13_is_closed_and_its_slot_freed() {
    let app = spawn_app(|c| c.config_center.max_watches_per_client = 1).await;
    let mut watch = Watch::start(&app, &[&rustls::version::TLS13]).await;
    // the address holds its one watch
    let (_, head) = open(&app, &[&rustls::version::TLS13]).await;
    assert!(head.starts_with("http/1.1 429"), "{head}");

    watch
        .tls
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (rest, _) = watch.read_to_end().await;
    assert!(rest.is_empty(), "no answer to the pipelined request");
    // its slot is freed: a new watch from the same address is accepted
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_tls, head) = open(&app, &[&rustls::version::TLS13]).await;
        if head.starts_with("http/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was not freed: {head}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_watch_on_tls12_is_served_by_hyper_with_the_same_events() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    let mut watch = Watch::start(&app, &[&rustls::version::TLS12]).await;
    api.publish(json!([{ "key": "db.url", "value": "postgres://v2" }]))
        .await;
    assert_eq!(watch.releases(1).await, [2]);
    // hyper holds a pipelined request until the stream ends: the stream goes on
    watch
        .tls
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    api.publish(json!([{ "key": "db.url", "value": "postgres://v3" }]))
        .await;
    assert_eq!(watch.releases(1).await, [3]);
}

/// A node that stops reading while releases keep coming: once its socket takes no more,
/// it is not sent a queue of every release (memory per watcher stays bounded), and when
/// it reads again it gets what was already on its way, then the newest release, in one
/// valid TLS stream; after that, releases reach it as they come again.
#[tokio::test]
async fn a_node_that_stops_reading_gets_the_newest_release_when_it_reads_again() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    // a small receive window, so the server's side fills after a few MiB
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(app.https).await.unwrap();
    let mut watch = Watch::start_on(&app, &[&rustls::version::TLS13], tcp).await;

    // ~700 KiB per release, 16 releases: far more than the kernel buffers of one
    // connection hold (the send buffer grows to 4 MiB at most here)
    let published = 16;
    let mut newest = 0;
    for round in 0..published {
        let entries: Vec<_> = (0..12)
            .map(|k| json!({ "key": format!("blob.{k}"), "value": format!("{round}{}", "x".repeat(60_000)) }))
            .collect();
        newest = api.publish(serde_json::Value::Array(entries)).await;
    }

    let mut seen = Vec::new();
    while seen.last() != Some(&newest) {
        seen.extend(watch.releases(1).await);
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "versions only go up: {seen:?}"
    );
    assert!(
        seen.len() < published,
        "a node that did not read was sent the newest release, not every one: {seen:?}"
    );

    // caught up: the next release comes as any other
    let next = api
        .publish(json!([{ "key": "db.url", "value": "postgres://after" }]))
        .await;
    assert_eq!(watch.releases(1).await, [next]);
}

/// A watch is authorised by the token it was opened with, and ends (properly: the last
/// chunk) when that token expires: a release made after that is not sent on it, and the
/// node reconnects with a fresh token (the client library does) from the version it holds.
async fn a_watch_ends_when_its_token_expires(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (TestApp, Watch) {
    let app = spawn_app(|c| c.tokens.leeway = Duration::ZERO).await;
    let exp = app.state.keys.now().unix_timestamp() + 2;
    let bearer = token_until(&app, "config:read:prod", exp);
    let tcp = TcpStream::connect(app.https).await.unwrap();
    let mut watch = Watch::start_with(&app, versions, tcp, &bearer).await;

    eventually(Duration::from_secs(10), "the watch's token expired", || {
        let now = app.state.keys.now().unix_timestamp();
        async move { now > exp }
    })
    .await;
    Api::new(&app)
        .publish(json!([{ "key": "db.password", "value": "rotated-after-expiry", "secret": true }]))
        .await;
    let sent = watch.releases_until_the_body_ends().await;
    assert!(
        sent.is_empty(),
        "a release reached an expired watch: {sent:?}"
    );
    (app, watch)
}

#[tokio::test]
async fn a_watch_on_tls13_ends_with_close_notify_when_its_token_expires() {
    let (_app, mut watch) = a_watch_ends_when_its_token_expires(&[&rustls::version::TLS13]).await;
    let (rest, clean) = watch.read_to_end().await;
    assert!(clean, "a clean TLS close");
    assert!(rest.is_empty(), "nothing after the last chunk");
}

#[tokio::test]
async fn a_watch_on_tls12_ends_when_its_token_expires() {
    a_watch_ends_when_its_token_expires(&[&rustls::version::TLS12]).await;
}
