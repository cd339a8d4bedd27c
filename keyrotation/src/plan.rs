//! The life cycle as pure functions of `(ring, policy, now)`.
//!
//! Effective key states never depend on a write: they follow from the stored instants
//! ([`KeyRecord::state_at`]). Planning decides what must be *written* so that the stored
//! instants keep covering the future — generate the next key when it is due for
//! pre-publication, record transitions that happened, drop keys retired long ago — and
//! returns the [`Transition`]s for the instance whose write wins to audit.
//!
//! Key generation draws randomness, so the functions are pure up to the key material.

use serde::Serialize;
use time::OffsetDateTime;

use crate::material;
use crate::model::RING_FORMAT;
use crate::{Compromise, KeyError, KeyRecord, KeyRing, KeyState, Kid, Policy};

/// How far back a key that must sign *immediately* (first key, emergency, overdue
/// recovery) is dated, so that an instance whose clock lags the writer's by less than this
/// still sees it active. Never earlier than the end of the previous key's signing window.
pub const ACTIVATION_BACKDATE: time::Duration = time::Duration::seconds(60);

/// What a planning step wants written.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The ring to write (equal to the input when [`Plan::is_empty`]).
    pub ring: KeyRing,
    /// What changed, in order, for the audit log.
    pub transitions: Vec<Transition>,
    /// Instants changed that no transition records yet (a rotation brought forward whose
    /// successor signs later): the ring must be written all the same.
    rescheduled: bool,
}

/// One event in a key's life, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// The key.
    pub kid: Kid,
    /// The state before; `None` when the key was just generated.
    pub from: Option<KeyState>,
    /// The state after; `None` when the key was dropped from the ring.
    pub to: Option<KeyState>,
    /// When it happened (the planned instant, which may precede the write).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Why.
    pub reason: TransitionReason,
}

/// Why a transition happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TransitionReason {
    /// The first key of an empty ring.
    Initial,
    /// The regular schedule.
    Scheduled,
    /// No key could sign (the ring was not planned in time, e.g. the key source was
    /// unreachable for longer than the pre-publication lead): a key was activated at once.
    Overdue,
    /// An operator brought the next rotation forward.
    RotateNow,
    /// An operator declared keys compromised.
    Compromised {
        /// The operator's reason.
        note: String,
    },
    /// Removed from the ring after the retention period.
    Dropped,
    /// Its stored key material cannot be read, so it can neither sign nor verify: a
    /// waiting key is discarded, a signing or verifying one retired at once.
    Unreadable,
}

// === impl Plan ===

impl Plan {
    /// True when nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.transitions.is_empty() && !self.rescheduled
    }
}

/// Brings a ring up to date at `now`:
///
/// 1. drops keys retired for longer than the retention;
/// 2. if no key signs at `now`, activates one at once (the pending next key if there is one,
///    else a fresh key) — reason [`TransitionReason::Initial`] for an empty ring, else
///    [`TransitionReason::Overdue`];
/// 3. when the active key's retirement is within the pre-publication lead and no successor
///    exists, generates the successor: published now, active from the active key's
///    retirement for one period, verifying for the overlap after that. A successor
///    generated less than the propagation delay ([`Policy::propagation_delay`]) before
///    that retirement signs only after the delay, and the active key signs until then;
/// 4. records (as transitions) every state change the stored instants imply since the last
///    write.
pub fn plan(ring: &KeyRing, policy: &Policy, now: OffsetDateTime) -> Result<Plan, KeyError> {
    plan_around(ring, policy, now, &[])
}

/// [`plan`], first setting aside the keys `unreadable` names (their stored material cannot
/// be read: [`crate::Keys::unusable`]), reason [`TransitionReason::Unreadable`]: a waiting
/// key is discarded, a signing or verifying one retired at once. The schedule then treats
/// the ring as it would without them: a key signs at once if none can
/// ([`TransitionReason::Overdue`]), a next key is generated when one is due. Without this
/// a waiting key whose material cannot be read would stop every instance from signing at
/// the instant it was due to start.
pub fn plan_around(
    ring: &KeyRing,
    policy: &Policy,
    now: OffsetDateTime,
    unreadable: &[Kid],
) -> Result<Plan, KeyError> {
    let mut planner = Planner::new(ring, policy, now);
    planner.drop_expired();
    planner.set_aside(unreadable);
    planner.ensure_active()?;
    planner.ensure_successor()?;
    Ok(planner.finish())
}

/// Brings the next rotation forward (not an emergency).
///
/// The successor is the pending next key, or a fresh key generated and published now when
/// none is pending. It signs from the first instant it has been in the stored ring for the
/// policy's propagation delay ([`Policy::propagation_delay`]): `now` for a next key
/// published that long ago, `now` plus the delay for a fresh one. Every instance has
/// reloaded the ring by then, so none is handed a token whose key it does not hold. The
/// current key signs until that instant and verifies for the normal overlap after it.
///
/// When the current key stops signing no later than that anyway (a rotation already
/// brought forward, by another instance or a second operator), nothing changes.
pub fn rotate_now(ring: &KeyRing, policy: &Policy, now: OffsetDateTime) -> Result<Plan, KeyError> {
    rotate_now_around(ring, policy, now, &[])
}

/// [`rotate_now`], first setting aside the keys `unreadable` names, as [`plan_around`]
/// does: a waiting key whose material cannot be read is never the one brought forward.
pub fn rotate_now_around(
    ring: &KeyRing,
    policy: &Policy,
    now: OffsetDateTime,
    unreadable: &[Kid],
) -> Result<Plan, KeyError> {
    let mut planner = Planner::new(ring, policy, now);
    planner.drop_expired();
    planner.set_aside(unreadable);
    planner.ensure_active()?;
    let active = planner.active_index().ok_or(KeyError::NoActiveKey)?;
    // Record what already happened (e.g. the activation) under its own reason first.
    planner.record_index(active);
    let pending = planner.pending_key();
    let activate_at = match pending {
        Some(i) => now.max(planner.ring.keys[i].created_at + policy.propagation()),
        None => now + policy.propagation(),
    };
    if planner.ring.keys[active].retire_at <= activate_at {
        planner.ensure_successor()?;
        return Ok(planner.finish());
    }
    let successor = match pending {
        Some(i) => i,
        None => planner.generate(now, activate_at, TransitionReason::RotateNow)?,
    };
    planner.set_reason(successor, TransitionReason::RotateNow);
    planner.set_reason(active, TransitionReason::RotateNow);
    let (period, overlap) = (policy.period(), policy.overlap_td());
    {
        let old = &mut planner.ring.keys[active];
        old.retire_at = activate_at;
        old.expire_at = activate_at + overlap;
    }
    {
        let new = &mut planner.ring.keys[successor];
        new.publish_at = new.publish_at.min(now);
        new.activate_at = activate_at;
        new.retire_at = activate_at + period;
        new.expire_at = new.retire_at + overlap;
    }
    // Written even when no state changes yet (a pending key rescheduled to sign sooner).
    planner.rescheduled = true;
    // Successor of the successor, if the lead is longer than what is left (never with a
    // valid policy, but the function stays total).
    planner.ensure_successor()?;
    Ok(planner.finish())
}

/// Which keys an emergency rotation declares compromised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Suspects {
    /// Every key that still verifies: the active key and the keys retiring after it. The
    /// ring is stored as one secret and held whole in every instance's memory, so whoever
    /// read one key (a Vault token, a backup, a crash dump) could read them all. Tokens the
    /// retiring keys signed are refused too; their holders obtain new ones.
    EveryVerifyingKey,
    /// These keys only, by kid (a key known to have leaked on its own). A key that is
    /// already compromised, or no longer verifies or waits to sign, is left as it is.
    Keys(Vec<Kid>),
}

impl Suspects {
    /// The suspects an operator names: the one key `kid` when given (refused with
    /// [`KeyError::InvalidKid`] when it is not a key id), else every verifying key.
    pub fn named(kid: Option<&str>) -> Result<Self, KeyError> {
        Self::named_all(kid.as_slice())
    }

    /// The suspects an operator names: these keys when any is given (refused with
    /// [`KeyError::InvalidKid`] when one is not a key id), else every verifying key.
    pub fn named_all<S: AsRef<str>>(kids: &[S]) -> Result<Self, KeyError> {
        if kids.is_empty() {
            return Ok(Self::EveryVerifyingKey);
        }
        let kids = kids
            .iter()
            .map(|k| Kid::parse(k.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::Keys(kids))
    }
}

/// Emergency rotation after a key compromise. Each suspect key that verifies is retired at
/// once (flagged compromised, gone from JWKS, verifying nothing); a suspect key still
/// waiting to sign is discarded. When the active key is among them, every pending next key,
/// stored alongside it, is discarded too, and a fresh key signs immediately.
///
/// Errors with [`KeyError::NotInRing`] when [`Suspects::Keys`] names a key the ring does
/// not hold, unless every named key it holds is already compromised (the same emergency
/// run again, which discarded the missing one). When every named key was already dealt with,
/// the plan is empty.
pub fn emergency_rotate(
    ring: &KeyRing,
    policy: &Policy,
    now: OffsetDateTime,
    note: &str,
    suspects: &Suspects,
) -> Result<Plan, KeyError> {
    emergency_rotate_around(ring, policy, now, note, suspects, &[])
}

/// [`emergency_rotate`], first setting aside the keys `unreadable` names, as
/// [`plan_around`] does.
pub fn emergency_rotate_around(
    ring: &KeyRing,
    policy: &Policy,
    now: OffsetDateTime,
    note: &str,
    suspects: &Suspects,
    unreadable: &[Kid],
) -> Result<Plan, KeyError> {
    let reason = TransitionReason::Compromised {
        note: note.to_owned(),
    };
    let mut planner = Planner::new(ring, policy, now);
    planner.drop_expired();
    planner.set_aside(unreadable);
    planner.ensure_active()?;
    let active = planner.active_index().ok_or(KeyError::NoActiveKey)?;
    let named: &[Kid] = match suspects {
        Suspects::EveryVerifyingKey => &[],
        Suspects::Keys(kids) => {
            // A named key the ring lacks is the operator's mistake, unless this emergency
            // was made already (every named key still in the ring is retired as
            // compromised): then a waiting key it named was discarded, and running it
            // again must change nothing.
            let present: Vec<&KeyRecord> = kids.iter().filter_map(|k| ring.key(k)).collect();
            let made_already =
                !present.is_empty() && present.iter().all(|key| key.compromised.is_some());
            if let Some(missing) = kids.iter().find(|k| ring.key(k).is_none())
                && !made_already
            {
                return Err(KeyError::NotInRing(missing.to_string()));
            }
            kids
        }
    };
    let hit = |key: &KeyRecord| {
        key.compromised.is_none()
            && match (suspects, key.state_at(now)) {
                (_, KeyState::Retired) => false,
                (Suspects::EveryVerifyingKey, KeyState::Next) => false,
                (Suspects::EveryVerifyingKey, _) => true,
                (Suspects::Keys(_), _) => named.contains(&key.kid),
            }
    };
    if !planner.ring.keys.iter().any(hit) {
        return Ok(Plan {
            ring: ring.clone(),
            transitions: Vec::new(),
            rescheduled: false,
        });
    }
    let active_hit = hit(&planner.ring.keys[active]);
    let mut index = 0;
    while index < planner.ring.keys.len() {
        let key = &planner.ring.keys[index];
        let state = key.state_at(now);
        // Pending keys never signed: a suspect one goes, and with a compromised active key
        // every pending one goes, since they were stored with it.
        let discard =
            state == KeyState::Next && key.compromised.is_none() && (hit(key) || active_hit);
        if discard {
            planner.transitions.push(Transition {
                kid: key.kid.clone(),
                from: Some(key.recorded_state),
                to: None,
                at: now,
                reason: reason.clone(),
            });
            planner.ring.keys.remove(index);
            continue;
        }
        if hit(key) {
            // what the schedule already did to it first, under its own reason
            planner.record_index(index);
            let key = &mut planner.ring.keys[index];
            key.compromised = Some(Compromise {
                at: now,
                reason: note.to_owned(),
            });
            planner.retire_now(index, reason.clone());
        }
        index += 1;
    }
    if active_hit {
        let at = planner.immediate_activation();
        let fresh = planner.generate(at, at, reason.clone())?;
        planner.set_reason(fresh, reason);
    } else {
        // a discarded next key is replaced when the schedule is due for one
        planner.ensure_successor()?;
    }
    Ok(planner.finish())
}

/// Working state of one planning call.
struct Planner<'p> {
    ring: KeyRing,
    policy: &'p Policy,
    now: OffsetDateTime,
    transitions: Vec<Transition>,
    /// Reasons for the state changes [`Planner::record_index`] will find, by key.
    reasons: Vec<(Kid, TransitionReason)>,
    /// See [`Plan::is_empty`].
    rescheduled: bool,
}

// === impl Planner ===

impl<'p> Planner<'p> {
    fn new(ring: &KeyRing, policy: &'p Policy, now: OffsetDateTime) -> Self {
        let mut ring = ring.clone();
        ring.format = RING_FORMAT;
        Self {
            ring,
            policy,
            now,
            transitions: Vec::new(),
            reasons: Vec::new(),
            rescheduled: false,
        }
    }

    fn drop_expired(&mut self) {
        let (now, retention) = (self.now, self.policy.retention());
        let mut index = 0;
        while index < self.ring.keys.len() {
            let key = &self.ring.keys[index];
            if key.state_at(now) == KeyState::Retired && now >= key.retired_at() + retention {
                // Record the retirement first if no write saw it.
                if key.recorded_state != KeyState::Retired {
                    self.record_index(index);
                }
                let key = &self.ring.keys[index];
                self.transitions.push(Transition {
                    kid: key.kid.clone(),
                    from: Some(KeyState::Retired),
                    to: None,
                    at: now,
                    reason: TransitionReason::Dropped,
                });
                self.ring.keys.remove(index);
            } else {
                index += 1;
            }
        }
    }

    /// See [`plan_around`].
    fn set_aside(&mut self, unreadable: &[Kid]) {
        let now = self.now;
        let mut index = 0;
        while index < self.ring.keys.len() {
            let key = &self.ring.keys[index];
            let state = key.state_at(now);
            if !unreadable.contains(&key.kid) || state == KeyState::Retired {
                index += 1;
                continue;
            }
            if state == KeyState::Next {
                self.transitions.push(Transition {
                    kid: key.kid.clone(),
                    from: Some(key.recorded_state),
                    to: None,
                    at: now,
                    reason: TransitionReason::Unreadable,
                });
                self.ring.keys.remove(index);
                continue;
            }
            // what the schedule already did to it first, under its own reason
            self.record_index(index);
            self.retire_now(index, TransitionReason::Unreadable);
            index += 1;
        }
    }

    /// Ends key `index`'s signing and verifying at once (never before it started), and
    /// records it as retired for `reason`.
    fn retire_now(&mut self, index: usize, reason: TransitionReason) {
        let now = self.now;
        let key = &mut self.ring.keys[index];
        key.retire_at = key.retire_at.min(now).max(key.activate_at);
        key.expire_at = key.expire_at.min(now).max(key.retire_at);
        self.transitions.push(Transition {
            kid: key.kid.clone(),
            from: Some(key.recorded_state),
            to: Some(KeyState::Retired),
            at: now,
            reason,
        });
        key.recorded_state = KeyState::Retired;
    }

    fn active_index(&self) -> Option<usize> {
        let now = self.now;
        self.ring
            .keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.signs_at(now))
            .max_by_key(|(_, k)| k.activate_at)
            .map(|(i, _)| i)
    }

    /// The trusted key planned to sign next (state `next` at `now`), if any.
    fn pending_key(&self) -> Option<usize> {
        let now = self.now;
        self.ring
            .keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.compromised.is_none() && k.state_at(now) == KeyState::Next)
            .min_by_key(|(_, k)| k.activate_at)
            .map(|(i, _)| i)
    }

    /// The earliest sane instant for a key that must sign right now (see
    /// [`ACTIVATION_BACKDATE`]): not before any other trusted key stopped signing.
    fn immediate_activation(&self) -> OffsetDateTime {
        let now = self.now;
        self.ring
            .keys
            .iter()
            .filter(|k| k.compromised.is_none() && k.activate_at <= now)
            .map(|k| k.retire_at.min(now))
            .fold(now - ACTIVATION_BACKDATE, OffsetDateTime::max)
    }

    fn ensure_active(&mut self) -> Result<(), KeyError> {
        if self.active_index().is_some() {
            return Ok(());
        }
        let reason = if self.ring.keys.is_empty() {
            TransitionReason::Initial
        } else {
            TransitionReason::Overdue
        };
        let at = self.immediate_activation();
        let index = match self.pending_key() {
            Some(i) => {
                let (period, overlap) = (self.policy.period(), self.policy.overlap_td());
                let key = &mut self.ring.keys[i];
                key.publish_at = key.publish_at.min(at);
                key.activate_at = at;
                key.retire_at = at + period;
                key.expire_at = key.retire_at + overlap;
                i
            }
            None => self.generate(at, at, reason.clone())?,
        };
        self.set_reason(index, reason);
        Ok(())
    }

    fn ensure_successor(&mut self) -> Result<(), KeyError> {
        let Some(active) = self.active_index() else {
            return Ok(());
        };
        let retire_at = self.ring.keys[active].retire_at;
        if self.now < retire_at - self.policy.lead() {
            return Ok(());
        }
        let has_successor = self.ring.keys.iter().any(|k| {
            k.compromised.is_none()
                && k.activate_at >= retire_at
                && k.kid != self.ring.keys[active].kid
        });
        if has_successor {
            return Ok(());
        }
        // A successor planned late (the ring was not planned during most of the lead: a
        // rotation job that did not run, a key source away for days) is published now; it
        // signs only once every instance can hold it, as after a rotation brought forward.
        // The active key signs until then, so that no instant is left without a signer.
        let activate_at = retire_at.max(self.now + self.policy.propagation());
        if activate_at > retire_at {
            let overlap = self.policy.overlap_td();
            let key = &mut self.ring.keys[active];
            key.retire_at = activate_at;
            key.expire_at = key.expire_at.max(activate_at + overlap);
            self.rescheduled = true;
        }
        self.generate(self.now, activate_at, TransitionReason::Scheduled)?;
        Ok(())
    }

    /// Generates a key published at `publish_at`, signing from `activate_at` for one period.
    fn generate(
        &mut self,
        publish_at: OffsetDateTime,
        activate_at: OffsetDateTime,
        reason: TransitionReason,
    ) -> Result<usize, KeyError> {
        let generated = material::generate(self.policy.algorithm)?;
        let retire_at = activate_at + self.policy.period();
        let record = KeyRecord {
            kid: generated.kid,
            alg: self.policy.algorithm,
            created_at: self.now,
            publish_at,
            activate_at,
            retire_at,
            expire_at: retire_at + self.policy.overlap_td(),
            recorded_state: KeyState::Next,
            compromised: None,
            private_key: generated.private_key,
        };
        self.transitions.push(Transition {
            kid: record.kid.clone(),
            from: None,
            to: Some(KeyState::Next),
            at: publish_at,
            reason,
        });
        self.ring.keys.push(record);
        Ok(self.ring.keys.len() - 1)
    }

    fn set_reason(&mut self, index: usize, reason: TransitionReason) {
        let kid = self.ring.keys[index].kid.clone();
        self.reasons.retain(|(k, _)| k != &kid);
        self.reasons.push((kid, reason));
    }

    /// Emits the transitions from a key's recorded state to its effective state.
    fn record_index(&mut self, index: usize) {
        let now = self.now;
        let kid = &self.ring.keys[index].kid;
        let reason = self
            .reasons
            .iter()
            .find(|(k, _)| k == kid)
            .map_or(TransitionReason::Scheduled, |(_, r)| r.clone());
        let key = &mut self.ring.keys[index];
        let target = key.state_at(now);
        let mut state = key.recorded_state;
        while state < target {
            let Some(next) = state.successor() else { break };
            self.transitions.push(Transition {
                kid: key.kid.clone(),
                from: Some(state),
                to: Some(next),
                at: key.instant_of(next),
                reason: reason.clone(),
            });
            state = next;
        }
        key.recorded_state = key.recorded_state.max(target);
    }

    fn finish(mut self) -> Plan {
        for index in 0..self.ring.keys.len() {
            self.record_index(index);
        }
        self.ring
            .keys
            .sort_by_key(|k| (k.activate_at, k.created_at));
        Plan {
            ring: self.ring,
            transitions: self.transitions,
            rescheduled: self.rescheduled,
        }
    }
}
