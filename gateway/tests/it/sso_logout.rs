//! Provider logouts against logins still in flight, with the real oidc-provider: a logout
//! the provider announces while a login of the same provider session is between the
//! provider's redirect (code in hand) and its session being stored must still end that
//! login. Run on Redis and on the in-process (`--dev`) stores alike; the store's marks
//! (the logouts remembered) also on a Redis Cluster.

use std::sync::Arc;
use std::time::Duration;

use portcullis::config::{Config, RedisConfig};
use portcullis::redis_store::RedisHandle;
use portcullis::sso::pending::{MemoryPendingStore, PendingStore, RedisPendingStore};
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::json;

use super::sso::{REFRESH_COOKIE, SsoFixture, error_code, live, session_of};
use super::support::*;

const ALICE: &str = "alice-correct-horse";
const BOB: &str = "bob-battery-staple";

/// Where an instance keeps pending logins, provider sessions, logouts and sessions.
#[derive(Clone, Copy, Debug)]
pub enum Store {
    /// In process, as with `--dev`.
    Memory,
    /// The shared Redis, under a key prefix of the test's own.
    Redis,
}

/// Configures `store` for an instance.
pub fn on(store: Store) -> impl FnOnce(&mut Config) {
    move |c| {
        if let Store::Redis = store {
            let prefix = format!("test-{}:", uuid::Uuid::new_v4());
            let url = harness::Redis::shared().url();
            c.redis = Some(toml::from_str(&format!("url = \"{url}\"\n")).unwrap());
            c.sso.key_prefix = format!("{prefix}sso:");
            c.refresh.key_prefix = format!("{prefix}rt:");
        }
    }
}

/// The refresh-token family of the live session of `refresh`.
pub async fn family_of(f: &SsoFixture, refresh: &SecretString) -> String {
    let session = session_of(f, refresh).await.expect("a live session");
    session.family.to_string()
}

/// The provider session (`sid`) the login of `refresh` recorded.
pub async fn sid_of(f: &SsoFixture, refresh: &SecretString) -> String {
    let session = session_of(f, refresh).await.expect("a live session");
    session.session["idp_sid"].as_str().unwrap().to_owned()
}

/// The detail of the newest `login.refused` of `subject`, once stored.
async fn last_refusal(f: &SsoFixture, subject: &str) -> serde_json::Value {
    wait_for_audit_actor(
        &f.app.state,
        Duration::from_secs(10),
        "login.refused",
        &format!("user:{subject}"),
    )
    .await;
    let (_, _, detail) = portcullis::audit::recent(&f.app.state.db, "login.refused", 1)
        .await
        .unwrap()
        .remove(0);
    serde_json::from_str(&detail).unwrap()
}

/// Asserts that `response` (a callback) is the refusal of a login whose provider session
/// the provider ended, that `subject` has no session left, and that the browser's
/// `/auth/me` answers 401 once its access cookie has expired. Advances the clock.
pub async fn assert_ended_by_the_provider(
    f: &SsoFixture,
    response: reqwest::Response,
    subject: &str,
) {
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "a login of a provider session that had ended made a session"
    );
    assert_eq!(error_code(response).await, "provider_session_ended");
    f.assert_no_session_of(subject).await;
    f.clock.advance(time::Duration::minutes(10));
    assert_eq!(f.me().await.status(), StatusCode::UNAUTHORIZED);
}

/// The provider ends a provider session (a logout token naming its `sid`) while a login of
/// that session has its code but has not yet come back to the callback: the callback then
/// makes no usable session, and is told why.
async fn a_login_finishing_after_its_provider_session_ended_makes_no_session(store: Store) {
    let f = SsoFixture::start(on(store)).await;
    assert_eq!(f.login("alice", ALICE).await.status(), StatusCode::FOUND);
    let first = SecretString::from(f.cookie(REFRESH_COOKIE).unwrap());
    let sid = sid_of(&f, &first).await;
    // a second login of this browser: its provider session is still there, so the
    // provider sends the browser back with a code at once, in the same session
    let callback = f.login_at_idp("?redirect=/jobs", "alice", ALICE).await;

    let token = f.logout_token(json!({ "sub": "alice", "sid": sid })).await;
    assert_eq!(f.post_logout_token(&token).await.status(), StatusCode::OK);
    assert!(!live(&f, &first).await, "the stored session ended");

    let finished = f.browser.get(callback).send().await.unwrap();
    assert_ended_by_the_provider(&f, finished, "test:alice").await;
    let refused = last_refusal(&f, "test:alice").await;
    assert_eq!(refused["reason"], "provider_session_ended");
    assert_eq!(
        refused["sid"],
        sid.as_str(),
        "the login was of that session"
    );
}

#[tokio::test]
async fn a_login_finishing_after_its_provider_session_ended_makes_no_session_in_redis() {
    a_login_finishing_after_its_provider_session_ended_makes_no_session(Store::Redis).await;
}

#[tokio::test]
async fn a_login_finishing_after_its_provider_session_ended_makes_no_session_in_memory() {
    a_login_finishing_after_its_provider_session_ended_makes_no_session(Store::Memory).await;
}

/// A logout token naming only the subject ends the logins whose ID token the provider
/// issued before it (by the provider's clock: the ID token's `iat` against the logout
/// token's), those still finishing included; a login the provider issued after it is a
/// new session and stays.
async fn a_logout_by_subject_ends_the_logins_it_postdates(store: Store) {
    let f = SsoFixture::start(on(store)).await;
    assert_eq!(f.login("bob", BOB).await.status(), StatusCode::FOUND);
    let first = SecretString::from(f.cookie(REFRESH_COOKIE).unwrap());
    let now = || time::OffsetDateTime::now_utc().unix_timestamp();

    // issued 30 s ago: the ID tokens of every login after it are newer
    let earlier = f
        .logout_token(json!({ "sub": "bob", "iat": now() - 30 }))
        .await;
    assert_eq!(f.post_logout_token(&earlier).await.status(), StatusCode::OK);
    assert!(!live(&f, &first).await, "the stored session ended");
    let (_, later) = f.login_elsewhere("", "bob", BOB).await;
    assert!(live(&f, &later).await, "a login after the logout was ended");

    // a login with its code in hand, and a logout the provider issues after that code
    // (20 s ahead, within `sso.leeway`: its ID token, issued when the code is exchanged
    // below, is older by the provider's clock)
    let callback = f.login_at_idp("?redirect=/jobs", "bob", BOB).await;
    let logout = f
        .logout_token(json!({ "sub": "bob", "iat": now() + 20 }))
        .await;
    assert_eq!(f.post_logout_token(&logout).await.status(), StatusCode::OK);
    assert!(!live(&f, &later).await, "the stored session ended");

    let finished = f.browser.get(callback).send().await.unwrap();
    assert_ended_by_the_provider(&f, finished, "test:bob").await;
}

#[tokio::test]
async fn a_logout_by_subject_ends_the_logins_it_postdates_in_redis() {
    a_logout_by_subject_ends_the_logins_it_postdates(Store::Redis).await;
}

#[tokio::test]
async fn a_logout_by_subject_ends_the_logins_it_postdates_in_memory() {
    a_logout_by_subject_ends_the_logins_it_postdates(Store::Memory).await;
}

// === a logout that fails part-way ===

/// Makes the Redis store fail the logouts of `provider` naming provider session `sid`
/// where they begin, by remembering that the session ended: the key of that mark (as
/// `RedisPendingStore` names it) is made a set, so the script that sets the mark answers
/// WRONGTYPE, as a store that fails mid-way answers an error. The other provider names'
/// keys, and everything else, are untouched. Undone by [`mend_the_logout_mark`].
pub async fn break_the_logout_mark(f: &SsoFixture, provider: &str, sid: &str) {
    let _: i64 = ::redis::cmd("SADD")
        .arg(logout_mark_key(f, provider, sid))
        .arg("not a mark")
        .query_async(&mut redis_connection().await)
        .await
        .unwrap();
}

/// Undoes [`break_the_logout_mark`].
pub async fn mend_the_logout_mark(f: &SsoFixture, provider: &str, sid: &str) {
    let _: i64 = ::redis::cmd("DEL")
        .arg(logout_mark_key(f, provider, sid))
        .query_async(&mut redis_connection().await)
        .await
        .unwrap();
}

fn logout_mark_key(f: &SsoFixture, provider: &str, sid: &str) -> String {
    use sha2::Digest as _;
    let name = format!("ended-session\n{provider}\n{sid}");
    format!(
        "{}ended:{}",
        f.app.state.config.sso.key_prefix,
        hex::encode(sha2::Sha256::digest(name.as_bytes()))
    )
}

/// The Redis key of the index of the console sessions provider session `sid` of
/// `provider` made (as `RedisPendingStore` names it).
fn session_index_key(f: &SsoFixture, provider: &str, sid: &str) -> String {
    use sha2::Digest as _;
    let name = format!("provider-session\n{provider}\n{sid}");
    format!(
        "{}index:{}",
        f.app.state.config.sso.key_prefix,
        hex::encode(sha2::Sha256::digest(name.as_bytes()))
    )
}

/// Makes the part of `provider` in a logout of provider session `sid` slow: `count`
/// sessions that do not exist are added to its index, and the logout asks the store to
/// end each of them, one round trip apiece.
pub async fn slow_the_part_of(f: &SsoFixture, provider: &str, sid: &str, count: usize) {
    use base64::Engine as _;
    let mut add = ::redis::cmd("SADD");
    add.arg(session_index_key(f, provider, sid));
    for _ in 0..count {
        // the form of a family id (16 random bytes, base64url), of no family
        add.arg(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(uuid::Uuid::new_v4().as_bytes()),
        );
    }
    let mut redis = redis_connection().await;
    let added: usize = add.query_async(&mut redis).await.unwrap();
    assert_eq!(added, count);
    let _: bool = ::redis::cmd("EXPIRE")
        .arg(session_index_key(f, provider, sid))
        .arg(300)
        .query_async(&mut redis)
        .await
        .unwrap();
}

/// Makes the index of the console sessions provider session `sid` of `provider` made
/// unreadable: a string where a set was, so the store answers WRONGTYPE where a logout
/// reads it. Lives 5 minutes.
pub async fn break_the_session_index(f: &SsoFixture, provider: &str, sid: &str) {
    break_index(
        &mut redis_connection().await,
        &session_index_key(f, provider, sid),
    )
    .await;
}

async fn break_index(redis: &mut ::redis::aio::MultiplexedConnection, index: &str) {
    let _: () = ::redis::cmd("SET")
        .arg(index)
        .arg("not an index")
        .arg("EX")
        .arg(300)
        .query_async(redis)
        .await
        .unwrap();
}

/// Once the logout of provider session `sid` has been remembered for `after` (its part has
/// begun), [`break_the_session_index`] of `broken`: the index read by `broken`'s part
/// before that stays read; a later read fails. The task ends once it is broken.
pub fn break_the_session_index_once_marked(
    f: &SsoFixture,
    broken: &str,
    after: &str,
    sid: &str,
) -> tokio::task::JoinHandle<()> {
    let mark = logout_mark_key(f, after, sid);
    let index = session_index_key(f, broken, sid);
    tokio::spawn(async move {
        let mut redis = redis_connection().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        // a round trip per look, no sleep: the part being watched is a few thousand
        // round trips long
        loop {
            let marked: bool = ::redis::cmd("EXISTS")
                .arg(&mark)
                .query_async(&mut redis)
                .await
                .unwrap();
            if marked {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the logout was not remembered for {mark} within 30 s"
            );
        }
        break_index(&mut redis, &index).await;
    })
}

async fn redis_connection() -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(harness::Redis::shared().url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// One provider configured under two names (`test`, then `twin`), on Redis.
pub async fn twin_fixture(customize: impl FnOnce(&mut Config)) -> SsoFixture {
    SsoFixture::start(move |c| {
        on(Store::Redis)(c);
        let mut twin = c.sso.providers[0].clone();
        twin.name = "twin".to_owned();
        c.sso.providers.push(twin);
        customize(c);
    })
    .await
}

/// Logs `user` in through provider name `test` of a [`twin_fixture`] with its browser;
/// returns the session's refresh token, family and provider session.
pub async fn log_in_as_test(
    f: &SsoFixture,
    user: &str,
    password: &str,
) -> (SecretString, String, String) {
    let callback = f
        .login_at_idp("?provider=test&redirect=/jobs", user, password)
        .await;
    assert_eq!(
        f.browser.get(callback).send().await.unwrap().status(),
        StatusCode::FOUND
    );
    let refresh = SecretString::from(f.cookie(REFRESH_COOKIE).unwrap());
    let family = family_of(f, &refresh).await;
    let sid = sid_of(f, &refresh).await;
    (refresh, family, sid)
}

/// The stored records of `action`, newest first: actor, target and detail.
pub async fn audited(f: &SsoFixture, action: &str) -> Vec<(String, String, serde_json::Value)> {
    portcullis::audit::recent(&f.app.state.db, action, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(actor, target, detail)| (actor, target, serde_json::from_str(&detail).unwrap()))
        .collect()
}

/// The records of `action` once both parts of a twin provider's logout (`provider:test`
/// and `provider:twin`) are stored: one per part begun, newest first.
pub async fn audited_parts(
    f: &SsoFixture,
    action: &str,
) -> Vec<(String, String, serde_json::Value)> {
    for actor in ["provider:test", "provider:twin"] {
        wait_for_audit_actor(&f.app.state, Duration::from_secs(10), action, actor).await;
    }
    let records = audited(f, action).await;
    assert_eq!(records.len(), 2, "a record per part begun: {records:?}");
    records
}

/// The stored record of `action` by `actor` among `records`.
pub fn record_of<'a>(
    records: &'a [(String, String, serde_json::Value)],
    actor: &str,
) -> &'a (String, String, serde_json::Value) {
    records
        .iter()
        .find(|(a, _, _)| a == actor)
        .unwrap_or_else(|| panic!("no record by {actor}: {records:?}"))
}

/// A back-channel logout whose token names a provider configured under two names, and
/// whose second name's part fails at its start (the store answers an error for it):
/// 503, the token not marked used; the first name's part, done, ended its session; each
/// part is audited, the failed one too though it ended nothing, every record saying the
/// logout was partial and why. Sent again once the store answers, the logout ends the
/// rest and is audited in full.
#[tokio::test]
async fn a_back_channel_logout_failing_part_way_is_audited_part_by_part() {
    let f = twin_fixture(|_| {}).await;
    let (refresh, family, sid) = log_in_as_test(&f, "bob", BOB).await;
    break_the_logout_mark(&f, "twin", &sid).await;

    let token = f.logout_token(json!({ "sid": sid })).await;
    let failed = f.post_logout_token(&token).await;
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(failed).await, "temporarily_unavailable");
    assert!(!live(&f, &refresh).await, "the part done ended the session");
    let records = audited_parts(&f, "logout.backchannel").await;
    let (_, target, detail) = record_of(&records, "provider:test");
    assert_eq!(target, &format!("test session {sid}"));
    assert_eq!(detail["families_revoked"], json!([family]));
    // the part that failed before it ended anything: tried, nothing done, and why
    let (_, twin_target, twin) = record_of(&records, "provider:twin");
    assert_eq!(twin_target, &format!("twin session {sid}"));
    assert_eq!(twin["families_revoked"], json!([]), "{twin}");
    for detail in [detail, twin] {
        assert_eq!(detail["sid"], sid.as_str());
        assert!(detail["jti"].is_string(), "{detail}");
        assert_eq!(detail["jti"], records[0].2["jti"], "one logout token");
        assert_eq!(detail["partial"]["failed_at"], "twin", "{detail}");
        // remembering the logout, where `twin`'s part began
        assert_eq!(detail["partial"]["step"], "remember", "{detail}");
        assert_eq!(
            detail["partial"]["reason"], "login-state store is unavailable; try again shortly",
            "the answer's reason, not the store's error: {detail}"
        );
    }

    // the provider sends it again once the store answers: the rest is done
    mend_the_logout_mark(&f, "twin", &sid).await;
    assert_eq!(f.post_logout_token(&token).await.status(), StatusCode::OK);
    eventually(
        Duration::from_secs(10),
        "the retry's two records are stored",
        || async { audited(&f, "logout.backchannel").await.len() == 4 },
    )
    .await;
    let records = audited(&f, "logout.backchannel").await;
    for (actor, _, detail) in &records[..2] {
        assert!(detail.get("partial").is_none(), "{actor}: {detail}");
        assert_eq!(
            detail["families_revoked"],
            json!([]),
            "{actor}: ended before"
        );
    }
}

/// A back-channel logout whose second provider name's part fails while it ends the
/// sessions (the index of the provider session's sessions cannot be read), after the
/// logout was remembered for it: each part's record names that step.
#[tokio::test]
async fn a_back_channel_logout_failing_while_ending_sessions_names_that_step() {
    let f = twin_fixture(|_| {}).await;
    let (refresh, family, sid) = log_in_as_test(&f, "bob", BOB).await;
    break_the_session_index(&f, "twin", &sid).await;

    let token = f.logout_token(json!({ "sid": sid })).await;
    let failed = f.post_logout_token(&token).await;
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!live(&f, &refresh).await, "the part done ended the session");
    let records = audited_parts(&f, "logout.backchannel").await;
    let (_, _, test) = record_of(&records, "provider:test");
    assert_eq!(test["families_revoked"], json!([family]));
    let (_, _, twin) = record_of(&records, "provider:twin");
    assert_eq!(twin["families_revoked"], json!([]));
    for detail in [test, twin] {
        assert_eq!(detail["partial"]["failed_at"], "twin", "{detail}");
        assert_eq!(detail["partial"]["step"], "end_sessions", "{detail}");
    }
}

// === the store's marks: in process as in Redis, standalone and Cluster ===

/// A mark (a remembered logout) keeps the largest value it was given, apart from other
/// marks, claims and indexes, and lives as long as its longest set asked.
async fn a_mark_keeps_its_largest_value_until_it_expires(store: Arc<dyn PendingStore>) {
    let long = Duration::from_secs(60);
    assert_eq!(store.mark_of("m-1").await.unwrap(), None);
    store.mark("m-1", 1_000, long).await.unwrap();
    store.mark("m-1", 10, long).await.unwrap();
    assert_eq!(
        store.mark_of("m-1").await.unwrap(),
        Some(1_000),
        "a smaller value does not move it back"
    );
    store.mark("m-1", 2_000, long).await.unwrap();
    assert_eq!(store.mark_of("m-1").await.unwrap(), Some(2_000));
    assert_eq!(store.mark_of("m-2").await.unwrap(), None, "marks are apart");
    assert!(store.claim("m-1", long).await.unwrap(), "claims are apart");
    assert!(store.index_members("m-1").await.unwrap().is_empty());

    // sixteen at once: the largest stays
    let racers: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.mark("m-3", 1_800_000_000 + i, long).await })
        })
        .collect();
    for r in racers {
        r.await.unwrap().unwrap();
    }
    assert_eq!(store.mark_of("m-3").await.unwrap(), Some(1_800_000_015));

    // the TTL is a real-time key TTL (Redis PX): real time passes, far more than the short
    // TTL, far less than a test timeout. A shorter set does not cut a longer life.
    store
        .mark("m-1", 3_000, Duration::from_millis(20))
        .await
        .unwrap();
    store
        .mark("short", 7, Duration::from_millis(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.mark_of("m-1").await.unwrap(), Some(3_000));
    assert_eq!(store.mark_of("short").await.unwrap(), None, "expired");
    store.mark("short", 5, long).await.unwrap();
    assert_eq!(
        store.mark_of("short").await.unwrap(),
        Some(5),
        "an expired mark is gone, larger value and all"
    );
}

fn prefix() -> String {
    format!("test-{}:sso:", uuid::Uuid::new_v4())
}

#[tokio::test]
async fn a_mark_keeps_its_largest_value_until_it_expires_in_memory() {
    a_mark_keeps_its_largest_value_until_it_expires(Arc::new(MemoryPendingStore::new())).await;
}

#[tokio::test]
async fn a_mark_keeps_its_largest_value_until_it_expires_in_redis() {
    let url = harness::Redis::shared().url();
    let config: RedisConfig = toml::from_str(&format!("url = \"{url}\"\n")).unwrap();
    let store = RedisPendingStore::new(RedisHandle::new(&config).unwrap(), prefix());
    a_mark_keeps_its_largest_value_until_it_expires(Arc::new(store)).await;
}

/// On a Redis Cluster the marks' keys spread over the slots of every master, and each
/// command touches one key: nothing is refused as crossing slots.
#[tokio::test]
async fn a_mark_keeps_its_largest_value_until_it_expires_on_a_redis_cluster() {
    let cluster = harness::RedisCluster::start(3).unwrap();
    let config = RedisConfig {
        url: SecretString::from(cluster.urls().join(",")),
        cluster: true,
        command_timeout: Duration::from_secs(2),
    };
    let store = RedisPendingStore::new(RedisHandle::new(&config).unwrap(), prefix());
    a_mark_keeps_its_largest_value_until_it_expires(Arc::new(store)).await;
}
