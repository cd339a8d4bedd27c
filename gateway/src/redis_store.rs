//! The shared Redis connection (standalone or Cluster), one per instance.
//!
//! Connects lazily and reconnects by itself: an instance starts while Redis is away, the
//! features that need Redis answer 503 meanwhile, and recover once it is back.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use secrecy::ExposeSecret;
use tokio::sync::Mutex;

use crate::config::RedisConfig;

/// Redis failures.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL does not parse (never shown: it may hold a password).
    #[error("redis.url does not parse")]
    Url,
    /// Connecting or a command failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis answered something that is not what the command returns.
    #[error("redis answered unexpectedly")]
    UnexpectedReply,
    /// A command took longer than `redis.command_timeout`.
    #[error("redis command timed out")]
    Timeout,
}

/// A live connection of either kind; both reconnect by themselves once established.
#[derive(Clone)]
pub enum RedisConn {
    /// A standalone server.
    Single(ConnectionManager),
    /// A cluster.
    Cluster(ClusterConnection),
}

#[derive(Clone)]
enum Client {
    Single(redis::Client),
    // boxed: a cluster client is more than twice the size of a standalone one
    Cluster(Box<ClusterClient>),
}

/// A lazily connected, self-healing Redis connection.
#[derive(Clone)]
pub struct RedisHandle {
    client: Client,
    timeout: Duration,
    conn: Arc<Mutex<Option<RedisConn>>>,
}

impl std::fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // the client holds the URL, which may hold a password
        f.debug_struct("RedisHandle").finish_non_exhaustive()
    }
}

impl RedisHandle {
    /// Parses the URL(s); does not connect.
    pub fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        let url = config.url.expose_secret();
        let client = if config.cluster {
            let seeds: Vec<&str> = url.split(',').map(str::trim).collect();
            Client::Cluster(Box::new(
                ClusterClient::builder(seeds)
                    .connection_timeout(config.command_timeout)
                    .response_timeout(config.command_timeout)
                    .build()
                    .map_err(|_| RedisError::Url)?,
            ))
        } else {
            Client::Single(redis::Client::open(url).map_err(|_| RedisError::Url)?)
        };
        Ok(Self {
            client,
            timeout: config.command_timeout,
            conn: Arc::new(Mutex::new(None)),
        })
    }

    /// How long one command may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A connection, establishing it on first use. Waiting for another caller's attempt
    /// counts against the same `redis.command_timeout` as this one's own: while Redis
    /// cannot be reached, callers do not queue behind one another's attempts for a
    /// timeout each, they answer 503 within one.
    pub async fn connection(&self) -> Result<RedisConn, RedisError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut guard = tokio::time::timeout_at(deadline, self.conn.lock())
            .await
            .map_err(|_| RedisError::Timeout)?;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let conn = match &self.client {
            Client::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1);
                let manager = tokio::time::timeout_at(
                    deadline,
                    ConnectionManager::new_with_config(client.clone(), config),
                )
                .await
                .map_err(|_| RedisError::Timeout)??;
                RedisConn::Single(manager)
            }
            Client::Cluster(client) => {
                let conn = tokio::time::timeout_at(deadline, client.get_async_connection())
                    .await
                    .map_err(|_| RedisError::Timeout)??;
                RedisConn::Cluster(conn)
            }
        };
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// One command over the shared connection (made on first use), within
    /// `redis.command_timeout`.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let conn = self.connection().await?;
        self.within(async move {
            match conn {
                RedisConn::Single(mut c) => cmd.query_async(&mut c).await,
                RedisConn::Cluster(mut c) => cmd.query_async(&mut c).await,
            }
        })
        .await
    }

    /// One script over the shared connection (sent by its hash, loaded when Redis lacks
    /// it), within `redis.command_timeout`.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        let conn = self.connection().await?;
        self.within(async move {
            match conn {
                RedisConn::Single(mut c) => invocation.invoke_async(&mut c).await,
                RedisConn::Cluster(mut c) => invocation.invoke_async(&mut c).await,
            }
        })
        .await
    }

    async fn within<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisError> {
        Ok(tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| RedisError::Timeout)??)
    }

    /// One round trip, for readiness.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let pong: String = self.query(&redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(RedisError::UnexpectedReply)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A Redis that accepts connections and never answers (a host gone behind a
    /// balancer, a dropped route): callers waiting on one another's connection attempt
    /// each answer within one timeout, not one timeout per caller ahead of them.
    #[tokio::test]
    async fn callers_fail_within_one_timeout_however_many_wait_for_a_connection() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        // keep what connects, answer nothing
        let _held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let timeout = Duration::from_millis(300);
        let handle = RedisHandle::new(&RedisConfig {
            url: secrecy::SecretString::from(format!("redis://{addr}")),
            cluster: false,
            command_timeout: timeout,
        })
        .unwrap();
        let started = tokio::time::Instant::now();
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let handle = handle.clone();
                tokio::spawn(async move {
                    let result = handle.connection().await.map(|_| ());
                    (result, started.elapsed())
                })
            })
            .collect();
        for caller in callers {
            let (result, took) = caller.await.unwrap();
            assert!(result.is_err());
            assert!(took < timeout * 3, "a caller waited {took:?}");
        }
    }
}
