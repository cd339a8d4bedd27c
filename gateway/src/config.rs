//! Layered, validated configuration: a TOML file, then `PORTCULLIS_*` environment
//! variables, then command-line flags. Unknown keys are refused, every value is checked
//! before any port is bound, and every error names the field it is about.
//!
//! Every key, its default and the variable that overrides it is documented in
//! `docs/configuration.md`; keep the two in step.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyrotation::TokenType;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Prefix of the environment variables that override file settings.
pub const ENV_PREFIX: &str = "PORTCULLIS_";

/// What went wrong while reading or validating configuration. Each variant names the
/// field (as a dotted path, e.g. `server.listen`) so an operator knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A field has the wrong type, an unknown name, or a value that does not parse.
    #[error("invalid configuration at `{field}`: {message}")]
    Field {
        /// Dotted path of the offending field.
        field: String,
        /// Why it was refused.
        message: String,
    },
    /// An environment override could not be applied.
    #[error("invalid environment override {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// Why.
        message: String,
    },
}

impl ConfigError {
    fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Field {
            field: field.into(),
            message: message.into(),
        }
    }
}

// === Configuration tree ===

/// The whole configuration of one Portcullis instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners, limits and timeouts.
    #[serde(default)]
    pub server: ServerConfig,
    /// The certificate and key served on the HTTPS listener.
    pub tls: Option<TlsConfig>,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Span export (OpenTelemetry).
    #[serde(default)]
    pub tracing: TracingConfig,
    /// The database (clients, config center, audit).
    pub database: DatabaseConfig,
    /// Redis (refresh tokens, login counters, SSO state). Absent: in-process stores,
    /// which only a single `--dev` instance may use.
    pub redis: Option<RedisConfig>,
    /// Issued tokens.
    #[serde(default)]
    pub tokens: TokensConfig,
    /// Signing keys and their rotation.
    #[serde(default)]
    pub keys: KeysConfig,
    /// Refresh tokens: lifetimes and the re-use grace window.
    #[serde(default)]
    pub refresh: crate::refresh::RefreshSettings,
    /// Vault, where the key ring lives in production (`VAULT_ADDR`, `VAULT_TOKEN`,
    /// `VAULT_CACERT` fill in what is not set here).
    pub vault: Option<keyrotation::VaultSettings>,
    /// The admin API (keys, later clients and sessions).
    #[serde(default)]
    pub admin: AdminConfig,
    /// The config center: environments, encryption of values, watches.
    #[serde(default)]
    pub config_center: ConfigCenterConfig,
    /// SSO for console users: identity providers, role mapping, console session.
    #[serde(default)]
    pub sso: crate::sso::settings::SsoSettings,
    /// Login protection: per-IP rate limits, failure counters, trusted proxies.
    #[serde(default)]
    pub protection: crate::protect::ProtectionSettings,
    /// The reverse proxy to the admin cluster: nodes, timeouts, health, routes.
    #[serde(default)]
    pub proxy: crate::proxy::settings::ProxySettings,
    /// The audit trail: the queue to the database, where stored records are streamed.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// HTTPS listener.
    pub listen: SocketAddr,
    /// Plain-HTTP listener for `/healthz`, `/readyz`, `/metrics` and the admin API.
    pub admin_listen: SocketAddr,
    /// The externally visible base URL; the token issuer unless `tokens.issuer` is set.
    pub public_url: String,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Longest time a request may take, start to end (long-polls excepted when they exist).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A client must send its complete request head within this time: the first one
    /// counted from the end of the TLS handshake, later ones from their first byte.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client must finish the TLS handshake within this time.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// A connection with no request in flight for this long is closed gracefully; a
    /// request is in flight from its head to the end of its response body. Not zero.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Largest request head (request line plus headers) accepted, in bytes.
    pub max_header_bytes: usize,
    /// Most simultaneous connections on the HTTPS listener; more wait in the backlog.
    pub max_connections: usize,
    /// Threads serving HTTPS connections, each with its own single-threaded runtime (see
    /// `docs/architecture.md`); unset means one per core, `0` serves them on the shared
    /// runtime instead.
    pub workers: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            public_url: "https://localhost:8443".to_owned(),
            shutdown_grace: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_body_bytes: 1024 * 1024,
            max_header_bytes: 16 * 1024,
            max_connections: 10_000,
            workers: None,
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the files are checked for changes (SIGHUP re-reads them at once).
    #[serde(with = "humantime_serde", default = "default_tls_reload")]
    pub reload_interval: Duration,
}

fn default_tls_reload() -> Duration {
    Duration::from_secs(10)
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `portcullis=debug,info`, …
    pub level: String,
    /// `json` (one object per line) or `pretty` (for a terminal).
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Json,
        }
    }
}

/// `[tracing]`: export of request and dependency spans over OTLP/HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP traces URL, e.g. `http://127.0.0.1:4318/v1/traces` (a
    /// local OpenTelemetry Collector or agent). Unset: spans are not exported.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Share of new traces sampled, 0.0–1.0; a request carrying a `traceparent` follows
    /// its caller's decision.
    pub sample_ratio: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "portcullis".to_owned(),
            sample_ratio: 1.0,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://…` in production, `sqlite://…` for a single dev instance.
    pub url: SecretString,
    /// Pool size.
    #[serde(default = "default_db_pool")]
    pub max_connections: u32,
    /// Connections kept open while idle (Postgres), opened once the schema is in place.
    #[serde(default = "default_db_min_connections")]
    pub min_connections: u32,
    /// How long to wait for a connection from the pool.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub acquire_timeout: Duration,
}

fn default_db_pool() -> u32 {
    10
}

fn default_db_min_connections() -> u32 {
    4
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://…` or `rediss://…`; with `cluster = true`, the seed nodes, comma-separated.
    pub url: SecretString,
    /// Redis Cluster: `url` lists seed nodes; every key of one refresh-token family shares
    /// a hash slot.
    #[serde(default)]
    pub cluster: bool,
    /// How long one Redis command may take before the feature answers 503.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub command_timeout: Duration,
}

/// `[tokens]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokensConfig {
    /// `iss` of issued tokens; defaults to `server.public_url`.
    pub issuer: Option<String>,
    /// Lifetime of access tokens.
    #[serde(with = "humantime_serde")]
    pub access_token_lifetime: Duration,
    /// Clock skew tolerated when checking `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Key of the keyed hashes that store client secrets and refresh tokens: base64 of at
    /// least 32 random bytes, the same on every instance. Prefer `hash_key_file` or the
    /// environment (`PORTCULLIS_TOKENS__HASH_KEY`).
    pub hash_key: Option<SecretString>,
    /// A file holding `hash_key` (base64).
    pub hash_key_file: Option<PathBuf>,
    /// How long an instance keeps a client's record (secret hashes, grants, scopes) before
    /// reading it again; changes made on other instances take up to this long to apply.
    /// `0s` reads the database on every token request.
    #[serde(with = "humantime_serde")]
    pub client_cache_ttl: Duration,
    /// How many verified access tokens an instance remembers, so that a token presented
    /// again is not verified again (`0` turns the cache off). A remembered token is still
    /// checked for expiry and for its key being trusted on every use.
    pub verified_cache_entries: usize,
    /// Whether an access token typed `JWT` (any case, or `application/jwt`) is accepted
    /// besides `at+jwt`: tokens issued while [`Self::access_token_typ`] is `JWT`, and by
    /// versions before access tokens were typed, carry `typ: JWT`. Every token accepted only
    /// thanks to this is counted in `portcullis_access_tokens_legacy_typ_total`; once that
    /// stays flat for the longest access-token lifetime plus leeway after every instance
    /// issues `at+jwt`, set it to `false` to accept `at+jwt` only. A token with no `typ`, or
    /// any other, is refused either way. Must stay `true` while `access_token_typ` is `JWT`
    /// (validation refuses the combination: every token issued would be refused).
    pub accept_jwt_typ: bool,
    /// The `typ` access tokens are signed with: `JWT` (the default, what every relying party
    /// accepts, Spring Security's default JWT decoder included) or `at+jwt` (RFC 9068 §2.1),
    /// once every relying party accepts that. Read as either name in any case.
    #[serde(deserialize_with = "access_token_typ")]
    pub access_token_typ: TokenType,
}

impl Default for TokensConfig {
    fn default() -> Self {
        Self {
            issuer: None,
            access_token_lifetime: Duration::from_secs(3600),
            leeway: Duration::from_secs(30),
            hash_key: None,
            hash_key_file: None,
            client_cache_ttl: Duration::from_secs(5),
            verified_cache_entries: 10_000,
            accept_jwt_typ: true,
            access_token_typ: TokenType::Jwt,
        }
    }
}

/// `tokens.access_token_typ`: `JWT` or `at+jwt`, in any case; kept in its canonical
/// spelling ([`TokenType::as_str`]).
fn access_token_typ<'de, D: serde::Deserializer<'de>>(d: D) -> Result<TokenType, D::Error> {
    let name = String::deserialize(d)?;
    [TokenType::Jwt, TokenType::AccessToken]
        .into_iter()
        .find(|typ| typ.as_str().eq_ignore_ascii_case(&name))
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown access token type `{name}`: expected \"JWT\" or \"at+jwt\""
            ))
        })
}

/// A cached token holds its text (~0.5–1 KiB) and claims: a million is ~1–2 GiB, the
/// most that makes sense for one instance.
const MAX_VERIFIED_CACHE_ENTRIES: usize = 1_000_000;

/// The most connections `server.max_connections` may allow: far more than one instance
/// holds (each costs memory and a file descriptor), and far below what its semaphore can
/// count, which a value meant as "no limit" overflowed at start-up.
pub const MAX_CONNECTIONS: usize = 10_000_000;

/// `[keys]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Where the key ring lives: `vault` (production) or `file` (a single dev instance).
    pub source: KeySourceKind,
    /// Directory of the ring file when `source = "file"`; defaults to the data directory.
    pub file_dir: Option<PathBuf>,
    /// Signing algorithm of new keys: `ES256`, `EdDSA` or `RS256`.
    pub algorithm: String,
    /// Algorithms accepted when verifying (pinned; never taken from a token).
    pub accepted_algorithms: Vec<String>,
    /// How long a key signs before the next one takes over.
    #[serde(with = "humantime_serde")]
    pub rotation_period: Duration,
    /// How long before it signs a new key is published in JWKS.
    #[serde(with = "humantime_serde")]
    pub prepublish_lead: Duration,
    /// How long a key keeps verifying after it stopped signing.
    #[serde(with = "humantime_serde")]
    pub overlap: Duration,
    /// How often every instance re-reads the ring.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// `in-process`: instances rotate themselves (check-and-set); `external`: instances
    /// only read, and `portcullis keys rotate --scheduled` rotates.
    pub rotation: RotationKind,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            source: KeySourceKind::Vault,
            file_dir: None,
            algorithm: "ES256".to_owned(),
            accepted_algorithms: vec!["ES256".to_owned(), "EdDSA".to_owned(), "RS256".to_owned()],
            rotation_period: Duration::from_secs(30 * 86_400),
            prepublish_lead: Duration::from_secs(7 * 86_400),
            overlap: Duration::from_secs(30 * 86_400),
            reload_interval: Duration::from_secs(30),
            rotation: RotationKind::InProcess,
        }
    }
}

/// Where the ring lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySourceKind {
    /// Vault / OpenBao KV v2.
    Vault,
    /// A local file (mode 0600).
    File,
}

/// Who rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotationKind {
    /// Instances rotate with check-and-set.
    InProcess,
    /// A separate scheduled job rotates; instances only read.
    External,
}

/// `[admin]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token required on the admin API (`/admin/*` on the admin listener).
    /// Required when the admin listener is not on a loopback address.
    pub token: Option<SecretString>,
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Where every stored audit record is also written, one JSON object per line:
    /// `"none"` (the default), `"stdout"`, or `"file:/absolute/path"` (appended; follows
    /// rotation).
    pub sink: AuditSinkKind,
    /// How many audit events may wait in memory for the database: enough for the events
    /// recorded during the longest database stall to ride out (events per second × its
    /// seconds), at about 400–600 bytes each. Past it an event is dropped: counted in
    /// `portcullis_audit_dropped_total` and logged in full. Read at start.
    pub queue_capacity: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            sink: AuditSinkKind::None,
            queue_capacity: 65_536,
        }
    }
}

/// The fewest events `audit.queue_capacity` may hold: about two of the writer's linger
/// batches (500), so that an ordinary burst is not dropped while one append is under way.
const MIN_AUDIT_QUEUE_CAPACITY: usize = 1_024;

/// The most events `audit.queue_capacity` may hold: about 2.3 GiB of events, two minutes
/// of 32,000 tokens a second; a longer outage is better ridden out in the log than in an
/// instance's memory.
const MAX_AUDIT_QUEUE_CAPACITY: usize = 4_194_304;

/// Where audit records are streamed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum AuditSinkKind {
    /// Nowhere.
    #[default]
    None,
    /// Standard output.
    Stdout,
    /// Appended to this file.
    File(PathBuf),
}

impl TryFrom<String> for AuditSinkKind {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "none" => Ok(Self::None),
            "stdout" => Ok(Self::Stdout),
            _ => match s.strip_prefix("file:") {
                Some(path) if Path::new(path).is_absolute() => Ok(Self::File(PathBuf::from(path))),
                _ => Err("expected \"none\", \"stdout\" or \"file:/absolute/path\"".to_owned()),
            },
        }
    }
}

/// `[config_center]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigCenterConfig {
    /// The environments configuration is kept for; names are lower-case ASCII.
    pub environments: Vec<String>,
    /// What wraps the per-environment data keys: `transit` (Vault Transit, production)
    /// or `local` (a master key file, a single dev instance). Unset: `transit` when a
    /// `[vault]` section exists, `local` otherwise.
    pub key_wrapper: Option<KeyWrapperKind>,
    /// The master key file when the wrapper is `local` (created, mode 0600, if missing);
    /// defaults to `config-master.key` in `keys.file_dir`.
    pub master_key_file: Option<PathBuf>,
    /// The Vault Transit mount when `key_wrapper = "transit"`.
    pub transit_mount: String,
    /// The Transit key that wraps data keys.
    pub transit_key: String,
    /// How often the releases this instance serves are compared with the database, so a
    /// lost change notification heals by itself.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// The environment whose application `portcullis` holds this instance's own runtime
    /// settings (log level, rate limits, lockout policy), applied without a restart.
    /// Unset: runtime settings are off.
    pub runtime_environment: Option<String>,
    /// The longest a long-poll is held before it answers 304; shorter than
    /// `server.request_timeout` and every proxy's read timeout.
    #[serde(with = "humantime_serde")]
    pub long_poll_timeout: Duration,
    /// The most SSE watches one client address may hold open on this instance (the
    /// address behind trusted proxies, as for rate limits), so that one client cannot
    /// take every connection; past it a watch is answered 429 `too_many_watches`.
    /// 0: no limit.
    pub max_watches_per_client: usize,
}

impl Default for ConfigCenterConfig {
    fn default() -> Self {
        Self {
            environments: vec!["dev".to_owned(), "test".to_owned(), "prod".to_owned()],
            key_wrapper: None,
            master_key_file: None,
            transit_mount: "transit".to_owned(),
            transit_key: "portcullis-config".to_owned(),
            reconcile_interval: Duration::from_secs(30),
            runtime_environment: None,
            long_poll_timeout: Duration::from_secs(25),
            max_watches_per_client: 1000,
        }
    }
}

/// What wraps config data keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyWrapperKind {
    /// Vault Transit.
    Transit,
    /// A local master key file.
    Local,
}

// === Loading ===

/// Reads `path`, applies `PORTCULLIS_*` overrides from `env`, and validates.
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    from_table(table, env)
}

/// Builds a configuration from an already parsed tree plus environment overrides.
pub fn from_table(
    mut table: toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    apply_env(&mut table, env)?;
    let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(
        |e: serde_path_to_error::Error<toml::de::Error>| {
            let field = e.path().to_string();
            ConfigError::field(field, e.inner().message().to_owned())
        },
    )?;
    config.validate()?;
    Ok(config)
}

/// `PORTCULLIS_SERVER__LISTEN=0.0.0.0:443` sets `server.listen`: a double underscore
/// separates sections, names are lower-cased. Values are read as TOML when they parse
/// (numbers, booleans, arrays) and as strings otherwise.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    // sorted, so the outcome never depends on the environment's order
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
        .collect();
    for (var, value) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var,
                message: "empty path segment".to_owned(),
            });
        }
        let parsed = parse_env_value(&value);
        let mut node = &mut *table;
        let (last, parents) = path.split_last().ok_or_else(|| ConfigError::Env {
            var: var.clone(),
            message: "no field named".to_owned(),
        })?;
        for segment in parents {
            let entry = node
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
                var: var.clone(),
                message: format!("`{segment}` is not a section"),
            })?;
        }
        node.insert(last.clone(), parsed);
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    // `key = <raw>` parsed as TOML gives numbers, booleans and arrays their types
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

// === Validation ===

impl Config {
    /// Checks what types alone cannot: files exist, values are in range, combinations
    /// make sense. Runs before any port is bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.max_header_bytes < 8192 {
            return Err(ConfigError::field(
                "server.max_header_bytes",
                "must be at least 8192",
            ));
        }
        if s.max_body_bytes == 0 {
            return Err(ConfigError::field(
                "server.max_body_bytes",
                "must be greater than 0",
            ));
        }
        if s.max_connections == 0 {
            return Err(ConfigError::field(
                "server.max_connections",
                "must be greater than 0",
            ));
        }
        if s.max_connections > MAX_CONNECTIONS {
            return Err(ConfigError::field(
                "server.max_connections",
                format!("must be at most {MAX_CONNECTIONS}"),
            ));
        }
        if s.workers.is_some_and(|w| w > crate::workers::MAX_WORKERS) {
            return Err(ConfigError::field(
                "server.workers",
                format!("must be at most {}", crate::workers::MAX_WORKERS),
            ));
        }
        for (name, d) in [
            ("server.request_timeout", s.request_timeout),
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.tls_handshake_timeout", s.tls_handshake_timeout),
            ("server.idle_timeout", s.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::field(name, "must be greater than 0"));
            }
        }
        if s.listen == s.admin_listen && s.listen.port() != 0 {
            return Err(ConfigError::field(
                "server.admin_listen",
                "must differ from server.listen",
            ));
        }
        check_url("server.public_url", &s.public_url, &["https", "http"])?;
        if let Some(issuer) = &self.tokens.issuer {
            check_url("tokens.issuer", issuer, &["https", "http"])?;
        }

        match &self.tls {
            None => {
                return Err(ConfigError::field(
                    "tls",
                    "missing: the HTTPS listener needs `tls.cert` and `tls.key`",
                ));
            }
            Some(tls) => {
                check_readable_file("tls.cert", &tls.cert)?;
                check_readable_file("tls.key", &tls.key)?;
                if tls.reload_interval.is_zero() {
                    return Err(ConfigError::field(
                        "tls.reload_interval",
                        "must be greater than 0",
                    ));
                }
            }
        }

        let db = self.database.url.expose_secret();
        if !(db.starts_with("postgres://")
            || db.starts_with("postgresql://")
            || db.starts_with("sqlite:"))
        {
            // never echo the URL: it may carry a password
            return Err(ConfigError::field(
                "database.url",
                "must start with postgres://, postgresql:// or sqlite:",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::field(
                "database.max_connections",
                "must be greater than 0",
            ));
        }
        if self.database.min_connections > self.database.max_connections {
            return Err(ConfigError::field(
                "database.min_connections",
                "must not be greater than database.max_connections",
            ));
        }
        // zero is no "no timeout" here: every wait would time out at once, and the
        // database (or Redis) would look away while it is fine
        if self.database.acquire_timeout.is_zero() {
            return Err(ConfigError::field(
                "database.acquire_timeout",
                "must be greater than 0",
            ));
        }
        if let Some(redis) = &self.redis {
            let ok = redis.url.expose_secret().split(',').all(|url| {
                let url = url.trim();
                url.starts_with("redis://")
                    || url.starts_with("rediss://")
                    || url.starts_with("redis+unix://")
            });
            if !ok {
                return Err(ConfigError::field(
                    "redis.url",
                    "must start with redis://, rediss:// or redis+unix://",
                ));
            }
            if redis.command_timeout.is_zero() {
                return Err(ConfigError::field(
                    "redis.command_timeout",
                    "must be greater than 0",
                ));
            }
        }

        if self.tokens.access_token_lifetime < Duration::from_secs(1) {
            return Err(ConfigError::field(
                "tokens.access_token_lifetime",
                "must be at least 1s",
            ));
        }
        if let Some(endpoint) = &self.tracing.otlp_endpoint {
            check_url("tracing.otlp_endpoint", endpoint, &["http"])?;
        }
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            return Err(ConfigError::field(
                "tracing.sample_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.tracing.service_name.trim().is_empty() {
            return Err(ConfigError::field(
                "tracing.service_name",
                "must not be empty",
            ));
        }
        if self.tokens.access_token_typ == TokenType::Jwt && !self.tokens.accept_jwt_typ {
            return Err(ConfigError::field(
                "tokens.accept_jwt_typ",
                "must be true while tokens.access_token_typ is \"JWT\" (the default): every \
                 access token this gateway issues would be refused; set \
                 tokens.access_token_typ = \"at+jwt\" first",
            ));
        }
        if self.tokens.verified_cache_entries > MAX_VERIFIED_CACHE_ENTRIES {
            return Err(ConfigError::field(
                "tokens.verified_cache_entries",
                format!("must be at most {MAX_VERIFIED_CACHE_ENTRIES}"),
            ));
        }
        self.validate_keys()?;
        self.server_key()?;
        self.refresh
            .validate()
            .map_err(|e| ConfigError::field("refresh", e.to_string()))?;
        if let Some(vault) = &self.vault {
            if let Some(addr) = &vault.addr {
                check_url("vault.addr", addr, &["https", "http"])?;
            }
            if let Some(ca) = &vault.cacert {
                check_readable_file("vault.cacert", ca)?;
            }
            if let keyrotation::VaultAuth::AppRole {
                secret_id,
                secret_id_file,
                ..
            } = &vault.auth
            {
                match (secret_id, secret_id_file) {
                    (None, None) => {
                        return Err(ConfigError::field(
                            "vault.auth.secret_id_file",
                            "AppRole needs secret_id or secret_id_file",
                        ));
                    }
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::field(
                            "vault.auth.secret_id",
                            "set secret_id or secret_id_file, not both",
                        ));
                    }
                    (None, Some(f)) => check_readable_file("vault.auth.secret_id_file", f)?,
                    (Some(_), None) => {}
                }
            }
        }

        self.validate_config_center()?;
        self.sso
            .validate()
            .map_err(|e| ConfigError::field(e.field, e.message))?;
        // a console session is a refresh family, which dies at refresh.absolute_lifetime
        // anyway: a longer sso.session_max_lifetime (the 12h default beside a short
        // absolute lifetime, say) is not an error, the shorter of the two ends a session
        self.protection
            .validate()
            .map_err(|(field, message)| ConfigError::field(field, message))?;
        self.proxy
            .validate(self.server.request_timeout)
            .map_err(|e| ConfigError::field(e.field, e.message))?;

        if !(MIN_AUDIT_QUEUE_CAPACITY..=MAX_AUDIT_QUEUE_CAPACITY)
            .contains(&self.audit.queue_capacity)
        {
            return Err(ConfigError::field(
                "audit.queue_capacity",
                format!(
                    "must be between {MIN_AUDIT_QUEUE_CAPACITY} and {MAX_AUDIT_QUEUE_CAPACITY} \
                     (events)"
                ),
            ));
        }
        if let AuditSinkKind::File(path) = &self.audit.sink {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            if path.is_dir() || !dir.is_some_and(Path::is_dir) {
                return Err(ConfigError::field(
                    "audit.sink",
                    format!(
                        "{}: must name a file in an existing directory",
                        path.display()
                    ),
                ));
            }
        }

        if !self.server.admin_listen.ip().is_loopback() && self.admin.token.is_none() {
            return Err(ConfigError::field(
                "admin.token",
                "required when server.admin_listen is not a loopback address",
            ));
        }
        Ok(())
    }

    fn validate_keys(&self) -> Result<(), ConfigError> {
        let k = &self.keys;
        check_algorithm("keys.algorithm", &k.algorithm)?;
        if k.accepted_algorithms.is_empty() {
            return Err(ConfigError::field(
                "keys.accepted_algorithms",
                "must name at least one algorithm",
            ));
        }
        for (i, a) in k.accepted_algorithms.iter().enumerate() {
            check_algorithm(&format!("keys.accepted_algorithms[{i}]"), a)?;
        }
        if !k.accepted_algorithms.iter().any(|a| a == &k.algorithm) {
            return Err(ConfigError::field(
                "keys.accepted_algorithms",
                "must include keys.algorithm, or issued tokens would not verify",
            ));
        }
        for (name, d) in [
            ("keys.reload_interval", k.reload_interval),
            ("keys.rotation_period", k.rotation_period),
            ("keys.prepublish_lead", k.prepublish_lead),
        ] {
            if d.is_zero() {
                return Err(ConfigError::field(name, "must be greater than 0"));
            }
        }
        if k.prepublish_lead >= k.rotation_period {
            return Err(ConfigError::field(
                "keys.prepublish_lead",
                "must be shorter than keys.rotation_period",
            ));
        }
        let (field, longest) = self.longest_configured_lifetime();
        let needed = longest.saturating_add(self.tokens.leeway);
        if k.overlap < needed {
            return Err(ConfigError::field(
                "keys.overlap",
                format!(
                    "must be at least the longest token lifetime ({field} = {}) plus \
                     tokens.leeway ({}): {}",
                    humantime::format_duration(longest),
                    humantime::format_duration(self.tokens.leeway),
                    humantime::format_duration(needed)
                ),
            ));
        }
        self.key_policy()
            .map_err(|e| ConfigError::field("keys", e.to_string()))?;
        match k.source {
            KeySourceKind::Vault if self.vault.is_none() => Err(ConfigError::field(
                "vault",
                "missing: keys.source = \"vault\" needs a [vault] section",
            )),
            KeySourceKind::File if k.file_dir.is_none() => Err(ConfigError::field(
                "keys.file_dir",
                "missing: keys.source = \"file\" needs a directory for the ring",
            )),
            _ => Ok(()),
        }
    }

    fn validate_config_center(&self) -> Result<(), ConfigError> {
        let c = &self.config_center;
        if c.environments.is_empty() {
            return Err(ConfigError::field(
                "config_center.environments",
                "must name at least one environment",
            ));
        }
        let environments = config_center::Environments::new(c.environments.iter())
            .map_err(|e| ConfigError::field("config_center.environments", e.to_string()))?;
        if let Some(env) = &c.runtime_environment {
            environments.parse(env).map_err(|e| {
                ConfigError::field("config_center.runtime_environment", e.to_string())
            })?;
        }
        for (name, d) in [
            ("config_center.reconcile_interval", c.reconcile_interval),
            ("config_center.long_poll_timeout", c.long_poll_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::field(name, "must be greater than 0"));
            }
        }
        if c.long_poll_timeout >= self.server.request_timeout
            || c.long_poll_timeout >= Duration::from_secs(60)
        {
            return Err(ConfigError::field(
                "config_center.long_poll_timeout",
                "must be shorter than server.request_timeout and than 60s (the read \
                 timeout of proxies in front)",
            ));
        }
        self.config_wrapper().map(|_| ())
    }

    /// The wrapper of config data keys, resolved: (`transit`, None) or (`local`, the
    /// master key file).
    pub fn config_wrapper(&self) -> Result<(KeyWrapperKind, Option<PathBuf>), ConfigError> {
        let c = &self.config_center;
        let kind = c.key_wrapper.unwrap_or(if self.vault.is_some() {
            KeyWrapperKind::Transit
        } else {
            KeyWrapperKind::Local
        });
        match kind {
            KeyWrapperKind::Transit if self.vault.is_none() => Err(ConfigError::field(
                "config_center.key_wrapper",
                "`transit` needs a [vault] section",
            )),
            KeyWrapperKind::Transit => Ok((kind, None)),
            KeyWrapperKind::Local => {
                let file = c
                    .master_key_file
                    .clone()
                    .or_else(|| {
                        self.keys
                            .file_dir
                            .as_ref()
                            .map(|d| d.join("config-master.key"))
                    })
                    .ok_or_else(|| {
                        ConfigError::field(
                            "config_center.master_key_file",
                            "missing: the `local` wrapper needs a master key file",
                        )
                    })?;
                Ok((kind, Some(file)))
            }
        }
    }

    /// The longest lifetime the configuration gives tokens signed by our keys, and the
    /// field that sets it: the longer of `tokens.access_token_lifetime` and
    /// `sso.access_token_lifetime` (console access tokens). A client's own lifetime is held
    /// to [`Self::max_token_lifetime`] instead, when it is set.
    pub fn longest_configured_lifetime(&self) -> (&'static str, Duration) {
        if self.sso.access_token_lifetime > self.tokens.access_token_lifetime {
            ("sso.access_token_lifetime", self.sso.access_token_lifetime)
        } else {
            (
                "tokens.access_token_lifetime",
                self.tokens.access_token_lifetime,
            )
        }
    }

    /// The longest lifetime any token we sign may have: `keys.overlap` less
    /// `tokens.leeway`. A key verifies for `overlap` after it stops signing, so a token
    /// signed just before then still verifies until it expires.
    pub fn max_token_lifetime(&self) -> Duration {
        self.keys.overlap.saturating_sub(self.tokens.leeway)
    }

    /// The signing-key policy, checked against the longest token lifetime plus leeway.
    pub fn key_policy(&self) -> Result<keyrotation::Policy, keyrotation::KeyError> {
        let k = &self.keys;
        let policy = keyrotation::Policy {
            algorithm: k.algorithm.parse()?,
            rotation_period: k.rotation_period,
            prepublish_lead: k.prepublish_lead,
            overlap: k.overlap,
            ..keyrotation::Policy::default()
        };
        policy.validate(self.longest_configured_lifetime().1, self.tokens.leeway)?;
        Ok(policy)
    }

    /// The algorithms accepted when verifying, as configured (validated at load).
    pub fn accepted_algorithms(&self) -> Vec<keyrotation::KeyAlgorithm> {
        self.keys
            .accepted_algorithms
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    /// The keyed-hash key from `tokens.hash_key` or `tokens.hash_key_file`.
    pub fn server_key(&self) -> Result<crate::server_key::ServerKey, ConfigError> {
        use crate::server_key::ServerKey;
        match (&self.tokens.hash_key, &self.tokens.hash_key_file) {
            (Some(_), Some(_)) => Err(ConfigError::field(
                "tokens.hash_key",
                "set either tokens.hash_key or tokens.hash_key_file, not both",
            )),
            (Some(key), None) => ServerKey::from_base64(key.expose_secret())
                .map_err(|e| ConfigError::field("tokens.hash_key", e.to_string())),
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    ConfigError::field(
                        "tokens.hash_key_file",
                        format!("cannot read {}: {e}", file.display()),
                    )
                })?;
                ServerKey::from_base64(&text)
                    .map_err(|e| ConfigError::field("tokens.hash_key_file", e.to_string()))
            }
            (None, None) => Err(ConfigError::field(
                "tokens.hash_key",
                "missing: set tokens.hash_key_file (or PORTCULLIS_TOKENS__HASH_KEY) to base64 \
                 of 32 random bytes, e.g. `openssl rand -base64 32`",
            )),
        }
    }

    /// `iss` of issued tokens.
    pub fn issuer(&self) -> String {
        self.tokens
            .issuer
            .clone()
            .unwrap_or_else(|| self.server.public_url.trim_end_matches('/').to_owned())
    }
}

fn check_algorithm(field: &str, value: &str) -> Result<(), ConfigError> {
    value
        .parse::<keyrotation::KeyAlgorithm>()
        .map(|_| ())
        .map_err(|_| {
            ConfigError::field(
                field,
                format!("unsupported algorithm `{value}`; use ES256, EdDSA or RS256"),
            )
        })
}

fn check_url(field: &str, value: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let ok = schemes.iter().any(|s| {
        value
            .strip_prefix(s)
            .and_then(|rest| rest.strip_prefix("://"))
            .is_some_and(|host| !host.is_empty())
    });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::field(
            field,
            format!("must be an absolute URL ({})", schemes.join(" or ")),
        ))
    }
}

fn check_readable_file(field: &str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::field(
            field,
            format!("{} is not a file", path.display()),
        )),
        Err(e) => Err(ConfigError::field(
            field,
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests;
