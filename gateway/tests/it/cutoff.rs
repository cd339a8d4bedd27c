//! Cutting off a client's access tokens across instances: a client disabled on one
//! instance has its tokens refused on another sharing the database within seconds, and
//! its open config watch there ends without the release published after the cutoff.

use std::time::Duration;

use portcullis::clients::{ClientId, GrantType, NewClient, ScopeSet};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::config_api::{APP, Api, entries_v1, open_watch_with, read_events};
use super::support::*;

/// An instance on `database`, its values sealed under `master_key`, its keys in `keys`
/// (shared, so that both instances verify each other's tokens).
async fn instance(database: &str, master_key: &std::path::Path, keys: &std::path::Path) -> TestApp {
    let (database, master_key, keys) =
        (database.to_owned(), master_key.to_owned(), keys.to_owned());
    spawn_app(move |c| {
        c.database.url = SecretString::from(database);
        c.config_center.master_key_file = Some(master_key);
        c.keys.file_dir = Some(keys);
    })
    .await
}

#[tokio::test]
async fn a_client_disabled_on_one_instance_is_cut_off_on_another_and_its_watch_ends() {
    let db = harness::Postgres::shared()
        .fresh_database("cutoff_two")
        .unwrap();
    let shared = tempfile::tempdir().unwrap();
    let key = shared.path().join("master.key");
    let a = instance(&db, &key, shared.path()).await;
    let b = instance(&db, &key, shared.path()).await;
    let (api_a, api_b) = (Api::new(&a), Api::new(&b));
    api_a.publish(entries_v1()).await;

    let (client, secret) = a
        .state
        .clients
        .create(
            NewClient {
                id: Some(ClientId::parse("executor-cut").unwrap()),
                name: "an executor".to_owned(),
                grant_types: [GrantType::ClientCredentials].into_iter().collect(),
                scopes: ScopeSet::parse("config:read:prod").unwrap(),
                audiences: vec![],
                access_token_lifetime: None,
            },
            a.state.keys.now(),
        )
        .await
        .unwrap();
    // from `b`, which then holds the client's record in its cache for a few seconds
    let token_from_b = || async {
        let response = post_as_client(
            &b.https_client(),
            b.url("/oauth2/token"),
            client.id.as_str(),
            secret.expose_secret(),
            &[("grant_type", "client_credentials")],
        )
        .await;
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap();
        (status, body["access_token"].as_str().map(str::to_owned))
    };
    let (status, token) = token_from_b().await;
    assert_eq!(status, 200);
    let token = token.unwrap();
    let read_with = |app: &TestApp, token: &str| {
        let request = app
            .https_client()
            .get(app.url(&Api::path("prod", APP, "")))
            .bearer_auth(token);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let read = |app: &TestApp| read_with(app, &token);
    assert_eq!((read(&a).await, read(&b).await), (200, 200));
    let mut watch = open_watch_with(&api_b, &token, None).await;
    assert_eq!(read_events(&mut watch, 1).await[0].0, 1);
    // a long-poll waiting for a release newer than the one it has
    let poll = {
        let request = b
            .https_client()
            .get(b.url(&Api::path("prod", APP, "/poll?version=1")))
            .bearer_auth(&token);
        tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
    };
    let before = a.state.keys.now();

    let r = reqwest::Client::new()
        .post(format!(
            "http://{}/admin/clients/executor-cut/disable",
            a.admin
        ))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    // a few seconds past the disable: `b` may still issue from its cached record
    let first = time::OffsetDateTime::parse(
        body["tokens_issued_before"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(first >= before + time::Duration::seconds(12), "{body}");
    let (status, late) = token_from_b().await;
    // at once on the instance that cut, within the reload interval on the other
    assert_eq!(read(&a).await, 401);
    eventually(
        Duration::from_secs(10),
        "the other instance refuses the token",
        || {
            let status = read(&b);
            async move { status.await == 401 }
        },
    )
    .await;
    assert_eq!(b.scrape_gauge("portcullis_token_cutoffs", 1.0).await, 1.0);
    // a token `b` issued from its cached record after the disable is cut off too
    if let Some(late) = late {
        assert_eq!(status, 200);
        assert_eq!(read_with(&b, &late).await, 401);
    }

    // the watch opened with the token gets no release published after the cutoff: it ends
    api_a
        .publish(json!([{ "key": "db.url", "value": "postgres://after-the-cut" }]))
        .await;
    let mut received = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = watch.chunk().await.transpose() {
            match chunk {
                Ok(bytes) => received.extend_from_slice(&bytes),
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch did not end");
    let text = String::from_utf8_lossy(&received);
    assert!(!text.contains("after-the-cut"), "{text}");
    // and the long-poll is refused rather than handed that release
    let polled = tokio::time::timeout(Duration::from_secs(20), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(polled, 401);
}
