//! The cross-instance change feed on Postgres.

use config_center::feed::ChangeFeed;
use config_center::{ChangeNote, Expected, FeedEvent, Pool, Store};

use crate::common::{self, DEADLINE, app, entry, env};

#[tokio::test]
async fn a_publish_on_one_instance_reaches_a_listener_on_another_pool() {
    let t = common::postgres_store("feed_cross").await;
    // a second "instance": its own pool on the same database
    let Pool::Postgres(other) = common::pool_for(&t.url).await else {
        unreachable!()
    };
    let mut feed = ChangeFeed::postgres(other);
    let first = tokio::time::timeout(DEADLINE, feed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, FeedEvent::Resync);
    t.store
        .publish(
            &env("prod"),
            &app("orders"),
            Expected::Version(0),
            vec![entry("k", "v")],
            &ChangeNote::default(),
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(DEADLINE, feed.recv())
        .await
        .unwrap()
        .unwrap();
    let FeedEvent::Release(event) = got else {
        panic!("{got:?}")
    };
    assert_eq!(event.version, 1);
    assert_eq!(event.application.as_str(), "orders");
}

#[tokio::test]
async fn a_refused_publish_sends_no_notification() {
    let t = common::postgres_store("feed_refused").await;
    let mut feed = t.store.change_feed();
    assert_eq!(
        tokio::time::timeout(DEADLINE, feed.recv())
            .await
            .unwrap()
            .unwrap(),
        FeedEvent::Resync
    );
    let (e, a) = (env("prod"), app("orders"));
    t.store
        .publish(
            &e,
            &a,
            Expected::Version(0),
            vec![entry("k", "1")],
            &ChangeNote::default(),
        )
        .await
        .unwrap();
    // stale: rolled back, so its NOTIFY is never delivered
    assert!(
        t.store
            .publish(
                &e,
                &a,
                Expected::Version(0),
                vec![entry("k", "2")],
                &ChangeNote::default()
            )
            .await
            .is_err()
    );
    t.store
        .publish(
            &e,
            &a,
            Expected::Version(1),
            vec![entry("k", "3")],
            &ChangeNote::default(),
        )
        .await
        .unwrap();
    let mut versions = Vec::new();
    for _ in 0..2 {
        if let FeedEvent::Release(ev) = tokio::time::timeout(DEADLINE, feed.recv())
            .await
            .unwrap()
            .unwrap()
        {
            versions.push(ev.version);
        }
    }
    assert_eq!(versions, [1, 2]);
}

#[tokio::test]
async fn the_feed_reconnects_after_its_connection_is_killed_and_asks_for_a_resync() {
    let t = common::postgres_store("feed_reconnect").await;
    let mut feed = t.store.change_feed();
    assert_eq!(
        tokio::time::timeout(DEADLINE, feed.recv())
            .await
            .unwrap()
            .unwrap(),
        FeedEvent::Resync
    );
    // kill every listening backend from outside
    let Pool::Postgres(p) = t.store.pool() else {
        unreachable!()
    };
    let recv = tokio::spawn(async move {
        let got = tokio::time::timeout(DEADLINE, feed.recv()).await;
        (got, feed)
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%' AND datname = current_database() AND pid <> pg_backend_pid()")
        .execute(p)
        .await
        .unwrap();
    let (got, mut feed) = recv.await.unwrap();
    assert_eq!(got.unwrap().unwrap(), FeedEvent::Resync);
    let store = Store::new(t.store.pool().clone(), t.store.envelope().clone());
    publish_and_hear(&store, &mut feed, 1).await;
}

/// Publishes release `version` of prod/orders (the one after `version - 1`) and expects
/// `feed` to bring its note next.
async fn publish_and_hear(store: &Store, feed: &mut ChangeFeed, version: u64) {
    store
        .publish(
            &env("prod"),
            &app("orders"),
            Expected::Version(version - 1),
            vec![entry("k", &version.to_string())],
            &ChangeNote::default(),
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(DEADLINE, feed.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(got, FeedEvent::Release(ref ev) if ev.version == version),
        "{got:?}"
    );
}

#[tokio::test]
async fn gray_publish_promotion_and_abort_are_announced() {
    use std::collections::BTreeMap;

    use config_center::GraySelector;

    let t = common::postgres_store("feed_gray").await;
    let Pool::Postgres(other) = common::pool_for(&t.url).await else {
        unreachable!()
    };
    let mut feed = ChangeFeed::postgres(other);
    assert_eq!(
        tokio::time::timeout(DEADLINE, feed.recv())
            .await
            .unwrap()
            .unwrap(),
        FeedEvent::Resync
    );
    let (e, a) = (env("prod"), app("orders"));
    let note = ChangeNote::default();
    let selector = GraySelector::new(["node-1".to_owned()], BTreeMap::new()).unwrap();
    let s = &t.store;
    s.publish(&e, &a, Expected::Version(0), vec![entry("k", "1")], &note)
        .await
        .unwrap();
    s.publish_gray(
        &e,
        &a,
        Expected::Version(1),
        vec![entry("k", "2")],
        &selector,
        &note,
    )
    .await
    .unwrap();
    s.promote(&e, &a, Expected::Version(2)).await.unwrap();
    s.publish_gray(
        &e,
        &a,
        Expected::Version(2),
        vec![entry("k", "3")],
        &selector,
        &note,
    )
    .await
    .unwrap();
    s.abort_gray(&e, &a, Expected::Version(3), &note)
        .await
        .unwrap();
    let mut versions = Vec::new();
    while versions.len() < 5 {
        if let FeedEvent::Release(ev) = tokio::time::timeout(DEADLINE, feed.recv())
            .await
            .unwrap()
            .unwrap()
        {
            versions.push(ev.version);
        }
    }
    // publish 1, gray 2, promotion of 2, gray 3, abort as 4
    assert_eq!(versions, [1, 2, 2, 3, 4]);
}

#[tokio::test]
async fn a_feed_whose_connection_goes_silent_reconnects_and_asks_for_a_resync() {
    let t = common::postgres_store("feed_silent").await;
    let url = url::Url::parse(&t.url).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let forwarder = harness::Forwarder::to(upstream.parse().unwrap())
        .await
        .unwrap();
    let mut via = url.clone();
    via.set_port(Some(forwarder.addr().port())).unwrap();
    let Pool::Postgres(pool) = common::pool_for(via.as_str()).await else {
        unreachable!()
    };
    let every = std::time::Duration::from_millis(500);
    let mut feed = ChangeFeed::postgres(pool).with_liveness_interval(every);
    assert_eq!(
        tokio::time::timeout(DEADLINE, feed.recv())
            .await
            .unwrap()
            .unwrap(),
        FeedEvent::Resync
    );

    // the listening connection goes silent; a release is published directly meanwhile
    forwarder.go_silent();
    t.store
        .publish(
            &env("prod"),
            &app("orders"),
            Expected::Version(0),
            vec![entry("k", "1")],
            &ChangeNote::default(),
        )
        .await
        .unwrap();
    // its note is lost with the connection: the feed must notice within the liveness
    // interval and its check's deadline (here the interval too), reconnect and ask for a
    // resync
    let within = every * 2 + std::time::Duration::from_secs(3);
    let got = tokio::time::timeout(within, feed.recv()).await;
    assert!(
        matches!(got, Ok(Ok(FeedEvent::Resync))),
        "no resync within {within:?} of the connection going silent: {got:?}"
    );

    // and it listens again: the next release arrives as a note
    publish_and_hear(&t.store, &mut feed, 2).await;
}
