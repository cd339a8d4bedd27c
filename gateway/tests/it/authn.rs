//! The bearer-token layer (RFC 6750) that guards service, executor and admin routes.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use base64::Engine;
use http_body_util::BodyExt;
use keyrotation::{ManualClock, TokenType};
use portcullis::authn::{BearerAuth, Principal};
use portcullis::oauth::claims::{AccessClaims, Audiences};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::support::*;

fn claims(app: &TestApp, scope: &str, aud: &str, lifetime: i64) -> AccessClaims {
    let now = app.state.keys.now().unix_timestamp();
    AccessClaims {
        iss: app.state.config.issuer(),
        sub: "executor-orders".to_owned(),
        aud: Audiences::One(aud.to_owned()),
        exp: now + lifetime,
        iat: now,
        nbf: now,
        jti: uuid::Uuid::new_v4().to_string(),
        scope: scope.to_owned(),
        client_id: "executor-orders".to_owned(),
        roles: vec![],
        sid: None,
    }
}

fn guarded(app: &TestApp) -> Router {
    Router::new()
        .route(
            "/registry",
            get(|axum::Extension(p): axum::Extension<Principal>| async move { p.subject }),
        )
        .route_layer(BearerAuth::new(app.state.keys.clone()).require(&["scheduler:executor"]))
}

async fn call(router: &Router, authorization: Option<&str>) -> (u16, Option<String>, String) {
    let mut req = http::Request::get("/registry");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = router
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    (status, challenge, body)
}

#[tokio::test]
async fn valid_token_with_the_scope_reaches_the_handler_with_its_principal() {
    let app = spawn_app(|_| {}).await;
    let token = app
        .state
        .keys
        .sign(&claims(
            &app,
            "scheduler:executor jobs:read",
            &app.state.config.issuer(),
            300,
        ))
        .unwrap();
    let (status, _, body) = call(&guarded(&app), Some(&format!("Bearer {token}"))).await;
    assert_eq!(status, 200);
    assert_eq!(body, "executor-orders");
}

#[tokio::test]
async fn missing_malformed_and_foreign_credentials_get_401_with_a_bearer_challenge() {
    let app = spawn_app(|_| {}).await;
    let router = guarded(&app);
    let (status, challenge, body) = call(&router, None).await;
    assert_eq!(status, 401);
    assert_eq!(challenge.as_deref(), Some("Bearer realm=\"portcullis\""));
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "missing_token");

    for bad in [
        "Bearer not.a.jwt",
        "Basic YWRtaW46c2VjcmV0",
        "Bearer ",
        "Bearer a.b",
    ] {
        let (status, challenge, _) = call(&router, Some(bad)).await;
        assert_eq!(status, 401, "{bad}");
        let challenge = challenge.unwrap();
        assert!(
            challenge.starts_with("Bearer realm=\"portcullis\""),
            "{challenge}"
        );
    }

    // a token for another audience is not for us
    let other = app
        .state
        .keys
        .sign(&claims(
            &app,
            "scheduler:executor",
            "https://elsewhere.example",
            300,
        ))
        .unwrap();
    let (status, challenge, _) = call(&router, Some(&format!("Bearer {other}"))).await;
    assert_eq!(status, 401);
    assert!(challenge.unwrap().contains("error=\"invalid_token\""));

    // alg none with our kid and valid-looking claims
    let good = app
        .state
        .keys
        .sign(&claims(
            &app,
            "scheduler:executor",
            &app.state.config.issuer(),
            300,
        ))
        .unwrap();
    let mut parts = good.split('.');
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts.next().unwrap())
            .unwrap(),
    )
    .unwrap();
    let none_header = serde_json::json!({ "alg": "none", "kid": header["kid"], "typ": "JWT" });
    let forged = format!(
        "{}.{}.",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(none_header.to_string()),
        parts.next().unwrap()
    );
    let (status, _, _) = call(&router, Some(&format!("Bearer {forged}"))).await;
    assert_eq!(status, 401);
}

/// The `typ` member of a token's header.
fn typ_of(token: &str) -> Value {
    let header = token.split('.').next().unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    serde_json::from_slice::<Value>(&json).unwrap()["typ"].clone()
}

/// Asserts that `token` is refused on every path that takes access tokens: twice on a
/// bearer route (401 `invalid_token`, not remembered as verified), by the proxy's and the
/// admin API's check, by the console access cookie's and by introspection's.
async fn refused_everywhere(app: &TestApp, router: &Router, token: &str, what: &str) {
    let keys = &app.state.keys;
    let remembered = keys.verified_tokens().len();
    for _ in 0..2 {
        let (status, challenge, _) = call(router, Some(&format!("Bearer {token}"))).await;
        assert_eq!(status, 401, "{what}");
        assert!(
            challenge.unwrap().contains("error=\"invalid_token\""),
            "{what}"
        );
    }
    assert_eq!(
        keys.verified_tokens().len(),
        remembered,
        "{what}: refusals are not remembered"
    );
    let authorization = http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    assert!(
        portcullis::authn::verify_bearer(keys, Some(&authorization), &[])
            .await
            .is_err(),
        "{what}"
    );
    assert!(keys.verify_current::<Value>(token).await.is_err(), "{what}");
    assert!(
        keys.verify_current_with::<Value>(token, keys.verify_params())
            .await
            .is_err(),
        "{what}"
    );
}

/// Asserts that `token` goes through every path that takes access tokens.
async fn accepted_everywhere(app: &TestApp, router: &Router, token: &str, what: &str) {
    let keys = &app.state.keys;
    assert_eq!(
        call(router, Some(&format!("Bearer {token}"))).await.0,
        200,
        "{what}"
    );
    let authorization = http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    assert!(
        portcullis::authn::verify_bearer(keys, Some(&authorization), &[])
            .await
            .is_ok(),
        "{what}"
    );
    assert!(keys.verify_current::<Value>(token).await.is_ok(), "{what}");
}

/// RFC 9068 §2.1, §4 and RFC 8725 §3.11: with `tokens.access_token_typ = "at+jwt"` an
/// access token is typed `at+jwt`, and once `tokens.accept_jwt_typ` is off only such a
/// token is taken for one. Anything else the gateway's keys sign (the detached JWS of a
/// config release, typed `JWT`; another kind of JWT; one with no `typ`) is refused on every
/// path that takes access tokens, however much its claims look like an access token's, and
/// is not remembered as verified.
#[tokio::test]
async fn a_jwt_of_ours_not_typed_as_an_access_token_is_refused_everywhere() {
    let app = spawn_app(|c| {
        c.tokens.access_token_typ = TokenType::AccessToken;
        c.tokens.accept_jwt_typ = false;
    })
    .await;
    let router = guarded(&app);
    let keys = &app.state.keys;
    let issuer = app.state.config.issuer();
    let claims = || claims(&app, "scheduler:executor", &issuer, 300);

    let access = keys.sign(&claims()).unwrap();
    assert_eq!(typ_of(&access), "at+jwt");
    accepted_everywhere(&app, &router, &access, "at+jwt").await;

    // the same claims, signed the way the config hub signs a release
    let as_release = keys.keys().sign(&claims(), keys.now()).unwrap();
    assert_eq!(typ_of(&as_release), "JWT");
    refused_everywhere(&app, &router, &as_release, "JWT").await;
    // the same claims, as another kind of JWT, with no type, and with `JWT` spelled as a
    // media type (the form `accept_jwt_typ` also takes)
    for typ in [Some("id_token+jwt"), None, Some("application/jwt")] {
        let token = app.sign_with_typ(typ, &claims());
        assert_eq!(typ_of(&token), typ.map_or(Value::Null, Value::from));
        refused_everywhere(&app, &router, &token, &format!("{typ:?}")).await;
    }

    // the access token still goes through them all
    accepted_everywhere(&app, &router, &access, "at+jwt, again").await;
}

/// By default access tokens are issued typed `JWT`, as every earlier version issued them
/// (relying parties such as Spring Security's default JWT decoder refuse `at+jwt`), and
/// while `tokens.accept_jwt_typ` is on (the default) a token of ours typed `JWT` is
/// accepted on every path, remembered like any verified token, and counted in
/// `portcullis_access_tokens_legacy_typ_total` (an `at+jwt` token is accepted, not
/// counted). Any other type, or none, is refused as when it is off; so is a config
/// release's JWS, whose claims are no access token's.
#[tokio::test]
async fn by_default_an_access_token_of_ours_typed_jwt_is_accepted_and_counted() {
    const LEGACY: &str = "portcullis_access_tokens_legacy_typ_total";
    let app = spawn_app(|_| {}).await;
    assert!(app.state.config.tokens.accept_jwt_typ, "on by default");
    assert_eq!(app.state.config.tokens.access_token_typ, TokenType::Jwt);
    let router = guarded(&app);
    let keys = &app.state.keys;
    let issuer = app.state.config.issuer();
    let claims = || claims(&app, "scheduler:executor", &issuer, 300);
    assert!(
        app.metrics().await.contains(&format!("{LEGACY} ")),
        "the counter is in the scrape before any such token"
    );

    // as this version issues it by default, and every earlier version did: `typ: JWT`
    let legacy = keys.sign(&claims()).unwrap();
    assert_eq!(typ_of(&legacy), "JWT");
    let before = app.sample(LEGACY).await;
    let remembered = keys.verified_tokens().len();
    accepted_everywhere(&app, &router, &legacy, "JWT").await;
    assert_eq!(
        keys.verified_tokens().len(),
        remembered + 1,
        "remembered, so counted on its first verification only"
    );
    assert_eq!(
        call(&router, Some(&format!("Bearer {legacy}"))).await.0,
        200
    );
    // the bearer route once, the console cookie's check once (not remembered); other
    // tests of this process may add their own
    assert!(app.sample(LEGACY).await >= before + 2.0);
    // `JWT` as its media type, in any case
    for typ in ["jwt", "application/jwt", "Application/JWT"] {
        let token = app.sign_with_typ(Some(typ), &claims());
        accepted_everywhere(&app, &router, &token, typ).await;
    }
    // typed as an instance with `access_token_typ = "at+jwt"` issues it
    let access = keys
        .keys()
        .sign_typed(&claims(), TokenType::AccessToken, keys.now())
        .unwrap();
    accepted_everywhere(&app, &router, &access, "at+jwt").await;

    // no type, or another kind of JWT: refused, as when the leniency is off
    for typ in [None, Some("id_token+jwt"), Some("JOSE"), Some("")] {
        let token = app.sign_with_typ(typ, &claims());
        refused_everywhere(&app, &router, &token, &format!("{typ:?}")).await;
    }
    // a config release's signature, attached: typed `JWT`, but not an access token's claims
    let release = json!({
        "environment": "prod", "application": "orders", "version": 3,
        "content_hash": "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU",
        "issued_at": keys.now().unix_timestamp(),
    });
    let release = keys.keys().sign(&release, keys.now()).unwrap();
    assert_eq!(typ_of(&release), "JWT");
    refused_everywhere(&app, &router, &release, "a release signature").await;
}

#[tokio::test]
async fn token_without_the_scope_gets_403_naming_the_scope() {
    let app = spawn_app(|_| {}).await;
    let token = app
        .state
        .keys
        .sign(&claims(&app, "jobs:read", &app.state.config.issuer(), 300))
        .unwrap();
    let (status, challenge, body) = call(&guarded(&app), Some(&format!("Bearer {token}"))).await;
    assert_eq!(status, 403);
    assert_eq!(
        challenge.as_deref(),
        Some(
            "Bearer realm=\"portcullis\", error=\"insufficient_scope\", scope=\"scheduler:executor\""
        )
    );
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "insufficient_scope");
}

#[tokio::test]
async fn expiry_and_not_before_follow_the_clock_with_leeway() {
    let clock = Arc::new(ManualClock::new(time::OffsetDateTime::now_utc()));
    let app =
        spawn_app_with_clock(clock.clone(), |c| c.tokens.leeway = Duration::from_secs(30)).await;
    let router = guarded(&app);
    let token = app
        .state
        .keys
        .sign(&claims(
            &app,
            "scheduler:executor",
            &app.state.config.issuer(),
            60,
        ))
        .unwrap();
    let bearer = format!("Bearer {token}");
    clock.advance(time::Duration::seconds(60 + 29));
    assert_eq!(
        call(&router, Some(&bearer)).await.0,
        200,
        "inside the leeway"
    );
    clock.advance(time::Duration::seconds(2));
    assert_eq!(
        call(&router, Some(&bearer)).await.0,
        401,
        "expired past the leeway"
    );

    let mut future = claims(&app, "scheduler:executor", &app.state.config.issuer(), 600);
    future.nbf += 120;
    let early = app.state.keys.sign(&future).unwrap();
    assert_eq!(call(&router, Some(&format!("Bearer {early}"))).await.0, 401);
}

#[tokio::test]
async fn admin_api_takes_an_admin_scoped_token_or_the_static_token() {
    let app = spawn_app(|c| {
        c.admin.token = Some(secrecy::SecretString::from("static-admin-token-0123456789"))
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/admin/keys", app.admin);
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(http.get(&url).send().await.unwrap()), 401);
    assert_eq!(
        status(
            http.get(&url)
                .bearer_auth("static-admin-token-0123456789")
                .send()
                .await
                .unwrap()
        ),
        200
    );
    let admin = app
        .state
        .keys
        .sign(&claims(
            &app,
            "portcullis:admin",
            &app.state.config.issuer(),
            300,
        ))
        .unwrap();
    assert_eq!(
        status(http.get(&url).bearer_auth(&admin).send().await.unwrap()),
        200
    );
    let reader = app
        .state
        .keys
        .sign(&claims(&app, "jobs:read", &app.state.config.issuer(), 300))
        .unwrap();
    assert_eq!(
        status(http.get(&url).bearer_auth(&reader).send().await.unwrap()),
        403
    );
}
