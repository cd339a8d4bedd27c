//! The Redis store: standalone (through a `ConnectionManager`) or Redis Cluster. Layout and
//! scripts are described in the module docs of [`crate::refresh`].

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, Script, ScriptInvocation};
use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;

use super::token::{FamilyId, Minted, Presented};
use super::{
    GC_MARGIN, InvalidReason, Issued, NewFamily, Record, RefreshError, RefreshSettings,
    RefreshStore, Refreshed, Session, duration_ms, to_ms,
};
use crate::server_key::ServerKey;

/// How long one store operation may take by default, Redis round trips included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Creates a family unless the id is taken. KEYS[1] family; ARGV[1] TTL ms; ARGV[2..]
/// field, value, …
const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
";

/// Adds a family id to an index set and makes the set live at least ARGV[2] ms more.
const INDEX_ADD: &str = r"
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
";

/// Deletes a family, if ARGV[1] == '1' only when its client is ARGV[2]. Returns
/// {'none'}, {'client'} or {'revoked', subject, client}.
const REVOKE: &str = r"
local f = redis.call('HMGET', KEYS[1], 'sub', 'client')
if not f[1] then return {'none'} end
if ARGV[1] == '1' and f[2] ~= ARGV[2] then return {'client'} end
redis.call('DEL', KEYS[1])
return {'revoked', f[1], f[2]}
";

/// A refresh-token store on Redis (standalone or Cluster).
#[derive(Clone)]
pub struct RedisRefreshStore {
    conn: Conn,
    key: ServerKey,
    settings: RefreshSettings,
    timeout: Duration,
    scripts: Scripts,
}

#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

#[derive(Clone)]
struct Scripts {
    refresh: Script,
    create: Script,
    index_add: Script,
    revoke: Script,
}

/// How a revocation script ended.
enum Revocation {
    None,
    WrongClient,
    Done,
}

impl std::fmt::Debug for RedisRefreshStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.conn {
            Conn::Standalone(_) => "standalone",
            Conn::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisRefreshStore")
            .field("redis", &kind)
            .field("settings", &self.settings)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

// === impl RedisRefreshStore ===

impl RedisRefreshStore {
    /// A store on a standalone Redis connection (reconnects by itself).
    pub fn standalone(conn: ConnectionManager, key: ServerKey, settings: RefreshSettings) -> Self {
        Self::build(Conn::Standalone(conn), key, settings)
    }

    /// A store on a Redis Cluster connection.
    pub fn cluster(conn: ClusterConnection, key: ServerKey, settings: RefreshSettings) -> Self {
        Self::build(Conn::Cluster(conn), key, settings)
    }

    /// Connects to a standalone Redis at `url`, with [`DEFAULT_TIMEOUT`] for connecting and
    /// for every response.
    pub async fn connect(
        url: &SecretString,
        key: ServerKey,
        settings: RefreshSettings,
    ) -> Result<Self, RefreshError> {
        let client = redis::Client::open(url.expose_secret()).map_err(RefreshError::Unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(DEFAULT_TIMEOUT))
            .set_response_timeout(Some(DEFAULT_TIMEOUT))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            DEFAULT_TIMEOUT,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| RefreshError::Timeout)?
        .map_err(RefreshError::Unavailable)?;
        Ok(Self::standalone(conn, key, settings))
    }

    /// Connects to a Redis Cluster through any of `urls`.
    pub async fn connect_cluster(
        urls: &[SecretString],
        key: ServerKey,
        settings: RefreshSettings,
    ) -> Result<Self, RefreshError> {
        let client = redis::cluster::ClusterClient::builder(
            urls.iter().map(|u| u.expose_secret().to_owned()),
        )
        .connection_timeout(DEFAULT_TIMEOUT)
        .response_timeout(DEFAULT_TIMEOUT)
        .build()
        .map_err(RefreshError::Unavailable)?;
        let conn = tokio::time::timeout(DEFAULT_TIMEOUT, client.get_async_connection())
            .await
            .map_err(|_| RefreshError::Timeout)?
            .map_err(RefreshError::Unavailable)?;
        Ok(Self::cluster(conn, key, settings))
    }

    /// Bounds every store operation (all its round trips) by `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn build(conn: Conn, key: ServerKey, settings: RefreshSettings) -> Self {
        Self {
            conn,
            key,
            settings,
            timeout: DEFAULT_TIMEOUT,
            scripts: Scripts {
                refresh: Script::new(include_str!("refresh.lua")),
                create: Script::new(CREATE),
                index_add: Script::new(INDEX_ADD),
                revoke: Script::new(REVOKE),
            },
        }
    }

    fn family_key(&self, family: &FamilyId) -> String {
        format!("{}fam:{{{family}}}", self.settings.key_prefix)
    }

    fn subject_key(&self, subject: &str) -> String {
        format!("{}sub:{subject}", self.settings.key_prefix)
    }

    fn client_key(&self, client_id: &str) -> String {
        format!("{}client:{client_id}", self.settings.key_prefix)
    }

    /// Runs `op` against the connection, bounded by the store's timeout.
    async fn bounded<T, F>(&self, op: F) -> Result<T, RefreshError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.timeout, op).await {
            Err(_) => Err(RefreshError::Timeout),
            Ok(Err(e)) => Err(RefreshError::Unavailable(e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    async fn script<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, RefreshError> {
        let mut conn = self.conn.clone();
        self.bounded(async move {
            match &mut conn {
                Conn::Standalone(c) => invocation.invoke_async(c).await,
                Conn::Cluster(c) => invocation.invoke_async(c).await,
            }
        })
        .await
    }

    async fn command<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RefreshError> {
        let mut conn = self.conn.clone();
        self.bounded(async move {
            match &mut conn {
                Conn::Standalone(c) => cmd.query_async(c).await,
                Conn::Cluster(c) => cmd.query_async(c).await,
            }
        })
        .await
    }

    async fn index_add(&self, index: &str, family: &FamilyId) -> Result<(), RefreshError> {
        let ttl = self
            .settings
            .absolute_ms()
            .saturating_add(duration_ms(GC_MARGIN));
        self.script::<i64>(
            self.scripts
                .index_add
                .key(index)
                .arg(family.as_str())
                .arg(ttl),
        )
        .await
        .map(drop)
    }

    async fn index_remove(&self, index: &str, family: &FamilyId) -> Result<(), RefreshError> {
        self.command::<i64>(redis::cmd("SREM").arg(index).arg(family.as_str()))
            .await
            .map(drop)
    }

    /// Index removal after a family is gone: a failure only leaves a stale id, which
    /// readers drop, so it is logged and not reported.
    async fn unindex(&self, family: &FamilyId, subject: &str, client_id: &str) {
        for index in [self.subject_key(subject), self.client_key(client_id)] {
            if let Err(e) = self.index_remove(&index, family).await {
                tracing::warn!(%family, error = %e, "stale refresh-token index entry left behind");
            }
        }
    }

    /// The family's record, `None` when it does not exist.
    async fn load(&self, family: &FamilyId) -> Result<Option<Record>, RefreshError> {
        let fields: HashMap<String, String> = self
            .command(redis::cmd("HGETALL").arg(self.family_key(family)))
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        Record::from_fields(fields).map(Some)
    }

    async fn revoke(
        &self,
        family: &FamilyId,
        client_id: Option<&str>,
    ) -> Result<Revocation, RefreshError> {
        let reply: Vec<String> = self
            .script(
                self.scripts
                    .revoke
                    .key(self.family_key(family))
                    .arg(if client_id.is_some() { "1" } else { "0" })
                    .arg(client_id.unwrap_or("")),
            )
            .await?;
        let mut reply = reply.into_iter();
        let outcome = match (reply.next().as_deref(), reply.next(), reply.next()) {
            (Some("none"), ..) => Revocation::None,
            (Some("client"), ..) => Revocation::WrongClient,
            (Some("revoked"), Some(subject), Some(client_id)) => {
                self.unindex(family, &subject, &client_id).await;
                Revocation::Done
            }
            _ => {
                return Err(RefreshError::Internal(
                    "unexpected reply from the revoke script",
                ));
            }
        };
        Ok(outcome)
    }

    /// Revokes every family listed in `index`; drops ids whose family is gone.
    async fn revoke_index(&self, index: String) -> Result<usize, RefreshError> {
        let ids: Vec<String> = self.command(redis::cmd("SMEMBERS").arg(&index)).await?;
        let mut count = 0;
        for id in ids {
            let Ok(family) = FamilyId::parse(&id) else {
                self.command::<i64>(redis::cmd("SREM").arg(&index).arg(&id))
                    .await?;
                continue;
            };
            match self.revoke(&family, None).await? {
                Revocation::Done => count += 1,
                Revocation::None | Revocation::WrongClient => {
                    self.index_remove(&index, &family).await?
                }
            }
        }
        Ok(count)
    }
}

#[async_trait]
impl RefreshStore for RedisRefreshStore {
    #[tracing::instrument(skip_all, fields(client_id = %family.client_id))]
    async fn issue(&self, family: NewFamily, now: OffsetDateTime) -> Result<Issued, RefreshError> {
        let id = FamilyId::generate()?;
        let first = Minted::new(&self.key, id.clone())?;
        let now = to_ms(now);
        let record = Record::new(family, first.hash.clone(), now, &self.settings);
        let session = record.session(&id)?;
        let (subject_key, client_key) = (
            self.subject_key(&record.subject),
            self.client_key(&record.client_id),
        );
        // Indexed before it exists: a failure in between leaves a stale id, never a family
        // that "sign out everywhere" cannot find.
        self.index_add(&subject_key, &id).await?;
        self.index_add(&client_key, &id).await?;
        let ttl = record
            .abs_exp
            .min(record.idle_exp)
            .saturating_sub(now)
            .max(0)
            .saturating_add(duration_ms(GC_MARGIN));
        let mut create = self.scripts.create.key(self.family_key(&id));
        create.arg(ttl);
        for (field, value) in record.to_fields()? {
            create.arg(field).arg(value);
        }
        let created: i64 = self.script(&create).await?;
        if created != 1 {
            return Err(RefreshError::Internal("family id collision"));
        }
        // Again after: a concurrent reader may have pruned the id while the family did not
        // exist yet.
        self.index_add(&subject_key, &id).await?;
        self.index_add(&client_key, &id).await?;
        Ok(Issued {
            token: first.token(&self.key),
            session,
        })
    }

    #[tracing::instrument(skip_all, fields(client_id = %client_id))]
    async fn refresh_with_grace(
        &self,
        presented: &SecretString,
        client_id: &str,
        now: OffsetDateTime,
        min_grace: Duration,
    ) -> Result<Refreshed, RefreshError> {
        let presented = Presented::parse(&self.key, presented.expose_secret())?;
        let hash = presented.hash(&self.key);
        let (next, wrap) = presented.successor(&self.key)?;
        let now = to_ms(now);
        let idle_exp = now.saturating_add(self.settings.idle_ms());
        let reply: (String, String, HashMap<String, String>) = self
            .script(
                self.scripts
                    .refresh
                    .key(self.family_key(&presented.family))
                    .arg(&hash)
                    .arg(client_id)
                    .arg(now)
                    .arg(self.settings.grace_ms(min_grace))
                    .arg(idle_exp)
                    .arg(&next.hash)
                    .arg(&wrap)
                    .arg(duration_ms(GC_MARGIN)),
            )
            .await?;
        match (reply.0.as_str(), reply.1.as_str()) {
            ("rotated", _) => Ok(Refreshed {
                token: next.token(&self.key),
                session: Record::from_fields(reply.2)?.session(&presented.family)?,
                replayed: false,
            }),
            ("replay", _) => {
                let record = Record::from_fields(reply.2)?;
                Ok(Refreshed {
                    token: presented.unwrap_successor(&self.key, &record.wrap)?,
                    session: record.session(&presented.family)?,
                    replayed: true,
                })
            }
            ("reused", _) => {
                let mut fields = reply.2;
                let subject = fields.remove("sub").unwrap_or_default();
                let client_id = fields.remove("client").unwrap_or_default();
                self.unindex(&presented.family, &subject, &client_id).await;
                Err(RefreshError::Reused {
                    family: presented.family,
                    subject,
                    client_id,
                })
            }
            ("invalid", "client") => Err(RefreshError::Invalid(InvalidReason::WrongClient)),
            ("invalid", "expired") => Err(RefreshError::Invalid(InvalidReason::Expired)),
            ("invalid", _) => Err(RefreshError::Invalid(InvalidReason::Unknown)),
            _ => Err(RefreshError::Internal(
                "unexpected reply from the refresh script",
            )),
        }
    }

    #[tracing::instrument(skip_all)]
    async fn inspect(
        &self,
        presented: &SecretString,
        now: OffsetDateTime,
    ) -> Result<Option<Session>, RefreshError> {
        let Ok(presented) = Presented::parse(&self.key, presented.expose_secret()) else {
            return Ok(None);
        };
        let hash = presented.hash(&self.key);
        match self.load(&presented.family).await? {
            Some(record) if record.alive(to_ms(now)) && record.cur == hash => {
                record.session(&presented.family).map(Some)
            }
            _ => Ok(None),
        }
    }

    #[tracing::instrument(skip_all, fields(%family))]
    async fn live_family(
        &self,
        family: &FamilyId,
        now: OffsetDateTime,
    ) -> Result<Option<Session>, RefreshError> {
        match self.load(family).await? {
            Some(record) if record.alive(to_ms(now)) => record.session(family).map(Some),
            _ => Ok(None),
        }
    }

    #[tracing::instrument(skip_all)]
    async fn list_sessions(
        &self,
        subject: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<Session>, RefreshError> {
        let index = self.subject_key(subject);
        let ids: Vec<String> = self.command(redis::cmd("SMEMBERS").arg(&index)).await?;
        let now = to_ms(now);
        let mut sessions = Vec::new();
        for id in ids {
            let Ok(family) = FamilyId::parse(&id) else {
                self.command::<i64>(redis::cmd("SREM").arg(&index).arg(&id))
                    .await?;
                continue;
            };
            match self.load(&family).await? {
                Some(record) if record.subject == subject => {
                    if record.alive(now) {
                        sessions.push(record.session(&family)?);
                    }
                }
                // gone (revoked, re-used, collected) or not this subject's: a stale entry
                _ => self.index_remove(&index, &family).await?,
            }
        }
        sessions.sort_by(|a, b| (a.created_at, &a.family).cmp(&(b.created_at, &b.family)));
        Ok(sessions)
    }

    #[tracing::instrument(skip_all, fields(client_id = %client_id))]
    async fn revoke_token(
        &self,
        presented: &SecretString,
        client_id: &str,
    ) -> Result<bool, RefreshError> {
        let Ok(presented) = Presented::parse(&self.key, presented.expose_secret()) else {
            return Ok(false);
        };
        match self.revoke(&presented.family, Some(client_id)).await? {
            Revocation::None => Ok(false),
            Revocation::WrongClient => Err(RefreshError::Invalid(InvalidReason::WrongClient)),
            Revocation::Done => Ok(true),
        }
    }

    #[tracing::instrument(skip_all, fields(%family))]
    async fn revoke_family(&self, family: &FamilyId) -> Result<bool, RefreshError> {
        Ok(matches!(self.revoke(family, None).await?, Revocation::Done))
    }

    #[tracing::instrument(skip_all)]
    async fn revoke_subject(&self, subject: &str) -> Result<usize, RefreshError> {
        self.revoke_index(self.subject_key(subject)).await
    }

    #[tracing::instrument(skip_all, fields(client_id = %client_id))]
    async fn revoke_client(&self, client_id: &str) -> Result<usize, RefreshError> {
        self.revoke_index(self.client_key(client_id)).await
    }
}
