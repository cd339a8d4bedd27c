//! The reverse proxy to the admin cluster, against admin nodes this test runs (small
//! HTTP/1.1 servers that record what reached them): identity headers, route policy,
//! round robin, passive health, retries, streaming and upgrades.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use portcullis::config::Config;
use portcullis::oauth::claims::{AccessClaims, Audiences};
use portcullis::proxy::settings::{RouteAuth, RouteSettings};
use portcullis::sso::session::{NewSession, SessionInfo};
use reqwest::{StatusCode, header};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::support::*;

// === an admin node ===

/// One request as an admin node saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Every header, lower-case name → values in order.
    pub headers: BTreeMap<String, Vec<String>>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

struct NodeState {
    name: String,
    seen: Mutex<Vec<Seen>>,
    /// 0: answer normally; otherwise the status every plain request gets.
    fail_with: AtomicU16,
    /// Connections accepted, and connections open now.
    accepted: AtomicUsize,
    open: AtomicUsize,
    /// Upgraded (WebSocket) connections the node is echoing on now.
    upgraded: AtomicUsize,
}

/// Counts a node connection open while it lives.
struct OpenConnection(Arc<NodeState>);

impl OpenConnection {
    fn new(state: &Arc<NodeState>) -> Self {
        state.accepted.fetch_add(1, Ordering::SeqCst);
        state.open.fetch_add(1, Ordering::SeqCst);
        Self(state.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A small admin node on a port of its own; `kill` drops its listener and every open
/// connection at once, as a crashed process would.
pub struct AdminNode {
    pub addr: SocketAddr,
    state: Arc<NodeState>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Set for a node served over TLS.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

type NodeBody = BoxBody<Bytes, Infallible>;

impl AdminNode {
    pub async fn start(name: &str) -> Self {
        Self::start_with(name, None).await
    }

    /// A node served over TLS with `tls` (e.g. one that requires client certificates).
    pub async fn start_tls(name: &str, tls: rustls::ServerConfig) -> Self {
        Self::start_with(name, Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))).await
    }

    async fn start_with(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(NodeState {
            name: name.to_owned(),
            seen: Mutex::new(Vec::new()),
            fail_with: AtomicU16::new(0),
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            upgraded: AtomicUsize::new(0),
        });
        let task = Some(accept_loop(listener, state.clone(), tls.clone()));
        Self {
            addr,
            state,
            task,
            tls,
        }
    }

    /// Starts a killed node again on the same address (what the instances were
    /// configured with), keeping what it saw before.
    pub async fn restart(&mut self) {
        self.kill().await;
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                // the old listener's socket may take a moment to be released
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot bind {} again: {e}", self.addr),
            }
        };
        self.task = Some(accept_loop(listener, self.state.clone(), self.tls.clone()));
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn fail_with(&self, status: u16) {
        self.state.fail_with.store(status, Ordering::SeqCst);
    }

    /// TCP connections the node has accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// TCP connections open to the node now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Upgraded connections the node holds open now.
    pub fn upgraded(&self) -> usize {
        self.state.upgraded.load(Ordering::SeqCst)
    }

    /// Stops the node abruptly: listener closed, open connections dropped.
    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Serves every connection `listener` accepts until the returned task is aborted, which
/// also drops the open connections (the join set goes with the task).
fn accept_loop(
    listener: TcpListener,
    state: Arc<NodeState>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counted = OpenConnection::new(&state);
            let state = state.clone();
            let service = hyper::service::service_fn(move |req| serve(state.clone(), req));
            let tls = tls.clone();
            connections.spawn(async move {
                let _counted = counted;
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades()
                            .await;
                    }
                    Some(tls) => {
                        // a client the node's TLS refuses never gets to send a request
                        let Ok(stream) = tls.accept(stream).await else {
                            return;
                        };
                        let _ = http
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades()
                            .await;
                    }
                }
            });
        }
    })
}

impl Drop for AdminNode {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn full(status: StatusCode, name: &str, body: impl Into<Bytes>) -> hyper::Response<NodeBody> {
    hyper::Response::builder()
        .status(status)
        .header("x-node", name)
        .header("content-type", "application/json")
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

/// The bytes of `GET /big?bytes=N`: a pattern the test can recompute.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

async fn serve(
    state: Arc<NodeState>,
    mut req: hyper::Request<Incoming>,
) -> Result<hyper::Response<NodeBody>, Infallible> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    if req.headers().contains_key(header::UPGRADE) {
        state.seen.lock().unwrap().push(Seen {
            method,
            path,
            headers,
            body: Vec::new(),
        });
        let upgrade = hyper::upgrade::on(&mut req);
        let state = state.clone();
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                state.upgraded.fetch_add(1, Ordering::SeqCst);
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                state.upgraded.fetch_sub(1, Ordering::SeqCst);
            }
        });
        return Ok(hyper::Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", "test-node")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap());
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let digest = hex(&Sha256::digest(&body));
    let user = headers
        .get("x-portcullis-user")
        .and_then(|v| v.first())
        .cloned();
    let body_len = body.len();
    state.seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path: path.clone(),
        headers,
        body: if body_len <= 64 * 1024 {
            body.to_vec()
        } else {
            Vec::new()
        },
    });
    if path.starts_with("/public/hang") {
        // a node that took the request and never answers
        std::future::pending::<()>().await;
    }
    if path.starts_with("/public/slow-fail") {
        // a node that takes its time, then says it cannot serve
        tokio::time::sleep(Duration::from_secs(2)).await;
        return Ok(full(
            StatusCode::BAD_GATEWAY,
            &state.name,
            "{\"error\":\"slow and broken\"}",
        ));
    }
    let fail = state.fail_with.load(Ordering::SeqCst);
    if fail != 0 {
        return Ok(full(
            StatusCode::from_u16(fail).unwrap(),
            &state.name,
            "{\"error\":\"node says no\"}",
        ));
    }
    if let Some(ms) = path.strip_prefix("/public/events?quiet_ms=") {
        // an event stream: one event at once, then nothing for `ms`, then a last one
        let quiet = Duration::from_millis(ms.parse().unwrap());
        let first =
            futures::stream::once(async { Ok(Frame::data(Bytes::from("data: first\n\n"))) });
        let last = futures::stream::once(async move {
            tokio::time::sleep(quiet).await;
            Ok(Frame::data(Bytes::from("data: last\n\n")))
        });
        return Ok(hyper::Response::builder()
            .header("x-node", state.name.as_str())
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(StreamBody::new(futures::StreamExt::chain(first, last)).boxed())
            .unwrap());
    }
    if let Some(n) = path.strip_prefix("/api/big?bytes=") {
        let len: usize = n.parse().unwrap();
        let data = Bytes::from(pattern(len));
        let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..len)
            .step_by(64 * 1024)
            .map(|at| Ok(Frame::data(data.slice(at..(at + 64 * 1024).min(len)))))
            .collect();
        return Ok(hyper::Response::builder()
            .header("x-node", state.name.as_str())
            .body(StreamBody::new(futures::stream::iter(chunks)).boxed())
            .unwrap());
    }
    let answer = serde_json::json!({
        "node": state.name,
        // the identity the gateway injected, echoed so a client can check it end to end
        "user": user,
        "method": method,
        "path": path,
        "body_len": body_len,
        "body_sha256": digest,
    });
    Ok(full(StatusCode::OK, &state.name, answer.to_string()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// === the gateway in front ===

pub fn route(prefix: &str, auth: RouteAuth) -> RouteSettings {
    RouteSettings {
        prefix: prefix.to_owned(),
        exact: false,
        methods: None,
        auth,
        scopes: vec![],
        roles: vec![],
    }
}

/// The routes of these tests: executor APIs by bearer token, the console by session
/// (job edits for admins only), a public area.
pub fn routes() -> Vec<RouteSettings> {
    vec![
        RouteSettings {
            scopes: vec!["scheduler:executor".to_owned()],
            ..route("/api/", RouteAuth::Bearer)
        },
        route("/jobinfo/", RouteAuth::Session),
        RouteSettings {
            methods: Some(vec!["POST".to_owned()]),
            roles: vec!["admin".to_owned()],
            ..route("/jobinfo/", RouteAuth::Session)
        },
        route("/public/", RouteAuth::Public),
    ]
}

/// Points `config` at `nodes` with the test routes.
pub fn proxy_to(config: &mut Config, nodes: &[&AdminNode]) {
    config.proxy.upstreams = nodes.iter().map(|n| n.url()).collect();
    config.proxy.routes = routes();
    config.proxy.connect_timeout = Duration::from_secs(1);
    config.proxy.read_timeout = Duration::from_secs(10);
}

fn client(app: &TestApp) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(app.pki.ca_pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve("localhost", app.https)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn token(app: &TestApp, scope: &str, roles: &[&str]) -> String {
    let now = app.state.keys.now().unix_timestamp();
    let claims = AccessClaims {
        iss: app.state.config.issuer(),
        sub: "executor-orders".to_owned(),
        aud: Audiences::One(app.state.config.issuer()),
        exp: now + 600,
        iat: now,
        nbf: now,
        jti: uuid::Uuid::new_v4().to_string(),
        scope: scope.to_owned(),
        client_id: "executor-orders".to_owned(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        sid: None,
    };
    app.state.keys.sign(&claims).unwrap()
}

/// A real console session (refresh family and access token, as a login makes them);
/// returns the `Cookie` header a browser would send.
pub async fn session_cookie(app: &TestApp, user: &str, roles: &[&str]) -> String {
    let new = NewSession {
        subject: format!("test:{user}"),
        info: SessionInfo {
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            provider: "test".to_owned(),
            email: Some(format!("{user}@example.com")),
            name: None,
            preferred_username: Some(user.to_owned()),
            idp_sid: None,
            account_stamp: None,
        },
        id_token: None,
    };
    let cookies = portcullis::sso::session::establish(&app.state, &new, app.state.keys.now())
        .await
        .unwrap();
    cookies
        .iter()
        .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_owned())
        .filter(|pair| !pair.ends_with('='))
        .collect::<Vec<_>>()
        .join("; ")
}

async fn json(response: reqwest::Response) -> serde_json::Value {
    response.json().await.unwrap()
}

// === identity ===

/// Every spelling of every identity header family a client might try.
const SPOOFED: &[&str] = &[
    "X-Forwarded-User",
    "X_Forwarded_User",
    "x-forwarded-email",
    "X_Forwarded_Email",
    "X-Forwarded-Groups",
    "X_Forwarded_Groups",
    "X-Forwarded-Roles",
    "X_Forwarded_Roles",
    "X-Forwarded-Scopes",
    "X_Forwarded_Scopes",
    "X-Forwarded-Preferred-Username",
    "X-Forwarded-Access-Token",
    "X-Auth-Request-User",
    "X_Auth_Request_Email",
    "X-Auth-Request-Groups",
    "X-Remote-User",
    "X_Remote_User",
    "Remote-User",
    "Remote_User",
    "X-Portcullis-User",
    "X_Portcullis_User",
    "X-Portcullis-Email",
    "X-Portcullis-Roles",
    "X_Portcullis_Roles",
    "X-Portcullis-Scopes",
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Real-IP",
];

fn spoof(mut req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    for name in SPOOFED {
        req = req.header(*name, "mallory");
    }
    req
}

fn assert_no_spoof(seen: &Seen) {
    for (name, values) in &seen.headers {
        assert!(
            values.iter().all(|v| !v.contains("mallory")),
            "spoofed {name}: {values:?} reached the node"
        );
    }
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_an_admin_node() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let http = client(&app);

    // a bearer route: the verified service identity, and nothing the client claimed
    let bearer = token(&app, "scheduler:executor jobs:read", &[]);
    let response = spoof(http.post(app.url("/api/registry")))
        .bearer_auth(&bearer)
        .header("X-Request-Id", "req-42")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // a console route with a real session
    let cookie = session_cookie(&app, "alice", &["viewer"]).await;
    let response = spoof(http.get(app.url("/jobinfo/list")))
        .header(
            header::COOKIE,
            format!("{cookie}; XXL_JOB_LOGIN_IDENTITY=node-own"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // a public route: no identity at all
    let response = spoof(http.get(app.url("/public/logo.png")))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let seen = node.seen();
    assert_eq!(seen.len(), 3);
    let public_host = url::Url::parse(&app.state.config.server.public_url).unwrap();
    let public_host = match public_host.port() {
        Some(port) => format!("{}:{port}", public_host.host_str().unwrap()),
        None => public_host.host_str().unwrap().to_owned(),
    };
    for s in &seen {
        assert_no_spoof(s);
        assert_eq!(s.header("x-forwarded-host"), Some(public_host.as_str()));
        assert!(s.header("traceparent").is_some(), "a trace is started");
        assert!(s.header("x-request-id").is_some());
        assert_eq!(s.header("x-forwarded-proto"), Some("https"));
        assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.1"));
        assert!(!s.headers.contains_key("x_forwarded_user"));
    }
    let (api, console, public) = (&seen[0], &seen[1], &seen[2]);
    assert_eq!(api.header("x-portcullis-user"), Some("executor-orders"));
    assert_eq!(api.header("x-portcullis-subject"), Some("executor-orders"));
    assert_eq!(
        api.header("x-portcullis-scopes"),
        Some("scheduler:executor jobs:read")
    );
    assert_eq!(api.header("x-request-id"), Some("req-42"));
    assert_eq!(api.header("authorization"), None, "the token stays here");
    assert_eq!(api.body, b"{}");

    assert_eq!(console.header("x-portcullis-user"), Some("alice"));
    assert_eq!(console.header("x-portcullis-subject"), Some("test:alice"));
    assert_eq!(
        console.header("x-portcullis-email"),
        Some("alice@example.com")
    );
    assert_eq!(console.header("x-portcullis-roles"), Some("viewer"));
    assert_eq!(
        console.header("cookie"),
        Some("XXL_JOB_LOGIN_IDENTITY=node-own"),
        "session cookies stay here, the node's own go on"
    );

    assert!(
        !public
            .headers
            .keys()
            .any(|k| k.starts_with("x-portcullis-")),
        "{:?}",
        public.headers
    );
    assert_eq!(public.header("authorization"), None);
}

#[tokio::test]
async fn a_valid_traceparent_is_continued_and_the_token_is_forwarded_when_configured() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| {
        proxy_to(c, &[&node]);
        c.proxy.forward_token = true;
    })
    .await;
    let bearer = token(&app, "scheduler:executor", &[]);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = client(&app)
        .get(app.url("/api/registry"))
        .bearer_auth(&bearer)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = &node.seen()[0];
    let parent = seen.header("traceparent").unwrap();
    assert!(parent.starts_with(&format!("00-{trace}-")), "{parent}");
    assert!(parent.ends_with("-01"));
    assert!(
        !parent.contains("00f067aa0ba902b7"),
        "our hop has its own span id"
    );
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {bearer}").as_str())
    );
}

// === https admin nodes ===

/// A node's TLS: a certificate of `pki`, and client certificates of `pki` required.
fn mtls_node_config(pki: &Pki) -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject as _;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls::pki_types::CertificateDer::pem_slice_iter(pki.ca_pem().as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let leaf = pki.leaf();
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap()
}

#[tokio::test]
async fn https_admin_nodes_are_reached_with_the_private_ca_and_a_client_certificate() {
    let node_pki = Pki::new();
    let node = AdminNode::start_tls("tls", mtls_node_config(&node_pki)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("nodes-ca.pem");
    std::fs::write(&ca, node_pki.ca_pem()).unwrap();
    let (cert, key) = install_leaf(dir.path(), &node_pki.leaf());

    let app = spawn_app(|c| {
        proxy_to(c, &[&node]);
        c.proxy.tls_ca_file = Some(ca.clone());
        c.proxy.tls_client_cert = Some(cert.clone());
        c.proxy.tls_client_key = Some(key.clone());
    })
    .await;
    let http = client(&app);
    let r = http.get(app.url("/public/hello")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-node"], "tls");
    assert_eq!(node.seen().len(), 1);

    // without the client certificate the node refuses the handshake: 502, nothing served
    let no_identity = spawn_app(|c| {
        proxy_to(c, &[&node]);
        c.proxy.tls_ca_file = Some(ca.clone());
    })
    .await;
    let r = client(&no_identity)
        .get(no_identity.url("/public/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);

    // without the private CA the node's certificate is not trusted: 502 as well
    let no_ca = spawn_app(|c| {
        proxy_to(c, &[&node]);
        c.proxy.tls_client_cert = Some(cert.clone());
        c.proxy.tls_client_key = Some(key.clone());
    })
    .await;
    let r = client(&no_ca)
        .get(no_ca.url("/public/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        node.seen().len(),
        1,
        "only the authenticated request got through"
    );
}

#[test]
fn a_client_certificate_without_its_key_is_refused_before_start() {
    let mut settings = portcullis::proxy::settings::ProxySettings {
        upstreams: vec!["https://10.0.0.5:8443".to_owned()],
        ..Default::default()
    };
    settings.tls_client_cert = Some("/etc/portcullis/node-client.pem".into());
    let e = settings.validate(Duration::from_secs(30)).unwrap_err();
    assert_eq!(e.field, "proxy.tls_client_cert");
    settings.tls_client_cert = None;
    settings.tls_ca_file = Some("/nonexistent/ca.pem".into());
    let e = settings.validate(Duration::from_secs(30)).unwrap_err();
    assert_eq!(e.field, "proxy.tls_ca_file");
}

// === route policy ===

#[tokio::test]
async fn bearer_routes_refuse_missing_invalid_and_underscoped_tokens() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let http = client(&app);

    let none = http.get(app.url("/api/registry")).send().await.unwrap();
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        none.headers()[header::WWW_AUTHENTICATE],
        "Bearer realm=\"portcullis\""
    );

    let forged = http
        .get(app.url("/api/registry"))
        .bearer_auth("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    assert!(
        forged.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("error=\"invalid_token\"")
    );

    let narrow = http
        .get(app.url("/api/registry"))
        .bearer_auth(token(&app, "jobs:read", &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(narrow.status(), StatusCode::FORBIDDEN);
    assert!(
        narrow.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("scope=\"scheduler:executor\"")
    );
    assert_eq!(json(narrow).await["error"], "insufficient_scope");

    assert!(
        node.seen().is_empty(),
        "nothing unauthenticated was forwarded"
    );
}

// === the memory of verified tokens ===

async fn registry_status(http: &reqwest::Client, app: &TestApp, token: &str) -> StatusCode {
    http.get(app.url("/api/registry"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn a_remembered_token_is_refused_once_it_expires() {
    let node = AdminNode::start("a").await;
    // on a whole second, so that `exp` (whole seconds) is exactly 600 s away
    let start = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    let clock = Arc::new(keyrotation::ManualClock::new(start));
    let app = spawn_app_with_clock(clock.clone(), |c| proxy_to(c, &[&node])).await;
    let http = client(&app);
    let token = token(&app, "scheduler:executor", &[]);

    for _ in 0..3 {
        assert_eq!(registry_status(&http, &app, &token).await, StatusCode::OK);
    }
    assert_eq!(
        app.state.keys.verified_tokens().len(),
        1,
        "the token was verified once and remembered"
    );

    // 600 s of lifetime and 30 s of leeway: the last acceptable second, then one past it
    clock.advance(time::Duration::seconds(630));
    assert_eq!(registry_status(&http, &app, &token).await, StatusCode::OK);
    clock.advance(time::Duration::seconds(2));
    assert_eq!(
        registry_status(&http, &app, &token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(node.seen().len(), 4);
}

#[tokio::test]
async fn a_remembered_token_is_refused_at_once_after_an_emergency_rotation() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let http = client(&app);
    let stolen = token(&app, "scheduler:executor", &[]);
    assert_eq!(registry_status(&http, &app, &stolen).await, StatusCode::OK);
    assert_eq!(registry_status(&http, &app, &stolen).await, StatusCode::OK);
    assert_eq!(app.state.keys.verified_tokens().len(), 1);

    emergency_rotation(&app.state).await;

    assert_eq!(
        registry_status(&http, &app, &stolen).await,
        StatusCode::UNAUTHORIZED,
        "no grace for a token of the compromised key"
    );
    let fresh = token(&app, "scheduler:executor", &[]);
    assert_eq!(registry_status(&http, &app, &fresh).await, StatusCode::OK);
    assert_eq!(node.seen().len(), 3);
}

#[tokio::test]
async fn with_the_memory_off_every_request_is_verified_and_served() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| {
        proxy_to(c, &[&node]);
        c.tokens.verified_cache_entries = 0;
    })
    .await;
    let http = client(&app);
    let token = token(&app, "scheduler:executor", &[]);
    assert_eq!(registry_status(&http, &app, &token).await, StatusCode::OK);
    assert_eq!(registry_status(&http, &app, &token).await, StatusCode::OK);
    assert!(app.state.keys.verified_tokens().is_empty());
    // verified, not only served: the same token with its signature altered is refused
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let mut altered: Vec<u8> = signature.bytes().collect();
    altered[10] = if altered[10] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{signed}.{}", String::from_utf8(altered).unwrap());
    assert_eq!(
        registry_status(&http, &app, &tampered).await,
        StatusCode::UNAUTHORIZED
    );
    // and one served a moment ago is refused once its key is withdrawn
    emergency_rotation(&app.state).await;
    assert_eq!(
        registry_status(&http, &app, &token).await,
        StatusCode::UNAUTHORIZED,
        "a token of the withdrawn key was served"
    );
    assert_eq!(
        node.seen().len(),
        2,
        "only the two genuine requests reached the node"
    );
}

#[tokio::test]
async fn session_routes_send_browsers_to_log_in_and_answer_scripts_401() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let http = client(&app);

    let page = http
        .get(app.url("/jobinfo/list?group=2&page=1"))
        .header(header::ACCEPT, "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::FOUND);
    assert_eq!(
        page.headers()[header::LOCATION],
        "/auth/login?redirect=%2Fjobinfo%2Flist%3Fgroup%3D2%26page%3D1"
    );

    let xhr = http
        .get(app.url("/jobinfo/list"))
        .header(header::ACCEPT, "application/json")
        .header("X-Requested-With", "XMLHttpRequest")
        .send()
        .await
        .unwrap();
    assert_eq!(xhr.status(), StatusCode::UNAUTHORIZED);
    assert!(xhr.headers().contains_key(header::WWW_AUTHENTICATE));
    assert_eq!(json(xhr).await["error"], "login_required");

    // a bearer token is no console session
    let bearer = http
        .get(app.url("/jobinfo/list"))
        .bearer_auth(token(&app, "console", &["admin"]))
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::UNAUTHORIZED);
    assert!(node.seen().is_empty());

    // with a session the page is served; a job edit needs the admin role
    let viewer = session_cookie(&app, "bob", &["viewer"]).await;
    // a login name a node could read as another user's is replaced by the subject
    for name in [" alice", "al ice", "älice"] {
        let cookie = session_cookie(&app, name, &["viewer"]).await;
        let page = http
            .get(app.url("/jobinfo/list"))
            .header(header::COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), StatusCode::OK, "{name:?}");
    }
    let users: Vec<_> = node
        .seen()
        .iter()
        .map(|s| {
            (
                s.header("x-portcullis-user").map(str::to_owned),
                s.header("x-portcullis-subject").map(str::to_owned),
            )
        })
        .collect();
    // each node request names the subject, as both user and subject
    let expected: Vec<_> = ["test: alice", "test:al ice", "test:älice"]
        .iter()
        .map(|s| (Some((*s).to_owned()), Some((*s).to_owned())))
        .collect();
    assert_eq!(users, expected);
    let seen_before = users.len();
    let list = http
        .get(app.url("/jobinfo/list"))
        .header(header::COOKIE, &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), StatusCode::OK);
    // cookie-carrying writes must come from our own origin (CSRF)
    let origin = app.state.config.server.public_url.clone();
    let edit = http
        .post(app.url("/jobinfo/update"))
        .header(header::COOKIE, &viewer)
        .header(header::ORIGIN, &origin)
        .body("id=1")
        .send()
        .await
        .unwrap();
    assert_eq!(edit.status(), StatusCode::FORBIDDEN);
    assert_eq!(json(edit).await["error"], "insufficient_role");
    let admin = session_cookie(&app, "alice", &["admin", "viewer"]).await;
    let edit = http
        .post(app.url("/jobinfo/update"))
        .header(header::COOKIE, &admin)
        .header(header::ORIGIN, &origin)
        .body("id=1")
        .send()
        .await
        .unwrap();
    assert_eq!(edit.status(), StatusCode::OK);
    let seen = node.seen();
    assert_eq!(seen.len(), seen_before + 2);
    let last = &seen[seen_before + 1];
    assert_eq!(last.header("x-portcullis-user"), Some("alice"));
    assert_eq!(last.header("x-portcullis-subject"), Some("test:alice"));
    assert_eq!(last.header("x-portcullis-roles"), Some("admin,viewer"));
}

/// An instance on a manual clock in front of one node, and the `Cookie` header of a
/// console session of carol (operator) made on it just now.
async fn console_session() -> (AdminNode, Arc<keyrotation::ManualClock>, TestApp, String) {
    let node = AdminNode::start("a").await;
    let clock = Arc::new(keyrotation::ManualClock::new(
        time::OffsetDateTime::now_utc(),
    ));
    let app = spawn_app_with_clock(clock.clone(), |c| proxy_to(c, &[&node])).await;
    let cookie = session_cookie(&app, "carol", &["operator"]).await;
    (node, clock, app, cookie)
}

#[tokio::test]
async fn an_expired_console_access_cookie_is_renewed_on_the_way_through() {
    let (node, clock, app, cookie) = console_session().await;
    // past the console access token's lifetime (5 minutes), within the session's
    clock.advance(time::Duration::minutes(10));
    let response = client(&app)
        .get(app.url("/jobinfo/list"))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let renewed: Vec<String> = response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().split('=').next().unwrap().to_owned())
        .collect();
    assert!(
        renewed.contains(&"__Host-portcullis-at".to_owned())
            && renewed.contains(&"__Host-portcullis-rt".to_owned()),
        "{renewed:?}"
    );
    let seen = node.seen();
    assert_eq!(seen[0].header("x-portcullis-user"), Some("carol"));
    assert_eq!(seen[0].header("x-portcullis-roles"), Some("operator"));
    assert_eq!(seen[0].header("cookie"), None);
}

/// The value a response sets for cookie `name`, if it sets one.
fn set_cookie_value(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix(name)?.strip_prefix('='))
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
}

/// The `__Host-portcullis-rt` value a response sets, if any.
fn set_refresh_cookie(response: &reqwest::Response) -> Option<String> {
    set_cookie_value(response, "__Host-portcullis-rt")
}

/// The `__Host-portcullis-at` value a response sets, if any.
fn set_access_cookie(response: &reqwest::Response) -> Option<String> {
    set_cookie_value(response, "__Host-portcullis-at")
}

/// `/admin/sessions` lists a console session as live until its maximum lifetime, not on
/// until its idle expiry because nothing has tried to renew it since; a client's session
/// of the same subject is listed as before.
#[tokio::test]
async fn a_console_session_past_its_max_lifetime_is_not_listed_as_live() {
    let clock = Arc::new(keyrotation::ManualClock::new(
        time::OffsetDateTime::now_utc(),
    ));
    let app = spawn_app_with_clock(clock.clone(), |_| {}).await;
    session_cookie(&app, "carol", &["operator"]).await;
    app.state
        .refresh
        .issue(
            portcullis::refresh::NewFamily {
                client_id: "executor-orders".to_owned(),
                subject: "test:carol".to_owned(),
                scope: "scheduler:executor".to_owned(),
                audience: Vec::new(),
                auth_time: app.state.keys.now(),
                session: serde_json::json!({}),
            },
            app.state.keys.now(),
        )
        .await
        .unwrap();
    let listed = || async {
        let body: serde_json::Value = reqwest::Client::new()
            .get(format!(
                "http://{}/admin/sessions?subject=test:carol",
                app.admin
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut clients: Vec<String> = body["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["client_id"].as_str().unwrap().to_owned())
            .collect();
        clients.sort_unstable();
        clients
    };
    let console = app.state.config.sso.console_client_id.clone();
    let mut both = vec![console, "executor-orders".to_owned()];
    both.sort_unstable();
    assert_eq!(listed().await, both);
    clock.advance(time::Duration::hours(11) + time::Duration::minutes(59));
    assert_eq!(listed().await, both, "a minute before the max");
    clock.advance(time::Duration::minutes(1));
    assert_eq!(
        listed().await,
        ["executor-orders"],
        "at the max, with its idle expiry still ahead"
    );
}

#[tokio::test]
async fn a_console_session_is_not_renewed_past_its_max_lifetime_and_its_family_is_revoked() {
    let node = AdminNode::start("a").await;
    let clock = Arc::new(keyrotation::ManualClock::new(
        time::OffsetDateTime::now_utc(),
    ));
    let app = spawn_app_with_clock(clock.clone(), |c| proxy_to(c, &[&node])).await;
    assert_eq!(
        app.state.config.sso.session_max_lifetime,
        Duration::from_secs(12 * 3600),
        "the default"
    );
    let login = app.state.keys.now();
    let end = (login + time::Duration::hours(12)).unix_timestamp();
    let cookie = session_cookie(&app, "carol", &["operator"]).await;
    let xhr = |cookie: String| {
        client(&app)
            .get(app.url("/jobinfo/list"))
            .header(header::COOKIE, cookie)
            .header("x-requested-with", "XMLHttpRequest")
            .send()
    };

    // before the max, the session renews as ever; 2 minutes before it, the renewed access
    // token (5 minutes) is cut short at the max, and its cookie with it
    clock.advance(time::Duration::hours(6));
    let renewed = xhr(cookie.clone()).await.unwrap();
    assert_eq!(renewed.status(), StatusCode::OK);
    let refresh = set_refresh_cookie(&renewed).expect("renewed");
    clock.advance(time::Duration::hours(5) + time::Duration::minutes(58));
    let late = xhr(format!("__Host-portcullis-rt={refresh}"))
        .await
        .unwrap();
    assert_eq!(late.status(), StatusCode::OK);
    let refresh = set_refresh_cookie(&late).expect("renewed");
    let access = set_access_cookie(&late).expect("renewed");
    let claims: portcullis::sso::session::ConsoleClaims =
        app.state.keys.verify_current(&access).await.unwrap();
    assert_eq!(claims.base.exp, end, "capped at login + 12h");
    let max_age = late
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("__Host-portcullis-at="))
        .unwrap()
        .to_owned();
    assert!(max_age.contains("Max-Age=120;"), "{max_age}");
    let me = client(&app)
        .get(app.url("/auth/me"))
        .header(header::COOKIE, format!("__Host-portcullis-at={access}"))
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    assert_eq!(json(me).await["expires_at"], end);

    // past the max (and the access token's leeway): not renewed on any path, the
    // cookies are cleared
    clock.advance(time::Duration::minutes(3));
    let cookie = format!("__Host-portcullis-rt={refresh}; __Host-portcullis-at={access}");
    let refused = xhr(cookie.clone()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(set_refresh_cookie(&refused).as_deref(), Some(""), "cleared");
    assert!(
        cleared_cookies(&refused).contains(&"__Host-portcullis-rt".to_owned()),
        "{:?}",
        cleared_cookies(&refused)
    );
    let (actor, target, detail) = {
        wait_for_audit_actor(
            &app.state,
            Duration::from_secs(10),
            "session.expired",
            "user:test:carol",
        )
        .await;
        portcullis::audit::recent(&app.state.db, "session.expired", 1)
            .await
            .unwrap()
            .remove(0)
    };
    assert_eq!(actor, "user:test:carol");
    assert_eq!(Some(target), claims.base.sid);
    let detail: serde_json::Value = serde_json::from_str(&detail).unwrap();
    assert_eq!(detail["reason"], "max_lifetime");
    assert_eq!(detail["auth_time"], login.unix_timestamp());

    // the family is revoked: the same refresh cookie, within any grace window, renews
    // nothing anywhere
    assert!(
        app.state
            .refresh
            .list_sessions("test:carol", app.state.keys.now())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        xhr(cookie.clone()).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let page = client(&app)
        .get(app.url("/jobinfo/list"))
        .header(header::COOKIE, &cookie)
        .header(header::ACCEPT, "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::FOUND);
    assert_eq!(
        page.headers()[header::LOCATION],
        "/auth/login?redirect=%2Fjobinfo%2Flist"
    );
    let me = client(&app)
        .get(app.url("/auth/me"))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(node.seen().len(), 2, "only the two renewals went through");
}

#[tokio::test]
async fn a_renewal_whose_answer_is_slow_does_not_log_the_browser_out() {
    let (node, clock, app, cookie) = console_session().await;
    clock.advance(time::Duration::minutes(10));
    let get = |cookie: String| {
        client(&app)
            .get(app.url("/jobinfo/list"))
            .header(header::COOKIE, cookie)
            .header("x-requested-with", "XMLHttpRequest")
            .send()
    };
    // one request renews; its answer (and the new cookies) can take up to
    // server.request_timeout (30 s) to reach the browser, whose other requests meanwhile
    // still carry the rotated cookie: 25 s on, past refresh.reuse_grace (10 s), such a
    // request gets the very successor the first one got, and the session lives
    let first = get(cookie.clone()).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let successor = set_refresh_cookie(&first).expect("renewed");
    clock.advance(time::Duration::seconds(25));
    let late = get(cookie.clone()).await.unwrap();
    assert_eq!(late.status(), StatusCode::OK, "not logged out");
    assert_eq!(
        set_refresh_cookie(&late).as_deref(),
        Some(successor.as_str())
    );
    assert_eq!(
        node.seen().last().unwrap().header("x-portcullis-user"),
        Some("carol")
    );
    // long after any answer could still be on its way, the rotated cookie is re-use:
    // the session is revoked
    clock.advance(time::Duration::seconds(30));
    let stolen = get(cookie).await.unwrap();
    assert_eq!(stolen.status(), StatusCode::UNAUTHORIZED);
    let revoked = get(format!("__Host-portcullis-rt={successor}"))
        .await
        .unwrap();
    assert_eq!(
        revoked.status(),
        StatusCode::UNAUTHORIZED,
        "the family is gone"
    );
}

#[tokio::test]
async fn unknown_and_ambiguous_paths_are_not_forwarded() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let mut conn = Conn::over(app.tls().await).await;
    let (parts, _) = conn.get("/elsewhere").await.unwrap();
    assert_eq!(parts.status, 404, "outside every route prefix");
    for path in [
        "/public/../jobinfo/list",
        "/public/%2e%2e/jobinfo/list",
        "/public/..;/jobinfo/list",
        "/public%2f..%2fjobinfo/list",
        "/public//x",
    ] {
        let (parts, body) = conn.get(path).await.unwrap();
        assert_eq!(
            parts.status,
            400,
            "{path}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert!(node.seen().is_empty());
}

#[tokio::test]
async fn a_method_a_route_does_not_name_cannot_slip_past_its_roles() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let viewer = session_cookie(&app, "bob", &["viewer"]).await;
    let origin = app.state.config.server.public_url.clone();
    let mut conn = Conn::over(app.tls().await).await;
    // `POST /jobinfo/` needs the admin role: a viewer may not reach it as `post` (an
    // extension method to HTTP, `POST` to a case-folding framework), nor with `TRACE`
    // or an invented method that a handler without a method of its own answers
    for method in ["post", "Post", "TRACE", "PROPFIND", "JOBRUN"] {
        let req = hyper::Request::builder()
            .method(method)
            .uri("/jobinfo/update")
            .header("host", "localhost")
            .header(header::COOKIE, &viewer)
            .header(header::ORIGIN, &origin)
            .body(Full::<Bytes>::default())
            .unwrap();
        let (parts, body) = conn.request(req).await.unwrap();
        assert_eq!(
            parts.status,
            405,
            "{method}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            parts.headers[header::ALLOW],
            "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
        );
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "method_not_allowed", "{method}");
    }
    assert!(node.seen().is_empty(), "{:?}", node.seen());
}

#[tokio::test]
async fn an_exact_route_opens_its_page_and_nothing_under_it() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| {
        proxy_to(c, &[&node]);
        c.proxy.routes = vec![
            RouteSettings {
                roles: vec!["operator".to_owned()],
                ..route("/console/", RouteAuth::Session)
            },
            RouteSettings {
                exact: true,
                ..route("/console/jobinfo", RouteAuth::Session)
            },
        ];
    })
    .await;
    let viewer = session_cookie(&app, "bob", &["viewer"]).await;
    let http = client(&app);
    let get = |path: &str| {
        http.get(app.url(path))
            .header(header::COOKIE, &viewer)
            .send()
    };
    assert_eq!(
        get("/console/jobinfo").await.unwrap().status(),
        StatusCode::OK
    );
    for below in [
        "/console/jobinfo/trigger?id=1",
        "/console/jobinfo/",
        "/console/user/add",
    ] {
        let refused = get(below).await.unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{below}");
        assert_eq!(json(refused).await["error"], "insufficient_role", "{below}");
    }
    let seen = node.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/console/jobinfo");
}

// === balancing, health and retries ===

fn node_of(body: &serde_json::Value) -> String {
    body["node"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn requests_are_spread_round_robin_over_the_nodes() {
    let (a, b) = (AdminNode::start("a").await, AdminNode::start("b").await);
    let app = spawn_app(|c| proxy_to(c, &[&a, &b])).await;
    let http = client(&app);
    let mut served = Vec::new();
    for _ in 0..6 {
        let r = http.get(app.url("/public/ping")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        served.push(node_of(&json(r).await));
    }
    assert_eq!(served.iter().filter(|n| *n == "a").count(), 3, "{served:?}");
    assert!(served.windows(2).all(|w| w[0] != w[1]), "{served:?}");
    // proxied requests are counted under their configured route, not `unmatched`
    let metrics = app.metrics().await;
    assert!(counted(&metrics, "proxy:/public/", 200), "{metrics}");
}

#[tokio::test]
async fn node_connections_are_kept_alive_and_reused_with_the_nodes_own_host() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let http = client(&app);
    for i in 0..20 {
        let r = if i % 2 == 0 {
            http.get(app.url("/public/ping")).send().await.unwrap()
        } else {
            http.post(app.url("/public/item"))
                .body(format!("body {i}"))
                .send()
                .await
                .unwrap()
        };
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        assert_eq!(json(r).await["node"], "a");
    }
    // one client connection, served by one worker: one connection to the node, kept
    assert_eq!(node.accepted(), 1, "node connections opened");
    assert_eq!(node.open(), 1);
    let seen = node.seen();
    assert_eq!(seen.len(), 20);
    let host = node.addr.to_string();
    assert!(
        seen.iter()
            .all(|s| s.headers.get("host") == Some(&vec![host.clone()])),
        "every request names the node itself as its Host: {:?}",
        seen.iter()
            .map(|s| s.headers.get("host"))
            .collect::<Vec<_>>()
    );
    assert!(seen.iter().all(|s| s.path.starts_with("/public/")));
}

#[tokio::test]
async fn a_restarted_node_gets_the_next_request_even_a_post_on_a_new_connection() {
    let mut node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let http = client(&app);
    for _ in 0..3 {
        let r = http.get(app.url("/public/ping")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(node.accepted(), 1);
    // the node's process restarts: its end of the kept connection is gone (closed once
    // the old process's connection tasks are dropped; no time given to the gateway to
    // notice beyond that)
    node.restart().await;
    eventually(Duration::from_secs(5), "the old connection closed", || {
        let open = node.open();
        async move { open == 0 }
    })
    .await;
    // a POST is never retried, so it must not be sent on the dead connection
    let r = http
        .post(app.url("/public/after-restart"))
        .body("once")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(node.accepted(), 2, "a new connection to the restarted node");
    let posts: Vec<Seen> = node
        .seen()
        .into_iter()
        .filter(|s| s.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].body, b"once");
}

#[tokio::test]
async fn idle_node_connections_are_closed_after_the_pool_idle_timeout() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| {
        proxy_to(c, &[&node]);
        c.proxy.pool_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let http = client(&app);
    for _ in 0..3 {
        let r = http.get(app.url("/public/ping")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(node.open(), 1);
    let idle_since = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(node.open(), 1, "kept while younger than the idle timeout");
    while node.open() > 0 {
        assert!(
            idle_since.elapsed() < Duration::from_secs(5),
            "the idle connection was not closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(idle_since.elapsed() >= Duration::from_secs(1));
    // and the next request simply opens a new one
    let r = http.get(app.url("/public/ping")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(node.accepted(), 2);
}

#[tokio::test]
async fn a_killed_node_is_routed_around_and_no_idempotent_request_fails() {
    let (a, mut b) = (AdminNode::start("a").await, AdminNode::start("b").await);
    let app = spawn_app(|c| {
        proxy_to(c, &[&a, &b]);
        c.proxy.health.failures = 2;
        c.proxy.health.cooldown = Duration::from_secs(60);
    })
    .await;
    let http = client(&app);
    // warm both nodes' keep-alive connections, then kill one
    for _ in 0..4 {
        let r = http.get(app.url("/public/ping")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    b.kill().await;
    for i in 0..10 {
        let r = http.get(app.url("/public/ping")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "GET {i} after the kill");
        assert_eq!(node_of(&json(r).await), "a");
        let put = http
            .put(app.url(&format!("/public/item/{i}")))
            .body(format!("payload {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::OK, "PUT {i} after the kill");
    }
    let proxy = app.state.proxy.as_ref().unwrap();
    assert!(!proxy.upstreams().nodes()[1].healthy(), "b is marked down");
    assert!(proxy.upstreams().nodes()[0].healthy());
    // the retried PUTs reached a with their bodies intact
    let puts: Vec<Vec<u8>> = a
        .seen()
        .into_iter()
        .filter(|s| s.method == "PUT")
        .map(|s| s.body)
        .collect();
    assert_eq!(puts.len(), 10);
    assert!(
        puts.iter()
            .enumerate()
            .all(|(i, b)| *b == format!("payload {i}").into_bytes())
    );

    let metrics = app.metrics().await;
    let gauge = format!("portcullis_upstream_healthy{{node=\"{}\"}} 0", b.addr);
    assert!(metrics.contains(&gauge), "{gauge} missing");
    assert!(metrics.contains("portcullis_upstream_requests_total{"));
}

#[tokio::test]
async fn a_failed_idempotent_request_is_retried_on_the_other_node_but_a_post_is_not() {
    let (a, b) = (AdminNode::start("a").await, AdminNode::start("b").await);
    let app = spawn_app(|c| {
        proxy_to(c, &[&a, &b]);
        // keep the failing node in rotation, so every request of the test may meet it
        c.proxy.health.failures = 1000;
    })
    .await;
    a.fail_with(503);
    let http = client(&app);
    for i in 0..4 {
        let r = http
            .get(app.url(&format!("/public/get/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "GET {i}");
        assert_eq!(node_of(&json(r).await), "b");
    }
    assert!(
        a.seen().iter().any(|s| s.method == "GET"),
        "a was tried first at least once"
    );

    let mut statuses = Vec::new();
    for i in 0..2 {
        let r = http
            .post(app.url(&format!("/public/post/{i}")))
            .body("run")
            .send()
            .await
            .unwrap();
        statuses.push(r.status());
    }
    // round robin: one POST met the failing node and got its answer, unretried
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE]);
    let posts = |n: &AdminNode| {
        n.seen()
            .into_iter()
            .filter(|s| s.method == "POST")
            .map(|s| s.path)
            .collect::<Vec<_>>()
    };
    let (on_a, on_b) = (posts(&a), posts(&b));
    assert_eq!(
        on_a.len() + on_b.len(),
        2,
        "each POST was sent exactly once"
    );
    assert!(on_a.iter().all(|p| !on_b.contains(p)));
}

#[tokio::test]
async fn a_node_failing_its_active_check_gets_no_traffic_until_it_passes() {
    let (a, b) = (AdminNode::start("a").await, AdminNode::start("b").await);
    let app = spawn_app(|c| {
        proxy_to(c, &[&a, &b]);
        // passive checks out of the way: only the active check decides here
        c.proxy.health.failures = 1000;
        c.proxy.health.check_path = Some("/health".to_owned());
        c.proxy.health.check_interval = Duration::from_millis(100);
    })
    .await;
    let proxy = app.state.proxy.clone().unwrap();
    a.fail_with(503);
    eventually(Duration::from_secs(10), "a fails its check", || {
        let proxy = proxy.clone();
        async move { !proxy.upstreams().nodes()[0].healthy() }
    })
    .await;
    let http = client(&app);
    for i in 0..4 {
        let r = http
            .get(app.url(&format!("/public/while-down/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(node_of(&json(r).await), "b");
    }
    assert!(
        a.seen().iter().all(|s| s.path == "/health"),
        "a got only health checks while failing them"
    );
    a.fail_with(0);
    eventually(Duration::from_secs(10), "a passes its check again", || {
        let proxy = proxy.clone();
        async move { proxy.upstreams().nodes()[0].healthy() }
    })
    .await;
    let mut served = Vec::new();
    for i in 0..4 {
        let r = http
            .get(app.url(&format!("/public/after/{i}")))
            .send()
            .await
            .unwrap();
        served.push(node_of(&json(r).await));
    }
    assert!(served.contains(&"a".to_owned()), "{served:?}");
}

#[tokio::test]
async fn with_every_node_down_the_answer_is_a_json_502_or_503() {
    let mut a = AdminNode::start("a").await;
    let app = spawn_app(|c| {
        proxy_to(c, &[&a]);
        c.proxy.health.failures = 1;
        c.proxy.health.cooldown = Duration::from_secs(60);
    })
    .await;
    a.kill().await;
    let http = client(&app);
    let first = http.get(app.url("/public/ping")).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(json(first).await["error"], "upstream_unavailable");
    let next = http.get(app.url("/public/ping")).send().await.unwrap();
    assert_eq!(next.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(next.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(json(next).await["error"], "temporarily_unavailable");
}

#[tokio::test]
async fn a_node_that_does_not_answer_in_time_gets_a_504_and_no_second_try() {
    let (a, b) = (AdminNode::start("a").await, AdminNode::start("b").await);
    let app = spawn_app(|c| {
        proxy_to(c, &[&a, &b]);
        c.proxy.read_timeout = Duration::from_millis(300);
    })
    .await;
    let r = client(&app)
        .get(app.url("/public/hang"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(json(r).await["error"], "upstream_timeout");
    // the node may still be working on it: a GET that timed out is not sent again
    assert_eq!(a.seen().len() + b.seen().len(), 1);
}

#[tokio::test]
async fn a_retry_never_runs_past_the_request_timeout() {
    let (a, b) = (AdminNode::start("a").await, AdminNode::start("b").await);
    // an instance with `request_timeout`, whose nodes take 2 s to answer 502 to
    // /public/slow-fail, and that one request through it
    let slow_fail = |request_timeout: u64| {
        let (a, b) = (&a, &b);
        async move {
            let app = spawn_app(|c| {
                proxy_to(c, &[a, b]);
                // one failure takes a node out: the deadline's cut must not count as one
                c.proxy.health.failures = 1;
                c.server.request_timeout = Duration::from_millis(request_timeout);
                c.config_center.long_poll_timeout = Duration::from_secs(1);
                c.proxy.read_timeout = Duration::from_millis(2500);
            })
            .await;
            let r = client(&app)
                .get(app.url("/public/slow-fail"))
                .send()
                .await
                .unwrap();
            (app, r)
        }
    };
    // the first node answers 502 after 2 s; the second, tried with the 1.4 s left,
    // would need 2 s too: it is given up at the request's deadline with our 504, not
    // left to run into the 408 that blames the client
    let (app, r) = slow_fail(3500).await;
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(json(r).await["error"], "upstream_timeout");
    assert_eq!(a.seen().len(), 1, "each node was tried once");
    assert_eq!(b.seen().len(), 1, "each node was tried once");
    // the node that answered 502 is out (one failure does it here); the one cut short
    // by the deadline did not have its whole read_timeout, and stays in
    let proxy = app.state.proxy.clone().unwrap();
    let healthy = proxy
        .upstreams()
        .nodes()
        .iter()
        .filter(|n| n.healthy())
        .count();
    assert_eq!(healthy, 1, "only the node that failed is out");

    // with less than a second left after the first answer, no retry is sent: the
    // first node's own answer is the one given
    let (_app, r) = slow_fail(2800).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        a.seen().len() + b.seen().len(),
        3,
        "the second request was sent once"
    );
}

// === streaming and upgrades ===

#[tokio::test]
async fn large_bodies_stream_both_ways_past_the_gateways_own_body_limit() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| {
        proxy_to(c, &[&node]);
        c.server.max_body_bytes = 64 * 1024;
        c.proxy.max_body_bytes = 12 * 1024 * 1024;
    })
    .await;
    let bearer = token(&app, "scheduler:executor", &[]);
    let size = 8 * 1024 * 1024;

    // upload, chunked (no declared length), in 100 pieces
    let mut conn = {
        let (send, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(app.tls().await))
                .await
                .unwrap();
        tokio::spawn(connection);
        send
    };
    let data = Bytes::from(pattern(size));
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..size)
        .step_by(size / 100)
        .map(|at| Ok(Frame::data(data.slice(at..(at + size / 100).min(size)))))
        .collect();
    let req = hyper::Request::post("/api/upload")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {bearer}"))
        .body(StreamBody::new(futures::stream::iter(chunks)).boxed())
        .unwrap();
    let resp = conn.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["body_len"], size);
    assert_eq!(answer["body_sha256"], hex(&Sha256::digest(&data)));

    // download
    let http = client(&app);
    let down = http
        .get(app.url(&format!("/api/big?bytes={size}")))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(down.status(), StatusCode::OK);
    let got = down.bytes().await.unwrap();
    assert_eq!(got.len(), size);
    assert!(got == data, "the download arrived intact");

    // past the proxy's own limit: refused on the declared length, before the node
    // sees a byte (the body is never sent)
    let before = node.seen().len();
    let mut tls = app.tls().await;
    let head = format!(
        "POST /api/upload HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {bearer}\r\n\
         content-length: {}\r\n\r\n",
        13 * 1024 * 1024
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed without an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(node.seen().len(), before);
}

/// A WebSocket handshake for `path` on `localhost`, as a browser sends it.
pub fn websocket_handshake(path: &str) -> hyper::Request<Full<Bytes>> {
    hyper::Request::get(path)
        .header("host", "localhost")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::<Bytes>::default())
        .unwrap()
}

#[tokio::test]
async fn websocket_upgrades_are_passed_through_both_ways() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let (mut send, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(app.tls().await))
            .await
            .unwrap();
    tokio::spawn(connection.with_upgrades());
    let resp = send
        .send_request(websocket_handshake("/public/ws"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["upgrade"], "websocket");
    assert_eq!(resp.headers()["sec-websocket-accept"], "test-node");
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut io = TokioIo::new(upgraded);
    io.write_all(b"ping through portcullis").await.unwrap();
    let mut buf = vec![0u8; 23];
    tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping through portcullis");
    let seen = &node.seen()[0];
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(
        seen.header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
}

#[tokio::test]
async fn a_websocket_handshake_with_a_session_must_come_from_our_origin() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let operator = session_cookie(&app, "carol", &["operator"]).await;
    let origin = app.state.config.server.public_url.clone();
    let handshake = |from: Option<&str>, protocol: &str| {
        let mut req = hyper::Request::get("/jobinfo/ws")
            .header("host", "localhost")
            .header(header::COOKIE, &operator)
            .header("connection", "Upgrade")
            .header("upgrade", protocol)
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        if let Some(o) = from {
            req = req.header(header::ORIGIN, o);
        }
        req.body(Full::<Bytes>::default()).unwrap()
    };
    // a page on another origin opening a socket with the operator's cookies
    for from in [Some("https://evil.example"), None] {
        let mut conn = Conn::over(app.tls().await).await;
        let (parts, body) = conn.request(handshake(from, "websocket")).await.unwrap();
        assert_eq!(parts.status, 403, "{from:?}");
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "csrf_rejected");
    }
    assert!(node.seen().is_empty());

    // from our own origin the handshake goes through
    let (mut send, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(app.tls().await))
            .await
            .unwrap();
    tokio::spawn(connection.with_upgrades());
    let resp = send
        .send_request(handshake(Some(&origin), "websocket"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);

    // another protocol is not passed on: the node gets a plain request
    let mut conn = Conn::over(app.tls().await).await;
    let (parts, _) = conn.request(handshake(Some(&origin), "h2c")).await.unwrap();
    assert_eq!(parts.status, 200);
    let seen = node.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("upgrade"), None);
}

// === upgraded connections hold their place in the connection limit ===

/// An upgraded connection is still a connection: it keeps its place in
/// `server.max_connections` until the relay ends, though hyper lets go of it at the `101`.
#[tokio::test]
async fn open_websockets_hold_their_place_in_the_connection_limit() {
    const LIMIT: usize = 2;
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| {
        proxy_to(c, &[&node]);
        c.server.max_connections = LIMIT;
    })
    .await;
    let mut sockets = Vec::new();
    for i in 0..LIMIT {
        let mut ws = open_websocket(&app, "/public/ws", &[]).await;
        echo(&mut ws, format!("socket {i}").as_bytes()).await;
        sockets.push(ws);
    }
    assert_eq!(node.upgraded(), LIMIT);

    // one more client waits for a free connection: it is not served, nor is it refused
    let pki = app.pki.client_config();
    let addr = app.https;
    let mut waiting = tokio::spawn(async move {
        let mut conn = Conn::over(tls_connect(addr, pki).await).await;
        conn.get("/public/after").await.unwrap().0.status
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), &mut waiting)
            .await
            .is_err(),
        "a connection past the limit was served while {LIMIT} WebSockets were open"
    );
    // the open sockets still relay
    for (i, ws) in sockets.iter_mut().enumerate() {
        echo(ws, format!("still socket {i}").as_bytes()).await;
    }

    // one WebSocket closes: its relay ends, and the waiting client gets its place
    drop(sockets.pop());
    let status = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting client was served once a WebSocket closed")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    eventually(
        Duration::from_secs(5),
        "the node's end of the closed WebSocket is closed",
        || async { node.upgraded() == LIMIT - 1 },
    )
    .await;
}

#[test]
fn an_open_websocket_counts_as_an_open_connection() {
    // the metrics recorder is process-wide: alone in a process, no other test's
    // connections are counted with ours
    harness::run_alone("proxy::an_open_websocket_counts_as_an_open_connection_alone");
}

/// `portcullis_https_connections_open` summed over the workers, in a scrape.
fn open_connections(scrape: &str) -> f64 {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("portcullis_https_connections_open{"))
        .filter_map(|l| l.rsplit(' ').next())
        .map(|v| v.trim().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
#[ignore = "run in a process of its own by an_open_websocket_counts_as_an_open_connection"]
async fn an_open_websocket_counts_as_an_open_connection_alone() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let before = open_connections(&app.metrics().await);

    let mut ws = open_websocket(&app, "/public/ws", &[]).await;
    echo(&mut ws, b"counted").await;
    let during = app.metrics().await;
    assert_eq!(open_connections(&during) - before, 1.0, "{during}");

    drop(ws);
    eventually(
        Duration::from_secs(10),
        "the closed WebSocket's connection no longer counted",
        || async { open_connections(&app.metrics().await) == before },
    )
    .await;
}

// === upgraded connections live no longer than their credential ===

/// One end of a WebSocket opened through the gateway.
type Socket = TokioIo<hyper::upgrade::Upgraded>;

/// How often the session of an open console WebSocket is checked in these tests.
const SESSION_CHECK: Duration = Duration::from_millis(300);

/// An instance in front of `node` whose refresh store is the Redis at `redis_url` (a key
/// prefix of its own), checking console WebSockets every [`SESSION_CHECK`], on `clock`.
async fn websocket_app(
    node: &AdminNode,
    redis_url: String,
    clock: Arc<dyn keyrotation::Clock>,
    customize: impl FnOnce(&mut Config),
) -> TestApp {
    spawn_app_with_clock(clock, |c| {
        proxy_to(c, &[node]);
        c.proxy.upgrade_session_check_interval = SESSION_CHECK;
        c.redis = Some(portcullis::config::RedisConfig {
            url: secrecy::SecretString::from(redis_url),
            cluster: false,
            command_timeout: Duration::from_secs(1),
        });
        c.refresh.key_prefix = format!("proxy-ws-{}:", uuid::Uuid::new_v4());
        customize(c);
    })
    .await
}

/// Opens a WebSocket on `path` through `app` with `headers` added to the handshake.
async fn open_websocket(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> Socket {
    let (mut send, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(app.tls().await))
            .await
            .unwrap();
    tokio::spawn(connection.with_upgrades());
    let mut req = websocket_handshake(path);
    for (name, value) in headers {
        req.headers_mut().insert(
            header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            header::HeaderValue::from_str(value).unwrap(),
        );
    }
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    TokioIo::new(hyper::upgrade::on(resp).await.unwrap())
}

/// A console WebSocket of the session in `cookie`, from our own origin.
async fn open_console_websocket(app: &TestApp, cookie: &str) -> Socket {
    let origin = app.state.config.server.public_url.clone();
    open_websocket(
        app,
        "/jobinfo/ws",
        &[("cookie", cookie), ("origin", origin.as_str())],
    )
    .await
}

/// An executor's WebSocket with `token`.
async fn open_bearer_websocket(app: &TestApp, token: &str) -> Socket {
    let authorization = format!("Bearer {token}");
    open_websocket(app, "/api/ws", &[("authorization", authorization.as_str())]).await
}

/// Sends `text` and reads it back from the node's echo: the connection relays both ways.
async fn echo(ws: &mut Socket, text: &[u8]) {
    ws.write_all(text).await.unwrap();
    let mut back = vec![0u8; text.len()];
    tokio::time::timeout(Duration::from_secs(10), ws.read_exact(&mut back))
        .await
        .expect("no echo within 10 s")
        .expect("the WebSocket closed");
    assert_eq!(back, text);
}

/// Waits up to `deadline` for the gateway to close `ws` (end of stream or a reset); panics
/// when it stays open.
async fn closed_within(ws: &mut Socket, deadline: Duration, what: &str) {
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(deadline, async {
        loop {
            match ws.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "{what}: the WebSocket is still open after {deadline:?}"
    );
}

/// `portcullis_proxy_upgrades_ended_total` for `reason`, as `app` exports it now (the
/// registry is the test process's: read it only in a test run alone).
async fn ended(app: &TestApp, reason: &str) -> f64 {
    app.sample(&format!(
        "portcullis_proxy_upgrades_ended_total{{reason=\"{reason}\"}}"
    ))
    .await
}

/// A client of `app` with the executor scope whose tokens live `lifetime` (the default
/// when `None`); returns its id and an access token from the token endpoint.
async fn executor_with_token(app: &TestApp, lifetime: Option<Duration>) -> (String, String) {
    use secrecy::ExposeSecret as _;
    let (client, secret) = app
        .state
        .clients
        .create(
            portcullis::clients::NewClient {
                id: None,
                name: "an executor on a websocket".to_owned(),
                grant_types: [portcullis::clients::GrantType::ClientCredentials]
                    .into_iter()
                    .collect(),
                scopes: portcullis::clients::ScopeSet::parse("scheduler:executor").unwrap(),
                audiences: vec![],
                access_token_lifetime: lifetime,
            },
            app.state.keys.now(),
        )
        .await
        .unwrap();
    let response = post_as_client(
        &app.https_client(),
        app.url("/oauth2/token"),
        client.id.as_str(),
        secret.expose_secret(),
        &[
            ("grant_type", "client_credentials"),
            ("scope", "scheduler:executor"),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json(response).await;
    (
        client.id.to_string(),
        body["access_token"].as_str().unwrap().to_owned(),
    )
}

/// The `exp` claim of `token` (read, not verified).
fn exp_of(token: &str) -> i64 {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    claims["exp"].as_i64().unwrap()
}

// The tests below that read `portcullis_proxy_upgrades_*` run in a process of their own
// (`harness::run_alone`): the metrics registry is the process's, shared by every instance
// of the tests running alongside, so there a count of `session_ended` or of open
// connections could be another test's. Alone, each count is this test's socket's.

#[test]
fn a_bearer_websocket_is_closed_when_its_client_is_cut_off() {
    harness::run_alone("proxy::a_bearer_websocket_is_closed_when_its_client_is_cut_off_alone");
}

#[tokio::test]
#[ignore = "run in a process of its own by a_bearer_websocket_is_closed_when_its_client_is_cut_off"]
async fn a_bearer_websocket_is_closed_when_its_client_is_cut_off_alone() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| proxy_to(c, &[&node])).await;
    let (client_id, token) = executor_with_token(&app, None).await;
    let mut ws = open_bearer_websocket(&app, &token).await;
    echo(&mut ws, b"registry heartbeat").await;
    assert_eq!(app.sample("portcullis_proxy_upgrades_open").await, 1.0);
    assert_eq!(ended(&app, "cut_off").await, 0.0);

    let cut = reqwest::Client::new()
        .post(format!(
            "http://{}/admin/clients/{client_id}/revoke-tokens",
            app.admin
        ))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(cut.status(), StatusCode::OK);

    // cut on this instance: in force at once, seen by the next check (every 2 s)
    closed_within(&mut ws, Duration::from_secs(10), "after the cutoff").await;
    eventually(
        Duration::from_secs(5),
        "the node's end is closed",
        || async { node.upgraded() == 0 },
    )
    .await;
    assert_eq!(ended(&app, "cut_off").await, 1.0);
    eventually(
        Duration::from_secs(5),
        "the connection is no longer counted open",
        || async { app.sample("portcullis_proxy_upgrades_open").await == 0.0 },
    )
    .await;
}

#[test]
fn a_bearer_websocket_is_closed_when_its_token_expires() {
    harness::run_alone("proxy::a_bearer_websocket_is_closed_when_its_token_expires_alone");
}

/// The instance's clock stands still here, so the periodic check, which judges the token
/// by that clock, accepts it for ever: what closes the connection can only be its own
/// timer, set at the handshake for `exp` plus the leeway (as far ahead in real time as
/// that is ahead of the instance's clock then).
#[tokio::test]
#[ignore = "run in a process of its own by a_bearer_websocket_is_closed_when_its_token_expires"]
async fn a_bearer_websocket_is_closed_when_its_token_expires_alone() {
    let node = AdminNode::start("a").await;
    let clock = Arc::new(keyrotation::ManualClock::new(
        time::OffsetDateTime::now_utc(),
    ));
    let leeway = Duration::from_secs(1);
    let app = spawn_app_with_clock(clock.clone(), |c| {
        proxy_to(c, &[&node]);
        c.tokens.leeway = leeway;
    })
    .await;
    let (_, token) = executor_with_token(&app, Some(Duration::from_secs(3))).await;
    let refused_from = time::OffsetDateTime::from_unix_timestamp(exp_of(&token)).unwrap() + leeway;
    let good_for = Duration::try_from(refused_from - app.state.keys.now()).unwrap();
    let opening = std::time::Instant::now();
    let mut ws = open_bearer_websocket(&app, &token).await;
    echo(&mut ws, b"while the token is good").await;

    closed_within(
        &mut ws,
        good_for + Duration::from_secs(5),
        "after the token expired",
    )
    .await;
    let closed_after = opening.elapsed();
    // not before the last instant a request with the token is accepted, and at it: the
    // checks (every 2 s) cannot have closed it, whatever their alignment
    assert!(
        closed_after + Duration::from_millis(50) >= good_for,
        "closed {closed_after:?} after the handshake, the token is good for {good_for:?}"
    );
    assert!(
        closed_after <= good_for + Duration::from_secs(1),
        "closed {closed_after:?} after the handshake, the token ended after {good_for:?}"
    );
    eventually(
        Duration::from_secs(5),
        "the node's end is closed",
        || async { node.upgraded() == 0 },
    )
    .await;
    assert_eq!(ended(&app, "expired").await, 1.0);
}

#[test]
fn a_console_websocket_is_closed_when_its_user_signs_out() {
    harness::run_alone("proxy::a_console_websocket_is_closed_when_its_user_signs_out_alone");
}

#[tokio::test]
#[ignore = "run in a process of its own by a_console_websocket_is_closed_when_its_user_signs_out"]
async fn a_console_websocket_is_closed_when_its_user_signs_out_alone() {
    let node = AdminNode::start("a").await;
    let redis = harness::Redis::start().unwrap();
    let app = websocket_app(
        &node,
        redis.url(),
        Arc::new(keyrotation::SystemClock),
        |_| {},
    )
    .await;
    let cookie = session_cookie(&app, "carol", &["operator"]).await;
    let mut ws = open_console_websocket(&app, &cookie).await;
    echo(&mut ws, b"job log tail").await;

    let origin = app.state.config.server.public_url.clone();
    let signed_out = client(&app)
        .post(app.url("/auth/logout"))
        .header(header::COOKIE, &cookie)
        .header(header::ORIGIN, &origin)
        .send()
        .await
        .unwrap();
    assert!(
        signed_out.status().is_redirection(),
        "{}",
        signed_out.status()
    );

    closed_within(&mut ws, Duration::from_secs(10), "after signing out").await;
    eventually(
        Duration::from_secs(5),
        "the node's end is closed",
        || async { node.upgraded() == 0 },
    )
    .await;
    assert_eq!(ended(&app, "session_ended").await, 1.0);
}

#[tokio::test]
async fn websockets_whose_credentials_stay_good_stay_open_and_relay_both_ways() {
    let node = AdminNode::start("a").await;
    let app = websocket_app(
        &node,
        harness::Redis::shared().url(),
        Arc::new(keyrotation::SystemClock),
        |_| {},
    )
    .await;
    let cookie = session_cookie(&app, "dave", &["operator"]).await;
    let mut console = open_console_websocket(&app, &cookie).await;
    let (_, token) = executor_with_token(&app, None).await;
    let mut executor = open_bearer_websocket(&app, &token).await;
    assert_eq!(node.upgraded(), 2);

    // nothing to wait for: what is checked is that nothing happens, over three of the
    // bearer checks (2 s) and twenty of the session checks
    tokio::time::sleep(3 * portcullis::proxy::upgrade::BEARER_CHECK_INTERVAL + SESSION_CHECK).await;
    for round in 0..3 {
        echo(&mut console, format!("console {round}").as_bytes()).await;
        echo(&mut executor, format!("executor {round}").as_bytes()).await;
    }
    // this node's two ends are still open (the registry's open count is every test's)
    assert_eq!(node.upgraded(), 2);
}

/// A scheduled rotation and a reload of the ring change the ring, which drops the memory
/// of verified tokens; with the memory off every check verifies the signature. None of
/// that withdraws the token's key, so none of it may close the connection.
#[tokio::test]
async fn a_bearer_websocket_outlives_a_scheduled_rotation_and_ring_reloads_with_the_memory_off() {
    let node = AdminNode::start("a").await;
    let app = spawn_app(|c| {
        proxy_to(c, &[&node]);
        c.tokens.verified_cache_entries = 0;
    })
    .await;
    let (_, token) = executor_with_token(&app, None).await;
    let mut ws = open_bearer_websocket(&app, &token).await;
    echo(&mut ws, b"before the rotation").await;

    app.state.keys.rotate(None).await.unwrap();
    app.state.keys.rotator().reload_once().await.unwrap();
    echo(&mut ws, b"after the rotation").await;

    // nothing to wait for: what is checked is that nothing happens over more than three
    // bearer checks, each a full verification (the memory is off), one reload between
    tokio::time::sleep(2 * portcullis::proxy::upgrade::BEARER_CHECK_INTERVAL).await;
    app.state.keys.rotator().reload_once().await.unwrap();
    tokio::time::sleep(
        portcullis::proxy::upgrade::BEARER_CHECK_INTERVAL + Duration::from_millis(500),
    )
    .await;
    for round in 0..3 {
        echo(&mut ws, format!("executor {round}").as_bytes()).await;
    }
    assert!(app.state.keys.verified_tokens().is_empty());
    assert_eq!(node.upgraded(), 1);
}

#[test]
fn a_bearer_websocket_is_closed_when_its_signing_key_is_withdrawn_and_a_console_one_is_not() {
    harness::run_alone(
        "proxy::a_bearer_websocket_is_closed_when_its_signing_key_is_withdrawn_and_a_console_one_is_not_alone",
    );
}

#[tokio::test]
#[ignore = "run in a process of its own by a_bearer_websocket_is_closed_when_its_signing_key_is_withdrawn_and_a_console_one_is_not"]
async fn a_bearer_websocket_is_closed_when_its_signing_key_is_withdrawn_and_a_console_one_is_not_alone()
 {
    let node = AdminNode::start("a").await;
    let redis = harness::Redis::start().unwrap();
    let app = websocket_app(
        &node,
        redis.url(),
        Arc::new(keyrotation::SystemClock),
        |_| {},
    )
    .await;
    let cookie = session_cookie(&app, "erin", &["operator"]).await;
    let mut console = open_console_websocket(&app, &cookie).await;
    let mut executor = open_bearer_websocket(&app, &token(&app, "scheduler:executor", &[])).await;
    echo(&mut executor, b"before").await;

    emergency_rotation(&app.state).await;

    closed_within(
        &mut executor,
        Duration::from_secs(10),
        "after the key was withdrawn",
    )
    .await;
    assert_eq!(ended(&app, "key_withdrawn").await, 1.0);
    // the console session lives on: its browser renews its access token from the refresh
    // cookie, whose family the rotation leaves alone
    echo(&mut console, b"still here").await;
    // the node's end of the executor's relay closes after the client's
    eventually(
        Duration::from_secs(5),
        "the node's end of the executor's relay is closed, the console's open",
        || async { node.upgraded() == 1 },
    )
    .await;
    assert_eq!(ended(&app, "session_ended").await, 0.0);
}

#[test]
fn a_console_websocket_is_closed_at_the_sessions_maximum_lifetime() {
    harness::run_alone(
        "proxy::a_console_websocket_is_closed_at_the_sessions_maximum_lifetime_alone",
    );
}

/// On a clock of the test's: a check a minute before the end keeps the connection, and
/// the end closes it by the timer that check set, not by a later check: the clock stands
/// still two seconds before the end, where every check finds the session alive.
#[tokio::test]
#[ignore = "run in a process of its own by a_console_websocket_is_closed_at_the_sessions_maximum_lifetime"]
async fn a_console_websocket_is_closed_at_the_sessions_maximum_lifetime_alone() {
    let node = AdminNode::start("a").await;
    let redis = harness::Redis::start().unwrap();
    let clock = Arc::new(keyrotation::ManualClock::new(
        time::OffsetDateTime::now_utc(),
    ));
    let app = websocket_app(&node, redis.url(), clock.clone(), |_| {}).await;
    let max = time::Duration::try_from(app.state.config.sso.session_max_lifetime).unwrap();
    let cookie = session_cookie(&app, "frank", &["operator"]).await;
    let mut ws = open_console_websocket(&app, &cookie).await;
    echo(&mut ws, b"early").await;

    clock.advance(max - time::Duration::minutes(1));
    // nothing to wait for: a check (every 300 ms) runs at a minute before the end, and
    // nothing happens
    tokio::time::sleep(2 * SESSION_CHECK).await;
    echo(&mut ws, b"a minute before the end").await;

    clock.advance(time::Duration::minutes(1) - time::Duration::seconds(2));
    let two_seconds_before = std::time::Instant::now();
    tokio::time::sleep(2 * SESSION_CHECK).await;
    echo(&mut ws, b"two seconds before the end").await;

    closed_within(&mut ws, Duration::from_secs(10), "at the maximum lifetime").await;
    let closed_after = two_seconds_before.elapsed();
    // the check that first saw the clock at two seconds before the end ran within one
    // interval of it, and set the timer two seconds on
    assert!(
        closed_after >= Duration::from_millis(1950),
        "closed {closed_after:?} after two seconds before the end"
    );
    assert!(
        closed_after <= Duration::from_secs(2) + SESSION_CHECK + Duration::from_secs(1),
        "closed {closed_after:?} after two seconds before the end"
    );
    assert_eq!(ended(&app, "session_ended").await, 1.0);
}

#[test]
fn a_console_websocket_is_closed_at_the_sessions_maximum_lifetime_before_its_first_interval() {
    harness::run_alone(
        "proxy::a_console_websocket_is_closed_at_the_sessions_maximum_lifetime_before_its_first_interval_alone",
    );
}

/// The session's maximum lifetime bounds the connection from its start, not from the
/// first periodic check: here the checks come hourly and the session lives 4 s.
#[tokio::test]
#[ignore = "run in a process of its own by a_console_websocket_is_closed_at_the_sessions_maximum_lifetime_before_its_first_interval"]
async fn a_console_websocket_is_closed_at_the_sessions_maximum_lifetime_before_its_first_interval_alone()
 {
    let node = AdminNode::start("a").await;
    let redis = harness::Redis::start().unwrap();
    let max = Duration::from_secs(4);
    let app = websocket_app(
        &node,
        redis.url(),
        Arc::new(keyrotation::SystemClock),
        |c| {
            c.proxy.upgrade_session_check_interval = Duration::from_secs(3600);
            c.sso.access_token_lifetime = Duration::from_secs(2);
            c.sso.session_max_lifetime = max;
        },
    )
    .await;
    let login = std::time::Instant::now();
    let cookie = session_cookie(&app, "ivan", &["operator"]).await;
    let mut ws = open_console_websocket(&app, &cookie).await;
    echo(&mut ws, b"while the session lives").await;

    closed_within(
        &mut ws,
        max + Duration::from_secs(3),
        "at the maximum lifetime",
    )
    .await;
    // the login is whole seconds in the family: the end may come up to a second early
    assert!(
        login.elapsed() + Duration::from_secs(1) >= max,
        "closed {:?} after the login",
        login.elapsed()
    );
    assert_eq!(ended(&app, "session_ended").await, 1.0);
}

#[test]
fn a_console_websocket_outlives_a_short_refresh_store_outage_and_is_closed_by_a_long_one() {
    harness::run_alone(
        "proxy::a_console_websocket_outlives_a_short_refresh_store_outage_and_is_closed_by_a_long_one_alone",
    );
}

/// While the refresh store cannot be reached a console WebSocket lasts as long as a
/// console access cookie would (`sso.access_token_lifetime` plus `tokens.leeway`, 3 s
/// here) from the last check that reached the store: a shorter outage leaves it open, a
/// longer one closes it, as console requests stop when their cookie expires and cannot
/// be renewed.
#[tokio::test]
#[ignore = "run in a process of its own by a_console_websocket_outlives_a_short_refresh_store_outage_and_is_closed_by_a_long_one"]
async fn a_console_websocket_outlives_a_short_refresh_store_outage_and_is_closed_by_a_long_one_alone()
 {
    let node = AdminNode::start("a").await;
    let redis = harness::Redis::start_persistent().unwrap();
    let lifetime = Duration::from_secs(2);
    let leeway = Duration::from_secs(1);
    let bound = lifetime + leeway;
    let app = websocket_app(
        &node,
        redis.url(),
        Arc::new(keyrotation::SystemClock),
        |c| {
            c.sso.access_token_lifetime = lifetime;
            c.tokens.leeway = leeway;
        },
    )
    .await;
    let grace = session_cookie(&app, "grace", &["operator"]).await;
    let henry = session_cookie(&app, "henry", &["operator"]).await;
    let mut signed_out_later = open_console_websocket(&app, &grace).await;
    let mut ws = open_console_websocket(&app, &henry).await;
    echo(&mut ws, b"before the outage").await;
    let failures = "portcullis_proxy_upgrade_session_check_failures_total";

    // a short outage: both sockets' checks fail, twice each, and the store is back before
    // the bound
    let stopped = std::time::Instant::now();
    redis.stop();
    eventually(
        Duration::from_secs(20),
        "two session checks of each socket failed",
        || async { app.sample(failures).await >= 4.0 },
    )
    .await;
    echo(&mut ws, b"during the outage").await;
    redis.restart().unwrap();
    let short = stopped.elapsed();
    assert!(short < bound, "the short outage took {short:?}");
    eventually(
        Duration::from_secs(20),
        "the refresh store answers again",
        || {
            let store = app.state.refresh.clone();
            async move {
                store
                    .list_sessions("test:grace", time::OffsetDateTime::now_utc())
                    .await
                    .is_ok()
            }
        },
    )
    .await;
    // past the bound counted from the outage's start: the checks since the store came
    // back confirmed both sessions (nothing to wait for but time)
    tokio::time::sleep((bound + SESSION_CHECK).saturating_sub(stopped.elapsed())).await;
    echo(&mut ws, b"after the outage").await;
    echo(&mut signed_out_later, b"after the outage").await;
    assert_eq!(ended(&app, "session_unverifiable").await, 0.0);

    // once the store answers again, a sign-out is seen as before
    let revoked = app
        .state
        .refresh
        .revoke_subject("test:grace")
        .await
        .unwrap();
    assert_eq!(revoked, 1);
    closed_within(
        &mut signed_out_later,
        Duration::from_secs(10),
        "after sign-out everywhere",
    )
    .await;
    assert_eq!(ended(&app, "session_ended").await, 1.0);

    // a long outage: open through failed checks up to the bound, closed after it
    let stopped = std::time::Instant::now();
    redis.stop();
    tokio::time::sleep(bound / 2).await;
    echo(&mut ws, b"half the bound into the outage").await;
    closed_within(
        &mut ws,
        bound + Duration::from_secs(5),
        "when the session stayed unconfirmed past the bound",
    )
    .await;
    let closed_after = stopped.elapsed();
    // last confirmed by the check before the stop, at most one interval earlier
    assert!(
        closed_after + SESSION_CHECK + Duration::from_millis(50) >= bound,
        "closed {closed_after:?} into the outage, the bound is {bound:?}"
    );
    assert!(app.sample(failures).await >= 6.0);
    assert_eq!(ended(&app, "session_unverifiable").await, 1.0);
    assert_eq!(ended(&app, "session_ended").await, 1.0);
}

// === upgraded connections at shutdown ===

/// Waits up to `deadline` for the gateway to close `ws` properly: TLS `close_notify`, then
/// the end of the stream. A connection dropped without them is a read error here, and
/// fails as one that stays open does.
async fn closed_properly_within(ws: &mut Socket, deadline: Duration, what: &str) {
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(deadline, async {
        loop {
            match ws.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{what}: the WebSocket was dropped, not closed: {e}"),
        Err(_) => panic!("{what}: the WebSocket is still open after {deadline:?}"),
    }
}

#[test]
fn open_websockets_are_closed_when_shutdown_starts_while_requests_keep_the_grace() {
    harness::run_alone(
        "proxy::open_websockets_are_closed_when_shutdown_starts_while_requests_keep_the_grace_alone",
    );
}

/// A rolling restart: once the instance is told to stop, its open WebSockets (of an
/// authenticated route and of a public one) are closed at once, both ends told, so that
/// their clients reconnect through another instance; an ordinary request in flight still
/// has the grace to finish, and the instance stops when it has, not at the grace's end.
#[tokio::test]
#[ignore = "run in a process of its own by open_websockets_are_closed_when_shutdown_starts_while_requests_keep_the_grace"]
async fn open_websockets_are_closed_when_shutdown_starts_while_requests_keep_the_grace_alone() {
    let node = AdminNode::start("a").await;
    let grace = Duration::from_secs(20);
    let (app, running) = spawn_running_app(|c| {
        proxy_to(c, &[&node]);
        c.server.shutdown_grace = grace;
    })
    .await;
    let (_, token) = executor_with_token(&app, None).await;
    let mut bearer = open_bearer_websocket(&app, &token).await;
    let mut public = open_websocket(&app, "/public/ws", &[]).await;
    echo(&mut bearer, b"registry heartbeat").await;
    echo(&mut public, b"public heartbeat").await;
    assert_eq!(node.upgraded(), 2);
    // an ordinary request in flight: an event stream whose last event comes 4 s on
    let mut events = client(&app)
        .get(app.url("/public/events?quiet_ms=4000"))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let first = events.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: first\n\n");

    let stopping = std::time::Instant::now();
    app.stop.cancel();
    closed_properly_within(&mut bearer, Duration::from_secs(2), "the bearer WebSocket").await;
    closed_properly_within(&mut public, Duration::from_secs(2), "the public WebSocket").await;
    eventually(
        Duration::from_secs(2),
        "the node's ends are closed",
        || async { node.upgraded() == 0 },
    )
    .await;
    // the admin listener is closed by now: the registry is read in process
    let scrape = app.state.metrics.render();
    assert_eq!(
        sample(
            &scrape,
            "portcullis_proxy_upgrades_ended_total{reason=\"shutdown\"}"
        ),
        2.0
    );
    assert_eq!(sample(&scrape, "portcullis_proxy_upgrades_open"), 0.0);

    // the request in flight is answered in full, after the WebSockets are gone
    let last = events.chunk().await.unwrap().unwrap();
    assert_eq!(&last[..], b"data: last\n\n");
    assert!(events.chunk().await.unwrap().is_none());
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the instance did not stop after its last request")
        .unwrap()
        .expect("no task of the instance failed");
    assert!(
        stopping.elapsed() < grace / 2,
        "the instance took {:?} to stop, its grace is {grace:?}",
        stopping.elapsed()
    );
}

/// A node the proxy holds down stays down when the runtime settings change the list
/// around it; a node added starts healthy.
#[tokio::test]
async fn a_node_held_down_stays_down_when_the_runtime_settings_add_another() {
    let (a, b, c) = (
        AdminNode::start("a").await,
        AdminNode::start("b").await,
        AdminNode::start("c").await,
    );
    let app = spawn_app(|cfg| {
        proxy_to(cfg, &[&a, &b]);
        cfg.config_center.runtime_environment = Some("dev".to_owned());
    })
    .await;
    let proxy = app.state.proxy.clone().unwrap();
    let authority = |node: &AdminNode| node.url().trim_start_matches("http://").to_owned();
    let health = |node: &AdminNode| {
        proxy
            .upstreams()
            .nodes()
            .iter()
            .find(|n| n.authority == authority(node))
            .map(|n| n.healthy())
    };
    let index_of_b = proxy
        .upstreams()
        .nodes()
        .iter()
        .position(|n| n.authority == authority(&b))
        .unwrap();
    for _ in 0..app.state.config.proxy.health.failures {
        proxy.upstreams().record(
            index_of_b,
            portcullis::proxy::upstream::Outcome::ConnectError,
        );
    }
    assert_eq!(health(&b), Some(false), "b is held down");

    let r = client(&app)
        .put(app.url("/config/v1/dev/portcullis"))
        .bearer_auth(token(
            &app,
            "config:read:dev config:write:dev:portcullis",
            &[],
        ))
        .json(&serde_json::json!({ "entries": [{
            "key": "proxy.upstreams",
            "value": format!("{},{},{}", a.url(), b.url(), c.url()),
        }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    eventually(Duration::from_secs(10), "c is listed", || async {
        health(&c).is_some()
    })
    .await;
    assert_eq!(health(&a), Some(true));
    assert_eq!(health(&b), Some(false), "b came back with the new list");
    assert_eq!(health(&c), Some(true), "a new node starts healthy");
}

#[tokio::test]
async fn admin_nodes_follow_the_runtime_settings_without_a_restart() {
    let (a, b) = (AdminNode::start("a").await, AdminNode::start("b").await);
    let app = spawn_app(|c| {
        proxy_to(c, &[&a]);
        c.config_center.runtime_environment = Some("dev".to_owned());
    })
    .await;
    let http = client(&app);
    let served_by = |http: reqwest::Client, url: String| async move {
        let r = http.get(url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        node_of(&json(r).await)
    };
    let ping = app.url("/public/ping");
    assert_eq!(served_by(http.clone(), ping.clone()).await, "a");

    let publish = |entries: serde_json::Value| {
        let (http, app) = (http.clone(), &app);
        async move {
            let r = http
                .put(app.url("/config/v1/dev/portcullis"))
                .bearer_auth(token(
                    app,
                    "config:read:dev config:write:dev:portcullis",
                    &[],
                ))
                .json(&serde_json::json!({ "entries": entries }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
        }
    };
    publish(serde_json::json!([{ "key": "proxy.upstreams", "value": b.url() }])).await;
    eventually(Duration::from_secs(10), "requests move to b", || {
        let (http, ping) = (http.clone(), ping.clone());
        async move { served_by(http, ping).await == "b" }
    })
    .await;
    // an unusable list is not published (400, as the file would refuse it): b stays
    for list in [
        "ftp://nowhere:21".to_owned(),
        format!("{},{}/", b.url(), b.url()),
    ] {
        let r = http
            .put(app.url("/config/v1/dev/portcullis"))
            .bearer_auth(token(
                &app,
                "config:read:dev config:write:dev:portcullis",
                &[],
            ))
            .json(&serde_json::json!({ "entries": [{ "key": "proxy.upstreams", "value": list }] }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{list}");
        assert_eq!(json(r).await["error"], "invalid_setting", "{list}");
    }
    for _ in 0..4 {
        assert_eq!(served_by(http.clone(), ping.clone()).await, "b");
    }
    // removing the key goes back to the configuration file's nodes
    publish(serde_json::json!([])).await;
    eventually(Duration::from_secs(10), "requests are back on a", || {
        let (http, ping) = (http.clone(), ping.clone());
        async move { served_by(http, ping).await == "a" }
    })
    .await;
}
