//! The shared Redis connection.
//!
//! Connects lazily and reconnects by itself: an instance starts while Redis is away, the
//! features that need Redis answer 503 meanwhile, and recover once it is back.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
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

/// A lazily connected, self-healing Redis connection.
#[derive(Clone)]
pub struct RedisHandle {
    client: redis::Client,
    timeout: Duration,
    conn: Arc<Mutex<Option<ConnectionManager>>>,
}

impl std::fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // the client holds the URL, which may hold a password
        f.debug_struct("RedisHandle").finish_non_exhaustive()
    }
}

impl RedisHandle {
    /// Parses the URL; does not connect.
    pub fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        let client =
            redis::Client::open(config.url.expose_secret()).map_err(|_| RedisError::Url)?;
        Ok(Self {
            client,
            timeout: config.command_timeout,
            conn: Arc::new(Mutex::new(None)),
        })
    }

    /// A connection, establishing it on first use.
    pub async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let manager = tokio::time::timeout(
            self.timeout,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| RedisError::Timeout)??;
        *guard = Some(manager.clone());
        Ok(manager)
    }

    /// One round trip, for readiness.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = self.connection().await?;
        let pong: String =
            tokio::time::timeout(self.timeout, redis::cmd("PING").query_async(&mut conn))
                .await
                .map_err(|_| RedisError::Timeout)??;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(RedisError::UnexpectedReply)
        }
    }
}
