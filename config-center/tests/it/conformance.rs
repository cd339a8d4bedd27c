//! One storage conformance suite, instantiated for Postgres and for SQLite.

use std::collections::HashSet;

use std::collections::BTreeMap;

use config_center::{
    ChangeKind, ChangeNote, ConfigEntry, ConfigKey, CryptoError, Edit, Expected, Format,
    GraySelector, ReleaseStatus, StoreError,
};

use crate::common::{self, TestStore, app, entry, env, secret};

fn note() -> ChangeNote {
    ChangeNote::new("alice", "test")
}

pub async fn publish_creates_increasing_versions_with_full_snapshots(t: TestStore) {
    let (e, a) = (env("prod"), app("executor-orders"));
    let s = &t.store;
    assert_eq!(s.current_version(&e, &a).await.unwrap(), None);
    let r1 = s
        .publish(
            &e,
            &a,
            Expected::Version(0),
            vec![entry("db.url", "pg://one"), entry("port", "8080")],
            &note(),
        )
        .await
        .unwrap();
    assert_eq!(r1.version, 1);
    let r2 = s
        .publish(
            &e,
            &a,
            Expected::Version(1),
            vec![entry("db.url", "pg://two")],
            &note(),
        )
        .await
        .unwrap();
    assert_eq!(r2.version, 2);

    let v1 = s.release(&e, &a, 1).await.unwrap();
    assert_eq!(v1.entries.len(), 2, "a release is a full snapshot");
    assert_eq!(v1.get("db.url").unwrap().value.expose(), "pg://one");
    let current = s.current(&e, &a).await.unwrap().unwrap();
    assert_eq!(current.version, 2);
    assert_eq!(current.entries.len(), 1);
    assert_eq!(current.author, "alice");
    // other applications and environments are separate
    assert_eq!(s.current_version(&env("dev"), &a).await.unwrap(), None);
    assert_eq!(s.current_version(&e, &app("other")).await.unwrap(), None);
}

/// A publish is written a thousand entries a statement: the largest release allowed
/// spans several statements and still comes back whole, in one release.
pub async fn the_largest_release_is_stored_whole(t: TestStore) {
    let (e, a) = (env("prod"), app("big"));
    let s = &t.store;
    let entries: Vec<ConfigEntry> = (0..config_center::model::MAX_ENTRIES)
        .map(|i| entry(&format!("key.{i:05}"), &format!("value {i}")))
        .collect();
    let info = s
        .publish(&e, &a, Expected::Version(0), entries, &note())
        .await
        .unwrap();
    assert_eq!(info.version, 1);
    let back = s.release(&e, &a, 1).await.unwrap();
    assert_eq!(back.entries.len(), config_center::model::MAX_ENTRIES);
    for i in [0, 999, 1_000, 1_001, config_center::model::MAX_ENTRIES - 1] {
        let key = format!("key.{i:05}");
        assert_eq!(
            back.get(&key).unwrap().value.expose(),
            format!("value {i}"),
            "{key}"
        );
    }
    // one more than allowed is refused, and nothing is stored
    let too_many: Vec<ConfigEntry> = (0..=config_center::model::MAX_ENTRIES)
        .map(|i| entry(&format!("key.{i:05}"), "v"))
        .collect();
    assert!(
        s.publish(&e, &a, Expected::Version(1), too_many, &note())
            .await
            .is_err()
    );
    assert_eq!(s.current_version(&e, &a).await.unwrap(), Some(1));
}

pub async fn stale_write_is_refused(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    let s = &t.store;
    s.publish(&e, &a, Expected::Version(0), vec![entry("k", "1")], &note())
        .await
        .unwrap();
    s.publish(&e, &a, Expected::Version(1), vec![entry("k", "2")], &note())
        .await
        .unwrap();
    let err = s
        .publish(
            &e,
            &a,
            Expected::Version(1),
            vec![entry("k", "stale")],
            &note(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 1,
                current: 2
            }
        ),
        "{err}"
    );
    // a version from the future is refused too, leaving no gap
    let err = s
        .publish(&e, &a, Expected::Version(5), vec![entry("k", "x")], &note())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 5,
                current: 2
            }
        ),
        "{err}"
    );
    assert_eq!(
        s.current(&e, &a)
            .await
            .unwrap()
            .unwrap()
            .get("k")
            .unwrap()
            .value
            .expose(),
        "2"
    );
}

pub async fn concurrent_publishes_never_share_a_version(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (s, e, a) = (t.store.clone(), e.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            s.publish(
                &e,
                &a,
                Expected::Any,
                vec![entry("writer", &i.to_string())],
                &note(),
            )
            .await
            .map(|r| r.version)
        }));
    }
    let mut versions = HashSet::new();
    for task in tasks {
        assert!(
            versions.insert(task.await.unwrap().unwrap()),
            "a version was handed out twice"
        );
    }
    assert_eq!(versions, (1..=8).collect());
    assert_eq!(t.store.current_version(&e, &a).await.unwrap(), Some(8));
}

pub async fn concurrent_writers_on_the_same_version_let_exactly_one_win(t: TestStore) {
    let (e, a) = (env("test"), app("orders"));
    t.store
        .publish(&e, &a, Expected::Version(0), vec![entry("k", "0")], &note())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (s, e, a) = (t.store.clone(), e.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            s.publish(
                &e,
                &a,
                Expected::Version(1),
                vec![entry("k", &i.to_string())],
                &note(),
            )
            .await
        }));
    }
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.version, 2);
                won += 1;
            }
            Err(StoreError::Conflict { expected: 1, .. }) => {}
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert_eq!(won, 1);
}

pub async fn history_lists_releases_newest_first(t: TestStore) {
    let (e, a) = (env("dev"), app("admin"));
    for v in 0..4 {
        t.store
            .publish(
                &e,
                &a,
                Expected::Version(v),
                vec![entry("k", &v.to_string())],
                &ChangeNote::new("bob", format!("change {v}")),
            )
            .await
            .unwrap();
    }
    let history = t.store.history(&e, &a, 3).await.unwrap();
    let versions: Vec<u64> = history.iter().map(|r| r.version).collect();
    assert_eq!(versions, [4, 3, 2]);
    assert_eq!(history[0].message, "change 3");
    assert_eq!(history[0].author, "bob");
}

pub async fn diff_reports_added_removed_and_changed_keys_and_masks_secrets(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    let s = &t.store;
    s.publish(
        &e,
        &a,
        Expected::Version(0),
        vec![
            entry("same", "1"),
            entry("gone", "x"),
            secret("db.password", "hunter2"),
        ],
        &note(),
    )
    .await
    .unwrap();
    s.publish(
        &e,
        &a,
        Expected::Version(1),
        vec![
            entry("same", "1"),
            entry("new", "y"),
            secret("db.password", "swordfish"),
        ],
        &note(),
    )
    .await
    .unwrap();
    let diff = s.diff(&e, &a, 1, 2, false).await.unwrap();
    let kinds: Vec<(&str, ChangeKind)> = diff
        .changes
        .iter()
        .map(|c| (c.key.as_str(), c.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("db.password", ChangeKind::Changed),
            ("gone", ChangeKind::Removed),
            ("new", ChangeKind::Added)
        ]
    );
    let masked = format!("{diff:?}");
    assert!(
        !masked.contains("hunter2") && !masked.contains("swordfish"),
        "{masked}"
    );
    assert_eq!(
        diff.changes[0].before.as_ref().unwrap().value,
        config_center::store::MASK
    );
    let revealed = s.diff(&e, &a, 1, 2, true).await.unwrap();
    assert_eq!(
        revealed.changes[0].before.as_ref().unwrap().value,
        "hunter2"
    );
    assert_eq!(
        revealed.changes[0].after.as_ref().unwrap().value,
        "swordfish"
    );
    // either order, any two releases
    let back = s.diff(&e, &a, 2, 1, false).await.unwrap();
    assert_eq!(
        back.changes.iter().find(|c| c.key == "gone").unwrap().kind,
        ChangeKind::Added
    );
    assert!(matches!(
        s.diff(&e, &a, 1, 9, false).await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
    // listings mask too
    let listing = s.current(&e, &a).await.unwrap().unwrap().listing(false);
    assert!(listing.iter().all(|l| l.value != "swordfish"));
}

pub async fn rollback_republishes_an_old_snapshot_as_a_new_release(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    let s = &t.store;
    s.publish(
        &e,
        &a,
        Expected::Version(0),
        vec![entry("k", "good"), secret("p", "s1")],
        &note(),
    )
    .await
    .unwrap();
    s.publish(
        &e,
        &a,
        Expected::Version(1),
        vec![entry("k", "bad")],
        &note(),
    )
    .await
    .unwrap();
    let r = s
        .rollback(&e, &a, 1, Expected::Version(2), &note())
        .await
        .unwrap();
    assert_eq!(r.version, 3);
    assert_eq!(r.rollback_of, Some(1));
    let current = s.current(&e, &a).await.unwrap().unwrap();
    assert_eq!(current.get("k").unwrap().value.expose(), "good");
    assert_eq!(current.get("p").unwrap().value.expose(), "s1");
    assert!(current.get("p").unwrap().secret);
    // nothing was deleted
    assert_eq!(
        s.release(&e, &a, 2)
            .await
            .unwrap()
            .get("k")
            .unwrap()
            .value
            .expose(),
        "bad"
    );
    assert_eq!(s.history(&e, &a, 10).await.unwrap().len(), 3);
    // a stale rollback is refused
    let err = s
        .rollback(&e, &a, 1, Expected::Version(2), &note())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
}

pub async fn edits_apply_on_top_of_the_current_release(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    let s = &t.store;
    s.publish(
        &e,
        &a,
        Expected::Version(0),
        vec![entry("a", "1"), entry("b", "2")],
        &note(),
    )
    .await
    .unwrap();
    let edits = [
        Edit::Put(ConfigEntry::parse("c", r#"{"x":1}"#, Format::Json, false).unwrap()),
        Edit::Put(entry("a", "10")),
        Edit::Delete(ConfigKey::parse("b").unwrap()),
    ];
    let r = s
        .apply(&e, &a, Expected::Version(1), &edits, &note())
        .await
        .unwrap();
    assert_eq!(r.version, 2);
    let current = s.current(&e, &a).await.unwrap().unwrap();
    let keys: Vec<&str> = current.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["a", "c"]);
    assert_eq!(current.get("a").unwrap().value.expose(), "10");
    let err = s
        .apply(&e, &a, Expected::Version(1), &edits, &note())
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::Conflict {
            expected: 1,
            current: 2
        }
    ));
}

pub async fn the_raw_database_never_holds_plaintext_values(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    t.store
        .publish(
            &e,
            &a,
            Expected::Version(0),
            vec![
                secret("db.password", "PLAINTEXT-SECRET-4711"),
                entry("motd", "PLAINTEXT-VISIBLE-0815"),
            ],
            &note(),
        )
        .await
        .unwrap();
    let raw = common::raw_rows(t.store.pool()).await;
    assert!(raw.contains("db.password"), "the dump should see the rows");
    assert!(!raw.contains("PLAINTEXT-SECRET-4711"));
    assert!(!raw.contains("PLAINTEXT-VISIBLE-0815"));
    // SQLite: the database and WAL files themselves
    if let Some(path) = t.url.strip_prefix("sqlite:") {
        let mut seen = String::new();
        for file in [path.to_owned(), format!("{path}-wal")] {
            seen.push_str(&String::from_utf8_lossy(
                &std::fs::read(&file).unwrap_or_default(),
            ));
        }
        assert!(seen.contains("db.password"), "the files hold the rows");
        for file in [path.to_owned(), format!("{path}-wal")] {
            let bytes = std::fs::read(&file).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains("PLAINTEXT-SECRET-4711"), "{file}");
            assert!(!text.contains("PLAINTEXT-VISIBLE-0815"), "{file}");
        }
    }
}

pub async fn a_value_moved_to_another_row_does_not_decrypt(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    let s = &t.store;
    s.publish(
        &e,
        &a,
        Expected::Version(0),
        vec![entry("a", "alpha"), entry("b", "beta")],
        &note(),
    )
    .await
    .unwrap();
    // copy a's ciphertext over b's
    const SWAP: &str = "UPDATE config_entries SET sealed = (SELECT sealed FROM config_entries WHERE key = 'a') WHERE key = 'b'";
    match s.pool() {
        config_center::Pool::Postgres(p) => {
            sqlx::query(SWAP).execute(p).await.unwrap();
        }
        config_center::Pool::Sqlite(p) => {
            sqlx::query(SWAP).execute(p).await.unwrap();
        }
    }
    let err = s.release(&e, &a, 1).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Crypto(CryptoError::Open { ref key, .. }) if key == "b"),
        "{err}"
    );
}

pub async fn a_wrong_master_key_fails_closed(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    t.store
        .publish(&e, &a, Expected::Version(0), vec![entry("k", "v")], &note())
        .await
        .unwrap();
    let other = tempfile::tempdir().unwrap();
    let wrong =
        config_center::Store::new(t.store.pool().clone(), common::local_envelope(other.path()));
    let err = wrong.release(&e, &a, 1).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Crypto(CryptoError::Unwrap { .. })),
        "{err}"
    );
    let err = wrong
        .publish(&e, &a, Expected::Version(1), vec![entry("k", "w")], &note())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Crypto(CryptoError::Unwrap { .. })),
        "{err}"
    );
}

pub async fn a_new_data_key_leaves_old_releases_readable(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    let s = &t.store;
    s.publish(
        &e,
        &a,
        Expected::Version(0),
        vec![entry("k", "under key 1")],
        &note(),
    )
    .await
    .unwrap();
    assert_eq!(s.rotate_data_key(&e).await.unwrap(), 2);
    s.publish(
        &e,
        &a,
        Expected::Version(1),
        vec![entry("k", "under key 2")],
        &note(),
    )
    .await
    .unwrap();
    s.envelope().clear_cache();
    assert_eq!(
        s.release(&e, &a, 1)
            .await
            .unwrap()
            .get("k")
            .unwrap()
            .value
            .expose(),
        "under key 1"
    );
    assert_eq!(
        s.release(&e, &a, 2)
            .await
            .unwrap()
            .get("k")
            .unwrap()
            .value
            .expose(),
        "under key 2"
    );
}

pub async fn latest_versions_lists_every_application(t: TestStore) {
    let s = &t.store;
    s.publish(
        &env("prod"),
        &app("a"),
        Expected::Any,
        vec![entry("k", "1")],
        &note(),
    )
    .await
    .unwrap();
    s.publish(
        &env("prod"),
        &app("a"),
        Expected::Any,
        vec![entry("k", "2")],
        &note(),
    )
    .await
    .unwrap();
    s.publish(
        &env("dev"),
        &app("b"),
        Expected::Any,
        vec![entry("k", "1")],
        &note(),
    )
    .await
    .unwrap();
    let mut latest: Vec<(String, String, u64)> = s
        .latest_versions()
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.environment.to_string(),
                r.application.to_string(),
                r.version,
            )
        })
        .collect();
    latest.sort();
    assert_eq!(
        latest,
        [
            ("dev".into(), "b".into(), 1),
            ("prod".into(), "a".into(), 2)
        ]
    );
}

pub async fn a_publish_reaches_the_change_feed(t: TestStore) {
    let mut feed = t.store.change_feed();
    if let config_center::Pool::Postgres(_) = t.store.pool() {
        // the Postgres feed announces that it is listening first
        let first = tokio::time::timeout(common::DEADLINE, feed.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first, config_center::FeedEvent::Resync);
    }
    t.store
        .publish(
            &env("prod"),
            &app("orders"),
            Expected::Version(0),
            vec![entry("k", "1")],
            &note(),
        )
        .await
        .unwrap();
    let event = tokio::time::timeout(common::DEADLINE, feed.recv())
        .await
        .unwrap()
        .unwrap();
    let config_center::FeedEvent::Release(event) = event else {
        panic!("{event:?}")
    };
    assert_eq!(
        (
            event.environment.as_str(),
            event.application.as_str(),
            event.version
        ),
        ("prod", "orders", 1)
    );
}

/// Versions are stored as BIGINT. A larger one, as a client may send in a URL, names no
/// release and can never be the current version: not found, or a conflict, never a store
/// error (which the API would answer with a 500) and never an overflow.
pub async fn versions_beyond_the_stored_range_are_not_found_or_a_conflict(t: TestStore) {
    let (e, a) = (env("prod"), app("edge"));
    let s = &t.store;
    s.publish(&e, &a, Expected::Version(0), vec![entry("k", "v")], &note())
        .await
        .unwrap();
    for huge in [i64::MAX as u64 + 1, u64::MAX] {
        assert!(
            matches!(
                s.release(&e, &a, huge).await,
                Err(StoreError::NotFound { version: Some(v), .. }) if v == huge
            ),
            "release {huge}"
        );
        assert!(
            matches!(
                s.diff(&e, &a, 1, huge, false).await,
                Err(StoreError::NotFound { .. })
            ),
            "diff to {huge}"
        );
        assert!(
            matches!(
                s.rollback(&e, &a, huge, Expected::Any, &note()).await,
                Err(StoreError::NotFound { .. })
            ),
            "rollback to {huge}"
        );
    }
    for expected in [i64::MAX as u64 - 1, i64::MAX as u64, u64::MAX] {
        let r = s
            .publish(
                &e,
                &a,
                Expected::Version(expected),
                vec![entry("k", "w")],
                &note(),
            )
            .await;
        assert!(
            matches!(r, Err(StoreError::Conflict { current: 1, .. })),
            "expected {expected}: {r:?}"
        );
    }
    // nothing was written by any of it
    assert_eq!(s.current_version(&e, &a).await.unwrap(), Some(1));
}

fn labels(text: &str) -> BTreeMap<String, String> {
    GraySelector::parse_labels(text).unwrap()
}

pub async fn a_gray_release_reaches_only_matching_instances_until_promoted(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    let s = &t.store;
    s.publish(
        &e,
        &a,
        Expected::Version(0),
        vec![entry("k", "old")],
        &note(),
    )
    .await
    .unwrap();
    let selector = GraySelector::new(["node-7".to_owned()], labels("zone=a")).unwrap();
    let gray = s
        .publish_gray(
            &e,
            &a,
            Expected::Version(1),
            vec![entry("k", "new")],
            &selector,
            &note(),
        )
        .await
        .unwrap();
    assert_eq!((gray.version, gray.status), (2, ReleaseStatus::Gray));
    assert_eq!(s.current_version(&e, &a).await.unwrap(), Some(1));
    assert_eq!(s.head_version(&e, &a).await.unwrap(), Some(2));

    let served = |instance: Option<&'static str>, l: &'static str| {
        let s = s.clone();
        let (e, a) = (e.clone(), a.clone());
        async move {
            s.snapshot_for(&e, &a, instance, &labels(l))
                .await
                .unwrap()
                .unwrap()
                .version
        }
    };
    assert_eq!(served(None, "").await, 1);
    assert_eq!(served(Some("node-7"), "").await, 2);
    assert_eq!(served(Some("node-8"), "zone=a,tier=x").await, 2);
    assert_eq!(served(Some("node-8"), "zone=b").await, 1);

    // one gray release at a time, and no main publish under it
    let err = s
        .publish(&e, &a, Expected::Version(2), vec![entry("k", "x")], &note())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::GrayInProgress(2)), "{err}");
    let err = s
        .publish_gray(
            &e,
            &a,
            Expected::Version(2),
            vec![entry("k", "y")],
            &selector,
            &note(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::GrayInProgress(2)), "{err}");
    let latest = s.latest_versions().await.unwrap();
    assert_eq!(latest.iter().map(|r| r.version).collect::<Vec<_>>(), [2]);

    assert!(matches!(
        s.promote(&e, &a, Expected::Version(1)).await.unwrap_err(),
        StoreError::Conflict {
            expected: 1,
            current: 2
        }
    ));
    assert_eq!(s.promote(&e, &a, Expected::Version(2)).await.unwrap(), 2);
    assert_eq!(s.current_version(&e, &a).await.unwrap(), Some(2));
    assert_eq!(served(None, "").await, 2);
    assert_eq!(
        s.release(&e, &a, 2).await.unwrap().status,
        ReleaseStatus::Main
    );
    assert!(matches!(
        s.promote(&e, &a, Expected::Any).await.unwrap_err(),
        StoreError::NoGray
    ));
    s.publish(
        &e,
        &a,
        Expected::Version(2),
        vec![entry("k", "after")],
        &note(),
    )
    .await
    .unwrap();
}

pub async fn aborting_a_gray_release_moves_everyone_forward_to_the_main_content(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    let s = &t.store;
    s.publish(
        &e,
        &a,
        Expected::Version(0),
        vec![entry("k", "old")],
        &note(),
    )
    .await
    .unwrap();
    let selector = GraySelector::new(["node-7".to_owned()], BTreeMap::new()).unwrap();
    s.publish_gray(
        &e,
        &a,
        Expected::Version(1),
        vec![entry("k", "new")],
        &selector,
        &note(),
    )
    .await
    .unwrap();
    let aborted = s
        .abort_gray(&e, &a, Expected::Version(2), &note())
        .await
        .unwrap();
    assert_eq!(aborted.gray, 2);
    let back = aborted.republished.unwrap();
    assert_eq!(
        (back.version, back.status, back.rollback_of),
        (3, ReleaseStatus::Main, Some(1))
    );
    assert_eq!(
        s.release(&e, &a, 2).await.unwrap().status,
        ReleaseStatus::Aborted
    );
    // the gray instance, which held version 2, now gets version 3 with the main content
    let served = s
        .snapshot_for(&e, &a, Some("node-7"), &BTreeMap::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(served.version, 3);
    assert_eq!(served.get("k").unwrap().value.expose(), "old");
    let statuses: Vec<ReleaseStatus> = s
        .history(&e, &a, 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses,
        [
            ReleaseStatus::Main,
            ReleaseStatus::Aborted,
            ReleaseStatus::Main
        ]
    );
    assert!(matches!(
        s.abort_gray(&e, &a, Expected::Any, &note())
            .await
            .unwrap_err(),
        StoreError::NoGray
    ));
    assert_eq!(
        s.publish(
            &e,
            &a,
            Expected::Version(3),
            vec![entry("k", "v4")],
            &note()
        )
        .await
        .unwrap()
        .version,
        4
    );
}

/// A promote and an abort of the same gray release, at once: exactly one of them wins,
/// and what is served afterwards is what the winner said (the abort never republishes the
/// old main content over a promotion it did not see).
pub async fn an_abort_racing_a_promote_never_undoes_the_promotion(t: TestStore) {
    let e = env("prod");
    let s = &t.store;
    let selector = GraySelector::new(["node-7".to_owned()], BTreeMap::new()).unwrap();
    for round in 0..8 {
        let a = app(&format!("race-{round}"));
        s.publish(
            &e,
            &a,
            Expected::Version(0),
            vec![entry("k", "old")],
            &note(),
        )
        .await
        .unwrap();
        s.publish_gray(
            &e,
            &a,
            Expected::Version(1),
            vec![entry("k", "new")],
            &selector,
            &note(),
        )
        .await
        .unwrap();
        let note = note();
        let (aborted, promoted) = tokio::join!(
            s.abort_gray(&e, &a, Expected::Version(2), &note),
            s.promote(&e, &a, Expected::Version(2)),
        );
        let current = s.current(&e, &a).await.unwrap().unwrap();
        let served = current.get("k").unwrap().value.expose().to_owned();
        match (aborted, promoted) {
            (Err(StoreError::NoGray), Ok(2)) => {
                assert_eq!((current.version, served.as_str()), (2, "new"), "{round}");
                assert_eq!(s.head_version(&e, &a).await.unwrap(), Some(2), "{round}");
            }
            (Ok(aborted), Err(StoreError::NoGray)) => {
                assert_eq!(aborted.republished.map(|r| r.version), Some(3), "{round}");
                assert_eq!((current.version, served.as_str()), (3, "old"), "{round}");
                assert_eq!(
                    s.release(&e, &a, 2).await.unwrap().status,
                    ReleaseStatus::Aborted
                );
            }
            (aborted, promoted) => panic!(
                "round {round}: both or neither succeeded: abort {aborted:?}, promote \
                 {promoted:?}; now serving version {} = {served:?}",
                current.version
            ),
        }
    }
}

/// Aborting a gray release when no main release exists publishes nothing: every node,
/// the gray ones included, finds no release (404), as before the gray release.
pub async fn aborting_a_first_gray_release_publishes_nothing(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    let s = &t.store;
    let selector = GraySelector::new(["node-7".to_owned()], BTreeMap::new()).unwrap();
    s.publish_gray(
        &e,
        &a,
        Expected::Version(0),
        vec![entry("k", "canary")],
        &selector,
        &note(),
    )
    .await
    .unwrap();
    assert!(
        s.snapshot_for(&e, &a, Some("node-7"), &BTreeMap::new())
            .await
            .unwrap()
            .is_some()
    );
    let aborted = s
        .abort_gray(&e, &a, Expected::Version(1), &note())
        .await
        .unwrap();
    assert_eq!(aborted.gray, 1);
    assert!(aborted.republished.is_none(), "{aborted:?}");
    for instance in [Some("node-7"), Some("node-8"), None] {
        let served = s
            .snapshot_for(&e, &a, instance, &BTreeMap::new())
            .await
            .unwrap();
        assert!(served.is_none(), "{instance:?} is served {served:?}");
    }
    assert_eq!(s.current_version(&e, &a).await.unwrap(), None);
    assert_eq!(s.head_version(&e, &a).await.unwrap(), Some(1));
    assert_eq!(
        s.release(&e, &a, 1).await.unwrap().status,
        ReleaseStatus::Aborted
    );
    // the reconcile still sees the application, so an instance that missed the note
    // drops the gray release it holds
    let latest = s.latest_versions().await.unwrap();
    assert_eq!(latest.iter().map(|r| r.version).collect::<Vec<_>>(), [1]);
    assert!(matches!(
        s.abort_gray(&e, &a, Expected::Any, &note())
            .await
            .unwrap_err(),
        StoreError::NoGray
    ));
    // the next release follows the aborted one
    let next = s
        .publish(
            &e,
            &a,
            Expected::Version(1),
            vec![entry("k", "v2")],
            &note(),
        )
        .await
        .unwrap();
    assert_eq!(next.version, 2);
}

/// A message the database cannot store as text (a NUL: Postgres refuses it) is refused as
/// bad input on every write path, before anything is written, not taken for an outage.
pub async fn a_message_with_a_nul_is_refused_on_every_write_path_and_changes_nothing(t: TestStore) {
    let (e, a) = (env("prod"), app("orders"));
    let s = &t.store;
    s.publish(&e, &a, Expected::Version(0), vec![entry("k", "1")], &note())
        .await
        .unwrap();
    let bad = ChangeNote::new("alice", "deploy\0 now");
    let refused = |r: Result<config_center::ReleaseInfo, StoreError>| {
        let err = r.unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Invalid(config_center::ModelError::BadCharacter {
                    field: config_center::Field::Message,
                    at: 6,
                    ..
                })
            ),
            "{err}"
        );
    };
    refused(
        s.publish(&e, &a, Expected::Version(1), vec![entry("k", "2")], &bad)
            .await,
    );
    refused(
        s.apply(&e, &a, Expected::Any, &[Edit::Put(entry("k", "3"))], &bad)
            .await,
    );
    refused(s.rollback(&e, &a, 1, Expected::Version(1), &bad).await);
    let selector = GraySelector::new(["node-7".to_owned()], BTreeMap::new()).unwrap();
    refused(
        s.publish_gray(
            &e,
            &a,
            Expected::Version(1),
            vec![entry("k", "4")],
            &selector,
            &bad,
        )
        .await,
    );
    assert_eq!(s.current_version(&e, &a).await.unwrap(), Some(1));
    assert_eq!(s.history(&e, &a, 10).await.unwrap().len(), 1);
}

macro_rules! conformance {
    ($backend:ident, $make:path) => {
        mod $backend {
            macro_rules! case {
                ($name:ident) => {
                    #[tokio::test]
                    async fn $name() {
                        super::$name($make(stringify!($name)).await).await;
                    }
                };
            }
            case!(publish_creates_increasing_versions_with_full_snapshots);
            case!(the_largest_release_is_stored_whole);
            case!(versions_beyond_the_stored_range_are_not_found_or_a_conflict);
            case!(stale_write_is_refused);
            case!(concurrent_publishes_never_share_a_version);
            case!(concurrent_writers_on_the_same_version_let_exactly_one_win);
            case!(history_lists_releases_newest_first);
            case!(diff_reports_added_removed_and_changed_keys_and_masks_secrets);
            case!(rollback_republishes_an_old_snapshot_as_a_new_release);
            case!(edits_apply_on_top_of_the_current_release);
            case!(the_raw_database_never_holds_plaintext_values);
            case!(a_value_moved_to_another_row_does_not_decrypt);
            case!(a_wrong_master_key_fails_closed);
            case!(a_new_data_key_leaves_old_releases_readable);
            case!(latest_versions_lists_every_application);
            case!(a_publish_reaches_the_change_feed);
            case!(a_gray_release_reaches_only_matching_instances_until_promoted);
            case!(aborting_a_gray_release_moves_everyone_forward_to_the_main_content);
            case!(an_abort_racing_a_promote_never_undoes_the_promotion);
            case!(aborting_a_first_gray_release_publishes_nothing);
            case!(a_message_with_a_nul_is_refused_on_every_write_path_and_changes_nothing);
        }
    };
}

conformance!(postgres, crate::common::postgres_store);
conformance!(sqlite, crate::common::sqlite_store);
