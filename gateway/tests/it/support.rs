//! Helpers: a throwaway PKI, `spawn_app` on port 0, TLS clients that can tell which
//! certificate the server presented.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::app::Application;
use portcullis::config::{self, Config};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A CA and the leaves it signs; clients trust the CA only.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and key, as PEM, plus its DER to compare with what a server sent.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Pki {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // distinct names for the CA and its leaves: OpenSSL-based clients (Python) take a
        // leaf whose issuer equals its own subject for a self-signed certificate
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Portcullis test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { ca }
    }

    pub fn leaf(&self) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

/// Writes a leaf's files into `dir` (the key first, then the certificate, each by rename,
/// as a certificate manager would).
pub fn install_leaf(dir: &Path, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    for (path, text) in [(&key, &leaf.key_pem), (&cert, &leaf.cert_pem)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    (cert, key)
}

/// A configuration for an in-process instance: port 0 listeners, SQLite and a key ring
/// file in `dir`, the given certificate.
pub fn test_config(dir: &Path, leaf: &Leaf) -> Config {
    let (cert, key) = install_leaf(dir, leaf);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         shutdown_grace = \"5s\"\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_interval = \"100ms\"\n\
         [database]\nurl = \"sqlite://{}/portcullis.db\"\n\
         [tokens]\nhash_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n[keys]\nsource = \"file\"\nfile_dir = \"{}\"\n",
        cert.display(),
        key.display(),
        dir.display(),
        dir.display()
    );
    let table: toml::Table = toml::from_str(&text).unwrap();
    config::from_table(table, std::iter::empty()).unwrap()
}

/// An instance running in this process.
pub struct TestApp {
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub pki: Pki,
    pub dir: tempfile::TempDir,
    pub stop: tokio_util::sync::CancellationToken,
    /// The instance's shared state (clients, refresh store, keys, database).
    pub state: portcullis::state::AppState,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // free the listeners and background tasks of this test's instance
        self.stop.cancel();
    }
}

pub async fn spawn_app(customize: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_with_clock(Arc::new(keyrotation::SystemClock), customize).await
}

/// Like [`spawn_app`], with the clock keys, tokens and refresh-token expiry follow; waits
/// until the schema is migrated and a signing key is loaded.
pub async fn spawn_app_with_clock(
    clock: Arc<dyn keyrotation::Clock>,
    customize: impl FnOnce(&mut Config),
) -> TestApp {
    spawn_running_app_with_clock(clock, customize).await.0
}

/// The run of an instance: ends once the instance has stopped.
pub type Running = tokio::task::JoinHandle<Result<(), portcullis::app::TaskFailed>>;

/// Like [`spawn_app`], with the instance's run, for a test that waits for it to stop.
pub async fn spawn_running_app(customize: impl FnOnce(&mut Config)) -> (TestApp, Running) {
    spawn_running_app_with_clock(Arc::new(keyrotation::SystemClock), customize).await
}

/// [`spawn_app_with_clock`], with the instance's run.
pub async fn spawn_running_app_with_clock(
    clock: Arc<dyn keyrotation::Clock>,
    customize: impl FnOnce(&mut Config),
) -> (TestApp, Running) {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &pki.leaf());
    customize(&mut config);
    config.validate().unwrap();
    let app = Application::build_with_clock(config, clock).await.unwrap();
    let (https, admin, stop) = (app.https_addr(), app.admin_addr(), app.shutdown_token());
    let state = app.state().clone();
    let running = tokio::spawn(app.run_until_stopped());
    wait_until_ready(&state).await;
    let app = TestApp {
        https,
        admin,
        pki,
        dir,
        stop,
        state,
    };
    (app, running)
}

impl TestApp {
    /// The instance's Prometheus scrape, from its admin listener.
    pub async fn metrics(&self) -> String {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of `series` in the instance's scrape; see [`sample`].
    pub async fn sample(&self, series: &str) -> f64 {
        sample(&self.metrics().await, series)
    }

    /// [`Self::sample`] of a gauge the instance sets at each scrape, which every instance
    /// of the test process shares: another test's scrape may set it between this one's
    /// setting and rendering it. Scrapes again until it reads `expected`, for up to 5 s,
    /// and returns the last value read (so a gauge this instance sets wrong still fails).
    pub async fn scrape_gauge(&self, series: &str, expected: f64) -> f64 {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let value = self.sample(series).await;
            if value == expected || Instant::now() > end {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `claims` signed with this instance's active key (read from its key ring file) under
    /// a header of the test's choosing: `alg` and `kid` as the instance signs, `typ` as
    /// given (`None`: no `typ` at all). Tokens of ours that the gateway itself never makes,
    /// such as another kind of JWT.
    pub fn sign_with_typ(&self, typ: Option<&str>, claims: &impl serde::Serialize) -> String {
        use base64::Engine as _;
        let kid = self.state.keys.status().active_kid.unwrap();
        let stored: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.dir.path().join("keyring.json")).unwrap())
                .unwrap();
        let record = stored["ring"]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .unwrap();
        assert_eq!(record["alg"], "ES256", "the test instances sign with ES256");
        let der = base64::engine::general_purpose::STANDARD
            .decode(record["private_key"].as_str().unwrap())
            .unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.to_string());
        header.typ = typ.map(str::to_owned);
        jsonwebtoken::encode(
            &header,
            claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&der),
        )
        .unwrap()
    }

    pub async fn tls(&self) -> TlsStream<TcpStream> {
        tls_connect(self.https, self.pki.client_config()).await
    }

    /// An HTTP/2 connection (ALPN `h2`) to this instance; its driver runs in a task.
    pub async fn http2(
        &self,
    ) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
        let mut config = (*self.pki.client_config()).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tls = tls_connect(self.https, Arc::new(config)).await;
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        send
    }

    /// A reqwest client that trusts this instance's certificate; use [`Self::url`].
    pub fn https_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.pki.ca_pem().as_bytes()).unwrap(),
            )
            .tls_built_in_root_certs(false)
            .resolve("localhost", self.https)
            .build()
            .unwrap()
    }

    /// `https://localhost:<port><path>` of this instance.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https.port())
    }

    /// Writes `name` next to this instance's certificate and key ring: a configuration for
    /// an operator command (`portcullis audit|users …`) on `database_url`, with `extra`
    /// TOML appended; returns its path.
    pub fn cli_config(&self, name: &str, database_url: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [tls]\ncert = \"{dir}/cert.pem\"\nkey = \"{dir}/key.pem\"\n\
             [database]\nurl = \"{database_url}\"\n\
             [tokens]\nhash_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n\
             [keys]\nsource = \"file\"\nfile_dir = \"{dir}\"\n{extra}",
            dir = self.dir.path().display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// POSTs `form` to `url` as client `id` with HTTP Basic `secret` (the token,
/// introspection and revocation endpoints).
pub async fn post_as_client(
    http: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    id: &str,
    secret: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    http.post(url)
        .basic_auth(id, Some(secret))
        .form(form)
        .send()
        .await
        .unwrap()
}

pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// The end-entity certificate the server presented on this connection.
pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// An HTTP/1.1 client on one TLS connection (keep-alive: several requests reuse it).
pub struct Conn {
    send: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
}

impl Conn {
    pub async fn over(stream: TlsStream<TcpStream>) -> Self {
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        Self { send }
    }

    pub async fn request(
        &mut self,
        req: http::Request<http_body_util::Full<bytes::Bytes>>,
    ) -> Result<(http::response::Parts, bytes::Bytes), hyper::Error> {
        use http_body_util::BodyExt;
        let resp = self.send.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((parts, body))
    }

    pub async fn get(
        &mut self,
        path: &str,
    ) -> Result<(http::response::Parts, bytes::Bytes), hyper::Error> {
        self.request(
            http::Request::get(path)
                .header("host", "localhost")
                .body(http_body_util::Full::default())
                .unwrap(),
        )
        .await
    }
}

/// Whether `metrics` (the Prometheus text) counts a request on `route` answered (or
/// ended) with `status` in `portcullis_http_requests_total`.
pub fn counted(metrics: &str, route: &str, status: u16) -> bool {
    let (route, status) = (format!("route=\"{route}\""), format!("status=\"{status}\""));
    metrics.lines().any(|l| {
        l.starts_with("portcullis_http_requests_total{")
            && l.contains(&route)
            && l.contains(&status)
    })
}

/// Reads an HTTP/1.1 response head from `io`, byte by byte so nothing after it is taken
/// (a streamed body follows); panics if the connection closes first.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(io.read(&mut byte).await.unwrap(), 1, "closed in the head");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A session of its own on the Postgres at `db`, inside a transaction that has run `lock`
/// (a statement that takes a lock, held until the session rolls back or goes away).
pub async fn session_holding(db: &str, lock: &str) -> sqlx::PgConnection {
    use sqlx::Connection as _;
    let mut session = sqlx::PgConnection::connect(db).await.unwrap();
    sqlx::query("BEGIN").execute(&mut session).await.unwrap();
    sqlx::query(lock).execute(&mut session).await.unwrap();
    session
}

/// Waits (up to 10 s) until a session of the Postgres database at `db` waits on a lock:
/// `what`, held up by a test's [`session_holding`].
pub async fn until_a_session_waits_on_a_lock(db: &str, what: &str) {
    let observer = sqlx::PgPool::connect(db).await.unwrap();
    eventually(
        Duration::from_secs(10),
        &format!("{what} waits on the lock"),
        || {
            let observer = observer.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&observer)
                .await
                .unwrap();
                waiting > 0
            }
        },
    )
    .await;
    observer.close().await;
}

/// Polls `probe` until it returns true or `deadline` passes.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if probe().await {
            return;
        }
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An emergency rotation of `state`'s ring that withdraws every verifying key, as after
/// a signing key was stolen.
pub async fn emergency_rotation(state: &portcullis::state::AppState) {
    state
        .keys
        .rotate(Some((
            "signing key copied off a laptop".to_owned(),
            keyrotation::Suspects::EveryVerifyingKey,
        )))
        .await
        .unwrap();
}

/// Waits (up to 20 s) until `state`'s schema is migrated and its key ring loaded, as
/// an instance is before it serves.
pub async fn wait_until_ready(state: &portcullis::state::AppState) {
    eventually(
        Duration::from_secs(20),
        "schema migrated and keys loaded",
        || {
            let s = state.clone();
            async move { s.db.is_migrated() && s.keys.readiness().is_ok() }
        },
    )
    .await;
}

/// Waits (up to `deadline`) until the audit trail of `state` holds an `action` event by
/// `actor` among its ten most recent ones of that action.
pub async fn wait_for_audit_actor(
    state: &portcullis::state::AppState,
    deadline: Duration,
    action: &str,
    actor: &str,
) {
    eventually(deadline, &format!("{action} by {actor} is stored"), || {
        let db = state.db.clone();
        async move {
            portcullis::audit::recent(&db, action, 10)
                .await
                .unwrap_or_default()
                .iter()
                .any(|(a, _, _)| a == actor)
        }
    })
    .await;
}

/// Registers a client through `state`'s store (as `portcullis clients create` does) with
/// `grants` and `scopes`; returns its id and secret.
pub async fn register_client(
    state: &portcullis::state::AppState,
    name: &str,
    grants: &[portcullis::clients::GrantType],
    scopes: &str,
) -> (String, String) {
    use secrecy::ExposeSecret as _;
    let (client, secret) = state
        .clients
        .create(
            portcullis::clients::NewClient {
                id: None,
                name: name.to_owned(),
                grant_types: grants.iter().copied().collect(),
                scopes: portcullis::clients::ScopeSet::parse(scopes).unwrap(),
                audiences: vec![],
                access_token_lifetime: None,
            },
            state.keys.now(),
        )
        .await
        .unwrap();
    (client.id.to_string(), secret.expose_secret().to_owned())
}

/// Path of the built `portcullis` binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_portcullis")
}

/// The `portcullis` binary as a child process, killed on drop.
pub struct Child {
    pub child: std::process::Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Child {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_env(args, &[])
    }

    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("portcullis.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(binary())
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_BACKTRACE", "1")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit, up to `deadline`.
    pub async fn wait(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- portcullis output ---\n{}", self.output());
        }
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_for_port(addr: SocketAddr) {
    eventually(Duration::from_secs(20), "listener up", || async {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;
}

/// The value of `series` — a name, with its labels exactly as the scrape renders them —
/// in `scrape`, 0 when absent.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The value of `series` (as [`sample`] takes it) in a scrape of the admin listener
/// `admin`; `None` when absent or the scrape failed.
pub async fn scraped(admin: SocketAddr, series: &str) -> Option<f64> {
    let scrape = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The names of the cookies a response clears (`Max-Age=0`).
pub fn cleared_cookies(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|c| c.contains("Max-Age=0"))
        .filter_map(|c| c.split_once('=').map(|(k, _)| k.to_owned()))
        .collect()
}
