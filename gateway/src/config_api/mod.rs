//! The HTTP face of the config center (`/config/v1/…`): snapshot reads with ETags,
//! long-poll and Server-Sent-Events watches for nodes, and writes, history, diff and
//! rollback for ops. The domain (names, storage, encryption, change feed) lives in the
//! `config-center` crate; this module only authorises, translates and streams.
//!
//! Access is per environment and application, from token scopes:
//! `config:read:<env>` (or `config:read:<env>:<app>`) reads plaintext snapshots (nodes);
//! `config:write:<env>[:<app>]` publishes, edits and rolls back; `config:reveal:<env>`
//! shows secret values in history and diffs, which are masked otherwise. An admin token
//! (`portcullis:admin`) may do all of it. Portcullis's own runtime settings (the
//! application `portcullis`) are written only with `config:write:<env>:portcullis` or
//! the admin scope, never with an environment-wide grant. See `docs/config-center.md`.

mod fanout;
pub mod hub;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use config_center::{
    AppName, ChangeNote, ConfigEntry, ConfigKey, Edit, Environment, Expected, Format,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit::AuditEvent;
use crate::authn::Principal;
use crate::detach::Detach;
use crate::error::ApiError;
use crate::protect::ClientIp;
use crate::state::AppState;

pub use hub::{ConfigHub, Held, HubError, Published, Subscription};

/// How often an idle SSE stream carries a comment, so proxies keep it open.
pub const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// That comment.
const KEEP_ALIVE_COMMENT: &[u8] = b": keep-alive\n\n";
/// The longest one token holds a watch or a long-poll, whatever its `exp` says, so the
/// deadline is always an instant the runtime can count to (our tokens live far less).
const FAR_FUTURE: Duration = Duration::from_secs(365 * 86_400);
/// The scope that may do everything here.
const ADMIN_SCOPE: &str = "portcullis:admin";

// === the service ===

/// The config center of one instance. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ConfigCenter {
    /// Releases held for readers and watchers.
    pub hub: ConfigHub,
    /// The configured environments.
    pub environments: std::sync::Arc<config_center::Environments>,
    /// The longest hold of a long-poll.
    pub long_poll_max: Duration,
    /// Open watches per client address.
    pub watch_slots: Arc<WatchSlots>,
    /// The relays that send releases to watches on bare connections.
    fanout: Arc<fanout::FanOut>,
}

impl ConfigCenter {
    /// The config center over `db`, sealing values with `wrapper` and signing releases
    /// with `keys`. Connects to nothing yet.
    pub fn new(
        config: &crate::config::Config,
        db: &crate::db::Database,
        wrapper: config_center::KeyWrapper,
        keys: crate::keys::KeyService,
    ) -> Result<Self, config_center::ModelError> {
        let environments =
            config_center::Environments::new(config.config_center.environments.iter())?;
        let store = config_center::Store::new(
            db.config_center_pool(),
            config_center::Envelope::new(wrapper),
        )
        .with_check(crate::runtime::release_check(config));
        Ok(Self {
            hub: ConfigHub::new(store, keys),
            environments: std::sync::Arc::new(environments),
            long_poll_max: config.config_center.long_poll_timeout,
            watch_slots: Arc::new(WatchSlots::new(config.config_center.max_watches_per_client)),
            fanout: Arc::default(),
        })
    }

    /// How many relays send releases to watches on bare connections: one per
    /// (environment, application) watched that way now, none once its watches leave.
    pub fn relay_count(&self) -> usize {
        self.fanout.relay_count()
    }
}

/// The wrapper of config data keys `config` asks for: a local master key file (created
/// if missing) or a Vault Transit key. Transit calls use the key ring's own Vault source
/// when the ring lives in Vault (one authentication, renewed), else a source of their own
/// whose token renewal the caller must spawn (the second value). Makes no request, so an
/// instance starts while Vault is away.
pub fn key_wrapper(
    config: &crate::config::Config,
    keys: &crate::keys::KeyService,
) -> Result<
    (
        config_center::KeyWrapper,
        Option<keyrotation::VaultKeySource>,
    ),
    String,
> {
    use crate::config::KeyWrapperKind;
    let (kind, file) = config.config_wrapper().map_err(|e| e.to_string())?;
    match (kind, file) {
        (KeyWrapperKind::Local, Some(file)) => config_center::LocalWrapper::open_or_create(&file)
            .map(|w| (config_center::KeyWrapper::Local(w), None))
            .map_err(|e| e.to_string()),
        (KeyWrapperKind::Local, None) => Err("no master key file".to_owned()),
        (KeyWrapperKind::Transit, _) => {
            let (vault, own) = match keys.vault() {
                Some(v) => (v.clone(), None),
                None => {
                    let settings = config.vault.clone().ok_or_else(|| {
                        "config_center.key_wrapper = transit needs [vault]".to_owned()
                    })?;
                    let v =
                        keyrotation::VaultKeySource::new(settings).map_err(|e| e.to_string())?;
                    (v.clone(), Some(v))
                }
            };
            let c = &config.config_center;
            let wrapper = config_center::TransitWrapper::with_source(
                Arc::new(VaultClients(vault)),
                &c.transit_mount,
                &c.transit_key,
            );
            Ok((config_center::KeyWrapper::Transit(wrapper), own))
        }
    }
}

/// Hands the Transit wrapper the Vault source's current client.
struct VaultClients(keyrotation::VaultKeySource);

#[async_trait::async_trait]
impl config_center::VaultClientSource for VaultClients {
    async fn client(
        &self,
    ) -> Result<Arc<vaultrs::client::VaultClient>, config_center::CryptoError> {
        self.0
            .authenticated_client()
            .await
            .map_err(|e| config_center::CryptoError::KeyService(e.to_string()))
    }
}

// === access ===

/// What a principal wants to do to an (environment, application).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Read,
    Write,
    Reveal,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Reveal => "reveal",
        }
    }
}

/// Whether an environment-wide grant (`config:<action>:<env>`) covers `action` on `app`.
/// Not writes of the runtime settings ([`crate::runtime::APP`]): whoever writes them
/// steers every instance (where the proxy sends console requests and their identity
/// headers, how hard logins are throttled), which a credential meant for executor configs
/// must not. They need `config:write:<env>:portcullis` or the admin scope.
fn env_wide_covers(action: Action, app: &AppName) -> bool {
    !(action == Action::Write && app.as_str() == crate::runtime::APP)
}

fn may(p: &Principal, action: Action, env: &Environment, app: &AppName) -> bool {
    let a = action.as_str();
    p.has_scope(ADMIN_SCOPE)
        || p.has_scope(&format!("config:{a}:{env}:{app}"))
        || (env_wide_covers(action, app) && p.has_scope(&format!("config:{a}:{env}")))
}

fn require(
    p: &Principal,
    action: Action,
    env: &Environment,
    app: &AppName,
) -> Result<(), ApiError> {
    if may(p, action, env, app) {
        return Ok(());
    }
    metrics::counter!("portcullis_bearer_rejections_total", "reason" => "scope").increment(1);
    let a = action.as_str();
    let required = if env_wide_covers(action, app) {
        format!("config:{a}:{env}")
    } else {
        format!("config:{a}:{env}:{app}")
    };
    Err(ApiError::InsufficientScope { required })
}

/// Parses the path's names and checks that `p` may do `action` there: the first step of
/// every handler.
fn authorized(
    state: &AppState,
    p: &Principal,
    action: Action,
    env: &str,
    app: &str,
) -> Result<(Environment, AppName), ApiError> {
    let (env, app) = names(state, env, app)?;
    require(p, action, &env, &app)?;
    Ok((env, app))
}

/// When the token `p` presented stops being accepted — its `exp` plus the verifier's
/// leeway, the instant a new request with it would be refused — on the runtime's clock.
/// A long-poll or a watch is authorised by that token, so it is held no longer: what a
/// request with the token could not read must not reach it on a stream opened earlier.
fn token_deadline(state: &AppState, p: &Principal) -> tokio::time::Instant {
    let keys = &state.keys;
    let leeway =
        time::Duration::try_from(keys.verify_params().leeway).unwrap_or(time::Duration::MAX);
    let valid_until = time::Duration::seconds(p.expires_at).saturating_add(leeway);
    let now = keys.now() - time::OffsetDateTime::UNIX_EPOCH;
    // negative (expired already): no time left
    let left = Duration::try_from(valid_until.saturating_sub(now))
        .unwrap_or(Duration::ZERO)
        .min(FAR_FUTURE);
    let start = tokio::time::Instant::now();
    start.checked_add(left).unwrap_or(start)
}

/// Whether the token a watch was opened with has been cut off since ([`crate::cutoff`]):
/// checked whenever the watch checks its deadline (each release, each keep-alive), so a
/// disabled client's watch ends within a keep-alive interval of the cutoff reaching the
/// instance.
#[derive(Clone)]
pub(super) struct Cut {
    cutoffs: Arc<crate::cutoff::Cutoffs>,
    client_id: Box<str>,
    issued_at: i64,
}

impl Cut {
    fn of(state: &AppState, p: &Principal) -> Self {
        Self {
            cutoffs: Arc::clone(state.keys.cutoffs()),
            client_id: p.client_id.as_str().into(),
            issued_at: p.issued_at,
        }
    }

    /// Whether the token is cut off now.
    pub(super) fn now(&self) -> bool {
        self.cutoffs.refuses(&self.client_id, self.issued_at)
    }
}

/// Parses the path's names; every refusal names the field.
fn names(state: &AppState, env: &str, app: &str) -> Result<(Environment, AppName), ApiError> {
    let env = state.config_center.environments.parse(env)?;
    let app = AppName::parse(app)?;
    Ok((env, app))
}

// === reading ===

/// Who is asking, for gray releases: `?instance=<id>&labels=k1=v1,k2=v2`, and for the
/// long-poll and the watch the version the node holds (`?version=N`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// The node's instance id.
    #[serde(default)]
    pub instance: Option<String>,
    /// The node's labels, `k1=v1,k2=v2`.
    #[serde(default)]
    pub labels: Option<String>,
    /// The version the node holds (0 or absent: none).
    #[serde(default)]
    pub version: Option<u64>,
}

/// A parsed [`Node`].
struct Who {
    instance: Option<String>,
    labels: BTreeMap<String, String>,
    version: u64,
}

impl Who {
    fn pick(&self, held: &Held) -> Option<Arc<Published>> {
        held.for_instance(self.instance.as_deref(), &self.labels)
    }

    /// The release this node gets from `held`, if it is newer than the one it has.
    fn newer(&self, held: &Held) -> Option<Arc<Published>> {
        self.pick(held).filter(|p| p.version > self.version)
    }
}

fn who(query: Result<Query<Node>, QueryRejection>) -> Result<Who, ApiError> {
    let Query(node) = query.map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))?;
    let labels = match &node.labels {
        Some(text) => config_center::GraySelector::parse_labels(text)?,
        None => BTreeMap::new(),
    };
    if let Some(id) = &node.instance {
        // the selector's own check of an instance id
        config_center::GraySelector::new([id.clone()], BTreeMap::new())?;
    }
    Ok(Who {
        instance: node.instance,
        labels,
        version: node.version.unwrap_or(0),
    })
}

/// `GET /config/v1/{env}/{app}`: the current signed snapshot (the gray release for nodes
/// it selects), with `ETag`; 304 when `If-None-Match` names it.
pub async fn snapshot(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((env, app)): Path<(String, String)>,
    query: Result<Query<Node>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (env, app) = authorized(&state, &principal, Action::Read, &env, &app)?;
    let who = who(query)?;
    let held = state.config_center.hub.current(&env, &app).await?;
    let published = who.pick(&held).ok_or(ApiError::NotFound)?;
    let etag = published.etag();
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches {
        return Ok(not_modified(&etag));
    }
    Ok(snapshot_response(&published))
}

fn snapshot_response(published: &Published) -> Response {
    let mut r = Response::new(Body::from(published.json.clone()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&published.etag()) {
        h.insert(header::ETAG, v);
    }
    // plaintext secrets may be inside: no shared cache may keep it
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn not_modified(etag: &str) -> Response {
    let mut r = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(v) = HeaderValue::from_str(etag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// `GET /config/v1/{env}/{app}/poll?version=N`: the newest snapshot as soon as one newer
/// than N exists (at once if it does already), else 304 after the long-poll timeout, or
/// when the token expires if that comes first.
pub async fn poll(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((env, app)): Path<(String, String)>,
    query: Result<Query<Node>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (env, app) = authorized(&state, &principal, Action::Read, &env, &app)?;
    let who = who(query)?;
    let mut rx = state.config_center.hub.subscribe(&env, &app).await?;
    let wait = async {
        loop {
            let current = who.newer(&rx.borrow_and_update());
            if let Some(p) = current {
                return Some(p);
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    };
    let timeout = tokio::time::Instant::now() + state.config_center.long_poll_max;
    let until = timeout.min(token_deadline(&state, &principal));
    let cut = Cut::of(&state, &principal);
    match tokio::time::timeout_at(until, wait).await {
        // a release that arrived after the token was cut off is not the token's to read
        Ok(Some(_)) if cut.now() => Err(ApiError::Unauthorized {
            code: "invalid_token",
            description: "the access token is invalid or expired".to_owned(),
        }),
        Ok(Some(p)) => Ok(snapshot_response(&p)),
        Ok(None) | Err(_) => Ok(not_modified(&format!("\"{}\"", who.version))),
    }
}

/// `GET /config/v1/{env}/{app}/watch`: Server-Sent Events, one `release` event per
/// release newer than the node's (from `Last-Event-ID` or `?version=`), the newest at once
/// if the node is behind; a keep-alive comment every 15 s. The stream ends (properly) when
/// the token expires; the node reconnects with a fresh one from the version it holds.
pub async fn watch(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    Path((env, app)): Path<(String, String)>,
    headers: HeaderMap,
    query: Result<Query<Node>, QueryRejection>,
    detach: Option<Extension<Detach>>,
) -> Result<Response, ApiError> {
    let (env, app) = authorized(&state, &principal, Action::Read, &env, &app)?;
    let mut who = who(query)?;
    if let Some(v) = headers.get("last-event-id") {
        who.version = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request("invalid_request", "Last-Event-ID must be a version number")
            })?;
    }
    let slot = state.config_center.watch_slots.take(ip).ok_or_else(|| {
        let limit = state.config_center.watch_slots.limit;
        ApiError::TooManyRequests {
            code: "too_many_watches",
            description: format!(
                "this address holds {limit} watches on this instance already; close one first"
            ),
            retry_after: SSE_KEEP_ALIVE.as_secs(),
        }
    })?;
    let rx = state.config_center.hub.subscribe(&env, &app).await?;
    let watch = WatchState {
        rx,
        who,
        tick: keep_alive_timer(),
        deadline: token_deadline(&state, &principal),
        cut: Cut::of(&state, &principal),
        _slot: slot,
    };
    let body = match detach {
        // HTTP/1.1 over TLS 1.3: once the head is out, the stream runs on the bare
        // connection (`crate::detach`), a few KiB per idle watcher, and the relay of its
        // environment and application writes each release to it (`fanout`)
        Some(Extension(detach)) => {
            let fanout = state.config_center.fanout.clone();
            let key = (env.to_string(), app.to_string());
            detach.body(move |connection| fanout.run(key, connection, watch))
        }
        None => Body::from_stream(futures::stream::unfold(watch, |mut s| async move {
            match s.next().await {
                WatchEvent::Send(bytes) => Some((Ok::<Bytes, Infallible>(bytes), s)),
                WatchEvent::End => None,
            }
        })),
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx buffers responses by default; an event must not wait in its buffer
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(r)
}

fn keep_alive_timer() -> tokio::time::Interval {
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + SSE_KEEP_ALIVE, SSE_KEEP_ALIVE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

struct WatchState {
    rx: hub::Subscription,
    who: Who,
    tick: tokio::time::Interval,
    /// When the watch's token expires ([`token_deadline`]): nothing is sent after it.
    deadline: tokio::time::Instant,
    /// Whether the token was cut off: nothing is sent after that either.
    cut: Cut,
    _slot: WatchSlot,
}

/// What a watch sends next.
enum WatchEvent {
    /// An event (a newer release for this node) or a keep-alive comment.
    Send(Bytes),
    /// The token expired, or the hub is gone (the instance is shutting down).
    End,
}

impl WatchState {
    /// Waits for the next thing to send: the release for this node when it is newer than
    /// the one it has, else a keep-alive comment when one is due; the end once the token
    /// has expired.
    async fn next(&mut self) -> WatchEvent {
        loop {
            if tokio::time::Instant::now() >= self.deadline || self.cut.now() {
                return WatchEvent::End;
            }
            let newer = {
                let held = self.rx.borrow_and_update();
                self.who.newer(&held).map(|p| (p.version, p.sse.clone()))
            };
            if let Some((version, sse)) = newer {
                self.who.version = version;
                return WatchEvent::Send(sse);
            }
            tokio::select! {
                changed = self.rx.changed() => if changed.is_err() { return WatchEvent::End },
                () = tokio::time::sleep_until(self.deadline) => return WatchEvent::End,
                _ = self.tick.tick() => {
                    if self.cut.now() {
                        return WatchEvent::End;
                    }
                    return WatchEvent::Send(Bytes::from_static(KEEP_ALIVE_COMMENT));
                }
            }
        }
    }
}

/// The watches open on this instance, by client address, so that one address cannot
/// hold every connection (`config_center.max_watches_per_client`; 0: no limit). Opening
/// and closing a watch is rare next to requests, so one lock is enough.
#[derive(Debug)]
pub struct WatchSlots {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl WatchSlots {
    /// At most `limit` watches per address (0: no limit).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more watch from `ip`, or `None` when it holds the limit already.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<WatchSlot> {
        if self.limit > 0 {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            let held = open.entry(ip).or_insert(0);
            if *held >= self.limit {
                return None;
            }
            *held += 1;
        }
        metrics::gauge!("portcullis_config_watchers").increment(1.0);
        Some(WatchSlot {
            slots: self.clone(),
            ip,
        })
    }
}

/// One open watch: counted in `portcullis_config_watchers` and against its address for
/// as long as its stream lives.
struct WatchSlot {
    slots: Arc<WatchSlots>,
    ip: IpAddr,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        metrics::gauge!("portcullis_config_watchers").decrement(1.0);
        if self.slots.limit == 0 {
            return;
        }
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = open.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// `?limit=` of the history.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// At most this many releases (default 50, at most 1000).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// A release without its entries, as listed.
#[derive(Debug, Serialize)]
pub struct ReleaseView {
    version: u64,
    #[serde(with = "time::serde::rfc3339")]
    created_at: time::OffsetDateTime,
    author: String,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollback_of: Option<u64>,
    /// `main`, `gray` (served only to the instances `gray` selects) or `aborted`.
    status: &'static str,
    /// Who received it while it was gray (gray and aborted releases).
    #[serde(skip_serializing_if = "Option::is_none")]
    gray: Option<config_center::GraySelector>,
}

impl From<config_center::ReleaseInfo> for ReleaseView {
    fn from(i: config_center::ReleaseInfo) -> Self {
        Self {
            version: i.version,
            created_at: i.created_at,
            author: i.author,
            message: i.message,
            rollback_of: i.rollback_of,
            status: i.status.as_str(),
            gray: i.gray,
        }
    }
}

/// `GET /config/v1/{env}/{app}/releases`: the history, newest first.
pub async fn history(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((env, app)): Path<(String, String)>,
    query: Result<Query<Limit>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (env, app) = authorized(&state, &principal, Action::Read, &env, &app)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let rows = state
        .config_center
        .hub
        .store()
        .history(&env, &app, limit)
        .await?;
    let releases: Vec<ReleaseView> = rows.into_iter().map(ReleaseView::from).collect();
    Ok(Json(
        json!({ "environment": env.as_str(), "application": app.as_str(), "releases": releases }),
    ))
}

/// `GET /config/v1/{env}/{app}/releases/{version}`: one release's entries; secret values
/// masked without `config:reveal:<env>`.
pub async fn release(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((env, app, version)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let (env, app) = authorized(&state, &principal, Action::Read, &env, &app)?;
    let version = parse_version("version", &version)?;
    let reveal = may(&principal, Action::Reveal, &env, &app);
    let r = state
        .config_center
        .hub
        .store()
        .release(&env, &app, version)
        .await?;
    let body = json!({
        "environment": env.as_str(),
        "application": app.as_str(),
        "version": r.version,
        "created_at": r.created_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "author": r.author,
        "message": r.message,
        "rollback_of": r.rollback_of,
        "status": r.status.as_str(),
        "gray": r.gray,
        "entries": r.listing(reveal),
    });
    let mut resp = Json(body).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// `?from=&to=` of a diff.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffQuery {
    /// The older release.
    pub from: u64,
    /// The newer release.
    pub to: u64,
}

/// `GET /config/v1/{env}/{app}/diff?from=A&to=B`: what changed between two releases.
pub async fn diff(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((env, app)): Path<(String, String)>,
    query: Result<Query<DiffQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (env, app) = authorized(&state, &principal, Action::Read, &env, &app)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))?;
    let reveal = may(&principal, Action::Reveal, &env, &app);
    let d = state
        .config_center
        .hub
        .store()
        .diff(&env, &app, q.from, q.to, reveal)
        .await?;
    let mut resp = Json(diff_json(&d)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

fn diff_json(d: &config_center::Diff) -> serde_json::Value {
    let changes: Vec<serde_json::Value> = d
        .changes
        .iter()
        .map(|c| {
            json!({
                "key": c.key,
                "change": match c.kind {
                    config_center::ChangeKind::Added => "added",
                    config_center::ChangeKind::Removed => "removed",
                    config_center::ChangeKind::Changed => "changed",
                },
                "before": c.before,
                "after": c.after,
            })
        })
        .collect();
    json!({ "from": d.from, "to": d.to, "changes": changes })
}

fn parse_version(field: &str, text: &str) -> Result<u64, ApiError> {
    text.parse::<u64>().ok().filter(|v| *v > 0).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_request",
            format!("{field} must be a release number (1, 2, …)"),
        )
    })
}

// === writing ===

/// One entry in a write.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryIn {
    /// The key.
    pub key: String,
    /// The value, as text.
    pub value: String,
    /// `plain` (default), `properties`, `yaml` or `json`; the value is checked against it.
    #[serde(default)]
    pub format: Option<String>,
    /// Masked in listings, history, diffs and audit.
    #[serde(default)]
    pub secret: bool,
}

/// The entries of a write, checked, and their keys (for the audit trail).
fn parse_entries(entries: &[EntryIn]) -> Result<(Vec<ConfigEntry>, Vec<String>), ApiError> {
    let parsed = entries
        .iter()
        .map(EntryIn::parse)
        .collect::<Result<Vec<_>, _>>()?;
    let keys = parsed.iter().map(|e| e.key.to_string()).collect();
    Ok((parsed, keys))
}

impl EntryIn {
    fn parse(&self) -> Result<ConfigEntry, ApiError> {
        let format = match &self.format {
            None => Format::Plain,
            Some(f) => Format::parse(f)?,
        };
        Ok(ConfigEntry::parse(
            &self.key,
            &self.value,
            format,
            self.secret,
        )?)
    }
}

/// `PUT /config/v1/{env}/{app}`: the full snapshot of a new release.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    /// The version the writer based this on (0: none yet); absent: whatever is current.
    #[serde(default, deserialize_with = "release_number::optional")]
    pub expected_version: Option<u64>,
    /// Every entry of the new release.
    pub entries: Vec<EntryIn>,
    /// Why.
    #[serde(default)]
    pub message: String,
}

/// `PATCH /config/v1/{env}/{app}`: edits to the current release.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditBody {
    /// The version the writer based this on; absent: whatever is current.
    #[serde(default, deserialize_with = "release_number::optional")]
    pub expected_version: Option<u64>,
    /// Entries to add or replace.
    #[serde(default)]
    pub set: Vec<EntryIn>,
    /// Keys to remove.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Why.
    #[serde(default)]
    pub message: String,
}

/// `POST /config/v1/{env}/{app}/rollback`: republishes release `to` as a new release.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// The release to restore.
    #[serde(deserialize_with = "release_number::required")]
    pub to: u64,
    /// The version the writer saw as current (after looking at the diff).
    #[serde(default, deserialize_with = "release_number::optional")]
    pub expected_version: Option<u64>,
    /// Why.
    #[serde(default)]
    pub message: String,
}

/// Release numbers in JSON bodies. JSON does not tell `5` from `5.0` (RFC 8259 §6), and
/// JSON Schema counts both as integers, so a whole number written with a fraction or an
/// exponent is accepted while it is exact (at most 2^53); a negative, fractional or
/// inexact number is refused with 400.
mod release_number {
    use serde::de::{Deserialize, Deserializer, Error};

    /// Largest whole number an `f64` holds exactly, with every smaller one.
    const EXACT: f64 = 9_007_199_254_740_992.0;

    pub fn required<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        whole(serde_json::Number::deserialize(d)?)
    }

    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Option::<serde_json::Number>::deserialize(d)?
            .map(whole)
            .transpose()
    }

    fn whole<E: Error>(n: serde_json::Number) -> Result<u64, E> {
        if let Some(v) = n.as_u64() {
            return Ok(v);
        }
        match n.as_f64() {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Some(f) if (0.0..=EXACT).contains(&f) && f.fract() == 0.0 => Ok(f as u64),
            _ => Err(E::custom(format!(
                "expected a release number (a whole number, 0 or more), found {n}"
            ))),
        }
    }
}

/// A JSON body, with a precise 400 for anything that is not the documented shape.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            // the body-limit middleware turns this into the JSON 413 naming the limit
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(e.into_response()),
            Err(e) => Err(ApiError::bad_request("invalid_request", e.body_text()).into_response()),
        }
    }
}

fn expected(v: Option<u64>) -> Expected {
    v.map_or(Expected::Any, Expected::Version)
}

/// The answer to a write, after making it visible to this instance's next read and
/// recording it in the audit trail.
async fn written(
    state: &AppState,
    principal: &Principal,
    source_ip: std::net::IpAddr,
    action: &str,
    info: &config_center::ReleaseInfo,
    keys: Vec<String>,
    from: Option<u64>,
) -> Response {
    state
        .config_center
        .hub
        .refresh(&info.environment, &info.application)
        .await;
    // keys only, never values: the audit trail must not hold a secret
    state.audit.record(AuditEvent {
        at: time::OffsetDateTime::now_utc(),
        actor: principal.actor(),
        action: action.to_owned(),
        target: format!("{}/{}", info.environment, info.application),
        source_ip: Some(source_ip.to_string()),
        detail: json!({
            "version": info.version,
            "previous_version": info.version.saturating_sub(1),
            "rollback_of": info.rollback_of,
            "restored_from": from,
            "keys": keys,
            "message": info.message,
        })
        .into(),
    });
    metrics::counter!("portcullis_config_releases_total", "environment" => info.environment.to_string())
        .increment(1);
    let body = json!({
        "environment": info.environment.as_str(),
        "application": info.application.as_str(),
        "version": info.version,
        "rollback_of": info.rollback_of,
    });
    let mut r = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", info.version)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// `PUT /config/v1/{env}/{app}`.
pub async fn publish(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    Path((env, app)): Path<(String, String)>,
    JsonBody(body): JsonBody<PublishBody>,
) -> Result<Response, ApiError> {
    let (env, app) = authorized(&state, &principal, Action::Write, &env, &app)?;
    let (entries, keys) = parse_entries(&body.entries)?;
    let note = ChangeNote::new(principal.subject.clone(), body.message);
    let info = state
        .config_center
        .hub
        .store()
        .publish(&env, &app, expected(body.expected_version), entries, &note)
        .await?;
    Ok(written(&state, &principal, ip, "config.publish", &info, keys, None).await)
}

/// `PATCH /config/v1/{env}/{app}`.
pub async fn edit(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    Path((env, app)): Path<(String, String)>,
    JsonBody(body): JsonBody<EditBody>,
) -> Result<Response, ApiError> {
    let (env, app) = authorized(&state, &principal, Action::Write, &env, &app)?;
    if body.set.is_empty() && body.remove.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "an edit needs at least one entry in `set` or key in `remove`",
        ));
    }
    let mut edits = Vec::with_capacity(body.set.len() + body.remove.len());
    let mut keys = Vec::with_capacity(edits.capacity());
    for e in &body.set {
        let entry = e.parse()?;
        keys.push(entry.key.to_string());
        edits.push(Edit::Put(entry));
    }
    for k in &body.remove {
        let key = ConfigKey::parse(k)?;
        keys.push(key.to_string());
        edits.push(Edit::Delete(key));
    }
    let note = ChangeNote::new(principal.subject.clone(), body.message);
    let info = state
        .config_center
        .hub
        .store()
        .apply(&env, &app, expected(body.expected_version), &edits, &note)
        .await?;
    Ok(written(&state, &principal, ip, "config.edit", &info, keys, None).await)
}

/// `POST /config/v1/{env}/{app}/rollback`.
pub async fn rollback(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    Path((env, app)): Path<(String, String)>,
    JsonBody(body): JsonBody<RollbackBody>,
) -> Result<Response, ApiError> {
    let (env, app) = authorized(&state, &principal, Action::Write, &env, &app)?;
    let note = ChangeNote::new(principal.subject.clone(), body.message);
    let store = state.config_center.hub.store();
    let info = store
        .rollback(&env, &app, body.to, expected(body.expected_version), &note)
        .await?;
    Ok(written(
        &state,
        &principal,
        ip,
        "config.rollback",
        &info,
        Vec::new(),
        Some(body.to),
    )
    .await)
}

// === gray releases ===

/// Who receives a gray release.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorIn {
    /// Instance ids.
    #[serde(default)]
    pub instances: Vec<String>,
    /// Labels an instance must all carry.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `PUT /config/v1/{env}/{app}/gray`: a release served only to the selected instances.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrayBody {
    /// The version the writer based this on; absent: whatever is current.
    #[serde(default, deserialize_with = "release_number::optional")]
    pub expected_version: Option<u64>,
    /// Every entry of the gray release.
    pub entries: Vec<EntryIn>,
    /// Who receives it.
    pub selector: SelectorIn,
    /// Why.
    #[serde(default)]
    pub message: String,
}

/// `PUT /config/v1/{env}/{app}/gray`.
pub async fn publish_gray(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    Path((env, app)): Path<(String, String)>,
    JsonBody(body): JsonBody<GrayBody>,
) -> Result<Response, ApiError> {
    let (env, app) = authorized(&state, &principal, Action::Write, &env, &app)?;
    let (entries, keys) = parse_entries(&body.entries)?;
    let selector = config_center::GraySelector::new(body.selector.instances, body.selector.labels)?;
    let note = ChangeNote::new(principal.subject.clone(), body.message);
    let info = state
        .config_center
        .hub
        .store()
        .publish_gray(
            &env,
            &app,
            expected(body.expected_version),
            entries,
            &selector,
            &note,
        )
        .await?;
    Ok(written(&state, &principal, ip, "config.gray", &info, keys, None).await)
}

/// `?version=N` of promote and abort: the gray release the operator looked at (absent:
/// whichever is in progress).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrayVersion {
    /// The gray release's version.
    #[serde(default)]
    pub version: Option<u64>,
}

fn gray_version(query: Result<Query<GrayVersion>, QueryRejection>) -> Result<Expected, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))?;
    Ok(expected(q.version))
}

/// `POST /config/v1/{env}/{app}/gray/promote`: the gray release becomes the main one, for
/// every instance.
pub async fn promote_gray(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    Path((env, app)): Path<(String, String)>,
    query: Result<Query<GrayVersion>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (env, app) = authorized(&state, &principal, Action::Write, &env, &app)?;
    let which = gray_version(query)?;
    let version = state
        .config_center
        .hub
        .store()
        .promote(&env, &app, which)
        .await?;
    state.config_center.hub.refresh(&env, &app).await;
    state.audit.record(AuditEvent {
        at: time::OffsetDateTime::now_utc(),
        actor: principal.actor(),
        action: "config.promote".to_owned(),
        target: format!("{env}/{app}"),
        source_ip: Some(ip.to_string()),
        detail: json!({ "version": version }).into(),
    });
    Ok(Json(
        json!({ "environment": env.as_str(), "application": app.as_str(), "version": version }),
    )
    .into_response())
}

/// `DELETE /config/v1/{env}/{app}/gray`: the gray release is never served again; the main
/// release is republished as a new version, so every instance moves forward to it (201).
/// With no main release, nothing is republished and nothing is served (200).
pub async fn abort_gray(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    Path((env, app)): Path<(String, String)>,
    query: Result<Query<GrayVersion>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (env, app) = authorized(&state, &principal, Action::Write, &env, &app)?;
    let which = gray_version(query)?;
    let note = ChangeNote::new(principal.subject.clone(), "gray release aborted");
    let aborted = state
        .config_center
        .hub
        .store()
        .abort_gray(&env, &app, which, &note)
        .await?;
    if let Some(info) = &aborted.republished {
        return Ok(written(
            &state,
            &principal,
            ip,
            "config.abort_gray",
            info,
            Vec::new(),
            None,
        )
        .await);
    }
    state.config_center.hub.refresh(&env, &app).await;
    state.audit.record(AuditEvent {
        at: time::OffsetDateTime::now_utc(),
        actor: principal.actor(),
        action: "config.abort_gray".to_owned(),
        target: format!("{env}/{app}"),
        source_ip: Some(ip.to_string()),
        detail: json!({ "aborted": aborted.gray, "version": null }).into(),
    });
    Ok(Json(json!({
        "environment": env.as_str(),
        "application": app.as_str(),
        "aborted": aborted.gray,
        "version": null,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::RollbackBody;

    fn rollback(json: &str) -> Result<RollbackBody, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn release_numbers_are_whole_numbers_however_written() {
        let b = rollback(r#"{"to": 3.0, "expected_version": 7e0}"#).unwrap();
        assert_eq!((b.to, b.expected_version), (3, Some(7)));
        let b = rollback(r#"{"to": 18446744073709551615, "expected_version": null}"#).unwrap();
        assert_eq!((b.to, b.expected_version), (u64::MAX, None));
        for bad in [
            r#"{"to": 3.5}"#,
            r#"{"to": -1}"#,
            r#"{"to": -0.5}"#,
            r#"{"to": 1e300}"#,
            r#"{"to": "3"}"#,
            r#"{"to": 1, "expected_version": 2.25}"#,
        ] {
            let e = rollback(bad).err().unwrap();
            assert!(!e.to_string().is_empty(), "{bad}");
        }
    }
}
