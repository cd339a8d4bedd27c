//! Schema migrations on a Postgres that several instances start against at once: the
//! migration lock that keeps them apart must neither outlive a failed migration nor stall
//! the holder's concurrent index builds.

use std::time::Duration;

use harness::Postgres;
use portcullis::db::Database;
use sqlx::Connection as _;
use sqlx::migrate::Migrate as _;

use super::audit::database_name;

/// A handle on `db` as an instance opens it: a lazy pool, nothing migrated yet.
pub(super) fn instance_database(db: &str) -> Database {
    let config: portcullis::config::DatabaseConfig =
        toml::from_str(&format!("url = \"{db}\"")).unwrap();
    Database::connect_lazy(&config).unwrap()
}

/// A migration that fails (here: a table of the first migration's name is in the way)
/// must not leave the migration lock held. sqlx's own locking leaves it held, on a
/// connection it hands back to the pool, and every instance's next attempt then waits on
/// it for good: readiness never came back, and the audit trail stopped being written.
#[tokio::test]
async fn a_failed_migration_leaves_no_lock_behind_and_another_instance_migrates() {
    let db = Postgres::shared().fresh_database("migrate_failed").unwrap();
    let name = database_name(&db);
    Postgres::shared()
        .psql(name, "CREATE TABLE audit_events (in_the_way int)")
        .unwrap();
    let first = instance_database(&db);
    let failed = first.migrate().await;
    assert!(failed.is_err(), "{failed:?}");
    assert!(!first.is_migrated());

    Postgres::shared()
        .psql(name, "DROP TABLE audit_events")
        .unwrap();
    // the first instance's pool is still open, as it is while it retries
    let second = instance_database(&db);
    let migrated = tokio::time::timeout(Duration::from_secs(20), second.migrate()).await;
    assert!(
        matches!(migrated, Ok(Ok(()))),
        "the second instance could not migrate: {migrated:?}"
    );
    assert!(second.is_migrated());
    // and the first one's retry finds nothing left to do
    tokio::time::timeout(Duration::from_secs(20), first.migrate())
        .await
        .expect("the first instance's retry ended")
        .unwrap();
    first.close().await;
    second.close().await;
}

/// While one instance holds the migration lock and builds an index `CONCURRENTLY` (the
/// lean audit indexes, 0006 and 0007), another one starting meanwhile waits for the lock
/// without holding the build up. A session waiting inside `pg_advisory_lock` holds a
/// snapshot the build must outwait, while it waits on the builder's lock: a deadlock that
/// Postgres breaks only after `deadlock_timeout` by cancelling one side, the build as
/// likely as not. Here the check is put off (a minute), so that a waiter of that kind
/// shows as a build that cannot finish.
///
/// The lock held here is sqlx's own (`Migrate::lock`), as an instance of an earlier
/// version takes it: the instance must wait on that one too.
#[tokio::test]
async fn an_instance_waiting_to_migrate_does_not_hold_up_the_lock_holder_s_index_build() {
    let db = Postgres::shared()
        .fresh_database("migrate_waiting")
        .unwrap();
    let name = database_name(&db);
    Postgres::shared()
        .psql(
            "postgres",
            &format!("ALTER DATABASE {name} SET deadlock_timeout = '60s'"),
        )
        .unwrap();
    let mut holder = sqlx::PgConnection::connect(&db).await.unwrap();
    sqlx::query("CREATE TABLE build_probe (x int)")
        .execute(&mut holder)
        .await
        .unwrap();
    holder.lock().await.unwrap();

    let waiter = instance_database(&db);
    let migrating = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.migrate().await }
    });
    // the instance's session is open and asking for the lock
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    let mut others = 0_i64;
    for _ in 0..100 {
        others = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> $1",
        )
        .bind(holder_pid)
        .fetch_one(&mut holder)
        .await
        .unwrap();
        if others > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(others > 0, "the instance never connected");
    tokio::time::sleep(Duration::from_millis(500)).await;

    sqlx::query("SET statement_timeout = '10s'")
        .execute(&mut holder)
        .await
        .unwrap();
    let built = sqlx::query("CREATE INDEX CONCURRENTLY build_probe_x ON build_probe (x)")
        .execute(&mut holder)
        .await;
    assert!(
        built.is_ok(),
        "the index build was held up by the instance waiting to migrate: {built:?}"
    );
    assert!(
        !migrating.is_finished() && !waiter.is_migrated(),
        "the instance migrated while sqlx's migration lock was held elsewhere"
    );

    holder.unlock().await.unwrap();
    let migrated = tokio::time::timeout(Duration::from_secs(20), migrating)
        .await
        .expect("the instance migrated once the lock was free")
        .unwrap();
    assert!(migrated.is_ok(), "{migrated:?}");
    assert!(waiter.is_migrated());
    holder.close().await.unwrap();
    waiter.close().await;
}
