//! Least privilege with the shipped Vault policies (deploy/vault/*.hcl) on a real OpenBao:
//! serving instances only read the ring; the scheduled job alone writes it.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use harness::{OpenBao, Postgres};
use portcullis::app::Application;
use portcullis::config::{KeySourceKind, RotationKind};
use secrecy::SecretString;

use super::support::*;

fn policy_file(name: &str) -> String {
    format!("{}/../deploy/vault/{name}.hcl", env!("CARGO_MANIFEST_DIR"))
}

fn token_with(bao: &OpenBao, policy: &str) -> String {
    bao.bao(&["policy", "write", policy, &policy_file(policy)])
        .unwrap();
    bao.bao(&["token", "create", "-policy", policy, "-field", "token"])
        .unwrap()
        .trim()
        .to_owned()
}

fn cli(config: &std::path::Path, vault_token: &str, args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .args(["keys"])
        .args(args)
        .args(["--config", config.to_str().unwrap()])
        .env("VAULT_TOKEN", vault_token)
        .env_remove("PORTCULLIS_CONFIG")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_instances_serve_and_reload_while_only_the_job_writes() {
    let bao = OpenBao::start().unwrap();
    let serving = token_with(&bao, "portcullis-serving");
    let rotator = token_with(&bao, "portcullis-rotator");
    let db = Postgres::shared().fresh_database("leastpriv").unwrap();

    // the configuration both the job and the instance use; Vault tokens come from outside
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &pki.leaf());
    let file = dir.path().join("portcullis.toml");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(
        &file,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[database]\nurl = \"{db}\"\n\
             [tokens]\nhash_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n[keys]\nsource = \"vault\"\nrotation = \"external\"\nreload_interval = \"200ms\"\n\
             [vault]\naddr = \"{}\"\n",
            cert.display(),
            key.display(),
            bao.addr()
        ),
    )
    .unwrap();

    // 0. looking at an empty store writes nothing: `keys status` with the rotator's
    //    token creates no ring, and with the read-only token it is enough
    let out = cli(&file, &rotator, &["status"]);
    assert!(
        !out.status.success(),
        "status made a ring in an empty store"
    );
    let out = cli(&file, &serving, &["status"]);
    assert!(!out.status.success());

    // 1. the scheduled job creates the ring with the rotator policy
    let out = cli(&file, &rotator, &["rotate", "--scheduled"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 2. a serving instance with the read-only policy loads it and serves JWKS
    config.database.url = SecretString::from(db.clone());
    config.keys.source = KeySourceKind::Vault;
    config.keys.rotation = RotationKind::External;
    config.keys.reload_interval = Duration::from_millis(200);
    config.vault = Some(
        toml::from_str(&format!(
            "addr = \"{}\"\ntoken = \"{serving}\"\n",
            bao.addr()
        ))
        .unwrap(),
    );
    let app = Application::build_with_clock(config, Arc::new(keyrotation::SystemClock))
        .await
        .unwrap();
    let keys = app.state().keys.clone();
    eventually(Duration::from_secs(10), "ring loaded read-only", || async {
        keys.readiness().is_ok()
    })
    .await;
    let first = keys.status().active_kid.unwrap();
    // the read-only policy is enough to look at the ring
    let out = cli(&file, &serving, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["active_kid"], first.to_string());

    // 3. the instance may not rotate: its admin API says so, and Vault refuses its token
    let resp = reqwest::Client::new()
        .post(format!("http://{}/admin/keys/rotate", app.admin_addr()))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "rotation_external");
    let out = cli(&file, &serving, &["rotate"]);
    assert!(!out.status.success(), "a read-only token rotated the ring");
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("denied") || err.contains("403") || err.contains("forbidden"),
        "{err}"
    );
    assert!(!err.contains(&serving), "the token leaked into the error");

    // 4. the job rotates; the read-only instance follows on its next reload (the new key
    //    signs after the propagation delay: two 200 ms reload intervals and 5 s)
    let out = cli(&file, &rotator, &["rotate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        Duration::from_secs(20),
        "instance follows the rotation",
        || async { keys.status().active_kid.is_some_and(|k| k != first) },
    )
    .await;
    assert!(keys.rotator().health().reloads >= 2);

    // 5. the first key (retiring now) leaked on its own: the job retires it alone; a kid
    //    without --emergency is refused before anything is read
    let first_kid = first.to_string();
    let out = cli(&file, &rotator, &["rotate", "--kid", &first_kid]);
    assert!(!out.status.success(), "--kid without --emergency was taken");
    let out = cli(
        &file,
        &rotator,
        &[
            "rotate",
            "--emergency",
            "--reason",
            "old key in a leaked backup",
            "--kid",
            &first_kid,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = keys.status().active_kid.unwrap();
    eventually(
        Duration::from_secs(10),
        "instance drops the compromised key",
        || async {
            let status = keys.status();
            status
                .keys
                .iter()
                .any(|k| k.kid == first && k.compromised_at.is_some() && !k.published)
        },
    )
    .await;
    assert_eq!(keys.status().active_kid, Some(second));
}
