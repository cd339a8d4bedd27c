//! The token service on a Redis Cluster: `[redis] cluster = true` with seed nodes.

use std::collections::BTreeSet;
use std::time::Duration;

use harness::RedisCluster;
use portcullis::clients::{GrantType, NewClient, ScopeSet};
use portcullis::refresh::NewFamily;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::support::*;

#[tokio::test]
async fn refresh_tokens_rotate_and_reuse_is_detected_on_a_cluster() {
    let cluster = RedisCluster::start(3).unwrap();
    let seeds = cluster.urls().join(",");
    let app = spawn_app(move |c| {
        c.redis = Some(portcullis::config::RedisConfig {
            url: SecretString::from(seeds),
            cluster: true,
            command_timeout: Duration::from_secs(2),
        });
        c.refresh.reuse_grace = Duration::from_millis(1);
    })
    .await;
    let now = app.state.keys.now();
    let (client, secret) = app
        .state
        .clients
        .create(
            NewClient {
                id: None,
                name: "console".to_owned(),
                grant_types: BTreeSet::from([GrantType::RefreshToken]),
                scopes: ScopeSet::parse("openid").unwrap(),
                audiences: vec![],
                access_token_lifetime: None,
            },
            now,
        )
        .await
        .unwrap();
    let issued = app
        .state
        .refresh
        .issue(
            NewFamily {
                client_id: client.id.to_string(),
                subject: "alice".to_owned(),
                scope: "openid".to_owned(),
                audience: vec![],
                auth_time: now,
                session: serde_json::json!({ "roles": ["admin"] }),
            },
            now,
        )
        .await
        .unwrap();
    let http = app.https_client();
    let refresh = |token: String| {
        let http = http.clone();
        let url = app.url("/oauth2/token");
        let (id, secret) = (client.id.to_string(), secret.expose_secret().to_owned());
        async move {
            let r = http
                .post(url)
                .basic_auth(id, Some(secret))
                .form(&[("grant_type", "refresh_token"), ("refresh_token", &token)])
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let first = issued.token.expose_secret().to_owned();
    let (status, body) = refresh(first.clone()).await;
    assert_eq!(status, 200, "{body}");
    let second = body["refresh_token"].as_str().unwrap().to_owned();
    let claims: Value = app
        .state
        .keys
        .verify(body["access_token"].as_str().unwrap())
        .unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["roles"][0], "admin");
    let (status, body) = refresh(second.clone()).await;
    assert_eq!(status, 200, "{body}");

    // the first token again, past the grace window: the whole family is revoked
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (status, body) = refresh(first).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    let latest = live_sessions(&app).await;
    assert!(
        latest.is_empty(),
        "the family still has live sessions: {latest:?}"
    );

    // readiness pings the cluster
    let ready: Value = reqwest::get(format!("http://{}/readyz", app.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["checks"]["redis"]["ok"], true, "{ready}");
}

async fn live_sessions(app: &TestApp) -> Vec<String> {
    app.state
        .refresh
        .list_sessions("alice", app.state.keys.now())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.family.to_string())
        .collect()
}

/// An account's two failure records (its client address bucket's and the account-wide
/// one) and its set of familiar address buckets are read and counted by one script: their
/// keys share a hash tag, so a cluster takes them in one slot instead of refusing with
/// `CROSSSLOT`.
#[tokio::test]
async fn an_account_s_failure_records_are_counted_together_on_a_cluster() {
    use portcullis::protect::lockout::{LockoutSettings, RedisFailureStore};
    use portcullis::protect::{AccountAttempt, Lockout, Scope};

    let cluster = RedisCluster::start(3).unwrap();
    let handle = portcullis::redis_store::RedisHandle::new(&portcullis::config::RedisConfig {
        url: SecretString::from(cluster.urls().join(",")),
        cluster: true,
        command_timeout: Duration::from_secs(2),
    })
    .unwrap();
    let lockout = Lockout::new(
        std::sync::Arc::new(RedisFailureStore::new(handle)),
        LockoutSettings {
            free_failures: 1,
            max_failures: 2,
            account_max_failures: 3,
            ..LockoutSettings::default()
        },
    );
    let now = time::OffsetDateTime::now_utc();
    let attempt = |host: &str| {
        let (lockout, from) = (lockout.clone(), host.parse().unwrap());
        async move {
            lockout
                .attempt_account("breakglass", from, now)
                .await
                .unwrap()
        }
    };
    // the owner logs in from 192.0.2.9: familiar from now on
    assert_eq!(
        attempt("192.0.2.9").await,
        AccountAttempt::Counted {
            if_failed: None,
            familiar: false
        }
    );
    lockout
        .account_succeeded("breakglass", "192.0.2.9".parse().unwrap(), now)
        .await
        .unwrap();
    for host in ["192.0.2.1", "192.0.2.2"] {
        assert_eq!(
            attempt(host).await,
            AccountAttempt::Counted {
                if_failed: None,
                familiar: false
            }
        );
    }
    assert!(matches!(
        attempt("192.0.2.3").await,
        AccountAttempt::Counted { if_failed: Some((r, Scope::Account)), familiar: false } if r.locked
    ));
    assert!(matches!(
        attempt("192.0.2.4").await,
        AccountAttempt::Refused(r, Scope::Account) if r.locked
    ));
    // the familiar address goes through the account-wide lock
    assert_eq!(
        attempt("192.0.2.9").await,
        AccountAttempt::Counted {
            if_failed: None,
            familiar: true
        }
    );
}

/// The operator commands reach the refresh-token store on a Cluster as the instances do
/// (seed nodes, `cluster = true`): `portcullis clients disable` revokes the client's
/// sessions there, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_revokes_a_disabled_client_s_sessions_on_a_cluster() {
    let cluster = RedisCluster::start(3).unwrap();
    let seeds = cluster.urls().join(",");
    let app = spawn_app({
        let seeds = seeds.clone();
        move |c| {
            c.redis = Some(portcullis::config::RedisConfig {
                url: SecretString::from(seeds),
                cluster: true,
                command_timeout: Duration::from_secs(2),
            });
        }
    })
    .await;
    let now = app.state.keys.now();
    let (id, _) = register_client(&app.state, "batch", &[GrantType::RefreshToken], "openid").await;
    for _ in 0..2 {
        app.state
            .refresh
            .issue(
                NewFamily {
                    client_id: id.clone(),
                    subject: "alice".to_owned(),
                    scope: "openid".to_owned(),
                    audience: vec![],
                    auth_time: now,
                    session: serde_json::json!({}),
                },
                now,
            )
            .await
            .unwrap();
    }
    assert_eq!(live_sessions(&app).await.len(), 2);
    let database = format!("sqlite://{}/portcullis.db", app.dir.path().display());
    let config = app.cli_config(
        "cli.toml",
        &database,
        &format!("[redis]\nurl = \"{seeds}\"\ncluster = true\n"),
    );
    let out = std::process::Command::new(binary())
        .args(["clients", "disable", &id, "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("disabled; 2 refresh-token session(s) revoked"),
        "{stdout}\n{stderr}"
    );
    assert!(live_sessions(&app).await.is_empty());
}
