//! Readiness against real Postgres and Redis: ready when both answer, degraded (503) when
//! Redis goes away, ready again on its own when it is back.

use std::time::Duration;

use harness::{Postgres, Redis};
use secrecy::SecretString;

use super::support::*;

async fn ready(admin: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn readiness_follows_postgres_and_redis() {
    let pg = Postgres::shared();
    let db = pg.fresh_database("readiness").unwrap();
    let redis = Redis::start().unwrap();
    let redis_url = redis.url();
    let app = spawn_app(move |c| {
        c.database.url = SecretString::from(db);
        c.redis = Some(portcullis::config::RedisConfig {
            url: SecretString::from(redis_url),
            cluster: false,
            command_timeout: Duration::from_millis(500),
        });
    })
    .await;

    eventually(
        Duration::from_secs(15),
        "ready with postgres and redis",
        || async { ready(app.admin).await.0 == 200 },
    )
    .await;
    let (_, body) = ready(app.admin).await;
    assert_eq!(body["checks"]["database"]["ok"], true);
    assert_eq!(body["checks"]["redis"]["ok"], true);

    redis.stop();
    eventually(
        Duration::from_secs(15),
        "degraded without redis",
        || async {
            let (status, body) = ready(app.admin).await;
            status == 503 && body["checks"]["redis"]["ok"] == false
        },
    )
    .await;
    let (_, body) = ready(app.admin).await;
    assert_eq!(
        body["checks"]["database"]["ok"], true,
        "only redis is affected"
    );

    redis.restart().unwrap();
    eventually(
        Duration::from_secs(20),
        "ready again after redis returns",
        || async { ready(app.admin).await.0 == 200 },
    )
    .await;
}
