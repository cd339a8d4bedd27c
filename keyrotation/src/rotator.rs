//! Keeps [`Keys`] in step with the key source, and (when allowed) keeps the stored ring
//! planned.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::source::{KeySource, StoreOutcome, Versioned};
use crate::{Clock, KeyError, KeyRing, KeyState, Keys, Kid, Plan, Policy, Suspects, Transition};

/// How many check-and-set conflicts one call tolerates before giving up (each conflict
/// means another instance wrote; after a reload there is normally nothing left to do).
const MAX_CAS_ATTEMPTS: u32 = 4;

/// Whether this instance may write the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationMode {
    /// Plans and writes (check-and-set) when the ring needs it, and creates the first ring.
    InProcess,
    /// Only reads (serving instances with a read-only Vault policy). Effective key states
    /// still follow the stored instants, so signing switches keys on schedule.
    ReadOnly,
}

/// What one reload (or rotation) did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadOutcome {
    /// Transitions this instance wrote (empty when nothing was due, when another instance
    /// wrote them, or in read-only mode). Audit these.
    pub transitions: Vec<Transition>,
    /// The ring version now loaded into [`Keys`].
    pub version: u64,
    /// Whether [`Keys`] received a different ring.
    pub keys_changed: bool,
    /// Check-and-set conflicts met (another instance wrote first).
    pub conflicts: u32,
}

/// Counters for metrics and readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RotatorHealth {
    /// Successful reloads.
    pub reloads: u64,
    /// Failed reloads.
    pub reload_failures: u64,
    /// Failed reloads since the last success (0: the source is reachable).
    pub consecutive_failures: u64,
    /// Of those, how many in a row did not even load the stored ring into [`Keys`] (the
    /// source unreachable or refusing reads, the stored ring unreadable). 0 while the ring
    /// held is the one stored as of the last reload — also when only writing the plan
    /// failed (a policy denying writes): a write failure never keeps an older ring.
    pub consecutive_read_failures: u64,
    /// When the last reload succeeded.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_success_at: Option<OffsetDateTime>,
    /// The last reload error (secret-free), cleared by a success.
    pub last_error: Option<String>,
    /// Transitions this instance wrote since it started.
    pub transitions_written: u64,
}

/// Reloads the ring into [`Keys`], planning and writing it when this instance may.
/// Cheap to clone.
#[derive(Clone)]
pub struct Rotator {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<dyn KeySource>,
    keys: Keys,
    policy: Policy,
    mode: RotationMode,
    clock: Arc<dyn Clock>,
    /// One reload or rotation at a time per instance.
    serial: tokio::sync::Mutex<()>,
    transitions: broadcast::Sender<Transition>,
    reloads: AtomicU64,
    failures: AtomicU64,
    consecutive_failures: AtomicU64,
    consecutive_read_failures: AtomicU64,
    /// Unix nanoseconds of the last success, `i64::MIN` when none.
    last_success: AtomicI64,
    last_error: Mutex<Option<String>>,
    transitions_written: AtomicU64,
}

/// What kind of write a call makes.
enum Action {
    Plan,
    Rotate {
        emergency: Option<(String, Suspects)>,
    },
}

// === impl Rotator ===

impl Rotator {
    /// A rotator over `source`, publishing into `keys`. The policy should have passed
    /// [`Policy::validate`].
    pub fn new(
        source: Arc<dyn KeySource>,
        keys: Keys,
        policy: Policy,
        mode: RotationMode,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let (transitions, _) = broadcast::channel(64);
        Self {
            inner: Arc::new(Inner {
                source,
                keys,
                policy,
                mode,
                clock,
                serial: tokio::sync::Mutex::new(()),
                transitions,
                reloads: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                consecutive_failures: AtomicU64::new(0),
                consecutive_read_failures: AtomicU64::new(0),
                last_success: AtomicI64::new(i64::MIN),
                last_error: Mutex::new(None),
                transitions_written: AtomicU64::new(0),
            }),
        }
    }

    /// The keys this rotator publishes into.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The mode.
    pub fn mode(&self) -> RotationMode {
        self.inner.mode
    }

    /// The source's description.
    pub fn describe_source(&self) -> String {
        self.inner.source.describe()
    }

    /// Every transition this instance writes, as it writes it (for the audit log of the
    /// background task's work). Lagging receivers lose the oldest events.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.inner.transitions.subscribe()
    }

    /// Counters for metrics and readiness.
    pub fn health(&self) -> RotatorHealth {
        let last = self.inner.last_success.load(Ordering::Acquire);
        RotatorHealth {
            reloads: self.inner.reloads.load(Ordering::Relaxed),
            reload_failures: self.inner.failures.load(Ordering::Relaxed),
            consecutive_failures: self.inner.consecutive_failures.load(Ordering::Relaxed),
            consecutive_read_failures: self.inner.consecutive_read_failures.load(Ordering::Relaxed),
            last_success_at: (last != i64::MIN)
                .then(|| OffsetDateTime::from_unix_timestamp_nanos(i128::from(last)).ok())
                .flatten(),
            last_error: self
                .inner
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            transitions_written: self.inner.transitions_written.load(Ordering::Relaxed),
        }
    }

    /// Loads the ring (creating the first one if none exists and this instance may write)
    /// and publishes it into [`Keys`] as read, then plans it at the clock's `now` and
    /// writes the plan with check-and-set when there is something to write and this
    /// instance may (on a conflict: reload and re-plan, a bounded number of times),
    /// publishing the ring as written.
    ///
    /// On error [`Keys`] keeps the newest ring read: the one it held when the source could
    /// not be read, the one read when planning or writing failed (the write is tried
    /// again at the next reload). [`KeyError::is_source_unavailable`] tells an
    /// unreachable source from other failures, [`RotatorHealth::consecutive_read_failures`]
    /// a failed read from a failed write.
    pub async fn reload_once(&self) -> Result<ReloadOutcome, KeyError> {
        let mut read = false;
        let result = self.run(Action::Plan, &mut read).await;
        self.record(&result, read);
        result
    }

    /// Rotates now, for the CLI and admin API: `emergency = false` brings the next
    /// rotation forward (the successor signs once every instance can know it, see
    /// [`crate::rotate_now`]; the current key keeps verifying for the overlap);
    /// `emergency = true` declares every key that still verifies compromised (they stop
    /// verifying at once; see [`Suspects::EveryVerifyingKey`]).
    /// Check-and-set like every write; if another instance rotated the same key meanwhile,
    /// nothing more is done. Refused with [`KeyError::ReadOnly`] in read-only mode.
    pub async fn rotate(&self, emergency: bool) -> Result<ReloadOutcome, KeyError> {
        if emergency {
            self.emergency(
                "declared compromised by an operator".to_owned(),
                Suspects::EveryVerifyingKey,
            )
            .await
        } else {
            self.rotate_with_reason(None).await
        }
    }

    /// Like [`Self::rotate`]; `Some(note)` is an emergency rotation of every verifying key
    /// recording `note` as the reason (audit log, ring status).
    pub async fn rotate_with_reason(
        &self,
        emergency: Option<String>,
    ) -> Result<ReloadOutcome, KeyError> {
        match emergency {
            Some(note) => self.emergency(note, Suspects::EveryVerifyingKey).await,
            None => self.write(Action::Rotate { emergency: None }).await,
        }
    }

    /// Emergency rotation of `suspects` ([`crate::emergency_rotate`]), recording `note` as
    /// the reason. The keys are fixed when the ring is first loaded, so a retry after a
    /// check-and-set conflict acts on the same keys, and keys another instance already
    /// retired are left as they are.
    pub async fn emergency(
        &self,
        note: String,
        suspects: Suspects,
    ) -> Result<ReloadOutcome, KeyError> {
        self.write(Action::Rotate {
            emergency: Some((note, suspects)),
        })
        .await
    }

    async fn write(&self, action: Action) -> Result<ReloadOutcome, KeyError> {
        if self.inner.mode == RotationMode::ReadOnly {
            return Err(KeyError::ReadOnly);
        }
        self.run(action, &mut false).await
    }

    /// Runs [`Self::reload_once`] now and then every `interval` until `cancel` fires.
    /// Failures are logged (secret-free) and the newest ring read stays in [`Keys`].
    pub fn spawn(
        &self,
        interval: Duration,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match this.reload_once().await {
                    Ok(outcome) => {
                        for t in &outcome.transitions {
                            tracing::info!(kid = %t.kid, from = ?t.from, to = ?t.to, at = %t.at,
                                reason = ?t.reason, "signing key transition written");
                        }
                    }
                    Err(e) => {
                        let health = this.health();
                        tracing::warn!(source = %this.describe_source(), error = %e,
                            consecutive_failures = health.consecutive_failures,
                            "key ring reload failed; keeping the last loaded ring");
                    }
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
            }
        })
    }

    /// Sets `read` once a stored ring was loaded into [`Keys`].
    async fn run(&self, action: Action, read: &mut bool) -> Result<ReloadOutcome, KeyError> {
        let _serial = self.inner.serial.lock().await;
        let source = &self.inner.source;
        let mut conflicts = 0;
        let mut keys_changed = false;
        // For a routine rotation: the key that was active when the operator asked, so that
        // a retry after a conflict, or a second instance asked at the same moment, does
        // not rotate twice. It starts as the key this instance serves (the one its status
        // showed the operator): if the store's active key is another one, someone already
        // rotated it away and nothing more is done.
        let mut target = match &action {
            Action::Rotate { emergency: None } => self
                .inner
                .keys
                .ring()
                .signing_key_at(self.inner.clock.now())
                .map(|k| k.kid.clone()),
            _ => None,
        };
        // For an emergency: the suspect keys, named once from the first ring loaded (never
        // from this instance's copy, which may be older than the store's).
        let mut suspects: Option<Suspects> = None;
        loop {
            let loaded = source.load().await?;
            let now = self.inner.clock.now();
            let write_allowed = self.inner.mode == RotationMode::InProcess;
            let (ring, expected) = match loaded {
                Some(Versioned { value, version }) => (value, Some(version)),
                None if write_allowed && matches!(action, Action::Plan) => (KeyRing::empty(), None),
                None => return Err(KeyError::NoRing),
            };
            // The ring as read is the truth in the store: serve it before planning or
            // writing, so that a plan or a write that fails (a policy denying writes, a
            // store that reads but does not write) never leaves this instance on an older
            // ring, one that may still trust a key another instance retired as
            // compromised. The write is tried again at the next reload.
            if let Some(version) = expected {
                keys_changed |= self.inner.keys.publish(ring.clone(), Some(version), now)?;
                *read = true;
            }
            // the keys of the ring just published whose material could not be read are
            // set aside by every plan (retired, or discarded while waiting), so that the
            // schedule, a rotation or an emergency goes on without them
            let unreadable = self.inner.keys.unusable();

            let plan = match &action {
                Action::Plan if !write_allowed => None,
                Action::Plan => Some(crate::plan_around(
                    &ring,
                    &self.inner.policy,
                    now,
                    &unreadable,
                )?),
                Action::Rotate {
                    emergency: Some((note, asked)),
                } => {
                    // On a retry, a named key another writer discarded meanwhile (a waiting
                    // key, by its own emergency) needs nothing more; only the first ring
                    // loaded is where an unknown kid is the operator's mistake.
                    if let Some(Suspects::Keys(kids)) = &mut suspects {
                        kids.retain(|k| ring.key(k).is_some());
                    }
                    let fixed = suspects.get_or_insert_with(|| name_suspects(asked, &ring, now));
                    Some(crate::emergency_rotate_around(
                        &ring,
                        &self.inner.policy,
                        now,
                        note,
                        fixed,
                        &unreadable,
                    )?)
                }
                Action::Rotate { emergency: None } => {
                    let active = ring.signing_key_at(now).map(|k| k.kid.clone());
                    match (&target, &active) {
                        // Someone already rotated the key we were asked to rotate.
                        (Some(t), a) if a.as_ref() != Some(t) => None,
                        _ => {
                            target = active.or_else(|| target.clone());
                            Some(crate::rotate_now_around(
                                &ring,
                                &self.inner.policy,
                                now,
                                &unreadable,
                            )?)
                        }
                    }
                }
            };

            let Some(Plan {
                ring: planned,
                transitions,
                ..
            }) = plan.filter(|p| !p.is_empty())
            else {
                let Some(version) = expected else {
                    return Err(KeyError::NoRing);
                };
                return Ok(ReloadOutcome {
                    transitions: Vec::new(),
                    version,
                    keys_changed,
                    conflicts,
                });
            };

            let outcome = match source.store(&planned, expected).await {
                Ok(outcome) => outcome,
                // Only a plan that generated a key is told apart from every other
                // writer's by its content (the key's random material): a plan that only
                // records transitions or drops keys is the same on every instance.
                Err(e) if !transitions.iter().any(|t| t.from.is_none()) => return Err(e),
                Err(e) => match self.landed(&planned, expected).await {
                    Some(version) => {
                        tracing::info!(source = %source.describe(), error = %e, version,
                            "the key ring write answered an error but was stored");
                        StoreOutcome::Stored(version)
                    }
                    None => return Err(e),
                },
            };
            match outcome {
                StoreOutcome::Stored(version) => {
                    keys_changed |= self.inner.keys.publish(planned, Some(version), now)?;
                    self.inner
                        .transitions_written
                        .fetch_add(transitions.len() as u64, Ordering::Relaxed);
                    for t in &transitions {
                        // No receiver is fine: the outcome carries them too.
                        let _ = self.inner.transitions.send(t.clone());
                    }
                    return Ok(ReloadOutcome {
                        transitions,
                        version,
                        keys_changed,
                        conflicts,
                    });
                }
                StoreOutcome::Conflict => {
                    conflicts += 1;
                    tracing::debug!(source = %source.describe(), conflicts, "key ring write lost a check-and-set race; reloading");
                    if conflicts >= MAX_CAS_ATTEMPTS {
                        // Still publish the newest ring we can read.
                        if let Ok(Some(latest)) = source.load().await {
                            let _ = self.inner.keys.publish(
                                latest.value,
                                Some(latest.version),
                                self.inner.clock.now(),
                            );
                        }
                        return Err(KeyError::TooManyConflicts(conflicts));
                    }
                }
            }
        }
    }

    /// After a write of a ring holding a freshly generated key answered an error (a
    /// timeout, a connection lost with the answer on its way): whether it was stored all
    /// the same, by reading the ring back. The version it was stored at when the stored
    /// ring is the one written (no other writer's ring holds that key's random material),
    /// `None` when it is not, or when the read fails too. Without this, a write whose
    /// answer was lost would go unaudited, and an emergency tried again would retire the
    /// fresh key it had just made.
    async fn landed(&self, planned: &KeyRing, expected: Option<u64>) -> Option<u64> {
        let stored = self.inner.source.load().await.ok()??;
        (expected.is_none_or(|e| stored.version > e) && stored.value == *planned)
            .then_some(stored.version)
    }

    /// Counts a reload; `read`: it loaded the stored ring, whatever happened after.
    fn record(&self, result: &Result<ReloadOutcome, KeyError>, read: bool) {
        let inner = &self.inner;
        match result {
            Ok(_) => {
                inner.reloads.fetch_add(1, Ordering::Relaxed);
                inner.consecutive_failures.store(0, Ordering::Relaxed);
                inner.consecutive_read_failures.store(0, Ordering::Relaxed);
                let now =
                    i64::try_from(inner.clock.now().unix_timestamp_nanos()).unwrap_or(i64::MAX);
                inner.last_success.store(now, Ordering::Release);
                *inner
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
            }
            Err(e) => {
                inner.failures.fetch_add(1, Ordering::Relaxed);
                inner.consecutive_failures.fetch_add(1, Ordering::Relaxed);
                if read {
                    inner.consecutive_read_failures.store(0, Ordering::Relaxed);
                } else {
                    inner
                        .consecutive_read_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
                *inner
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
            }
        }
    }
}

impl std::fmt::Debug for Rotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotator")
            .field("source", &self.inner.source.describe())
            .field("mode", &self.inner.mode)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// The keys an emergency acts on, named from the ring as loaded: "every verifying key"
/// becomes the kids that verify now and those waiting to sign (stored with them), unless
/// none does (then the planner's own choice). Naming the waiting keys too keeps them
/// suspect if a retry finds one of them activated meanwhile.
fn name_suspects(asked: &Suspects, ring: &KeyRing, now: OffsetDateTime) -> Suspects {
    match asked {
        Suspects::EveryVerifyingKey => {
            let kids: Vec<Kid> = ring
                .keys
                .iter()
                .filter(|k| {
                    k.compromised.is_none()
                        && matches!(
                            k.state_at(now),
                            KeyState::Next | KeyState::Active | KeyState::Retiring
                        )
                })
                .map(|k| k.kid.clone())
                .collect();
            if kids.is_empty() {
                Suspects::EveryVerifyingKey
            } else {
                Suspects::Keys(kids)
            }
        }
        named => named.clone(),
    }
}
