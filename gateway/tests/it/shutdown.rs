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

    // the migration task holds the first database connection; the readiness probe opens
    // the second, which is how we know the request is in flight (`min_connections = 0`
    // above: the pool opens no connection of its own in the background)
    accepted.recv().await.unwrap();
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
