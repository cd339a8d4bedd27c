//! Login protection: per-IP token buckets (with X-Forwarded-For believed only from trusted
//! proxies), and failure counters with lockout shared through Redis by every instance;
//! then the conformance suite the in-process stores must pass like the Redis ones.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use harness::Redis;
use keyrotation::{Clock, ManualClock};
use portcullis::config::{Config, RedisConfig};
use portcullis::protect::lockout::{
    FAMILIAR_FOR, FAMILIAR_MAX, FailureStore, LockoutSettings, MemoryFailureStore,
    RedisFailureStore,
};
use portcullis::protect::{AccountAttempt, Kind, Lockout, RateSettings, Refusal, Scope, Verdict};
use portcullis::redis_store::RedisHandle;
use portcullis::sso::pending::{MemoryPendingStore, PendingLogin, PendingStore, RedisPendingStore};
use reqwest::{StatusCode, header};
use time::OffsetDateTime;

use super::support::*;

fn redis_config() -> RedisConfig {
    let text = format!("url = \"{}\"\n", Redis::shared().url());
    toml::from_str(&text).unwrap()
}

fn tight_auth_rate(c: &mut Config, burst: u32) {
    c.protection.auth_rate = RateSettings {
        burst,
        replenish_every: Duration::from_secs(3600),
    };
}

async fn get_me(app: &TestApp, forwarded_for: Option<&str>) -> reqwest::Response {
    let mut request = app.https_client().get(app.url("/auth/me"));
    if let Some(xff) = forwarded_for {
        request = request.header("x-forwarded-for", xff);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn rapid_attempts_from_one_ip_are_limited_with_retry_after() {
    let app = spawn_app(|c| tight_auth_rate(c, 3)).await;
    for _ in 0..3 {
        assert_eq!(get_me(&app, None).await.status(), StatusCode::UNAUTHORIZED);
    }
    let limited = get_me(&app, None).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = limited.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let body: serde_json::Value = limited.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    // not asserted here: `portcullis_rate_limited_total{endpoint="auth"}` is process-wide,
    // and the other tests of this binary are limited on the same endpoint at the same
    // time, so neither its presence nor its increase is this test's own
    // the bucket is the login endpoints'; the rest of the site is not affected
    let jwks = app
        .https_client()
        .get(app.url("/oauth2/jwks"))
        .send()
        .await
        .unwrap();
    assert_eq!(jwks.status(), StatusCode::OK);
}

#[tokio::test]
async fn spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let app = spawn_app(|c| tight_auth_rate(c, 2)).await;
    for i in 0..2 {
        let xff = format!("198.51.100.{i}");
        assert_eq!(
            get_me(&app, Some(&xff)).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // a new made-up address each time does not buy a new bucket
    let limited = get_me(&app, Some("198.51.100.99")).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_real_client_is_limited() {
    let app = spawn_app(|c| {
        tight_auth_rate(c, 2);
        c.protection.trusted_proxies = vec!["127.0.0.1".to_owned()];
    })
    .await;
    let client_a = "203.0.113.10";
    for _ in 0..2 {
        assert_eq!(
            get_me(&app, Some(client_a)).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // a spoofed entry on the left does not hide client A: the chain is read from the right
    let spoofed = format!("192.0.2.1, {client_a}");
    assert_eq!(
        get_me(&app, Some(&spoofed)).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // another client behind the same proxy has its own bucket
    assert_eq!(
        get_me(&app, Some("203.0.113.20")).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn an_ipv6_client_cannot_buy_new_buckets_with_new_addresses_from_its_64() {
    let app = spawn_app(|c| {
        tight_auth_rate(c, 2);
        c.protection.trusted_proxies = vec!["127.0.0.1".to_owned()];
    })
    .await;
    for host in ["2001:db8:7:1::10", "2001:db8:7:1::11"] {
        assert_eq!(
            get_me(&app, Some(host)).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // any other address of the same /64 is the same client
    let limited = get_me(&app, Some("2001:db8:7:1:dead:beef:0:1")).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    // the neighbouring /64 is another subscriber with its own bucket
    assert_eq!(
        get_me(&app, Some("2001:db8:7:2::10")).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn the_token_endpoint_has_its_own_bucket() {
    let app = spawn_app(|c| {
        c.protection.token_rate = RateSettings {
            burst: 2,
            replenish_every: Duration::from_secs(3600),
        };
    })
    .await;
    for _ in 0..2 {
        let r = token_request(&app, "some-client", "some-secret").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let limited = token_request(&app, "some-client", "some-secret").await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.headers().contains_key(header::RETRY_AFTER));
    let body: serde_json::Value = limited.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    // introspection and revocation authenticate clients too: limited per IP as well, a
    // client id made up per request (each a database read) being no way around it; but
    // in buckets of their own, of the same size, so a resource server's introspection
    // does not spend the token requests of the executors behind its address
    let call = |path: &'static str, n: usize| {
        app.https_client()
            .post(app.url(path))
            .basic_auth(format!("made-up-{n}"), Some("some-secret"))
            .form(&[("token", "x")])
            .send()
    };
    let first = call("/oauth2/introspect", 1).await.unwrap();
    assert_eq!(
        first.status(),
        StatusCode::UNAUTHORIZED,
        "the token bucket is not theirs"
    );
    let second = call("/oauth2/revoke", 2).await.unwrap();
    assert_eq!(second.status(), StatusCode::UNAUTHORIZED);
    for (path, n) in [("/oauth2/introspect", 3), ("/oauth2/revoke", 4)] {
        let limited = call(path, n).await.unwrap();
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS, "{path}");
        assert!(limited.headers().contains_key(header::RETRY_AFTER));
        let body: serde_json::Value = limited.json().await.unwrap();
        assert_eq!(body["error"], "rate_limited");
    }
    // the login endpoints are another bucket
    assert_eq!(get_me(&app, None).await.status(), StatusCode::UNAUTHORIZED);
}

fn lockout_settings(prefix: &str) -> LockoutSettings {
    LockoutSettings {
        free_failures: 1,
        max_failures: 3,
        account_max_failures: 100,
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(1),
        lockout: Duration::from_secs(600),
        key_prefix: prefix.to_owned(),
    }
}

/// Counters in the shared Redis under a prefix of this test's own, so tests never see each
/// other's counts.
fn shared_lockout(prefix: &str) -> impl Fn(&mut Config) + '_ {
    move |c: &mut Config| {
        c.redis = Some(redis_config());
        c.refresh.key_prefix = format!("{prefix}rt:");
        c.protection.lockout = lockout_settings(prefix);
    }
}

async fn token_request(app: &TestApp, client_id: &str, secret: &str) -> reqwest::Response {
    app.https_client()
        .post(app.url("/oauth2/token"))
        .basic_auth(client_id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_client_locked_on_one_instance_is_locked_on_another_until_the_lockout_ends() {
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let prefix = format!("test-{}:lock:", uuid::Uuid::new_v4());
    let first = spawn_app_with_clock(clock.clone(), shared_lockout(&prefix)).await;
    let second = spawn_app_with_clock(clock.clone(), shared_lockout(&prefix)).await;

    // the backoff after the free failure is 1 ms of the manual clock
    for _ in 0..3 {
        let r = token_request(&first, "ghost-client", "wrong").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        clock.advance(time::Duration::milliseconds(5));
    }
    let locked = token_request(&second, "ghost-client", "wrong").await;
    assert_eq!(locked.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = locked.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 500 && retry <= 600, "{retry}");
    let body: serde_json::Value = locked.json().await.unwrap();
    assert_eq!(body["error"], "too_many_attempts");

    // still locked a moment before the end, free at the end
    clock.advance(time::Duration::seconds(590));
    assert_eq!(
        token_request(&first, "ghost-client", "wrong")
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    clock.advance(time::Duration::seconds(10));
    assert_eq!(
        token_request(&second, "ghost-client", "wrong")
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
}

/// Client ids are not secret (every token a service shows carries its `client_id`), so
/// whoever knows one can run its counter up to the lockout. That must not cost the service
/// its tokens: while wrong secrets for its id are refused with 429, its real secret is
/// served at once and leaves the counter as it was.
#[tokio::test]
async fn a_locked_client_id_is_still_served_with_its_real_secret() {
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let prefix = format!("test-{}:lock:", uuid::Uuid::new_v4());
    let app = spawn_app_with_clock(clock.clone(), shared_lockout(&prefix)).await;
    let (id, secret) = register_client(
        &app.state,
        "executor-orders",
        &[portcullis::clients::GrantType::ClientCredentials],
        "jobs:run",
    )
    .await;

    let served = || {
        let request = token_request(&app, &id, &secret);
        async move {
            let served = request.await;
            assert_eq!(served.status(), StatusCode::OK);
            let body: serde_json::Value = served.json().await.unwrap();
            assert_eq!(body["token_type"], "Bearer", "{body}");
        }
    };
    let wrong = |what: &'static str| {
        let request = token_request(&app, &id, "not-the-secret");
        let clock = clock.clone();
        async move {
            let status = request.await.status();
            // past the 1 ms backoff each failure sets
            clock.advance(time::Duration::milliseconds(5));
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        }
    };
    // (lockout_settings: one free failure, locked at the third.) A failure, then the real
    // secret twice, then a failure: the successes were not counted (or the id would be
    // locked by now) nor did they wipe the count (the next failure locks it)
    wrong("the free failure").await;
    for _ in 0..2 {
        served().await;
    }
    wrong("the second failure: the successes were not failures").await;
    wrong("the third failure").await;
    let refused = token_request(&app, &id, "not-the-secret").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "too_many_attempts");

    for _ in 0..2 {
        served().await;
    }
    // the real secret neither unlocked the id for guessers nor counted against it
    let still = token_request(&app, &id, "not-the-secret").await;
    assert_eq!(still.status(), StatusCode::TOO_MANY_REQUESTS);
    let lockout = Lockout::new(
        Arc::new(RedisFailureStore::new(redis_handle())),
        lockout_settings(&prefix),
    );
    let verdict = lockout.check(Kind::Client, &id, clock.now()).await.unwrap();
    assert!(
        matches!(verdict, Verdict::Refused(r) if r.locked),
        "{verdict:?}"
    );
}

// === conformance: in-process stores behave like the Redis ones ===

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Redis,
}

fn redis_handle() -> RedisHandle {
    RedisHandle::new(&redis_config()).unwrap()
}

/// The policy the conformance tests hold both stores to: backoff from the third failure
/// (1 s, doubling to 4 s), a lock at `max_failures` per identifier (and at
/// `account_max_failures` for an account) for 5 minutes, under a prefix of the test's own.
fn conformance_lockout(backend: Backend, max_failures: u32, account_max_failures: u32) -> Lockout {
    let settings = LockoutSettings {
        free_failures: 2,
        max_failures,
        account_max_failures,
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(4),
        lockout: Duration::from_secs(300),
        key_prefix: format!("test-{}:lock:", uuid::Uuid::new_v4()),
    };
    Lockout::new(failure_store(backend), settings)
}

fn failure_store(backend: Backend) -> Arc<dyn FailureStore> {
    match backend {
        Backend::Memory => Arc::new(MemoryFailureStore::new()),
        Backend::Redis => Arc::new(RedisFailureStore::new(redis_handle())),
    }
}

fn pending_store(backend: Backend) -> Arc<dyn PendingStore> {
    let prefix = format!("test-{}:sso:", uuid::Uuid::new_v4());
    match backend {
        Backend::Memory => Arc::new(MemoryPendingStore::new()),
        Backend::Redis => Arc::new(RedisPendingStore::new(redis_handle(), prefix)),
    }
}

async fn lockout_backs_off_locks_and_forgets(backend: Backend) {
    let lockout = conformance_lockout(backend, 5, 100);
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let allowed = |v: Verdict| matches!(v, Verdict::Allowed { .. });

    assert_eq!(
        lockout
            .check(Kind::Account, "mallory", clock.now())
            .await
            .unwrap(),
        Verdict::Allowed {
            had_failures: false
        }
    );
    // two free failures: no wait
    for _ in 0..2 {
        assert!(
            lockout
                .failed(Kind::Account, "mallory", clock.now())
                .await
                .unwrap()
                .is_none()
        );
    }
    // the third waits 1 s, the fourth 2 s
    let r = lockout
        .failed(Kind::Account, "mallory", clock.now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r.retry_after, r.locked), (Duration::from_secs(1), false));
    assert!(!allowed(
        lockout
            .check(Kind::Account, "mallory", clock.now())
            .await
            .unwrap()
    ));
    clock.advance(time::Duration::seconds(1));
    assert!(allowed(
        lockout
            .check(Kind::Account, "mallory", clock.now())
            .await
            .unwrap()
    ));
    let r = lockout
        .failed(Kind::Account, "mallory", clock.now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.retry_after, Duration::from_secs(2));
    clock.advance(time::Duration::seconds(2));
    // the fifth locks for the lockout period
    let r = lockout
        .failed(Kind::Account, "mallory", clock.now())
        .await
        .unwrap()
        .unwrap();
    assert!(r.locked);
    assert_eq!(r.retry_after, Duration::from_secs(300));
    // other identifiers and other kinds are not affected
    assert!(allowed(
        lockout
            .check(Kind::Account, "alice", clock.now())
            .await
            .unwrap()
    ));
    assert!(allowed(
        lockout
            .check(Kind::Client, "mallory", clock.now())
            .await
            .unwrap()
    ));
    clock.advance(time::Duration::seconds(299));
    assert!(!allowed(
        lockout
            .check(Kind::Account, "mallory", clock.now())
            .await
            .unwrap()
    ));
    clock.advance(time::Duration::seconds(1));
    assert!(allowed(
        lockout
            .check(Kind::Account, "mallory", clock.now())
            .await
            .unwrap()
    ));
    // after the lockout a failure counts from one again
    assert!(
        lockout
            .failed(Kind::Account, "mallory", clock.now())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn lockout_backs_off_locks_and_forgets_in_memory() {
    lockout_backs_off_locks_and_forgets(Backend::Memory).await;
}

#[tokio::test]
async fn lockout_backs_off_locks_and_forgets_in_redis() {
    lockout_backs_off_locks_and_forgets(Backend::Redis).await;
}

/// [`Lockout::attempt_account`]: an account's failures are counted per client address
/// bucket (an IPv4 address, an IPv6 /64) under the whole policy, and account-wide up to
/// `account_max_failures` with no backoff, both in one atomic step. An attacker's address
/// locks itself, not the owner's; a success clears the owner's address, not the
/// attacker's, nor the account-wide record; many unfamiliar addresses together lock the
/// account for every address it has not logged in from until the lockout ends;
/// concurrent attempts from many addresses are never counted past the account-wide lock.
async fn account_attempts_are_counted_per_address_and_account_wide(backend: Backend) {
    let lockout = conformance_lockout(backend, 4, 12);
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let attempt = |from: &str| {
        let (lockout, now, from) = (lockout.clone(), clock.now(), ip(from));
        async move {
            lockout
                .attempt_account("breakglass", from, now)
                .await
                .unwrap()
        }
    };
    let wait = |secs, locked| Refusal {
        retry_after: Duration::from_secs(secs),
        locked,
    };
    let counted = |if_failed| AccountAttempt::Counted {
        if_failed,
        familiar: false,
    };
    let counted_familiar = |if_failed| AccountAttempt::Counted {
        if_failed,
        familiar: true,
    };

    // the attacker's address backs off, then locks
    let attacker = "203.0.113.66";
    assert_eq!(attempt(attacker).await, counted(None));
    assert_eq!(attempt(attacker).await, counted(None));
    assert_eq!(
        attempt(attacker).await,
        counted(Some((wait(1, false), Scope::Address)))
    );
    assert_eq!(
        attempt(attacker).await,
        AccountAttempt::Refused(wait(1, false), Scope::Address)
    );
    clock.advance(time::Duration::seconds(1));
    assert_eq!(
        attempt(attacker).await,
        counted(Some((wait(300, true), Scope::Address)))
    );
    assert_eq!(
        attempt(attacker).await,
        AccountAttempt::Refused(wait(300, true), Scope::Address)
    );
    // the owner, from elsewhere, is neither refused nor kept waiting, and its success
    // clears its address and takes its own attempt back off the account-wide record (four
    // failures there so far, the attacker's: a success leaves those)
    let owner = "198.51.100.7";
    assert_eq!(attempt(owner).await, counted(None));
    lockout
        .account_succeeded("breakglass", ip(owner), clock.now())
        .await
        .unwrap();
    let clear = (
        Verdict::Allowed {
            had_failures: false,
        },
        Scope::Address,
    );
    let check = |from: &str| {
        let (lockout, now, from) = (lockout.clone(), clock.now(), ip(from));
        async move {
            lockout
                .check_account("breakglass", from, now)
                .await
                .unwrap()
        }
    };
    assert_eq!(check(owner).await, clear);
    // but not the attacker's
    assert_eq!(
        attempt(attacker).await,
        AccountAttempt::Refused(wait(300, true), Scope::Address)
    );

    // every address of one IPv6 /64 counts as one
    for host in ["2001:db8:7:1::10", "2001:db8:7:1::11"] {
        assert_eq!(attempt(host).await, counted(None));
    }
    assert_eq!(
        attempt("2001:db8:7:1:dead:beef:0:1").await,
        counted(Some((wait(1, false), Scope::Address)))
    );
    assert_eq!(
        attempt("2001:db8:7:1::ffff").await,
        AccountAttempt::Refused(wait(1, false), Scope::Address)
    );
    assert_eq!(attempt("2001:db8:7:2::10").await, counted(None));

    // eight failures account-wide: four more addresses lock the account
    for host in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
        assert_eq!(attempt(host).await, counted(None));
    }
    assert_eq!(
        attempt("192.0.2.4").await,
        counted(Some((wait(300, true), Scope::Account)))
    );
    // for every address the account has not logged in from, until the lockout ends
    for from in ["192.0.2.200", "2001:db8:9::1"] {
        assert_eq!(
            attempt(from).await,
            AccountAttempt::Refused(wait(300, true), Scope::Account)
        );
        assert!(matches!(
            check(from).await,
            (Verdict::Refused(r), Scope::Account) if r.locked
        ));
    }
    // the owner's familiar address is held to its own record only
    assert_eq!(check(owner).await, clear);
    assert_eq!(attempt(owner).await, counted_familiar(None));
    lockout
        .account_succeeded("breakglass", ip(owner), clock.now())
        .await
        .unwrap();
    clock.advance(time::Duration::seconds(300));
    assert_eq!(attempt("192.0.2.200").await, counted(None));
    clock.advance(time::Duration::seconds(300));

    // twenty at once from twenty addresses: twelve counted, the last of them locking the
    // account, eight refused
    let all = futures::future::join_all((1..=20).map(|i| {
        let (lockout, now) = (lockout.clone(), clock.now());
        async move {
            let from = IpAddr::from([10, 0, 0, i]);
            lockout
                .attempt_account("breakglass", from, now)
                .await
                .unwrap()
        }
    }))
    .await;
    let counted_n = all
        .iter()
        .filter(|a| matches!(a, AccountAttempt::Counted { .. }))
        .count();
    assert_eq!(counted_n, 12, "{all:?}");
    assert!(all.contains(&counted(Some((wait(300, true), Scope::Account)))));
    assert!(
        all.iter().all(|a| matches!(
            a,
            AccountAttempt::Counted { .. } | AccountAttempt::Refused(_, Scope::Account)
        )),
        "{all:?}"
    );
}

#[tokio::test]
async fn account_attempts_are_counted_per_address_and_account_wide_in_memory() {
    account_attempts_are_counted_per_address_and_account_wide(Backend::Memory).await;
}

#[tokio::test]
async fn account_attempts_are_counted_per_address_and_account_wide_in_redis() {
    account_attempts_are_counted_per_address_and_account_wide(Backend::Redis).await;
}

/// Smart lockout: an address bucket the account has logged in from ("familiar") is not
/// held back by the account-wide lock, nor counted on it, but keeps its own per-address
/// record. After the owner logged in once from `owner`, an attacker with many addresses
/// reaches the account-wide lock; `owner` is still let through (and could log in), a new
/// address is refused, and the familiar set belongs to one account only. Familiarity
/// ends [`FAMILIAR_FOR`] after the last success, and an account keeps only its
/// [`FAMILIAR_MAX`] most recent buckets.
async fn a_familiar_address_is_not_held_back_by_the_account_wide_lock(backend: Backend) {
    let lockout = conformance_lockout(backend, 4, 8);
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let attempt = |name: &'static str, from: &str| {
        let (lockout, now, from) = (lockout.clone(), clock.now(), ip(from));
        async move { lockout.attempt_account(name, from, now).await.unwrap() }
    };
    let wait = |secs, locked| Refusal {
        retry_after: Duration::from_secs(secs),
        locked,
    };
    let counted = |if_failed| AccountAttempt::Counted {
        if_failed,
        familiar: false,
    };
    let counted_familiar = |if_failed| AccountAttempt::Counted {
        if_failed,
        familiar: true,
    };
    let account_locked = AccountAttempt::Refused(wait(300, true), Scope::Account);
    let familiar = |name: &'static str, from: &str| {
        let (lockout, now, from) = (lockout.clone(), clock.now(), ip(from));
        async move { lockout.is_familiar_address(name, from, now).await.unwrap() }
    };

    // the owner logs in once from `owner` (an IPv6 /64: any address of it is familiar)
    let owner = "2001:db8:a:1::7";
    assert!(!familiar("breakglass", owner).await);
    assert_eq!(attempt("breakglass", owner).await, counted(None));
    lockout
        .account_succeeded("breakglass", ip(owner), clock.now())
        .await
        .unwrap();
    assert!(familiar("breakglass", owner).await);
    assert!(familiar("breakglass", "2001:db8:a:1:ffff::1").await);
    // a typo from there is counted on its address only, not account-wide
    assert_eq!(attempt("breakglass", owner).await, counted_familiar(None));

    // eight attacker addresses, one failure each, at both accounts: the eighth locks each
    // account for every unfamiliar address
    for i in 1..=8u8 {
        let from = format!("192.0.2.{i}");
        let expected = if i < 8 {
            counted(None)
        } else {
            counted(Some((wait(300, true), Scope::Account)))
        };
        assert_eq!(attempt("breakglass", &from).await, expected, "{from}");
        assert_eq!(attempt("standby", &from).await, expected, "{from}");
    }
    // a new address is refused, without counting
    for from in ["192.0.2.100", "2001:db8:a:2::7"] {
        assert_eq!(attempt("breakglass", from).await, account_locked, "{from}");
    }
    // the owner, from the familiar address, is let through (the right password logs in)
    assert_eq!(attempt("breakglass", owner).await, counted_familiar(None));
    lockout
        .account_succeeded("breakglass", ip(owner), clock.now())
        .await
        .unwrap();
    assert_eq!(
        lockout
            .check_account("breakglass", ip(owner), clock.now())
            .await
            .unwrap(),
        (
            Verdict::Allowed {
                had_failures: false
            },
            Scope::Address
        )
    );
    // and the lock is still there for new addresses: the success did not clear it
    assert_eq!(attempt("breakglass", "192.0.2.101").await, account_locked);
    // the familiar set is per account: `owner` is new to `standby`
    assert!(!familiar("standby", owner).await);
    assert_eq!(attempt("standby", owner).await, account_locked);

    // a familiar address keeps its own record: it backs off and locks as any other
    assert_eq!(attempt("breakglass", owner).await, counted_familiar(None));
    assert_eq!(attempt("breakglass", owner).await, counted_familiar(None));
    assert_eq!(
        attempt("breakglass", owner).await,
        counted_familiar(Some((wait(1, false), Scope::Address)))
    );
    assert_eq!(
        attempt("breakglass", owner).await,
        AccountAttempt::Refused(wait(1, false), Scope::Address)
    );
    clock.advance(time::Duration::seconds(1));
    assert_eq!(
        attempt("breakglass", owner).await,
        counted_familiar(Some((wait(300, true), Scope::Address)))
    );
    assert_eq!(
        attempt("breakglass", owner).await,
        AccountAttempt::Refused(wait(300, true), Scope::Address)
    );
    // none of that counted account-wide: the lock still ends 300 s after the eighth
    // attacker address
    assert_eq!(
        attempt("breakglass", "192.0.2.102").await,
        AccountAttempt::Refused(wait(299, true), Scope::Account)
    );

    // familiarity ends FAMILIAR_FOR after the last success
    clock.advance(time::Duration::try_from(FAMILIAR_FOR).unwrap() - time::Duration::seconds(2));
    assert!(familiar("breakglass", owner).await);
    clock.advance(time::Duration::seconds(1));
    assert!(!familiar("breakglass", owner).await);
    for i in 1..=8u8 {
        attempt("breakglass", &format!("198.51.100.{i}")).await;
    }
    assert_eq!(attempt("breakglass", owner).await, account_locked);

    // an account keeps its FAMILIAR_MAX most recent buckets
    let max = u8::try_from(FAMILIAR_MAX).unwrap();
    for i in 0..=max {
        let from = ip(&format!("10.1.0.{i}"));
        lockout
            .account_succeeded("many", from, clock.now())
            .await
            .unwrap();
        clock.advance(time::Duration::milliseconds(1));
    }
    assert!(!familiar("many", "10.1.0.0").await);
    assert!(familiar("many", "10.1.0.1").await);
    assert!(familiar("many", &format!("10.1.0.{max}")).await);
}

#[tokio::test]
async fn a_familiar_address_is_not_held_back_by_the_account_wide_lock_in_memory() {
    a_familiar_address_is_not_held_back_by_the_account_wide_lock(Backend::Memory).await;
}

#[tokio::test]
async fn a_familiar_address_is_not_held_back_by_the_account_wide_lock_in_redis() {
    a_familiar_address_is_not_held_back_by_the_account_wide_lock(Backend::Redis).await;
}

fn pending() -> PendingLogin {
    PendingLogin {
        provider: "test".to_owned(),
        pkce_verifier: "verifier".to_owned(),
        nonce: "nonce".to_owned(),
        redirect: "/jobs".to_owned(),
    }
}

async fn pending_login_is_single_use_and_expires(backend: Backend) {
    let store = pending_store(backend);
    store
        .put("state-1", &pending(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(store.take("state-2").await.unwrap().is_none());
    assert_eq!(store.take("state-1").await.unwrap(), Some(pending()));
    assert!(store.take("state-1").await.unwrap().is_none());

    // the TTL is a real-time key TTL (Redis PX), not a logical instant, so this one test
    // lets real time pass: far more than the TTL, far less than a test timeout
    store
        .put("short", &pending(), Duration::from_millis(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(store.take("short").await.unwrap().is_none());
}

#[tokio::test]
async fn pending_login_is_single_use_and_expires_in_memory() {
    pending_login_is_single_use_and_expires(Backend::Memory).await;
}

#[tokio::test]
async fn pending_login_is_single_use_and_expires_in_redis() {
    pending_login_is_single_use_and_expires(Backend::Redis).await;
}

/// A claim (a logout token's `jti`) is granted once until it expires or is released,
/// also to many claimants at once.
async fn a_claim_is_granted_once_until_released_or_expired(backend: Backend) {
    let store = pending_store(backend);
    let ttl = Duration::from_secs(60);
    let racers: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.claim("jti-1", ttl).await.unwrap() })
        })
        .collect();
    let mut granted = 0;
    for r in racers {
        granted += usize::from(r.await.unwrap());
    }
    assert_eq!(granted, 1, "one of 16 simultaneous claims wins");
    assert!(!store.claim("jti-1", ttl).await.unwrap());
    assert!(
        store.claim("jti-2", ttl).await.unwrap(),
        "other keys are apart"
    );
    // a claim is not a pending login, nor the other way round
    assert!(store.take("jti-2").await.unwrap().is_none());
    store.put("jti-3", &pending(), ttl).await.unwrap();
    assert!(store.claim("jti-3", ttl).await.unwrap());

    store.release("jti-1").await.unwrap();
    assert!(
        store.claim("jti-1", ttl).await.unwrap(),
        "released: granted again"
    );

    store
        .claim("short", Duration::from_millis(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        store.claim("short", ttl).await.unwrap(),
        "expired: granted again"
    );
}

/// An index (a provider session's console sessions) keeps each member once, apart from
/// other indexes and from claims, and lives as long as its longest add asked.
async fn an_index_keeps_its_members_until_it_expires(backend: Backend) {
    let store = pending_store(backend);
    let long = Duration::from_secs(60);
    assert!(store.index_members("sid-1").await.unwrap().is_empty());
    store.index_add("sid-1", "family-a", long).await.unwrap();
    store.index_add("sid-1", "family-b", long).await.unwrap();
    store.index_add("sid-1", "family-a", long).await.unwrap();
    store.index_add("sid-2", "family-c", long).await.unwrap();
    let mut members = store.index_members("sid-1").await.unwrap();
    members.sort_unstable();
    assert_eq!(members, ["family-a", "family-b"]);
    assert_eq!(store.index_members("sid-2").await.unwrap(), ["family-c"]);
    assert!(
        store.claim("sid-1", long).await.unwrap(),
        "claims are apart"
    );

    // a shorter add does not cut the life a longer one gave
    store
        .index_add("sid-2", "family-d", Duration::from_millis(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.index_members("sid-2").await.unwrap().len(), 2);
    store
        .index_add("short", "family-e", Duration::from_millis(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(store.index_members("short").await.unwrap().is_empty());
}

#[tokio::test]
async fn an_index_keeps_its_members_until_it_expires_in_memory() {
    an_index_keeps_its_members_until_it_expires(Backend::Memory).await;
}

#[tokio::test]
async fn an_index_keeps_its_members_until_it_expires_in_redis() {
    an_index_keeps_its_members_until_it_expires(Backend::Redis).await;
}

#[tokio::test]
async fn a_claim_is_granted_once_until_released_or_expired_in_memory() {
    a_claim_is_granted_once_until_released_or_expired(Backend::Memory).await;
}

#[tokio::test]
async fn a_claim_is_granted_once_until_released_or_expired_in_redis() {
    a_claim_is_granted_once_until_released_or_expired(Backend::Redis).await;
}
