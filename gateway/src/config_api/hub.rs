//! The serving side of the config center: one signed, serialized snapshot per
//! (environment, application) that this instance has been asked for, shared by every
//! reader, long-poller and SSE watcher.
//!
//! A release reaches watchers like this: the store publishes and notifies (Postgres
//! `NOTIFY`, or in process for SQLite); every instance's feed task hears the note and,
//! if anybody on that instance holds the (environment, application), reads the release
//! **once**, signs it **once**, serializes it **once** and swaps it into a `watch`
//! channel; each watcher then writes the same `Bytes` to its socket. A periodic reconcile
//! compares the newest versions in the database with what is held, so a lost
//! notification heals by itself. While the database is away, what is held keeps being
//! served.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use config_center::{
    AppName, Environment, GraySelector, Release, ReleaseEvent, ReleaseStatus, Snapshot, Store,
    StoreError,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::keys::KeyService;

/// One release, ready to send.
#[derive(Debug)]
pub struct Published {
    /// The release version.
    pub version: u64,
    /// The snapshot JSON (`GET /config/v1/{env}/{app}` body and SSE `data`).
    pub json: Bytes,
    /// The whole SSE event (`event`, `id`, `data`), shared by every watcher.
    pub sse: Bytes,
}

impl Published {
    fn new(snapshot: &Snapshot) -> Result<Self, serde_json::Error> {
        let json = serde_json::to_vec(snapshot)?;
        let mut sse = Vec::with_capacity(json.len() + 48);
        sse.extend_from_slice(
            format!("event: release\nid: {}\ndata: ", snapshot.version).as_bytes(),
        );
        sse.extend_from_slice(&json);
        sse.extend_from_slice(b"\n\n");
        Ok(Self {
            version: snapshot.version,
            json: Bytes::from(json),
            sse: Bytes::from(sse),
        })
    }

    /// The strong ETag of this release.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.version)
    }
}

/// Why the hub could not produce a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The store failed (database or key unwrap).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No key may sign now.
    #[error(transparent)]
    Keys(#[from] keyrotation::KeyError),
    /// The signature could not be detached (a bug).
    #[error("release signature: {0}")]
    Signature(String),
    /// Serializing a snapshot failed (a bug).
    #[error("serializing a snapshot: {0}")]
    Json(#[from] serde_json::Error),
}

/// What an instance holds of one (environment, application): the main release, and the
/// gray release in progress (newer than the main one) with who receives it.
#[derive(Debug, Default)]
pub struct Held {
    /// The current main release.
    pub main: Option<Arc<Published>>,
    /// The gray release in progress and its selector.
    pub gray: Option<(GraySelector, Arc<Published>)>,
}

impl Held {
    /// The release an instance with this id and these labels receives.
    pub fn for_instance(
        &self,
        instance: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Option<Arc<Published>> {
        match &self.gray {
            Some((selector, gray)) if selector.matches(instance, labels) => Some(gray.clone()),
            _ => self.main.clone(),
        }
    }

    fn main_version(&self) -> Option<u64> {
        self.main.as_ref().map(|p| p.version)
    }

    fn gray_version(&self) -> Option<u64> {
        self.gray.as_ref().map(|(_, p)| p.version)
    }
}

type Slot = watch::Sender<Arc<Held>>;

/// The per-instance cache and fan-out of releases. Cheap to clone.
#[derive(Clone)]
pub struct ConfigHub {
    store: Store,
    keys: KeyService,
    slots: Arc<Mutex<HashMap<(String, String), Slot>>>,
    // one load at a time per instance: a burst of notes for one release reads it once
    loading: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for ConfigHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigHub").finish_non_exhaustive()
    }
}

impl ConfigHub {
    /// A hub over `store`, signing with `keys`.
    pub fn new(store: Store, keys: KeyService) -> Self {
        Self {
            store,
            keys,
            slots: Arc::new(Mutex::new(HashMap::new())),
            loading: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The store behind the hub.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Slot>> {
        // the map holds only channels: it is valid whatever a panicking holder did
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn slot(&self, env: &Environment, app: &AppName) -> Slot {
        let mut slots = self.slots();
        slots
            .entry((env.to_string(), app.to_string()))
            .or_insert_with(|| watch::channel(Arc::new(Held::default())).0)
            .clone()
    }

    fn existing_slot(&self, env: &str, app: &str) -> Option<Slot> {
        let slots = self.slots();
        slots.get(&(env.to_owned(), app.to_owned())).cloned()
    }

    /// What is held of (env, app), read from the store first if nothing is.
    pub async fn current(&self, env: &Environment, app: &AppName) -> Result<Arc<Held>, HubError> {
        let slot = self.slot(env, app);
        let held = slot.borrow().clone();
        if held.main.is_some() {
            return Ok(held);
        }
        self.load(env, app, &slot).await
    }

    /// A receiver that sees every change of (env, app) from now on, primed with what is
    /// held now.
    pub async fn subscribe(
        &self,
        env: &Environment,
        app: &AppName,
    ) -> Result<watch::Receiver<Arc<Held>>, HubError> {
        let slot = self.slot(env, app);
        if slot.borrow().main.is_none() {
            self.load(env, app, &slot).await?;
        }
        Ok(slot.subscribe())
    }

    /// Reads the newest main release and the gray one in progress, and swaps them into
    /// `slot` when they differ from what it holds; each new release is signed and
    /// serialized once, here.
    async fn load(
        &self,
        env: &Environment,
        app: &AppName,
        slot: &Slot,
    ) -> Result<Arc<Held>, HubError> {
        let _one_at_a_time = self.loading.lock().await;
        let held = slot.borrow().clone();
        let main_version = self.store.current_version(env, app).await?;
        let gray_version = self
            .store
            .gray_version(env, app)
            .await?
            .filter(|g| Some(*g) > main_version);
        if held.main_version() == main_version && held.gray_version() == gray_version {
            return Ok(held);
        }
        let main = match main_version {
            None => None,
            Some(v) if Some(v) == held.main_version() => held.main.clone(),
            Some(v) => Some(self.publish(&self.store.release(env, app, v).await?)?),
        };
        let gray = match gray_version {
            None => None,
            Some(v) if Some(v) == held.gray_version() => held.gray.clone(),
            Some(v) => {
                let release = self.store.release(env, app, v).await?;
                // promoted or aborted between the two reads: the next note says which
                match (&release.status, release.gray.clone()) {
                    (ReleaseStatus::Gray, Some(selector)) => {
                        Some((selector, self.publish(&release)?))
                    }
                    _ => None,
                }
            }
        };
        let new = Arc::new(Held { main, gray });
        slot.send_replace(new.clone());
        Ok(new)
    }

    /// Reloads (env, app) now if this instance holds it: a write made through this
    /// instance is then visible to its next read (read-your-writes), without waiting for
    /// the change feed to bring the note back.
    pub async fn refresh(&self, env: &Environment, app: &AppName) {
        let Some(slot) = self.existing_slot(env.as_str(), app.as_str()) else {
            return;
        };
        if let Err(e) = self.load(env, app, &slot).await {
            tracing::warn!(
                environment = %env,
                application = %app,
                error = %crate::error::chain(&e),
                "config release could not be reloaded after a write; the change feed retries"
            );
        }
    }

    /// Signs and serializes one release.
    fn publish(&self, release: &Release) -> Result<Arc<Published>, HubError> {
        let mut snapshot = Snapshot::unsigned(release);
        let compact = self.keys.sign(&snapshot.claims())?;
        snapshot.signature = config_center::signing::detach(&compact)
            .map_err(|e| HubError::Signature(e.to_string()))?;
        metrics::counter!("portcullis_config_releases_loaded_total").increment(1);
        Ok(Arc::new(Published::new(&snapshot)?))
    }

    /// A release note arrived: refresh the slot if anybody here holds it and its main
    /// release is older. (A gray release promoted to main keeps its version, so the main
    /// version alone decides.)
    async fn on_release(&self, event: &ReleaseEvent) {
        let Some(slot) = self.existing_slot(event.environment.as_str(), event.application.as_str())
        else {
            return;
        };
        if slot
            .borrow()
            .main_version()
            .is_some_and(|v| v >= event.version)
        {
            return;
        }
        if let Err(e) = self
            .load(&event.environment, &event.application, &slot)
            .await
        {
            tracing::warn!(
                environment = %event.environment,
                application = %event.application,
                error = %crate::error::chain(&e),
                "config release could not be loaded; the reconcile retries"
            );
        }
    }

    /// Compares every held slot with the newest versions in the database (nothing to do,
    /// and no query, while this instance holds nothing).
    pub async fn reconcile(&self) -> Result<(), HubError> {
        if self.slots().is_empty() {
            return Ok(());
        }
        for event in self.store.latest_versions().await? {
            self.on_release(&event).await;
        }
        Ok(())
    }

    /// Runs the change feed and the periodic reconcile until `stop`. Every step, database
    /// calls included, is abandoned when `stop` fires, so shutdown never waits for a
    /// database that does not answer.
    /// Listening starts once `db` is migrated: before, there is nothing to listen for.
    pub fn spawn(
        &self,
        db: crate::db::Database,
        reconcile_every: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            while !db.is_migrated() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            let mut feed = hub.store.change_feed();
            let mut tick = tokio::time::interval(reconcile_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = hub.step(&mut feed, &mut tick) => {}
                }
            }
        })
    }

    /// Waits for a change note or the reconcile tick, and acts on it.
    async fn step(&self, feed: &mut config_center::ChangeFeed, tick: &mut tokio::time::Interval) {
        let reconcile = tokio::select! {
            event = feed.recv() => match event {
                Ok(config_center::FeedEvent::Release(e)) => {
                    self.on_release(&e).await;
                    false
                }
                Ok(config_center::FeedEvent::Resync) => true,
                Err(_) => {
                    // the pool is closed (shutting down): rely on the reconcile alone
                    tracing::warn!("config change feed closed; relying on the periodic reconcile");
                    *feed = self.store.change_feed();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    false
                }
            },
            _ = tick.tick() => true,
        };
        if reconcile && let Err(e) = self.reconcile().await {
            tracing::warn!(error = %crate::error::chain(&e), "config reconcile failed");
        }
    }
}
