//! Our migrations and the gateway's share one database.

use sqlx::migrate::Migrator;

async fn gateway_migrator(backend: &str) -> Migrator {
    let dir = harness::workspace_root()
        .join("gateway/migrations")
        .join(backend);
    let mut m = Migrator::new(dir).await.unwrap();
    m.set_ignore_missing(true);
    m
}

#[tokio::test]
async fn both_migrators_run_on_one_postgres_database_in_either_order() {
    let pg = harness::Postgres::shared();
    for gateway_first in [true, false] {
        let url = pg.fresh_database("both_migrators").unwrap();
        let pool = config_center::store::lazy_pool(&url).unwrap();
        let config_center::Pool::Postgres(p) = &pool else {
            unreachable!()
        };
        let gateway = gateway_migrator("postgres").await;
        if gateway_first {
            gateway.run(p).await.unwrap();
        }
        config_center::migrate(&pool).await.unwrap();
        gateway.run(p).await.unwrap();
        // and again: nothing left to do, nothing refused
        config_center::migrate(&pool).await.unwrap();
        gateway.run(p).await.unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name IN ('config_releases', 'oauth_clients', 'audit_events')",
        )
        .fetch_one(p)
        .await
        .unwrap();
        assert_eq!(tables, 3);
    }
}

#[tokio::test]
async fn both_migrators_run_on_one_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    let pool =
        config_center::store::lazy_pool(&format!("sqlite:{}", dir.path().join("db").display()))
            .unwrap();
    let config_center::Pool::Sqlite(p) = &pool else {
        unreachable!()
    };
    let gateway = gateway_migrator("sqlite").await;
    gateway.run(p).await.unwrap();
    config_center::migrate(&pool).await.unwrap();
    gateway.run(p).await.unwrap();
    config_center::migrate(&pool).await.unwrap();
}
