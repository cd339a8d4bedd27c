//! The token service over HTTPS: `POST /oauth2/token` (client_credentials, refresh_token),
//! introspection, revocation and discovery, with clients and the audit trail in a real
//! Postgres and refresh tokens in a real Redis. Sessions start through the refresh store
//! (as the SSO login will); time moves on a manual clock; PyJWT, which shares no code with
//! us, checks what we sign.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use harness::{Postgres, Redis};
use keyrotation::{Clock, KeyRing, ManualClock, TokenType};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use portcullis::clients::{Audience, ClientId, GrantType, NewClient, ScopeSet};
use portcullis::config::{Config, RedisConfig};
use portcullis::refresh::NewFamily;
use reqwest::StatusCode;
use reqwest::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, COOKIE, HeaderMap, PRAGMA, RETRY_AFTER, SET_COOKIE,
    WWW_AUTHENTICATE,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

use crate::support::{TestApp, eventually, spawn_app_with_clock};

/// `RefreshSettings::default().reuse_grace`.
const GRACE: time::Duration = time::Duration::seconds(10);
const CC: GrantType = GrantType::ClientCredentials;
const RT: GrantType = GrantType::RefreshToken;
/// What `application/x-www-form-urlencoded` leaves alone (the unreserved characters).
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
const INVALID_CLIENT_CHALLENGE: &str = "Basic realm=\"portcullis\", charset=\"UTF-8\"";

// === fixture ===

/// One instance on its own Postgres database and Redis key prefix, with a clock that
/// stands still until a test moves it.
struct Fixture {
    app: TestApp,
    http: reqwest::Client,
    clock: Arc<ManualClock>,
}

/// A client's credentials.
#[derive(Clone)]
struct Creds {
    id: String,
    secret: String,
}

/// How a request authenticates its client.
#[derive(Clone, Copy)]
enum Auth<'a> {
    /// `client_secret_basic`.
    Basic(&'a Creds),
    /// `client_secret_post`.
    Post(&'a Creds),
    /// Both at once (refused).
    Both(&'a Creds),
    None,
}

/// A response, read whole.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    /// `Null` for an empty body.
    body: Value,
}

impl Fixture {
    async fn new(name: &str) -> Self {
        Self::with(name, &Redis::shared().url(), |_| {}).await
    }

    async fn with(name: &str, redis_url: &str, customize: impl FnOnce(&mut Config)) -> Self {
        let db = Postgres::shared()
            .fresh_database(&format!("token_{name}"))
            .unwrap();
        let redis = RedisConfig {
            url: SecretString::from(redis_url.to_owned()),
            cluster: false,
            command_timeout: Duration::from_millis(500),
        };
        let prefix = format!("token-{name}-{}:", uuid::Uuid::new_v4());
        let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
        let app = spawn_app_with_clock(clock.clone(), move |c| {
            c.database.url = SecretString::from(db);
            c.redis = Some(redis);
            c.refresh.key_prefix = prefix;
            customize(c);
        })
        .await;
        let http = app.https_client();
        Self { app, http, clock }
    }

    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    fn issuer(&self) -> String {
        self.app.state.config.issuer()
    }

    /// Registers a client.
    async fn client(
        &self,
        id: &str,
        grants: &[GrantType],
        scopes: &str,
        audiences: &[&str],
        lifetime: Option<Duration>,
    ) -> Creds {
        let (client, secret) = self
            .app
            .state
            .clients
            .create(
                NewClient {
                    id: Some(ClientId::parse(id).unwrap()),
                    name: format!("test client {id}"),
                    grant_types: grants.iter().copied().collect(),
                    scopes: ScopeSet::parse(scopes).unwrap(),
                    audiences: audiences
                        .iter()
                        .map(|a| Audience::parse(a).unwrap())
                        .collect(),
                    access_token_lifetime: lifetime,
                },
                self.now(),
            )
            .await
            .unwrap();
        Creds {
            id: client.id.as_str().to_owned(),
            secret: secret.expose_secret().to_owned(),
        }
    }

    /// A client allowed both grants and the scopes `read write`, without audiences.
    async fn service(&self, id: &str) -> Creds {
        self.client(id, &[CC, RT], "read write", &[], None).await
    }

    /// Starts a session for `subject` at `client`, as the SSO login will; returns its
    /// first refresh token.
    async fn login(&self, client: &Creds, subject: &str, scope: &str) -> String {
        self.login_to(client, subject, scope, &[]).await
    }

    /// [`Self::login`] for a session granted `audience` (none: the issuer).
    async fn login_to(
        &self,
        client: &Creds,
        subject: &str,
        scope: &str,
        audience: &[&str],
    ) -> String {
        let issued = self
            .app
            .state
            .refresh
            .issue(
                NewFamily {
                    client_id: client.id.clone(),
                    subject: subject.to_owned(),
                    scope: scope.to_owned(),
                    audience: audience.iter().map(|a| (*a).to_owned()).collect(),
                    auth_time: self.now(),
                    session: json!({ "roles": ["viewer"] }),
                },
                self.now(),
            )
            .await
            .unwrap();
        issued.token.expose_secret().to_owned()
    }

    /// How many rotations the family of `token` has seen; `None` when `token` is not the
    /// current token of a live family.
    async fn generation(&self, token: &str) -> Option<u64> {
        self.app
            .state
            .refresh
            .inspect(&SecretString::from(token.to_owned()), self.now())
            .await
            .unwrap()
            .map(|s| s.generation)
    }

    /// `POST path` with a form body and the client authenticated as `auth`.
    async fn post(&self, path: &str, auth: Auth<'_>, params: &[(&str, &str)]) -> Answer {
        let mut pairs: Vec<(&str, &str)> = params.to_vec();
        let mut req = self.http.post(self.app.url(path));
        match auth {
            Auth::Basic(c) => req = req.header(AUTHORIZATION, basic(c)),
            Auth::Post(c) => {
                pairs.push(("client_id", &c.id));
                pairs.push(("client_secret", &c.secret));
            }
            Auth::Both(c) => {
                req = req.header(AUTHORIZATION, basic(c));
                pairs.push(("client_id", &c.id));
                pairs.push(("client_secret", &c.secret));
            }
            Auth::None => {}
        }
        let body = pairs
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    utf8_percent_encode(k, FORM),
                    utf8_percent_encode(v, FORM)
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        send(
            req.header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(body),
        )
        .await
    }

    /// `POST /oauth2/token` with Basic client authentication.
    async fn token(&self, client: &Creds, params: &[(&str, &str)]) -> Answer {
        self.post("/oauth2/token", Auth::Basic(client), params)
            .await
    }

    /// The refresh grant with `refresh_token` plus `extra`.
    async fn refresh(&self, client: &Creds, token: &str, extra: &[(&str, &str)]) -> Answer {
        let mut params = vec![("grant_type", "refresh_token"), ("refresh_token", token)];
        params.extend_from_slice(extra);
        self.token(client, &params).await
    }

    /// Refreshes and insists on success; returns the successor.
    async fn rotate(&self, client: &Creds, token: &str) -> String {
        let a = self.refresh(client, token, &[]).await;
        granted(&a);
        a.body["refresh_token"].as_str().unwrap().to_owned()
    }

    /// A raw `POST /oauth2/token` (for bodies a form encoder would not produce).
    async fn raw_token(&self, client: &Creds, content_type: &str, body: Vec<u8>) -> Answer {
        let req = self
            .http
            .post(self.app.url("/oauth2/token"))
            .header(AUTHORIZATION, basic(client))
            .header(CONTENT_TYPE, content_type)
            .body(body);
        send(req).await
    }

    /// The `iss` of a `client_credentials` token issued to a new service `name`.
    async fn iss_of_a_token(&self, name: &str) -> Value {
        let svc = self.service(name).await;
        let a = self
            .token(&svc, &[("grant_type", "client_credentials")])
            .await;
        let claims: Value = self
            .app
            .state
            .keys
            .verify(a.body["access_token"].as_str().unwrap())
            .unwrap();
        claims["iss"].clone()
    }

    async fn introspect(&self, client: &Creds, token: &str) -> Value {
        let a = self
            .post(
                "/oauth2/introspect",
                Auth::Basic(client),
                &[("token", token)],
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_no_store(&a);
        a.body
    }

    /// The claims of one of our access tokens for `audience`, verified with the
    /// instance's own keys and clock.
    fn claims_for(&self, token: &str, audience: &str) -> Value {
        let keys = &self.app.state.keys;
        let mut params = keys.verify_params().clone();
        params.audiences = vec![audience.to_owned()];
        keys.keys()
            .verify::<Value>(token, &params, keys.now())
            .unwrap_or_else(|e| panic!("token does not verify for {audience}: {e}"))
    }
}

fn basic(c: &Creds) -> String {
    // RFC 6749 §2.3.1: each part form-encoded, then joined and base64-encoded
    let raw = format!(
        "{}:{}",
        utf8_percent_encode(&c.id, FORM),
        utf8_percent_encode(&c.secret, FORM)
    );
    format!("Basic {}", STANDARD.encode(raw))
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{status}: body is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    Answer {
        status,
        headers,
        body,
    }
}

/// One request written by hand on its own connection (`connection: close`); the answer
/// must carry a `content-length`.
async fn exchange(app: &TestApp, request: &[u8]) -> Answer {
    use tokio::io::AsyncReadExt;
    let mut tls = app.tls().await;
    tls.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    // the server may close without a TLS close_notify once it has answered
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').unwrap();
        headers.append(
            reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
            value.trim().parse().unwrap(),
        );
    }
    let length: usize = headers[reqwest::header::CONTENT_LENGTH]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(body.len(), length, "{text}");
    Answer {
        status: StatusCode::from_u16(status).unwrap(),
        headers,
        body: serde_json::from_str(body).unwrap(),
    }
}

fn header<'a>(a: &'a Answer, name: &reqwest::header::HeaderName) -> Option<&'a str> {
    a.headers.get(name).map(|v| v.to_str().unwrap())
}

/// RFC 6749 §5.1: token-endpoint answers are never cached.
#[track_caller]
fn assert_no_store(a: &Answer) {
    assert_eq!(header(a, &CACHE_CONTROL), Some("no-store"), "{}", a.body);
    assert_eq!(header(a, &PRAGMA), Some("no-cache"), "{}", a.body);
}

/// An RFC 6749 §5.2 error: the status, exactly `error` and `error_description`, no
/// caching, and a Basic challenge exactly when the status is 401.
#[track_caller]
fn assert_error(a: &Answer, status: StatusCode, code: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_no_store(a);
    let members: Vec<&String> = a.body.as_object().unwrap().keys().collect();
    assert_eq!(members, ["error", "error_description"], "{}", a.body);
    assert_eq!(a.body["error"], code, "{}", a.body);
    assert!(
        a.body["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{}",
        a.body
    );
    let challenge = header(a, &WWW_AUTHENTICATE);
    if status == StatusCode::UNAUTHORIZED {
        assert_eq!(challenge, Some(INVALID_CLIENT_CHALLENGE));
    } else {
        assert_eq!(challenge, None);
    }
}

/// A successful token response; returns nothing, the caller reads `a.body`.
#[track_caller]
fn granted(a: &Answer) {
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_no_store(a);
    assert_eq!(a.body["token_type"], "Bearer", "{}", a.body);
    assert!(a.body["access_token"].is_string(), "{}", a.body);
}

fn jose_header(token: &str) -> Value {
    let first = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(first).unwrap()).unwrap()
}

fn members(v: &Value) -> Vec<&str> {
    let mut m: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    m.sort_unstable();
    m
}

// === client_credentials ===

#[tokio::test]
async fn client_credentials_issues_tokens_whose_claims_are_right() {
    let f = Fixture::new("cc_claims").await;
    let plain = f.client("svc-plain", &[CC], "read write", &[], None).await;
    let api = f
        .client(
            "svc-api",
            &[CC],
            "read write",
            &["https://api.example.test", "billing"],
            Some(Duration::from_secs(120)),
        )
        .await;
    let issuer = f.issuer();
    let active_kid = f.app.state.keys.status().active_kid.unwrap();

    // client_secret_basic, no scope asked: everything allowed, for the issuer
    let a = f
        .token(&plain, &[("grant_type", "client_credentials")])
        .await;
    granted(&a);
    assert_eq!(
        members(&a.body),
        ["access_token", "expires_in", "scope", "token_type"]
    );
    assert_eq!(a.body["expires_in"], 3600);
    assert_eq!(a.body["scope"], "read write");
    let first = a.body["access_token"].as_str().unwrap().to_owned();
    let claims: Value = f.app.state.keys.verify::<Value>(&first).unwrap();
    let iat = f.now().unix_timestamp();
    let jti1 = claims["jti"].as_str().unwrap().to_owned();
    assert_eq!(
        claims,
        json!({
            "iss": issuer, "sub": "svc-plain", "aud": issuer, "client_id": "svc-plain",
            "scope": "read write", "iat": iat, "nbf": iat, "exp": iat + 3600, "jti": jti1,
        })
    );
    let header = jose_header(&first);
    // by default typed as every earlier version typed it, and as relying parties such as
    // Spring Security's default JWT decoder require (`at+jwt`: tokens.access_token_typ,
    // `introspection_refuses_an_access_token_typed_jwt_once_accept_jwt_typ_is_off`)
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], active_kid.as_str());

    // client_secret_post, a narrower scope
    let a = f
        .post(
            "/oauth2/token",
            Auth::Post(&plain),
            &[("grant_type", "client_credentials"), ("scope", "read")],
        )
        .await;
    granted(&a);
    assert_eq!(a.body["scope"], "read");
    let second = a.body["access_token"].as_str().unwrap();
    let claims: Value = f.app.state.keys.verify::<Value>(second).unwrap();
    assert_eq!(claims["sub"], "svc-plain");
    assert_eq!(claims["scope"], "read");
    assert_ne!(claims["jti"], jti1, "every token has its own jti");
    uuid::Uuid::parse_str(&jti1).unwrap();
    // Basic, naming itself in the body too (RFC 6749 §3.2.1; some libraries do)
    let a = f
        .post(
            "/oauth2/token",
            Auth::Basic(&plain),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "svc-plain"),
            ],
        )
        .await;
    granted(&a);
    // not asserted here: `portcullis_tokens_issued_total{grant="client_credentials"}` is
    // process-wide, and the other tests of this binary issue client_credentials tokens at
    // the same time, so no count this test could read is its own

    // a client with audiences: its first one by default, and its own lifetime
    let a = f.token(&api, &[("grant_type", "client_credentials")]).await;
    granted(&a);
    assert_eq!(a.body["expires_in"], 120);
    let token = a.body["access_token"].as_str().unwrap();
    let claims = f.claims_for(token, "https://api.example.test");
    assert_eq!(claims["aud"], "https://api.example.test");
    assert_eq!(claims["sub"], "svc-api");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        120
    );
    // a token for an API is not a token for the issuer
    assert!(f.app.state.keys.verify::<Value>(token).is_err());

    // RFC 8707 `resource` picks another of its audiences
    let a = f
        .token(
            &api,
            &[
                ("grant_type", "client_credentials"),
                ("resource", "billing"),
                ("scope", "write"),
            ],
        )
        .await;
    granted(&a);
    let claims = f.claims_for(a.body["access_token"].as_str().unwrap(), "billing");
    assert_eq!(claims["aud"], "billing");
    assert_eq!(claims["scope"], "write");
}

// === refusals ===

#[tokio::test]
async fn malformed_token_requests_are_invalid_request_and_change_nothing() {
    let f = Fixture::new("malformed").await;
    let svc = f.service("svc-malformed").await;
    let rt = f.login(&svc, "alice", "read write").await;
    let bad = |a: &Answer| assert_error(a, StatusCode::BAD_REQUEST, "invalid_request");

    // no grant_type, or an empty one
    bad(&f.token(&svc, &[("refresh_token", &rt)]).await);
    bad(&f
        .token(&svc, &[("grant_type", ""), ("refresh_token", &rt)])
        .await);
    // the refresh grant without its token
    bad(&f.token(&svc, &[("grant_type", "refresh_token")]).await);
    // a parameter twice, even spelled differently
    bad(&f
        .raw_token(
            &svc,
            "application/x-www-form-urlencoded",
            format!("grant_type=refresh_token&refresh_token={rt}&refresh_token={rt}").into_bytes(),
        )
        .await);
    bad(&f
        .raw_token(
            &svc,
            "application/x-www-form-urlencoded",
            format!("grant_type=refresh_token&refresh_token={rt}&%73cope=read&scope=read")
                .into_bytes(),
        )
        .await);
    // bytes that are not UTF-8, raw or percent-encoded
    let mut raw = format!("grant_type=refresh_token&refresh_token={rt}&scope=").into_bytes();
    raw.extend_from_slice(b"\xff\xfe");
    bad(&f
        .raw_token(&svc, "application/x-www-form-urlencoded", raw)
        .await);
    bad(&f
        .raw_token(
            &svc,
            "application/x-www-form-urlencoded",
            format!("grant_type=refresh_token&refresh_token={rt}&scope=%C3%28").into_bytes(),
        )
        .await);
    // JSON, or no content type at all
    let json_body = json!({ "grant_type": "refresh_token", "refresh_token": rt }).to_string();
    bad(&f
        .raw_token(&svc, "application/json", json_body.into_bytes())
        .await);
    let no_type = f
        .http
        .post(f.app.url("/oauth2/token"))
        .header(AUTHORIZATION, basic(&svc))
        .body(format!("grant_type=refresh_token&refresh_token={rt}"));
    bad(&send(no_type).await);
    // two ways of authenticating at once
    bad(&f
        .post(
            "/oauth2/token",
            Auth::Both(&svc),
            &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
        )
        .await);
    // Basic, and another client named in the body
    let a = f
        .raw_token(
            &svc,
            "application/x-www-form-urlencoded",
            format!("grant_type=refresh_token&refresh_token={rt}&client_id=someone-else")
                .into_bytes(),
        )
        .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_request");
    // a malformed scope (RFC 6749 §5.2 calls that invalid_scope)
    for scope in ["read  write", " read", "read\"", "caf\u{e9}"] {
        let a = f.refresh(&svc, &rt, &[("scope", scope)]).await;
        assert_error(&a, StatusCode::BAD_REQUEST, "invalid_scope");
    }

    // none of that touched the session: the token is still current, unrotated, and works
    assert_eq!(f.generation(&rt).await, Some(0));
    f.clock.advance(GRACE + time::Duration::seconds(1));
    f.rotate(&svc, &rt).await;
}

/// RFC 6749 §3.1: "The authorization server MUST ignore unrecognized request parameters"
/// — repeated, empty or not UTF-8, an unknown parameter changes nothing; only the
/// endpoint's own parameters may not repeat.
#[tokio::test]
async fn unrecognized_parameters_are_ignored_however_often_they_appear() {
    let f = Fixture::new("unrecognized").await;
    let svc = f.client("svc-unrecognized", &[CC], "read", &[], None).await;
    let a = f
        .raw_token(
            &svc,
            "application/x-www-form-urlencoded",
            b"extra=1&grant_type=client_credentials&extra=2&extra=&odd=%FF&%FE%FF=x&__main__"
                .to_vec(),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert!(a.body["access_token"].is_string(), "{}", a.body);
    assert_eq!(a.body["scope"], "read");
    // the same body with a known parameter twice is still refused
    let a = f
        .raw_token(
            &svc,
            "application/x-www-form-urlencoded",
            b"extra=1&grant_type=client_credentials&scope=read&scope=read".to_vec(),
        )
        .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn unknown_grants_and_grants_a_client_may_not_use_are_refused() {
    let f = Fixture::new("grants").await;
    let cc_only = f.client("svc-cc-only", &[CC], "read", &[], None).await;
    let rt_only = f.client("svc-rt-only", &[RT], "read", &[], None).await;
    let rt = f.login(&cc_only, "alice", "read").await;

    for grant in [
        "password",
        "authorization_code",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "CLIENT_CREDENTIALS",
    ] {
        let a = f.token(&cc_only, &[("grant_type", grant)]).await;
        assert_error(&a, StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    let a = f
        .token(&rt_only, &[("grant_type", "client_credentials")])
        .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "unauthorized_client");
    let a = f.refresh(&cc_only, &rt, &[]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "unauthorized_client");
    assert_eq!(f.generation(&rt).await, Some(0), "refused before the store");
}

#[tokio::test]
async fn failed_client_authentication_is_one_indistinguishable_401() {
    let f = Fixture::new("client_auth").await;
    let good = f.service("svc-good").await;
    let disabled = f.service("svc-disabled").await;
    f.app
        .state
        .clients
        .disable(&ClientId::parse("svc-disabled").unwrap(), f.now())
        .await
        .unwrap();
    let wrong_secret = Creds {
        secret: format!("{}x", good.secret),
        ..good.clone()
    };
    let unknown = Creds {
        id: "svc-nobody".to_owned(),
        secret: good.secret.clone(),
    };
    let cc = [("grant_type", "client_credentials")];

    let mut bodies = HashSet::new();
    for creds in [&wrong_secret, &unknown, &disabled] {
        for auth in [Auth::Basic(creds), Auth::Post(creds)] {
            let a = f.post("/oauth2/token", auth, &cc).await;
            assert_error(&a, StatusCode::UNAUTHORIZED, "invalid_client");
            bodies.insert(a.body.to_string());
        }
    }
    assert_eq!(
        bodies.len(),
        1,
        "the answers tell the failures apart: {bodies:?}"
    );

    // no authentication at all, half of client_secret_post, a Basic header that is not
    // Basic credentials
    let a = f.post("/oauth2/token", Auth::None, &cc).await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "invalid_client");
    let a = f
        .post(
            "/oauth2/token",
            Auth::None,
            &[cc[0], ("client_id", "svc-good")],
        )
        .await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "invalid_client");
    for value in ["Bearer abc", "Basic !!!", "Basic c3ZjLWdvb2Q="] {
        let req = f
            .http
            .post(f.app.url("/oauth2/token"))
            .header(AUTHORIZATION, value)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials");
        assert_error(&send(req).await, StatusCode::UNAUTHORIZED, "invalid_client");
    }

    // and the good client still gets its token
    granted(&f.token(&good, &cc).await);
}

#[tokio::test]
async fn scopes_and_resources_beyond_the_clients_allowance_are_refused() {
    let f = Fixture::new("allowance").await;
    let svc = f
        .client(
            "svc-allow",
            &[CC],
            "read write",
            &["https://api.example.test"],
            None,
        )
        .await;
    let cc = ("grant_type", "client_credentials");
    for scope in ["admin", "read admin"] {
        let a = f.token(&svc, &[cc, ("scope", scope)]).await;
        assert_error(&a, StatusCode::BAD_REQUEST, "invalid_scope");
    }
    for scope in ["read  write", "read\\"] {
        let a = f.token(&svc, &[cc, ("scope", scope)]).await;
        assert_error(&a, StatusCode::BAD_REQUEST, "invalid_scope");
    }
    for resource in [
        "https://evil.example.test",
        "not a resource",
        "https://api.example.test/",
    ] {
        let a = f.token(&svc, &[cc, ("resource", resource)]).await;
        assert_error(&a, StatusCode::BAD_REQUEST, "invalid_target");
    }
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_with_413_and_change_nothing() {
    let f = Fixture::with("limit", &Redis::shared().url(), |c| {
        c.server.max_body_bytes = 300;
    })
    .await;
    let svc = f.service("svc-limit").await;
    let rt = f.login(&svc, "alice", "read").await;
    let form = format!(
        "grant_type=refresh_token&refresh_token={rt}&pad={}",
        "x".repeat(400)
    );
    let check = |a: &Answer| {
        assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.body);
        assert_eq!(
            a.body,
            json!({ "error": "payload_too_large", "error_description": "the request body exceeds 300 bytes" })
        );
        assert_no_store(a);
    };
    // declared up front
    check(
        &f.raw_token(
            &svc,
            "application/x-www-form-urlencoded",
            form.clone().into_bytes(),
        )
        .await,
    );
    // chunked, so found out while reading
    let mut request = format!(
        "POST /oauth2/token HTTP/1.1\r\nhost: localhost\r\nauthorization: {}\r\n\
         content-type: application/x-www-form-urlencoded\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n",
        basic(&svc)
    );
    for chunk in form.as_bytes().chunks(100) {
        request.push_str(&format!(
            "{:x}\r\n{}\r\n",
            chunk.len(),
            std::str::from_utf8(chunk).unwrap()
        ));
    }
    request.push_str("0\r\n\r\n");
    check(&exchange(&f.app, request.as_bytes()).await);

    assert_eq!(f.generation(&rt).await, Some(0));
    f.rotate(&svc, &rt).await;
}

// === refresh_token grant ===

#[tokio::test]
async fn refresh_rotates_and_reuse_after_the_grace_window_revokes_the_family() {
    let f = Fixture::new("reuse").await;
    let svc = f.service("svc-reuse").await;
    let rt = f.login(&svc, "alice", "read write").await;
    let family = rt.split('.').nth(1).unwrap().to_owned();

    let a = f.refresh(&svc, &rt, &[]).await;
    granted(&a);
    assert_eq!(
        members(&a.body),
        [
            "access_token",
            "expires_in",
            "refresh_token",
            "scope",
            "token_type"
        ]
    );
    assert_eq!(a.body["scope"], "read write");
    assert_eq!(a.body["expires_in"], 3600);
    let successor = a.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(successor, rt);
    assert!(successor.starts_with(&format!("rt1.{family}.")));
    let claims: Value = f
        .app
        .state
        .keys
        .verify(a.body["access_token"].as_str().unwrap())
        .unwrap();
    let iat = f.now().unix_timestamp();
    let jti = claims["jti"].clone();
    let issuer = f.issuer();
    assert_eq!(
        claims,
        json!({
            "iss": issuer, "sub": "alice", "aud": issuer, "client_id": "svc-reuse",
            "scope": "read write", "roles": ["viewer"], "sid": family,
            "iat": iat, "nbf": iat, "exp": iat + 3600, "jti": jti,
        })
    );

    // the rotated token, presented after the grace window: re-use
    f.clock.advance(GRACE + time::Duration::seconds(1));
    let a = f.refresh(&svc, &rt, &[]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_grant");
    // ... and the whole family went with it
    let a = f.refresh(&svc, &successor, &[]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_grant");
    assert_eq!(f.generation(&successor).await, None);

    let db = f.app.state.db.clone();
    let wanted = family.clone();
    eventually(
        Duration::from_secs(10),
        "a refresh.reuse_detected audit row",
        || {
            let db = db.clone();
            let wanted = wanted.clone();
            async move {
                let rows = portcullis::audit::recent(&db, "refresh.reuse_detected", 10)
                    .await
                    .unwrap();
                rows.iter().any(|(actor, target, detail)| {
                    actor == "client:svc-reuse"
                        && *target == wanted
                        && serde_json::from_str::<Value>(detail).unwrap()
                            == json!({ "subject": "alice", "family_revoked": true })
                })
            }
        },
    )
    .await;
}

#[tokio::test]
async fn reuse_within_the_grace_window_answers_the_same_successor() {
    let f = Fixture::new("grace").await;
    let svc = f.service("svc-grace").await;
    let rt = f.login(&svc, "alice", "read").await;

    let first = f.refresh(&svc, &rt, &[]).await;
    granted(&first);
    // a second tab, right after, and another at the very end of the window
    let second = f.refresh(&svc, &rt, &[]).await;
    granted(&second);
    f.clock.advance(GRACE);
    let third = f.refresh(&svc, &rt, &[]).await;
    granted(&third);
    assert_eq!(first.body["refresh_token"], second.body["refresh_token"]);
    assert_eq!(first.body["refresh_token"], third.body["refresh_token"]);
    assert_ne!(first.body["access_token"], second.body["access_token"]);

    let successor = first.body["refresh_token"].as_str().unwrap();
    assert_eq!(f.generation(successor).await, Some(1), "one rotation only");
    f.rotate(&svc, successor).await;
}

#[tokio::test]
async fn a_refresh_may_narrow_the_scope_but_not_widen_it() {
    let f = Fixture::new("narrow").await;
    let svc = f
        .client("svc-narrow", &[RT], "read write admin", &[], None)
        .await;
    let rt = f.login(&svc, "alice", "read write").await;

    let a = f.refresh(&svc, &rt, &[("scope", "read")]).await;
    granted(&a);
    assert_eq!(a.body["scope"], "read");
    let claims: Value = f
        .app
        .state
        .keys
        .verify(a.body["access_token"].as_str().unwrap())
        .unwrap();
    assert_eq!(claims["scope"], "read");
    // narrowing one access token does not narrow the session
    let rt = a.body["refresh_token"].as_str().unwrap().to_owned();
    let a = f.refresh(&svc, &rt, &[]).await;
    granted(&a);
    assert_eq!(a.body["scope"], "read write");
    let rt = a.body["refresh_token"].as_str().unwrap().to_owned();

    // wider than the session (even if the client may have it): refused, and the token
    // was not consumed — still current once the grace window is long past
    for scope in ["read write admin", "admin"] {
        let a = f.refresh(&svc, &rt, &[("scope", scope)]).await;
        assert_error(&a, StatusCode::BAD_REQUEST, "invalid_scope");
    }
    assert_eq!(f.generation(&rt).await, Some(2));
    f.clock.advance(GRACE + time::Duration::seconds(1));
    f.rotate(&svc, &rt).await;
}

/// RFC 8707 §2.2: `resource` on a refresh narrows the access token's audience to one the
/// session already covers; anything else is `invalid_target` and consumes nothing.
#[tokio::test]
async fn a_refresh_may_narrow_the_audience_to_a_resource_the_grant_covers() {
    let f = Fixture::new("resource").await;
    let svc = f
        .client(
            "svc-resource",
            &[RT],
            "read write",
            &["https://api.example.test", "billing", "reports"],
            None,
        )
        .await;
    let rt = f
        .login_to(
            &svc,
            "alice",
            "read write",
            &["https://api.example.test", "billing"],
        )
        .await;

    // one of the session's audiences, alone, with a narrower scope as well
    let a = f
        .refresh(&svc, &rt, &[("resource", "billing"), ("scope", "read")])
        .await;
    granted(&a);
    let claims = f.claims_for(a.body["access_token"].as_str().unwrap(), "billing");
    assert_eq!(claims["aud"], "billing");
    assert_eq!(claims["scope"], "read");
    // narrowing one access token does not narrow the session
    let rt = a.body["refresh_token"].as_str().unwrap().to_owned();
    let a = f.refresh(&svc, &rt, &[]).await;
    granted(&a);
    let claims = f.claims_for(a.body["access_token"].as_str().unwrap(), "billing");
    assert_eq!(
        claims["aud"],
        json!(["https://api.example.test", "billing"])
    );
    let rt = a.body["refresh_token"].as_str().unwrap().to_owned();

    // beyond the session (even an audience the client may have), a near miss, the
    // issuer, a malformed value: refused, and the token was not consumed
    let issuer = f.issuer();
    for resource in [
        "reports",
        "https://evil.example.test",
        "https://api.example.test/",
        issuer.as_str(),
        "not a resource",
    ] {
        let a = f.refresh(&svc, &rt, &[("resource", resource)]).await;
        assert_error(&a, StatusCode::BAD_REQUEST, "invalid_target");
        let a = f
            .refresh(&svc, &rt, &[("resource", resource), ("scope", "read")])
            .await;
        assert_error(&a, StatusCode::BAD_REQUEST, "invalid_target");
    }
    // one resource per request, as for client_credentials
    let a = f
        .raw_token(
            &svc,
            "application/x-www-form-urlencoded",
            format!(
                "grant_type=refresh_token&refresh_token={rt}&resource=billing&resource=billing"
            )
            .into_bytes(),
        )
        .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(f.generation(&rt).await, Some(2));
    f.clock.advance(GRACE + time::Duration::seconds(1));
    let rt = f.rotate(&svc, &rt).await;

    // another client presenting the token learns nothing about its audiences
    let other = f.service("svc-resource-other").await;
    let a = f.refresh(&other, &rt, &[("resource", "reports")]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_grant");

    // a session granted no audience covers the issuer, and only the issuer
    let rt = f.login(&svc, "bob", "read").await;
    let a = f.refresh(&svc, &rt, &[("resource", "billing")]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_target");
    assert_eq!(f.generation(&rt).await, Some(0));
    let a = f.refresh(&svc, &rt, &[("resource", &issuer)]).await;
    granted(&a);
    let claims = f.claims_for(a.body["access_token"].as_str().unwrap(), &issuer);
    assert_eq!(claims["aud"], issuer);
}

#[tokio::test]
async fn a_refresh_token_of_another_client_is_invalid_grant() {
    let f = Fixture::new("other_client").await;
    let owner = f.service("svc-owner").await;
    let thief = f.service("svc-thief").await;
    let rt = f.login(&owner, "alice", "read").await;

    let a = f.refresh(&thief, &rt, &[]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_grant");
    let a = f.refresh(&thief, &rt, &[("scope", "read write")]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_grant");
    assert_eq!(f.generation(&rt).await, Some(0));
    f.rotate(&owner, &rt).await;
}

#[tokio::test]
async fn concurrent_refreshes_of_one_token_all_get_the_same_successor() {
    let f = Fixture::new("concurrent").await;
    let svc = f.service("svc-concurrent").await;
    let rt = f.login(&svc, "alice", "read").await;

    let answers = futures::future::join_all((0..100).map(|_| f.refresh(&svc, &rt, &[]))).await;
    let mut successors = HashSet::new();
    for a in &answers {
        granted(a);
        successors.insert(a.body["refresh_token"].as_str().unwrap().to_owned());
    }
    assert_eq!(successors.len(), 1, "{successors:?}");
    let successor = successors.into_iter().next().unwrap();
    assert_ne!(successor, rt);

    // exactly one rotation happened, and its result is the one live token
    assert_eq!(f.generation(&successor).await, Some(1));
    assert_eq!(f.generation(&rt).await, None);
    f.rotate(&svc, &successor).await;
}

#[tokio::test]
async fn sessions_expire_when_idle_and_at_their_absolute_lifetime() {
    let f = Fixture::with("expiry", &Redis::shared().url(), |c| {
        c.refresh.idle_lifetime = Duration::from_secs(3600);
        c.refresh.absolute_lifetime = Duration::from_secs(3 * 3600);
    })
    .await;
    let svc = f.service("svc-expiry").await;
    let second = time::Duration::seconds(1);
    let hour = time::Duration::hours(1);

    // idle: used within the hour it lives on; unused for a full hour it is dead
    let rt = f.login(&svc, "alice", "read").await;
    f.clock.advance(hour - second);
    let rt = f.rotate(&svc, &rt).await;
    f.clock.advance(hour - second);
    let rt = f.rotate(&svc, &rt).await;
    f.clock.advance(hour);
    let a = f.refresh(&svc, &rt, &[]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_grant");

    // absolute: kept busy, it still ends three hours after the login
    let mut rt = f.login(&svc, "bob", "read").await;
    for _ in 0..3 {
        f.clock.advance(time::Duration::minutes(50));
        rt = f.rotate(&svc, &rt).await;
    }
    f.clock.advance(time::Duration::minutes(30) - second);
    rt = f.rotate(&svc, &rt).await;
    f.clock.advance(second);
    let a = f.refresh(&svc, &rt, &[]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_grant");
}

// === introspection ===

#[tokio::test]
async fn introspection_describes_live_tokens_to_those_allowed_to_see_them() {
    let f = Fixture::new("introspect").await;
    let svc = f.service("svc-intro").await;
    let other = f.service("svc-other").await;
    let issuer = f.issuer();

    // an access token: any authenticated client may introspect it
    let a = f.token(&svc, &[("grant_type", "client_credentials")]).await;
    let at = a.body["access_token"].as_str().unwrap().to_owned();
    let iat = f.now().unix_timestamp();
    let body = f.introspect(&other, &at).await;
    let jti = body["jti"].clone();
    assert!(jti.is_string());
    assert_eq!(
        body,
        json!({
            "active": true, "token_type": "Bearer", "client_id": "svc-intro",
            "sub": "svc-intro", "scope": "read write", "aud": issuer, "iss": issuer,
            "exp": iat + 3600, "iat": iat, "nbf": iat, "jti": jti, "roles": [],
        })
    );

    // a refresh token: only its own client sees it
    let login_at = f.now();
    let rt = f.login(&svc, "alice", "read").await;
    let family = rt.split('.').nth(1).unwrap();
    let idle_exp = login_at + time::Duration::days(7);
    assert_eq!(
        f.introspect(&svc, &rt).await,
        json!({
            "active": true, "token_type": "refresh_token", "client_id": "svc-intro",
            "sub": "alice", "scope": "read", "aud": [], "iss": issuer,
            "exp": idle_exp.unix_timestamp(), "iat": login_at.unix_timestamp(),
            "auth_time": login_at.unix_timestamp(), "sid": family,
        })
    );
    assert_eq!(f.introspect(&other, &rt).await, json!({ "active": false }));

    // the same claims signed by our keys as an earlier version signed access tokens
    // (`typ: JWT`): active while `tokens.accept_jwt_typ` is on, as on a bearer route
    // (`introspection_refuses_an_access_token_typed_jwt_once_accept_jwt_typ_is_off`)
    let claims: Value = f.app.state.keys.verify(&at).unwrap();
    let legacy = f.app.state.keys.keys().sign(&claims, f.now()).unwrap();
    assert_eq!(jose_header(&legacy)["typ"], "JWT");
    assert_eq!(f.introspect(&other, &legacy).await, body);
    // as another kind of JWT, or with no type: not an access token
    for typ in [Some("id_token+jwt"), None] {
        let token = f.app.sign_with_typ(typ, &claims);
        assert_eq!(
            f.introspect(&other, &token).await,
            json!({ "active": false }),
            "{typ:?}"
        );
    }

    // rotated, tampered, expired or garbage: inactive
    let successor = f.rotate(&svc, &rt).await;
    assert_eq!(f.introspect(&svc, &rt).await, json!({ "active": false }));
    assert_eq!(f.introspect(&svc, &successor).await["active"], true);
    let mut forged_sig = at.rsplit_once('.').unwrap().0.to_owned();
    forged_sig.push('.');
    forged_sig.push_str(&URL_SAFE_NO_PAD.encode([7u8; 64]));
    for garbage in [
        "nonsense",
        "a.b.c",
        "rt1.x.y",
        &forged_sig,
        &format!("{}.{}", successor, "x"),
    ] {
        assert_eq!(
            f.introspect(&svc, garbage).await,
            json!({ "active": false }),
            "{garbage}"
        );
    }
    f.clock.advance(time::Duration::seconds(3600 + 31));
    assert_eq!(f.introspect(&other, &at).await, json!({ "active": false }));

    // the caller must authenticate
    let a = f
        .post("/oauth2/introspect", Auth::None, &[("token", &at)])
        .await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "invalid_client");
    let a = f.post("/oauth2/introspect", Auth::Basic(&svc), &[]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_request");
}

/// The last steps of the upgrade path: with `tokens.access_token_typ = "at+jwt"` the token
/// endpoint issues tokens typed `at+jwt` (RFC 9068 §2.1), which verify with
/// `tokens.accept_jwt_typ` off; introspection then refuses what the bearer layer refuses:
/// a token of ours typed `JWT` (as access tokens were issued before) is inactive, the
/// `at+jwt` token with the same claims active.
#[tokio::test]
async fn introspection_refuses_an_access_token_typed_jwt_once_accept_jwt_typ_is_off() {
    let f = Fixture::with("introspect-strict", &Redis::shared().url(), |c| {
        c.tokens.access_token_typ = TokenType::AccessToken;
        c.tokens.accept_jwt_typ = false;
    })
    .await;
    let svc = f.service("svc-strict").await;
    let a = f.token(&svc, &[("grant_type", "client_credentials")]).await;
    granted(&a);
    let at = a.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(jose_header(&at)["typ"], "at+jwt", "RFC 9068 §2.1");
    assert_eq!(f.introspect(&svc, &at).await["active"], true);

    let claims: Value = f.app.state.keys.verify(&at).unwrap();
    let legacy = f.app.state.keys.keys().sign(&claims, f.now()).unwrap();
    assert_eq!(jose_header(&legacy)["typ"], "JWT");
    assert_eq!(
        f.introspect(&svc, &legacy).await,
        json!({ "active": false })
    );
    assert!(f.app.state.keys.verify::<Value>(&legacy).is_err());
}

// === revocation ===

#[tokio::test]
async fn revocation_follows_rfc7009() {
    let f = Fixture::new("revoke").await;
    let svc = f.service("svc-revoke").await;
    let other = f.service("svc-other").await;
    let fx = &f;
    let revoke = move |client: &Creds, token: &str| {
        let client = client.clone();
        let token = token.to_owned();
        async move {
            fx.post("/oauth2/revoke", Auth::Basic(&client), &[("token", &token)])
                .await
        }
    };
    let ok = |a: &Answer| {
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(a.body, Value::Null);
        assert_no_store(a);
    };

    // a refresh token (and with it its session)
    let rt = f.login(&svc, "alice", "read").await;
    let successor = f.rotate(&svc, &rt).await;
    ok(&revoke(&svc, &rt).await);
    let a = f.refresh(&svc, &successor, &[]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_grant");
    // again, or something never issued: still 200
    ok(&revoke(&svc, &successor).await);
    ok(&revoke(&svc, "nonsense").await);
    ok(&revoke(&svc, &format!("rt1.{}.{}", "A".repeat(22), "B".repeat(64))).await);

    // an access token cannot be revoked one by one
    let at = f.token(&svc, &[("grant_type", "client_credentials")]).await;
    let a = revoke(&svc, at.body["access_token"].as_str().unwrap()).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "unsupported_token_type");

    // someone else's refresh token: refused, and it lives on
    let rt = f.login(&svc, "bob", "read").await;
    let a = revoke(&other, &rt).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "unauthorized_client");
    assert_eq!(f.generation(&rt).await, Some(0));
    f.rotate(&svc, &rt).await;

    // no client authentication, no token
    let a = f
        .post("/oauth2/revoke", Auth::None, &[("token", &rt)])
        .await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "invalid_client");
    let a = f.post("/oauth2/revoke", Auth::Basic(&svc), &[]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn revoking_a_subject_or_a_client_in_the_store_ends_their_refreshes() {
    let f = Fixture::new("revoke_all").await;
    let svc = f.service("svc-a").await;
    let other = f.service("svc-b").await;
    let alice_a = f.login(&svc, "alice", "read").await;
    let alice_b = f.login(&other, "alice", "read").await;
    let bob_a = f.login(&svc, "bob", "read").await;
    let bob_b = f.login(&other, "bob", "read").await;

    // "sign out everywhere"
    assert_eq!(
        f.app.state.refresh.revoke_subject("alice").await.unwrap(),
        2
    );
    for (client, rt) in [(&svc, &alice_a), (&other, &alice_b)] {
        let a = f.refresh(client, rt, &[]).await;
        assert_error(&a, StatusCode::BAD_REQUEST, "invalid_grant");
    }
    let bob_a = f.rotate(&svc, &bob_a).await;

    // "disable client"
    assert_eq!(f.app.state.refresh.revoke_client("svc-a").await.unwrap(), 1);
    let a = f.refresh(&svc, &bob_a, &[]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_grant");
    f.rotate(&other, &bob_b).await;
}

// === Redis away ===

#[tokio::test]
async fn without_redis_refresh_answers_503_and_loses_nothing() {
    let redis = Redis::start_persistent().unwrap();
    let f = Fixture::with("outage", &redis.url(), |_| {}).await;
    let svc = f.service("svc-outage").await;
    let rt = f.login(&svc, "alice", "read").await;

    redis.stop();
    let a = f.refresh(&svc, &rt, &[]).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert_eq!(
        a.body,
        json!({
            "error": "temporarily_unavailable",
            "error_description": "refresh-token store is unavailable; try again shortly",
        })
    );
    assert_no_store(&a);
    assert_eq!(header(&a, &RETRY_AFTER), Some("5"));
    for path in ["/oauth2/introspect", "/oauth2/revoke"] {
        let a = f.post(path, Auth::Basic(&svc), &[("token", &rt)]).await;
        assert_eq!(
            a.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{path}: {}",
            a.body
        );
        assert_eq!(a.body["error"], "temporarily_unavailable");
    }
    // what does not need Redis goes on working
    granted(&f.token(&svc, &[("grant_type", "client_credentials")]).await);

    // back, with its data, and the same instance finds it again
    redis.restart().unwrap();
    let f = &f;
    let rt = rt.as_str();
    let svc = &svc;
    eventually(
        Duration::from_secs(15),
        "the refresh token is live again",
        move || async move {
            let a = f
                .post("/oauth2/introspect", Auth::Basic(svc), &[("token", rt)])
                .await;
            a.status == StatusCode::OK && a.body["active"] == true
        },
    )
    .await;
    assert_eq!(f.generation(rt).await, Some(0));
    f.rotate(svc, rt).await;
}

// === signing keys away ===

/// A fixture whose key ring is never reloaded behind the test's back (the tests below
/// swap rings in by hand).
async fn held_ring_fixture(name: &str) -> Fixture {
    Fixture::with(name, &Redis::shared().url(), |c| {
        c.keys.reload_interval = Duration::from_secs(3600);
    })
    .await
}

/// Leaves the instance with a ring that cannot sign, as when the active key's window
/// ended while the key source was unreachable: that key now only verifies, and no other
/// has taken over. Returns the ring and version to put back with [`resume_signing`].
fn stop_signing(f: &Fixture) -> (KeyRing, Option<u64>) {
    let keys = f.app.state.keys.keys();
    let (ring, version) = (keys.ring(), keys.ring_version());
    let now = f.now();
    let mut stalled = ring.clone();
    for key in stalled.keys.iter_mut().filter(|k| k.signs_at(now)) {
        key.retire_at = now;
    }
    keys.publish(stalled, version, now).unwrap();
    assert!(!keys.can_sign(now));
    (ring, version)
}

fn resume_signing(f: &Fixture, (ring, version): (KeyRing, Option<u64>)) {
    let keys = f.app.state.keys.keys();
    keys.publish(ring, version, f.now()).unwrap();
    assert!(keys.can_sign(f.now()));
}

#[track_caller]
fn assert_keys_unavailable(a: &Answer) {
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert_eq!(
        a.body,
        json!({
            "error": "temporarily_unavailable",
            "error_description": "signing keys is unavailable; try again shortly",
        })
    );
    assert_no_store(a);
    assert_eq!(header(a, &RETRY_AFTER), Some("5"));
}

#[tokio::test]
async fn a_refresh_that_cannot_be_signed_rotates_nothing() {
    let f = held_ring_fixture("nosign").await;
    let svc = f.service("svc-nosign").await;
    let rt = f.login(&svc, "alice", "read").await;

    let held = stop_signing(&f);
    assert_keys_unavailable(&f.refresh(&svc, &rt, &[]).await);
    assert_eq!(f.generation(&rt).await, Some(0), "the token was used up");

    // signing works again only after the grace window: the same token still refreshes,
    // and is not taken for a re-used one
    f.clock.advance(GRACE + time::Duration::seconds(1));
    resume_signing(&f, held);
    let successor = f.rotate(&svc, &rt).await;
    assert_eq!(f.generation(&successor).await, Some(1));
    f.rotate(&svc, &successor).await;
}

#[tokio::test]
async fn a_console_renewal_that_cannot_be_signed_keeps_the_session() {
    let f = held_ring_fixture("console-nosign").await;
    let console = f.app.state.sso.settings().console_client_id.clone();
    let issued = f
        .app
        .state
        .refresh
        .issue(
            NewFamily {
                client_id: console,
                subject: "corp:alice".to_owned(),
                scope: "console".to_owned(),
                audience: Vec::new(),
                auth_time: f.now(),
                session: json!({ "roles": ["viewer"], "provider": "corp" }),
            },
            f.now(),
        )
        .await
        .unwrap();
    let rt = issued.token.expose_secret().to_owned();
    let me = |rt: &str| {
        send(
            f.http
                .get(f.app.url("/auth/me"))
                .header(COOKIE, format!("__Host-portcullis-rt={rt}")),
        )
    };

    let held = stop_signing(&f);
    let a = me(&rt).await;
    assert_keys_unavailable(&a);
    assert!(a.headers.get(SET_COOKIE).is_none());
    assert_eq!(f.generation(&rt).await, Some(0), "the cookie was used up");

    f.clock.advance(GRACE + time::Duration::seconds(1));
    resume_signing(&f, held);
    let a = me(&rt).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["subject"], "corp:alice");
    let renewed = a
        .headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("__Host-portcullis-rt="))
        .and_then(|v| v.split(';').next())
        .unwrap()
        .to_owned();
    assert_eq!(f.generation(&renewed).await, Some(1));
}

/// A ring written by a rotation job whose `keys.overlap` is shorter than this instance's
/// (20 minutes; the instance runs with 30 days): a token is capped where its key stops
/// verifying, not where this instance's overlap says, so it verifies for its whole life.
#[tokio::test]
async fn an_access_token_never_outlives_the_key_that_signed_it() {
    let f = Fixture::with("key-end", &Redis::shared().url(), |c| {
        c.keys.reload_interval = Duration::from_secs(3600);
        c.tokens.access_token_lifetime = Duration::from_secs(3600);
    })
    .await;
    let svc = f.client("svc-keyend", &[CC], "read", &[], None).await;
    let leeway = i64::try_from(f.app.state.config.tokens.leeway.as_secs()).unwrap();
    let keys = f.app.state.keys.keys();
    let own_version = keys.ring_version();

    // this instance's own ring: the configured lifetime, whole
    let a = f.token(&svc, &[("grant_type", "client_credentials")]).await;
    granted(&a);
    assert_eq!(a.body["expires_in"], 3600);

    let writer = keyrotation::Policy {
        rotation_period: Duration::from_secs(600),
        prepublish_lead: Duration::from_secs(300),
        overlap: Duration::from_secs(1200),
        ..keyrotation::Policy::default()
    };
    let ring = keyrotation::plan(&KeyRing::empty(), &writer, f.now())
        .unwrap()
        .ring;
    let key = ring.keys[0].clone();
    keys.publish(ring, own_version.map(|v| v + 1), f.now())
        .unwrap();
    let a = f.token(&svc, &[("grant_type", "client_credentials")]).await;
    granted(&a);
    let token = a.body["access_token"].as_str().unwrap().to_owned();
    let claims: Value = f.app.state.keys.verify::<Value>(&token).unwrap();
    let exp = claims["exp"].as_i64().unwrap();
    assert_eq!(exp, key.expire_at.unix_timestamp() - leeway - 1, "{claims}");
    assert_eq!(a.body["expires_in"], exp - f.now().unix_timestamp());
    assert!(exp - f.now().unix_timestamp() < 3600);
    // it verifies until the last instant its claims allow (`exp` plus the leeway), its
    // key still published then
    let last = OffsetDateTime::from_unix_timestamp(exp + leeway).unwrap();
    f.clock.set(last);
    f.app.state.keys.verify::<Value>(&token).unwrap();
    f.clock.set(last + time::Duration::milliseconds(1));
    assert!(f.app.state.keys.verify::<Value>(&token).is_err());
}

/// `keys.accepted_algorithms` narrowed to the new `keys.algorithm` while the ring still
/// signs with the old one: the instance issues no token its own verification would refuse
/// (503, and `/readyz` says why), and once a key of the new algorithm signs, it serves
/// again, degraded while the old key's tokens, refused here, could still be presented.
#[tokio::test]
async fn a_key_of_an_algorithm_no_longer_accepted_signs_nothing_and_readiness_names_it() {
    let f = Fixture::with("alg-narrowed", &Redis::shared().url(), |c| {
        c.keys.reload_interval = Duration::from_secs(3600);
        c.keys.algorithm = "EdDSA".to_owned();
        c.keys.accepted_algorithms = vec!["EdDSA".to_owned()];
    })
    .await;
    let svc = f.client("svc-algs", &[CC], "read", &[], None).await;
    let session = f.service("svc-algs-rt").await;
    let rt = f.login(&session, "alice", "read").await;
    let keys = f.app.state.keys.keys();
    let readyz = || async {
        let r = reqwest::get(format!("http://{}/readyz", f.app.admin))
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    let (status, body) = readyz().await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &json!("ready")),
        "{body}"
    );

    // the ring as the previous configuration wrote it: an ES256 key signs
    let old = keyrotation::plan(&KeyRing::empty(), &keyrotation::Policy::default(), f.now())
        .unwrap()
        .ring;
    let es256 = old.keys[0].kid.clone();
    keys.publish(old.clone(), Some(100), f.now()).unwrap();
    assert_keys_unavailable(&f.token(&svc, &[("grant_type", "client_credentials")]).await);
    // a refresh is refused before it rotates: the refresh token stays good
    assert_keys_unavailable(&f.refresh(&session, &rt, &[]).await);
    assert_eq!(
        f.generation(&rt).await,
        Some(0),
        "the refresh token was used up"
    );
    assert_eq!(
        f.app.scrape_gauge("portcullis_keys_can_sign", 0.0).await,
        0.0
    );
    let (status, body) = readyz().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let detail = body["checks"]["keys"]["detail"].as_str().unwrap();
    assert!(detail.contains("keys.accepted_algorithms"), "{detail}");
    assert_eq!(
        f.app
            .scrape_gauge("portcullis_keys_published_unaccepted", 1.0)
            .await,
        1.0
    );

    // rotated to an EdDSA key: tokens again, the ES256 key named while it verifies
    let new = keyrotation::Policy {
        algorithm: keyrotation::KeyAlgorithm::EdDSA,
        ..keyrotation::Policy::default()
    };
    let rotated = keyrotation::rotate_now(&old, &new, f.now()).unwrap().ring;
    f.clock.advance(time::Duration::minutes(2));
    keys.publish(rotated, Some(101), f.now()).unwrap();
    let a = f.token(&svc, &[("grant_type", "client_credentials")]).await;
    granted(&a);
    let token = a.body["access_token"].as_str().unwrap();
    assert_eq!(jose_header(token)["alg"], "EdDSA");
    f.clock.advance(GRACE + time::Duration::seconds(1));
    f.rotate(&session, &rt).await;
    let (status, body) = readyz().await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &json!("degraded")),
        "{body}"
    );
    let detail = body["checks"]["keys"]["detail"].as_str().unwrap();
    assert!(detail.contains(es256.as_str()), "{detail}");
    assert_eq!(
        f.app
            .scrape_gauge("portcullis_keys_published_unaccepted", 1.0)
            .await,
        1.0
    );
}

/// A key of the ring whose stored material cannot be parsed (here the waiting one): the
/// instance serves the rest of the ring, issues tokens, and names the key in `/readyz`
/// (degraded) and `GET /admin/keys`.
#[tokio::test]
async fn a_key_whose_material_cannot_be_read_is_named_and_the_rest_is_served() {
    let f = held_ring_fixture("damaged-key").await;
    let svc = f.client("svc-damaged", &[CC], "read", &[], None).await;
    let keys = f.app.state.keys.keys();
    let ring = keyrotation::rotate_now(&keys.ring(), &keyrotation::Policy::default(), f.now())
        .unwrap()
        .ring;
    let active = keys.status(f.now()).active_kid.unwrap();
    let waiting = ring.keys.iter().position(|k| k.kid != active).unwrap();
    let mut value = serde_json::to_value(&ring).unwrap();
    value["keys"][waiting]["private_key"] = json!(STANDARD.encode(b"no key"));
    let damaged: KeyRing = serde_json::from_value(value).unwrap();
    let kid = damaged.keys[waiting].kid.clone();
    keys.publish(damaged, Some(1000), f.now()).unwrap();

    let a = f.token(&svc, &[("grant_type", "client_credentials")]).await;
    granted(&a);
    assert_eq!(
        jose_header(a.body["access_token"].as_str().unwrap())["kid"],
        active.as_str()
    );
    let r = reqwest::get(format!("http://{}/readyz", f.app.admin))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "degraded", "{body}");
    let detail = body["checks"]["keys"]["detail"].as_str().unwrap();
    assert!(detail.contains(kid.as_str()), "{detail}");
    assert_eq!(
        f.app.scrape_gauge("portcullis_keys_unusable", 1.0).await,
        1.0
    );
    assert_eq!(
        f.app
            .scrape_gauge("portcullis_keys_ring_version", 1000.0)
            .await,
        1000.0
    );
    let status: Value = reqwest::get(format!("http://{}/admin/keys", f.app.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = status["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap();
    assert_eq!(
        (&listed["usable"], &listed["published"]),
        (&json!(false), &json!(false))
    );
}

// === cutting off a client's access tokens ===

/// `POST /admin/clients/{id}/revoke-tokens`: every access token issued to the client until
/// then (the whole second included) is refused where Portcullis verifies it (bearer routes,
/// introspection), the client keeps getting tokens from the next second on, and the
/// cutoff is in the database for every other instance until no token it refuses can be
/// valid.
#[tokio::test]
async fn revoking_a_clients_tokens_refuses_those_issued_so_far() {
    let f = Fixture::new("cutoff").await;
    let svc = f
        .client("svc-cut", &[CC], "config:read:prod", &[], None)
        .await;
    let rs = f.service("svc-cut-rs").await;
    let cc = [("grant_type", "client_credentials")];
    let token = || async {
        let a = f.token(&svc, &cc).await;
        granted(&a);
        a.body["access_token"].as_str().unwrap().to_owned()
    };
    let read = |token: String| {
        let request = f
            .http
            .get(f.app.url("/config/v1/prod/executor-orders"))
            .bearer_auth(token);
        async move { send(request).await.status }
    };
    let admin = |path: &str, body: Value| {
        let url = format!("http://{}/admin/clients{path}", f.app.admin);
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };

    let old = token().await;
    let iat = f.now().unix_timestamp();
    assert_ne!(read(old.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(f.introspect(&rs, &old).await["active"], true);

    // refused: an unknown client, a body with fields; nothing is cut off
    let (status, body) = admin("/nobody/revoke-tokens", json!({})).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::NOT_FOUND, &json!("not_found"))
    );
    let (status, body) = admin("/svc-cut/revoke-tokens", json!({ "at": 1 })).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_request"))
    );
    assert_ne!(read(old.clone()).await, StatusCode::UNAUTHORIZED);

    let (status, body) = admin("/svc-cut/revoke-tokens", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let first = OffsetDateTime::from_unix_timestamp(iat + 1).unwrap();
    assert_eq!(
        body,
        json!({ "id": "svc-cut", "tokens_issued_before": first.format(&time::format_description::well_known::Rfc3339).unwrap() })
    );
    assert_eq!(read(old.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(f.introspect(&rs, &old).await, json!({ "active": false }));
    // a token obtained in the second of the cut is refused too; from the next one, not
    let same_second = token().await;
    assert_eq!(read(same_second).await, StatusCode::UNAUTHORIZED);
    f.clock.advance(time::Duration::seconds(1));
    let fresh = token().await;
    assert_ne!(read(fresh.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(f.introspect(&rs, &fresh).await["active"], true);
    // other clients' tokens are untouched
    let a = f.token(&rs, &cc).await;
    granted(&a);
    assert_eq!(
        f.introspect(&svc, a.body["access_token"].as_str().unwrap())
            .await["active"],
        true
    );

    // what another instance reads from the database, and forgets once it cannot matter
    let elsewhere = portcullis::cutoff::Cutoffs::new();
    elsewhere.reload(&f.app.state.db, f.now()).await.unwrap();
    assert!(elsewhere.refuses("svc-cut", iat));
    assert!(!elsewhere.refuses("svc-cut", iat + 1));
    let longest = f.app.state.config.max_token_lifetime() + f.app.state.config.tokens.leeway;
    elsewhere
        .reload(
            &f.app.state.db,
            f.now() + longest + time::Duration::seconds(2),
        )
        .await
        .unwrap();
    assert!(elsewhere.is_empty());
}

// === discovery ===

#[tokio::test]
async fn discovery_documents_list_exactly_what_is_supported() {
    let f = Fixture::with("discovery", &Redis::shared().url(), |c| {
        c.server.public_url = "https://auth.example.test/".to_owned();
    })
    .await;
    let issuer = "https://auth.example.test";
    let expected = json!({
        "issuer": issuer,
        "token_endpoint": format!("{issuer}/oauth2/token"),
        "jwks_uri": format!("{issuer}/oauth2/jwks"),
        "introspection_endpoint": format!("{issuer}/oauth2/introspect"),
        "revocation_endpoint": format!("{issuer}/oauth2/revoke"),
        "grant_types_supported": ["client_credentials", "refresh_token"],
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "access_token_signing_alg_values_supported": ["ES256", "EdDSA", "RS256"],
    });
    let a = send(
        f.http
            .get(f.app.url("/.well-known/oauth-authorization-server")),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, expected);
    assert_eq!(header(&a, &CACHE_CONTROL), Some("public, max-age=3600"));
    // the OpenID document adds what OpenID Connect Discovery requires of a provider's
    // metadata beyond RFC 8414 (strict parsers refuse it without), and nothing else
    let mut openid = expected.clone();
    openid["subject_types_supported"] = json!(["public"]);
    openid["id_token_signing_alg_values_supported"] = json!(["ES256", "EdDSA", "RS256"]);
    let a = send(f.http.get(f.app.url("/.well-known/openid-configuration"))).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, openid);
    assert_eq!(header(&a, &CACHE_CONTROL), Some("public, max-age=3600"));
    // and the tokens say the same
    assert_eq!(f.iss_of_a_token("svc-disco").await, issuer);
}

/// An issuer configured with a trailing `/` (one relying parties already pin) is given
/// as it is, and its endpoints are advertised where they answer: no `//` in their paths.
#[tokio::test]
async fn an_issuer_ending_in_a_slash_advertises_endpoints_that_answer() {
    let issuer = "https://auth.example.test/";
    let f = Fixture::with("discovery-slash", &Redis::shared().url(), |c| {
        c.tokens.issuer = Some(issuer.to_owned());
    })
    .await;
    for doc in [
        "/.well-known/oauth-authorization-server",
        "/.well-known/openid-configuration",
    ] {
        let a = send(f.http.get(f.app.url(doc))).await;
        assert_eq!(a.status, StatusCode::OK, "{doc}");
        assert_eq!(a.body["issuer"], issuer, "{doc}");
        for member in [
            "token_endpoint",
            "jwks_uri",
            "introspection_endpoint",
            "revocation_endpoint",
        ] {
            let advertised: url::Url = a.body[member].as_str().unwrap().parse().unwrap();
            assert!(
                advertised
                    .as_str()
                    .starts_with("https://auth.example.test/oauth2/"),
                "{doc} {member}: {advertised}"
            );
            // the same path on this instance is the endpoint (GET: JWKS answers, the
            // others are POST-only and say so rather than 404)
            let status = send(f.http.get(f.app.url(advertised.path()))).await.status;
            let expected = if member == "jwks_uri" {
                StatusCode::OK
            } else {
                StatusCode::METHOD_NOT_ALLOWED
            };
            assert_eq!(status, expected, "{doc} {member}: {advertised}");
        }
    }
    assert_eq!(f.iss_of_a_token("svc-slash").await, issuer);
}

// === an independent verifier ===

/// A CA and a `localhost` certificate it issued, in files, the two told apart by name.
/// The shared test PKI (`support::Pki`) gives CA and leaf the same default name and the
/// leaf no authority key id: rustls accepts that, but OpenSSL — and so Python — takes the
/// leaf for a self-signed certificate ("self-signed certificate", error 18).
struct OpenSslPki {
    dir: tempfile::TempDir,
    ca_pem: String,
}

impl OpenSslPki {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Portcullis token-test CA");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &ca).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Self {
            dir,
            ca_pem: ca.pem(),
        }
    }

    fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Serves this certificate instead of the shared PKI's.
    fn install(&self, c: &mut Config) {
        let tls = c.tls.as_mut().unwrap();
        tls.cert = self.dir.path().join("cert.pem");
        tls.key = self.dir.path().join("key.pem");
    }

    /// An HTTPS client for `app` that trusts this CA only.
    fn client(&self, app: &TestApp) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
            .tls_built_in_root_certs(false)
            .resolve("localhost", app.https)
            .build()
            .unwrap()
    }
}

/// Runs `gateway/tests/pyjwt/verify.py` on `token`; returns (success, stdout, stderr).
async fn pyjwt(
    f: &Fixture,
    ca: &std::path::Path,
    token: &str,
    audience: &str,
    issuer: &str,
) -> (bool, String, String) {
    // the checkout under test, as cargo tells the running test; the compile-time path in
    // `harness::workspace_root()` can name another checkout when several share one target
    // directory (seen: a CI clone's harness build reused here)
    let gateway = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let root = gateway
        .parent()
        .map_or_else(harness::workspace_root, std::path::Path::to_path_buf);
    let python = root.join(".tools/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-prereqs.sh",
        python.display()
    );
    let script = gateway.join("tests/pyjwt/verify.py");
    let mut child = tokio::process::Command::new(python)
        .arg(script)
        .arg(f.app.url("/oauth2/jwks"))
        .arg(ca)
        .arg(audience)
        .arg(issuer)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(token.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("verify.py did not finish")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn pyjwt_verifies_our_tokens_through_jwks_and_rejects_a_forged_signature() {
    let pki = OpenSslPki::new();
    let mut f = Fixture::with("pyjwt", &Redis::shared().url(), |c| pki.install(c)).await;
    f.http = pki.client(&f.app);
    let ca = pki.ca_file();
    let audience = "https://api.example.test";
    let svc = f.client("svc-py", &[CC], "read", &[audience], None).await;
    let a = f.token(&svc, &[("grant_type", "client_credentials")]).await;
    granted(&a);
    let token = a.body["access_token"].as_str().unwrap().to_owned();
    let discovery = send(
        f.http
            .get(f.app.url("/.well-known/oauth-authorization-server")),
    )
    .await;
    let issuer = discovery.body["issuer"].as_str().unwrap().to_owned();

    let (ok, out, err) = pyjwt(&f, &ca, &token, audience, &issuer).await;
    assert!(ok, "PyJWT refused our token:\n{out}\n{err}");
    assert_eq!(out.trim(), "svc-py");

    // one bit of the signature flipped
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
    bytes[10] ^= 0x01;
    let forged = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&bytes));
    let (ok, out, err) = pyjwt(&f, &ca, &forged, audience, &issuer).await;
    assert!(!ok, "PyJWT accepted a forged signature: {out}");
    assert!(out.contains("InvalidSignatureError"), "{out}\n{err}");

    // and it does check the audience and the issuer
    let (ok, out, _) = pyjwt(&f, &ca, &token, "https://other.example.test", &issuer).await;
    assert!(!ok && out.contains("InvalidAudienceError"), "{out}");
    let (ok, out, _) = pyjwt(&f, &ca, &token, audience, "https://other.example.test").await;
    assert!(!ok && out.contains("InvalidIssuerError"), "{out}");
}
