//! Signing keys across instances, against a real OpenBao: monthly rotation with an
//! injectable clock, emergency rotation, and a Vault outage.

use std::sync::Arc;
use std::time::Duration;

use harness::{OpenBao, Postgres};
use keyrotation::{Clock, KeyError, KeyState, ManualClock, TransitionReason};
use portcullis::app::Application;
use portcullis::clients::{GrantType, NewClient, ScopeSet};
use portcullis::config::{Config, KeySourceKind};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::support::*;

const HOUR: time::Duration = time::Duration::hours(1);
/// A token lifetime that outlives the propagation delay of a rotation brought forward on
/// these instances (two hourly reload intervals).
const LONG: time::Duration = time::Duration::hours(6);

/// An in-process instance whose ring lives in `bao` at `ring_path`.
struct Instance {
    app: Application,
    pki_client: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

async fn instance(
    bao: &OpenBao,
    token: &str,
    ring_path: &str,
    database: &str,
    clock: Arc<ManualClock>,
    customize: impl FnOnce(&mut Config),
) -> Instance {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &pki.leaf());
    config.database.url = SecretString::from(database.to_owned());
    config.keys.source = KeySourceKind::Vault;
    config.keys.reload_interval = Duration::from_secs(3600);
    config.vault = Some(
        toml::from_str(&format!(
            "addr = \"{}\"\ntoken = \"{token}\"\nring_path = \"{ring_path}\"\n",
            bao.addr()
        ))
        .unwrap(),
    );
    config.server.public_url = "https://portcullis.test".to_owned();
    customize(&mut config);
    config.validate().unwrap();
    let app = Application::build_with_clock(config, clock).await.unwrap();
    Instance {
        app,
        pki_client: pki.client_config(),
        _dir: dir,
    }
}

impl Instance {
    fn sign(&self, now: OffsetDateTime, lifetime: time::Duration) -> Result<String, KeyError> {
        let keys = &self.app.state().keys;
        keys.sign(&json!({
            "iss": "https://portcullis.test",
            "aud": "https://portcullis.test",
            "sub": "executor-orders",
            "iat": now.unix_timestamp(),
            "nbf": now.unix_timestamp(),
            "exp": (now + lifetime).unix_timestamp(),
        }))
    }

    fn verify(&self, token: &str) -> Result<Value, KeyError> {
        self.app.state().keys.verify(token)
    }

    /// An access token for the config API (`config:read:prod`), signed by this instance,
    /// for [`LONG`].
    fn sign_access(&self, now: OffsetDateTime) -> String {
        self.sign_access_for(now, LONG)
    }

    /// [`Self::sign_access`] for `lifetime`.
    fn sign_access_for(&self, now: OffsetDateTime, lifetime: time::Duration) -> String {
        self.app
            .state()
            .keys
            .sign(&json!({
                "iss": "https://portcullis.test",
                "aud": "https://portcullis.test",
                "sub": "executor-orders",
                "client_id": "executor-orders",
                "scope": "config:read:prod",
                "jti": uuid::Uuid::new_v4().to_string(),
                "iat": now.unix_timestamp(),
                "nbf": now.unix_timestamp(),
                "exp": (now + lifetime).unix_timestamp(),
            }))
            .unwrap()
    }

    /// The status of a config API read with `token` over HTTPS: what any bearer route
    /// answers after verifying the token.
    async fn read_config_with(&self, token: &str) -> u16 {
        self.read_config_answer(token).await.0.status.as_u16()
    }

    /// Asserts that a config API read with `token` got past the token check: the route
    /// then answers 404 `not_found`, since no release is published on these instances (a
    /// refusal is 401, an unverifiable token 503; anything else is not an acceptance).
    async fn assert_accepted(&self, token: &str, what: &str) {
        let (head, body) = self.read_config_answer(token).await;
        assert_eq!(
            (head.status.as_u16(), &body["error"]),
            (404, &json!("not_found")),
            "{what}: {head:?} {body}"
        );
    }

    /// [`Self::read_config_with`], with the answer's head and JSON body (`Null` if none).
    async fn read_config_answer(&self, token: &str) -> (http::response::Parts, Value) {
        let mut conn =
            Conn::over(tls_connect(self.app.https_addr(), self.pki_client.clone()).await).await;
        let request = http::Request::get("/config/v1/prod/executor-orders")
            .header("host", "localhost")
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Full::default())
            .unwrap();
        let (parts, body) = conn.request(request).await.unwrap();
        (parts, serde_json::from_slice(&body).unwrap_or_default())
    }

    /// `POST /oauth2/introspect` of `token` over HTTPS, as a client registered here.
    async fn introspect(&self, token: &str) -> Value {
        wait_until_ready(self.app.state()).await;
        let basic = self.introspecting_client().await;
        let (status, answer) = self.introspect_as(&basic, token).await;
        assert_eq!(status, 200, "{answer}");
        answer
    }

    /// Registers a resource server allowed to introspect; its `Basic` credentials.
    async fn introspecting_client(&self) -> String {
        use base64::Engine;
        let (client, secret) = self
            .app
            .state()
            .clients
            .create(
                NewClient {
                    id: None,
                    name: "resource server".to_owned(),
                    grant_types: [GrantType::ClientCredentials].into_iter().collect(),
                    scopes: ScopeSet::parse("read").unwrap(),
                    audiences: Vec::new(),
                    access_token_lifetime: None,
                },
                self.app.state().keys.now(),
            )
            .await
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            client.id.as_str(),
            secret.expose_secret()
        ))
    }

    /// `POST /oauth2/introspect` of `token` over HTTPS with `Basic` credentials `basic`:
    /// the status and the JSON body.
    async fn introspect_as(&self, basic: &str, token: &str) -> (u16, Value) {
        let mut conn =
            Conn::over(tls_connect(self.app.https_addr(), self.pki_client.clone()).await).await;
        let request = http::Request::post("/oauth2/introspect")
            .header("host", "localhost")
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(http_body_util::Full::from(format!("token={token}")))
            .unwrap();
        let (parts, body) = conn.request(request).await.unwrap();
        (
            parts.status.as_u16(),
            serde_json::from_slice(&body).unwrap(),
        )
    }

    async fn rotate(&self, body: Value) -> Value {
        let resp = reqwest::Client::new()
            .post(format!(
                "http://{}/admin/keys/rotate",
                self.app.admin_addr()
            ))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    async fn jwks_kids(&self) -> Vec<String> {
        let mut conn =
            Conn::over(tls_connect(self.app.https_addr(), self.pki_client.clone()).await).await;
        let (parts, body) = conn.get("/oauth2/jwks").await.unwrap();
        assert_eq!(parts.status, 200);
        let cache = parts.headers["cache-control"].to_str().unwrap();
        assert!(cache.starts_with("public, max-age="), "{cache}");
        let jwks: Value = serde_json::from_slice(&body).unwrap();
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

/// A token in the form of ours whose `kid` no ring holds (and whose signature is junk).
fn forged_kid_token() -> String {
    use base64::Engine;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.c2ln",
        b64(json!({ "alg": "ES256", "typ": "at+jwt", "kid": "no-such-key" })),
        b64(json!({ "aud": "https://portcullis.test" }))
    )
}

fn start_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
    ))
}

#[tokio::test]
async fn three_instances_rotate_once_per_period_and_never_break_a_token() {
    let bao = OpenBao::shared();
    let db = Postgres::shared().fresh_database("keys3").unwrap();
    let clock = start_clock();
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(
            instance(
                bao,
                &bao.root_token(),
                "portcullis/three",
                &db,
                clock.clone(),
                |_| {},
            )
            .await,
        );
    }
    let start = clock.now();
    // issued tokens: (token, kid, expiry)
    let mut live: Vec<(String, String, OffsetDateTime)> = Vec::new();
    let mut retired_tokens: Vec<(String, String)> = Vec::new();
    let mut scheduled_activations = 0;
    let mut step = 0usize;
    // three simulated months in 6-hour steps, and a few steps on each side of every
    // rotation instant at minute resolution
    while clock.now() < start + time::Duration::days(92) {
        let now = clock.now();
        // every instance reloads "at once": all of them may try to write
        let (a, b, c) = tokio::join!(
            instances[0].app.state().keys.rotator().reload_once(),
            instances[1].app.state().keys.rotator().reload_once(),
            instances[2].app.state().keys.rotator().reload_once(),
        );
        for outcome in [a.unwrap(), b.unwrap(), c.unwrap()] {
            scheduled_activations += outcome
                .transitions
                .iter()
                .filter(|t| {
                    t.to == Some(KeyState::Active) && t.reason == TransitionReason::Scheduled
                })
                .count();
        }
        // exactly one key signs, the same on every instance
        let actives: Vec<_> = instances
            .iter()
            .map(|i| {
                i.app
                    .state()
                    .keys
                    .status()
                    .active_kid
                    .map(|k| k.to_string())
            })
            .collect();
        assert!(actives[0].is_some(), "no active key at {now}");
        assert!(
            actives.iter().all(|a| a == &actives[0]),
            "instances disagree at {now}: {actives:?}"
        );

        // a token from any instance verifies on every instance until it expires
        let issuer = &instances[step % 3];
        let token = issuer.sign(now, HOUR).unwrap();
        live.push((token.clone(), kid_of(&token), now + HOUR));
        live.retain(|(_, _, exp)| *exp > now);
        for (t, _, _) in &live {
            for (n, i) in instances.iter().enumerate() {
                i.verify(t)
                    .unwrap_or_else(|e| panic!("instance {n} refused a live token at {now}: {e}"));
            }
        }
        // a long-lived token kept to see its key's retirement
        if step == 1 {
            let t = issuer.sign(now, time::Duration::days(200)).unwrap();
            retired_tokens.push((t.clone(), kid_of(&t)));
        }
        // JWKS on every instance holds the key of every unexpired token
        if step.is_multiple_of(8) {
            for i in &instances {
                let kids = i.jwks_kids().await;
                for (_, kid, _) in &live {
                    assert!(kids.contains(kid), "JWKS at {now} lacks live kid {kid}");
                }
            }
        }
        // near a rotation instant, go minute by minute
        let next = instances[0]
            .app
            .state()
            .keys
            .status()
            .next_rotation_at
            .unwrap();
        let to_next = next - now;
        let dt = if to_next > time::Duration::ZERO && to_next <= time::Duration::hours(6) {
            to_next
                .min(time::Duration::minutes(20))
                .max(time::Duration::minutes(1))
        } else {
            time::Duration::hours(6)
        };
        clock.advance(dt);
        step += 1;
    }
    assert_eq!(
        scheduled_activations, 3,
        "expected exactly one scheduled rotation per 30-day period in 92 days"
    );
    // the first key's overlap ended (day 30 + 30): gone from JWKS, its tokens refused
    let (old_token, old_kid) = &retired_tokens[0];
    for i in &instances {
        assert!(!i.jwks_kids().await.contains(old_kid));
        assert!(matches!(i.verify(old_token), Err(KeyError::UnknownKid)));
    }
    // every transition this run wrote is in the shared audit trail once
    let db_handle = instances[0].app.state().db.clone();
    eventually(Duration::from_secs(10), "transitions audited", || {
        let db = db_handle.clone();
        async move {
            portcullis::audit::recent(&db, "key.transition", 1000)
                .await
                .map(|rows| {
                    rows.iter()
                        .filter(|(_, _, d)| {
                            d.contains("\"to\":\"active\"") && d.contains("scheduled")
                        })
                        .count()
                        == 3
                })
                .unwrap_or(false)
        }
    })
    .await;
}

#[tokio::test]
async fn emergency_rotation_stops_the_compromised_key_everywhere_within_the_reload_interval() {
    let bao = OpenBao::shared();
    let db = Postgres::shared().fresh_database("keysemg").unwrap();
    let clock = start_clock();
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(
            instance(
                bao,
                &bao.root_token(),
                "portcullis/emergency",
                &db,
                clock.clone(),
                |c| {
                    c.keys.reload_interval = Duration::from_millis(200);
                },
            )
            .await,
        );
    }
    for i in &instances {
        i.app.state().keys.rotator().reload_once().await.unwrap();
    }
    let now = clock.now();
    let compromised = instances[0].sign(now, HOUR).unwrap();
    for i in &instances {
        i.verify(&compromised).unwrap();
    }

    // the operator declares the key compromised on instance 2's admin API
    let admin = instances[2].app.admin_addr();
    let resp = reqwest::Client::new()
        .post(format!("http://{admin}/admin/keys/rotate"))
        .json(&json!({ "emergency": true, "reason": "key exposed in a crash dump" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());

    // every instance refuses the compromised key's tokens within its reload interval: by
    // the second reload that starts after the rotation (2 x 200 ms), with a margin for a
    // slow machine, all counted from the rotation's answer
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    for (n, i) in instances.iter().enumerate() {
        eventually(
            deadline.saturating_duration_since(tokio::time::Instant::now()),
            &format!("instance {n} refuses the token within 1.5 s of the rotation"),
            || async { i.verify(&compromised).is_err() },
        )
        .await;
    }
    for i in &instances {
        assert!(!i.jwks_kids().await.contains(&kid_of(&compromised)));
    }
    // and new tokens verify everywhere
    let fresh = instances[1].sign(clock.now(), HOUR).unwrap();
    assert_ne!(kid_of(&fresh), kid_of(&compromised));
    for i in &instances {
        i.verify(&fresh).unwrap();
    }
    let db_handle = instances[0].app.state().db.clone();
    eventually(Duration::from_secs(10), "emergency audited", || {
        let db = db_handle.clone();
        async move {
            portcullis::audit::recent(&db, "key.rotate.emergency", 10)
                .await
                .map(|rows| rows.iter().any(|(_, _, d)| d.contains("crash dump")))
                .unwrap_or(false)
        }
    })
    .await;
}

/// A Vault outage is survivable by design: the instance stays ready (200, `degraded`,
/// the keys check naming the source) while a key held can sign, so that load balancers
/// keep every instance; it is not ready (503) only once no key can sign.
#[tokio::test]
async fn vault_outage_degrades_readiness_keeps_verifying_and_recovers() {
    let bao = OpenBao::start_persistent().unwrap();
    let db = Postgres::shared().fresh_database("keysout").unwrap();
    let clock = start_clock();
    let inst = instance(
        &bao,
        &bao.root_token(),
        "portcullis/outage",
        &db,
        clock.clone(),
        |c| {
            c.keys.reload_interval = Duration::from_millis(200);
        },
    )
    .await;
    let admin = inst.app.admin_addr();
    let ready = || async move {
        let r = reqwest::get(format!("http://{admin}/readyz"))
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    eventually(Duration::from_secs(15), "ready", || async {
        ready().await.0 == 200
    })
    .await;
    let status = inst.app.state().keys.status();
    let first_retire = status.next_rotation_at.unwrap();

    bao.stop();
    eventually(
        Duration::from_secs(10),
        "degraded while Vault is down",
        || async { ready().await.1["status"] == "degraded" },
    )
    .await;
    // still ready: a key held signs
    let (code, body) = ready().await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["checks"]["database"], json!({ "ok": true }), "{body}");
    let keys = &body["checks"]["keys"];
    assert_eq!(
        (&keys["ok"], &keys["degraded"]),
        (&json!(false), &json!(true))
    );
    let detail = keys["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("cannot read the key ring from vault:secret/portcullis/outage")
            && detail.contains("serving with the ring held"),
        "{detail}"
    );
    assert!(!detail.contains(&bao.addr()), "{detail}");
    // serving continues with the ring held: a token signed just before the active key's
    // window ends keeps verifying after it
    clock.set(first_retire - time::Duration::minutes(30));
    let token = inst.sign(clock.now(), HOUR).unwrap();
    assert_eq!(ready().await.0, 200);
    clock.set(first_retire + time::Duration::minutes(1));
    inst.verify(&token).unwrap();
    // but nothing signs with the overdue key (no next key could be planned): 503
    let err = inst.sign(clock.now(), HOUR).unwrap_err();
    assert!(matches!(err, KeyError::NoActiveKey), "{err}");
    let api: portcullis::error::ApiError = err.into();
    assert_eq!(
        axum::response::IntoResponse::into_response(api).status(),
        503
    );
    // and now the instance is not ready
    let (code, body) = ready().await;
    assert_eq!((code, &body["ready"]), (503, &json!(false)), "{body}");
    assert_eq!(body["checks"]["keys"]["ok"], false, "{body}");
    assert_eq!(body["checks"]["keys"].get("degraded"), None, "{body}");
    let detail = body["checks"]["keys"]["detail"].as_str().unwrap();
    assert!(detail.starts_with("no signing key is active"), "{detail}");

    bao.restart().unwrap();
    eventually(
        Duration::from_secs(20),
        "ready again after Vault returns",
        || async { ready().await == (200, json!({"ready": true, "status": "ready", "checks": {"database": {"ok": true}, "keys": {"ok": true}}})) },
    )
    .await;
    let fresh = inst.sign(clock.now(), HOUR).unwrap();
    inst.verify(&fresh).unwrap();
    inst.verify(&token).unwrap();
}

#[tokio::test]
async fn an_emergency_retires_every_verifying_key_or_only_the_one_named() {
    let bao = OpenBao::shared();
    let db = Postgres::shared().fresh_database("keyskid").unwrap();
    let clock = start_clock();
    let inst = instance(
        bao,
        &bao.root_token(),
        &format!("portcullis/kid-{}", uuid::Uuid::new_v4().simple()),
        &db,
        clock.clone(),
        |_| {},
    )
    .await;
    inst.app.state().keys.rotator().reload_once().await.unwrap();
    let admin = inst.app.admin_addr();
    let rotate = |body: Value| async move {
        let resp = reqwest::Client::new()
            .post(format!("http://{admin}/admin/keys/rotate"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap())
    };
    // a routine rotation: the next key signs once every instance can know it
    let activate_next = || {
        let status = inst.app.state().keys.status();
        let next = status.keys.iter().find(|k| k.state == KeyState::Next);
        clock.set(next.expect("a next key").activate_at);
    };
    let old = inst.sign(clock.now(), LONG).unwrap();
    // a routine rotation: the old key retires and keeps verifying for the overlap
    let (status, _) = rotate(json!({})).await;
    assert_eq!(status, 200);
    activate_next();
    let current = inst.sign(clock.now(), LONG).unwrap();
    assert_ne!(kid_of(&current), kid_of(&old));
    inst.verify(&old).unwrap();
    let version = inst.app.state().keys.keys().ring_version();

    // refused precisely, nothing written
    for (body, code) in [
        (json!({ "kid": kid_of(&old) }), "invalid_request"),
        (
            json!({ "emergency": true, "reason": "r", "kid": "no-such-key" }),
            "unknown_kid",
        ),
        (
            json!({ "emergency": true, "reason": "r", "kid": "../etc" }),
            "invalid_request",
        ),
    ] {
        let (status, err) = rotate(body.clone()).await;
        assert_eq!((status, err["error"].as_str()), (400, Some(code)), "{body}");
    }
    assert_eq!(inst.app.state().keys.keys().ring_version(), version);

    // the retiring key alone: its tokens are refused, the active key goes on signing
    let (status, body) = rotate(json!({
        "emergency": true, "reason": "old key in a leaked backup", "kid": kid_of(&old),
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(matches!(inst.verify(&old), Err(KeyError::UnknownKid)));
    inst.verify(&current).unwrap();
    assert_eq!(
        kid_of(&inst.sign(clock.now(), LONG).unwrap()),
        kid_of(&current)
    );
    assert!(!inst.jwks_kids().await.contains(&kid_of(&old)));

    // without a kid: every key that still verifies goes, a fresh key signs
    let retiring = inst.sign(clock.now(), LONG).unwrap();
    let (status, _) = rotate(json!({})).await;
    assert_eq!(status, 200);
    activate_next();
    let active = inst.sign(clock.now(), LONG).unwrap();
    assert_ne!(kid_of(&active), kid_of(&retiring));
    inst.verify(&retiring).unwrap();
    let (status, body) =
        rotate(json!({ "emergency": true, "reason": "ring read by a stolen token" })).await;
    assert_eq!(status, 200, "{body}");
    for token in [&retiring, &active] {
        assert!(matches!(inst.verify(token), Err(KeyError::UnknownKid)));
    }
    let fresh = inst.sign(clock.now(), LONG).unwrap();
    assert_eq!(inst.jwks_kids().await, vec![kid_of(&fresh)]);
}

/// Two instances on one ring that reload it only hourly, both loaded.
async fn two_instances(name: &str, clock: &Arc<ManualClock>) -> (Instance, Instance) {
    let bao = OpenBao::shared();
    let db = Postgres::shared().fresh_database(name).unwrap();
    let ring = format!("portcullis/{name}-{}", uuid::Uuid::new_v4().simple());
    let a = instance(bao, &bao.root_token(), &ring, &db, clock.clone(), |_| {}).await;
    let b = instance(bao, &bao.root_token(), &ring, &db, clock.clone(), |_| {}).await;
    for i in [&a, &b] {
        let keys = i.app.state().keys.clone();
        eventually(Duration::from_secs(10), "ring loaded", || async {
            keys.rotator().health().reloads >= 1 && keys.readiness().is_ok()
        })
        .await;
        // and migrated, as before it serves: until then every route that reads the
        // database answers 503
        wait_until_ready(i.app.state()).await;
    }
    // the second instance to load reads what the first wrote
    b.app.state().keys.rotator().reload_once().await.unwrap();
    assert_eq!(
        a.app.state().keys.status().active_kid,
        b.app.state().keys.status().active_kid
    );
    (a, b)
}

/// Introspection verifies as the bearer routes do: a token signed by a key another
/// instance just made (an emergency's fresh key signs at once) makes this instance reload
/// the ring, and the token is active, not `{"active": false}` until the next reload tick.
#[tokio::test]
async fn introspection_reloads_the_ring_for_an_unknown_kid_before_answering() {
    let clock = start_clock();
    let (a, b) = two_instances("keyskid3", &clock).await;
    a.rotate(json!({ "emergency": true, "reason": "key in a crash dump" }))
        .await;
    let fresh = a.sign_access(clock.now());
    let reloads = b.app.state().keys.rotator().health().reloads;

    let answer = b.introspect(&fresh).await;
    assert_eq!(answer["active"], true, "{answer}");
    assert_eq!(answer["sub"], "executor-orders");
    assert_eq!(answer["scope"], "config:read:prod");
    assert_eq!(b.app.state().keys.rotator().health().reloads, reloads + 1);
    // the same rate limit as everywhere: a forged kid right after reloads nothing
    let b64 = |v: Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let forged = format!(
        "{}.{}.c2ln",
        b64(json!({ "alg": "ES256", "typ": "at+jwt", "kid": "no-such-key" })),
        b64(json!({ "aud": "https://portcullis.test" }))
    );
    assert_eq!(b.introspect(&forged).await, json!({ "active": false }));
    assert_eq!(b.app.state().keys.rotator().health().reloads, reloads + 1);
}

/// "Rotate now" with no next key pending generates one: it is published at once, but
/// signs only after a propagation delay covering every instance's reload, and the current
/// key signs until then. So a token minted right after the rotation verifies on an
/// instance that has not reloaded, and one minted after the delay verifies there too.
#[tokio::test]
async fn a_rotation_brought_forward_signs_only_with_keys_every_instance_can_know() {
    let clock = start_clock();
    let (a, b) = two_instances("keysnow", &clock).await;
    let old = a.app.state().keys.status().active_kid.unwrap().to_string();

    a.rotate(json!({})).await;
    let token = a.sign_access(clock.now());
    b.assert_accepted(&token, "minted right after the rotation")
        .await;
    assert_eq!(kid_of(&token), old, "the current key signs until the delay");

    // the new key is in the rotating instance's JWKS at once
    let status = a.app.state().keys.status();
    let new = status
        .keys
        .iter()
        .find(|k| k.state == KeyState::Next)
        .expect("a next key");
    assert!(a.jwks_kids().await.contains(&new.kid.to_string()));
    // two reload intervals (an hour here) and a margin
    let delay = portcullis::keys::propagation_delay(Duration::from_secs(3600));
    assert_eq!(new.activate_at - clock.now(), delay);
    assert_eq!(
        status
            .keys
            .iter()
            .find(|k| k.kid.as_str() == old)
            .unwrap()
            .retire_at,
        new.activate_at
    );

    // after the delay the new key signs, and the other instance accepts its tokens
    clock.set(new.activate_at);
    let later = a.sign_access(clock.now());
    assert_eq!(kid_of(&later), new.kid.to_string());
    b.assert_accepted(&later, "minted after the delay").await;
    b.assert_accepted(&token, "old tokens still verify").await;
}

/// After an emergency rotation the fresh key signs at once. An instance that meets its
/// `kid` before its next reload tick reloads the ring (once; not again for a while, so
/// forged kids cannot make it hammer Vault) and accepts the token.
#[tokio::test]
async fn an_instance_meeting_an_unknown_kid_reloads_the_ring_before_refusing() {
    let clock = start_clock();
    let (a, b) = two_instances("keyskid2", &clock).await;
    let compromised = a.sign_access(clock.now());
    b.assert_accepted(&compromised, "before the emergency")
        .await;

    a.rotate(json!({ "emergency": true, "reason": "key in a crash dump" }))
        .await;
    let fresh = a.sign_access(clock.now());
    assert_ne!(kid_of(&fresh), kid_of(&compromised));
    let reloads = b.app.state().keys.rotator().health().reloads;
    b.assert_accepted(&fresh, "the fresh key's token").await;
    assert_eq!(b.app.state().keys.rotator().health().reloads, reloads + 1);
    // the reload also dropped the compromised key there
    assert_eq!(b.read_config_with(&compromised).await, 401);

    // a token naming a key no ring holds is refused without another reload
    use base64::Engine;
    let b64 = |v: Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    let forged = format!(
        "{}.{}.{}",
        b64(json!({ "alg": "ES256", "typ": "JWT", "kid": "no-such-key" })),
        b64(json!({ "sub": "x" })),
        b64(json!("signature"))
    );
    assert_eq!(b.read_config_with(&forged).await, 401);
    assert_eq!(b.app.state().keys.rotator().health().reloads, reloads + 1);
}

/// A token naming a key this instance does not hold, while the ring cannot be reloaded
/// (Vault is away), may well be valid: a bearer route answers 503
/// `temporarily_unavailable` without a challenge, and introspection 503 rather than
/// `active: false`, so that clients keep their tokens. Both on an instance holding an
/// older ring (an emergency rotation happened elsewhere) and on one that started while
/// Vault was away and holds none. Once the ring reloads the token is accepted, and a
/// `kid` no ring holds is refused (401) again.
#[tokio::test]
async fn an_unknown_kid_while_the_ring_cannot_be_reloaded_is_unavailable_not_invalid() {
    let bao = OpenBao::start_persistent().unwrap();
    let db = Postgres::shared().fresh_database("keysunavail").unwrap();
    let clock = start_clock();
    let ring = "portcullis/unavailable";
    let a = instance(&bao, &bao.root_token(), ring, &db, clock.clone(), |_| {}).await;
    let b = instance(&bao, &bao.root_token(), ring, &db, clock.clone(), |_| {}).await;
    for i in [&a, &b] {
        wait_until_ready(i.app.state()).await;
    }
    b.app.state().keys.rotator().reload_once().await.unwrap();
    let basic = b.introspecting_client().await;
    a.rotate(json!({ "emergency": true, "reason": "key in a crash dump" }))
        .await;
    let fresh = a.sign_access(clock.now());

    bao.stop();
    let unavailable = |(head, body): (http::response::Parts, Value)| {
        assert_eq!(head.status, 503, "{body}");
        assert_eq!(body["error"], "temporarily_unavailable", "{body}");
        assert!(head.headers.get("www-authenticate").is_none(), "{head:?}");
        assert!(head.headers.get("retry-after").is_some(), "{head:?}");
    };
    // b holds the ring from before the emergency; its reload fails
    unavailable(b.read_config_answer(&fresh).await);
    // at once again, within the unknown-kid reload interval (no reload is tried): the
    // last reload failed, so still not a refusal
    let (status, answer) = b.introspect_as(&basic, &fresh).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"], "temporarily_unavailable", "{answer}");

    // an instance started while Vault is away holds no ring at all
    let c = instance(&bao, &bao.root_token(), ring, &db, clock.clone(), |_| {}).await;
    let c_state = c.app.state().clone();
    eventually(
        Duration::from_secs(10),
        "c migrated, its first reload failed",
        || async {
            c_state.db.is_migrated() && c_state.keys.rotator().health().reload_failures >= 1
        },
    )
    .await;
    unavailable(c.read_config_answer(&fresh).await);
    let (status, answer) = c.introspect_as(&basic, &fresh).await;
    assert_eq!(status, 503, "{answer}");

    bao.restart().unwrap();
    b.app.state().keys.rotator().reload_once().await.unwrap();
    b.assert_accepted(&fresh, "once the ring reloads").await;
    let (status, answer) = b.introspect_as(&basic, &fresh).await;
    assert_eq!((status, &answer["active"]), (200, &json!(true)), "{answer}");
    // a kid that no ring holds, with the ring reloaded: refused
    let forged = forged_kid_token();
    let (head, _) = b.read_config_answer(&forged).await;
    assert_eq!(head.status, 401);
    assert_eq!(
        b.introspect_as(&basic, &forged).await,
        (200, json!({ "active": false }))
    );
}

/// An in-process instance whose writes Vault refuses (a policy that only reads) serves
/// the ring as stored: an emergency rotation written elsewhere reaches it although its
/// own plan, due on that ring, cannot be written, so the compromised key's tokens are
/// refused there and the fresh key's accepted. Its reloads fail only at the write, so
/// the ring it holds is current, and a `kid` no ring holds is refused (401), not answered
/// 503 as when the ring cannot be read.
#[tokio::test]
async fn an_instance_whose_ring_writes_are_denied_still_serves_the_stored_ring() {
    let bao = OpenBao::shared();
    let db = Postgres::shared().fresh_database("keysdenied").unwrap();
    let clock = start_clock();
    let ring = format!("portcullis/denied-{}", uuid::Uuid::new_v4().simple());
    let read_only = {
        let name = format!("read-only-{}", uuid::Uuid::new_v4().simple());
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.hcl");
        std::fs::write(
            &policy,
            format!("path \"secret/data/{ring}\" {{\n  capabilities = [\"read\"]\n}}\n"),
        )
        .unwrap();
        bao.bao(&["policy", "write", &name, &policy.display().to_string()])
            .unwrap();
        bao.bao(&[
            "token",
            "create",
            "-field=token",
            &format!("-policy={name}"),
        ])
        .unwrap()
        .trim()
        .to_owned()
    };
    let a = instance(bao, &bao.root_token(), &ring, &db, clock.clone(), |_| {}).await;
    wait_until_ready(a.app.state()).await;
    let b = instance(bao, &read_only, &ring, &db, clock.clone(), |_| {}).await;
    wait_until_ready(b.app.state()).await;
    let compromised = a.sign_access_for(clock.now(), time::Duration::days(60));
    b.assert_accepted(&compromised, "before the emergency")
        .await;

    a.rotate(json!({ "emergency": true, "reason": "key in a crash dump" }))
        .await;
    // later, a plan is due on the stored ring (the next key's pre-publication): b may not
    // write it
    clock.advance(time::Duration::days(24));
    let err = b
        .app
        .state()
        .keys
        .rotator()
        .reload_once()
        .await
        .unwrap_err();
    assert!(matches!(err, KeyError::SourceDenied { .. }), "{err}");
    let health = b.app.state().keys.rotator().health();
    assert_eq!(
        (
            health.consecutive_failures,
            health.consecutive_read_failures
        ),
        (1, 0)
    );
    assert_eq!(
        b.app.state().keys.keys().ring_version(),
        a.app.state().keys.keys().ring_version()
    );

    assert_eq!(b.read_config_with(&compromised).await, 401);
    // ready, and degraded: the write fails, the ring is current
    let readyz: Value = reqwest::get(format!("http://{}/readyz", b.app.admin_addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&readyz["ready"], &readyz["status"]),
        (&json!(true), &json!("degraded"))
    );
    let detail = readyz["checks"]["keys"]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("cannot write the key ring to vault:secret/"),
        "{detail}"
    );
    let fresh = a.sign_access(clock.now());
    b.assert_accepted(&fresh, "the fresh key's token").await;
    assert_eq!(b.read_config_with(&forged_kid_token()).await, 401);
}
