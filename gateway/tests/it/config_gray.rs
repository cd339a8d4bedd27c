//! The config center over HTTPS: aborting a gray release with no main release behind it.

use serde_json::{Value, json};

use super::config_api::token;
use super::support::*;

/// Sends `method path` with a token of `scope`; the status, the `WWW-Authenticate`
/// header and the JSON body.
async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    scope: &str,
    body: Option<Value>,
) -> (u16, String, Value) {
    let mut req = app
        .https_client()
        .request(method, app.url(path))
        .bearer_auth(token(app, scope));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, challenge, body)
}

#[tokio::test]
async fn aborting_a_first_gray_release_leaves_every_node_without_a_release() {
    let app = spawn_app(|_| {}).await;
    let writer = "config:read:prod config:write:prod";
    let (s, _, b) = call(
        &app,
        reqwest::Method::PUT,
        "/config/v1/prod/new-service/gray",
        writer,
        Some(json!({
            "entries": [{ "key": "db.url", "value": "postgres://canary" }],
            "selector": { "instances": ["node-7"] }
        })),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let read = |who: &'static str| {
        let app = &app;
        async move {
            let path = format!("/config/v1/prod/new-service{who}");
            let (s, _, b) = call(app, reqwest::Method::GET, &path, "config:read:prod", None).await;
            (s, b)
        }
    };
    assert_eq!(read("?instance=node-7").await.0, 200);
    assert_eq!(read("").await.0, 404, "no main release yet");

    let (s, _, b) = call(
        &app,
        reqwest::Method::DELETE,
        "/config/v1/prod/new-service/gray?version=1",
        writer,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["aborted"], 1, "{b}");
    assert_eq!(b["version"], Value::Null, "nothing was republished: {b}");
    for who in ["?instance=node-7", "?instance=node-8", ""] {
        let (s, b) = read(who).await;
        assert_eq!(s, 404, "{who}: an empty release is served: {b}");
    }

    // the next release is a main one, served to everybody
    let (s, _, b) = call(
        &app,
        reqwest::Method::PUT,
        "/config/v1/prod/new-service",
        writer,
        Some(json!({ "entries": [{ "key": "db.url", "value": "postgres://main" }] })),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["version"], 2);
    let (s, b) = read("?instance=node-7").await;
    assert_eq!((s, b["version"].as_u64()), (200, Some(2)), "{b}");
}
