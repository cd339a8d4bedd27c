//! The client library against a small in-test gateway that implements the HTTP contract
//! of `docs/config-center.md` and signs releases with real keys.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use config_center::client::{
    Client, ClientConfig, ClientError, JWKS_UNKNOWN_KID_INTERVAL, Origin, SseParser, WatchStatus,
};
use config_center::{Entry, Format, Snapshot, content_hash, signing};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use serde_json::json;
use tokio::sync::watch;

use crate::common::DEADLINE;

/// A signing key and its public JWK.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: serde_json::Value,
}

fn ed25519(kid: &str) -> SigningKey {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    SigningKey {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        key: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}),
    }
}

fn es256(kid: &str) -> SigningKey {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref();
    let (x, y) = (
        URL_SAFE_NO_PAD.encode(&point[1..33]),
        URL_SAFE_NO_PAD.encode(&point[33..65]),
    );
    SigningKey {
        kid: kid.into(),
        alg: Algorithm::ES256,
        key: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"}),
    }
}

/// A release signed the way the gateway signs: a compact JWS over the claims, detached.
fn signed(key: &SigningKey, version: u64, entries: Vec<Entry>) -> Snapshot {
    let mut snapshot = Snapshot {
        environment: "prod".into(),
        application: "orders".into(),
        version,
        issued_at: time::OffsetDateTime::from_unix_timestamp(1_800_000_000 + version as i64)
            .unwrap(),
        content_hash: content_hash(&entries),
        entries,
        signature: String::new(),
    };
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    let compact = jsonwebtoken::encode(&header, &snapshot.claims(), &key.key).unwrap();
    // what the gateway signs is exactly signing_payload(&claims)
    let payload = compact.split('.').nth(1).unwrap();
    assert_eq!(
        URL_SAFE_NO_PAD.decode(payload).unwrap(),
        signing::signing_payload(&snapshot.claims())
    );
    snapshot.signature = signing::detach(&compact).unwrap();
    snapshot
}

fn plain(key: &str, value: &str) -> Entry {
    Entry {
        key: key.into(),
        value: value.into(),
        format: Format::Plain,
        secret: false,
    }
}

/// The in-test gateway.
struct Gateway {
    current: watch::Sender<Option<Snapshot>>,
    jwks: Mutex<Vec<serde_json::Value>>,
    stream: AtomicBool,
    /// Answer 404 on the watch route, as a gateway without it would.
    watch_missing: AtomicBool,
    jwks_fetches: AtomicUsize,
    polls: AtomicUsize,
    /// Bumping it ends every open event stream at its next wake-up.
    epoch: AtomicU64,
    /// The `Last-Event-ID` of every watch request.
    resume_ids: Mutex<Vec<String>>,
    /// Every version sent as an event.
    sent: Mutex<Vec<u64>>,
    /// The query of every plain read.
    read_queries: Mutex<Vec<std::collections::HashMap<String, String>>>,
    /// Answer 400 `invalid_request` to every plain read.
    refuse_reads: AtomicBool,
    /// Send on a watch only releases newer than the one it resumes from, as the real
    /// gateway does (by default any other release is sent, to offer older ones).
    only_newer: AtomicBool,
    /// Answer 503 to every config request, as a gateway whose database is away.
    down: AtomicBool,
    /// Answer 503 to this many more plain reads (not to the watch or the long-poll), as a
    /// gateway whose database is busy for a moment while its open streams go on.
    failing_reads: AtomicUsize,
    /// How long a plain read that is not failed above is held before it is answered, as
    /// a gateway that hangs.
    read_hold: Mutex<Duration>,
    /// How long a long-poll is held before it is answered 304 (the gateway's
    /// `config_center.long_poll_timeout`).
    poll_hold: Mutex<Duration>,
    /// `Cache-Control: max-age` of the JWKS, if any.
    jwks_max_age: Mutex<Option<u64>>,
}

type Shared = Arc<Gateway>;

fn error(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(json!({"error": code, "error_description": code})),
    )
        .into_response()
}

fn authorised(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some("Bearer test-token")
}

fn snapshot_response(s: &Snapshot) -> Response {
    (
        [(header::ETAG, format!("\"{}\"", s.version))],
        Json(s.clone()),
    )
        .into_response()
}

async fn jwks(State(g): State<Shared>) -> Response {
    g.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let keys = g.jwks.lock().unwrap().clone();
    let mut response = Json(json!({"keys": keys})).into_response();
    if let Some(age) = *g.jwks_max_age.lock().unwrap() {
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            format!("public, max-age={age}").parse().unwrap(),
        );
    }
    response
}

async fn read(
    State(g): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    g.read_queries.lock().unwrap().push(query.clone());
    if !authorised(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_token");
    }
    if g.down.load(Ordering::SeqCst)
        || g.failing_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable");
    }
    let hold = *g.read_hold.lock().unwrap();
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    // the gateway's own checks of who is asking
    let labels_ok = query
        .get("labels")
        .is_none_or(|l| config_center::GraySelector::parse_labels(l).is_ok());
    let instance_ok = query
        .get("instance")
        .is_none_or(|i| config_center::GraySelector::new([i.clone()], Default::default()).is_ok());
    if !labels_ok || !instance_ok || g.refuse_reads.load(Ordering::SeqCst) {
        return error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    let current = g.current.borrow().clone();
    let Some(s) = current else {
        return error(StatusCode::NOT_FOUND, "not_found");
    };
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("\"{}\"", s.version))
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    snapshot_response(&s)
}

#[derive(serde::Deserialize)]
struct VersionQuery {
    version: Option<u64>,
}

async fn poll(
    State(g): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<VersionQuery>,
) -> Response {
    if !authorised(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_token");
    }
    if g.down.load(Ordering::SeqCst) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable");
    }
    g.polls.fetch_add(1, Ordering::SeqCst);
    let held = q.version.unwrap_or(0);
    let mut rx = g.current.subscribe();
    let wait = rx.wait_for(|s| s.as_ref().is_some_and(|s| s.version > held));
    let hold = *g.poll_hold.lock().unwrap();
    match tokio::time::timeout(hold, wait).await {
        Ok(Ok(s)) => match s.as_ref() {
            Some(s) => snapshot_response(s),
            None => StatusCode::NOT_MODIFIED.into_response(),
        },
        _ => StatusCode::NOT_MODIFIED.into_response(),
    }
}

async fn watch_sse(
    State(g): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<VersionQuery>,
) -> Response {
    if !authorised(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_token");
    }
    if g.watch_missing.load(Ordering::SeqCst) {
        return error(StatusCode::NOT_FOUND, "not_found");
    }
    if g.down.load(Ordering::SeqCst) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable");
    }
    let only_newer = g.only_newer.load(Ordering::SeqCst);
    if !g.stream.load(Ordering::SeqCst) {
        return error(StatusCode::NOT_IMPLEMENTED, "streaming_disabled");
    }
    let header_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let resume = header_id
        .and_then(|v| v.parse().ok())
        .or(q.version)
        .unwrap_or(0u64);
    let rx = g.current.subscribe();
    let epoch = g.epoch.load(Ordering::SeqCst);
    // recorded once the stream is set up, so a test seeing it may end the stream
    g.resume_ids
        .lock()
        .unwrap()
        .push(header_id.unwrap_or_default().to_owned());
    let state = (rx, resume, true, Arc::clone(&g));
    let stream =
        futures::stream::unfold(state, move |(mut rx, mut sent, mut first, g)| async move {
            loop {
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                first = false;
                if g.epoch.load(Ordering::SeqCst) != epoch {
                    return None;
                }
                let next = rx.borrow_and_update().clone();
                // a newer release, or any other release the test server switched to
                if let Some(s) = next
                    && s.version != sent
                    && (!only_newer || s.version > sent)
                {
                    sent = s.version;
                    g.sent.lock().unwrap().push(s.version);
                    let event = Event::default()
                        .event("release")
                        .id(s.version.to_string())
                        .data(serde_json::to_string(&s).unwrap());
                    return Some((Ok::<_, Infallible>(event), (rx, sent, first, g)));
                }
            }
        });
    Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response()
}

async fn start_gateway(
    key: &SigningKey,
    first: Option<Snapshot>,
) -> (Shared, url::Url, tokio::task::JoinHandle<()>) {
    let (current, _) = watch::channel(first);
    let g = Arc::new(Gateway {
        current,
        jwks: Mutex::new(vec![key.jwk.clone()]),
        stream: AtomicBool::new(true),
        watch_missing: AtomicBool::new(false),
        jwks_fetches: AtomicUsize::new(0),
        polls: AtomicUsize::new(0),
        epoch: AtomicU64::new(0),
        resume_ids: Mutex::new(Vec::new()),
        sent: Mutex::new(Vec::new()),
        read_queries: Mutex::new(Vec::new()),
        refuse_reads: AtomicBool::new(false),
        only_newer: AtomicBool::new(false),
        down: AtomicBool::new(false),
        failing_reads: AtomicUsize::new(0),
        read_hold: Mutex::new(Duration::ZERO),
        poll_hold: Mutex::new(Duration::from_secs(30)),
        jwks_max_age: Mutex::new(None),
    });
    let router = Router::new()
        .route("/oauth2/jwks", get(jwks))
        .route("/config/v1/{env}/{app}", get(read))
        .route("/config/v1/{env}/{app}/poll", get(poll))
        .route("/config/v1/{env}/{app}/watch", get(watch_sse))
        .with_state(Arc::clone(&g));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = url::Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (g, url, task)
}

fn config(gateways: Vec<url::Url>, dir: &std::path::Path) -> ClientConfig {
    let mut c = ClientConfig::new(
        gateways,
        "prod",
        "orders",
        SecretString::from("test-token"),
        dir,
    );
    c.backoff_initial = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(400);
    c.request_timeout = Duration::from_secs(5);
    c
}

async fn wait_for_version(client: &Client, version: u64) {
    let mut rx = client.subscribe();
    tokio::time::timeout(DEADLINE, rx.wait_for(|s| s.version >= version))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "version {version} did not arrive; holding {}",
                client.version()
            )
        })
        .unwrap();
}

#[tokio::test]
async fn the_client_verifies_its_snapshot_and_follows_releases_over_sse() {
    let key = ed25519("k1");
    let v1 = signed(
        &key,
        1,
        vec![
            plain("port", "8080"),
            plain("name", "orders"),
            Entry {
                key: "limits".into(),
                value: "max: 5\nnames: [a, b]\n".into(),
                format: Format::Yaml,
                secret: false,
            },
            Entry {
                key: "db".into(),
                value: r#"{"user": "orders", "password": "hunter2-in-a-log"}"#.into(),
                format: Format::Json,
                secret: true,
            },
        ],
    );
    let (g, url, _server) = start_gateway(&key, Some(v1)).await;
    let dir = tempfile::tempdir().unwrap();
    let client = Client::start(config(vec![url], dir.path())).await.unwrap();
    assert_eq!(client.version(), 1);
    assert_eq!(client.origin(), Origin::Gateway);
    assert_eq!(client.get::<u16>("port").unwrap(), Some(8080));
    assert_eq!(
        client.get::<String>("port").unwrap().as_deref(),
        Some("8080")
    );
    assert_eq!(
        client.get::<String>("name").unwrap().as_deref(),
        Some("orders")
    );
    #[derive(serde::Deserialize, PartialEq, Debug)]
    struct Limits {
        max: u32,
        names: Vec<String>,
    }
    assert_eq!(
        client.get::<Limits>("limits").unwrap(),
        Some(Limits {
            max: 5,
            names: vec!["a".into(), "b".into()]
        })
    );
    // a value that does not fit is named by its key and the type asked for, never
    // quoted: it may be a secret, and the error is what a node logs
    let err = client.get::<u16>("name").unwrap_err();
    assert!(matches!(err, ClientError::Decode { .. }));
    assert!(!err.to_string().contains("orders"), "{err}");
    assert!(err.to_string().contains("u16"), "{err}");
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Db {
        user: String,
        password: u64,
    }
    let err = client.get::<Db>("db").unwrap_err();
    assert!(matches!(err, ClientError::Decode { .. }));
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(err.to_string().contains("`db`"), "{err}");
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct NoPort {
        port: u16,
    }
    let err = client.get::<NoPort>("db").unwrap_err();
    assert!(err.to_string().contains("missing field `port`"), "{err}");
    assert_eq!(client.get::<String>("absent").unwrap(), None);

    g.current
        .send_replace(Some(signed(&key, 2, vec![plain("port", "9090")])));
    wait_for_version(&client, 2).await;
    assert_eq!(client.get::<u16>("port").unwrap(), Some(9090));
    assert_eq!(
        g.polls.load(Ordering::SeqCst),
        0,
        "SSE was used, not long-poll"
    );
}

#[tokio::test]
async fn the_client_falls_back_to_long_poll_when_the_gateway_does_not_stream() {
    let key = es256("ec1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 1, vec![plain("a", "1")]))).await;
    g.stream.store(false, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let client = Client::start(config(vec![url], dir.path())).await.unwrap();
    assert_eq!(client.version(), 1);
    tokio::time::timeout(DEADLINE, async {
        while g.polls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    g.current
        .send_replace(Some(signed(&key, 2, vec![plain("a", "2")])));
    wait_for_version(&client, 2).await;
    assert_eq!(client.get_str("a").as_deref(), Some("2"));
}

#[tokio::test]
async fn the_client_long_polls_after_repeated_stream_failures() {
    let key = ed25519("k1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 1, vec![plain("a", "1")]))).await;
    g.watch_missing.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let client = Client::start(config(vec![url], dir.path())).await.unwrap();
    tokio::time::timeout(DEADLINE, async {
        while g.polls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    g.current
        .send_replace(Some(signed(&key, 2, vec![plain("a", "2")])));
    wait_for_version(&client, 2).await;
}

#[tokio::test]
async fn the_client_names_its_instance_and_labels_for_gray_releases() {
    let key = ed25519("k1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 1, vec![plain("a", "1")]))).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(vec![url], dir.path());
    cfg.instance = Some("node-7".into());
    cfg.labels = [("zone", "a"), ("tier", "canary")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let _client = Client::start(cfg).await.unwrap();
    let query = g.read_queries.lock().unwrap()[0].clone();
    assert_eq!(query.get("instance").map(String::as_str), Some("node-7"));
    let labels = config_center::GraySelector::parse_labels(&query["labels"]).unwrap();
    assert_eq!(labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(labels.get("tier").map(String::as_str), Some("canary"));
}

#[tokio::test]
async fn a_tampered_snapshot_is_refused() {
    let key = ed25519("k1");
    let mut bad = signed(&key, 1, vec![plain("db.url", "pg://real")]);
    bad.entries[0].value = "pg://evil".into();
    let (g, url, _server) = start_gateway(&key, Some(bad.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let err = Client::start(config(vec![url.clone()], dir.path()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Unavailable(ref m) if m.contains("content hash")),
        "{err}"
    );

    // the hash recomputed to match: now the signature no longer covers it
    bad.content_hash = content_hash(&bad.entries);
    g.current.send_replace(Some(bad));
    let err = Client::start(config(vec![url.clone()], dir.path()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Unavailable(ref m) if m.contains("signature")),
        "{err}"
    );

    // signed by a key the gateway does not publish
    let stranger = ed25519("k1");
    g.current.send_replace(Some(signed(
        &stranger,
        1,
        vec![plain("db.url", "pg://evil")],
    )));
    let err = Client::start(config(vec![url], dir.path()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Unavailable(ref m) if m.contains("signature")),
        "{err}"
    );
    assert!(
        !dir.path().join("prod__orders.json").exists(),
        "nothing refused reaches the disk"
    );
}

#[tokio::test]
async fn an_older_release_is_refused_and_a_new_kid_is_fetched_from_jwks() {
    let k1 = ed25519("k1");
    let (g, url, _server) = start_gateway(&k1, Some(signed(&k1, 5, vec![plain("a", "5")]))).await;
    let dir = tempfile::tempdir().unwrap();
    let client = Client::start(config(vec![url], dir.path())).await.unwrap();
    assert_eq!(client.version(), 5);
    let fetches = g.jwks_fetches.load(Ordering::SeqCst);

    // a downgrade, validly signed, then a release under a rotated-in key
    g.current
        .send_replace(Some(signed(&k1, 3, vec![plain("a", "3")])));
    // events on one stream are handled in order: once 3 is sent, 6 comes after it
    tokio::time::timeout(DEADLINE, async {
        while !g.sent.lock().unwrap().contains(&3) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let k2 = es256("k2");
    g.jwks.lock().unwrap().push(k2.jwk.clone());
    g.current
        .send_replace(Some(signed(&k2, 6, vec![plain("a", "6")])));
    wait_for_version(&client, 6).await;
    assert_eq!(client.get_str("a").as_deref(), Some("6"));
    assert!(
        g.jwks_fetches.load(Ordering::SeqCst) > fetches,
        "the unknown kid made it refetch JWKS"
    );
    // the downgrade never became current
    let mut rx = client.subscribe();
    assert_eq!(rx.borrow_and_update().version, 6);
}

#[tokio::test]
async fn the_client_starts_from_its_last_known_good_copy_when_every_gateway_is_down() {
    let key = ed25519("k1");
    let (_g, url, server) = start_gateway(
        &key,
        Some(signed(
            &key,
            4,
            vec![Entry {
                key: "db.password".into(),
                value: "hunter2".into(),
                format: Format::Plain,
                secret: true,
            }],
        )),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let first = Client::start(config(vec![url.clone()], dir.path()))
        .await
        .unwrap();
    let copy = dir.path().join("prod__orders.json");
    assert!(
        config_center::client::is_private_file(&copy),
        "the copy may hold secrets: 0600"
    );
    assert!(!format!("{first:?}").contains("hunter2"));
    drop(first);
    server.abort();
    let _ = server.await;

    let down = url::Url::parse(&format!("http://127.0.0.1:{}", harness::free_port())).unwrap();
    let client = Client::start(config(vec![down.clone(), url], dir.path()))
        .await
        .unwrap();
    assert_eq!(client.origin(), Origin::Disk);
    assert_eq!(client.version(), 4);
    assert_eq!(client.get_str("db.password").as_deref(), Some("hunter2"));

    // with no copy and no gateway, start fails and says so
    let empty = tempfile::tempdir().unwrap();
    let err = Client::start(config(vec![down], empty.path()))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
}

/// Every version the client holds from now on, as it changes.
fn record_versions(client: &Client) -> Arc<Mutex<Vec<u64>>> {
    let seen = Arc::new(Mutex::new(vec![client.version()]));
    let mut rx = client.subscribe();
    let out = Arc::clone(&seen);
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let v = rx.borrow_and_update().version;
            out.lock().unwrap().push(v);
        }
    });
    seen
}

/// Starts a node whose copy holds release 5 against gateway `g`, which serves release 3:
/// the node starts from its copy, refuses 3 at start and again when its watch is offered
/// it, and keeps its copy; returns the client and the versions it holds from then on.
async fn starts_from_copy_refusing_3(
    g: &Gateway,
    url: url::Url,
    dir: &std::path::Path,
) -> (Client, Arc<Mutex<Vec<u64>>>) {
    let client = Client::start(config(vec![url], dir))
        .await
        .expect("the node starts, from its copy");
    assert_eq!(client.version(), 5, "release 3 was refused");
    assert_eq!(client.origin(), Origin::Disk);
    assert_eq!(client.get_str("a").as_deref(), Some("5"));
    let seen = record_versions(&client);
    // the watch is offered 3 too (the test gateway sends any release it has): refused
    tokio::time::timeout(DEADLINE, async {
        while !g.sent.lock().unwrap().contains(&3) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(copy_version(dir), 5, "the copy on disk is kept");
    (client, seen)
}

fn copy_version(dir: &std::path::Path) -> u64 {
    let bytes = std::fs::read(dir.join("prod__orders.json")).unwrap();
    serde_json::from_slice::<Snapshot>(&bytes).unwrap().version
}

/// A restarted node holds only its copy on disk; a gateway serving an older release (a
/// stale instance, or an attacker replaying an old, validly signed one) must not take it
/// back: it starts from its copy and waits for a newer release.
#[tokio::test]
async fn a_restarted_client_refuses_a_release_older_than_its_copy_and_waits_for_a_newer_one() {
    let key = ed25519("k1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 5, vec![plain("a", "5")]))).await;
    let dir = tempfile::tempdir().unwrap();
    let first = Client::start(config(vec![url.clone()], dir.path()))
        .await
        .unwrap();
    assert_eq!(first.version(), 5);
    drop(first);

    // the old release 3, validly signed, is all the gateway serves now
    g.current
        .send_replace(Some(signed(&key, 3, vec![plain("a", "3")])));
    let (client, seen) = starts_from_copy_refusing_3(&g, url.clone(), dir.path()).await;

    // a newer release is taken as soon as it exists
    g.current
        .send_replace(Some(signed(&key, 6, vec![plain("a", "6")])));
    wait_for_version(&client, 6).await;
    assert_eq!(client.get_str("a").as_deref(), Some("6"));
    assert_eq!(client.origin(), Origin::Gateway);
    assert!(
        seen.lock().unwrap().iter().all(|v| *v >= 5),
        "never below the copy: {:?}",
        seen.lock().unwrap()
    );
    assert_eq!(copy_version(dir.path()), 6);
    drop(client);

    // a gateway with no release at all (a database restored from before it) does not
    // stop a node holding a copy either
    g.current.send_replace(None);
    let client = Client::start(config(vec![url], dir.path()))
        .await
        .expect("the node starts, from its copy");
    assert_eq!(client.version(), 6);
    assert_eq!(client.origin(), Origin::Disk);
    g.current
        .send_replace(Some(signed(&key, 7, vec![plain("a", "7")])));
    wait_for_version(&client, 7).await;
}

/// The copy's version is a floor only once its signature verifies: a copy that was
/// altered on disk cannot lock the node out of its releases — whether it is signed by
/// another key under the gateway's kid, was signed by the gateway's key and had its
/// version raised, or had its signature corrupted.
#[tokio::test]
async fn a_copy_whose_signature_does_not_verify_is_no_floor() {
    let key = ed25519("k1");
    let stranger = ed25519("k1");
    let raised = {
        let mut s = signed(&key, 5, vec![plain("a", "forged")]);
        s.version = 900;
        s
    };
    let corrupted = {
        let mut s = signed(&key, 900, vec![plain("a", "forged")]);
        let (head, sig) = s.signature.rsplit_once('.').unwrap();
        let flipped = if sig.starts_with('A') { "B" } else { "A" };
        s.signature = format!("{head}.{flipped}{}", &sig[1..]);
        s
    };
    let (_g, url, _server) =
        start_gateway(&key, Some(signed(&key, 3, vec![plain("a", "3")]))).await;
    for (case, forged) in [
        (
            "another key under the gateway's kid",
            signed(&stranger, 900, vec![plain("a", "forged")]),
        ),
        ("version raised", raised),
        ("signature corrupted", corrupted),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("prod__orders.json"),
            serde_json::to_vec(&forged).unwrap(),
        )
        .unwrap();
        let client = Client::start(config(vec![url.clone()], dir.path()))
            .await
            .unwrap();
        assert_eq!(client.version(), 3, "{case}");
        assert_eq!(client.origin(), Origin::Gateway, "{case}");
        assert_eq!(client.get_str("a").as_deref(), Some("3"), "{case}");
        assert_eq!(copy_version(dir.path()), 3, "{case}: the copy was replaced");
    }
}

/// A copy signed by a key the gateway's JWKS does not list is not taken for altered: its
/// version stays the floor. After an emergency rotation nodes write copies signed by the
/// new key; a restarted node that meets a gateway instance which has not loaded that key
/// yet (or responses that leave it out of the JWKS) must not be taken back to an older
/// release by it.
#[tokio::test]
async fn a_copy_signed_by_a_key_the_gateway_does_not_list_stays_the_floor() {
    let old = ed25519("k-old");
    let new = es256("k-new");
    let (g, url, _server) = start_gateway(&old, Some(signed(&new, 5, vec![plain("a", "5")]))).await;
    g.jwks.lock().unwrap().push(new.jwk.clone());
    let dir = tempfile::tempdir().unwrap();
    let first = Client::start(config(vec![url.clone()], dir.path()))
        .await
        .unwrap();
    assert_eq!(first.version(), 5);
    drop(first);

    // the stale instance: only the old key, and an older release signed by it
    *g.jwks.lock().unwrap() = vec![old.jwk.clone()];
    g.current
        .send_replace(Some(signed(&old, 3, vec![plain("a", "3")])));
    let (client, seen) = starts_from_copy_refusing_3(&g, url, dir.path()).await;

    // once the instance has the new key, its newer release is taken
    g.jwks.lock().unwrap().push(new.jwk.clone());
    g.current
        .send_replace(Some(signed(&new, 6, vec![plain("a", "6")])));
    wait_for_version(&client, 6).await;
    assert_eq!(client.origin(), Origin::Gateway);
    assert!(
        seen.lock().unwrap().iter().all(|v| *v >= 5),
        "never below the copy: {:?}",
        seen.lock().unwrap()
    );
}

/// A rollback is a new release with the old content and a higher version
/// (`Store::rollback`), so the floor never stands in its way: a restarted node takes it.
#[tokio::test]
async fn a_restarted_client_takes_a_rollback_which_is_a_new_higher_version() {
    use keyrotation::{KeyRing, Keys, Policy};
    let t = crate::common::sqlite_store("rollback").await;
    let (e, a) = (crate::common::env("prod"), crate::common::app("orders"));
    let note = config_center::ChangeNote::new("ops", "");
    for (expected, value) in [(0, "one"), (1, "two")] {
        t.store
            .publish(
                &e,
                &a,
                config_center::Expected::Version(expected),
                vec![crate::common::entry("a", value)],
                &note,
            )
            .await
            .unwrap();
    }
    let now = time::OffsetDateTime::now_utc();
    let ring = keyrotation::plan(&KeyRing::empty(), &Policy::default(), now)
        .unwrap()
        .ring;
    let keys = Keys::from_ring(ring, Some(1), now).unwrap();
    let serve = |release: &config_center::Release| {
        let mut snapshot = Snapshot::unsigned(release);
        snapshot.signature = signing::detach(&keys.sign(&snapshot.claims(), now).unwrap()).unwrap();
        snapshot
    };
    let dummy = ed25519("unused");
    let two = t.store.current(&e, &a).await.unwrap().unwrap();
    let (g, url, _server) = start_gateway(&dummy, Some(serve(&two))).await;
    *g.jwks.lock().unwrap() = keys.jwks(now)["keys"].as_array().unwrap().clone();
    let dir = tempfile::tempdir().unwrap();
    let client = Client::start(config(vec![url.clone()], dir.path()))
        .await
        .unwrap();
    assert_eq!(client.version(), 2);
    drop(client);

    let rolled = t
        .store
        .rollback(&e, &a, 1, config_center::Expected::Version(2), &note)
        .await
        .unwrap();
    assert_eq!(rolled.version, 3, "a rollback is a new release");
    let three = t.store.current(&e, &a).await.unwrap().unwrap();
    g.current.send_replace(Some(serve(&three)));
    let client = Client::start(config(vec![url], dir.path())).await.unwrap();
    assert_eq!(client.version(), 3);
    assert_eq!(client.origin(), Origin::Gateway);
    assert_eq!(client.get_str("a").as_deref(), Some("one"));
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The copy holds decrypted secrets: a cache directory and copy that exist already with
/// looser modes (made by hand, by an older client, restored from a backup) are made
/// private, whether the node starts from a gateway or from the copy.
#[tokio::test]
async fn an_existing_cache_directory_and_copy_are_made_private() {
    let key = ed25519("k1");
    let secret = |v: &str| Entry {
        key: "db.password".into(),
        value: v.into(),
        format: Format::Plain,
        secret: true,
    };
    let (g, url, server) = start_gateway(&key, Some(signed(&key, 1, vec![secret("pw-1")]))).await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("cache");
    std::fs::create_dir(&dir).unwrap();
    set_mode(&dir, 0o755);
    let copy = dir.join("prod__orders.json");

    // from a gateway: the write makes the directory 0700 and the copy 0600
    let client = Client::start(config(vec![url.clone()], &dir))
        .await
        .unwrap();
    assert_eq!(mode(&dir), 0o700, "the existing directory was tightened");
    assert_eq!(mode(&copy), 0o600);

    // and on every later write
    set_mode(&dir, 0o755);
    g.current
        .send_replace(Some(signed(&key, 2, vec![secret("pw-2")])));
    wait_for_version(&client, 2).await;
    assert_eq!(mode(&dir), 0o700, "tightened again on the next write");
    assert_eq!(mode(&copy), 0o600);
    drop(client);

    // from the copy, every gateway down: nothing is written, the modes are fixed anyway
    server.abort();
    let _ = server.await;
    set_mode(&dir, 0o755);
    set_mode(&copy, 0o644);
    let client = Client::start(config(vec![url], &dir)).await.unwrap();
    assert_eq!(client.origin(), Origin::Disk);
    assert_eq!(client.get_str("db.password").as_deref(), Some("pw-2"));
    assert_eq!(mode(&dir), 0o700, "tightened at start");
    assert_eq!(mode(&copy), 0o600, "tightened at start");
    assert!(config_center::client::is_private_file(&copy));
}

/// The unprivileged user the node runs as in the tests below (`nobody`).
const NODE_UID: u32 = 65534;
/// Where the node of `unprivileged_node_writes_its_copies` finds its cache directories.
const NODE_CACHE_VAR: &str = "CONFIG_CENTER_TEST_NODE_CACHE";

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    tempfile::tempfile().unwrap().metadata().unwrap().uid() == 0
}

/// Runs `test` of this test binary as the unprivileged node, in a child process.
fn run_as_node(root: &std::path::Path, test: &str) -> std::process::Output {
    use std::os::unix::process::CommandExt as _;
    let run = |exe: &std::path::Path| {
        std::process::Command::new(exe)
            .args([
                test,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(NODE_CACHE_VAR, root)
            .uid(NODE_UID)
            .gid(NODE_UID)
            .output()
    };
    let exe = std::env::current_exe().unwrap();
    match run(&exe) {
        // the test binary lies where the node may not reach it (under /root): a copy
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let copy = root.join("it");
            std::fs::copy(&exe, &copy).unwrap();
            set_mode(&copy, 0o755);
            run(&copy).unwrap()
        }
        output => output.unwrap(),
    }
}

/// What a node that may not change the modes it meets does with its copy: A, root
/// restored the copy as root:root `0644` into the node's own `0700` directory; B, the
/// cache directory is a mount point the node does not own (root's, `0777`, as a
/// Kubernetes `emptyDir`). Neither chmod can succeed, and neither may stop the node
/// keeping its copy: the rename replaces a copy it cannot chmod, and a directory it
/// cannot tighten is warned about once per start. Only root can set this up, and root may
/// chmod anything, so the node is this test binary run as `nobody`
/// (`unprivileged_node_writes_its_copies`).
#[tokio::test]
async fn a_copy_or_directory_the_node_cannot_chmod_does_not_stop_its_writes() {
    use std::os::unix::fs::MetadataExt as _;
    if !running_as_root() {
        eprintln!("skipped: only root can give the node files and directories it does not own");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    set_mode(root.path(), 0o755);
    // A: the node's own directory, and a stale copy root restored into it
    let own = root.path().join("own");
    std::fs::create_dir(&own).unwrap();
    std::os::unix::fs::chown(&own, Some(NODE_UID), Some(NODE_UID)).unwrap();
    set_mode(&own, 0o700);
    let restored = own.join("prod__orders.json");
    let stale = signed(&ed25519("k0"), 1, vec![plain("a", "restored")]);
    std::fs::write(&restored, serde_json::to_vec(&stale).unwrap()).unwrap();
    set_mode(&restored, 0o644);
    assert_eq!(std::fs::metadata(&restored).unwrap().uid(), 0);
    // B: a mount point the node does not own
    let mount = root.path().join("mount");
    std::fs::create_dir(&mount).unwrap();
    set_mode(&mount, 0o777);

    let output = run_as_node(root.path(), "client::unprivileged_node_writes_its_copies");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && out.contains("1 passed"),
        "the node as nobody: {out}"
    );
    for (dir, version) in [(&own, 3), (&mount, 4)] {
        let copy = dir.join("prod__orders.json");
        let meta = std::fs::symlink_metadata(&copy).unwrap();
        assert_eq!(
            meta.uid(),
            NODE_UID,
            "{}: the copy is the node's own",
            dir.display()
        );
        assert_eq!(meta.mode() & 0o777, 0o600, "{}", dir.display());
        assert_eq!(copy_version(dir), version, "{}", dir.display());
    }
    assert_eq!(
        mode(&mount),
        0o777,
        "the node could not tighten the mount point"
    );
}

/// The node's half of `a_copy_or_directory_the_node_cannot_chmod_does_not_stop_its_writes`,
/// run as `nobody`; without its directories it has nothing to do.
#[tokio::test]
#[ignore = "run as nobody by a_copy_or_directory_the_node_cannot_chmod_does_not_stop_its_writes"]
async fn unprivileged_node_writes_its_copies() {
    let Some(root) = std::env::var_os(NODE_CACHE_VAR) else {
        return;
    };
    let root = std::path::PathBuf::from(root);
    let captured = capture_logs();
    let key = ed25519("k1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 2, vec![plain("a", "2")]))).await;

    // A: the copy root restored is replaced at start and at the next release
    let own = root.join("own");
    let client = Client::start(config(vec![url.clone()], &own))
        .await
        .unwrap();
    assert_eq!(client.version(), 2);
    assert_eq!(copy_version(&own), 2, "the copy root restored was replaced");
    g.current
        .send_replace(Some(signed(&key, 3, vec![plain("a", "3")])));
    wait_for_version(&client, 3).await;
    assert_eq!(copy_version(&own), 3);
    drop(client);

    // B: the mount point stays as it is; the copy is written at start and on every release
    let mount = root.join("mount");
    let client = Client::start(config(vec![url], &mount)).await.unwrap();
    assert_eq!(client.version(), 3);
    assert_eq!(copy_version(&mount), 3);
    g.current
        .send_replace(Some(signed(&key, 4, vec![plain("a", "4")])));
    wait_for_version(&client, 4).await;
    assert_eq!(copy_version(&mount), 4);
    assert!(config_center::client::is_private_file(
        &mount.join("prod__orders.json")
    ));

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        logs.matches("the config cache directory cannot be made private")
            .count(),
        1,
        "one warning for the mount point, not one per write: {logs}"
    );
}

#[tokio::test]
async fn the_client_reconnects_when_its_stream_ends_and_resumes_from_its_version() {
    let key = ed25519("k1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 1, vec![plain("a", "1")]))).await;
    let dir = tempfile::tempdir().unwrap();
    let client = Client::start(config(vec![url], dir.path())).await.unwrap();
    tokio::time::timeout(DEADLINE, async {
        while g.resume_ids.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    // the stream ends without delivering version 2: only a reconnect can bring it
    g.epoch.fetch_add(1, Ordering::SeqCst);
    g.current
        .send_replace(Some(signed(&key, 2, vec![plain("a", "2")])));
    wait_for_version(&client, 2).await;
    let ids = g.resume_ids.lock().unwrap().clone();
    assert_eq!(ids.first().map(String::as_str), Some("1"));
    assert_eq!(
        ids.get(1).map(String::as_str),
        Some("1"),
        "the reconnect resumed from the held version: {ids:?}"
    );
}

#[tokio::test]
async fn a_release_from_the_store_signed_by_keyrotation_keys_verifies_in_the_client() {
    use keyrotation::{KeyAlgorithm, KeyRing, Keys, Policy};
    let t = crate::common::sqlite_store("e2e").await;
    let (e, a) = (crate::common::env("prod"), crate::common::app("orders"));
    t.store
        .publish(
            &e,
            &a,
            config_center::Expected::Version(0),
            vec![
                crate::common::entry("server.port", "8443"),
                crate::common::secret("db.password", "s3cret"),
            ],
            &config_center::ChangeNote::new("ops", ""),
        )
        .await
        .unwrap();
    let release = t.store.current(&e, &a).await.unwrap().unwrap();

    for alg in [
        KeyAlgorithm::ES256,
        KeyAlgorithm::EdDSA,
        KeyAlgorithm::RS256,
    ] {
        // the gateway's path: unsigned snapshot, Keys::sign over its claims, detached
        let now = time::OffsetDateTime::now_utc();
        let policy = Policy {
            algorithm: alg,
            ..Policy::default()
        };
        let ring = keyrotation::plan(&KeyRing::empty(), &policy, now)
            .unwrap()
            .ring;
        let keys = Keys::from_ring(ring, Some(1), now).unwrap();
        let mut snapshot = Snapshot::unsigned(&release);
        let jws = keys.sign(&snapshot.claims(), now).unwrap();
        snapshot.signature = signing::detach(&jws).unwrap();

        let dummy = ed25519("unused");
        let (g, url, _server) = start_gateway(&dummy, Some(snapshot)).await;
        *g.jwks.lock().unwrap() = keys.jwks(now)["keys"].as_array().unwrap().clone();
        let dir = tempfile::tempdir().unwrap();
        let client = Client::start(config(vec![url], dir.path()))
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(client.version(), 1);
        assert_eq!(client.get::<u16>("server.port").unwrap(), Some(8443));
        assert_eq!(client.get_str("db.password").as_deref(), Some("s3cret"));
    }
}

#[test]
fn the_sse_parser_handles_split_chunks_comments_and_crlf() {
    let mut p = SseParser::default();
    assert!(p.feed(b": keep-alive\n\nevent: rel").unwrap().is_empty());
    let events = p
        .feed(b"ease\r\nid: 7\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n")
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, "release");
    assert_eq!(events[0].id.as_deref(), Some("7"));
    assert_eq!(events[0].data, "{\"a\":\n1}");
    let events = p.feed(b"data:x\n\n").unwrap();
    assert_eq!(events[0].event, "message");
}

/// Captures every log line (TRACE, all targets) written while it is the default.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> Captured {
    static CAPTURE: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let captured = Captured::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            captured
        })
        .clone()
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    // the global default (a scoped one races with callsite interest caching when tests
    // run in parallel); it captures every test of this binary from now on
    let captured = capture_logs();

    // the store: publish, read, diff with secrets
    let t = crate::common::sqlite_store("logs").await;
    let (e, a) = (crate::common::env("prod"), crate::common::app("orders"));
    let note = config_center::ChangeNote::new("ops", "");
    t.store
        .publish(
            &e,
            &a,
            config_center::Expected::Version(0),
            vec![crate::common::secret("db.password", "LOGGED-SECRET-1")],
            &note,
        )
        .await
        .unwrap();
    t.store
        .publish(
            &e,
            &a,
            config_center::Expected::Version(1),
            vec![crate::common::secret("db.password", "LOGGED-SECRET-2")],
            &note,
        )
        .await
        .unwrap();
    let release = t.store.current(&e, &a).await.unwrap().unwrap();
    tracing::info!(?release, "a release in a log line");
    let diff = t.store.diff(&e, &a, 1, 2, false).await.unwrap();
    tracing::info!(?diff, "a diff in a log line");

    // the client: fetch, watch, refuse a tampered copy
    let key = ed25519("k1");
    let secret_entry = |v: &str| Entry {
        key: "token".into(),
        value: v.into(),
        format: Format::Plain,
        secret: true,
    };
    let (g, url, _server) = start_gateway(
        &key,
        Some(signed(&key, 1, vec![secret_entry("LOGGED-SECRET-3")])),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(vec![url], dir.path());
    cfg.token = SecretString::from("test-token");
    let client = Client::start(cfg.clone()).await.unwrap();
    tracing::info!(?client, config = ?cfg, "a client in a log line");
    g.current
        .send_replace(Some(signed(&key, 2, vec![secret_entry("LOGGED-SECRET-4")])));
    wait_for_version(&client, 2).await;
    tracing::info!(snapshot = ?client.snapshot(), "a snapshot in a log line");

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("config release published"),
        "logs were captured"
    );
    assert!(
        logs.contains("config snapshot accepted"),
        "logs were captured"
    );
    for secret in [
        "LOGGED-SECRET-1",
        "LOGGED-SECRET-2",
        "LOGGED-SECRET-3",
        "LOGGED-SECRET-4",
        "test-token",
    ] {
        assert!(!logs.contains(secret), "{secret} was logged");
    }
}

/// Events and the parser carry plaintext secret values: their `Debug` shows neither.
#[test]
fn sse_events_and_the_parser_keep_their_data_out_of_debug() {
    let mut p = SseParser::default();
    let events = p
        .feed(b"event: release\nid: 3\ndata: {\"value\":\"hunter2-event\"}\n\ndata: hunter2-pending\ndata: hunter2-line")
        .unwrap();
    assert_eq!(events.len(), 1);
    let shown = format!("{:?} {p:?}", events[0]);
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("release"), "{shown}");
}

/// A gateway without the release does not end the start while another may have it;
/// `NoRelease` is the answer only when none served the node and one said `not_found` —
/// a 404 without that code (a wrong base path, a proxy) is no such answer.
#[tokio::test]
async fn a_gateway_without_the_release_does_not_end_the_start_while_another_has_it() {
    let key = ed25519("k1");
    let (_empty, empty_url, _server_e) = start_gateway(&key, None).await;
    let (_full, full_url, _server_f) =
        start_gateway(&key, Some(signed(&key, 1, vec![plain("a", "1")]))).await;
    let down = url::Url::parse(&format!("http://127.0.0.1:{}", harness::free_port())).unwrap();
    let dir = tempfile::tempdir().unwrap();

    let client = Client::start(config(
        vec![empty_url.clone(), full_url.clone()],
        dir.path(),
    ))
    .await
    .unwrap();
    assert_eq!(client.version(), 1);
    drop(client);

    let empty = tempfile::tempdir().unwrap();
    let err = Client::start(config(vec![empty_url.clone(), down.clone()], empty.path()))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NoRelease), "{err}");
    let err = Client::start(config(vec![down.clone(), empty_url], empty.path()))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NoRelease), "{err}");

    // a base path nothing is served under: 404 without a `not_found` body
    let wrong = full_url.join("nothing-here/").unwrap();
    let err = Client::start(config(vec![wrong], empty.path()))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
}

/// The gateway refuses instance ids and labels outside its grammar (400) on every
/// request, so the client refuses them at start and names the field, rather than
/// reporting every gateway unreachable.
#[tokio::test]
async fn an_instance_or_labels_the_gateway_would_refuse_fail_the_start_naming_the_field() {
    let key = ed25519("k1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 1, vec![plain("a", "1")]))).await;
    let dir = tempfile::tempdir().unwrap();
    for (field, instance, label) in [
        ("label", None, Some(("app.kubernetes.io/name", "orders"))),
        ("label", None, Some(("zone", "a,tier=canary"))),
        ("label", None, Some(("zone", ""))),
        ("instance", Some("node 7"), None),
    ] {
        let mut cfg = config(vec![url.clone()], dir.path());
        cfg.instance = instance.map(str::to_owned);
        cfg.labels = label
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let err = Client::start(cfg).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Config(ref m) if m.contains(field)),
            "{instance:?} {label:?}: {err}"
        );
    }

    // a 400 the client could not foresee is the gateway's answer, not unavailability
    g.refuse_reads.store(true, Ordering::SeqCst);
    let err = Client::start(config(vec![url], dir.path()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: 400, ref error, .. } if error == "invalid_request"),
        "{err}"
    );
}

/// Backoffs pace the watch's reconnects and the checks of an unverified copy; a zero one
/// would not (it doubles to zero): a gateway away would be asked again in a tight loop,
/// and a copy that cannot be checked would be checked before every round. The client
/// refuses such backoffs at start, naming the field.
#[tokio::test]
async fn a_backoff_too_short_to_pace_the_watch_fails_the_start_naming_the_field() {
    let key = ed25519("k1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 1, vec![plain("a", "1")]))).await;
    let dir = tempfile::tempdir().unwrap();
    let ms = Duration::from_millis;
    for (field, initial, max) in [
        ("backoff_initial", Duration::ZERO, ms(400)),
        ("backoff_initial", Duration::from_micros(100), ms(400)),
        ("backoff_max", ms(50), Duration::ZERO),
        ("backoff_max", ms(50), ms(20)),
    ] {
        let mut cfg = config(vec![url.clone()], dir.path());
        cfg.backoff_initial = initial;
        cfg.backoff_max = max;
        match Client::start(cfg).await {
            Err(ClientError::Config(m)) => assert!(m.contains(field), "{initial:?} {max:?}: {m}"),
            Err(e) => panic!("{initial:?} {max:?}: {e}"),
            Ok(client) => panic!(
                "{initial:?} {max:?}: the client started (version {})",
                client.version()
            ),
        }
    }
    assert!(
        g.read_queries.lock().unwrap().is_empty(),
        "refused before any gateway was asked"
    );
}

/// Waits until `done` holds, polling; panics with `what` after [`DEADLINE`].
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(DEADLINE, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

/// A release refused on an open stream for a reason that passes (here: its key is not in
/// the JWKS yet, as on a gateway instance that has not loaded a new key) is not lost: the
/// gateway sends a watch only releases newer than what it sent, so the client ends the
/// stream and resumes from the version it holds, which brings the release again.
#[tokio::test]
async fn a_release_refused_on_the_stream_for_a_passing_reason_comes_again_after_a_reconnect() {
    let k1 = ed25519("k1");
    let (g, url, _server) = start_gateway(&k1, Some(signed(&k1, 1, vec![plain("a", "1")]))).await;
    g.only_newer.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let client = Client::start(config(vec![url], dir.path())).await.unwrap();
    until("the watch is open", || {
        !g.resume_ids.lock().unwrap().is_empty()
    })
    .await;
    let fetches = g.jwks_fetches.load(Ordering::SeqCst);

    // release 2 is signed by a key the JWKS does not list yet
    let k2 = es256("k2");
    g.current
        .send_replace(Some(signed(&k2, 2, vec![plain("a", "2")])));
    until("the client looked for the new key", || {
        g.jwks_fetches.load(Ordering::SeqCst) > fetches && g.sent.lock().unwrap().contains(&2)
    })
    .await;
    assert_eq!(client.version(), 1, "refused while its key is unknown");

    // the key arrives: the release is taken without a newer one being published
    g.jwks.lock().unwrap().push(k2.jwk.clone());
    wait_for_version(&client, 2).await;
    let ids = g.resume_ids.lock().unwrap().clone();
    assert!(
        ids.iter().skip(1).any(|id| id == "1"),
        "the client resumed from the version it held: {ids:?}"
    );
}

/// A gateway that keeps offering a release signed by a key its JWKS does not list (an
/// instance that has not loaded the key yet, or whoever answers for the gateway) has its
/// JWKS fetched for that key once per `JWKS_UNKNOWN_KID_INTERVAL`, not once per offer; the
/// release is taken once the key is listed and the interval is over.
#[tokio::test]
async fn an_unknown_kid_refetches_the_jwks_at_most_once_per_interval() {
    let k1 = ed25519("k1");
    let (g, url, _server) = start_gateway(&k1, Some(signed(&k1, 1, vec![plain("a", "1")]))).await;
    let dir = tempfile::tempdir().unwrap();
    let client = Client::start(config(vec![url], dir.path())).await.unwrap();
    until("the watch is open", || {
        !g.resume_ids.lock().unwrap().is_empty()
    })
    .await;
    let (fetches, polls) = (
        g.jwks_fetches.load(Ordering::SeqCst),
        g.polls.load(Ordering::SeqCst),
    );
    // each offer of release 2: an event on a stream, or the answer to a long-poll (the
    // watch long-polls after three streams failed); each ends the round it came on
    let offers = || {
        g.sent.lock().unwrap().iter().filter(|v| **v == 2).count()
            + (g.polls.load(Ordering::SeqCst) - polls)
    };
    let new_fetches = || g.jwks_fetches.load(Ordering::SeqCst) - fetches;

    // release 2 is signed by a key the JWKS does not list yet
    let k2 = es256("k2");
    let offered = tokio::time::Instant::now();
    g.current
        .send_replace(Some(signed(&k2, 2, vec![plain("a", "2")])));
    until("release 2 was offered four times", || offers() >= 4).await;
    assert!(
        offered.elapsed() < JWKS_UNKNOWN_KID_INTERVAL,
        "the offers took {:?}, longer than the interval: the test proves nothing",
        offered.elapsed()
    );
    assert_eq!(
        new_fetches(),
        1,
        "one JWKS fetch for the unknown kid, not one per offer ({} offers)",
        offers()
    );
    assert_eq!(client.version(), 1, "refused while its key is unknown");

    // the key is listed: the release is taken once the interval is over, with one fetch
    g.jwks.lock().unwrap().push(k2.jwk.clone());
    wait_for_version(&client, 2).await;
    assert!(
        offered.elapsed() >= JWKS_UNKNOWN_KID_INTERVAL,
        "taken {:?} after the first offer, within the interval",
        offered.elapsed()
    );
    assert_eq!(new_fetches(), 2);
}

/// A node that started from its copy while every gateway was away checks that copy once
/// one answers: the same version makes it a gateway's again, and a copy altered on disk
/// to a higher version no gateway has does not keep the node from the current release.
/// (The gateway sends a watch only newer releases, so the watch alone brings neither.)
#[tokio::test]
async fn a_node_started_from_its_copy_checks_it_when_a_gateway_comes_back() {
    let key = ed25519("k1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 5, vec![plain("a", "5")]))).await;
    g.only_newer.store(true, Ordering::SeqCst);

    // the same version: the node runs from the gateway again
    let dir = tempfile::tempdir().unwrap();
    drop(
        Client::start(config(vec![url.clone()], dir.path()))
            .await
            .unwrap(),
    );
    g.down.store(true, Ordering::SeqCst);
    let client = Client::start(config(vec![url.clone()], dir.path()))
        .await
        .unwrap();
    assert_eq!(client.origin(), Origin::Disk);
    g.down.store(false, Ordering::SeqCst);
    until("the copy is a gateway's again", || {
        client.origin() == Origin::Gateway
    })
    .await;
    assert_eq!(client.version(), 5);
    drop(client);

    // a copy whose version was raised on disk: the gateway's release 3 is taken
    g.current
        .send_replace(Some(signed(&key, 3, vec![plain("a", "3")])));
    let dir = tempfile::tempdir().unwrap();
    let mut raised = signed(&key, 5, vec![plain("a", "forged")]);
    raised.version = 900;
    std::fs::write(
        dir.path().join("prod__orders.json"),
        serde_json::to_vec(&raised).unwrap(),
    )
    .unwrap();
    g.down.store(true, Ordering::SeqCst);
    let client = Client::start(config(vec![url], dir.path())).await.unwrap();
    assert_eq!((client.origin(), client.version()), (Origin::Disk, 900));
    g.down.store(false, Ordering::SeqCst);
    wait_for_version_exactly(&client, 3).await;
    assert_eq!(client.origin(), Origin::Gateway);
    assert_eq!(client.get_str("a").as_deref(), Some("3"));
    assert_eq!(copy_version(dir.path()), 3, "the altered copy was replaced");
}

async fn wait_for_version_exactly(client: &Client, version: u64) {
    let mut rx = client.subscribe();
    tokio::time::timeout(DEADLINE, rx.wait_for(|s| s.version == version))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "version {version} did not arrive; holding {}",
                client.version()
            )
        })
        .unwrap();
}

/// A check of the copy that fails is no failure of the event stream. Here the gateway
/// fails its snapshot reads for a moment (its database busy) — the read at start, so the
/// node starts from its copy, then as many as the stream failures after which a watch
/// long-polls instead — while its event stream is fine: the node streams from the copy's
/// version and takes a new release from the stream, and never long-polls.
#[tokio::test]
async fn a_failed_copy_check_does_not_switch_a_healthy_stream_to_long_poll() {
    let key = ed25519("k1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 5, vec![plain("a", "5")]))).await;
    g.only_newer.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    drop(
        Client::start(config(vec![url.clone()], dir.path()))
            .await
            .unwrap(),
    );

    // one failed read for the start, three (SSE_FAILURES_BEFORE_POLL) for the checks
    g.failing_reads.store(1 + 3, Ordering::SeqCst);
    let client = Client::start(config(vec![url], dir.path())).await.unwrap();
    assert_eq!((client.origin(), client.version()), (Origin::Disk, 5));
    let streamed = tokio::time::timeout(DEADLINE, async {
        while g.resume_ids.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        streamed.is_ok(),
        "no event stream was opened from the copy; long-polls instead: {}, failed reads left: {}",
        g.polls.load(Ordering::SeqCst),
        g.failing_reads.load(Ordering::SeqCst)
    );
    // the check runs beside the stream, not before it
    until("the copy was checked (and the check failed)", || {
        g.failing_reads.load(Ordering::SeqCst) < 3
    })
    .await;
    let mut status = client.subscribe_status();
    tokio::time::timeout(
        DEADLINE,
        status.wait_for(|s| s.connected && s.last_contact > s.last_error_at),
    )
    .await
    .expect("the watch is not reported failing")
    .unwrap();

    g.current
        .send_replace(Some(signed(&key, 6, vec![plain("a", "6")])));
    wait_for_version(&client, 6).await;
    assert_eq!(client.origin(), Origin::Gateway);
    assert_eq!(g.polls.load(Ordering::SeqCst), 0, "it never long-polled");
    assert_eq!(
        g.resume_ids.lock().unwrap().first().map(String::as_str),
        Some("5"),
        "the stream resumed from the copy's version"
    );
}

/// A check of the copy that cannot conclude is repeated on a backoff of its own, not
/// before every round. Here a stale gateway instance serves an older release and its JWKS
/// does not list the key the copy is signed by, so every check reads a snapshot, fetches
/// the JWKS and leaves the copy the floor; and it long-polls with a short hold, so rounds
/// come every ~150 ms. The reads and JWKS fetches stay within what the check's backoff
/// allows (its waits are at least half its step, which doubles from `backoff_initial` to
/// `backoff_max`), the check is still made, and the watch goes on from the copy: a newer
/// release is taken once the key is listed.
#[tokio::test]
async fn a_copy_check_that_cannot_conclude_backs_off_while_the_watch_goes_on() {
    let old = ed25519("k-old");
    let new = es256("k-new");
    let (g, url, _server) = start_gateway(&old, Some(signed(&new, 5, vec![plain("a", "5")]))).await;
    g.jwks.lock().unwrap().push(new.jwk.clone());
    let dir = tempfile::tempdir().unwrap();
    drop(
        Client::start(config(vec![url.clone()], dir.path()))
            .await
            .unwrap(),
    );

    *g.jwks.lock().unwrap() = vec![old.jwk.clone()];
    g.current
        .send_replace(Some(signed(&old, 3, vec![plain("a", "3")])));
    g.stream.store(false, Ordering::SeqCst);
    *g.poll_hold.lock().unwrap() = Duration::from_millis(100);
    let mut cfg = config(vec![url], dir.path());
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_secs(2);
    let client = Client::start(cfg).await.unwrap();
    assert_eq!((client.origin(), client.version()), (Origin::Disk, 5));
    let began = tokio::time::Instant::now();
    let (reads, jwks, polls) = (
        g.read_queries.lock().unwrap().len(),
        g.jwks_fetches.load(Ordering::SeqCst),
        g.polls.load(Ordering::SeqCst),
    );
    until("30 long-polls were answered", || {
        g.polls.load(Ordering::SeqCst) >= polls + 30
    })
    .await;
    let elapsed = began.elapsed();
    let reads = g.read_queries.lock().unwrap().len() - reads;
    let jwks = g.jwks_fetches.load(Ordering::SeqCst) - jwks;
    let polls = g.polls.load(Ordering::SeqCst) - polls;
    // the first check, six steps from 50 ms to 2 s (their waits at least 25 ms … 800 ms,
    // 1.575 s in all), then one per second at most; one more for the poll under way
    let allowed = 1 + 6 + usize::try_from(elapsed.as_secs()).unwrap() + 1;
    assert!(
        reads <= allowed,
        "{reads} snapshot reads in {elapsed:?} of {polls} long-polls: the copy check's \
         backoff allows {allowed}"
    );
    assert!(
        jwks <= allowed,
        "{jwks} JWKS fetches in {elapsed:?} of {polls} long-polls: the copy check's \
         backoff allows {allowed}"
    );
    assert!(reads >= 2, "the check is made again: {reads} reads");
    assert_eq!((client.origin(), client.version()), (Origin::Disk, 5));

    g.jwks.lock().unwrap().push(new.jwk.clone());
    g.current
        .send_replace(Some(signed(&new, 6, vec![plain("a", "6")])));
    wait_for_version(&client, 6).await;
    assert_eq!(client.origin(), Origin::Gateway);
}

/// A copy altered to a version no gateway has does not hold the node for the life of a
/// stream. Here the copy's version was raised on disk, and both gateways fail their
/// snapshot reads at start, so the node starts from it; gateway A then fails every read,
/// B the next one only (whichever gateway the first check goes to, it fails), while both
/// keep event streams open that send nothing (they only send releases newer than the
/// copy's). The check is made again on its own backoff while the stream stays open, each
/// time on the next gateway, so B settles it within a few steps: the node takes B's
/// release, and its stream is reopened from that release, so a newer one arrives.
#[tokio::test]
async fn a_copy_altered_to_a_version_no_gateway_has_is_checked_on_another_gateway_during_a_stream()
{
    let key = ed25519("k1");
    let release = || Some(signed(&key, 3, vec![plain("a", "3")]));
    let (a, url_a, _server_a) = start_gateway(&key, release()).await;
    let (b, url_b, _server_b) = start_gateway(&key, release()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut raised = signed(&key, 5, vec![plain("a", "forged")]);
    raised.version = 900;
    std::fs::write(
        dir.path().join("prod__orders.json"),
        serde_json::to_vec(&raised).unwrap(),
    )
    .unwrap();
    for g in [&a, &b] {
        g.only_newer.store(true, Ordering::SeqCst);
    }
    a.failing_reads.store(usize::MAX, Ordering::SeqCst);
    // the start's read, and the first check's if it goes to B
    b.failing_reads.store(2, Ordering::SeqCst);

    let client = Client::start(config(vec![url_a, url_b], dir.path()))
        .await
        .unwrap();
    assert_eq!((client.origin(), client.version()), (Origin::Disk, 900));
    until("a stream is open from the copy's version", || {
        [&a, &b]
            .iter()
            .any(|g| g.resume_ids.lock().unwrap().iter().any(|id| id == "900"))
    })
    .await;
    until("the node takes the gateways' release", || {
        client.origin() == Origin::Gateway
    })
    .await;
    assert_eq!(client.version(), 3);
    assert_eq!(client.get_str("a").as_deref(), Some("3"));
    assert_eq!(copy_version(dir.path()), 3, "the altered copy was replaced");
    assert_eq!(
        b.failing_reads.load(Ordering::SeqCst),
        0,
        "B's read settled the check (A fails every read)"
    );

    // the stream resumed from the altered version is reopened from the release taken
    for g in [&a, &b] {
        g.current
            .send_replace(Some(signed(&key, 4, vec![plain("a", "4")])));
    }
    wait_for_version_exactly(&client, 4).await;
    assert_eq!(client.origin(), Origin::Gateway);
    let status = client.watch_status();
    assert!(
        status.connected && status.last_contact > status.last_error_at,
        "the watch is not reported failing: {status:?}"
    );
}

/// A check of the copy on a gateway that hangs does not hold up the watch. Here the
/// gateway fails its snapshot read at start, so the node starts from its copy, then holds
/// every read longer than the test waits (and the node's request timeout is as long),
/// while its event stream is fine: the stream opens while the check's read hangs, and a
/// new release comes on it.
#[tokio::test]
async fn a_copy_check_on_a_gateway_that_hangs_does_not_hold_up_the_watch() {
    let key = ed25519("k1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 5, vec![plain("a", "5")]))).await;
    g.only_newer.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    drop(
        Client::start(config(vec![url.clone()], dir.path()))
            .await
            .unwrap(),
    );

    g.failing_reads.store(1, Ordering::SeqCst);
    *g.read_hold.lock().unwrap() = DEADLINE * 3;
    let mut cfg = config(vec![url], dir.path());
    cfg.request_timeout = DEADLINE * 3;
    let reads = g.read_queries.lock().unwrap().len();
    let client = Client::start(cfg).await.unwrap();
    assert_eq!((client.origin(), client.version()), (Origin::Disk, 5));
    until("a stream is open while the check's read hangs", || {
        !g.resume_ids.lock().unwrap().is_empty()
            && g.read_queries.lock().unwrap().len() >= reads + 2
    })
    .await;

    g.current
        .send_replace(Some(signed(&key, 6, vec![plain("a", "6")])));
    wait_for_version(&client, 6).await;
    assert_eq!(client.origin(), Origin::Gateway);
}

/// A key withdrawn from the JWKS (an emergency rotation) stops verifying releases once
/// the JWKS's `max-age` has passed, though the client fetched it while the key was listed.
#[tokio::test]
async fn a_key_withdrawn_from_jwks_is_no_longer_trusted_once_its_max_age_has_passed() {
    let k1 = ed25519("k1");
    let k2 = es256("k2");
    let (g, url, _server) = start_gateway(&k1, Some(signed(&k1, 1, vec![plain("a", "1")]))).await;
    g.jwks.lock().unwrap().push(k2.jwk.clone());
    *g.jwks_max_age.lock().unwrap() = Some(1);
    let dir = tempfile::tempdir().unwrap();
    let client = Client::start(config(vec![url], dir.path())).await.unwrap();
    assert_eq!(client.version(), 1);
    let seen = record_versions(&client);

    // k1 is withdrawn; past the shortest time the client keeps a JWKS, a release signed
    // by it is refused
    *g.jwks.lock().unwrap() = vec![k2.jwk.clone()];
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    g.current
        .send_replace(Some(signed(&k1, 2, vec![plain("a", "2")])));
    until("release 2 was sent", || g.sent.lock().unwrap().contains(&2)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    g.current
        .send_replace(Some(signed(&k2, 3, vec![plain("a", "3")])));
    wait_for_version(&client, 3).await;
    assert!(
        !seen.lock().unwrap().contains(&2),
        "a release signed by the withdrawn key was taken: {:?}",
        seen.lock().unwrap()
    );
}

/// Watches start at a random gateway, so that nodes started together (a deployment, or
/// all of them after a gateway restart) do not all stream from the first one.
#[tokio::test]
async fn watches_spread_over_the_gateways() {
    let key = ed25519("k1");
    let (a, url_a, _server_a) =
        start_gateway(&key, Some(signed(&key, 1, vec![plain("a", "1")]))).await;
    let (b, url_b, _server_b) =
        start_gateway(&key, Some(signed(&key, 1, vec![plain("a", "1")]))).await;
    let dir = tempfile::tempdir().unwrap();
    let mut clients = Vec::new();
    for _ in 0..16 {
        let cfg = config(vec![url_a.clone(), url_b.clone()], dir.path());
        clients.push(Client::start(cfg).await.unwrap());
    }
    until("every client watches", || {
        a.resume_ids.lock().unwrap().len() + b.resume_ids.lock().unwrap().len() >= 16
    })
    .await;
    let (on_a, on_b) = (
        a.resume_ids.lock().unwrap().len(),
        b.resume_ids.lock().unwrap().len(),
    );
    assert!(on_a > 0 && on_b > 0, "watches on a: {on_a}, on b: {on_b}");
}

/// The node can tell that its watch fails, and when it last heard from a gateway.
#[tokio::test]
async fn the_watch_status_shows_failures_and_the_last_contact() {
    let key = ed25519("k1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 1, vec![plain("a", "1")]))).await;
    let dir = tempfile::tempdir().unwrap();
    let client = Client::start(config(vec![url], dir.path())).await.unwrap();
    let started = client.watch_status();
    assert!(started.last_contact.is_some(), "{started:?}");
    assert_eq!(started.last_error, None);
    let mut status = client.subscribe_status();
    let connected = |s: &WatchStatus| {
        s.connected && s.last_contact > s.last_error_at && s.last_contact > started.last_contact
    };
    tokio::time::timeout(DEADLINE, status.wait_for(connected))
        .await
        .unwrap()
        .unwrap();

    // the gateway goes away: the open stream ends, reconnecting fails
    g.down.store(true, Ordering::SeqCst);
    g.epoch.fetch_add(1, Ordering::SeqCst);
    g.current.send_modify(|_| {});
    let failing = tokio::time::timeout(
        DEADLINE,
        status.wait_for(|s| {
            !s.connected
                && s.last_error_at > s.last_contact
                && s.last_error.as_deref().is_some_and(|e| e.contains("503"))
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();

    // and comes back
    g.down.store(false, Ordering::SeqCst);
    let recovered = tokio::time::timeout(DEADLINE, status.wait_for(connected))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!(
        recovered.last_error, failing.last_error,
        "the last failure is kept"
    );
}

/// A long-poll is given up once the configured long-poll timeout (plus the request
/// timeout) has passed, not after a fixed time.
#[tokio::test]
async fn a_long_poll_is_given_up_after_the_configured_timeout() {
    let key = ed25519("k1");
    let (g, url, _server) = start_gateway(&key, Some(signed(&key, 1, vec![plain("a", "1")]))).await;
    // the test gateway holds a long-poll 30 s
    g.stream.store(false, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(vec![url], dir.path());
    cfg.long_poll_timeout = Duration::from_millis(300);
    cfg.request_timeout = Duration::from_secs(1);
    let client = Client::start(cfg).await.unwrap();
    let mut status = client.subscribe_status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("timed out"))
        }),
    )
    .await
    .expect("the long-poll was given up")
    .unwrap();
    assert!(g.polls.load(Ordering::SeqCst) > 0);
}
