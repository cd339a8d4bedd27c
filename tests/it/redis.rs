//! Redis: single server (shared and persistent) and a three-master cluster.

use futures::StreamExt as _;
use harness::{Redis, RedisCluster};
use redis::AsyncCommands as _;

async fn connection(redis: &Redis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("a valid redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("a connection to the harness Redis")
}

#[tokio::test]
async fn set_get_and_lua_eval_round_trip() {
    let mut con = connection(Redis::shared()).await;

    let _: () = con
        .set("proof:set_get:greeting", "hello")
        .await
        .expect("SET");
    let got: String = con.get("proof:set_get:greeting").await.expect("GET");
    assert_eq!(got, "hello");

    let script = redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1]) * 2");
    let doubled: i64 = script
        .key("proof:set_get:counter")
        .arg(21)
        .invoke_async(&mut con)
        .await
        .expect("EVALSHA/EVAL");
    assert_eq!(doubled, 42);
}

#[tokio::test]
async fn publish_reaches_a_subscriber() {
    let redis = Redis::shared();
    let client = redis::Client::open(redis.url()).expect("a valid redis URL");
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .expect("a pubsub connection");
    pubsub
        .subscribe("proof:pubsub:channel")
        .await
        .expect("SUBSCRIBE");

    let mut con = connection(redis).await;
    let receivers: i64 = con
        .publish("proof:pubsub:channel", "ping")
        .await
        .expect("PUBLISH");
    assert_eq!(receivers, 1, "one subscriber is listening");

    let message = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        pubsub.on_message().next(),
    )
    .await
    .expect("a message within the deadline")
    .expect("the subscription stays open");
    assert_eq!(message.get_channel_name(), "proof:pubsub:channel");
    assert_eq!(
        message.get_payload::<String>().expect("a text payload"),
        "ping"
    );
}

#[tokio::test]
async fn persistent_redis_keeps_data_across_restart() {
    let redis = Redis::start_persistent().expect("a persistent Redis");
    let port = redis.port();
    {
        let mut con = connection(&redis).await;
        let _: () = con.set("survivor", "still here").await.expect("SET");
    }

    redis.restart().expect("restart");

    assert_eq!(redis.port(), port, "restart keeps the port");
    let mut con = connection(&redis).await;
    let got: Option<String> = con.get("survivor").await.expect("GET");
    assert_eq!(got.as_deref(), Some("still here"));
}

#[tokio::test]
async fn plain_redis_forgets_data_across_restart() {
    let redis = Redis::start().expect("a Redis");
    {
        let mut con = connection(&redis).await;
        let _: () = con.set("ephemeral", "gone soon").await.expect("SET");
    }

    redis.restart().expect("restart");

    let mut con = connection(&redis).await;
    let got: Option<String> = con.get("ephemeral").await.expect("GET");
    assert_eq!(got, None);
}

#[tokio::test]
async fn three_master_cluster_serves_keys_in_every_slot_range() {
    let cluster = RedisCluster::start(3).expect("a 3-master cluster");
    assert_eq!(cluster.urls().len(), 3);

    let mut node = connection(&cluster.nodes()[0]).await;
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut node)
        .await
        .expect("CLUSTER INFO");
    assert!(info.contains("cluster_state:ok"), "{info}");
    assert!(info.contains("cluster_size:3"), "{info}");

    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("a cluster client");
    let mut con = client
        .get_async_connection()
        .await
        .expect("a cluster connection");
    // Enough keys to land on all three masters' slot ranges.
    for i in 0..30 {
        let _: () = con
            .set(format!("proof:cluster:{i}"), i)
            .await
            .expect("SET through the cluster");
    }
    for i in 0..30 {
        let got: i64 = con
            .get(format!("proof:cluster:{i}"))
            .await
            .expect("GET through the cluster");
        assert_eq!(got, i);
    }
    let mut keys_per_node = Vec::new();
    for node in cluster.nodes() {
        let mut con = connection(node).await;
        let n: i64 = redis::cmd("DBSIZE")
            .query_async(&mut con)
            .await
            .expect("DBSIZE");
        keys_per_node.push(n);
    }
    assert_eq!(keys_per_node.iter().sum::<i64>(), 30);
    assert!(
        keys_per_node.iter().all(|&n| n > 0),
        "every master holds keys: {keys_per_node:?}"
    );
}
