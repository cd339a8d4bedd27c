//! Envelope encryption at rest.
//!
//! Each environment has data keys (AES-256-GCM, 32 random bytes). A value is sealed under
//! the environment's current data key with a random 96-bit nonce and associated data that
//! binds it to its environment, application, release version, key, format and secret
//! flag, so a row copied elsewhere does not open. Data keys are stored only wrapped: by a
//! Vault Transit key in production ([`TransitWrapper`]), by a local master key file in
//! `--dev` ([`LocalWrapper`]). Every failure is an error — there is no plaintext path.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::zeroize::Zeroizing;
use vaultrs::client::VaultClient;

use crate::model::{AppName, ConfigKey, Environment, Format};

/// Length of a data key and of the local master key, in bytes.
pub const KEY_LEN: usize = 32;

/// What can go wrong while sealing, opening, wrapping or unwrapping. None of these carry
/// key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The key service (Vault Transit) did not answer or refused the request.
    #[error("key service: {0}")]
    KeyService(String),
    /// A wrapped data key did not unwrap: wrong, missing or rotated-away wrapping key, or
    /// the stored key was altered.
    #[error("the data key {key_version} of environment `{environment}` cannot be unwrapped")]
    Unwrap {
        /// The environment.
        environment: String,
        /// The data key's version.
        key_version: i64,
    },
    /// A stored data key was wrapped by another kind of wrapper than the one configured.
    #[error("data key wrapped by `{stored}`, but the configured wrapper is `{configured}`")]
    WrapperMismatch {
        /// Which wrapper the row names.
        stored: String,
        /// Which wrapper is configured.
        configured: &'static str,
    },
    /// A sealed value did not open: altered, moved to another row, or a wrong key.
    #[error("value of `{key}` in {environment}/{application} version {version} does not decrypt")]
    Open {
        /// The environment.
        environment: String,
        /// The application.
        application: String,
        /// The release version.
        version: u64,
        /// The key.
        key: String,
    },
    /// The local master key file is missing, unreadable, malformed or too permissive.
    #[error("master key file {path}: {reason}")]
    MasterKeyFile {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// The operating system's random source failed, or AES refused a key.
    #[error("cryptographic primitive failed: {0}")]
    Primitive(&'static str),
    /// The operation is not supported by this wrapper.
    #[error("{0} is not supported by the configured key wrapper")]
    Unsupported(&'static str),
}

/// A data key, unwrapped. The AES key schedule lives inside AWS-LC, which clears it when
/// the key is dropped; the raw bytes are only ever held in `Zeroizing` buffers.
pub struct DataKey {
    key: RandomizedNonceKey,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != KEY_LEN {
            return Err(CryptoError::Primitive("data key has the wrong length"));
        }
        let key = RandomizedNonceKey::new(&AES_256_GCM, bytes)
            .map_err(|_| CryptoError::Primitive("AES-256-GCM refused the key"))?;
        Ok(Self { key })
    }

    /// Seals `plaintext` with a fresh random nonce: returns `nonce || ciphertext || tag`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut in_out = plaintext.to_vec();
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(aad), &mut in_out)
            .map_err(|_| CryptoError::Primitive("AES-256-GCM seal failed"))?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + in_out.len());
        sealed.extend_from_slice(nonce.as_ref());
        sealed.extend_from_slice(&in_out);
        Ok(sealed)
    }

    /// Opens what [`DataKey::seal`] produced; `None` when it does not authenticate.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut in_out = Zeroizing::new(ciphertext.to_vec());
        let len = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut in_out)
            .ok()?
            .len();
        in_out.truncate(len);
        Some(in_out)
    }
}

/// The associated data of one stored value: everything that places it.
pub(crate) fn value_aad(
    env: &Environment,
    app: &AppName,
    version: u64,
    key: &ConfigKey,
    format: Format,
    secret: bool,
    key_version: i64,
) -> Vec<u8> {
    format!(
        "portcullis-config/v1\0{env}\0{app}\0{version}\0{key}\0{format}\0{secret}\0{key_version}"
    )
    .into_bytes()
}

/// Fresh random key bytes.
fn random_key() -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let mut bytes = Zeroizing::new(vec![0u8; KEY_LEN]);
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CryptoError::Primitive("the random source failed"))?;
    Ok(bytes)
}

// === KeyWrapper ===

/// Wraps and unwraps data keys.
#[derive(Debug, Clone)]
pub enum KeyWrapper {
    /// A Vault (OpenBao) Transit key.
    Transit(TransitWrapper),
    /// A local master key file (`--dev`).
    Local(LocalWrapper),
}

impl KeyWrapper {
    /// The name stored beside each wrapped key.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyWrapper::Transit(_) => "transit",
            KeyWrapper::Local(_) => "local",
        }
    }

    async fn wrap(&self, env: &Environment, key: &[u8]) -> Result<String, CryptoError> {
        match self {
            KeyWrapper::Transit(t) => t.wrap(key).await,
            KeyWrapper::Local(l) => l.wrap(env, key),
        }
    }

    async fn unwrap(
        &self,
        env: &Environment,
        key_version: i64,
        wrapped: &str,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let unwrapped = match self {
            KeyWrapper::Transit(t) => t.unwrap(wrapped).await?,
            KeyWrapper::Local(l) => l.unwrap(env, wrapped),
        };
        unwrapped.ok_or_else(|| CryptoError::Unwrap {
            environment: env.to_string(),
            key_version,
        })
    }

    /// Re-wraps a wrapped key under the newest wrapping key version, never exposing it
    /// outside the key service.
    pub(crate) async fn rewrap(&self, wrapped: &str) -> Result<String, CryptoError> {
        match self {
            KeyWrapper::Transit(t) => t.rewrap(wrapped).await,
            KeyWrapper::Local(_) => Err(CryptoError::Unsupported("rewrap")),
        }
    }

    /// Rotates the wrapping key (a new Transit key version; old versions still decrypt).
    pub async fn rotate(&self) -> Result<(), CryptoError> {
        match self {
            KeyWrapper::Transit(t) => t.rotate().await,
            KeyWrapper::Local(_) => Err(CryptoError::Unsupported("rotation")),
        }
    }
}

/// A Vault Transit key wrapping data keys. The caller owns the Vault client (its
/// authentication and token renewal); this type only calls `transit/*`.
#[derive(Clone)]
pub struct TransitWrapper {
    source: Arc<dyn VaultClientSource>,
    mount: String,
    key_name: String,
}

/// Where a [`TransitWrapper`] gets its Vault client for each call: the owner of the
/// client's authentication (the gateway's Vault source, which renews its token and logs
/// in again with AppRole) hands out whichever client is current.
#[async_trait::async_trait]
pub trait VaultClientSource: Send + Sync {
    /// The client to use now.
    async fn client(&self) -> Result<Arc<VaultClient>, CryptoError>;
}

/// One fixed client (a static token that outlives the process).
struct FixedClient(Arc<VaultClient>);

#[async_trait::async_trait]
impl VaultClientSource for FixedClient {
    async fn client(&self) -> Result<Arc<VaultClient>, CryptoError> {
        Ok(self.0.clone())
    }
}

impl fmt::Debug for TransitWrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransitWrapper")
            .field("mount", &self.mount)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

/// Vault's error without anything from the request (its text names status and Vault's
/// error strings, never the plaintext we sent).
fn vault_error(e: vaultrs::error::ClientError) -> CryptoError {
    use vaultrs::error::ClientError;
    match e {
        ClientError::APIError { code, errors } => {
            CryptoError::KeyService(format!("Vault answered {code}: {}", errors.join("; ")))
        }
        ClientError::RestClientError { .. } => {
            CryptoError::KeyService("Vault is unreachable".into())
        }
        other => CryptoError::KeyService(other.to_string()),
    }
}

impl TransitWrapper {
    /// A wrapper using the Transit key `key_name` at `mount` (e.g. `transit`).
    pub fn new(
        client: Arc<VaultClient>,
        mount: impl Into<String>,
        key_name: impl Into<String>,
    ) -> Self {
        Self::with_source(Arc::new(FixedClient(client)), mount, key_name)
    }

    /// A wrapper that asks `source` for the current client on every call.
    pub fn with_source(
        source: Arc<dyn VaultClientSource>,
        mount: impl Into<String>,
        key_name: impl Into<String>,
    ) -> Self {
        Self {
            source,
            mount: mount.into(),
            key_name: key_name.into(),
        }
    }

    /// Creates the Transit key (aes256-gcm96) if it does not exist yet.
    pub async fn ensure_key(&self) -> Result<(), CryptoError> {
        match vaultrs::transit::key::read(
            &*self.source.client().await?,
            &self.mount,
            &self.key_name,
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(vaultrs::error::ClientError::APIError { code: 404, .. }) => {
                vaultrs::transit::key::create(
                    &*self.source.client().await?,
                    &self.mount,
                    &self.key_name,
                    None,
                )
                .await
                .map_err(vault_error)
            }
            Err(e) => Err(vault_error(e)),
        }
    }

    #[tracing::instrument(name = "vault.transit.encrypt", skip_all, fields(otel.kind = "client"))]
    async fn wrap(&self, key: &[u8]) -> Result<String, CryptoError> {
        let plaintext = Zeroizing::new(STANDARD.encode(key));
        let response = vaultrs::transit::data::encrypt(
            &*self.source.client().await?,
            &self.mount,
            &self.key_name,
            &plaintext,
            None,
        )
        .await
        .map_err(vault_error)?;
        Ok(response.ciphertext)
    }

    /// `Ok(None)` when Vault refuses the ciphertext (wrong key): the caller names it.
    #[tracing::instrument(name = "vault.transit.decrypt", skip_all, fields(otel.kind = "client"))]
    async fn unwrap(&self, wrapped: &str) -> Result<Option<Zeroizing<Vec<u8>>>, CryptoError> {
        match vaultrs::transit::data::decrypt(
            &*self.source.client().await?,
            &self.mount,
            &self.key_name,
            wrapped,
            None,
        )
        .await
        {
            Ok(response) => {
                let b64 = Zeroizing::new(response.plaintext);
                Ok(STANDARD.decode(b64.as_bytes()).ok().map(Zeroizing::new))
            }
            // 400: Vault could not decrypt this ciphertext with this key
            Err(vaultrs::error::ClientError::APIError { code: 400, .. }) => Ok(None),
            Err(e) => Err(vault_error(e)),
        }
    }

    async fn rewrap(&self, wrapped: &str) -> Result<String, CryptoError> {
        vaultrs::transit::data::rewrap(
            &*self.source.client().await?,
            &self.mount,
            &self.key_name,
            wrapped,
            None,
        )
        .await
        .map(|r| r.ciphertext)
        .map_err(vault_error)
    }

    async fn rotate(&self) -> Result<(), CryptoError> {
        vaultrs::transit::key::rotate(&*self.source.client().await?, &self.mount, &self.key_name)
            .await
            .map_err(vault_error)
    }
}

/// A local master key (32 random bytes, base64, in a file readable by its owner only)
/// wrapping data keys with AES-256-GCM. For `--dev` only.
#[derive(Clone)]
pub struct LocalWrapper {
    master: Arc<DataKey>,
}

impl fmt::Debug for LocalWrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LocalWrapper(..)")
    }
}

const LOCAL_PREFIX: &str = "local:v1:";

impl LocalWrapper {
    /// Reads the master key at `path`, creating it (mode 0600) when it does not exist.
    /// A file readable or writable by group or others is refused.
    pub fn open_or_create(path: &Path) -> Result<Self, CryptoError> {
        let fail = |reason: String| CryptoError::MasterKeyFile {
            path: path.to_path_buf(),
            reason,
        };
        if !path.exists() {
            let key = random_key()?;
            let text = Zeroizing::new(STANDARD.encode(&*key));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(mut file) => file
                    .write_all(text.as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|e| fail(format!("cannot write it: {e}")))?,
                // another process created it first: use theirs
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(fail(format!("cannot create it: {e}"))),
            }
        }
        Self::open(path)
    }

    /// Reads an existing master key file; refuses a missing, malformed or group/other
    /// accessible one.
    pub fn open(path: &Path) -> Result<Self, CryptoError> {
        let fail = |reason: String| CryptoError::MasterKeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(fail(format!(
                "mode {mode:o} lets group or others access it; it must be 0600"
            )));
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?,
        );
        let bytes = Zeroizing::new(
            STANDARD
                .decode(text.trim().as_bytes())
                .map_err(|_| fail("it is not base64".into()))?,
        );
        if bytes.len() != KEY_LEN {
            return Err(fail(format!("it must hold {KEY_LEN} bytes")));
        }
        Ok(Self {
            master: Arc::new(DataKey::from_bytes(&bytes)?),
        })
    }

    fn aad(env: &Environment) -> Vec<u8> {
        format!("portcullis-config/data-key/v1\0{env}").into_bytes()
    }

    fn wrap(&self, env: &Environment, key: &[u8]) -> Result<String, CryptoError> {
        let sealed = self.master.seal(&Self::aad(env), key)?;
        Ok(format!("{LOCAL_PREFIX}{}", STANDARD.encode(sealed)))
    }

    fn unwrap(&self, env: &Environment, wrapped: &str) -> Option<Zeroizing<Vec<u8>>> {
        let sealed = STANDARD.decode(wrapped.strip_prefix(LOCAL_PREFIX)?).ok()?;
        self.master.open(&Self::aad(env), &sealed)
    }
}

// === Envelope ===

/// A stored data key as read from the database.
#[derive(Debug, Clone)]
pub(crate) struct WrappedKey {
    pub(crate) key_version: i64,
    pub(crate) wrapper: String,
    pub(crate) wrapped: String,
}

/// Unwrapped data keys by (environment, key version).
type KeyCache = HashMap<(Environment, i64), Arc<DataKey>>;

/// The wrapper plus a cache of unwrapped data keys, keyed by (environment, key version).
/// Unwrapped keys stay in memory only; they are dropped (and cleared by AWS-LC) with the
/// envelope.
#[derive(Clone)]
pub struct Envelope {
    wrapper: KeyWrapper,
    cache: Arc<Mutex<KeyCache>>,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("wrapper", &self.wrapper)
            .finish_non_exhaustive()
    }
}

impl Envelope {
    /// An envelope over `wrapper`, with an empty cache.
    pub fn new(wrapper: KeyWrapper) -> Self {
        Self {
            wrapper,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The wrapper.
    pub fn wrapper(&self) -> &KeyWrapper {
        &self.wrapper
    }

    /// Forgets every cached data key (after a wrapping key change, or in tests).
    pub fn clear_cache(&self) {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// A new random data key for `env`: the unwrapped key and its wrapped form.
    pub(crate) async fn new_data_key(
        &self,
        env: &Environment,
    ) -> Result<(DataKey, String), CryptoError> {
        let bytes = random_key()?;
        let wrapped = self.wrapper.wrap(env, &bytes).await?;
        Ok((DataKey::from_bytes(&bytes)?, wrapped))
    }

    /// The unwrapped data key for a stored row, from the cache or the wrapper.
    pub(crate) async fn data_key(
        &self,
        env: &Environment,
        stored: &WrappedKey,
    ) -> Result<Arc<DataKey>, CryptoError> {
        let id = (env.clone(), stored.key_version);
        if let Some(key) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
        {
            return Ok(Arc::clone(key));
        }
        if stored.wrapper != self.wrapper.kind() {
            return Err(CryptoError::WrapperMismatch {
                stored: stored.wrapper.clone(),
                configured: self.wrapper.kind(),
            });
        }
        let bytes = self
            .wrapper
            .unwrap(env, stored.key_version, &stored.wrapped)
            .await?;
        let key = Arc::new(
            DataKey::from_bytes(&bytes).map_err(|_| CryptoError::Unwrap {
                environment: env.to_string(),
                key_version: stored.key_version,
            })?,
        );
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&key));
        Ok(key)
    }

    /// The cached data key `key_version` of `env`, if unwrapped before.
    pub(crate) fn cached(&self, env: &Environment, key_version: i64) -> Option<Arc<DataKey>> {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(env.clone(), key_version))
            .cloned()
    }

    /// Remembers a key this instance just created.
    pub(crate) fn remember(
        &self,
        env: &Environment,
        key_version: i64,
        key: DataKey,
    ) -> Arc<DataKey> {
        let key = Arc::new(key);
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((env.clone(), key_version), Arc::clone(&key));
        key
    }
}
