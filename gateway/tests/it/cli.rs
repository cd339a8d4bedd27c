//! The binary's command line: `check-config` and `serve` refuse bad configuration with a
//! message naming the field, before binding anything.

use std::process::Command;
use std::time::Duration;

use super::support::*;

fn valid_config(dir: &std::path::Path) -> String {
    let leaf = Pki::new().leaf();
    let (cert, key) = install_leaf(dir, &leaf);
    format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[database]\nurl = \"sqlite://{}/p.db\"\n\
         [tokens]\nhash_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n[keys]\nsource = \"file\"\nfile_dir = \"{}\"\n",
        cert.display(),
        key.display(),
        dir.display(),
        dir.display()
    )
}

fn check(text: &str, dir: &std::path::Path) -> std::process::Output {
    let file = dir.join("portcullis.toml");
    std::fs::write(&file, text).unwrap();
    Command::new(binary())
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn check_config_accepts_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = check(&valid_config(dir.path()), dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_names_a_field_of_the_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let text = valid_config(dir.path()) + "[server]\nmax_body_bytes = \"big\"\n";
    let out = check(&text, dir.path());
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.max_body_bytes"), "{err}");
}

#[test]
fn check_config_names_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = valid_config(dir.path()) + "[server]\nlisten_addr = \"0.0.0.0:1\"\n";
    let out = check(&text, dir.path());
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_addr"), "{err}");
}

#[test]
fn serve_refuses_a_missing_certificate_file_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let port = harness::free_port();
    let text = valid_config(dir.path()).replace("cert.pem", "gone.pem")
        + &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n");
    let file = dir.path().join("portcullis.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(binary())
        .args(["serve", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.cert"), "{err}");
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
}

/// `serve --dev` on free ports with its data in `data`: the process, the HTTPS port and
/// the admin port.
fn serve_dev(data: &std::path::Path) -> (Child, u16, u16) {
    let (https, admin) = (harness::free_port(), harness::free_port());
    let child = Child::spawn(&[
        "serve",
        "--dev",
        "--listen",
        &format!("127.0.0.1:{https}"),
        "--admin-listen",
        &format!("127.0.0.1:{admin}"),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    (child, https, admin)
}

#[tokio::test]
async fn serve_dev_speaks_tls13_and_answers_health_readiness_and_metrics() {
    let data = tempfile::tempdir().unwrap();
    let (child, https, admin) = serve_dev(data.path());
    let admin_url = format!("http://127.0.0.1:{admin}");
    wait_for_port(format!("127.0.0.1:{admin}").parse().unwrap()).await;

    // TLS 1.3 as openssl sees it
    let s_client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{https}"),
            "-tls1_3",
            "-brief",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let seen = String::from_utf8_lossy(&s_client.stderr).to_string()
        + &String::from_utf8_lossy(&s_client.stdout);
    assert!(seen.contains("TLSv1.3"), "openssl s_client said: {seen}");

    // the dev certificate and key are in the data directory, the key private
    let cert_pem = std::fs::read(data.path().join("cert.pem")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.path().join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "key.pem is readable by others: {mode:o}");
    }
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&cert_pem).unwrap())
        .build()
        .unwrap();
    let index = client
        .get(format!("https://localhost:{https}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(index.status(), 200);

    let health = reqwest::get(format!("{admin_url}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    eventually(std::time::Duration::from_secs(10), "ready", || async {
        reqwest::get(format!("{admin_url}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;

    let metrics = reqwest::get(format!("{admin_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines = metrics.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "portcullis_http_requests_total"
                && s.labels.get("route") == Some("/")),
        "request counter missing:\n{metrics}"
    );
    for series in [
        "portcullis_keys_active_key_age_seconds",
        "portcullis_keys_next_rotation_timestamp_seconds",
        "portcullis_keys_ring_reload_failures",
    ] {
        assert!(
            scrape.samples.iter().any(|s| s.metric == series),
            "{series} missing:\n{metrics}"
        );
    }
    // the banner follows the bootstrap client, which waits for the schema
    let want = format!("https://localhost:{https}/");
    let log = child.log.clone();
    eventually(Duration::from_secs(20), "the dev banner", || {
        let (log, want) = (log.clone(), want.clone());
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&want)
        }
    })
    .await;
}

/// `serve --dev` whose `dev-credentials.json` was deleted starts all the same: the
/// bootstrap admin's secret is rotated (the lost one ends) and the file written again.
/// Before, it refused to start and sent the operator to an admin API it had not started.
#[tokio::test]
async fn serve_dev_writes_new_credentials_when_the_file_is_gone() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("dev-credentials.json");
    let run = || {
        let (child, https, _) = serve_dev(data.path());
        (child, https)
    };
    let credentials = |file: std::path::PathBuf| async move {
        eventually(Duration::from_secs(30), "dev-credentials.json", || {
            let file = file.clone();
            async move { file.is_file() }
        })
        .await;
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        (
            json["client_id"].as_str().unwrap().to_owned(),
            json["client_secret"].as_str().unwrap().to_owned(),
        )
    };
    let token_status = |https: u16, id: String, secret: String| {
        let cert = std::fs::read(data.path().join("cert.pem")).unwrap();
        async move {
            let client = reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(&cert).unwrap())
                .build()
                .unwrap();
            client
                .post(format!("https://localhost:{https}/oauth2/token"))
                .basic_auth(id, Some(secret))
                .form(&[("grant_type", "client_credentials")])
                .send()
                .await
                .unwrap()
                .status()
        }
    };

    let (mut first, https) = run();
    let (id, old) = credentials(file.clone()).await;
    wait_for_port(format!("127.0.0.1:{https}").parse().unwrap()).await;
    assert_eq!(token_status(https, id.clone(), old.clone()).await, 200);
    first.signal("TERM");
    assert!(first.wait(Duration::from_secs(40)).await.is_some());

    std::fs::remove_file(&file).unwrap();
    let (second, https) = run();
    let (again, new) = credentials(file.clone()).await;
    assert_eq!(again, id);
    assert_ne!(new, old);
    wait_for_port(format!("127.0.0.1:{https}").parse().unwrap()).await;
    assert_eq!(token_status(https, id.clone(), new).await, 200);
    assert_eq!(token_status(https, id, old).await, 401);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
    }
    assert!(second.output().contains("dev-credentials.json was gone"));
}

/// An exported `PORTCULLIS_CONFIG` (an operator's shell, a unit file) is the default of
/// `--config`, and does not turn `--dev` into a usage error; `--config` given with `--dev`
/// still is one.
#[test]
fn portcullis_config_in_the_environment_leaves_dev_usable() {
    let data = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(binary())
            .args(args)
            .env("PORTCULLIS_CONFIG", "/nonexistent/portcullis.toml")
            .output()
            .unwrap()
    };
    let dir = data.path().to_str().unwrap();
    let dev = run(&["clients", "list", "--dev", "--data-dir", dir]);
    assert!(
        dev.status.success(),
        "{}",
        String::from_utf8_lossy(&dev.stderr)
    );
    let from_env = run(&["clients", "list"]);
    assert_eq!(from_env.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&from_env.stderr).contains("/nonexistent/portcullis.toml"));
    let both = run(&[
        "clients",
        "list",
        "--dev",
        "--config",
        "/x.toml",
        "--data-dir",
        dir,
    ]);
    assert_eq!(both.status.code(), Some(2));
}

// === `portcullis config export` and `import` ===

/// Runs `portcullis config <args>` against `app` with a token of `scope`.
fn config_cli(app: &TestApp, scope: &str, args: &[&str]) -> (bool, String, String) {
    let ca = app.dir.path().join("ca.pem");
    std::fs::write(&ca, app.pki.ca_pem()).unwrap();
    let out = Command::new(binary())
        .arg("config")
        .args(args)
        .env("PORTCULLIS_URL", app.url(""))
        .env("PORTCULLIS_TOKEN", super::config_api::token(app, scope))
        .env("PORTCULLIS_CACERT", &ca)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_release_imports_back_to_the_same_snapshot_in_every_format() {
    let app = spawn_app(|_| {}).await;
    let scope = "config:read:prod config:write:prod";
    let entries = serde_json::json!([
        { "key": "path", "value": r"C:\logs\app" },
        { "key": "route:a", "value": "http://a:8080/x?y=1" },
        { "key": "tls.key", "value": "-----BEGIN PRIVATE KEY-----\nMC4CAQ\n-----END PRIVATE KEY-----\n", "secret": true },
        { "key": "crlf", "value": "one\r\ntwo\rthree" },
        { "key": "padded", "value": "  both ends \t " },
        { "key": "empty", "value": "" },
        { "key": "equals", "value": "=x:y= z" },
        { "key": "hash", "value": "#not a comment" },
        { "key": "unicode", "value": "Grüße, 東京, 🚀" },
        { "key": "controls", "value": "bell\u{7} nel\u{85} ls\u{2028}" },
        { "key": "trailing.backslash", "value": "ends with \\" },
        { "key": "pool", "value": "{\"size\": 8}", "format": "json" },
        { "key": "spring", "value": "a: 1\nb:\n  - x\n", "format": "yaml", "secret": true },
        { "key": "props", "value": "x=1\ny=2\n", "format": "properties" }
    ]);
    let http = app.https_client();
    let snapshot = |name: String| {
        let (http, app) = (http.clone(), &app);
        async move {
            let r = http
                .get(app.url(&format!("/config/v1/prod/{name}")))
                .bearer_auth(super::config_api::token(app, scope))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{name}");
            let body: serde_json::Value = r.json().await.unwrap();
            body["entries"].clone()
        }
    };
    let r = http
        .put(app.url("/config/v1/prod/source"))
        .bearer_auth(super::config_api::token(&app, scope))
        .json(&serde_json::json!({ "entries": entries }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let source = snapshot("source".to_owned()).await;
    assert_eq!(source.as_array().unwrap().len(), 14);

    for format in ["properties", "json", "yaml"] {
        let (ok, exported, err) = tokio::task::block_in_place(|| {
            config_cli(
                &app,
                scope,
                &["export", "prod", "source", "--format", format],
            )
        });
        assert!(ok, "export --format {format}: {err}");
        let file = app.dir.path().join(format!("source.{format}"));
        std::fs::write(&file, &exported).unwrap();
        let copy = format!("copy-{format}");
        let (ok, out, err) = tokio::task::block_in_place(|| {
            config_cli(
                &app,
                scope,
                &["import", "prod", &copy, file.to_str().unwrap()],
            )
        });
        assert!(ok, "import of the {format} export: {err}\n{exported}");
        assert!(out.contains("(14 keys)"), "{out}");
        assert_eq!(
            snapshot(copy).await,
            source,
            "the {format} export did not import back to the same snapshot:\n{exported}"
        );
    }
}

/// `portcullis keys …` on the configuration `file`.
fn keys_cli(file: &std::path::Path, args: &[&str]) -> (String, String) {
    let out = Command::new(binary())
        .arg("keys")
        .args(args)
        .args(["--config", file.to_str().unwrap()])
        .env_remove("PORTCULLIS_CONFIG")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "keys {args:?}: {stderr}");
    (stdout, stderr)
}

/// An emergency names several keys with `--kid` repeated; run again with the same names
/// (what an operator does after a failure whose outcome was unknown, as the CLI then
/// suggests), it changes nothing, although the waiting key it named is gone by then.
#[test]
fn an_emergency_naming_its_keys_can_be_run_again_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("portcullis.toml");
    std::fs::write(&file, valid_config(dir.path())).unwrap();
    let status = || -> serde_json::Value {
        serde_json::from_str(&keys_cli(&file, &["status", "--json"]).0).unwrap()
    };
    keys_cli(&file, &["rotate", "--scheduled"]);
    // brought forward: a fresh key waits to sign, the first one still signs
    keys_cli(&file, &["rotate"]);
    let before = status();
    let active = before["active_kid"].as_str().unwrap().to_owned();
    let waiting = before["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "next")
        .unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let emergency = [
        "rotate",
        "--emergency",
        "--reason",
        "ring exported by mistake",
        "--kid",
        &active,
        "--kid",
        &waiting,
    ];
    let (out, _) = keys_cli(&file, &emergency);
    assert!(out.contains(&active) && out.contains(&waiting), "{out}");
    let after = status();
    let fresh = after["active_kid"].as_str().unwrap().to_owned();
    assert!(fresh != active && fresh != waiting);
    let keys = after["keys"].as_array().unwrap();
    assert!(keys.iter().all(|k| k["kid"] != waiting.as_str()), "{after}");
    assert!(
        keys.iter()
            .any(|k| k["kid"] == active.as_str() && !k["compromised_at"].is_null()),
        "{after}"
    );

    let (out, _) = keys_cli(&file, &emergency);
    assert!(out.contains("nothing was due"), "{out}");
    assert_eq!(status()["active_kid"], fresh.as_str());
}
