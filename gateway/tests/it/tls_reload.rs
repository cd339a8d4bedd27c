//! A changed certificate is served to new connections without a restart, on a timer and
//! on SIGHUP; connections opened before keep working.

use std::time::Duration;

use super::support::*;

#[tokio::test]
async fn changed_certificate_reaches_new_connections_without_a_restart() {
    let app = spawn_app(|_| {}).await;
    let first = app.tls().await;
    let old_leaf = peer_leaf(&first);
    let mut old_conn = Conn::over(first).await;
    assert_eq!(old_conn.get("/").await.unwrap().0.status, 200);

    let new_leaf = app.pki.leaf();
    install_leaf(app.dir.path(), &new_leaf);

    eventually(
        Duration::from_secs(10),
        "new certificate served",
        || async { peer_leaf(&app.tls().await) == new_leaf.der },
    )
    .await;
    assert_ne!(old_leaf, new_leaf.der);

    // the connection opened before the swap is unharmed and still keeps its session
    let (parts, _) = old_conn.get("/").await.unwrap();
    assert_eq!(parts.status, 200);
}

#[tokio::test]
async fn broken_replacement_keeps_the_previous_certificate() {
    let app = spawn_app(|_| {}).await;
    let before = peer_leaf(&app.tls().await);
    std::fs::write(app.dir.path().join("cert.pem"), "not a certificate").unwrap();
    // several reload intervals pass; every new connection still gets the old pair
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(peer_leaf(&app.tls().await), before);
    }
}

#[tokio::test]
async fn sighup_rereads_the_certificate_in_the_binary() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = install_leaf(dir.path(), &pki.leaf());
    let https = harness::free_port();
    let admin = harness::free_port();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{https}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_interval = \"1h\"\n\
             [database]\nurl = \"sqlite://{}/p.db\"\n\
             [tokens]\nhash_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n[keys]\nsource = \"file\"\nfile_dir = \"{}\"\n",
            cert.display(),
            key.display(),
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let child = Child::spawn(&["serve", "--config", config.to_str().unwrap()]);
    let addr = format!("127.0.0.1:{https}").parse().unwrap();
    wait_for_port(addr).await;
    let before = peer_leaf(&tls_connect(addr, pki.client_config()).await);

    let next = pki.leaf();
    install_leaf(dir.path(), &next);
    // the timer is an hour: only the signal can make this happen
    child.signal("HUP");
    eventually(
        Duration::from_secs(10),
        "certificate reloaded on SIGHUP",
        || async { peer_leaf(&tls_connect(addr, pki.client_config()).await) == next.der },
    )
    .await;
    assert_ne!(before, next.der);
}
