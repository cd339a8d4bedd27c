//! The in-process store of `--dev`: the same state machine as the Redis script, behind a
//! mutex. Nothing survives a restart; everything else behaves as with Redis (it passes the
//! same conformance suite).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;

use super::token::{FamilyId, Minted, Presented};
use super::{
    GC_MARGIN, InvalidReason, Issued, NewFamily, Record, RefreshError, RefreshSettings,
    RefreshStore, Refreshed, Session, Step, duration_ms, to_ms,
};
use crate::server_key::ServerKey;

/// A refresh-token store in this process's memory.
pub struct MemoryRefreshStore {
    key: ServerKey,
    settings: RefreshSettings,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    families: HashMap<FamilyId, Record>,
    by_subject: HashMap<String, BTreeSet<FamilyId>>,
    by_client: HashMap<String, BTreeSet<FamilyId>>,
}

impl std::fmt::Debug for MemoryRefreshStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRefreshStore")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

// === impl MemoryRefreshStore ===

impl MemoryRefreshStore {
    /// An empty store.
    pub fn new(key: ServerKey, settings: RefreshSettings) -> Self {
        Self {
            key,
            settings,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Inner ===

impl Inner {
    fn remove(&mut self, family: &FamilyId) -> Option<Record> {
        let record = self.families.remove(family)?;
        for (index, name) in [
            (&mut self.by_subject, &record.subject),
            (&mut self.by_client, &record.client_id),
        ] {
            if let Some(set) = index.get_mut(name) {
                set.remove(family);
                if set.is_empty() {
                    index.remove(name);
                }
            }
        }
        Some(record)
    }

    /// Drops families past their logical expiry plus the GC margin (what Redis TTLs do).
    fn collect_garbage(&mut self, now: i64) {
        let margin = duration_ms(GC_MARGIN);
        let dead: Vec<FamilyId> = self
            .families
            .iter()
            .filter(|(_, r)| r.abs_exp.min(r.idle_exp).saturating_add(margin) <= now)
            .map(|(f, _)| f.clone())
            .collect();
        for family in dead {
            self.remove(&family);
        }
    }

    fn sessions(
        &self,
        ids: Option<&BTreeSet<FamilyId>>,
        now: i64,
    ) -> Result<Vec<Session>, RefreshError> {
        let mut out = Vec::new();
        for family in ids.into_iter().flatten() {
            if let Some(record) = self.families.get(family).filter(|r| r.alive(now)) {
                out.push(record.session(family)?);
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.family).cmp(&(b.created_at, &b.family)));
        Ok(out)
    }
}

#[async_trait]
impl RefreshStore for MemoryRefreshStore {
    async fn issue(&self, family: NewFamily, now: OffsetDateTime) -> Result<Issued, RefreshError> {
        let id = FamilyId::generate()?;
        let first = Minted::new(&self.key, id.clone())?;
        let now = to_ms(now);
        let record = Record::new(family, first.hash.clone(), now, &self.settings);
        let session = record.session(&id)?;
        let mut inner = self.lock();
        inner.collect_garbage(now);
        inner
            .by_subject
            .entry(record.subject.clone())
            .or_default()
            .insert(id.clone());
        inner
            .by_client
            .entry(record.client_id.clone())
            .or_default()
            .insert(id.clone());
        inner.families.insert(id, record);
        Ok(Issued {
            token: first.token(&self.key),
            session,
        })
    }

    async fn refresh_with_grace(
        &self,
        presented: &SecretString,
        client_id: &str,
        now: OffsetDateTime,
        min_grace: Duration,
    ) -> Result<Refreshed, RefreshError> {
        let presented = Presented::parse(&self.key, presented.expose_secret())?;
        let hash = presented.hash(&self.key);
        let (next, wrap) = presented.successor(&self.key)?;
        let now = to_ms(now);
        let mut inner = self.lock();
        let record = inner
            .families
            .get_mut(&presented.family)
            .ok_or(RefreshError::Invalid(InvalidReason::Unknown))?;
        if record.client_id != client_id {
            return Err(RefreshError::Invalid(InvalidReason::WrongClient));
        }
        if !record.alive(now) {
            return Err(RefreshError::Invalid(InvalidReason::Expired));
        }
        match record.step(&hash, now, self.settings.grace_ms(min_grace)) {
            Step::Rotate => {
                record.rotate(hash, next.hash.clone(), wrap, now, &self.settings);
                let session = record.session(&presented.family)?;
                Ok(Refreshed {
                    token: next.token(&self.key),
                    session,
                    replayed: false,
                })
            }
            Step::Replay => {
                let wrapped = record.wrap.clone();
                let session = record.session(&presented.family)?;
                drop(inner);
                Ok(Refreshed {
                    token: presented.unwrap_successor(&self.key, &wrapped)?,
                    session,
                    replayed: true,
                })
            }
            Step::Reused => {
                let record = inner
                    .remove(&presented.family)
                    .ok_or(RefreshError::Invalid(InvalidReason::Unknown))?;
                Err(RefreshError::Reused {
                    family: presented.family,
                    subject: record.subject,
                    client_id: record.client_id,
                })
            }
        }
    }

    async fn inspect(
        &self,
        presented: &SecretString,
        now: OffsetDateTime,
    ) -> Result<Option<Session>, RefreshError> {
        let Ok(presented) = Presented::parse(&self.key, presented.expose_secret()) else {
            return Ok(None);
        };
        let hash = presented.hash(&self.key);
        let inner = self.lock();
        match inner.families.get(&presented.family) {
            Some(record) if record.alive(to_ms(now)) && record.cur == hash => {
                record.session(&presented.family).map(Some)
            }
            _ => Ok(None),
        }
    }

    async fn live_family(
        &self,
        family: &FamilyId,
        now: OffsetDateTime,
    ) -> Result<Option<Session>, RefreshError> {
        let inner = self.lock();
        match inner.families.get(family) {
            Some(record) if record.alive(to_ms(now)) => record.session(family).map(Some),
            _ => Ok(None),
        }
    }

    async fn list_sessions(
        &self,
        subject: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<Session>, RefreshError> {
        let inner = self.lock();
        inner.sessions(inner.by_subject.get(subject), to_ms(now))
    }

    async fn revoke_token(
        &self,
        presented: &SecretString,
        client_id: &str,
    ) -> Result<bool, RefreshError> {
        let Ok(presented) = Presented::parse(&self.key, presented.expose_secret()) else {
            return Ok(false);
        };
        let mut inner = self.lock();
        match inner.families.get(&presented.family) {
            None => Ok(false),
            Some(record) if record.client_id != client_id => {
                Err(RefreshError::Invalid(InvalidReason::WrongClient))
            }
            Some(_) => Ok(inner.remove(&presented.family).is_some()),
        }
    }

    async fn revoke_family(&self, family: &FamilyId) -> Result<bool, RefreshError> {
        Ok(self.lock().remove(family).is_some())
    }

    async fn revoke_subject(&self, subject: &str) -> Result<usize, RefreshError> {
        let mut inner = self.lock();
        let ids = inner.by_subject.get(subject).cloned().unwrap_or_default();
        Ok(ids.iter().filter(|f| inner.remove(f).is_some()).count())
    }

    async fn revoke_client(&self, client_id: &str) -> Result<usize, RefreshError> {
        let mut inner = self.lock();
        let ids = inner.by_client.get(client_id).cloned().unwrap_or_default();
        Ok(ids.iter().filter(|f| inner.remove(f).is_some()).count())
    }
}
