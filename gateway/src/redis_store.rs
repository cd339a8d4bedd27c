//! The shared Redis connection (standalone or Cluster), one per instance.
//!
//! Connects lazily and reconnects by itself: an instance starts while Redis is away, the
//! features that need Redis answer 503 meanwhile, and recover once it is back.
//!
//! A connection on which a command times out is given up ([`RedisHandle::give_up`]) and
//! the next caller makes a new one. The connection manager reconnects by itself only when
//! the connection is reset or closed; one that a failover left silent (the old host gone
//! behind a VIP, nothing answering and no reset) would otherwise be kept, with every
//! command on it timing out, for as long as the kernel retransmits (about 15 minutes).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
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

impl RedisError {
    /// Whether the command got no answer in time (ours, `redis.command_timeout`, or the
    /// client's own response timeout).
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::Timeout => true,
            Self::Redis(e) => e.is_timeout(),
            Self::Url | Self::UnexpectedReply => false,
        }
    }
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
    /// The connection in use, read without a lock by every command.
    current: Arc<ArcSwapOption<Leased>>,
    /// Held while a connection is made, so that callers make one between them.
    connecting: Arc<Mutex<()>>,
    /// The generation of the last connection made: each new one gets the next.
    made: Arc<AtomicU64>,
}

/// A connection and its generation, which [`RedisHandle::give_up`] names so that giving
/// up an old connection never drops a newer one another caller has made since.
#[derive(Clone)]
pub struct Leased {
    /// Which connection of this handle it is.
    pub generation: u64,
    /// The connection.
    pub conn: RedisConn,
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
            current: Arc::new(ArcSwapOption::empty()),
            connecting: Arc::new(Mutex::new(())),
            made: Arc::new(AtomicU64::new(0)),
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
    pub async fn connection(&self) -> Result<Leased, RedisError> {
        if let Some(leased) = self.current.load_full() {
            return Ok(Leased::clone(&leased));
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let _making = tokio::time::timeout_at(deadline, self.connecting.lock())
            .await
            .map_err(|_| RedisError::Timeout)?;
        // made by the caller this one waited for
        if let Some(leased) = self.current.load_full() {
            return Ok(Leased::clone(&leased));
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
        let leased = Leased {
            generation: self.made.fetch_add(1, Ordering::Relaxed) + 1,
            conn,
        };
        self.current.store(Some(Arc::new(leased.clone())));
        Ok(leased)
    }

    /// Gives up connection `generation`, on which a command timed out: the next caller
    /// makes a new one. Nothing happens when a newer connection has replaced it already.
    /// Counted in `portcullis_redis_connections_given_up_total`.
    pub fn give_up(&self, generation: u64) {
        let current = self.current.load();
        let Some(leased) = current.as_ref() else {
            return;
        };
        if leased.generation != generation {
            return;
        }
        let previous = self.current.compare_and_swap(&*current, None);
        // unless another caller gave it up first
        if previous
            .as_ref()
            .is_some_and(|p| p.generation == generation)
        {
            metrics::counter!("portcullis_redis_connections_given_up_total").increment(1);
            tracing::warn!(
                timeout = ?self.timeout,
                "a Redis command timed out; giving up its connection, the next command \
                 connects again (a failover may have left it silent)"
            );
        }
    }

    /// One command over the shared connection (made on first use), within
    /// `redis.command_timeout`.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let Leased { generation, conn } = self.connection().await?;
        self.within(generation, async move {
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
        let Leased { generation, conn } = self.connection().await?;
        self.within(generation, async move {
            match conn {
                RedisConn::Single(mut c) => invocation.invoke_async(&mut c).await,
                RedisConn::Cluster(mut c) => invocation.invoke_async(&mut c).await,
            }
        })
        .await
    }

    /// `fut` on connection `generation`, within `redis.command_timeout`; the connection is
    /// given up when it times out.
    async fn within<T>(
        &self,
        generation: u64,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisError> {
        let error = match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => RedisError::Redis(e),
            Err(_) => RedisError::Timeout,
        };
        if error.is_timeout() {
            self.give_up(generation);
        }
        Err(error)
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
