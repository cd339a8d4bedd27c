//! The production key source: the ring as one Vault (or OpenBao) KV v2 secret, written with
//! check-and-set, reached with a token or an AppRole login that is kept renewed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vaultrs::api::kv2::requests::{ReadSecretRequest, SetSecretRequest, SetSecretRequestOptions};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use crate::source::{KeySource, StoreOutcome, Versioned};
use crate::{KeyError, KeyRing};

/// Renew (or log in again) when this fraction of the token's TTL has passed.
const RENEW_AT_FRACTION: f64 = 2.0 / 3.0;
/// Never wake the renewal task more often than this.
const MIN_RENEW_WAIT: Duration = Duration::from_millis(250);
/// After a failed renewal or login, try again after this (or sooner if the token is near
/// its end).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// How Portcullis reaches Vault. In the config file:
///
/// ```toml
/// [keys.vault]
/// addr = "https://vault.example:8200"   # default: $VAULT_ADDR
/// cacert = "/etc/portcullis/vault-ca.pem" # default: $VAULT_CACERT
/// namespace = "ops"                      # default: $VAULT_NAMESPACE, else none
/// kv_mount = "secret"                    # default "secret"
/// ring_path = "portcullis/keyring"       # default "portcullis/keyring"
/// request_timeout = "5s"                 # default 5s
/// [keys.vault.auth]
/// method = "approle"                     # or "token" (default; token = $VAULT_TOKEN)
/// role_id = "…"
/// secret_id_file = "/run/secrets/portcullis-secret-id"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultSettings {
    /// Vault address, e.g. `https://vault:8200`. Default: `VAULT_ADDR`.
    #[serde(default)]
    pub addr: Option<String>,
    /// Token for `auth.method = "token"`. Default: `VAULT_TOKEN`.
    #[serde(default)]
    pub token: Option<SecretString>,
    /// PEM bundle of CAs to trust for Vault's TLS certificate. Default: `VAULT_CACERT`.
    #[serde(default)]
    pub cacert: Option<PathBuf>,
    /// Vault Enterprise / OpenBao namespace. Default: `VAULT_NAMESPACE`, else none.
    #[serde(default)]
    pub namespace: Option<String>,
    /// How to authenticate. Default: token.
    #[serde(default)]
    pub auth: VaultAuth,
    /// Mount path of the KV v2 engine. Default `secret`.
    #[serde(default = "default_kv_mount")]
    pub kv_mount: String,
    /// Path of the ring secret inside the mount. Default `portcullis/keyring`.
    #[serde(default = "default_ring_path")]
    pub ring_path: String,
    /// Timeout of each request to Vault. Default 5 s.
    #[serde(default = "default_timeout", with = "crate::duration")]
    pub request_timeout: Duration,
}

/// How to authenticate to Vault.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum VaultAuth {
    /// A token (`token` in the settings, not under `auth`; else `VAULT_TOKEN`), renewed
    /// when renewable. A variant with braces, so that a key beside `method` (a `token`
    /// put under `auth`) is refused rather than silently dropped.
    Token {},
    /// AppRole login; the token it yields is renewed, and replaced by a new login when it
    /// can no longer be renewed.
    #[serde(rename = "approle")]
    AppRole {
        /// The role id.
        role_id: String,
        /// The secret id (prefer `secret_id_file`).
        #[serde(default)]
        secret_id: Option<SecretString>,
        /// A file holding the secret id, read at every login (so it can be rotated).
        #[serde(default)]
        secret_id_file: Option<PathBuf>,
        /// Mount path of the AppRole auth method. Default `approle`.
        #[serde(default = "default_approle_mount")]
        mount: String,
    },
}

impl Default for VaultAuth {
    fn default() -> Self {
        Self::Token {}
    }
}

/// What the token maintenance did so far (for tests, readiness and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuthStatus {
    /// Successful logins (AppRole; a static token counts one when first used).
    pub logins: u64,
    /// Successful renewals.
    pub renewals: u64,
    /// Failed renewals or logins.
    pub failures: u64,
    /// The TTL granted by the last login or renewal, in seconds (0: never expires).
    pub ttl_seconds: Option<u64>,
    /// Whether the current token is renewable.
    pub renewable: bool,
    /// When the last login or renewal happened.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_event_at: Option<OffsetDateTime>,
    /// The last failure (secret-free).
    pub last_error: Option<String>,
}

/// The ring in a Vault KV v2 secret. Cheap to clone.
#[derive(Clone)]
pub struct VaultKeySource {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    cacert: Option<PathBuf>,
    namespace: Option<String>,
    timeout: Duration,
    mount: String,
    path: String,
    auth: Auth,
    client: tokio::sync::RwLock<Option<Arc<VaultClient>>>,
    login_lock: tokio::sync::Mutex<()>,
    token: Mutex<Option<TokenLease>>,
    status: watch::Sender<AuthStatus>,
}

enum Auth {
    Token(SecretString),
    AppRole {
        mount: String,
        role_id: String,
        secret_id: SecretIdSource,
    },
}

enum SecretIdSource {
    Inline(SecretString),
    File(PathBuf),
}

/// What we know of the current token's lifetime.
#[derive(Debug, Clone, Copy)]
struct TokenLease {
    obtained: Instant,
    ttl: Duration,
    /// The TTL the login (or first lookup) granted: a renewal granting much less means the
    /// token nears its maximum TTL.
    initial_ttl: Duration,
    renewable: bool,
}

fn default_kv_mount() -> String {
    "secret".to_owned()
}

fn default_ring_path() -> String {
    "portcullis/keyring".to_owned()
}

fn default_approle_mount() -> String {
    "approle".to_owned()
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

// === impl VaultSettings ===

impl Default for VaultSettings {
    fn default() -> Self {
        Self {
            addr: None,
            token: None,
            cacert: None,
            namespace: None,
            auth: VaultAuth::default(),
            kv_mount: default_kv_mount(),
            ring_path: default_ring_path(),
            request_timeout: default_timeout(),
        }
    }
}

impl VaultSettings {
    /// Fills what the settings leave unset from `VAULT_ADDR`, `VAULT_TOKEN`, `VAULT_CACERT`
    /// and `VAULT_NAMESPACE` as `lookup` returns them (settings win over the environment).
    pub fn with_env_from(mut self, lookup: impl Fn(&str) -> Option<String>) -> Self {
        let non_empty = |name: &str| lookup(name).filter(|v| !v.is_empty());
        if self.addr.is_none() {
            self.addr = non_empty("VAULT_ADDR");
        }
        if self.token.is_none() {
            self.token = non_empty("VAULT_TOKEN").map(SecretString::from);
        }
        if self.cacert.is_none() {
            self.cacert = non_empty("VAULT_CACERT").map(PathBuf::from);
        }
        if self.namespace.is_none() {
            self.namespace = non_empty("VAULT_NAMESPACE");
        }
        self
    }

    /// [`Self::with_env_from`] the process environment.
    pub fn with_process_env(self) -> Self {
        self.with_env_from(|name| std::env::var(name).ok())
    }
}

// === impl VaultKeySource ===

impl VaultKeySource {
    /// Checks the settings (after filling them from the process environment, see
    /// [`VaultSettings::with_process_env`]) and prepares the client. No request is made:
    /// an AppRole login happens on first use, so an instance starts while Vault is down.
    pub fn new(settings: VaultSettings) -> Result<Self, KeyError> {
        Self::from_resolved(settings.with_process_env())
    }

    /// Like [`Self::new`] without reading the environment.
    pub fn from_resolved(settings: VaultSettings) -> Result<Self, KeyError> {
        let addr = settings.addr.ok_or_else(|| {
            KeyError::InvalidConfig("vault addr is not set (nor VAULT_ADDR)".to_owned())
        })?;
        match url::Url::parse(&addr) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => {
                return Err(KeyError::InvalidConfig(
                    "vault addr must be an http(s) URL".to_owned(),
                ));
            }
        }
        let auth = match settings.auth {
            VaultAuth::Token {} => Auth::Token(settings.token.ok_or_else(|| {
                KeyError::InvalidConfig("vault token is not set (nor VAULT_TOKEN)".to_owned())
            })?),
            VaultAuth::AppRole {
                role_id,
                secret_id,
                secret_id_file,
                mount,
            } => {
                let secret_id = match (secret_id, secret_id_file) {
                    (Some(s), None) => SecretIdSource::Inline(s),
                    (None, Some(f)) => SecretIdSource::File(f),
                    _ => {
                        return Err(KeyError::InvalidConfig(
                            "approle auth needs exactly one of secret_id and secret_id_file"
                                .to_owned(),
                        ));
                    }
                };
                Auth::AppRole {
                    mount,
                    role_id,
                    secret_id,
                }
            }
        };
        let trim = |s: &str| s.trim_matches('/').to_owned();
        let (mount, path) = (trim(&settings.kv_mount), trim(&settings.ring_path));
        if mount.is_empty() || path.is_empty() {
            return Err(KeyError::InvalidConfig(
                "vault kv_mount and ring_path must not be empty".to_owned(),
            ));
        }
        let (status, _) = watch::channel(AuthStatus::default());
        Ok(Self {
            inner: Arc::new(Inner {
                addr,
                cacert: settings.cacert,
                namespace: settings.namespace.filter(|n| !n.is_empty()),
                timeout: settings.request_timeout,
                mount,
                path,
                auth,
                client: tokio::sync::RwLock::new(None),
                login_lock: tokio::sync::Mutex::new(()),
                token: Mutex::new(None),
                status,
            }),
        })
    }

    /// The token maintenance so far.
    pub fn auth_status(&self) -> AuthStatus {
        self.inner.status.borrow().clone()
    }

    /// Changes of [`Self::auth_status`], as they happen.
    pub fn subscribe_auth(&self) -> watch::Receiver<AuthStatus> {
        self.inner.status.subscribe()
    }

    /// Starts the task that keeps the Vault token alive: it renews a renewable token when
    /// two thirds of its TTL have passed, and with AppRole logs in again when the token can
    /// no longer be renewed (or renewal fails). A token that never expires (TTL 0) needs
    /// nothing and the task ends. Failures are logged (without secrets) and retried.
    pub fn spawn_token_renewal(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let wait = match this.maintain_token().await {
                    Ok(Some(wait)) => wait,
                    Ok(None) => {
                        tracing::debug!(source = %this.describe(), "vault token does not expire; renewal task ends");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(source = %this.describe(), error = %e, "vault token renewal failed");
                        this.update_status(|s| {
                            s.failures += 1;
                            s.last_error = Some(e.to_string());
                        });
                        this.retry_wait()
                    }
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        })
    }

    /// One step of token maintenance; returns how long to wait before the next one
    /// (`None`: the token never expires).
    async fn maintain_token(&self) -> Result<Option<Duration>, KeyError> {
        let client = self.client().await?;
        let lease = match self.lease() {
            Some(lease) => lease,
            None => {
                let info = vaultrs::token::lookup_self(&*client)
                    .await
                    .map_err(|e| self.map_error("token lookup", e))?;
                let ttl = Duration::from_secs(info.ttl);
                let lease = TokenLease {
                    obtained: Instant::now(),
                    ttl,
                    initial_ttl: Duration::from_secs(info.creation_ttl.max(info.ttl)),
                    renewable: info.renewable.unwrap_or(false),
                };
                self.set_lease(lease);
                self.update_status(|s| {
                    s.ttl_seconds = Some(info.ttl);
                    s.renewable = lease.renewable;
                });
                lease
            }
        };
        if lease.ttl.is_zero() {
            return Ok(None);
        }
        let renew_at = lease.ttl.mul_f64(RENEW_AT_FRACTION);
        let elapsed = lease.obtained.elapsed();
        if elapsed < renew_at {
            return Ok(Some((renew_at - elapsed).max(MIN_RENEW_WAIT)));
        }

        let is_approle = matches!(self.inner.auth, Auth::AppRole { .. });
        if lease.renewable {
            match vaultrs::token::renew_self(&*client, None).await {
                Ok(auth) => {
                    let ttl = Duration::from_secs(auth.lease_duration);
                    self.set_lease(TokenLease {
                        obtained: Instant::now(),
                        ttl,
                        initial_ttl: lease.initial_ttl,
                        renewable: auth.renewable,
                    });
                    self.update_status(|s| {
                        s.renewals += 1;
                        s.ttl_seconds = Some(auth.lease_duration);
                        s.renewable = auth.renewable;
                        s.last_event_at = Some(OffsetDateTime::now_utc());
                        s.last_error = None;
                    });
                    tracing::debug!(source = %self.describe(), ttl_s = auth.lease_duration, "vault token renewed");
                    // A renewal capped well below the usual TTL: the token nears its max TTL.
                    let capped = ttl < lease.initial_ttl.mul_f64(RENEW_AT_FRACTION);
                    if capped && is_approle {
                        self.relogin().await?;
                    } else if capped {
                        tracing::warn!(source = %self.describe(), ttl_s = auth.lease_duration,
                            "vault token nears its maximum TTL and cannot be replaced (token auth)");
                    }
                }
                Err(e) if is_approle => {
                    tracing::info!(source = %self.describe(), error = %self.map_error("token renewal", e),
                        "vault token renewal failed; logging in again");
                    self.relogin().await?;
                }
                Err(e) => return Err(self.map_error("token renewal", e)),
            }
        } else if is_approle {
            self.relogin().await?;
        } else {
            let left = lease.ttl.saturating_sub(elapsed);
            tracing::warn!(source = %self.describe(), expires_in_s = left.as_secs(),
                "vault token is not renewable; it will expire");
            return Ok(None);
        }
        let lease = self
            .lease()
            .map_or(RETRY_AFTER_FAILURE, |l| l.ttl.mul_f64(RENEW_AT_FRACTION));
        Ok(Some(lease.max(MIN_RENEW_WAIT)))
    }

    fn retry_wait(&self) -> Duration {
        let near_end = self
            .lease()
            .map(|l| l.ttl.saturating_sub(l.obtained.elapsed()) / 3)
            .unwrap_or(RETRY_AFTER_FAILURE);
        near_end.clamp(MIN_RENEW_WAIT, RETRY_AFTER_FAILURE)
    }

    fn lease(&self) -> Option<TokenLease> {
        *self
            .inner
            .token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn set_lease(&self, lease: TokenLease) {
        *self
            .inner
            .token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(lease);
    }

    fn update_status(&self, f: impl FnOnce(&mut AuthStatus)) {
        self.inner.status.send_modify(f);
    }

    fn build_client(&self, token: &str) -> Result<VaultClient, KeyError> {
        let mut builder = VaultClientSettingsBuilder::default();
        // `addr` was checked to be an http(s) URL in `from_resolved`, so `address` cannot panic.
        builder
            .address(&self.inner.addr)
            .token(token)
            .timeout(Some(self.inner.timeout))
            .verify(true)
            .ca_certs(
                self.inner
                    .cacert
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>(),
            )
            .namespace(self.inner.namespace.clone());
        let settings = builder
            .build()
            .map_err(|e| KeyError::InvalidConfig(format!("vault client settings: {e}")))?;
        VaultClient::new(settings)
            .map_err(|e| KeyError::InvalidConfig(format!("vault client: {e}")))
    }

    /// The client with a valid token, logging in first if needed, for other features
    /// that talk to the same Vault (the config center's Transit key). With a static token
    /// this makes no request.
    pub async fn authenticated_client(&self) -> Result<Arc<VaultClient>, KeyError> {
        self.client().await
    }

    /// The client with a valid token, logging in first if needed.
    async fn client(&self) -> Result<Arc<VaultClient>, KeyError> {
        if let Some(client) = self.inner.client.read().await.as_ref() {
            return Ok(Arc::clone(client));
        }
        let _guard = self.inner.login_lock.lock().await;
        if let Some(client) = self.inner.client.read().await.as_ref() {
            return Ok(Arc::clone(client));
        }
        self.login_locked().await
    }

    /// Replaces the token by a fresh login (AppRole); with a static token, rebuilds nothing.
    async fn relogin(&self) -> Result<Arc<VaultClient>, KeyError> {
        let _guard = self.inner.login_lock.lock().await;
        self.login_locked().await
    }

    async fn login_locked(&self) -> Result<Arc<VaultClient>, KeyError> {
        let client = match &self.inner.auth {
            Auth::Token(token) => {
                if let Some(client) = self.inner.client.read().await.as_ref() {
                    return Ok(Arc::clone(client));
                }
                let client = Arc::new(self.build_client(token.expose_secret())?);
                self.update_status(|s| s.logins += 1);
                client
            }
            Auth::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let secret_id = match secret_id {
                    SecretIdSource::Inline(s) => s.clone(),
                    SecretIdSource::File(path) => {
                        let text = tokio::fs::read_to_string(path).await.map_err(|e| {
                            KeyError::InvalidConfig(format!(
                                "cannot read approle secret_id_file {}: {e}",
                                path.display()
                            ))
                        })?;
                        SecretString::from(text.trim().to_owned())
                    }
                };
                let anonymous = self.build_client("")?;
                let auth = vaultrs::auth::approle::login(
                    &anonymous,
                    mount,
                    role_id,
                    secret_id.expose_secret(),
                )
                .await
                .map_err(|e| self.map_error("approle login", e))?;
                let client = Arc::new(self.build_client(&auth.client_token)?);
                let ttl = Duration::from_secs(auth.lease_duration);
                self.set_lease(TokenLease {
                    obtained: Instant::now(),
                    ttl,
                    initial_ttl: ttl,
                    renewable: auth.renewable,
                });
                self.update_status(|s| {
                    s.logins += 1;
                    s.ttl_seconds = Some(auth.lease_duration);
                    s.renewable = auth.renewable;
                    s.last_event_at = Some(OffsetDateTime::now_utc());
                    s.last_error = None;
                });
                tracing::info!(source = %self.describe(), ttl_s = auth.lease_duration, "logged in to vault with approle");
                client
            }
        };
        *self.inner.client.write().await = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Runs `op` with the current client; with AppRole, a permission error (an expired
    /// token looks like one) triggers one fresh login and one retry.
    async fn with_client<T, F, Fut>(&self, op: F) -> Result<T, KeyError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, KeyError>>,
    {
        let client = self.client().await?;
        match op(client).await {
            Err(KeyError::SourceDenied { .. })
                if matches!(self.inner.auth, Auth::AppRole { .. }) =>
            {
                let client = self.relogin().await?;
                op(client).await
            }
            other => other,
        }
    }

    fn map_error(&self, op: &str, e: ClientError) -> KeyError {
        let source_name = self.describe();
        match e {
            ClientError::APIError { code: 403, errors } => KeyError::SourceDenied {
                source_name,
                message: format!("{op}: permission denied ({})", errors.join("; ")),
            },
            ClientError::APIError { code, errors } if code >= 500 => KeyError::SourceUnavailable {
                source_name,
                message: format!("{op}: HTTP {code} ({})", errors.join("; ")),
            },
            ClientError::APIError { code, errors } => KeyError::Source {
                source_name,
                message: format!("{op}: HTTP {code} ({})", errors.join("; ")),
            },
            ClientError::RestClientError { source } => {
                let message = match &source {
                    // Transport failures: the cause chain (connection refused, timeout, TLS)
                    // is what an operator needs, and holds no secret.
                    rustify::errors::ClientError::RequestError { .. } => error_chain(&source),
                    // Other variants may wrap a response body: their own message only.
                    other => other.to_string(),
                };
                KeyError::SourceUnavailable {
                    source_name,
                    message: format!("{op}: {message}"),
                }
            }
            other => KeyError::Source {
                source_name,
                message: format!("{op}: {other}"),
            },
        }
    }

    async fn read_ring(
        &self,
        client: &VaultClient,
    ) -> Result<Option<Versioned<KeyRing>>, KeyError> {
        let endpoint = ReadSecretRequest::builder()
            .mount(self.inner.mount.as_str())
            .path(self.inner.path.as_str())
            .build()
            .map_err(|e| KeyError::InvalidConfig(format!("vault read request: {e}")))?;
        match vaultrs::api::exec_with_result(client, endpoint).await {
            Ok(response) if response.data.is_null() => Ok(None),
            Ok(response) => Ok(Some(Versioned {
                value: KeyRing::from_json_value(response.data)?,
                version: response.metadata.version,
            })),
            Err(ClientError::APIError { code: 404, .. }) => Ok(None),
            Err(e) => Err(self.map_error("read", e)),
        }
    }

    async fn write_ring(
        &self,
        client: &VaultClient,
        ring: &KeyRing,
        expected_version: Option<u64>,
    ) -> Result<StoreOutcome, KeyError> {
        let data = serde_json::to_value(ring).map_err(|e| KeyError::Source {
            source_name: self.describe(),
            message: format!("serialise: {}", crate::error::json_error_summary(&e)),
        })?;
        // KV v2: cas = 0 writes only if the secret does not exist; cas = n only if the
        // current version is n.
        let cas = u32::try_from(expected_version.unwrap_or(0)).map_err(|_| KeyError::Source {
            source_name: self.describe(),
            message: "secret version out of range for check-and-set".to_owned(),
        })?;
        let endpoint = SetSecretRequest::builder()
            .mount(self.inner.mount.as_str())
            .path(self.inner.path.as_str())
            .data(data)
            .options(SetSecretRequestOptions { cas })
            .build()
            .map_err(|e| KeyError::InvalidConfig(format!("vault write request: {e}")))?;
        match vaultrs::api::exec_with_result(client, endpoint).await {
            Ok(metadata) => Ok(StoreOutcome::Stored(metadata.version)),
            Err(ClientError::APIError { code: 400, errors })
                if errors.iter().any(|e| e.contains("check-and-set")) =>
            {
                Ok(StoreOutcome::Conflict)
            }
            Err(e) => Err(self.map_error("write", e)),
        }
    }
}

#[async_trait]
impl KeySource for VaultKeySource {
    #[tracing::instrument(name = "vault.kv.read", skip_all, fields(otel.kind = "client"))]
    async fn load(&self) -> Result<Option<Versioned<KeyRing>>, KeyError> {
        self.with_client(|client| async move { self.read_ring(&client).await })
            .await
    }

    #[tracing::instrument(name = "vault.kv.write", skip_all, fields(otel.kind = "client"))]
    async fn store(
        &self,
        ring: &KeyRing,
        expected_version: Option<u64>,
    ) -> Result<StoreOutcome, KeyError> {
        self.with_client(
            |client| async move { self.write_ring(&client, ring, expected_version).await },
        )
        .await
    }

    fn describe(&self) -> String {
        match &self.inner.namespace {
            Some(ns) => format!("vault:{ns}/{}/{}", self.inner.mount, self.inner.path),
            None => format!("vault:{}/{}", self.inner.mount, self.inner.path),
        }
    }
}

impl std::fmt::Debug for VaultKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultKeySource")
            .field("addr", &self.inner.addr)
            .field("ring", &self.describe())
            .finish_non_exhaustive()
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn environment_fills_only_what_the_settings_leave_unset() {
        let lookup = env(&[
            ("VAULT_ADDR", "http://env:8200"),
            ("VAULT_TOKEN", "env-token"),
            ("VAULT_CACERT", "/env/ca.pem"),
        ]);
        let from_env = VaultSettings::default().with_env_from(&lookup);
        assert_eq!(from_env.addr.as_deref(), Some("http://env:8200"));
        assert_eq!(
            from_env
                .token
                .as_ref()
                .map(|t| t.expose_secret().to_owned())
                .as_deref(),
            Some("env-token")
        );
        assert_eq!(from_env.cacert, Some(PathBuf::from("/env/ca.pem")));

        let configured = VaultSettings {
            addr: Some("https://config:8200".to_owned()),
            token: Some(SecretString::from("config-token")),
            ..VaultSettings::default()
        }
        .with_env_from(&lookup);
        assert_eq!(configured.addr.as_deref(), Some("https://config:8200"));
        assert_eq!(
            configured
                .token
                .map(|t| t.expose_secret().to_owned())
                .as_deref(),
            Some("config-token")
        );
    }

    #[test]
    fn settings_deserialise_with_defaults_and_approle() {
        let settings: VaultSettings = serde_json::from_value(serde_json::json!({
            "addr": "https://vault:8200",
            "auth": { "method": "approle", "role_id": "r", "secret_id_file": "/run/s" }
        }))
        .unwrap();
        assert_eq!(settings.kv_mount, "secret");
        assert_eq!(settings.ring_path, "portcullis/keyring");
        assert_eq!(settings.request_timeout, Duration::from_secs(5));
        assert!(
            matches!(settings.auth, VaultAuth::AppRole { ref mount, .. } if mount == "approle")
        );
        assert!(
            serde_json::from_value::<VaultSettings>(serde_json::json!({"adress": "x"})).is_err()
        );
        // the token belongs beside `auth`, not under it: refused there, not dropped
        let settings: VaultSettings =
            serde_json::from_value(serde_json::json!({ "auth": { "method": "token" } })).unwrap();
        assert!(matches!(settings.auth, VaultAuth::Token {}));
        let err = serde_json::from_value::<VaultSettings>(serde_json::json!({
            "auth": { "method": "token", "token": "hvs.x" }
        }))
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `token`"), "{err}");
    }

    #[test]
    fn debug_of_settings_and_source_hides_the_token() {
        let settings = VaultSettings {
            addr: Some("http://127.0.0.1:1".to_owned()),
            token: Some(SecretString::from("hvs.SUPERSECRET")),
            ..VaultSettings::default()
        };
        assert!(!format!("{settings:?}").contains("SUPERSECRET"));
        let source = VaultKeySource::from_resolved(settings).unwrap();
        assert!(!format!("{source:?}").contains("SUPERSECRET"));
    }

    #[test]
    fn refuses_settings_it_cannot_use() {
        let no_addr = VaultSettings {
            token: Some(SecretString::from("t")),
            ..VaultSettings::default()
        };
        assert!(matches!(
            VaultKeySource::from_resolved(no_addr),
            Err(KeyError::InvalidConfig(_))
        ));
        let bad_addr = VaultSettings {
            addr: Some("vault:8200".to_owned()),
            token: Some(SecretString::from("t")),
            ..VaultSettings::default()
        };
        assert!(matches!(
            VaultKeySource::from_resolved(bad_addr),
            Err(KeyError::InvalidConfig(_))
        ));
        let no_token = VaultSettings {
            addr: Some("http://vault:8200".to_owned()),
            ..VaultSettings::default()
        };
        assert!(matches!(
            VaultKeySource::from_resolved(no_token),
            Err(KeyError::InvalidConfig(_))
        ));
        let both_secrets = VaultSettings {
            addr: Some("http://vault:8200".to_owned()),
            auth: VaultAuth::AppRole {
                role_id: "r".to_owned(),
                secret_id: Some(SecretString::from("s")),
                secret_id_file: Some(PathBuf::from("/s")),
                mount: "approle".to_owned(),
            },
            ..VaultSettings::default()
        };
        assert!(matches!(
            VaultKeySource::from_resolved(both_secrets),
            Err(KeyError::InvalidConfig(_))
        ));
    }
}
