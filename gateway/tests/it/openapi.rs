//! The API reference (`docs/api/openapi.json`) lists exactly the routes the routers serve.

use std::collections::BTreeSet;

use axum::body::Body;
use http_body_util::BodyExt;
use portcullis::routes::{ADMIN_ROUTES, PUBLIC_ROUTES};
use tower::ServiceExt;

use super::support::*;

fn documented() -> BTreeSet<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api/openapi.json");
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

#[test]
fn openapi_documents_exactly_the_served_routes() {
    let served: BTreeSet<(String, String)> = PUBLIC_ROUTES
        .iter()
        .chain(ADMIN_ROUTES)
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    let documented = documented();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in openapi.json: {undocumented:?}"
    );
    assert!(
        phantom.is_empty(),
        "in openapi.json but not served: {phantom:?}"
    );
}

#[tokio::test]
async fn every_listed_route_is_really_routed() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path(), &pki.leaf());
    let app = portcullis::app::Application::build(config).await.unwrap();
    let state = app.state().clone();
    // let the key ring load so the key routes answer normally
    let keys = state.keys.clone();
    eventually(
        std::time::Duration::from_secs(10),
        "keys loaded",
        || async { keys.readiness().is_ok() },
    )
    .await;
    for (routes, router) in [
        (PUBLIC_ROUTES, portcullis::routes::router(state.clone())),
        (
            ADMIN_ROUTES,
            portcullis::routes::admin_router(state.clone()),
        ),
    ] {
        for (method, path) in routes {
            let mut req = http::Request::builder()
                .method(*method)
                .uri(*path)
                .header("content-type", "application/json")
                .body(Body::from(if *method == "POST" { "{}" } else { "" }))
                .unwrap();
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                    [127, 0, 0, 1],
                    1,
                ))));
            let resp = router.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(
                status != 404 && status != 405,
                "{method} {path} is listed but not routed: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    app.shutdown_token().cancel();
}
