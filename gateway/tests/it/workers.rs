//! Connection workers (`server.workers`): connections are handed to the workers round
//! robin, and each is counted in `portcullis_https_connections_open` under its worker
//! while it is open.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::support::*;

#[test]
fn open_connections_are_counted_per_worker_and_released_when_they_close() {
    // the metrics recorder is process-wide: alone in a process, no other test's
    // connections are counted with ours
    harness::run_alone("workers::connections_gauge_capture");
}

/// `portcullis_https_connections_open{worker="<worker>"}` in a scrape, 0 when absent.
fn open_on(scrape: &str, worker: &str) -> f64 {
    sample(
        scrape,
        &format!("portcullis_https_connections_open{{worker=\"{worker}\"}}"),
    )
}

#[tokio::test]
#[ignore = "run in a process of its own by open_connections_are_counted_per_worker_and_released_when_they_close"]
async fn connections_gauge_capture() {
    let app = spawn_app(|c| c.server.workers = Some(2)).await;
    let before = app.metrics().await;
    let (zero, one) = (open_on(&before, "0"), open_on(&before, "1"));

    let mut open = Vec::new();
    for _ in 0..6 {
        let mut tls = app.tls().await;
        // an answered request: the server has finished the handshake and serves it
        tls.write_all(b"GET /oauth2/jwks HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        tls.read_exact(&mut buf).await.unwrap();
        assert!(buf.starts_with(b"HTTP/1.1 200"));
        open.push(tls);
    }
    let during = app.metrics().await;
    assert_eq!(open_on(&during, "0") - zero, 3.0, "{during}");
    assert_eq!(open_on(&during, "1") - one, 3.0, "{during}");
    assert_eq!(open_on(&during, "shared"), 0.0, "{during}");

    drop(open);
    eventually(
        Duration::from_secs(10),
        "closed connections released",
        || async {
            let after = app.metrics().await;
            open_on(&after, "0") == zero && open_on(&after, "1") == one
        },
    )
    .await;
}
