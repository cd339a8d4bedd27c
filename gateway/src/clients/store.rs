//! Clients in the database: one SQL text per operation, run on Postgres or SQLite.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;

use super::cache::Lookup;
use super::secret::{self, SecretHashes};
use super::{
    Audience, Client, ClientError, ClientId, ClientRules, ClientUpdate, GrantType, NewClient,
    ScopeSet, validate_audiences, validate_grants, validate_lifetime, validate_name,
};
use crate::db::Database;

/// The id (and name) of the client [`ClientStore::bootstrap_admin`] creates.
pub const ADMIN_CLIENT_ID: &str = "admin";
/// The scope that opens the admin API.
pub const ADMIN_SCOPE: &str = "portcullis:admin";

/// Every column, in [`ClientRow`] order.
const COLUMNS: &str = "id, name, grant_types, scopes, audiences, access_token_lifetime_secs, \
                       enabled, secret_hash, previous_secret_hash, \
                       previous_secret_expires_at_unix_ms, created_at_unix_ms, updated_at_unix_ms";

/// The clients, over the shared database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ClientStore {
    db: Database,
    key: crate::server_key::ServerKey,
    cache: std::sync::Arc<super::cache::ClientCache>,
    rules: Arc<ClientRules>,
}

/// One row as stored.
#[derive(sqlx::FromRow)]
struct ClientRow {
    id: String,
    name: String,
    grant_types: String,
    scopes: String,
    audiences: String,
    access_token_lifetime_secs: Option<i64>,
    enabled: bool,
    secret_hash: Vec<u8>,
    previous_secret_hash: Option<Vec<u8>>,
    previous_secret_expires_at_unix_ms: Option<i64>,
    created_at_unix_ms: i64,
    updated_at_unix_ms: i64,
}

/// A cached client record that refuses credentials is read again only when it is at least
/// this old (see [`ClientStore::authenticate`]).
pub const REREAD_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

// === impl ClientStore ===

impl ClientStore {
    /// A store over `db` (migrated by [`Database::migrate`]), hashing secrets under `key`.
    pub fn new(db: Database, key: crate::server_key::ServerKey) -> Self {
        Self::with_cache_ttl(db, key, std::time::Duration::ZERO)
    }

    /// Like [`Self::new`], keeping client records for `ttl` to spare the database on the
    /// token endpoint's hot path (see [`super::cache`]).
    pub fn with_cache_ttl(
        db: Database,
        key: crate::server_key::ServerKey,
        ttl: std::time::Duration,
    ) -> Self {
        Self {
            db,
            key,
            cache: std::sync::Arc::new(super::cache::ClientCache::new(ttl)),
            rules: Arc::new(ClientRules::default()),
        }
    }

    /// This store, checking new and changed clients against `rules` (from the
    /// configuration: [`ClientRules::from_config`]).
    pub fn with_rules(mut self, rules: ClientRules) -> Self {
        self.rules = Arc::new(rules);
        self
    }

    /// Registers a client and returns it with its secret — the only time the secret is
    /// available: only its hash is stored. [`ClientError::AlreadyExists`] when the id is
    /// taken, [`ClientError::ReservedId`] when the configuration keeps it for console
    /// sessions; [`ClientError::Invalid`] (nothing stored) for bad settings.
    #[tracing::instrument(skip_all, fields(client_id))]
    pub async fn create(
        &self,
        new: NewClient,
        now: OffsetDateTime,
    ) -> Result<(Client, SecretString), ClientError> {
        validate_name(&new.name)?;
        validate_grants(&new.grant_types)?;
        validate_audiences(&new.audiences)?;
        validate_lifetime(new.access_token_lifetime, self.rules.max_lifetime)?;
        let id = match new.id {
            Some(id) if self.rules.reserved_ids.iter().any(|r| r == id.as_str()) => {
                return Err(ClientError::ReservedId(id));
            }
            Some(id) => id,
            None => ClientId::generate()?,
        };
        tracing::Span::current().record("client_id", id.as_str());
        let secret = secret::generate()?;
        let hash = secret::hash_for(&self.key, &id, secret.expose_secret());
        let now_ms = unix_ms(now);
        let grants = GrantType::format_set(&new.grant_types);
        let scopes = new.scopes.to_string();
        let audiences = format_audiences(&new.audiences);
        let lifetime = new.access_token_lifetime.map(lifetime_secs);
        let sql = format!(
            "INSERT INTO oauth_clients ({COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL, $9, $9) RETURNING {COLUMNS}"
        );
        let row: Result<ClientRow, sqlx::Error> = crate::on_pool!(self.db.pool(), |p| {
            sqlx::query_as(&sql)
                .bind(id.as_str())
                .bind(&new.name)
                .bind(&grants)
                .bind(&scopes)
                .bind(&audiences)
                .bind(lifetime)
                .bind(true)
                .bind(&hash[..])
                .bind(now_ms)
                .fetch_one(p)
                .await
        });
        let row = row.map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => ClientError::AlreadyExists,
            _ => ClientError::Db(e),
        })?;
        Ok((row.into_client()?, secret))
    }

    /// The client `id`, or [`ClientError::NotFound`].
    pub async fn get(&self, id: &ClientId) -> Result<Client, ClientError> {
        self.fetch(id.as_str())
            .await?
            .ok_or(ClientError::NotFound)?
            .into_client()
    }

    /// Every client, by id.
    pub async fn list(&self) -> Result<Vec<Client>, ClientError> {
        let sql = format!("SELECT {COLUMNS} FROM oauth_clients ORDER BY id");
        let rows: Vec<ClientRow> = crate::on_pool!(self.db.pool(), |p| {
            sqlx::query_as(&sql).fetch_all(p).await?
        });
        rows.into_iter().map(ClientRow::into_client).collect()
    }

    /// Checks a client's credentials at `now`: the client, if `client_id` names an
    /// enabled client and `presented_secret` is its current secret or, during a rotation
    /// overlap, its previous one. Every failure — unknown or malformed id, wrong or expired
    /// secret, disabled client — is the same [`ClientError::InvalidClient`] and costs the
    /// same single HMAC, so the answer does not tell which. A cached record that refuses
    /// the credentials is read again before they are refused, unless it was read within
    /// [`REREAD_AFTER`]: a secret rotated (or a client enabled) through another instance
    /// works here within a second, not after the cache's TTL, and a client presenting a
    /// wrong secret over and over reads the database at most once a second per instance.
    /// If that read fails, the cached record's refusal stands (401, not 503).
    #[tracing::instrument(skip_all)]
    pub async fn authenticate(
        &self,
        client_id: &str,
        presented_secret: &SecretString,
        now: OffsetDateTime,
    ) -> Result<Arc<Client>, ClientError> {
        let presented = secret::hash(
            &self.key,
            client_id.as_bytes(),
            presented_secret.expose_secret().as_bytes(),
        );
        // before the read: a write that commits meanwhile keeps its answer out of the cache
        let ticket = self.cache.ticket();
        let cached = match self.cache.lookup(client_id) {
            Lookup::Fresh(client) | Lookup::Refreshing(client) => Some(client),
            Lookup::Miss => None,
        };
        if let Some(client) = &cached
            && client.enabled
            && client.secrets.matches(&presented, now)
        {
            return Ok(client.clone());
        }
        let client = match (cached, ClientId::parse(client_id)) {
            // refused by a record read moments ago: refused
            (Some(client), _) if self.cache.read_within(client_id, REREAD_AFTER) => Some(client),
            // not held, or refused by what this instance remembers: perhaps only because a
            // change made through another instance has not reached its cache yet
            (cached, Ok(id)) => match self.fetch(id.as_str()).await {
                Ok(Some(row)) => {
                    let client = Arc::new(row.into_client()?);
                    self.cache.put(&client, ticket);
                    Some(client)
                }
                Ok(None) => {
                    // deleted meanwhile (through another instance): no old record either
                    self.cache.absent(client_id);
                    None
                }
                Err(e) => match cached {
                    Some(client) => {
                        tracing::debug!(error = %e, "client record not read again; the cached one decides");
                        Some(client)
                    }
                    None => {
                        // let the next request read it again rather than wait out the TTL
                        self.cache.refresh_failed(client_id);
                        return Err(e);
                    }
                },
            },
            (cached, Err(_)) => cached,
        };
        let Some(client) = client else {
            // the same comparisons as for a known client, then refuse
            let dummy = SecretHashes {
                current: [0u8; 32],
                previous: None,
            };
            std::hint::black_box(dummy.matches(&presented, now));
            return Err(ClientError::InvalidClient);
        };
        let matches = client.secrets.matches(&presented, now);
        if matches && client.enabled {
            Ok(client)
        } else {
            Err(ClientError::InvalidClient)
        }
    }

    /// Gives client `id` a new secret, returned once. The old secret keeps working until
    /// `now + overlap` (none at all for a zero overlap), so deployments can switch over;
    /// after that only the new one does. Only one previous secret is kept: rotating again
    /// during an overlap ends the older secret's overlap at once.
    #[tracing::instrument(skip_all, fields(client_id = %id))]
    pub async fn rotate_secret(
        &self,
        id: &ClientId,
        overlap: Duration,
        now: OffsetDateTime,
    ) -> Result<SecretString, ClientError> {
        // forgotten now and once the write is over (see `ClientCache::writing`)
        let _writing = self.cache.writing(id.as_str());
        let secret = secret::generate()?;
        let hash = secret::hash_for(&self.key, id, secret.expose_secret());
        let now_ms = unix_ms(now);
        // UPDATE reads the old row on the right-hand side: the current hash moves to
        // `previous` in the same statement that replaces it
        let (sql, until) = if overlap.is_zero() {
            (
                "UPDATE oauth_clients SET secret_hash = $1, previous_secret_hash = NULL, \
                 previous_secret_expires_at_unix_ms = NULL, updated_at_unix_ms = $2 \
                 WHERE id = $3",
                None,
            )
        } else {
            let overlap_ms = i64::try_from(overlap.as_millis()).unwrap_or(i64::MAX);
            (
                "UPDATE oauth_clients SET previous_secret_hash = secret_hash, \
                 previous_secret_expires_at_unix_ms = $4, secret_hash = $1, \
                 updated_at_unix_ms = $2 WHERE id = $3",
                Some(now_ms.saturating_add(overlap_ms)),
            )
        };
        let affected = crate::on_pool!(self.db.pool(), |p| {
            let q = sqlx::query(sql)
                .bind(&hash[..])
                .bind(now_ms)
                .bind(id.as_str());
            let q = match until {
                Some(u) => q.bind(u),
                None => q,
            };
            q.execute(p).await?.rows_affected()
        });
        if affected == 0 {
            return Err(ClientError::NotFound);
        }
        Ok(secret)
    }

    /// Refuses client `id` from now on (its secrets are kept; tokens already issued stay
    /// valid until they expire).
    pub async fn disable(&self, id: &ClientId, now: OffsetDateTime) -> Result<(), ClientError> {
        self.set_enabled(id, false, now).await
    }

    /// Lets client `id` authenticate again.
    pub async fn enable(&self, id: &ClientId, now: OffsetDateTime) -> Result<(), ClientError> {
        self.set_enabled(id, true, now).await
    }

    /// Changes the settings `change` names, leaving the others; returns the client as
    /// stored. [`ClientError::Invalid`] (nothing changed) for bad settings.
    #[tracing::instrument(skip_all, fields(client_id = %id))]
    pub async fn update(
        &self,
        id: &ClientId,
        change: ClientUpdate,
        now: OffsetDateTime,
    ) -> Result<Client, ClientError> {
        // forgotten now and once the write is over (see `ClientCache::writing`)
        let _writing = self.cache.writing(id.as_str());
        if let Some(name) = &change.name {
            validate_name(name)?;
        }
        if let Some(grants) = &change.grant_types {
            validate_grants(grants)?;
        }
        if let Some(audiences) = &change.audiences {
            validate_audiences(audiences)?;
        }
        if let Some(lifetime) = change.access_token_lifetime {
            validate_lifetime(lifetime, self.rules.max_lifetime)?;
        }
        let grants = change.grant_types.as_ref().map(GrantType::format_set);
        let scopes = change.scopes.as_ref().map(ScopeSet::to_string);
        let audiences = change.audiences.as_deref().map(format_audiences);
        let set_lifetime = change.access_token_lifetime.is_some();
        let lifetime = change.access_token_lifetime.flatten().map(lifetime_secs);
        let sql = format!(
            "UPDATE oauth_clients SET name = COALESCE($1, name), \
             grant_types = COALESCE($2, grant_types), scopes = COALESCE($3, scopes), \
             audiences = COALESCE($4, audiences), \
             access_token_lifetime_secs = CASE WHEN $5 THEN $6 ELSE access_token_lifetime_secs END, \
             updated_at_unix_ms = $7 WHERE id = $8 RETURNING {COLUMNS}"
        );
        let row: Option<ClientRow> = crate::on_pool!(self.db.pool(), |p| {
            sqlx::query_as(&sql)
                .bind(&change.name)
                .bind(&grants)
                .bind(&scopes)
                .bind(&audiences)
                .bind(set_lifetime)
                .bind(lifetime)
                .bind(unix_ms(now))
                .bind(id.as_str())
                .fetch_optional(p)
                .await?
        });
        row.ok_or(ClientError::NotFound)?.into_client()
    }

    /// Removes client `id` for good.
    #[tracing::instrument(skip_all, fields(client_id = %id))]
    pub async fn delete(&self, id: &ClientId) -> Result<(), ClientError> {
        // forgotten now and once the write is over (see `ClientCache::writing`)
        let _writing = self.cache.writing(id.as_str());
        const SQL: &str = "DELETE FROM oauth_clients WHERE id = $1";
        let affected = crate::on_pool!(self.db.pool(), |p| {
            sqlx::query(SQL)
                .bind(id.as_str())
                .execute(p)
                .await?
                .rows_affected()
        });
        if affected == 0 {
            return Err(ClientError::NotFound);
        }
        Ok(())
    }

    /// For `--dev`: when no client has the id or the name `admin`, creates one (id and
    /// name `admin`, grant `client_credentials`, scope `portcullis:admin`, no audience)
    /// and returns its id and secret, to be shown once. Otherwise `None`: the stored hash
    /// cannot give the secret back — rotate it (`rotate_secret`) to get a new one.
    /// Two instances racing here create one client; the loser gets `None`.
    pub async fn bootstrap_admin(
        &self,
        now: OffsetDateTime,
    ) -> Result<Option<(ClientId, SecretString)>, ClientError> {
        const SQL: &str = "SELECT COUNT(*) FROM oauth_clients WHERE id = $1 OR name = $1";
        let existing: i64 = crate::on_pool!(self.db.pool(), |p| {
            sqlx::query_scalar(SQL)
                .bind(ADMIN_CLIENT_ID)
                .fetch_one(p)
                .await?
        });
        if existing > 0 {
            return Ok(None);
        }
        let new = NewClient {
            id: Some(ClientId::parse(ADMIN_CLIENT_ID)?),
            name: ADMIN_CLIENT_ID.to_owned(),
            grant_types: [GrantType::ClientCredentials].into_iter().collect(),
            scopes: ScopeSet::parse(ADMIN_SCOPE)?,
            audiences: Vec::new(),
            access_token_lifetime: None,
        };
        match self.create(new, now).await {
            Ok((client, secret)) => Ok(Some((client.id, secret))),
            Err(ClientError::AlreadyExists) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn set_enabled(
        &self,
        id: &ClientId,
        enabled: bool,
        now: OffsetDateTime,
    ) -> Result<(), ClientError> {
        // forgotten now and once the write is over (see `ClientCache::writing`)
        let _writing = self.cache.writing(id.as_str());
        const SQL: &str =
            "UPDATE oauth_clients SET enabled = $1, updated_at_unix_ms = $2 WHERE id = $3";
        let affected = crate::on_pool!(self.db.pool(), |p| {
            sqlx::query(SQL)
                .bind(enabled)
                .bind(unix_ms(now))
                .bind(id.as_str())
                .execute(p)
                .await?
                .rows_affected()
        });
        if affected == 0 {
            return Err(ClientError::NotFound);
        }
        Ok(())
    }

    async fn fetch(&self, id: &str) -> Result<Option<ClientRow>, ClientError> {
        let sql = format!("SELECT {COLUMNS} FROM oauth_clients WHERE id = $1");
        let row = crate::on_pool!(self.db.pool(), |p| {
            sqlx::query_as(&sql).bind(id).fetch_optional(p).await?
        });
        Ok(row)
    }
}

// === impl ClientRow ===

impl ClientRow {
    fn into_client(self) -> Result<Client, ClientError> {
        let id = self.id;
        let corrupt = |reason: &str| ClientError::Corrupt {
            id: id.clone(),
            reason: reason.to_owned(),
        };
        let client_id = ClientId::parse(&id).map_err(|_| corrupt("id"))?;
        let grant_types =
            GrantType::parse_set(&self.grant_types).map_err(|_| corrupt("grant_types"))?;
        let scopes = ScopeSet::parse(&self.scopes).map_err(|_| corrupt("scopes"))?;
        let audiences = self
            .audiences
            .split(' ')
            .filter(|a| !a.is_empty())
            .map(Audience::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| corrupt("audiences"))?;
        let access_token_lifetime = match self.access_token_lifetime_secs {
            None => None,
            Some(s) => Some(Duration::from_secs(
                u64::try_from(s).map_err(|_| corrupt("access_token_lifetime_secs"))?,
            )),
        };
        let current = hash_array(&self.secret_hash).ok_or_else(|| corrupt("secret_hash"))?;
        let previous = match (
            self.previous_secret_hash,
            self.previous_secret_expires_at_unix_ms,
        ) {
            (Some(h), Some(until)) => Some((
                hash_array(&h).ok_or_else(|| corrupt("previous_secret_hash"))?,
                from_unix_ms(until).ok_or_else(|| corrupt("previous_secret_expires_at"))?,
            )),
            _ => None,
        };
        Ok(Client {
            id: client_id,
            name: self.name,
            grant_types,
            scopes,
            audiences,
            access_token_lifetime,
            enabled: self.enabled,
            created_at: from_unix_ms(self.created_at_unix_ms)
                .ok_or_else(|| corrupt("created_at"))?,
            updated_at: from_unix_ms(self.updated_at_unix_ms)
                .ok_or_else(|| corrupt("updated_at"))?,
            secrets: SecretHashes { current, previous },
        })
    }
}

// === helpers ===

fn format_audiences(audiences: &[Audience]) -> String {
    audiences
        .iter()
        .map(Audience::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

fn lifetime_secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn hash_array(bytes: &[u8]) -> Option<[u8; 32]> {
    bytes.try_into().ok()
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_unix_ms(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}
