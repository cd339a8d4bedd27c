//! The refresh-token store: one conformance suite run against the in-process store, a real
//! Redis and a real three-master Redis Cluster; then what only Redis can show (raw keys,
//! outages).

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use harness::{Redis, RedisCluster};
use keyrotation::{Clock, ManualClock};
use portcullis::refresh::{
    FamilyId, InvalidReason, MemoryRefreshStore, NewFamily, RedisRefreshStore, RefreshError,
    RefreshSettings, RefreshStore,
};
use portcullis::server_key::ServerKey;
use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;
use time::macros::datetime;

const START: OffsetDateTime = datetime!(2030-01-01 0:00 UTC);

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Redis,
    Cluster,
}

/// One test's store, on its own clock and key prefix.
struct Fixture {
    store: Arc<dyn RefreshStore>,
    clock: ManualClock,
}

impl Fixture {
    async fn new(backend: Backend) -> Self {
        Self::with_settings(backend, RefreshSettings::default()).await
    }

    async fn with_settings(backend: Backend, mut settings: RefreshSettings) -> Self {
        settings.key_prefix = format!("test-{}:", uuid::Uuid::new_v4());
        let (key, _) = ServerKey::generate().unwrap();
        let store: Arc<dyn RefreshStore> = match backend {
            Backend::Memory => Arc::new(MemoryRefreshStore::new(key, settings)),
            Backend::Redis => Arc::new(
                RedisRefreshStore::connect(&secret(&Redis::shared().url()), key, settings)
                    .await
                    .unwrap(),
            ),
            Backend::Cluster => {
                let urls: Vec<SecretString> = cluster().urls().iter().map(|u| secret(u)).collect();
                Arc::new(
                    RedisRefreshStore::connect_cluster(&urls, key, settings)
                        .await
                        .unwrap(),
                )
            }
        };
        Self {
            store,
            clock: ManualClock::new(START),
        }
    }

    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    async fn issue(&self, client_id: &str, subject: &str) -> (SecretString, FamilyId) {
        let issued = self
            .store
            .issue(login(client_id, subject), self.now())
            .await
            .unwrap();
        (issued.token, issued.session.family)
    }

    async fn refresh(
        &self,
        token: &SecretString,
        client_id: &str,
    ) -> Result<SecretString, RefreshError> {
        self.store
            .refresh(token, client_id, self.now())
            .await
            .map(|r| r.token)
    }
}

/// One cluster per test binary: starting one takes seconds.
fn cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| RedisCluster::start(3).expect("a 3-master Redis Cluster"))
}

fn secret(text: &str) -> SecretString {
    SecretString::from(text.to_owned())
}

fn login(client_id: &str, subject: &str) -> NewFamily {
    NewFamily {
        client_id: client_id.to_owned(),
        subject: subject.to_owned(),
        scope: "openid console".to_owned(),
        audience: vec!["xxl-job-admin".to_owned()],
        auth_time: START - time::Duration::minutes(1),
        session: serde_json::json!({ "roles": ["ops", "viewer"] }),
    }
}

fn same(a: &SecretString, b: &SecretString) -> bool {
    a.expose_secret() == b.expose_secret()
}

fn assert_invalid(result: Result<SecretString, RefreshError>, reason: InvalidReason) {
    match result {
        Err(RefreshError::Invalid(r)) => assert_eq!(r, reason),
        Err(e) => panic!("expected Invalid({reason}), got {e}"),
        Ok(_) => panic!("expected Invalid({reason}), got a token"),
    }
}

/// Runs every conformance test against every backend.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Memory).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Redis).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Cluster).await
                }
            )*
        }
    };
}

conformance!(
    every_refresh_rotates_the_token,
    reused_refresh_token_revokes_its_family,
    reuse_within_grace_returns_the_same_successor,
    a_token_two_rotations_old_is_reuse_even_within_grace,
    concurrent_refreshes_of_one_token_yield_one_successor,
    families_die_at_their_absolute_expiry,
    families_die_when_idle,
    a_token_of_another_client_is_refused_and_nothing_rotates,
    revoking_a_token_revokes_its_family,
    revoking_a_family_kills_its_live_token,
    signing_out_everywhere_revokes_every_family_of_the_subject,
    disabling_a_client_revokes_its_families,
    sessions_list_the_live_families_of_a_subject,
    a_family_is_found_by_its_id_only_while_it_lives,
    malformed_and_forged_tokens_are_invalid,
);

// === conformance ===

async fn every_refresh_rotates_the_token(backend: Backend) {
    let f = Fixture::new(backend).await;
    let issued = f
        .store
        .issue(login("console", "alice"), f.now())
        .await
        .unwrap();
    assert_eq!(issued.session.generation, 0);
    assert_eq!(issued.session.expires_at, START + time::Duration::days(30));
    assert_eq!(
        issued.session.idle_expires_at,
        START + time::Duration::days(7)
    );
    let t0 = issued.token;
    assert!(t0.expose_secret().starts_with("rt1."));
    assert!(
        !format!(
            "{:?}",
            f.store.issue(login("console", "x"), f.now()).await.unwrap()
        )
        .contains("rt1.")
    );

    f.clock.advance(time::Duration::hours(1));
    let r1 = f.store.refresh(&t0, "console", f.now()).await.unwrap();
    assert!(!r1.replayed);
    assert!(!same(&r1.token, &t0));
    assert_eq!(r1.session.generation, 1);
    assert_eq!(r1.session.subject, "alice");
    assert_eq!(r1.session.scope, "openid console");
    assert_eq!(r1.session.audience, vec!["xxl-job-admin".to_owned()]);
    assert_eq!(
        r1.session.session,
        serde_json::json!({ "roles": ["ops", "viewer"] })
    );
    assert_eq!(r1.session.last_used_at, f.now());
    assert_eq!(
        r1.session.idle_expires_at,
        f.now() + time::Duration::days(7)
    );
    assert!(!format!("{r1:?}").contains(r1.token.expose_secret()));

    f.clock.advance(time::Duration::hours(1));
    let r2 = f
        .store
        .refresh(&r1.token, "console", f.now())
        .await
        .unwrap();
    assert_eq!(r2.session.generation, 2);
    assert_eq!(r2.session.family, r1.session.family);
    assert!(!same(&r2.token, &r1.token) && !same(&r2.token, &t0));

    let active = f.store.inspect(&r2.token, f.now()).await.unwrap().unwrap();
    assert_eq!(active.family, r1.session.family);
    assert_eq!(active.client_id, "console");
    for old in [&t0, &r1.token] {
        assert_eq!(f.store.inspect(old, f.now()).await.unwrap(), None);
    }
}

async fn reused_refresh_token_revokes_its_family(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (t0, family) = f.issue("console", "alice").await;
    let t1 = f.refresh(&t0, "console").await.unwrap();
    f.clock.advance(time::Duration::seconds(11));

    match f.store.refresh(&t0, "console", f.now()).await {
        Err(RefreshError::Reused {
            family: reused,
            subject,
            client_id,
        }) => {
            assert_eq!(reused, family);
            assert_eq!(subject, "alice");
            assert_eq!(client_id, "console");
        }
        other => panic!("expected Reused, got {:?}", other.map(|r| r.session)),
    }
    // the successor the thief may hold is dead too, and so is the session
    assert_invalid(f.refresh(&t1, "console").await, InvalidReason::Unknown);
    assert_eq!(f.store.inspect(&t1, f.now()).await.unwrap(), None);
    assert!(
        f.store
            .list_sessions("alice", f.now())
            .await
            .unwrap()
            .is_empty()
    );
    assert_invalid(f.refresh(&t0, "console").await, InvalidReason::Unknown);
}

async fn reuse_within_grace_returns_the_same_successor(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (t0, _) = f.issue("console", "alice").await;
    let first = f.store.refresh(&t0, "console", f.now()).await.unwrap();
    f.clock.advance(time::Duration::seconds(5));
    let second = f.store.refresh(&t0, "console", f.now()).await.unwrap();
    assert!(second.replayed);
    assert!(same(&first.token, &second.token));
    assert_eq!(second.session.generation, 1);
    f.clock.advance(time::Duration::seconds(5));
    let third = f.store.refresh(&t0, "console", f.now()).await.unwrap();
    assert!(
        same(&first.token, &third.token),
        "the grace window is inclusive"
    );

    // the family is intact: the successor rotates as usual
    let next = f
        .store
        .refresh(&first.token, "console", f.now())
        .await
        .unwrap();
    assert!(!next.replayed);
    assert_eq!(next.session.generation, 2);
}

async fn a_token_two_rotations_old_is_reuse_even_within_grace(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (t0, _) = f.issue("console", "alice").await;
    let t1 = f.refresh(&t0, "console").await.unwrap();
    let t2 = f.refresh(&t1, "console").await.unwrap();
    assert!(matches!(
        f.refresh(&t0, "console").await,
        Err(RefreshError::Reused { .. })
    ));
    assert_invalid(f.refresh(&t2, "console").await, InvalidReason::Unknown);
}

async fn concurrent_refreshes_of_one_token_yield_one_successor(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (t0, family) = f.issue("console", "alice").await;
    let t0 = Arc::new(t0);
    let now = f.now();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (store, t0) = (f.store.clone(), t0.clone());
            tokio::spawn(async move { store.refresh(&t0, "console", now).await })
        })
        .collect();
    let mut successors = HashSet::new();
    let mut rotations = 0;
    for task in tasks {
        let refreshed = task.await.unwrap().unwrap();
        assert_eq!(refreshed.session.family, family);
        assert_eq!(refreshed.session.generation, 1);
        rotations += usize::from(!refreshed.replayed);
        successors.insert(refreshed.token.expose_secret().to_owned());
    }
    assert_eq!(successors.len(), 1, "every answer is the same successor");
    assert_eq!(rotations, 1, "exactly one request rotated");

    // exactly one live token: the successor; the presented one is rotated
    let successor = secret(successors.iter().next().unwrap());
    let live = f.store.inspect(&successor, f.now()).await.unwrap().unwrap();
    assert_eq!(live.generation, 1);
    assert_eq!(f.store.inspect(&t0, f.now()).await.unwrap(), None);
    assert_eq!(
        f.store.list_sessions("alice", f.now()).await.unwrap().len(),
        1
    );
    let next = f
        .store
        .refresh(&successor, "console", f.now())
        .await
        .unwrap();
    assert_eq!(next.session.generation, 2);
}

async fn families_die_at_their_absolute_expiry(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (mut token, _) = f.issue("console", "alice").await;
    // used every 5 days, never idle, until the 30 days are over
    for _ in 0..5 {
        f.clock.advance(time::Duration::days(5));
        token = f.refresh(&token, "console").await.unwrap();
    }
    f.clock
        .set(START + time::Duration::days(30) - time::Duration::seconds(1));
    token = f.refresh(&token, "console").await.unwrap();
    assert!(f.store.inspect(&token, f.now()).await.unwrap().is_some());
    f.clock.set(START + time::Duration::days(30));
    assert_eq!(f.store.inspect(&token, f.now()).await.unwrap(), None);
    assert!(
        f.store
            .list_sessions("alice", f.now())
            .await
            .unwrap()
            .is_empty()
    );
    assert_invalid(f.refresh(&token, "console").await, InvalidReason::Expired);
}

async fn families_die_when_idle(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (t0, _) = f.issue("console", "alice").await;
    let (u0, _) = f.issue("console", "alice").await;
    f.clock.advance(time::Duration::days(6));
    let t1 = f.refresh(&t0, "console").await.unwrap();
    // t1's family was used a day ago; u0's has been idle for 7 days
    f.clock.advance(time::Duration::days(1));
    assert_invalid(f.refresh(&u0, "console").await, InvalidReason::Expired);
    assert_eq!(f.store.inspect(&u0, f.now()).await.unwrap(), None);
    let sessions = f.store.list_sessions("alice", f.now()).await.unwrap();
    assert_eq!(sessions.len(), 1);
    let t2 = f.refresh(&t1, "console").await.unwrap();
    f.clock
        .advance(time::Duration::days(7) + time::Duration::milliseconds(1));
    assert_invalid(f.refresh(&t2, "console").await, InvalidReason::Expired);
}

async fn a_token_of_another_client_is_refused_and_nothing_rotates(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (t0, _) = f.issue("console", "alice").await;
    assert_invalid(f.refresh(&t0, "executor").await, InvalidReason::WrongClient);
    let still = f.store.inspect(&t0, f.now()).await.unwrap().unwrap();
    assert_eq!(still.generation, 0);
    let r1 = f.store.refresh(&t0, "console", f.now()).await.unwrap();
    assert!(!r1.replayed);
    assert_eq!(r1.session.generation, 1);
    // not even within grace, and not as re-use either
    assert_invalid(f.refresh(&t0, "executor").await, InvalidReason::WrongClient);
    f.clock.advance(time::Duration::minutes(1));
    assert_invalid(f.refresh(&t0, "executor").await, InvalidReason::WrongClient);
    assert!(f.store.inspect(&r1.token, f.now()).await.unwrap().is_some());
}

async fn revoking_a_token_revokes_its_family(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (t0, _) = f.issue("console", "alice").await;
    let t1 = f.refresh(&t0, "console").await.unwrap();
    assert!(matches!(
        f.store.revoke_token(&t1, "executor").await,
        Err(RefreshError::Invalid(InvalidReason::WrongClient))
    ));
    assert!(f.store.inspect(&t1, f.now()).await.unwrap().is_some());
    // any genuine token of the family ends it, the rotated one included
    assert!(f.store.revoke_token(&t0, "console").await.unwrap());
    assert_invalid(f.refresh(&t1, "console").await, InvalidReason::Unknown);
    assert!(!f.store.revoke_token(&t1, "console").await.unwrap());
    assert!(
        f.store
            .list_sessions("alice", f.now())
            .await
            .unwrap()
            .is_empty()
    );
}

async fn revoking_a_family_kills_its_live_token(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (t0, family) = f.issue("console", "alice").await;
    let (other, _) = f.issue("console", "alice").await;
    assert!(f.store.revoke_family(&family).await.unwrap());
    assert!(!f.store.revoke_family(&family).await.unwrap());
    assert_invalid(f.refresh(&t0, "console").await, InvalidReason::Unknown);
    assert!(f.refresh(&other, "console").await.is_ok());
}

async fn signing_out_everywhere_revokes_every_family_of_the_subject(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (a1, _) = f.issue("console", "alice").await;
    let (a2, _) = f.issue("cli", "alice").await;
    let (b1, _) = f.issue("console", "bob").await;
    assert_eq!(f.store.revoke_subject("alice").await.unwrap(), 2);
    assert_invalid(f.refresh(&a1, "console").await, InvalidReason::Unknown);
    assert_invalid(f.refresh(&a2, "cli").await, InvalidReason::Unknown);
    assert!(f.refresh(&b1, "console").await.is_ok());
    assert_eq!(f.store.revoke_subject("alice").await.unwrap(), 0);
    // a later login is a new session, unaffected
    let (a3, _) = f.issue("console", "alice").await;
    assert!(f.refresh(&a3, "console").await.is_ok());
    assert_eq!(
        f.store.list_sessions("alice", f.now()).await.unwrap().len(),
        1
    );
}

async fn disabling_a_client_revokes_its_families(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (a1, _) = f.issue("console", "alice").await;
    let (b1, _) = f.issue("console", "bob").await;
    let (a2, _) = f.issue("cli", "alice").await;
    assert_eq!(f.store.revoke_client("console").await.unwrap(), 2);
    assert_invalid(f.refresh(&a1, "console").await, InvalidReason::Unknown);
    assert_invalid(f.refresh(&b1, "console").await, InvalidReason::Unknown);
    assert!(f.refresh(&a2, "cli").await.is_ok());
    let sessions = f.store.list_sessions("alice", f.now()).await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].client_id, "cli");
}

async fn sessions_list_the_live_families_of_a_subject(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (t1, fam1) = f.issue("console", "alice").await;
    f.clock.advance(time::Duration::minutes(1));
    let (_t2, fam2) = f.issue("cli", "alice").await;
    f.clock.advance(time::Duration::minutes(1));
    let (_t3, fam3) = f.issue("console", "alice").await;
    let (_b, _) = f.issue("console", "bob").await;
    f.refresh(&t1, "console").await.unwrap();
    assert!(f.store.revoke_family(&fam3).await.unwrap());

    let sessions = f.store.list_sessions("alice", f.now()).await.unwrap();
    let families: Vec<_> = sessions.iter().map(|s| s.family.clone()).collect();
    assert_eq!(
        families,
        vec![fam1, fam2],
        "oldest first, revoked ones gone"
    );
    assert_eq!(sessions[0].generation, 1);
    assert_eq!(sessions[0].created_at, START);
    assert_eq!(sessions[0].last_used_at, f.now());
    assert_eq!(sessions[1].client_id, "cli");
    assert_eq!(sessions[1].auth_time, START - time::Duration::minutes(1));
    assert_eq!(sessions[1].session["roles"][0], "ops");
    let json = serde_json::to_string(&sessions).unwrap();
    assert!(!json.contains(t1.expose_secret()) && !json.contains("rt1."));
    assert!(
        f.store
            .list_sessions("carol", f.now())
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_family_is_found_by_its_id_only_while_it_lives(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (t0, family) = f.issue("console", "alice").await;
    let (_, revoked) = f.issue("console", "alice").await;
    let (_, idle) = f.issue("console", "alice").await;
    let found = f
        .store
        .live_family(&family, f.now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.family, found.subject.as_str()),
        (family.clone(), "alice")
    );
    assert_eq!(found.client_id, "console");
    let login = START - time::Duration::minutes(1);
    assert_eq!(found.auth_time, login);
    // a rotation keeps the family, with its login instant
    f.clock.advance(time::Duration::days(6));
    f.refresh(&t0, "console").await.unwrap();
    let found = f
        .store
        .live_family(&family, f.now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((found.generation, found.auth_time), (1, login));
    // revoked, idle past its expiry, never issued: none
    assert!(f.store.revoke_family(&revoked).await.unwrap());
    assert_eq!(f.store.live_family(&revoked, f.now()).await.unwrap(), None);
    f.clock.advance(time::Duration::days(1));
    assert_eq!(f.store.live_family(&idle, f.now()).await.unwrap(), None);
    let never = FamilyId::parse("AAAAAAAAAAAAAAAAAAAAAA").unwrap();
    assert_eq!(f.store.live_family(&never, f.now()).await.unwrap(), None);
    assert!(
        f.store
            .live_family(&family, f.now())
            .await
            .unwrap()
            .is_some()
    );
    // re-use of a rotated token ends the family
    f.clock.advance(time::Duration::minutes(1));
    assert!(f.refresh(&t0, "console").await.is_err());
    assert_eq!(f.store.live_family(&family, f.now()).await.unwrap(), None);
}

async fn malformed_and_forged_tokens_are_invalid(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (t0, family) = f.issue("console", "alice").await;
    let text = t0.expose_secret();
    let mut forged = text.to_owned();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let foreign = {
        // minted under another server key, same family id
        let (other, _) = ServerKey::generate().unwrap();
        let store = MemoryRefreshStore::new(other, RefreshSettings::default());
        let issued = store
            .issue(login("console", "alice"), f.now())
            .await
            .unwrap();
        let body = issued
            .token
            .expose_secret()
            .rsplit('.')
            .next()
            .unwrap()
            .to_owned();
        format!("rt1.{family}.{body}")
    };
    for bad in [
        "",
        "rt1",
        "rt1..",
        "garbage",
        &format!("rt2{}", &text[3..]),
        &forged,
        &foreign,
        &format!("{text}.x"),
        &text[..text.len() - 1],
    ] {
        let bad = secret(bad);
        assert_invalid(f.refresh(&bad, "console").await, InvalidReason::Malformed);
        assert_eq!(f.store.inspect(&bad, f.now()).await.unwrap(), None);
        assert!(!f.store.revoke_token(&bad, "console").await.unwrap());
    }
    // none of that touched the family: no re-use detected, nothing rotated
    let live = f.store.inspect(&t0, f.now()).await.unwrap().unwrap();
    assert_eq!(live.generation, 0);
}

// === Redis only ===

async fn raw_connection(url: &str) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn redis_never_holds_a_token_or_its_secret() {
    let redis = Redis::shared();
    let prefix = format!("test-{}:", uuid::Uuid::new_v4());
    let settings = RefreshSettings {
        key_prefix: prefix.clone(),
        ..RefreshSettings::default()
    };
    let (key, _) = ServerKey::generate().unwrap();
    let store = RedisRefreshStore::connect(&secret(&redis.url()), key, settings)
        .await
        .unwrap();

    let mut tokens = Vec::new();
    for subject in ["alice", "bob"] {
        let issued = store.issue(login("console", subject), START).await.unwrap();
        let t1 = store
            .refresh(&issued.token, "console", START)
            .await
            .unwrap();
        // a grace replay: the successor is recomputed, it was never stored
        let again = store
            .refresh(&issued.token, "console", START)
            .await
            .unwrap();
        assert!(same(&t1.token, &again.token));
        let t2 = store.refresh(&t1.token, "console", START).await.unwrap();
        tokens.extend([issued.token, t1.token, t2.token]);
    }

    let mut con = raw_connection(&redis.url()).await;
    let keys: Vec<Vec<u8>> = {
        let mut iter: ::redis::AsyncIter<Vec<u8>> = ::redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .clone()
            .iter_async(&mut con)
            .await
            .unwrap();
        let mut keys = Vec::new();
        while let Some(k) = futures::StreamExt::next(&mut iter).await {
            keys.push(k.unwrap());
        }
        keys
    };
    // two families, two subject indexes, one client index
    assert_eq!(keys.len(), 5, "{keys:?}");

    let mut everything: Vec<Vec<u8>> = keys.clone();
    for k in &keys {
        let kind: String = ::redis::cmd("TYPE")
            .arg(k)
            .query_async(&mut con)
            .await
            .unwrap();
        let values: Vec<Vec<u8>> = match kind.as_str() {
            "hash" => ::redis::cmd("HGETALL")
                .arg(k)
                .query_async(&mut con)
                .await
                .unwrap(),
            "set" => ::redis::cmd("SMEMBERS")
                .arg(k)
                .query_async(&mut con)
                .await
                .unwrap(),
            other => panic!("unexpected key type {other}"),
        };
        everything.extend(values);
        let dump: Vec<u8> = ::redis::cmd("DUMP")
            .arg(k)
            .query_async(&mut con)
            .await
            .unwrap();
        everything.push(dump);
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(ttl > 0, "every key expires eventually");
        assert!(
            ttl <= (31 * 24 * 60 * 60 * 1000),
            "not longer than the lifetime plus a day"
        );
    }
    for token in &tokens {
        use base64::Engine;
        let text = token.expose_secret();
        let body = text.rsplit('.').next().unwrap();
        // the body decodes to the 256-bit secret and a 128-bit tag
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        assert_eq!(decoded.len(), 48);
        let secret = &decoded[..32];
        let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
        // standard base64 without its padding, so that a padded form matches too
        let std_b64 = |bytes: &[u8]| {
            base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(bytes)
                .into_bytes()
        };
        // the whole token, its body, the part that encodes the secret; and the secret's
        // bytes themselves, as hex (either case) and as standard base64
        let needles: Vec<(&str, Vec<u8>)> = vec![
            ("the token", text.as_bytes().to_vec()),
            ("its body", body.as_bytes().to_vec()),
            (
                "the body's first 42 characters",
                body.as_bytes()[..42].to_vec(),
            ),
            ("the body's rest", body.as_bytes()[42..].to_vec()),
            ("the secret's bytes", secret.to_vec()),
            ("the secret as hex", hex(secret).into_bytes()),
            ("the secret as HEX", hex(secret).to_uppercase().into_bytes()),
            ("the secret as standard base64", std_b64(secret)),
            ("the body's bytes", decoded.clone()),
            ("the body's bytes as hex", hex(&decoded).into_bytes()),
            ("the body's bytes as standard base64", std_b64(&decoded)),
        ];
        for (what, needle) in &needles {
            for haystack in &everything {
                assert!(
                    !haystack.windows(needle.len()).any(|w| w == needle),
                    "Redis holds {what} of a token"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_unavailable_and_loses_nothing() {
    let redis = Redis::start_persistent().unwrap();
    let settings = RefreshSettings {
        key_prefix: "outage:".to_owned(),
        ..RefreshSettings::default()
    };
    let (key, _) = ServerKey::generate().unwrap();
    let store = RedisRefreshStore::connect(&secret(&redis.url()), key, settings)
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(2));
    let issued = store.issue(login("console", "alice"), START).await.unwrap();
    let t1 = store
        .refresh(&issued.token, "console", START)
        .await
        .unwrap()
        .token;

    redis.stop();
    let err = store.refresh(&t1, "console", START).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(!err.is_invalid_grant());
    let err = store
        .issue(login("console", "bob"), START)
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(
        store
            .list_sessions("alice", START)
            .await
            .unwrap_err()
            .is_unavailable()
    );

    redis.restart().unwrap();
    // the connection comes back by itself; the same token still works
    let deadline = Instant::now() + Duration::from_secs(20);
    let refreshed = loop {
        match store.refresh(&t1, "console", START).await {
            Ok(r) => break r,
            Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("refresh after the outage: {e}"),
        }
    };
    assert!(!refreshed.replayed);
    assert_eq!(refreshed.session.generation, 2);
    assert_eq!(store.list_sessions("alice", START).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_store_without_redis_answers_unavailable_not_invalid() {
    let redis = Redis::start().unwrap();
    let url = redis.url();
    redis.stop();
    let (key, _) = ServerKey::generate().unwrap();
    let err = RedisRefreshStore::connect(&secret(&url), key, RefreshSettings::default())
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}

#[test]
fn default_settings_are_the_documented_ones_and_validate() {
    let s = RefreshSettings::default();
    assert_eq!(s.absolute_lifetime, Duration::from_secs(30 * 24 * 3600));
    assert_eq!(s.idle_lifetime, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(s.reuse_grace, Duration::from_secs(10));
    assert!(s.validate().is_ok());
    let braces = RefreshSettings {
        key_prefix: "a{b}".to_owned(),
        ..RefreshSettings::default()
    };
    assert!(braces.validate().is_err());
}
