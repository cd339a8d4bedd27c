//! Postgres: fresh databases on the shared server, and a server that restarts.

use harness::Postgres;
use sqlx::{Connection as _, PgConnection};

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .expect("a connection to the harness Postgres")
}

#[tokio::test]
async fn fresh_database_accepts_tables_and_rows() {
    let url = Postgres::shared()
        .fresh_database("proof-rows")
        .expect("a fresh database");
    let mut con = connect(&url).await;

    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut con)
        .await
        .expect("current_database()");
    assert!(url.ends_with(&format!("/{name}")), "{url} vs {name}");
    assert!(name.starts_with("proof_rows_"), "{name}");

    sqlx::query("CREATE TABLE jobs (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL)")
        .execute(&mut con)
        .await
        .expect("CREATE TABLE");
    sqlx::query("INSERT INTO jobs (name) VALUES ($1), ($2)")
        .bind("nightly-report")
        .bind("hourly-sync")
        .execute(&mut con)
        .await
        .expect("INSERT");
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM jobs ORDER BY id")
        .fetch_all(&mut con)
        .await
        .expect("SELECT");
    assert_eq!(names, ["nightly-report", "hourly-sync"]);
}

#[tokio::test]
async fn fresh_databases_are_isolated_from_each_other() {
    let pg = Postgres::shared();
    let first = pg.fresh_database("proof_iso").expect("a fresh database");
    let second = pg
        .fresh_database("proof_iso")
        .expect("another fresh database");
    assert_ne!(first, second);

    sqlx::query("CREATE TABLE only_here (x INT)")
        .execute(&mut connect(&first).await)
        .await
        .expect("CREATE TABLE");
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('only_here')::text")
        .fetch_one(&mut connect(&second).await)
        .await
        .expect("to_regclass");
    assert_eq!(exists, None);
}

#[tokio::test]
async fn restarted_postgres_keeps_committed_rows() {
    let pg = Postgres::start().expect("a Postgres");
    let url = pg
        .fresh_database("proof_restart")
        .expect("a fresh database");
    {
        let mut con = connect(&url).await;
        sqlx::query("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT)")
            .execute(&mut con)
            .await
            .expect("CREATE TABLE");
        sqlx::query("INSERT INTO kv VALUES ('answer', '42')")
            .execute(&mut con)
            .await
            .expect("INSERT");
        // The connection stays open across the restart: fast shutdown must not wait for it.
        pg.restart().expect("restart");
        assert!(
            sqlx::query("SELECT 1").execute(&mut con).await.is_err(),
            "the old connection was closed by the restart"
        );
    }

    let v: String = sqlx::query_scalar("SELECT v FROM kv WHERE k = 'answer'")
        .fetch_one(&mut connect(&url).await)
        .await
        .expect("SELECT after restart");
    assert_eq!(v, "42");
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'proof_restart%'"
        )
        .expect("psql")
        .trim(),
        "1"
    );
}
