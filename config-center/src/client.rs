//! The client library Rust nodes use to fetch, verify and watch their configuration.
//!
//! [`Client::start`] fetches the snapshot of one (environment, application) from the first
//! gateway that answers, verifies it, stores it as the last-known-good copy on disk and
//! starts a background watch: Server-Sent Events from the held version, reconnecting with
//! jittered exponential backoff (resuming with `Last-Event-ID`), falling back to long-poll
//! when a gateway does not stream. When every gateway is down at start, the disk copy is used.
//!
//! Every snapshot must carry a detached JWS (`header..signature`) over its
//! [`ReleaseClaims`](crate::ReleaseClaims) made with a key from the gateway's JWKS
//! (`GET /oauth2/jwks`; ES256, EdDSA or RS256; the JWKS is fetched again when a `kid` is
//! unknown, at most once per gateway every [`JWKS_UNKNOWN_KID_INTERVAL`], and once the
//! `max-age` it was served with has passed), the entries must hash to the claimed content
//! hash, and the version must not go backwards. Anything else is refused and the held
//! copy is kept.
//!
//! "Backwards" counts from the last-known-good copy too: a restarted node holds the copy
//! before it asks any gateway, and refuses a release older than it (a stale gateway, or an
//! old, validly signed release replayed) unless the copy's own signature fails to verify
//! against the gateway's JWKS with the key it names (a copy signed by a key that JWKS does
//! not list stays the floor). It then starts from the copy and waits for a newer release. A
//! rollback is no exception to make: it republishes the old content as a new, higher
//! version (`Store::rollback`), as an aborted gray release does.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, IF_NONE_MATCH};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use url::Url;

use crate::model::{AppName, Environment, Format};
use crate::signing::{self, signing_payload};
use crate::wire::{ErrorBody, Snapshot};

/// `segments` under the gateway's base URL, which may have a path of its own
/// (`https://edge.example/portcullis/` behind a proxy that maps a prefix): each segment
/// is appended and percent-encoded, never resolved against the host's root.
fn under(gateway: &Url, segments: &[&str]) -> Result<Url, ClientError> {
    let mut url = gateway.clone();
    url.path_segments_mut()
        .map_err(|()| ClientError::Config(format!("{gateway} cannot be a base URL")))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// Largest SSE event the client accepts (a snapshot on one line).
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// What the client is told to do.
#[derive(Clone)]
pub struct ClientConfig {
    /// Gateway base URLs (`https://portcullis.example:8443`), tried in order at start; the
    /// watch starts at a random one and moves to the next after a failure.
    pub gateways: Vec<Url>,
    /// The environment to read.
    pub environment: String,
    /// The application to read.
    pub application: String,
    /// The bearer token (`config:read:<env>` scope); replace it with
    /// [`Client::set_token`] before it expires. The gateway ends a watch when the token it
    /// was opened with expires; the client then reconnects within a second (a random
    /// delay, so that nodes do not all come back at once) with the token set last,
    /// resuming from the version it holds (`Last-Event-ID`).
    pub token: SecretString,
    /// This node's instance id, for gray releases: `[A-Za-z0-9._:-]`, 1 to 128 bytes, no
    /// `..` (the grammar of a gray release's selector); [`Client::start`] refuses anything
    /// else with [`ClientError::Config`], as every gateway would refuse it.
    pub instance: Option<String>,
    /// This node's labels, for gray releases: names and values in the grammar of
    /// `instance` (so not Kubernetes' `app.kubernetes.io/name`: map such a label to a
    /// name of your own).
    pub labels: BTreeMap<String, String>,
    /// Directory of the last-known-good copy: created `0700` if missing, and made `0700`
    /// at start and on every write if it was looser (a directory the node may write into
    /// but not change, such as a mount point it does not own, is warned about once and
    /// used as it is). The copy is written `0600`; one left looser is made `0600` at
    /// start, or replaced by the next write when the node cannot change its mode.
    pub cache_dir: PathBuf,
    /// Accepted signature algorithms (default ES256, EdDSA, RS256).
    pub algorithms: Vec<Algorithm>,
    /// Extra trusted root certificates (PEM) for the gateways' TLS.
    pub ca_pem: Option<Vec<u8>>,
    /// First reconnect backoff (default 250 ms, at least 10 ms); doubles up to
    /// `backoff_max`. Each delay is drawn at random between zero and the current backoff.
    /// It is also the first step of the checks of an unverified copy (see
    /// [`Origin::Disk`]). [`Client::start`] refuses anything shorter with
    /// [`ClientError::Config`]: it would not pace the watch.
    pub backoff_initial: Duration,
    /// Longest reconnect delay (default 30 s; at least `backoff_initial`, or
    /// [`Client::start`] refuses it).
    pub backoff_max: Duration,
    /// Timeout of a plain request (default 10 s).
    pub request_timeout: Duration,
    /// A stream that says nothing (not even keep-alive) this long is reconnected
    /// (default 45 s: three missed keep-alives).
    pub idle_timeout: Duration,
    /// The longest a gateway may hold a long-poll before it answers (default 60 s: the
    /// gateways' `config_center.long_poll_timeout` is 25 s by default and always under
    /// 60 s). A long-poll unanswered after this plus `request_timeout` is given up as
    /// failed; set it to the gateways' setting to notice a silent gateway sooner.
    pub long_poll_timeout: Duration,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("gateways", &self.gateways)
            .field("environment", &self.environment)
            .field("application", &self.application)
            .field("instance", &self.instance)
            .field("labels", &self.labels)
            .field("cache_dir", &self.cache_dir)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// A configuration with defaults for everything but the essentials.
    pub fn new(
        gateways: Vec<Url>,
        environment: impl Into<String>,
        application: impl Into<String>,
        token: SecretString,
        cache_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            gateways,
            environment: environment.into(),
            application: application.into(),
            token,
            instance: None,
            labels: BTreeMap::new(),
            cache_dir: cache_dir.into(),
            algorithms: vec![Algorithm::ES256, Algorithm::EdDSA, Algorithm::RS256],
            ca_pem: None,
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(45),
            long_poll_timeout: Duration::from_secs(60),
        }
    }
}

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration is unusable.
    #[error("client configuration: {0}")]
    Config(String),
    /// A gateway could not be reached or the connection broke.
    #[error("gateway {gateway}: {reason}")]
    Transport {
        /// The gateway's base URL.
        gateway: String,
        /// What failed.
        reason: String,
    },
    /// A gateway answered with an unexpected status.
    #[error("gateway {gateway} answered {status}: {error}")]
    Status {
        /// The gateway's base URL.
        gateway: String,
        /// The HTTP status.
        status: u16,
        /// The `error` code of its body, if any.
        error: String,
    },
    /// No gateway served the node, and one answered that it has no release of this
    /// (environment, application) (404 `not_found`).
    #[error("no release of this environment and application exists")]
    NoRelease,
    /// The token was refused (401/403).
    #[error("the gateway refused the token ({0})")]
    Unauthorized(u16),
    /// The snapshot's signature does not verify.
    #[error("snapshot signature refused: {0}")]
    Signature(String),
    /// The snapshot is signed by a key (`kid`) that the gateway's JWKS does not list, even
    /// when fetched again (or fetched again for an unknown `kid` less than
    /// [`JWKS_UNKNOWN_KID_INTERVAL`] ago).
    #[error("snapshot signed by key `{0}`, which the gateway's JWKS does not list")]
    UnknownKey(String),
    /// The entries do not hash to the signed content hash.
    #[error("snapshot content does not match its content hash")]
    Tampered,
    /// The snapshot is for another environment or application.
    #[error("snapshot is for {environment}/{application}, not the configured one")]
    WrongTarget {
        /// Its environment.
        environment: String,
        /// Its application.
        application: String,
    },
    /// The snapshot is older than the one held.
    #[error("snapshot version {offered} is older than the held version {held}")]
    Downgrade {
        /// The version held.
        held: u64,
        /// The version offered.
        offered: u64,
    },
    /// The JWKS could not be fetched or read.
    #[error("JWKS: {0}")]
    Jwks(String),
    /// The last-known-good copy could not be read or written.
    #[error("last-known-good copy {path}: {reason}")]
    Cache {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No gateway answered and there is no last-known-good copy.
    #[error("no gateway is reachable and there is no last-known-good copy ({0})")]
    Unavailable(String),
    /// A value does not deserialize into the requested type.
    #[error("value of `{key}` does not deserialize: {reason}")]
    Decode {
        /// The key.
        key: String,
        /// Why (never the value).
        reason: String,
    },
}

/// Where the held snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A gateway (verified).
    Gateway,
    /// The last-known-good copy on disk (verified when it was written); no gateway
    /// answered, or none had a release at least as new as it. While it is held and its
    /// signature has not been verified against a gateway's JWKS, the watch checks it: it
    /// asks a gateway for its current snapshot as it starts, and, while that check cannot
    /// conclude, again on a backoff of its own (from `backoff_initial` up to
    /// `backoff_max`), each time the next gateway, whether a stream is open or not: the
    /// same or a newer version makes the origin [`Origin::Gateway`] again, and an older
    /// one is taken if the copy does not verify (the watch then resumes from it). The
    /// watch itself goes on from the copy meanwhile, beside the checks: a check that fails
    /// is logged, not counted as a failure of the watch, and does not delay it.
    Disk,
}

/// How the background watch is doing, for a node's health checks and metrics
/// ([`Client::watch_status`], [`Client::subscribe_status`]).
///
/// The watch is failing when `last_error_at` is later than `last_contact`; how long it has
/// gone without news is the time since `last_contact`. Where the held snapshot came from
/// is [`Client::origin`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WatchStatus {
    /// The watch's last attempt reached a gateway and nothing has failed since: a stream
    /// is open, or the last long-poll was answered.
    pub connected: bool,
    /// When a gateway last answered this node: the snapshot fetched at start, a stream
    /// opened or a chunk on it (keep-alives included), a long-poll's answer.
    pub last_contact: Option<SystemTime>,
    /// Why the watch (or the start) last failed: a gateway away, a token refused, a
    /// release refused. Kept once the watch recovers; compare `last_error_at`.
    pub last_error: Option<String>,
    /// When it failed.
    pub last_error_at: Option<SystemTime>,
}

struct Shared {
    config: ClientConfig,
    env: Environment,
    app: AppName,
    http: reqwest::Client,
    token: Mutex<SecretString>,
    jwks: Mutex<Option<CachedJwks>>,
    /// When each gateway's JWKS was last fetched for a `kid` the held set lacks.
    kid_refetches: RefetchPace,
    current: watch::Sender<Arc<Snapshot>>,
    status: watch::Sender<WatchStatus>,
    origin: Mutex<Origin>,
    /// The held copy read from disk has had its signature verified in this run.
    copy_verified: Mutex<bool>,
    /// This run has warned that the cache directory cannot be made private.
    dir_warned: AtomicBool,
}

/// The gateway's JWKS as last fetched.
struct CachedJwks {
    set: JwkSet,
    fetched: tokio::time::Instant,
    /// How long it may be used: the response's `Cache-Control: max-age`, within
    /// [`JWKS_MIN_AGE`] and [`JWKS_MAX_AGE`].
    max_age: Duration,
}

/// The shortest time a JWKS is used before it is fetched again, whatever the gateway says
/// (`no-cache`, `max-age=0`): verifications are rare (a start, a release), but a gateway
/// answering so must not have one JWKS fetch per verification in a burst of releases.
const JWKS_MIN_AGE: Duration = Duration::from_secs(5);
/// The longest time a JWKS is used, whatever the gateway says: the gateway itself caps
/// its `max-age` at 15 minutes, so that a key withdrawn in an emergency leaves caches soon.
const JWKS_MAX_AGE: Duration = Duration::from_secs(15 * 60);
/// How long a JWKS served without `max-age` is used.
const JWKS_DEFAULT_AGE: Duration = Duration::from_secs(5 * 60);
/// The shortest time between two fetches of a gateway's JWKS for a `kid` the held set,
/// still within its `max-age`, does not list: a gateway, or whoever answers for it,
/// offering snapshot after snapshot signed by keys it does not list costs one JWKS fetch
/// per interval, not one per snapshot. The price: a release signed by a key just rotated
/// in, refused while its gateway did not list the key yet, is taken at the first offer
/// after the interval once it does. (The `max-age` refetch is not paced by this.)
pub const JWKS_UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(5);

/// When each gateway's JWKS was last fetched for an unknown `kid`, to pace those fetches
/// to one per gateway every [`JWKS_UNKNOWN_KID_INTERVAL`]. Per gateway: the held set is
/// the last one fetched from any of them, and a gateway instance that has not loaded a
/// new key yet must not keep the others from being asked for it.
#[derive(Debug, Default)]
struct RefetchPace {
    /// One entry per configured gateway at most.
    last: Mutex<HashMap<Url, tokio::time::Instant>>,
}

impl RefetchPace {
    /// Whether `gateway`'s JWKS may be fetched for an unknown `kid` at `now`; if so, the
    /// fetch is counted as made (tried, even if it then fails: a gateway whose JWKS fails
    /// is not asked at every offer either).
    fn allow(&self, gateway: &Url, now: tokio::time::Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last
            .get(gateway)
            .is_some_and(|at| now.saturating_duration_since(*at) < JWKS_UNKNOWN_KID_INTERVAL)
        {
            return false;
        }
        last.insert(gateway.clone(), now);
        true
    }
}

/// How long a JWKS served with this `Cache-Control` may be used.
fn jwks_max_age(cache_control: Option<&str>) -> Duration {
    let Some(value) = cache_control else {
        return JWKS_DEFAULT_AGE;
    };
    let mut age = None;
    for directive in value.split(',').map(str::trim) {
        let name = directive
            .split_once('=')
            .map_or(directive, |(name, _)| name)
            .trim();
        if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
            return JWKS_MIN_AGE;
        }
        if name.eq_ignore_ascii_case("max-age") {
            age = directive
                .split_once('=')
                .and_then(|(_, v)| v.trim().trim_matches('"').parse::<u64>().ok());
        }
    }
    age.map_or(JWKS_DEFAULT_AGE, |secs| {
        Duration::from_secs(secs).clamp(JWKS_MIN_AGE, JWKS_MAX_AGE)
    })
}

/// A running config client; dropping it stops the watch.
pub struct Client {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("environment", &self.shared.env)
            .field("application", &self.shared.app)
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Fetches and verifies the current snapshot (or, when no gateway answers, loads the
    /// last-known-good copy) and starts watching for new releases.
    ///
    /// Gateways are tried in order until one serves a snapshot that verifies. A release
    /// older than the last-known-good copy is refused (see [`Origin::Disk`]): the client
    /// starts from the copy and takes the next release newer than it. With a copy held,
    /// gateways answering that there is no release do not fail the start either; without
    /// one, start fails with [`ClientError::NoRelease`] when no gateway served the node and
    /// at least one answered 404 `not_found`.
    pub async fn start(config: ClientConfig) -> Result<Client, ClientError> {
        let env = Environment::parse_shape(&config.environment)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let app =
            AppName::parse(&config.application).map_err(|e| ClientError::Config(e.to_string()))?;
        if config.gateways.is_empty() {
            return Err(ClientError::Config("no gateway configured".into()));
        }
        check_backoff(config.backoff_initial, config.backoff_max)?;
        check_node(config.instance.as_deref(), &config.labels)?;
        let tls = tls_config(config.ca_pem.as_deref()).map_err(ClientError::Config)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(config.request_timeout)
            .user_agent(concat!(
                "portcullis-config-client/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(|e| ClientError::Config(format!("HTTP client: {e}")))?;
        let placeholder = Arc::new(Snapshot {
            environment: env.to_string(),
            application: app.to_string(),
            version: 0,
            issued_at: time::OffsetDateTime::UNIX_EPOCH,
            content_hash: String::new(),
            entries: Vec::new(),
            signature: String::new(),
        });
        let (current, _) = watch::channel(placeholder);
        let shared = Arc::new(Shared {
            token: Mutex::new(config.token.clone()),
            config,
            env,
            app,
            http,
            jwks: Mutex::new(None),
            kid_refetches: RefetchPace::default(),
            current,
            status: watch::Sender::new(WatchStatus::default()),
            origin: Mutex::new(Origin::Gateway),
            copy_verified: Mutex::new(false),
            dir_warned: AtomicBool::new(false),
        });

        // a directory or copy left readable by others (an older client, a restore by
        // hand) is made private before anything else; neither failing stops the node
        shared.tighten_dir();
        if let Err(e) = shared.tighten_copy() {
            tracing::warn!(
                error = %e,
                "the last-known-good config copy may be readable by others until the next release replaces it"
            );
        }

        // the copy a previous run kept: held before any gateway is asked, so that its
        // version is the floor no gateway may take this node below (once its signature
        // verifies, see `Shared::offer`), and what the node runs on if none answers
        let disk_error = match shared.load_disk() {
            Ok(Some(snapshot)) => {
                shared.current.send_replace(Arc::new(snapshot));
                *shared.origin.lock().unwrap_or_else(PoisonError::into_inner) = Origin::Disk;
                None
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "the last-known-good config copy is unusable");
                Some(e)
            }
        };
        let holds_copy = disk_error.is_none() && shared.held_version() > 0;

        let mut last_error = String::new();
        let mut started = false;
        // a gateway answered `not_found`: there is no release for this node
        let mut no_release = false;
        // a gateway answered 400: this node's request is wrong, not the gateways away
        let mut refused = None;
        for gateway in &shared.config.gateways {
            match shared.fetch(gateway, None).await {
                Ok(Some(snapshot)) => match shared.offer(gateway, snapshot).await {
                    Ok(_) => {
                        started = true;
                        break;
                    }
                    // older than the copy held: another gateway may have a newer one,
                    // else the node starts from its copy and waits for one
                    Err(e) => {
                        tracing::warn!(%gateway, error = %e, "config snapshot refused");
                        last_error = e.to_string();
                    }
                },
                Ok(None) => {}
                // another gateway may have it (this one's database may be behind); with a
                // copy held, none having it (a database restored from before it) does not
                // stop the node either: it keeps its copy and waits
                Err(ClientError::NoRelease) => {
                    if holds_copy {
                        tracing::warn!(%gateway, "config gateway has no release of the copy held");
                    } else {
                        tracing::warn!(%gateway, "config gateway has no release");
                    }
                    no_release = true;
                    last_error = ClientError::NoRelease.to_string();
                }
                Err(
                    e @ (ClientError::Signature(_)
                    | ClientError::UnknownKey(_)
                    | ClientError::Tampered),
                ) => {
                    tracing::warn!(%gateway, error = %e, "config snapshot refused");
                    last_error = e.to_string();
                }
                // the request itself is refused: asking again will not help, though
                // another gateway (of another release of Portcullis) might take it
                Err(e @ ClientError::Status { status: 400, .. }) => {
                    tracing::error!(%gateway, error = %e, "config gateway refuses this node's request");
                    last_error = e.to_string();
                    refused = Some(e);
                }
                Err(e) => {
                    tracing::warn!(%gateway, error = %e, "config gateway unavailable at start");
                    last_error = e.to_string();
                }
            }
        }
        if started {
            shared.contact();
        } else {
            if no_release && !holds_copy {
                return Err(ClientError::NoRelease);
            }
            if let Some(e) = refused
                && !holds_copy
            {
                return Err(e);
            }
            if let Some(e) = disk_error {
                return Err(e);
            }
            if !holds_copy {
                return Err(ClientError::Unavailable(last_error));
            }
            tracing::warn!(
                version = shared.held_version(),
                "config started from the last-known-good copy"
            );
            shared.status.send_modify(|s| {
                s.last_error = Some(last_error);
                s.last_error_at = Some(SystemTime::now());
            });
        }
        let task = tokio::spawn(Arc::clone(&shared).watch_forever());
        Ok(Client { shared, task })
    }

    /// The held snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.current.borrow().clone()
    }

    /// The held version.
    pub fn version(&self) -> u64 {
        self.shared.current.borrow().version
    }

    /// Where the held snapshot came from.
    pub fn origin(&self) -> Origin {
        *self
            .shared
            .origin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A receiver of the held snapshot. It is a [`tokio::sync::watch`] receiver: it holds
    /// only the latest snapshot, so a receiver that does not look between two releases sees
    /// the newer one only, never each in turn. Compare versions rather than count changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.current.subscribe()
    }

    /// How the background watch is doing now: whether it reaches a gateway, when one last
    /// answered, and the last failure.
    pub fn watch_status(&self) -> WatchStatus {
        self.shared.status.borrow().clone()
    }

    /// A receiver of [`Client::watch_status`], changed at every contact and failure.
    pub fn subscribe_status(&self) -> watch::Receiver<WatchStatus> {
        self.shared.status.subscribe()
    }

    /// Replaces the bearer token used from the next request on.
    pub fn set_token(&self, token: SecretString) {
        *self
            .shared
            .token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = token;
    }

    /// The raw text of `key`, if present.
    pub fn get_str(&self, key: &str) -> Option<String> {
        self.snapshot()
            .entries
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
    }

    /// The value of `key` deserialized as `T`: JSON and YAML values as documents; a plain
    /// or properties value as JSON when it parses as JSON (numbers, booleans), otherwise
    /// as a string. `Ok(None)` when the key is absent.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ClientError> {
        let snapshot = self.snapshot();
        let Some(entry) = snapshot.entries.iter().find(|e| e.key == key) else {
            return Ok(None);
        };
        let decode = |reason: String| ClientError::Decode {
            key: key.to_owned(),
            reason,
        };
        let value = match entry.format {
            Format::Json => serde_json::from_str(&entry.value)
                .map_err(|e| decode(without_value::<serde_json::Value>(&e)))?,
            Format::Yaml => yaml_to_json(&entry.value).map_err(decode)?,
            Format::Plain | Format::Properties => serde_json::from_str(&entry.value)
                .unwrap_or_else(|_| serde_json::Value::String(entry.value.clone())),
        };
        match serde_json::from_value::<T>(value) {
            Ok(v) => Ok(Some(v)),
            // "8080" as a plain value may be wanted as a string
            Err(_) if !matches!(entry.format, Format::Json | Format::Yaml) => {
                serde_json::from_value(serde_json::Value::String(entry.value.clone()))
                    .map(Some)
                    .map_err(|e| decode(without_value::<T>(&e)))
            }
            Err(e) => Err(decode(without_value::<T>(&e))),
        }
    }
}

/// The shortest `backoff_initial` the client accepts.
const MIN_BACKOFF: Duration = Duration::from_millis(10);

/// Checks that the backoffs pace the watch: its reconnects after failures and the checks of
/// an unverified copy ([`CopyCheck`]) wait a delay drawn from a step that starts at
/// `backoff_initial` and doubles up to `backoff_max`, so a zero step (which doubles to zero)
/// would ask a gateway that is away again in a tight loop, and check a copy that cannot be
/// checked as fast as the checks can be made. Refused at start, naming the field, rather
/// than raised in silence to something the node was not told.
fn check_backoff(initial: Duration, max: Duration) -> Result<(), ClientError> {
    if initial < MIN_BACKOFF {
        return Err(ClientError::Config(format!(
            "backoff_initial must be at least {MIN_BACKOFF:?} (it is {initial:?})"
        )));
    }
    if max < initial {
        return Err(ClientError::Config(format!(
            "backoff_max must be at least backoff_initial ({initial:?}; it is {max:?})"
        )));
    }
    Ok(())
}

/// Checks this node's instance id and labels against the grammar the gateways hold them
/// to (that of a gray release's selector): a gateway refuses a request with anything else
/// (400), every request, so the client refuses to start with it, naming the field.
fn check_node(
    instance: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> Result<(), ClientError> {
    use crate::model::{GraySelector, MAX_SELECTOR_ITEM_LEN};
    let grammar = format!("[A-Za-z0-9._:-], 1 to {MAX_SELECTOR_ITEM_LEN} bytes, no `..`");
    // an instance id is held to the selector's own check, as the gateway holds it
    let check = |text: &str| GraySelector::new([text.to_owned()], BTreeMap::new()).map(drop);
    if let Some(id) = instance {
        check(id).map_err(|e| {
            ClientError::Config(format!(
                "instance {id:?} is not accepted by the gateways ({grammar}): {e}"
            ))
        })?;
    }
    for (name, value) in labels {
        for (part, text) in [("name", name), ("value", value)] {
            check(text).map_err(|e| {
                ClientError::Config(format!(
                    "labels: the {part} of label {name:?} is not accepted by the gateways ({grammar}): {e}"
                ))
            })?;
        }
    }
    Ok(())
}

/// Why a value does not deserialize as `T`, without the value: serde's own messages
/// quote it (`invalid type: string "hunter2", expected u32`), and a value may be a
/// secret that the caller's log must never hold. Syntax errors (where serde_json quotes
/// nothing) and missing fields keep serde's words.
fn without_value<T>(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let message = e.to_string();
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => message,
        Category::Data if message.starts_with("missing field `") => message,
        Category::Data => format!("it is not a `{}`", std::any::type_name::<T>()),
    }
}

/// The client's TLS: rustls on aws-lc-rs (the one crypto provider Portcullis links),
/// trusting the bundled web PKI roots plus the PEM CAs of `ca_pem`.
fn tls_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(pem) = ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("ca_pem: {e}"))?;
            roots.add(cert).map_err(|e| format!("ca_pem: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Converts the first YAML document of `text` into a JSON value.
fn yaml_to_json(text: &str) -> Result<serde_json::Value, String> {
    use yaml_rust2::Yaml;
    fn convert(y: &Yaml) -> Result<serde_json::Value, String> {
        Ok(match y {
            Yaml::Real(r) => r
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(serde_json::Value::Number)
                .ok_or("a real number out of range")?,
            Yaml::Integer(i) => serde_json::Value::from(*i),
            Yaml::String(s) => serde_json::Value::String(s.clone()),
            Yaml::Boolean(b) => serde_json::Value::Bool(*b),
            Yaml::Array(a) => {
                serde_json::Value::Array(a.iter().map(convert).collect::<Result<_, _>>()?)
            }
            Yaml::Hash(h) => {
                let mut map = serde_json::Map::new();
                for (k, v) in h {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        _ => return Err("a mapping key that is not a scalar".into()),
                    };
                    map.insert(key, convert(v)?);
                }
                serde_json::Value::Object(map)
            }
            Yaml::Null | Yaml::BadValue => serde_json::Value::Null,
            Yaml::Alias(_) => return Err("YAML aliases are not supported".into()),
        })
    }
    let docs = yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
    docs.first().map_or(Ok(serde_json::Value::Null), convert)
}

// === impl Shared ===

#[derive(Deserialize)]
struct JwsHeader {
    alg: String,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
    b64: Option<bool>,
}

impl Shared {
    fn bearer(&self) -> String {
        let token = self.token.lock().unwrap_or_else(PoisonError::into_inner);
        format!("Bearer {}", token.expose_secret())
    }

    fn url(&self, gateway: &Url, suffix: &str) -> Result<Url, ClientError> {
        let mut segments = vec!["config", "v1", self.env.as_str(), self.app.as_str()];
        if !suffix.is_empty() {
            segments.push(suffix);
        }
        let mut url = under(gateway, &segments)?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(instance) = &self.config.instance {
                query.append_pair("instance", instance);
            }
            if !self.config.labels.is_empty() {
                let labels: Vec<String> = self
                    .config
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                query.append_pair("labels", &labels.join(","));
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        Ok(url)
    }

    fn transport(gateway: &Url, e: &reqwest::Error) -> ClientError {
        ClientError::Transport {
            gateway: gateway.to_string(),
            reason: if e.is_timeout() {
                "timed out".into()
            } else if e.is_connect() {
                "connection failed".into()
            } else {
                "request failed".into()
            },
        }
    }

    /// Maps a non-success status to an error, reading the JSON error body if any. A 404
    /// is [`ClientError::NoRelease`] only with the gateway's `not_found` code: one without
    /// it (a wrong base path, a proxy's own page) says nothing about the release.
    async fn status_error(gateway: &Url, response: reqwest::Response) -> ClientError {
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return ClientError::Unauthorized(status.as_u16());
        }
        let error = response
            .json::<ErrorBody>()
            .await
            .map(|b| b.error)
            .unwrap_or_default();
        if status == StatusCode::NOT_FOUND && error == "not_found" {
            return ClientError::NoRelease;
        }
        ClientError::Status {
            gateway: gateway.to_string(),
            status: status.as_u16(),
            error,
        }
    }

    /// `GET /config/v1/{env}/{app}`; `Ok(None)` on 304.
    async fn fetch(
        &self,
        gateway: &Url,
        held: Option<u64>,
    ) -> Result<Option<Snapshot>, ClientError> {
        let url = self.url(gateway, "")?;
        let mut request = self
            .http
            .get(url)
            .timeout(self.config.request_timeout)
            .header(AUTHORIZATION, self.bearer());
        if let Some(v) = held {
            request = request.header(IF_NONE_MATCH, format!("\"{v}\""));
        }
        let response = request
            .send()
            .await
            .map_err(|e| Self::transport(gateway, &e))?;
        match response.status() {
            StatusCode::OK => {
                let snapshot: Snapshot = response
                    .json()
                    .await
                    .map_err(|e| Self::transport(gateway, &e))?;
                self.verify(gateway, &snapshot).await?;
                Ok(Some(snapshot))
            }
            StatusCode::NOT_MODIFIED => Ok(None),
            _ => Err(Self::status_error(gateway, response).await),
        }
    }

    /// `GET /config/v1/{env}/{app}/poll?version=N`; `Ok(None)` on 304.
    async fn poll(&self, gateway: &Url, held: u64) -> Result<Option<Snapshot>, ClientError> {
        let mut url = self.url(gateway, "poll")?;
        url.query_pairs_mut()
            .append_pair("version", &held.to_string());
        let response = self
            .http
            .get(url)
            // the gateway answers within its long-poll timeout
            .timeout(
                self.config
                    .long_poll_timeout
                    .saturating_add(self.config.request_timeout),
            )
            .header(AUTHORIZATION, self.bearer())
            .send()
            .await
            .map_err(|e| Self::transport(gateway, &e))?;
        match response.status() {
            StatusCode::OK => {
                let snapshot: Snapshot = response
                    .json()
                    .await
                    .map_err(|e| Self::transport(gateway, &e))?;
                self.verify(gateway, &snapshot).await?;
                Ok(Some(snapshot))
            }
            StatusCode::NOT_MODIFIED => Ok(None),
            _ => Err(Self::status_error(gateway, response).await),
        }
    }

    async fn fetch_jwks(&self, gateway: &Url) -> Result<CachedJwks, ClientError> {
        let url = under(gateway, &["oauth2", "jwks"])?;
        let response = self
            .http
            .get(url)
            .timeout(self.config.request_timeout)
            .send()
            .await
            .map_err(|e| {
                ClientError::Jwks(format!("fetch failed: {}", Self::transport(gateway, &e)))
            })?;
        if !response.status().is_success() {
            return Err(ClientError::Jwks(format!("status {}", response.status())));
        }
        let max_age = jwks_max_age(
            response
                .headers()
                .get(reqwest::header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok()),
        );
        let set = response
            .json::<JwkSet>()
            .await
            .map_err(|e| ClientError::Jwks(format!("unreadable: {e}")))?;
        Ok(CachedJwks {
            set,
            fetched: tokio::time::Instant::now(),
            max_age,
        })
    }

    /// The key `kid` from the cached JWKS. `gateway`'s JWKS is fetched again, and replaces
    /// the cached one (keys it no longer lists are no longer trusted), when the cached set
    /// is older than its `max-age` (when that fetch fails, nothing is verified with the
    /// stale set), and when it does not list the kid, unless `gateway`'s JWKS was fetched
    /// for an unknown kid less than [`JWKS_UNKNOWN_KID_INTERVAL`] ago: then the kid is
    /// unknown without a fetch.
    async fn key_for(
        &self,
        gateway: &Url,
        kid: &str,
    ) -> Result<jsonwebtoken::jwk::Jwk, ClientError> {
        let (cached, fresh) = {
            let held = self.jwks.lock().unwrap_or_else(PoisonError::into_inner);
            match held.as_ref().filter(|c| c.fetched.elapsed() < c.max_age) {
                Some(c) => (c.set.find(kid).cloned(), true),
                None => (None, false),
            }
        };
        if let Some(jwk) = cached {
            return Ok(jwk);
        }
        if fresh
            && !self
                .kid_refetches
                .allow(gateway, tokio::time::Instant::now())
        {
            return Err(ClientError::UnknownKey(kid.to_owned()));
        }
        let fetched = self.fetch_jwks(gateway).await?;
        let found = fetched.set.find(kid).cloned();
        *self.jwks.lock().unwrap_or_else(PoisonError::into_inner) = Some(fetched);
        found.ok_or_else(|| ClientError::UnknownKey(kid.to_owned()))
    }

    /// Checks target, content hash and detached signature of `snapshot`.
    async fn verify(&self, gateway: &Url, snapshot: &Snapshot) -> Result<(), ClientError> {
        if snapshot.environment != self.env.as_str() || snapshot.application != self.app.as_str() {
            return Err(ClientError::WrongTarget {
                environment: snapshot.environment.clone(),
                application: snapshot.application.clone(),
            });
        }
        let claims = snapshot.claims();
        if claims.content_hash != snapshot.content_hash {
            return Err(ClientError::Tampered);
        }
        let sig = |m: &str| ClientError::Signature(m.to_owned());
        let mut parts = snapshot.signature.split('.');
        let (Some(header_b64), Some(""), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(sig("not a detached compact JWS"));
        };
        let header_json = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| sig("header is not base64url"))?;
        let header: JwsHeader =
            serde_json::from_slice(&header_json).map_err(|_| sig("header is not JSON"))?;
        if header.crit.is_some() || header.b64.is_some() {
            return Err(sig("critical or b64 header parameters are not supported"));
        }
        let alg = match header.alg.as_str() {
            "ES256" => Algorithm::ES256,
            "EdDSA" => Algorithm::EdDSA,
            "RS256" => Algorithm::RS256,
            _ => return Err(sig("algorithm not accepted")),
        };
        if !self.config.algorithms.contains(&alg) {
            return Err(sig("algorithm not accepted"));
        }
        let kid = header.kid.ok_or_else(|| sig("no kid"))?;
        let jwk = self.key_for(gateway, &kid).await?;
        if let Some(key_alg) = &jwk.common.key_algorithm
            && key_alg.to_string() != header.alg
        {
            return Err(sig("the key's algorithm differs from the header's"));
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| sig("unusable JWK"))?;
        let mut message = String::with_capacity(header_b64.len() + 512);
        message.push_str(header_b64);
        message.push('.');
        URL_SAFE_NO_PAD.encode_string(signing_payload(&claims), &mut message);
        match jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key, alg) {
            Ok(true) => Ok(()),
            _ => Err(sig("signature does not verify")),
        }
    }

    /// Offers `snapshot`, verified, from `gateway`: it becomes the held one unless it is
    /// older ([`ClientError::Downgrade`]).
    ///
    /// The held version is the floor, also when the held snapshot is the copy a previous
    /// run left on disk — a restarted node is not taken back to an older release by a
    /// gateway serving one, nor by a replayed older release that is validly signed. The
    /// copy on disk is only checked for target and content hash when it is read, though
    /// (the JWKS may be unreachable then), so before it refuses an older release it must
    /// verify against `gateway`'s JWKS, as anything from a gateway does: a copy whose
    /// signature does not verify with the key its `kid` names (altered on disk) is no
    /// floor, and the older release is taken.
    ///
    /// A copy whose `kid` this gateway's JWKS does not list is not taken for altered,
    /// though: the floor stands and the older release is refused (fail closed). A gateway
    /// instance that has not loaded the key of an emergency rotation yet looks like that,
    /// and so do responses from someone who leaves the copy's key out of the JWKS to take
    /// the node back; another gateway, or this one later, may list it. Nor does the floor
    /// fall when the JWKS cannot be had: the next offer tries again.
    async fn offer(&self, gateway: &Url, snapshot: Snapshot) -> Result<bool, ClientError> {
        let held = self.current.borrow().clone();
        if snapshot.version < held.version && self.holds_unchecked_copy() {
            match self.verify(gateway, &held).await {
                Ok(()) => {
                    *self
                        .copy_verified
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = true;
                }
                Err(e @ ClientError::UnknownKey(_)) => {
                    tracing::warn!(
                        %gateway,
                        held = held.version,
                        offered = snapshot.version,
                        error = %e,
                        "the last-known-good config copy is signed by a key this gateway does not publish: its version stays the floor"
                    );
                    return Err(ClientError::Downgrade {
                        held: held.version,
                        offered: snapshot.version,
                    });
                }
                Err(
                    e @ (ClientError::Signature(_)
                    | ClientError::Tampered
                    | ClientError::WrongTarget { .. }),
                ) => {
                    tracing::warn!(
                        held = held.version,
                        offered = snapshot.version,
                        error = %e,
                        "the last-known-good config copy does not verify: its version is no floor"
                    );
                    return self.accept(snapshot, Some(&held));
                }
                Err(e) => return Err(e),
            }
        }
        self.accept(snapshot, None)
    }

    /// Makes `snapshot` the held one unless it is older; writes the disk copy.
    ///
    /// `no_floor` is a copy from disk found not to verify: an older `snapshot` is taken in
    /// its place, but only while that copy is still the one held. The watch's rounds and
    /// the check of the copy run side by side ([`Shared::watch_forever`]), so a release
    /// taken by one while the other verified the copy is a floor like any other.
    fn accept(
        &self,
        snapshot: Snapshot,
        no_floor: Option<&Arc<Snapshot>>,
    ) -> Result<bool, ClientError> {
        let held = self.current.borrow().clone();
        let below_floor = no_floor.is_some_and(|copy| Arc::ptr_eq(copy, &held));
        let from_disk = *self.origin.lock().unwrap_or_else(PoisonError::into_inner) == Origin::Disk;
        if snapshot.version < held.version && !below_floor {
            return Err(ClientError::Downgrade {
                held: held.version,
                offered: snapshot.version,
            });
        }
        if snapshot.version == held.version && !from_disk {
            // same version again (a reconnect): nothing new
            return Ok(false);
        }
        if let Err(e) = self.store_disk(&snapshot) {
            tracing::warn!(error = %e, "cannot write the last-known-good config copy");
        }
        tracing::info!(environment = %self.env, application = %self.app, version = snapshot.version, "config snapshot accepted");
        *self.origin.lock().unwrap_or_else(PoisonError::into_inner) = Origin::Gateway;
        self.current.send_replace(Arc::new(snapshot));
        Ok(true)
    }

    fn disk_path(&self) -> PathBuf {
        self.config
            .cache_dir
            .join(format!("{}__{}.json", self.env, self.app))
    }

    /// Atomic write (temp file 0600, fsync, rename) of the last-known-good copy.
    ///
    /// Only the write and the rename can fail it. The old copy's mode does not matter (the
    /// rename replaces it with the file made here, `0600` and this node's, even when the
    /// old one belongs to someone else, as after a restore by root), and a directory whose
    /// mode cannot be tightened is warned about once per start (see
    /// [`Shared::tighten_dir`]).
    fn store_disk(&self, snapshot: &Snapshot) -> Result<(), ClientError> {
        let path = self.disk_path();
        let fail = |reason: String| ClientError::Cache {
            path: path.clone(),
            reason,
        };
        let dir = &self.config.cache_dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
        // a directory made earlier, by hand or with a looser umask, is tightened before
        // anything is written into it
        self.tighten_dir();
        let bytes = serde_json::to_vec(snapshot).map_err(|e| fail(e.to_string()))?;
        let tmp = dir.join(format!(
            ".{}__{}.{}.tmp",
            self.env,
            self.app,
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // the mode given at creation is narrowed by the umask, never widened; this
            // makes it exact
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok::<(), std::io::Error>(())
        })();
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(e.to_string())
        })
    }

    /// Makes the cache directory `0700` if it exists with a looser mode (the copy holds
    /// decrypted secrets); one that is not there yet is left to be created `0700`.
    ///
    /// A directory the node may write into but cannot change the mode of — a mount point
    /// it does not own, such as a Kubernetes `emptyDir` (root's, `0777`) or an `fsGroup`
    /// volume — is used as it is, with a warning once per start: the copy in it is still
    /// `0600`, but others may list it, and where they may write to the directory, remove
    /// or replace it.
    fn tighten_dir(&self) {
        let dir = &self.config.cache_dir;
        let tightened = match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() && meta.permissions().mode() & 0o777 != 0o700 => {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            }
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = tightened
            && !self.dir_warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                directory = %dir.display(),
                error = %e,
                "the config cache directory cannot be made private (0700): the last-known-good copy is still written 0600, but other local users may see it and, if they may write to the directory, remove or replace it"
            );
        }
    }

    /// Makes the last-known-good copy `0600` if it exists with a looser mode. A copy that
    /// is not a regular file is left alone; one the node cannot change the mode of (it
    /// belongs to someone else) stays as it is until the next write replaces it.
    fn tighten_copy(&self) -> Result<(), ClientError> {
        let path = self.disk_path();
        let fail = |e: std::io::Error| ClientError::Cache {
            path: path.clone(),
            reason: format!("cannot make it private: {e}"),
        };
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o777 != 0o600 => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(fail)
            }
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(fail(e)),
        }
    }

    /// Reads the last-known-good copy; it was verified when written, so only its target
    /// and content hash are checked again (the JWKS may be unreachable now).
    fn load_disk(&self) -> Result<Option<Snapshot>, ClientError> {
        let path = self.disk_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ClientError::Cache {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        let snapshot: Snapshot =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Cache {
                path: path.clone(),
                reason: format!("unreadable: {e}"),
            })?;
        if snapshot.environment != self.env.as_str() || snapshot.application != self.app.as_str() {
            return Err(ClientError::WrongTarget {
                environment: snapshot.environment,
                application: snapshot.application,
            });
        }
        if signing::content_hash(&snapshot.entries) != snapshot.content_hash {
            return Err(ClientError::Tampered);
        }
        Ok(Some(snapshot))
    }

    /// A gateway answered the watch.
    fn contact(&self) {
        self.status.send_modify(|s| {
            s.connected = true;
            s.last_contact = Some(SystemTime::now());
        });
    }

    /// The watch failed with `e`.
    fn failed(&self, e: &ClientError) {
        self.status.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(e.to_string());
            s.last_error_at = Some(SystemTime::now());
        });
    }

    fn held_version(&self) -> u64 {
        self.current.borrow().version
    }

    /// The held snapshot is the copy read from disk and its signature has not verified
    /// against a gateway's JWKS in this run.
    fn holds_unchecked_copy(&self) -> bool {
        *self.origin.lock().unwrap_or_else(PoisonError::into_inner) == Origin::Disk
            && !*self
                .copy_verified
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
    }

    /// The watch: its rounds ([`Shared::watch_rounds`]) and, while the node holds a copy
    /// from disk that has not verified, the checks of that copy
    /// ([`Shared::check_copy_until_settled`]), side by side on this task.
    ///
    /// The checks do not wait for a round to end: a stream lasts until the token it was
    /// opened with expires (an hour, say), and a copy altered to a version no gateway has
    /// must not hold the node that long because one check failed. Nor do they wait for
    /// the round, or fail it: a check on a gateway that hangs costs the watch nothing. Both
    /// start at the same random gateway; the checks then go to the next gateway in turn.
    async fn watch_forever(self: Arc<Self>) {
        let first = usize::try_from(random_below(self.config.gateways.len() as u64)).unwrap_or(0);
        tokio::join!(
            self.watch_rounds(first),
            self.check_copy_until_settled(first)
        );
    }

    /// The watch's rounds: SSE on the current gateway, long-poll when it does not stream,
    /// the next gateway and a growing delay after a failure.
    ///
    /// Nodes started or cut off together must not come back together: the watch starts at
    /// a random gateway (`first`), every delay after a failure is drawn at random up to the
    /// current backoff (full jitter), and a stream that ends well (its token expired, the
    /// gateway restarted) is reopened after up to [`HEALTHY_RECONNECT_SPREAD`].
    ///
    /// A round resumes from the version held when it opens. Should the held version fall
    /// below it — a check of the copy found the copy altered and took an older release in
    /// its place — the round is ended and another opened at once on the same gateway from
    /// the release taken: a gateway sends a watch only releases newer than its resume
    /// point, so the old round would bring none of those in between. That is no failure:
    /// no delay, no stream failure counted.
    async fn watch_rounds(&self, first: usize) {
        let gateways = &self.config.gateways;
        let mut delay = self.config.backoff_initial;
        let mut index = first;
        let mut modes = vec![Mode::default(); gateways.len()];
        let mut held = self.current.subscribe();
        loop {
            let slot = index % gateways.len().max(1);
            let (Some(gateway), Some(mode)) = (gateways.get(slot), modes.get_mut(slot)) else {
                return;
            };
            let polling = mode.polls_left > 0;
            // read here and again by the round as it opens, with no await between
            let resumed = self.held_version();
            let round = async {
                if polling {
                    mode.polls_left = mode.polls_left.saturating_sub(1);
                    self.poll_round(gateway).await
                } else {
                    self.sse_round(gateway).await
                }
            };
            let outcome = tokio::select! {
                outcome = round => outcome,
                () = fell_below(&mut held, resumed) => Round::Reopen,
            };
            match outcome {
                Round::Healthy => {
                    delay = self.config.backoff_initial;
                    if !polling {
                        mode.sse_failures = 0;
                        tokio::time::sleep(full_jitter(HEALTHY_RECONNECT_SPREAD)).await;
                    }
                }
                Round::NoStream => {
                    tracing::info!(%gateway, "config watch falls back to long-poll: the gateway does not stream");
                    mode.polls_left = u32::MAX;
                    continue;
                }
                Round::Reopen => {
                    tracing::info!(%gateway, version = self.held_version(), "config watch reopened from the release that replaced the last-known-good copy");
                    continue;
                }
                Round::Failed(e) => {
                    self.failed(&e);
                    if !polling {
                        mode.sse_failures += 1;
                        if mode.sse_failures >= SSE_FAILURES_BEFORE_POLL {
                            // a proxy that buffers or cuts event streams looks like this
                            tracing::info!(%gateway, "config watch tries long-poll after repeated stream failures");
                            mode.sse_failures = 0;
                            mode.polls_left = POLL_ROUNDS_BEFORE_SSE;
                        }
                    }
                    // a refused request (400) is this node's fault and stays refused: it is
                    // asked again at the slowest pace, in case the gateways change
                    let refused = matches!(e, ClientError::Status { status: 400, .. });
                    let wait = if refused {
                        self.config.backoff_max
                    } else {
                        delay
                    };
                    if refused {
                        tracing::error!(%gateway, error = %e, retry_in = ?wait, "config gateway refuses this node's request");
                    } else {
                        tracing::warn!(%gateway, error = %e, retry_in = ?wait, "config watch interrupted");
                    }
                    index = index.wrapping_add(1);
                    tokio::time::sleep(full_jitter(wait)).await;
                    delay = delay.saturating_mul(2).min(self.config.backoff_max);
                }
            }
        }
    }

    /// While the held snapshot is the copy read from disk and its signature has not
    /// verified, checks it ([`Shared::check_copy`]): at once, on gateway `first`, then,
    /// while checks do not conclude, when the [`CopyCheck`] says, each time on the next
    /// gateway (one whose snapshot read fails, or whose JWKS does not list the copy's key,
    /// does not decide for the others). Returns once the copy is replaced or verifies, by
    /// a check or by a release a round brought.
    ///
    /// It runs beside the rounds ([`Shared::watch_forever`]): a check is made when it is
    /// due, whether a stream is open or a long-poll held, and never delays a round. A
    /// failed check is only logged: it is not reported in [`WatchStatus`] and does not
    /// count against any gateway's stream (which would switch a healthy stream to
    /// long-poll); a gateway that is away shows in the rounds when they reach it.
    async fn check_copy_until_settled(&self, first: usize) {
        let gateways = &self.config.gateways;
        let mut pace = CopyCheck::new(self.config.backoff_initial);
        let mut index = first;
        while self.holds_unchecked_copy() {
            pace.wait().await;
            if !self.holds_unchecked_copy() {
                return;
            }
            let Some(gateway) = gateways.get(index % gateways.len().max(1)) else {
                return;
            };
            let checked = self.check_copy(gateway).await;
            if self.holds_unchecked_copy() {
                let retry_in = pace.put_off(self.config.backoff_max);
                if let Err(e) = checked {
                    tracing::warn!(%gateway, error = %e, ?retry_in, "the last-known-good config copy could not be checked; the watch goes on from it, and the next check asks the next gateway");
                }
                index = index.wrapping_add(1);
            }
        }
    }

    /// Asks `gateway` for the current snapshot and offers it, while the held snapshot is
    /// the copy read from disk and its signature has not been verified, since the watch
    /// alone (resuming from the copy's version) would only ever bring newer ones: the
    /// same version or a newer one replaces the copy ([`Origin::Gateway`]), an older one
    /// has the copy verified first ([`Shared::offer`]), so a copy altered on disk to a
    /// version no gateway has does not hold the node. `Ok` when the watch may go on from
    /// what is held (also when the copy stays the floor); the error of a gateway that
    /// could not serve a snapshot that verifies otherwise.
    ///
    /// The check concludes when the copy is replaced or verifies; then it is not made
    /// again in this run. Until then [`Shared::check_copy_until_settled`] repeats it on
    /// the backoff of a [`CopyCheck`]: a check that cannot conclude — the gateway's JWKS
    /// does not list the copy's `kid`, the gateway has no release, or it cannot serve a
    /// snapshot that verifies — would otherwise fetch a full snapshot and the JWKS as
    /// fast as it could be made.
    async fn check_copy(&self, gateway: &Url) -> Result<(), ClientError> {
        if !self.holds_unchecked_copy() {
            return Ok(());
        }
        match self.fetch(gateway, None).await {
            Ok(Some(snapshot)) => match self.offer(gateway, snapshot).await {
                Ok(_) => Ok(()),
                Err(e @ ClientError::Downgrade { .. }) => {
                    tracing::info!(%gateway, error = %e, "config watch goes on from the last-known-good copy");
                    Ok(())
                }
                Err(e) => Err(e),
            },
            Ok(None) | Err(ClientError::NoRelease) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn poll_round(&self, gateway: &Url) -> Round {
        let started = tokio::time::Instant::now();
        match self.poll(gateway, self.held_version()).await {
            Ok(Some(snapshot)) => match self.offer(gateway, snapshot).await {
                Ok(_) => {
                    self.contact();
                    Round::Healthy
                }
                // a gateway answering an older release at once would otherwise make this
                // spin; the next gateway, after a delay, may have a newer one
                Err(e) => Round::Failed(e),
            },
            Ok(None) => {
                self.contact();
                // a gateway answering 304 at once would otherwise make this spin
                if started.elapsed() < Duration::from_secs(1) {
                    tokio::time::sleep(self.config.backoff_initial).await;
                }
                Round::Healthy
            }
            Err(ClientError::NoRelease) => Round::Failed(ClientError::NoRelease),
            Err(e) => Round::Failed(e),
        }
    }

    /// One SSE connection, read until it ends. `Healthy` when it delivered anything.
    async fn sse_round(&self, gateway: &Url) -> Round {
        let url = match self.url(gateway, "watch") {
            Ok(u) => u,
            Err(e) => return Round::Failed(e),
        };
        let held = self.held_version();
        let response = self
            .http
            .get(url)
            .header(AUTHORIZATION, self.bearer())
            .header(ACCEPT, "text/event-stream")
            .header("Last-Event-ID", held.to_string())
            .send();
        let response = match tokio::time::timeout(self.config.request_timeout, response).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Round::Failed(Self::transport(gateway, &e)),
            Err(_) => {
                return Round::Failed(ClientError::Transport {
                    gateway: gateway.to_string(),
                    reason: "timed out".into(),
                });
            }
        };
        let status = response.status();
        let is_stream = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if status == StatusCode::NOT_IMPLEMENTED
            || status == StatusCode::METHOD_NOT_ALLOWED
            || status == StatusCode::NOT_ACCEPTABLE
            || (status.is_success() && !is_stream)
        {
            return Round::NoStream;
        }
        if !status.is_success() {
            return Round::Failed(Self::status_error(gateway, response).await);
        }
        let mut response = response;
        let mut parser = SseParser::default();
        self.contact();
        let mut delivered = false;
        loop {
            let chunk = match tokio::time::timeout(self.config.idle_timeout, response.chunk()).await
            {
                Ok(Ok(Some(chunk))) => chunk,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    let e = Self::transport(gateway, &e);
                    return if delivered {
                        Round::Healthy
                    } else {
                        Round::Failed(e)
                    };
                }
                Err(_) => {
                    let e = ClientError::Transport {
                        gateway: gateway.to_string(),
                        reason: "the event stream went quiet".into(),
                    };
                    return if delivered {
                        Round::Healthy
                    } else {
                        Round::Failed(e)
                    };
                }
            };
            delivered = true;
            self.contact();
            let events = match parser.feed(&chunk) {
                Ok(events) => events,
                Err(reason) => {
                    return Round::Failed(ClientError::Transport {
                        gateway: gateway.to_string(),
                        reason: reason.into(),
                    });
                }
            };
            for event in events {
                if event.event != "release" {
                    continue;
                }
                // the gateway sends a watch each release once, newer than the last it sent
                // on it: a release not taken now comes again only on a new watch, resumed
                // from the version held. So anything but an older release (which stays
                // older) ends the stream, and the reconnect brings the release again: a
                // JWKS that could not be had, a key not served yet, an event cut short.
                let Ok(snapshot) = serde_json::from_str::<Snapshot>(&event.data) else {
                    return Round::Failed(ClientError::Transport {
                        gateway: gateway.to_string(),
                        reason: "a release event is unreadable".into(),
                    });
                };
                let offered = match self.verify(gateway, &snapshot).await {
                    Ok(()) => self.offer(gateway, snapshot).await,
                    Err(e) => Err(e),
                };
                match offered {
                    Ok(_) => {}
                    Err(e @ ClientError::Downgrade { .. }) => {
                        tracing::warn!(%gateway, error = %e, "config snapshot refused");
                    }
                    Err(e) => {
                        tracing::warn!(%gateway, error = %e, "config snapshot refused; the watch resumes from the version held");
                        return Round::Failed(e);
                    }
                }
            }
        }
        if delivered {
            Round::Healthy
        } else {
            Round::Failed(ClientError::Transport {
                gateway: gateway.to_string(),
                reason: "the event stream ended at once".into(),
            })
        }
    }
}

/// The longest wait before a stream that ended well is reopened (see
/// [`Shared::watch_forever`]).
const HEALTHY_RECONNECT_SPREAD: Duration = Duration::from_secs(1);

/// A number drawn uniformly from `0..bound` (0 when `bound` is 0), from the system's
/// random source; only to spread reconnects, so should that fail, the clock's nanoseconds
/// do.
fn random_below(bound: u64) -> u64 {
    if bound == 0 {
        return 0;
    }
    let mut bytes = [0u8; 8];
    let drawn = match aws_lc_rs::rand::fill(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos())),
    };
    // the bias of the remainder is at most bound / 2^64
    drawn % bound
}

/// A delay drawn uniformly from `0..=limit` ("full jitter").
fn full_jitter(limit: Duration) -> Duration {
    let nanos = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(random_below(nanos.saturating_add(1)))
}

enum Round {
    Healthy,
    NoStream,
    /// Ended by the watch, not the gateway: the held version fell below the one the round
    /// resumed from (see [`Shared::watch_rounds`]).
    Reopen,
    Failed(ClientError),
}

/// Resolves once the held version is below `resumed`.
async fn fell_below(held: &mut watch::Receiver<Arc<Snapshot>>, resumed: u64) {
    let closed = held.wait_for(|s| s.version < resumed).await.is_err();
    if closed {
        // the sender lives as long as the watch; should it not, nothing falls
        std::future::pending::<()>().await;
    }
}

/// Consecutive failed event streams on one gateway before it is long-polled instead.
const SSE_FAILURES_BEFORE_POLL: u32 = 3;
/// Long-poll rounds before an event stream is tried again.
const POLL_ROUNDS_BEFORE_SSE: u32 = 20;

/// How one gateway is watched.
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    sse_failures: u32,
    /// Long-poll rounds left before trying SSE again (`u32::MAX`: the gateway does not
    /// stream at all).
    polls_left: u32,
}

/// When the watch next checks a last-known-good copy that has not verified
/// ([`Shared::check_copy_until_settled`]): as the watch starts, then, while checks do not
/// conclude, on a backoff of its own, whatever the rounds do (a stream open for an hour
/// does not put a check off). Each wait is drawn between half and all of a step that
/// starts at `backoff_initial` and doubles up to `backoff_max`, counted from the end of
/// the check before — at least half a step, so that checks that cannot conclude cost one
/// snapshot read and one JWKS fetch per `backoff_max / 2` at most once grown, however
/// fast the rounds come; jittered, so that nodes restarted together do not check
/// together. `Client::start` refuses a `backoff_initial` too short to pace anything.
#[derive(Debug)]
struct CopyCheck {
    due: tokio::time::Instant,
    step: Duration,
}

impl CopyCheck {
    /// A check due now, the first wait after it drawn from `first_step`.
    fn new(first_step: Duration) -> Self {
        Self {
            due: tokio::time::Instant::now(),
            step: first_step,
        }
    }

    /// Waits until the check is due.
    async fn wait(&self) {
        tokio::time::sleep_until(self.due).await;
    }

    /// The check did not conclude: the next one is due after a wait drawn from the current
    /// step, which then doubles up to `max`. Returns the wait.
    fn put_off(&mut self, max: Duration) -> Duration {
        let half = self.step / 2;
        let wait = half.saturating_add(full_jitter(self.step.saturating_sub(half)));
        let now = tokio::time::Instant::now();
        // a step too long to add to the clock: a day is long enough
        self.due = now
            .checked_add(wait)
            .or_else(|| now.checked_add(Duration::from_secs(24 * 60 * 60)))
            .unwrap_or(now);
        self.step = self.step.saturating_mul(2).min(max);
        wait
    }
}

// === SSE ===

/// One Server-Sent Event. A release event's `data` holds plaintext secret values, so
/// `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// `event:` (default `message`).
    pub event: String,
    /// `data:` lines joined with `\n`.
    pub data: String,
    /// `id:`, if given.
    pub id: Option<String>,
}

impl fmt::Debug for SseEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseEvent")
            .field("event", &self.event)
            .field("data_len", &self.data.len())
            .field("id", &self.id)
            .finish()
    }
}

/// An incremental `text/event-stream` parser (the WHATWG format: `field: value` lines, a
/// blank line ends an event, `:` starts a comment). What it holds of an unfinished event
/// may be plaintext secret values, so `Debug` shows only sizes.
#[derive(Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    event: String,
    data: Vec<String>,
    id: Option<String>,
    size: usize,
}

impl fmt::Debug for SseParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseParser")
            .field("buffered_len", &self.buffer.len())
            .field("event", &self.event)
            .field("data_lines", &self.data.len())
            .field("id", &self.id)
            .field("size", &self.size)
            .finish()
    }
}

impl SseParser {
    /// Feeds bytes; returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, &'static str> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line).map_err(|_| "an event stream line is not UTF-8")?;
            self.size += line.len();
            if self.size > MAX_EVENT_BYTES {
                return Err("an event is too large");
            }
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(SseEvent {
                        event: if self.event.is_empty() {
                            "message".into()
                        } else {
                            std::mem::take(&mut self.event)
                        },
                        data: self.data.join("\n"),
                        id: self.id.clone(),
                    });
                }
                self.event.clear();
                self.data.clear();
                self.size = 0;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "event" => self.event = value.to_owned(),
                "data" => self.data.push(value.to_owned()),
                "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
                _ => {}
            }
        }
        if self.buffer.len() > MAX_EVENT_BYTES {
            return Err("an event stream line is too long");
        }
        Ok(events)
    }
}

/// Whether `path` exists and is a file only its owner can read and write.
pub fn is_private_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o077 == 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_url_keeps_the_gateways_base_path() {
        for (base, jwks) in [
            (
                "https://gw.example:8443",
                "https://gw.example:8443/oauth2/jwks",
            ),
            (
                "https://edge.example/portcullis",
                "https://edge.example/portcullis/oauth2/jwks",
            ),
            (
                "https://edge.example/portcullis/",
                "https://edge.example/portcullis/oauth2/jwks",
            ),
        ] {
            let base = Url::parse(base).unwrap();
            assert_eq!(under(&base, &["oauth2", "jwks"]).unwrap().as_str(), jwks);
        }
        let base = Url::parse("https://edge.example/portcullis/").unwrap();
        assert_eq!(
            under(&base, &["config", "v1", "prod", "a b"])
                .unwrap()
                .as_str(),
            "https://edge.example/portcullis/config/v1/prod/a%20b"
        );
        assert!(under(&Url::parse("mailto:ops@example.com").unwrap(), &["x"]).is_err());
    }

    #[test]
    fn reconnect_delays_are_drawn_within_their_bounds() {
        for limit in [
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::from_millis(250),
            Duration::from_secs(30),
            Duration::MAX,
        ] {
            let drawn: Vec<Duration> = (0..200).map(|_| full_jitter(limit)).collect();
            assert!(drawn.iter().all(|d| *d <= limit), "{limit:?}: {drawn:?}");
            if limit >= Duration::from_millis(1) {
                let first = drawn[0];
                assert!(drawn.iter().any(|d| *d != first), "{limit:?}: not drawn");
            }
        }
        let mut seen = [false; 4];
        for _ in 0..400 {
            let n = random_below(4);
            assert!(n < 4);
            seen[usize::try_from(n).unwrap()] = true;
        }
        assert_eq!(seen, [true; 4], "every gateway may come first");
        assert_eq!(random_below(0), 0);
        assert_eq!(random_below(1), 0);
    }

    #[test]
    fn a_copy_check_that_does_not_conclude_is_put_off_on_a_growing_step() {
        let s = Duration::from_secs;
        let is_due = |check: &CopyCheck| tokio::time::Instant::now() >= check.due;
        let mut check = CopyCheck::new(s(10));
        assert!(is_due(&check), "the first check is made at once");
        for step in [10, 20, 40, 60, 60] {
            let wait = check.put_off(s(60));
            assert!(s(step) / 2 <= wait && wait <= s(step), "{step} s: {wait:?}");
            assert!(!is_due(&check), "{step} s");
        }
        // no step overflows the clock
        let mut check = CopyCheck::new(Duration::MAX);
        assert!(check.put_off(Duration::MAX) >= Duration::MAX / 2);
        assert!(!is_due(&check));
    }

    #[test]
    fn an_unknown_kid_refetches_each_gateways_jwks_at_most_once_per_interval() {
        let pace = RefetchPace::default();
        let (a, b) = (
            Url::parse("https://a.example:8443").unwrap(),
            Url::parse("https://b.example:8443").unwrap(),
        );
        let start = tokio::time::Instant::now();
        let ms = Duration::from_millis;
        let interval = JWKS_UNKNOWN_KID_INTERVAL;
        assert!(pace.allow(&a, start));
        assert!(
            !pace.allow(&a, start + ms(10)),
            "a burst of offers: one fetch"
        );
        assert!(
            pace.allow(&b, start + ms(20)),
            "another gateway is asked all the same"
        );
        assert!(!pace.allow(&a, start + interval - ms(1)));
        assert!(pace.allow(&a, start + interval), "an interval on");
        assert!(!pace.allow(&a, start + interval + ms(1)));
        // an instant before the last (a clock read out of order) is within the interval
        assert!(!pace.allow(&b, start));
    }

    #[test]
    fn the_jwks_is_kept_for_its_max_age_within_bounds() {
        let s = Duration::from_secs;
        for (header, age) in [
            (Some("public, max-age=900"), s(900)),
            (Some("max-age=60, public"), s(60)),
            (Some("public, MAX-AGE=\"120\""), s(120)),
            (Some("public, max-age=0"), JWKS_MIN_AGE),
            (Some("public, max-age=86400"), JWKS_MAX_AGE),
            (Some("no-cache, max-age=600"), JWKS_MIN_AGE),
            (Some("no-store"), JWKS_MIN_AGE),
            (Some("public, max-age=soon"), JWKS_DEFAULT_AGE),
            (Some("public"), JWKS_DEFAULT_AGE),
            (None, JWKS_DEFAULT_AGE),
        ] {
            assert_eq!(jwks_max_age(header), age, "{header:?}");
        }
    }
}
