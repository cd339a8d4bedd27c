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
//!
//! A held release keeps the signature it was given until the key that made it no longer
//! signs: a ring change (a rotation, an emergency rotation withdrawing the key from JWKS)
//! or the ring's own schedule (the next key taking over, the old one leaving JWKS weeks
//! later). The next read of it (a snapshot, a long-poll, a new watch) then signs it again
//! with the key signing now, from the bytes held, so it verifies against the JWKS of the
//! moment even while the database is away.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use config_center::{
    AppName, Environment, GraySelector, Release, ReleaseEvent, ReleaseStatus, Snapshot, Store,
    StoreError,
};
use keyrotation::RingStatus;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::keys::KeyService;

/// How long the background loop's work on one change note, or one reconcile, may take
/// with the database before it is given up ([`ConfigHub::step`]). Far above a healthy
/// reconcile (a query and a load per changed release); the same as an audit append's.
pub const STEP_DEADLINE: Duration = Duration::from_secs(15);

/// How long a held release whose signature could not be renewed (no key may sign now)
/// is served with the signature it has before signing it is tried again.
const RESIGN_RETRY: time::Duration = time::Duration::seconds(10);

/// One release, ready to send.
#[derive(Debug)]
pub struct Published {
    /// The release version.
    pub version: u64,
    /// The snapshot JSON (`GET /config/v1/{env}/{app}` body and SSE `data`).
    pub json: Bytes,
    /// The whole SSE event (`event`, `id`, `data`), shared by every watcher.
    pub sse: Bytes,
    /// Who signed it, and for how long that signature is the one to serve.
    signed: Signed,
}

/// The key that signed a held release, and how long the signature stays current: while
/// the ring is the one it was made under and, by that ring's schedule, no other key has
/// begun to sign.
#[derive(Debug, Clone)]
struct Signed {
    /// The signing key's id.
    kid: Option<keyrotation::Kid>,
    /// The key ring generation ([`keyrotation::Keys::generation`]) it was signed under.
    generation: u64,
    /// When, by that ring, another key signs (or this one stops).
    until: Option<OffsetDateTime>,
}

impl Signed {
    fn current(&self, generation: u64, now: OffsetDateTime) -> bool {
        self.generation == generation && self.until.is_some_and(|until| now < until)
    }
}

impl Published {
    fn new(snapshot: &Snapshot, signed: Signed) -> Result<Self, serde_json::Error> {
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
            signed,
        })
    }

    /// The strong ETag of this release.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.version)
    }

    /// The id of the key that signed it.
    pub fn kid(&self) -> Option<&keyrotation::Kid> {
        self.signed.kid.as_ref()
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

/// When, by the ring in `status`, the key signing at `status.at` stops being the one that
/// signs: it retires, or a later key becomes active (the newest active key signs).
/// `None` when no key signs.
fn signer_until(status: &RingStatus) -> Option<OffsetDateTime> {
    let active = status.active_kid.as_ref()?;
    let retires = status.keys.iter().find(|k| &k.kid == active)?.retire_at;
    let successor = status
        .keys
        .iter()
        .filter(|k| k.compromised_at.is_none() && k.activate_at > status.at)
        .map(|k| k.activate_at)
        .min();
    Some(successor.map_or(retires, |s| s.min(retires)))
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

    /// Whether every release held carries a signature that is current (see [`Signed`]).
    fn signed_currently(&self, generation: u64, now: OffsetDateTime) -> bool {
        self.main
            .iter()
            .chain(self.gray.iter().map(|(_, p)| p))
            .all(|p| p.signed.current(generation, now))
    }
}

type Slot = watch::Sender<Arc<Held>>;

/// An (environment, application), as the slots are keyed.
type Key = (String, String);

/// What the hub holds of one (environment, application): its channel, and how many
/// [`Subscription`]s follow it.
struct SlotEntry {
    tx: Slot,
    followers: usize,
}

impl SlotEntry {
    /// Whether nothing is held and nobody follows: the entry may go, and a read that
    /// needs it makes it again. A slot holding a release stays (it is what this
    /// instance serves); one without is made only by asking for an application that has
    /// none, which anyone with environment-wide read may do with any name.
    fn unused(&self) -> bool {
        let held = self.tx.borrow();
        self.followers == 0 && held.main.is_none() && held.gray.is_none()
    }
}

/// The slots of one instance, counted in `portcullis_config_hub_slots`.
#[derive(Default)]
struct Slots {
    map: Mutex<HashMap<Key, SlotEntry>>,
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, SlotEntry>> {
        // the map holds only channels and counts: it is valid whatever a panicking
        // holder did
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn entry(map: &mut HashMap<Key, SlotEntry>, key: Key) -> &mut SlotEntry {
        map.entry(key).or_insert_with(|| {
            metrics::gauge!("portcullis_config_hub_slots").increment(1.0);
            SlotEntry {
                tx: watch::channel(Arc::new(Held::default())).0,
                followers: 0,
            }
        })
    }

    /// A follower of `key`'s slot (made if there is none); counted before the lock is let
    /// go, so the slot cannot be dropped under it.
    fn follow(self: &Arc<Self>, key: Key) -> (Slot, Subscription) {
        let mut map = self.lock();
        let entry = Self::entry(&mut map, key.clone());
        entry.followers += 1;
        let subscription = Subscription {
            rx: entry.tx.subscribe(),
            slots: Arc::downgrade(self),
            key,
        };
        (entry.tx.clone(), subscription)
    }

    fn existing(&self, key: &Key) -> Option<Slot> {
        self.lock().get(key).map(|e| e.tx.clone())
    }

    /// Drops every unused slot (a safety net; each is dropped as it becomes unused).
    fn sweep(&self) {
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, e| !e.unused());
        metrics::gauge!("portcullis_config_hub_slots").decrement((before - map.len()) as f64);
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        let held = self.lock().len();
        metrics::gauge!("portcullis_config_hub_slots").decrement(held as f64);
    }
}

/// A receiver of one (environment, application)'s slot, primed with what is held. While
/// one exists the slot stays, however long no release comes: a release published later
/// reaches it. Dropping the last one of a slot that holds no release drops the slot.
pub struct Subscription {
    rx: watch::Receiver<Arc<Held>>,
    // weak: a subscription must not keep the hub's slots alive, or its channel would
    // never close when the hub goes (that is how watches learn of a shutdown)
    slots: std::sync::Weak<Slots>,
    key: Key,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Clone for Subscription {
    fn clone(&self) -> Self {
        if let Some(slots) = self.slots.upgrade()
            && let Some(entry) = slots.lock().get_mut(&self.key)
        {
            entry.followers += 1;
        }
        Self {
            rx: self.rx.clone(),
            slots: self.slots.clone(),
            key: self.key.clone(),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(slots) = self.slots.upgrade() else {
            return;
        };
        let mut map = slots.lock();
        let Some(entry) = map.get_mut(&self.key) else {
            return;
        };
        entry.followers = entry.followers.saturating_sub(1);
        if entry.unused() {
            map.remove(&self.key);
            metrics::gauge!("portcullis_config_hub_slots").decrement(1.0);
        }
    }
}

impl std::ops::Deref for Subscription {
    type Target = watch::Receiver<Arc<Held>>;

    fn deref(&self) -> &Self::Target {
        &self.rx
    }
}

impl std::ops::DerefMut for Subscription {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.rx
    }
}

/// The per-instance cache and fan-out of releases. Cheap to clone.
#[derive(Clone)]
pub struct ConfigHub {
    store: Store,
    keys: KeyService,
    slots: Arc<Slots>,
    // one load at a time per (environment, application): a burst of notes for one
    // release reads it once, and a load never swaps in what it read over a newer one. Per
    // application (by stripe), not per instance: while the database is slow or away, a
    // read of one application must not queue behind the loads of every other
    loading: Arc<[tokio::sync::Mutex<()>; LOAD_STRIPES]>,
}

/// How many load locks an instance has; applications share them by hash.
const LOAD_STRIPES: usize = 64;

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
            slots: Arc::default(),
            loading: Arc::new(std::array::from_fn(|_| tokio::sync::Mutex::new(()))),
        }
    }

    /// The store behind the hub.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How many (environment, application) slots this instance holds
    /// (`portcullis_config_hub_slots` counts those of the whole process).
    pub fn slot_count(&self) -> usize {
        self.slots.lock().len()
    }

    fn key(env: &Environment, app: &AppName) -> Key {
        (env.to_string(), app.to_string())
    }

    /// The load lock of (env, app).
    fn loading(&self, env: &str, app: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (env, app).hash(&mut h);
        // the remainder is below LOAD_STRIPES, so the cast back loses nothing
        #[allow(clippy::cast_possible_truncation)]
        let stripe = (h.finish() % LOAD_STRIPES as u64) as usize;
        &self.loading[stripe]
    }

    fn existing_slot(&self, env: &str, app: &str) -> Option<Slot> {
        self.slots.existing(&(env.to_owned(), app.to_owned()))
    }

    /// What is held of (env, app), read from the store first if nothing is, and signed
    /// again first if its signing key no longer signs.
    ///
    /// A read of an application that has no release leaves no slot behind (unless
    /// somebody follows it): what it found is not kept.
    pub async fn current(&self, env: &Environment, app: &AppName) -> Result<Arc<Held>, HubError> {
        let key = Self::key(env, app);
        if let Some(slot) = self.slots.existing(&key) {
            let held = slot.borrow().clone();
            if held.main.is_some() {
                if self.signed_currently(&held) {
                    return Ok(held);
                }
                return Ok(self.resign(env, app, &slot).await);
            }
        }
        // followed while it loads: a slot that holds nothing yet is unused, and the
        // reconcile's sweep would drop it under the load, which would then fill a slot
        // nobody holds (the release read, and read again by every later read). Letting
        // go of it drops the slot if the application has no release.
        let (slot, _loading) = self.slots.follow(key);
        self.load(env, app, &slot).await
    }

    /// A receiver that sees every change of (env, app) from now on, primed with what is
    /// held now (signed again first if its signing key no longer signs). The slot stays
    /// while it (or a clone) lives, so a first release published meanwhile reaches it.
    pub async fn subscribe(
        &self,
        env: &Environment,
        app: &AppName,
    ) -> Result<Subscription, HubError> {
        let (slot, mut subscription) = self.slots.follow(Self::key(env, app));
        let held = slot.borrow().clone();
        if held.main.is_none() {
            self.load(env, app, &slot).await?;
        } else if !self.signed_currently(&held) {
            self.resign(env, app, &slot).await;
        }
        // primed with what is held now, as a receiver made here would be
        subscription.borrow_and_update();
        Ok(subscription)
    }

    /// Whether `held`'s signatures are current: two atomic loads and a clock read, so
    /// every read may ask.
    fn signed_currently(&self, held: &Held) -> bool {
        held.signed_currently(self.keys.keys().generation(), self.keys.now())
    }

    /// Signs what `slot` holds again where its signature is not current, and swaps the
    /// result in (watchers see the same versions, so nothing is sent to them). Needs no
    /// database: the held bytes are signed again.
    async fn resign(&self, env: &Environment, app: &AppName, slot: &Slot) -> Arc<Held> {
        let _one_at_a_time = self.loading(env.as_str(), app.as_str()).lock().await;
        let held = slot.borrow().clone();
        let (generation, now) = (self.keys.keys().generation(), self.keys.now());
        if held.signed_currently(generation, now) {
            // signed again while this one waited
            return held;
        }
        let new = Arc::new(Held {
            main: held.main.as_ref().map(|p| self.kept(p, generation, now)),
            gray: held
                .gray
                .as_ref()
                .map(|(s, p)| (s.clone(), self.kept(p, generation, now))),
        });
        slot.send_replace(new.clone());
        new
    }

    /// `published` if its signature is current, else the same release signed by the key
    /// signing now. When no key may sign now, it is kept as it is (its key may still be
    /// in JWKS) and signing it is tried again after [`RESIGN_RETRY`].
    fn kept(
        &self,
        published: &Arc<Published>,
        generation: u64,
        now: OffsetDateTime,
    ) -> Arc<Published> {
        if published.signed.current(generation, now) {
            return published.clone();
        }
        let resigned = serde_json::from_slice::<Snapshot>(&published.json)
            .map_err(HubError::from)
            .and_then(|snapshot| {
                let target = format!("{}/{}", snapshot.environment, snapshot.application);
                self.sign(snapshot).map(|p| (p, target))
            });
        match resigned {
            Ok((p, target)) => {
                tracing::info!(
                    %target,
                    version = p.version,
                    from_kid = ?published.kid().map(keyrotation::Kid::as_str),
                    kid = ?p.kid().map(keyrotation::Kid::as_str),
                    "held config release signed again: its signing key no longer signs"
                );
                metrics::counter!("portcullis_config_releases_resigned_total").increment(1);
                p
            }
            Err(e) => {
                tracing::warn!(
                    version = published.version,
                    error = %crate::error::chain(&e),
                    "held config release could not be signed again; serving its old signature"
                );
                Arc::new(Published {
                    version: published.version,
                    json: published.json.clone(),
                    sse: published.sse.clone(),
                    signed: Signed {
                        kid: published.signed.kid.clone(),
                        generation,
                        until: Some(now + RESIGN_RETRY),
                    },
                })
            }
        }
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
        let _one_at_a_time = self.loading(env.as_str(), app.as_str()).lock().await;
        let held = slot.borrow().clone();
        let main_version = self.store.current_version(env, app).await?;
        let gray_version = self
            .store
            .gray_version(env, app)
            .await?
            .filter(|g| Some(*g) > main_version);
        let (generation, now) = (self.keys.keys().generation(), self.keys.now());
        if held.main_version() == main_version
            && held.gray_version() == gray_version
            && held.signed_currently(generation, now)
        {
            return Ok(held);
        }
        let main = match main_version {
            None => None,
            Some(v) if Some(v) == held.main_version() => {
                held.main.as_ref().map(|p| self.kept(p, generation, now))
            }
            Some(v) => Some(self.publish(&self.store.release(env, app, v).await?)?),
        };
        let gray = match gray_version {
            None => None,
            Some(v) if Some(v) == held.gray_version() => held
                .gray
                .as_ref()
                .map(|(s, p)| (s.clone(), self.kept(p, generation, now))),
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
        let published = self.sign(Snapshot::unsigned(release))?;
        metrics::counter!("portcullis_config_releases_loaded_total").increment(1);
        Ok(published)
    }

    /// Signs `snapshot` with the key signing now and serializes it, noting which key that
    /// is and until when it signs.
    fn sign(&self, mut snapshot: Snapshot) -> Result<Arc<Published>, HubError> {
        let keys = self.keys.keys();
        let now = self.keys.now();
        // the ring as it is before signing: should it change meanwhile, the generation
        // noted is already old, and the next read signs again
        let status = keys.status(now);
        let compact = keys.sign(&snapshot.claims(), now)?;
        snapshot.signature = config_center::signing::detach(&compact)
            .map_err(|e| HubError::Signature(e.to_string()))?;
        let signed = Signed {
            until: signer_until(&status),
            kid: status.active_kid,
            generation: status.generation,
        };
        Ok(Arc::new(Published::new(&snapshot, signed)?))
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
        self.slots.sweep();
        if self.slots.lock().is_empty() {
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

    /// Waits for a change note or the reconcile tick, and acts on it. What it does with
    /// the database is given up after [`STEP_DEADLINE`]: a load or reconcile waiting on a
    /// connection that a failover left silent would otherwise hold this loop, and every
    /// release after it, for as long as the connection stays silent (about 15 minutes on
    /// a crashed host), while the watchers here were served the release they had.
    async fn step(&self, feed: &mut config_center::ChangeFeed, tick: &mut tokio::time::Interval) {
        let reconcile = tokio::select! {
            event = feed.recv() => match event {
                Ok(config_center::FeedEvent::Release(e)) => {
                    // given up: the reconcile that follows at once loads it instead
                    tokio::time::timeout(STEP_DEADLINE, self.on_release(&e))
                        .await
                        .is_err()
                }
                Ok(config_center::FeedEvent::Resync) => {
                    // one when the feed first listens; each later one is a reconnection
                    // (or a lag) after which notes may have been missed
                    metrics::counter!("portcullis_config_feed_resyncs_total").increment(1);
                    true
                }
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
        if !reconcile {
            return;
        }
        match tokio::time::timeout(STEP_DEADLINE, self.reconcile()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::error::chain(&e), "config reconcile failed");
            }
            Err(_) => tracing::warn!(
                deadline = ?STEP_DEADLINE,
                "config reconcile did not finish in time; given up, the next one retries"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use keyrotation::{KeyAlgorithm, KeyState, KeyStatus, Kid, RingStatus};
    use time::{Duration, OffsetDateTime};

    use super::{Signed, signer_until};

    fn key(kid: &str, activate_at: OffsetDateTime, retire_at: OffsetDateTime) -> KeyStatus {
        KeyStatus {
            kid: Kid::parse(kid).unwrap(),
            alg: KeyAlgorithm::ES256,
            state: KeyState::Active,
            published: true,
            usable: true,
            created_at: activate_at,
            publish_at: activate_at,
            activate_at,
            retire_at,
            expire_at: retire_at + Duration::days(30),
            compromised_at: None,
            compromise_reason: None,
        }
    }

    fn ring(at: OffsetDateTime, active: &str, keys: Vec<KeyStatus>) -> RingStatus {
        RingStatus {
            at,
            active_kid: Some(Kid::parse(active).unwrap()),
            active_key_age_seconds: None,
            next_rotation_at: None,
            ring_version: None,
            generation: 3,
            loaded_at: None,
            keys,
        }
    }

    #[test]
    fn a_signature_is_current_until_another_key_signs_or_the_ring_changes() {
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let old = key("old", t - Duration::days(10), t + Duration::days(20));
        // the successor takes over when the active key retires
        let next = key("next", t + Duration::days(20), t + Duration::days(50));
        let status = ring(t, "old", vec![old.clone(), next.clone()]);
        assert_eq!(signer_until(&status), Some(t + Duration::days(20)));

        // a key activated earlier than the active one retires (a rotation brought
        // forward) takes over then
        let early = key("early", t + Duration::days(2), t + Duration::days(32));
        let status = ring(t, "old", vec![old.clone(), next, early.clone()]);
        assert_eq!(signer_until(&status), Some(t + Duration::days(2)));

        // a compromised successor never signs
        let mut bad = early;
        bad.compromised_at = Some(t);
        let status = ring(t, "old", vec![old.clone(), bad]);
        assert_eq!(signer_until(&status), Some(t + Duration::days(20)));

        // no key signs: nothing is current
        let mut none = ring(t, "old", vec![old]);
        none.active_kid = None;
        assert_eq!(signer_until(&none), None);

        let signed = Signed {
            kid: Some(Kid::parse("old").unwrap()),
            generation: 3,
            until: Some(t + Duration::days(20)),
        };
        assert!(signed.current(3, t));
        assert!(
            !signed.current(3, t + Duration::days(20)),
            "the successor signs"
        );
        assert!(!signed.current(4, t), "the ring changed");
        let unknown = Signed {
            until: None,
            ..signed
        };
        assert!(!unknown.current(3, t));
    }
}
