//! A Redis store that connects on first use, so an instance starts while Redis is away:
//! until it connects, every call answers [`RefreshError::Unavailable`] (503) and the next
//! call tries again. Once connected, the connection manager reconnects by itself when the
//! connection is reset; one on which a call timed out is given up and the next call
//! connects again (a connection a failover left silent is never reset).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use secrecy::SecretString;
use time::OffsetDateTime;

use super::{
    FamilyId, Issued, NewFamily, RedisRefreshStore, RefreshError, RefreshSettings, RefreshStore,
    Refreshed, Session,
};
use crate::redis_store::{Leased, RedisConn, RedisError, RedisHandle};
use crate::server_key::ServerKey;

/// [`RedisRefreshStore`] on the instance's shared Redis connection, made on first use and
/// made again on the next connection once a command timed out on this one
/// ([`RedisHandle::give_up`]).
pub struct LazyRedisRefreshStore {
    redis: RedisHandle,
    key: ServerKey,
    settings: RefreshSettings,
    store: ArcSwapOption<OnConnection>,
}

/// The store on one connection of the handle.
struct OnConnection {
    generation: u64,
    store: RedisRefreshStore,
}

impl std::fmt::Debug for LazyRedisRefreshStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRedisRefreshStore")
            .field("connected", &self.store.load().is_some())
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
            store: ArcSwapOption::empty(),
        }
    }

    /// The store on the handle's connection in use.
    async fn store(&self) -> Result<Arc<OnConnection>, RefreshError> {
        let Leased { generation, conn } = self.redis.connection().await.map_err(|e| match e {
            RedisError::Redis(e) => RefreshError::Unavailable(e),
            RedisError::Timeout => RefreshError::Timeout,
            RedisError::Url | RedisError::UnexpectedReply => {
                RefreshError::Internal("redis connection")
            }
        })?;
        if let Some(on) = self.store.load_full()
            && on.generation == generation
        {
            return Ok(on);
        }
        let (key, settings) = (self.key.clone(), self.settings.clone());
        let store = match conn {
            RedisConn::Single(c) => RedisRefreshStore::standalone(c, key, settings),
            RedisConn::Cluster(c) => RedisRefreshStore::cluster(c, key, settings),
        };
        let on = Arc::new(OnConnection {
            generation,
            store: store.with_timeout(self.redis.timeout()),
        });
        self.store.store(Some(Arc::clone(&on)));
        Ok(on)
    }

    /// `op` on the store; its connection is given up when `op` timed out.
    async fn on<T, F, Fut>(&self, op: F) -> Result<T, RefreshError>
    where
        F: FnOnce(Arc<OnConnection>) -> Fut,
        Fut: Future<Output = Result<T, RefreshError>>,
    {
        let on = self.store().await?;
        let generation = on.generation;
        let result = op(on).await;
        let timed_out = match &result {
            Err(RefreshError::Timeout) => true,
            Err(RefreshError::Unavailable(e)) => e.is_timeout(),
            _ => false,
        };
        if timed_out {
            self.redis.give_up(generation);
        }
        result
    }
}

#[async_trait]
impl RefreshStore for LazyRedisRefreshStore {
    async fn issue(&self, family: NewFamily, now: OffsetDateTime) -> Result<Issued, RefreshError> {
        self.on(|on| async move { on.store.issue(family, now).await })
            .await
    }

    async fn refresh_with_grace(
        &self,
        presented: &SecretString,
        client_id: &str,
        now: OffsetDateTime,
        min_grace: Duration,
    ) -> Result<Refreshed, RefreshError> {
        self.on(|on| async move {
            on.store
                .refresh_with_grace(presented, client_id, now, min_grace)
                .await
        })
        .await
    }

    async fn inspect(
        &self,
        presented: &SecretString,
        now: OffsetDateTime,
    ) -> Result<Option<Session>, RefreshError> {
        self.on(|on| async move { on.store.inspect(presented, now).await })
            .await
    }

    async fn live_family(
        &self,
        family: &FamilyId,
        now: OffsetDateTime,
    ) -> Result<Option<Session>, RefreshError> {
        self.on(|on| async move { on.store.live_family(family, now).await })
            .await
    }

    async fn list_sessions(
        &self,
        subject: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<Session>, RefreshError> {
        self.on(|on| async move { on.store.list_sessions(subject, now).await })
            .await
    }

    async fn revoke_token(
        &self,
        presented: &SecretString,
        client_id: &str,
    ) -> Result<bool, RefreshError> {
        self.on(|on| async move { on.store.revoke_token(presented, client_id).await })
            .await
    }

    async fn revoke_family(&self, family: &FamilyId) -> Result<bool, RefreshError> {
        self.on(|on| async move { on.store.revoke_family(family).await })
            .await
    }

    async fn revoke_subject(&self, subject: &str) -> Result<usize, RefreshError> {
        self.on(|on| async move { on.store.revoke_subject(subject).await })
            .await
    }

    async fn revoke_client(&self, client_id: &str) -> Result<usize, RefreshError> {
        self.on(|on| async move { on.store.revoke_client(client_id).await })
            .await
    }
}
