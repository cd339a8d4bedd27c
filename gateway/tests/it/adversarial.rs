//! The adversarial suite: what an attacker sends, against a real listener, and what must
//! hold whatever they send. Forged and foreign tokens, identity headers in every
//! spelling and framing, `X-Forwarded-For` chains, request smuggling shapes, slow and
//! idle clients, oversized requests, and a whole session whose logs must hold none of
//! the secrets it used.
//!
//! Threats already covered elsewhere are not repeated here; docs/security.md maps every
//! threat to its tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use harness::Redis;
use keyrotation::Clock as _;
use portcullis::config::{Config, RedisConfig};
use reqwest::StatusCode;
use rustls::pki_types::ServerName;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::proxy::{AdminNode, Seen, proxy_to};
use super::support::*;

// === helpers ===

/// The claims of a token that would pass every check at `app` but the one under test.
fn claims(app: &TestApp, scope: &str) -> Value {
    let now = app.state.keys.now().unix_timestamp();
    json!({
        "iss": app.state.config.issuer(),
        "sub": "executor-orders",
        "aud": app.state.config.issuer(),
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "jti": uuid::Uuid::new_v4().to_string(),
        "scope": scope,
        "client_id": "executor-orders",
    })
}

/// A compact JWS with exactly this header, signed by `sign` over `header.payload`.
fn jws(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = sign(signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// An ES256 key of the attacker's own.
struct AttackerKey {
    key: EcdsaKeyPair,
    rng: aws_lc_rs::rand::SystemRandom,
}

impl AttackerKey {
    fn new() -> Self {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        Self { key, rng }
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(&self.rng, message).unwrap().as_ref().to_vec()
    }

    /// Its public key as a JWK carrying `kid`.
    fn jwk(&self, kid: &str) -> Value {
        let point = self.key.public_key().as_ref();
        json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        })
    }
}

/// The HMAC JWS algorithm `alg` (HS256, HS384, HS512) keyed with `secret`: a tag a
/// verifier that trusted the header's `alg` would accept.
fn hmac_for(alg: &str, secret: &[u8]) -> impl Fn(&[u8]) -> Vec<u8> + use<> {
    let algorithm = match alg {
        "HS256" => aws_lc_rs::hmac::HMAC_SHA256,
        "HS384" => aws_lc_rs::hmac::HMAC_SHA384,
        "HS512" => aws_lc_rs::hmac::HMAC_SHA512,
        other => panic!("not an HMAC JWS algorithm: {other}"),
    };
    let key = aws_lc_rs::hmac::Key::new(algorithm, secret);
    move |m| aws_lc_rs::hmac::sign(&key, m).as_ref().to_vec()
}

/// The encodings of a P-256 public key an HS256-confusion attack tries as the HMAC
/// secret: the JWK as published, the raw point, SPKI DER and PEM (with and without the
/// final newline).
fn public_key_encodings(jwk: &Value) -> Vec<(String, Vec<u8>)> {
    let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
    let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
    let mut point = vec![4u8];
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    // SubjectPublicKeyInfo for id-ecPublicKey / prime256v1
    let mut spki = hex_bytes("3059301306072a8648ce3d020106082a8648ce3d030107034200");
    spki.extend_from_slice(&point);
    let body = STANDARD.encode(&spki);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----",
        lines.join("\n")
    );
    vec![
        ("jwk".to_owned(), jwk.to_string().into_bytes()),
        ("point".to_owned(), point),
        ("spki der".to_owned(), spki),
        ("pem".to_owned(), pem.clone().into_bytes()),
        ("pem + newline".to_owned(), format!("{pem}\n").into_bytes()),
    ]
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// A TCP listener that only counts who connects to it: a key URL the gateway must never
/// fetch.
struct Tripwire {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Tripwire {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Self { addr, hits, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Tripwire {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn bearer_status(app: &TestApp, token: &str) -> StatusCode {
    app.https_client()
        .get(app.url("/api/registry"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

/// Writes `request` on a fresh TLS connection and reads until the server closes it.
/// Returns what came back and whether the server closed within 10 s.
async fn raw(app: &TestApp, request: &[u8]) -> (String, bool) {
    let mut tls = app.tls().await;
    tls.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await;
    (String::from_utf8_lossy(&buf).into_owned(), read.is_ok())
}

/// The status code of the first response in `answer`, 0 for none.
fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

fn assert_nothing_from_mallory(seen: &[Seen]) {
    for s in seen {
        for (name, values) in &s.headers {
            assert!(
                !name.contains("mallory") && values.iter().all(|v| !v.contains("mallory")),
                "{name}: {values:?} reached the node ({} {})",
                s.method,
                s.path
            );
        }
    }
}

// === tokens ===

#[tokio::test]
async fn forged_and_foreign_tokens_are_refused_and_never_reach_an_admin_node() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let tripwire = Tripwire::start().await;
    let scope = "scheduler:executor";

    // the route works: a token of ours reaches the node
    let good = app.state.keys.sign(&claims(&app, scope)).unwrap();
    assert_eq!(bearer_status(&app, &good).await, StatusCode::OK);
    let our_header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(good.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    let our_kid = our_header["kid"].as_str().unwrap().to_owned();
    let body = claims(&app, scope);
    let mut forged: Vec<(String, String)> = Vec::new();

    // alg none, in several spellings, with our kid, with and without a signature
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = json!({ "alg": alg, "kid": our_kid, "typ": "JWT" });
        forged.push((format!("alg {alg}"), jws(&header, &body, |_| Vec::new())));
        let signed = jws(&header, &body, |_| b"signature".to_vec());
        forged.push((format!("alg {alg} with a signature"), signed));
    }

    // HS256 keyed with our published public key, in every encoding
    let jwks: Value = app
        .https_client()
        .get(app.url("/oauth2/jwks"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let published = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == our_kid.as_str())
        .unwrap()
        .clone();
    for (encoding, secret) in public_key_encodings(&published) {
        for alg in ["HS256", "HS384", "HS512"] {
            let header = json!({ "alg": alg, "kid": our_kid, "typ": "JWT" });
            // each with the tag of its own algorithm, valid for a verifier that took the
            // header's word for it and the public key as the secret
            let token = jws(&header, &body, hmac_for(alg, &secret));
            let tag = URL_SAFE_NO_PAD
                .decode(token.rsplit_once('.').unwrap().1)
                .unwrap();
            assert_eq!(
                tag.len() * 8,
                alg[2..].parse::<usize>().unwrap(),
                "{alg} tag"
            );
            forged.push((format!("{alg} keyed with the {encoding}"), token));
        }
    }

    // the attacker's own key, under unknown and path-like key ids
    let attacker = AttackerKey::new();
    for kid in [
        "attacker-key",
        "../../../../etc/passwd",
        "/dev/null",
        "..\\..\\keyring.json",
        "keyring.json",
        "file:///etc/passwd",
        "%2e%2e%2fkeyring.json",
        "' OR '1'='1",
        "",
    ] {
        let header = json!({ "alg": "ES256", "kid": kid, "typ": "JWT" });
        forged.push((
            format!("attacker key as kid {kid:?}"),
            jws(&header, &body, |m| attacker.sign(m)),
        ));
    }
    // no kid at all
    forged.push((
        "attacker key without kid".to_owned(),
        jws(&json!({ "alg": "ES256" }), &body, |m| attacker.sign(m)),
    ));

    // the attacker's key offered in the header: by URL (jku, x5u) and inline (jwk, x5c),
    // under our own kid and under its own
    for kid in [our_kid.as_str(), "attacker-key"] {
        let offers = [
            ("jku", json!(tripwire.url("/jwks.json"))),
            ("x5u", json!(tripwire.url("/cert.pem"))),
            ("jwk", attacker.jwk(kid)),
            ("x5c", json!([STANDARD.encode(b"not even a certificate")])),
        ];
        for (member, value) in offers {
            let mut header = json!({ "alg": "ES256", "kid": kid, "typ": "JWT" });
            header[member] = value;
            forged.push((
                format!("{member} header with kid {kid}"),
                jws(&header, &body, |m| attacker.sign(m)),
            ));
        }
    }

    // our own key, but another issuer
    let mut other_issuer = claims(&app, scope);
    other_issuer["iss"] = json!("https://portcullis.attacker.example");
    forged.push((
        "another issuer".to_owned(),
        app.state.keys.sign(&other_issuer).unwrap(),
    ));

    // a token of another environment: an instance configured the same way (same issuer
    // URL) with a key ring of its own, as staging next to production
    let staging = spawn_app(|c| proxy_to(c, &[&node])).await;
    assert_eq!(staging.state.config.issuer(), app.state.config.issuer());
    let from_staging = staging.state.keys.sign(&claims(&staging, scope)).unwrap();
    assert_eq!(
        bearer_status(&staging, &from_staging).await,
        StatusCode::OK,
        "staging takes its own token"
    );
    forged.push(("a token of another environment".to_owned(), from_staging));

    for (what, token) in &forged {
        assert_eq!(
            bearer_status(&app, token).await,
            StatusCode::UNAUTHORIZED,
            "{what} was not refused"
        );
    }
    assert_eq!(
        node.seen().len(),
        2,
        "only the two genuine requests reached the node"
    );
    assert_eq!(
        tripwire.hits.load(Ordering::SeqCst),
        0,
        "a key URL from a token header was fetched"
    );
}

// === identity headers ===

#[tokio::test]
async fn identity_headers_in_any_spelling_or_framing_never_reach_an_admin_node() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;

    // names hyper accepts: forwarded after stripping, without them
    let accepted = [
        "X-PORTCULLIS-USER: mallory",
        "x-portcullis-user: mallory\r\nX-Portcullis-User: mallory",
        "X_PORTCULLIS_USER: mallory",
        "x_portcullis_roles: mallory",
        "X-Portcullis-Scopes: mallory",
        "X-Forwarded-Preferred-Username: mallory",
        "X-Auth-Request-Preferred-Username: mallory",
        "X-WebAuth-User: mallory",
        "X-Remote-Group: mallory",
        "Remote_User: mallory",
        "X-Client-IP: mallory",
        "Forwarded: for=mallory;by=mallory;host=mallory",
        "X-Portcullis-User:mallory",
        "X-Portcullis-User:   mallory   ",
    ];
    // malformed lines that would smuggle a name past a lax parser: refused outright
    let refused = [
        "X-Portcullis-User : mallory",
        "X-Portcullis-User\t: mallory",
        "X-Note: fine\r\n X-Portcullis-User: mallory",
        "X-Note: fine\r\n\tX-Portcullis-User: mallory",
        " X-Portcullis-User: mallory",
        "X-Portcullis-User;: mallory",
        "X-Portcullis-User mallory",
    ];
    for (lines, expected) in accepted
        .iter()
        .map(|l| (l, 200))
        .chain(refused.iter().map(|l| (l, 400)))
    {
        let request = format!(
            "GET /public/id HTTP/1.1\r\nHost: localhost\r\n{lines}\r\nConnection: close\r\n\r\n"
        );
        let (answer, closed) = raw(&app, request.as_bytes()).await;
        assert!(closed, "{lines:?}: the connection stayed open");
        assert_eq!(status_of(&answer), expected, "{lines:?}: {answer}");
    }
    assert_eq!(node.seen().len(), accepted.len());

    // naming our identity headers in Connection does not make the gateway drop the ones
    // it sets itself
    let token = app
        .state
        .keys
        .sign(&claims(&app, "scheduler:executor"))
        .unwrap();
    let request = format!(
        "GET /api/registry HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         X-Portcullis-User: mallory\r\n\
         Connection: close, X-Portcullis-User, X-Portcullis-Scopes, X-Forwarded-For\r\n\r\n"
    );
    let (answer, _) = raw(&app, request.as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let seen = node.seen();
    let api = seen.last().unwrap();
    assert_eq!(api.header("x-portcullis-user"), Some("executor-orders"));
    assert_eq!(
        api.header("x-portcullis-scopes"),
        Some("scheduler:executor")
    );
    assert_eq!(api.header("x-forwarded-for"), Some("127.0.0.1"));

    // over HTTP/2 as well
    let mut h2 = app.http2().await;
    for name in ["x-portcullis-user", "x_portcullis_user", "x-forwarded-user"] {
        let req = http::Request::get(app.url("/public/h2"))
            .header(name, "mallory")
            .body(http_body_util::Full::<bytes::Bytes>::default())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
    }
    let seen = node.seen();
    assert_eq!(seen.len(), accepted.len() + 1 + 3);
    assert_nothing_from_mallory(&seen);
}

// === X-Forwarded-For ===

#[tokio::test]
async fn forwarded_for_chains_reach_a_node_as_the_one_address_resolved() {
    let node = AdminNode::start("a").await;
    let behind_nginx = spawn_app(|c| {
        proxy_to(c, &[&node]);
        c.protection.trusted_proxies = vec!["127.0.0.1".to_owned(), "10.0.0.0/8".to_owned()];
    })
    .await;
    let exposed = spawn_app(|c| proxy_to(c, &[&node])).await;

    let cases: [(&TestApp, &str, &str); 8] = [
        // a spoofed leftmost entry, the client nginx saw, an inner proxy
        (
            &behind_nginx,
            "X-Forwarded-For: 6.6.6.6, 198.51.100.7, 10.1.2.3",
            "198.51.100.7",
        ),
        // several lines are one list
        (
            &behind_nginx,
            "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 198.51.100.8",
            "198.51.100.8",
        ),
        (
            &behind_nginx,
            "X-Forwarded-For: [2001:db8::7]:4711",
            "2001:db8::7",
        ),
        (
            &behind_nginx,
            "X-Forwarded-For: ::ffff:198.51.100.9",
            "198.51.100.9",
        ),
        // an entry that is no address stops the walk at the last one believed
        (
            &behind_nginx,
            "X-Forwarded-For: 198.51.100.1, mallory",
            "127.0.0.1",
        ),
        // every hop trusted: the leftmost one we could read
        (
            &behind_nginx,
            "X-Forwarded-For: 10.9.9.9, 10.1.1.1",
            "10.9.9.9",
        ),
        // from a peer that is no trusted proxy, nothing a client says is believed
        (&exposed, "X-Forwarded-For: 198.51.100.7", "127.0.0.1"),
        (
            &exposed,
            "X-Real-IP: 198.51.100.7\r\nForwarded: for=198.51.100.7",
            "127.0.0.1",
        ),
    ];
    for (i, (app, lines, expected)) in cases.iter().enumerate() {
        let request = format!(
            "GET /public/xff-{i} HTTP/1.1\r\nHost: localhost\r\n{lines}\r\nConnection: close\r\n\r\n"
        );
        let (answer, _) = raw(app, request.as_bytes()).await;
        assert_eq!(status_of(&answer), 200, "{lines}: {answer}");
        let seen = node.seen();
        let s = seen
            .iter()
            .find(|s| s.path == format!("/public/xff-{i}"))
            .unwrap();
        assert_eq!(
            s.headers.get("x-forwarded-for"),
            Some(&vec![(*expected).to_owned()]),
            "{lines}"
        );
        assert!(!s.headers.contains_key("x-real-ip") && !s.headers.contains_key("forwarded"));
    }
}

// === request smuggling ===

#[tokio::test]
async fn conflicting_or_malformed_framing_never_smuggles_a_second_request() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    const SMUGGLED: &str = "GET /public/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let head = "POST /public/upload HTTP/1.1\r\nHost: localhost\r\n";

    // refused: 400, and the connection closed without reading on
    let refused: Vec<(&str, String)> = vec![
        (
            "two different Content-Lengths",
            format!("{head}Content-Length: 5\r\nContent-Length: 50\r\n\r\nhello{SMUGGLED}"),
        ),
        (
            "a list as Content-Length",
            format!("{head}Content-Length: 5, 50\r\n\r\nhello{SMUGGLED}"),
        ),
        (
            "a signed Content-Length",
            format!("{head}Content-Length: +5\r\n\r\nhello{SMUGGLED}"),
        ),
        (
            "a hexadecimal Content-Length",
            format!("{head}Content-Length: 0x5\r\n\r\nhello{SMUGGLED}"),
        ),
        (
            "a Transfer-Encoding that does not end in chunked",
            format!(
                "{head}Transfer-Encoding: chunked, identity\r\nContent-Length: 5\r\n\r\nhello{SMUGGLED}"
            ),
        ),
        (
            "an unknown Transfer-Encoding",
            format!("{head}Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "Transfer-Encoding with a space before the colon",
            format!(
                "{head}Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello{SMUGGLED}"
            ),
        ),
        (
            "Transfer-Encoding folded onto a second line",
            format!(
                "{head}Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\nhello{SMUGGLED}"
            ),
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            format!(
                "POST /public/upload HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "a chunk size that overflows",
            format!(
                "{head}Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nhello\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
    ];
    for (what, request) in &refused {
        let (answer, closed) = raw(&app, request.as_bytes()).await;
        assert_eq!(status_of(&answer), 400, "{what}: {answer}");
        assert!(closed, "{what}: the connection stayed open");
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            1,
            "{what}: more than one answer: {answer}"
        );
    }

    // Content-Length and Transfer-Encoding together (either order): RFC 9112 §6.3 lets a
    // server go by Transfer-Encoding alone and then close; the bytes after the chunked
    // body are never read as a request
    for (what, request) in [
        (
            "Content-Length before Transfer-Encoding",
            format!(
                "{head}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "Transfer-Encoding before Content-Length",
            format!(
                "{head}Transfer-Encoding: chunked\r\nContent-Length: 60\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
    ] {
        let (answer, closed) = raw(&app, request.as_bytes()).await;
        assert!(closed, "{what}: the connection stayed open");
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            1,
            "{what}: more than one answer: {answer}"
        );
        // answered by the node (its chunked body was empty), and closed after
        assert_eq!(status_of(&answer), 200, "{what}: {answer}");
        assert!(
            answer.contains("\r\nconnection: close\r\n"),
            "{what}: {answer}"
        );
    }

    let seen = node.seen();
    assert!(
        seen.iter().all(|s| !s.path.contains("smuggled")),
        "a smuggled request reached the node: {:?}",
        seen.iter().map(|s| &s.path).collect::<Vec<_>>()
    );
    // what did reach it came with its own body and nothing after it
    for s in &seen {
        assert_eq!(s.path, "/public/upload");
        assert!(s.body.is_empty(), "{:?}", String::from_utf8_lossy(&s.body));
    }
}

// === slow, idle and oversized clients ===

#[tokio::test]
async fn a_client_that_stops_sending_its_body_is_cut_off_while_others_are_served() {
    let app = spawn_app(|c| {
        c.server.request_timeout = Duration::from_secs(1);
        c.config_center.long_poll_timeout = Duration::from_millis(500);
        c.proxy.read_timeout = Duration::from_millis(500);
    })
    .await;
    let mut slow = app.tls().await;
    slow.write_all(
        b"POST /oauth2/token HTTP/1.1\r\nHost: localhost\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n\
          grant_type=",
    )
    .await
    .unwrap();

    let mut good = Conn::over(app.tls().await).await;
    assert_eq!(good.get("/").await.unwrap().0.status, 200);

    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server never closed the stalled upload");
    let answer = String::from_utf8_lossy(&buf);
    assert_eq!(
        status_of(&answer),
        408,
        "unexpected answer to a stalled upload: {answer}"
    );
    // and the request is counted with that status, by its route
    let metrics = app.metrics().await;
    assert!(counted(&metrics, "/oauth2/token", 408), "{metrics}");
}

/// A request whose client goes away before the answer is counted as 499 (nginx's
/// "client closed request"), by its route: counting only answered requests hid it.
#[tokio::test]
async fn a_request_its_client_abandons_is_counted_as_499() {
    // an admin node that reads a request, says so, and never answers
    let node = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node_addr = node.local_addr().unwrap();
    let (arrived, mut arrivals) = tokio::sync::mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let (mut socket, _) = node.accept().await.unwrap();
        let mut buf = vec![0u8; 8192];
        let _ = socket.read(&mut buf).await;
        let _ = arrived.send(()).await;
        while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let app = spawn_app(|c| {
        c.proxy.upstreams = vec![format!("http://{node_addr}")];
        c.proxy.routes = super::proxy::routes();
        c.proxy.read_timeout = Duration::from_secs(20);
    })
    .await;
    let mut tls = app.tls().await;
    tls.write_all(b"GET /public/hangs HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    // the request is under way (the node has it); then the client leaves
    tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
        .await
        .expect("the request reached the node");
    drop(tls);
    eventually(
        Duration::from_secs(10),
        "the abandoned request is counted as 499",
        || async { counted(&app.metrics().await, "proxy:/public/", 499) },
    )
    .await;
}

async fn watch(app: &TestApp, token: &str) -> reqwest::Response {
    let resp = app
        .https_client()
        .get(app.url("/config/v1/prod/executor-orders/watch"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    resp
}

#[tokio::test]
async fn idle_watchers_cannot_hold_more_than_the_connection_limit() {
    const LIMIT: usize = 8;
    let app = spawn_app(|c| c.server.max_connections = LIMIT).await;
    let token = app
        .state
        .keys
        .sign(&claims(&app, "config:read:prod"))
        .unwrap();
    let mut watchers = Vec::new();
    for _ in 0..LIMIT {
        watchers.push(watch(&app, &token).await);
    }

    // one more client waits for a free connection: it is not served, nor is it refused
    let pki = app.pki.client_config();
    let addr = app.https;
    let mut waiting = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(pki)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut conn = Conn::over(tls).await;
        conn.get("/").await.unwrap().0.status
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), &mut waiting)
            .await
            .is_err(),
        "a connection past the limit was served"
    );
    // the admin listener is not part of the limit: health and metrics still answer
    let health = reqwest::get(format!("http://{}/healthz", app.admin))
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    // one watcher leaves: the waiting client gets its connection and is served
    drop(watchers.pop());
    let status = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting client was served once a watcher left")
        .unwrap();
    assert_eq!(status, 200);
}

/// One client address cannot take every connection with watches: past
/// `config_center.max_watches_per_client` a watch is refused with 429 (while other
/// requests from it are still served), and a closed watch frees its slot.
#[tokio::test]
async fn one_address_holds_at_most_its_share_of_watches() {
    let app = spawn_app(|c| c.config_center.max_watches_per_client = 2).await;
    let token = app
        .state
        .keys
        .sign(&claims(&app, "config:read:prod"))
        .unwrap();
    let mut watchers = vec![watch(&app, &token).await, watch(&app, &token).await];

    let url = app.url("/config/v1/prod/executor-orders/watch");
    let refused = app
        .https_client()
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "too_many_watches", "{body}");
    // the address is not shut out of anything else
    let read = app
        .https_client()
        .get(app.url("/config/v1/prod/executor-orders"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::NOT_FOUND);

    // a watcher leaves: its slot is free again once the instance sees it go
    drop(watchers.pop());
    eventually(Duration::from_secs(10), "a freed slot is given out", || {
        let (client, url, token) = (app.https_client(), url.clone(), token.clone());
        async move {
            let r = client.get(&url).bearer_auth(&token).send().await.unwrap();
            let ok = r.status() == StatusCode::OK;
            if ok {
                // keep the stream from outliving the probe
                drop(r);
            }
            ok
        }
    })
    .await;
}

#[tokio::test]
async fn too_many_headers_and_an_oversized_chunked_body_are_refused() {
    let app = spawn_app(|c| c.server.max_body_bytes = 1024).await;

    // many small headers, the whole head well under the byte limit
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!("GET / HTTP/1.1\r\nHost: localhost\r\n{many}\r\n");
    let (answer, closed) = raw(&app, request.as_bytes()).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert!(closed);

    // a chunked body (no Content-Length to check up front) past the limit
    let chunk = format!("200\r\n{}\r\n", "a".repeat(0x200));
    let request = format!(
        "POST /oauth2/token HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n{}0\r\n\r\n",
        chunk.repeat(8)
    );
    let (answer, _) = raw(&app, request.as_bytes()).await;
    assert_eq!(status_of(&answer), 413, "{answer}");

    // and a normal client is still served
    let mut good = Conn::over(app.tls().await).await;
    assert_eq!(good.get("/").await.unwrap().0.status, 200);
}

// === hostile config values ===

#[tokio::test]
async fn a_yaml_value_that_expands_without_bound_is_refused_and_nothing_is_stored() {
    let app = spawn_app(|_| {}).await;
    let token = app
        .state
        .keys
        .sign(&claims(&app, "config:read:prod config:write:prod"))
        .unwrap();
    // "billion laughs": each level names the previous one nine times, 9^10 nodes in all
    let mut bomb = String::from("l0: &l0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let p = format!("*l{}", i - 1);
        bomb.push_str(&format!("l{i}: &l{i} [{}]\n", vec![p; 9].join(", ")));
    }
    let path = app.url("/config/v1/prod/executor-orders");
    let started = std::time::Instant::now();
    let resp = app
        .https_client()
        .put(&path)
        .bearer_auth(&token)
        .json(&json!({ "entries": [{ "key": "laughs", "value": bomb, "format": "yaml" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request", "{body}");
    // a guard, not a benchmark: expanding the value takes minutes and gigabytes
    assert!(started.elapsed() < Duration::from_secs(10));
    let read = app
        .https_client()
        .get(&path)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::NOT_FOUND, "nothing was stored");
}

// === secrets in logs ===

/// Collects every log line of the process.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs [`session_logs_capture`] alone in a process of its own (tracing's interest cache
/// and max level are process-global; see `sso::no_code_state_token_cookie_or_secret…`).
#[test]
fn no_secret_of_a_whole_session_reaches_the_logs_even_at_trace() {
    harness::run_alone("adversarial::session_logs_capture");
}

const ADMIN_TOKEN: &str = "adversarial-admin-token-5b0c81d2e7f4";
const CONFIG_SECRET: &str = "db-password-Zq7W-never-logged";

fn session_config(c: &mut Config, node: &AdminNode, prefix: String) {
    proxy_to(c, &[node]);
    c.redis = Some(RedisConfig {
        url: SecretString::from(Redis::shared().url()),
        cluster: false,
        command_timeout: Duration::from_secs(2),
    });
    c.refresh.key_prefix = prefix;
    c.admin.token = Some(SecretString::from(ADMIN_TOKEN));
}

#[tokio::test]
#[ignore = "run in a process of its own by no_secret_of_a_whole_session_reaches_the_logs_even_at_trace"]
async fn session_logs_capture() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // as the binary does it (telemetry::init_logging): with the `log` bridge, so records
    // of crates that log through `log` (rustls, among others) are captured too
    tracing_subscriber::util::SubscriberInitExt::try_init(subscriber)
        .expect("the only subscriber of this process");

    let node = AdminNode::start("a").await;
    let prefix = format!("session-log-{}:", uuid::Uuid::new_v4());
    // a clock of the test's, to present a rotated refresh token past the reuse grace
    let clock = Arc::new(keyrotation::ManualClock::new(
        time::OffsetDateTime::now_utc(),
    ));
    let app = spawn_app_with_clock(clock.clone(), |c| session_config(c, &node, prefix)).await;
    let http = app.https_client();
    let admin = reqwest::Client::new();
    let mut secrets: Vec<String> = vec![
        ADMIN_TOKEN.to_owned(),
        CONFIG_SECRET.to_owned(),
        // tokens.hash_key of the test configuration
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_owned(),
    ];

    // an ops user registers a service
    let created: Value = admin
        .post(format!("http://{}/admin/clients", app.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({
            "id": "executor-orders",
            "name": "Orders executor",
            "grant_types": ["client_credentials", "refresh_token"],
            "scopes": ["scheduler:executor", "config:read:prod", "config:write:prod"],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = created["secret"].as_str().unwrap().to_owned();
    secrets.push(secret.clone());

    // a wrong secret first (close to the right one), then the right one
    let near_miss = format!("{}x", &secret[..secret.len() - 1]);
    secrets.push(near_miss.clone());
    let refused = post_as_client(
        &http,
        app.url("/oauth2/token"),
        "executor-orders",
        &near_miss,
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let granted: Value = post_as_client(
        &http,
        app.url("/oauth2/token"),
        "executor-orders",
        &secret,
        &[("grant_type", "client_credentials")],
    )
    .await
    .json()
    .await
    .unwrap();
    let access = granted["access_token"].as_str().unwrap().to_owned();
    secrets.push(access.clone());

    // a session for a user of that client (as an SSO login starts one), refreshed with
    // the secret in the body, its rotated token stolen and replayed (reuse detection
    // revokes the family), then its current token revoked
    let issued = app
        .state
        .refresh
        .issue(
            portcullis::refresh::NewFamily {
                client_id: "executor-orders".to_owned(),
                subject: "alice".to_owned(),
                scope: "config:read:prod".to_owned(),
                audience: Vec::new(),
                auth_time: app.state.keys.now(),
                session: json!({ "roles": ["viewer"] }),
            },
            app.state.keys.now(),
        )
        .await
        .unwrap();
    let first = issued.token.expose_secret().to_owned();
    secrets.push(first.clone());
    let refreshed: Value = http
        .post(app.url("/oauth2/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", first.as_str()),
            ("client_id", "executor-orders"),
            ("client_secret", secret.as_str()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let second = refreshed["refresh_token"].as_str().unwrap().to_owned();
    secrets.push(second.clone());
    secrets.push(refreshed["access_token"].as_str().unwrap().to_owned());
    let introspected = post_as_client(
        &http,
        app.url("/oauth2/introspect"),
        "executor-orders",
        &secret,
        &[("token", access.as_str())],
    )
    .await;
    assert_eq!(introspected.status(), StatusCode::OK);
    // the rotated token presented again past the grace window, its family still alive:
    // reuse, the family is revoked and audited
    let grace = app.state.config.refresh.reuse_grace;
    clock.advance(time::Duration::try_from(grace).unwrap() + time::Duration::seconds(1));
    let reuse = post_as_client(
        &http,
        app.url("/oauth2/token"),
        "executor-orders",
        &secret,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", first.as_str()),
        ],
    )
    .await;
    assert_eq!(reuse.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        reuse.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );
    let family = issued.session.family.to_string();
    let db = app.state.db.clone();
    eventually(
        Duration::from_secs(10),
        "a refresh.reuse_detected audit record of the session",
        || {
            let (db, family) = (db.clone(), family.clone());
            async move {
                portcullis::audit::recent(&db, "refresh.reuse_detected", 10)
                    .await
                    .unwrap()
                    .iter()
                    .any(|(actor, target, _)| {
                        actor == "client:executor-orders" && *target == family
                    })
            }
        },
    )
    .await;
    // the current token went with its family
    assert!(
        app.state
            .refresh
            .inspect(&SecretString::from(second.clone()), clock.now())
            .await
            .unwrap()
            .is_none(),
        "the family outlived the reuse"
    );
    let revoked = post_as_client(
        &http,
        app.url("/oauth2/revoke"),
        "executor-orders",
        &secret,
        &[("token", second.as_str())],
    )
    .await;
    assert_eq!(revoked.status(), StatusCode::OK);

    // a secret config value written, then read back by a node with the right
    let path = app.url("/config/v1/prod/executor-orders");
    let written = http
        .put(&path)
        .bearer_auth(&access)
        .json(&json!({
            "entries": [{ "key": "db.password", "value": CONFIG_SECRET, "secret": true }],
            "message": "rotate the database password",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), StatusCode::CREATED);
    let read = http.get(&path).bearer_auth(&access).send().await.unwrap();
    assert!(read.text().await.unwrap().contains(CONFIG_SECRET));

    // a proxied call to the admin cluster
    let proxied = http
        .get(app.url("/api/registry"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), StatusCode::OK);

    // the signing keys, as stored
    let ring: Value = serde_json::from_str(
        &std::fs::read_to_string(app.dir.path().join("keyring.json")).unwrap(),
    )
    .unwrap();
    for key in ring["ring"]["keys"].as_array().unwrap() {
        secrets.push(key["private_key"].as_str().unwrap().to_owned());
    }

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(
        logs.contains("TRACE") && logs.contains("DEBUG"),
        "nothing was captured at trace level"
    );
    // the capture saw the session's requests, so a secret in them would have been seen
    for seen in [
        "/oauth2/token",
        "/oauth2/revoke",
        "/config/v1/prod/executor-orders",
        "/api/registry",
    ] {
        assert!(logs.contains(seen), "no log mentions {seen}");
    }
    for secret in &secrets {
        assert!(secret.len() >= 16, "a real secret: {secret}");
        // also each half, so a truncated or split secret is caught too
        let half = secret.len() / 2;
        for needle in [secret.as_str(), &secret[..half], &secret[half..]] {
            assert!(
                !logs.contains(needle),
                "a secret reached the logs (length {})",
                secret.len()
            );
        }
    }
}
