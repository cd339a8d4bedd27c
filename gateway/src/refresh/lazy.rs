//! A Redis store that connects on first use, so an instance starts while Redis is away:
//! until it connects, every call answers [`RefreshError::Unavailable`] (503) and the next
//! call tries again. Once connected, the connection manager reconnects by itself.

use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::{
    FamilyId, Issued, NewFamily, RedisRefreshStore, RefreshError, RefreshSettings, RefreshStore,
    Refreshed, Session,
};
use crate::redis_store::{RedisConn, RedisError, RedisHandle};
use crate::server_key::ServerKey;

/// [`RedisRefreshStore`] on the instance's shared Redis connection, made on first use.
pub struct LazyRedisRefreshStore {
    redis: RedisHandle,
    key: ServerKey,
    settings: RefreshSettings,
    store: OnceCell<RedisRefreshStore>,
}

impl std::fmt::Debug for LazyRedisRefreshStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRedisRefreshStore")
            .field("connected", &self.store.initialized())
            .finish_non_exhaustive()
    }
}

impl LazyRedisRefreshStore {
    /// Remembers how to connect; does not connect.
    pub fn new(redis: RedisHandle, key: ServerKey, settings: RefreshSettings) -> Self {
        Self {
            redis,
            key,
            settings,
            store: OnceCell::new(),
        }
    }

    async fn store(&self) -> Result<&RedisRefreshStore, RefreshError> {
        self.store
            .get_or_try_init(|| async {
                let conn = self.redis.connection().await.map_err(|e| match e {
                    RedisError::Redis(e) => RefreshError::Unavailable(e),
                    RedisError::Timeout => RefreshError::Timeout,
                    RedisError::Url | RedisError::UnexpectedReply => {
                        RefreshError::Internal("redis connection")
                    }
                })?;
                let (key, settings) = (self.key.clone(), self.settings.clone());
                let store = match conn {
                    RedisConn::Single(c) => RedisRefreshStore::standalone(c, key, settings),
                    RedisConn::Cluster(c) => RedisRefreshStore::cluster(c, key, settings),
                };
                Ok::<_, RefreshError>(store.with_timeout(self.redis.timeout()))
            })
            .await
    }
}

#[async_trait]
impl RefreshStore for LazyRedisRefreshStore {
    async fn issue(&self, family: NewFamily, now: OffsetDateTime) -> Result<Issued, RefreshError> {
        self.store().await?.issue(family, now).await
    }

    async fn refresh_with_grace(
        &self,
        presented: &SecretString,
        client_id: &str,
        now: OffsetDateTime,
        min_grace: Duration,
    ) -> Result<Refreshed, RefreshError> {
        self.store()
            .await?
            .refresh_with_grace(presented, client_id, now, min_grace)
            .await
    }

    async fn inspect(
        &self,
        presented: &SecretString,
        now: OffsetDateTime,
    ) -> Result<Option<Session>, RefreshError> {
        self.store().await?.inspect(presented, now).await
    }

    async fn live_family(
        &self,
        family: &FamilyId,
        now: OffsetDateTime,
    ) -> Result<Option<Session>, RefreshError> {
        self.store().await?.live_family(family, now).await
    }

    async fn list_sessions(
        &self,
        subject: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<Session>, RefreshError> {
        self.store().await?.list_sessions(subject, now).await
    }

    async fn revoke_token(
        &self,
        presented: &SecretString,
        client_id: &str,
    ) -> Result<bool, RefreshError> {
        self.store().await?.revoke_token(presented, client_id).await
    }

    async fn revoke_family(&self, family: &FamilyId) -> Result<bool, RefreshError> {
        self.store().await?.revoke_family(family).await
    }

    async fn revoke_subject(&self, subject: &str) -> Result<usize, RefreshError> {
        self.store().await?.revoke_subject(subject).await
    }

    async fn revoke_client(&self, client_id: &str) -> Result<usize, RefreshError> {
        self.store().await?.revoke_client(client_id).await
    }
}
