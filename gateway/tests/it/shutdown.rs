//! Graceful shutdown: in-flight requests finish, new connections are refused.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use portcullis::server::{ConnectionLimits, serve_https};
use portcullis::tls::ReloadableTls;
use portcullis::workers::Workers;
use tokio_util::sync::CancellationToken;

use super::support::*;

#[tokio::test]
async fn in_flight_request_finishes_after_shutdown_starts() {
    in_flight_request_finishes(None).await;
}

#[tokio::test]
async fn in_flight_request_on_a_connection_worker_finishes_after_shutdown_starts() {
    let workers = std::sync::Arc::new(Workers::start(2).unwrap());
    in_flight_request_finishes(Some(workers.clone())).await;
    // the listener's loop has let go of them; the instance drops them last
    assert_eq!(std::sync::Arc::strong_count(&workers), 1);
}

async fn in_flight_request_finishes(workers: Option<std::sync::Arc<Workers>>) {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = install_leaf(dir.path(), &pki.leaf());
    let tls = ReloadableTls::load(&cert, &key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<Option<usize>>();
    let entered_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(entered_tx)));
    let router = Router::new().route(
        "/slow",
        get(move || {
            let entered = entered_tx.clone();
            async move {
                if let Some(tx) = entered.lock().unwrap().take() {
                    let _ = tx.send(portcullis::workers::current());
                }
                tokio::time::sleep(Duration::from_millis(700)).await;
                "finished"
            }
        }),
    );
    let stop = CancellationToken::new();
    let limits = ConnectionLimits {
        tls_handshake_timeout: Duration::from_secs(5),
        header_read_timeout: Duration::from_secs(5),
        max_header_bytes: 16 * 1024,
        max_connections: 100,
        shutdown_grace: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
    };
    let on_workers = workers.is_some();
    let server = tokio::spawn(serve_https(
        listener,
        tls,
        router,
        limits,
        workers,
        stop.clone(),
    ));

    let mut conn = Conn::over(tls_connect(addr, pki.client_config()).await).await;
    let in_flight = tokio::spawn(async move { conn.get("/slow").await });
    let served_by = entered_rx.await.unwrap();
    assert_eq!(
        served_by.is_some(),
        on_workers,
        "served on a connection worker exactly when there are workers"
    );
    stop.cancel();

    // new connections are refused once the listener has closed
    eventually(Duration::from_secs(5), "listener closed", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    let (parts, body) = in_flight.await.unwrap().unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"finished");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server did not finish after its last request")
        .unwrap();
}

#[tokio::test]
async fn sigterm_stops_the_binary_cleanly_after_answering_an_in_flight_request() {
    // the database "server" accepts connections and never answers, so /readyz takes
    // its full check deadline (2 s): a genuinely slow in-flight request
    let blackhole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let db_port = blackhole.local_addr().unwrap().port();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = blackhole.accept().await {
            held.push(s);
            let _ = accepted_tx.send(());
        }
    });
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = install_leaf(dir.path(), &pki.leaf());
    let (https, admin) = (harness::free_port(), harness::free_port());
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{https}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             shutdown_grace = \"10s\"\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [database]\nurl = \"postgres://p@127.0.0.1:{db_port}/p\"\nacquire_timeout = \"30s\"\n\
             min_connections = 0\n\
             [tokens]\nhash_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n[keys]\nsource = \"file\"\nfile_dir = \"{}\"\n",
            cert.display(),
            key.display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let mut child = Child::spawn(&["serve", "--config", config.to_str().unwrap()]);
    let admin_addr = format!("127.0.0.1:{admin}").parse().unwrap();
    wait_for_port(admin_addr).await;

    // the migration task holds the first database connection, and the instance's own
    // dependency probe (every 5 s, the first at start) tries another; the readiness
    // request opens the next, which is how we know it is in flight (`min_connections = 0`
    // above: the pool opens no connection of its own in the background)
    accepted.recv().await.unwrap();
    while tokio::time::timeout(Duration::from_millis(500), accepted.recv())
        .await
        .is_ok()
    {}
    let client = reqwest::Client::new();
    let probe = tokio::spawn(async move {
        client
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .await
    });
    tokio::time::timeout(Duration::from_secs(10), accepted.recv())
        .await
        .expect("the readiness probe never reached the database");
    // its handler is waiting on the database (for up to its 2 s check deadline)
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.signal("TERM");
    let response = probe
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("in-flight request was cut off: {e:?}\n{}", child.output()));
    assert_eq!(response.status(), 503);
    let status = child
        .wait(Duration::from_secs(15))
        .await
        .expect("did not exit");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        child.output()
    );
    assert!(child.output().contains("SIGTERM"), "{}", child.output());
}

// === the audit trail at shutdown ===

/// An instance on the Postgres database `url`, run in the background; the handle ends
/// when `run_until_stopped` has returned.
async fn pg_instance(
    url: &str,
) -> (
    Pki,
    tempfile::TempDir,
    portcullis::app::Application,
    portcullis::state::AppState,
) {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &pki.leaf());
    config.database.url = secrecy::SecretString::from(url.to_owned());
    config.validate().unwrap();
    let app = portcullis::app::Application::build(config).await.unwrap();
    let state = app.state().clone();
    wait_until_ready(&state).await;
    (pki, dir, app, state)
}

/// Reads the response on `tls` up to the end of its head; returns it.
async fn read_head(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut byte))
            .await
            .expect("no response")
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// The writer used to stop with the listeners: a request answered during the grace
/// period recorded its event into a closed queue, and the event was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_event_of_a_request_answered_during_shutdown_is_stored() {
    use base64::Engine as _;
    use secrecy::ExposeSecret;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let db = harness::Postgres::shared()
        .fresh_database("shutdown_audit")
        .unwrap();
    let (pki, _dir, app, state) = pg_instance(&db).await;
    let (https, stop) = (app.https_addr(), app.shutdown_token());
    let running = tokio::spawn(app.run_until_stopped());
    let (client, secret) = state
        .clients
        .create(
            portcullis::clients::NewClient {
                id: Some("svc-shutdown".parse().unwrap()),
                name: "shutdown".to_owned(),
                grant_types: std::collections::BTreeSet::from([
                    portcullis::clients::GrantType::ClientCredentials,
                ]),
                scopes: portcullis::clients::ScopeSet::parse("jobs:run").unwrap(),
                audiences: vec![],
                access_token_lifetime: None,
            },
            state.keys.now(),
        )
        .await
        .unwrap();

    // a token request whose body is held back: `Expect: 100-continue` makes the server
    // say when the handler starts reading it, so the request is surely in flight
    let body = "grant_type=client_credentials";
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        client.id,
        secret.expose_secret()
    ));
    let mut tls = tls_connect(https, pki.client_config()).await;
    tls.write_all(
        format!(
            "POST /oauth2/token HTTP/1.1\r\nhost: localhost\r\nauthorization: Basic {basic}\r\n\
             content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\
             expect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    let interim = read_head(&mut tls).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");

    stop.cancel();
    eventually(Duration::from_secs(5), "listener closed", || async {
        tokio::net::TcpStream::connect(https).await.is_err()
    })
    .await;
    // the listeners are closed and shutdown is under way; now the request completes
    tls.write_all(body.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("a content-length");
    let mut json = vec![0u8; length];
    tls.read_exact(&mut json).await.unwrap();
    let token: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let jwt = token["access_token"].as_str().unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let jti = claims["jti"].as_str().unwrap();

    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the instance did not stop")
        .unwrap()
        .expect("no task of the instance failed");
    let stored = harness::Postgres::shared()
        .psql(
            db.rsplit('/').next().unwrap(),
            &format!(
                "SELECT count(*) FROM audit_events WHERE action = 'token.issue' AND target = '{jti}'"
            ),
        )
        .unwrap();
    assert_eq!(
        stored.trim(),
        "1",
        "the token answered during shutdown is not in the trail"
    );
}

/// The writer outlives the listeners, but not for ever: with the database gone, the
/// instance still stops within the grace period, the writer's own deadline (the events
/// it could not store go to the log) and a bounded wait for the pool to close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_database_is_gone_still_stops_in_bounded_time() {
    let pg = harness::Postgres::start().unwrap();
    let db = pg.fresh_database("gone").unwrap();
    let (_pki, _dir, app, state) = pg_instance(&db).await;
    let stop = app.shutdown_token();
    let running = tokio::spawn(app.run_until_stopped());
    // a connection in use when the database goes away (a request's query), released
    // after: the pool then reopens its minimum connections in the background
    let in_use = match state.db.pool() {
        portcullis::db::Pool::Postgres(p) => p.acquire().await.unwrap(),
        portcullis::db::Pool::Sqlite(_) => unreachable!("the instance runs on Postgres"),
    };
    pg.stop();
    drop(in_use);
    let at = time::OffsetDateTime::now_utc();
    for n in 0..3 {
        state.audit.record(portcullis::audit::AuditEvent {
            at,
            actor: "operator:test".to_owned(),
            action: "test.unstored".to_owned(),
            target: n.to_string(),
            source_ip: None,
            detail: serde_json::json!({}).into(),
        });
    }
    stop.cancel();
    // nothing is in flight: the listeners return at once; the writer gives up 5 s after
    // it is told to stop, and the pool's close is not waited for longer than 2 s
    tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .expect("shutdown hung on the audit trail or the database pool")
        .unwrap()
        .expect("no task of the instance failed");
}
