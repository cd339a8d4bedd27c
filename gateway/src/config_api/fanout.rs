//! Releases to the watches on bare connections (`crate::detach`), in one pass shared
//! by the connection workers.
//!
//! Each such watch registers with the relay of its (environment, application). Every
//! connection worker holding such a watch runs one relay task for it, the only task on
//! that worker waiting on the hub's channel. When a release comes, the first of them to
//! wake takes a snapshot of the watches (a pass) and the others join it: each takes the
//! next 64 watches until none are left, so the workers finish together however the
//! watches and the rest of the load fall on them. For each watch whose node should get
//! the release, the relay seals the shared event as one chunk and writes it to the
//! socket without waiting — no task wake-up and no poll per watch. A socket that cannot
//! take the whole event at once (a node that reads slowly) gets the rest from its watch's
//! own task, which then owns the writing until it has caught up, and sends the newest
//! release it skipped meanwhile.
//!
//! A watch's own task also sends the release a node is behind on when it connects, the
//! keep-alive comments, and ends the stream (the client left, the server shuts down, the
//! hub is gone, or the watch's token expired).
//!
//! A watch lasts no longer than its token ([`super::token_deadline`]). Its own task ends
//! it then; the relay, which may reach the watch before that task has run, compares the
//! deadline with the instant it took for its batch and sends nothing to an expired watch.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::hub::{Held, Subscription};
use super::{WatchSlot, Who};
use crate::detach::{DetachError, Detached};

/// Watches a relay takes from a pass at a time (from its end); after each batch it lets
/// the worker's other tasks run.
const PASS_BATCH: usize = 64;

/// The relays of one instance, by (environment, application). A relay lives while it
/// has watches: the last one to leave removes it and stops its tasks, so watches of
/// names that come and go (any name, for a token with environment-wide read) leave
/// nothing behind.
#[derive(Debug, Default)]
pub struct FanOut {
    relays: Mutex<HashMap<(String, String), Arc<Relay>>>,
}

/// The watches of one (environment, application), and the pass over them in progress.
#[derive(Debug, Default)]
struct Relay {
    /// Cancelled when the relay is removed (its last watch left): its tasks end.
    stopped: tokio_util::sync::CancellationToken,
    watches: Mutex<HashMap<u64, Arc<Watcher>>>,
    next_id: AtomicU64,
    /// The workers (by index; `None` off the workers) running a relay task for it.
    workers: Mutex<HashSet<Option<usize>>>,
    /// The newest pass: the release it sends and the watches it walks.
    pass: Mutex<Option<Arc<Pass>>>,
}

/// One release on its way to a snapshot of the watches.
#[derive(Debug)]
struct Pass {
    held: Arc<Held>,
    /// The watches not taken yet: each is let go once sent to, so that a watch that ends
    /// is not held until the next release.
    left: Mutex<Vec<Arc<Watcher>>>,
}

/// One watch as the relay and its own task share it.
struct Watcher {
    connection: Detached,
    /// When the watch's token expires: nothing is sent from then on.
    deadline: Instant,
    /// Whether the watch's token was cut off: nothing is sent from then on either.
    cut: super::Cut,
    state: Mutex<State>,
    /// Wakes the watch's own task: bytes to finish writing, a write failed, or the hub
    /// ended.
    wake: Notify,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

struct State {
    who: Who,
    /// Sealed bytes the socket did not take yet; the own task writes them.
    backlog: Vec<u8>,
    /// The own task owns the writing (a backlog is being written): nobody else writes.
    busy: bool,
    /// Writing failed or the key is spent: the stream ends without its last chunk.
    failed: bool,
    /// The hub's channel closed or the token expired: the stream ends properly.
    ended: bool,
}

/// How a watch's stream ends.
enum End {
    /// The client left, or writing to it failed: the connection is just dropped.
    Gone,
    /// The server, the hub or the token's expiry ends it: the last chunk and
    /// `close_notify` are sent.
    Finish,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // plain data, valid whatever a panicking holder did
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FanOut {
    /// Runs one watch on its taken-over connection until it ends: registers it with its
    /// relay (started here if none runs), sends what the node is behind on, then keeps
    /// the stream alive and finishes what the relay could not write at once.
    pub(super) async fn run(
        self: Arc<Self>,
        key: (String, String),
        connection: Detached,
        watch: super::WatchState,
    ) {
        let super::WatchState {
            rx,
            who,
            mut tick,
            deadline,
            cut,
            _slot: slot,
        } = watch;
        let watcher = Arc::new(Watcher {
            connection,
            deadline,
            cut,
            state: Mutex::new(State {
                who,
                backlog: Vec::new(),
                busy: false,
                failed: false,
                ended: false,
            }),
            wake: Notify::new(),
        });
        let (relay, id) = self.register(key.clone(), &rx, &watcher);
        let end = watcher.stream(&rx, &mut tick).await;
        self.unregister(&key, &relay, id);
        finish(watcher, end, slot).await;
    }

    /// Adds `watcher` to the relay of `key`, starting a relay task on this worker if
    /// none runs here. Under the map's lock, so that a relay is never removed between
    /// being found and being joined.
    fn register(
        &self,
        key: (String, String),
        rx: &Subscription,
        watcher: &Arc<Watcher>,
    ) -> (Arc<Relay>, u64) {
        let relays = &mut lock(&self.relays);
        let relay = relays.entry(key).or_default().clone();
        let worker = crate::workers::current();
        if lock(&relay.workers).insert(worker) {
            tokio::spawn(relay.clone().run(worker, rx.clone()));
        }
        let id = relay.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&relay.watches).insert(id, watcher.clone());
        (relay, id)
    }

    /// Takes watch `id` off `relay`; the last one to leave removes the relay and stops its
    /// tasks (which let go of their subscriptions to the hub).
    fn unregister(&self, key: &(String, String), relay: &Arc<Relay>, id: u64) {
        let mut relays = lock(&self.relays);
        let mut watches = lock(&relay.watches);
        watches.remove(&id);
        if watches.is_empty()
            && relays
                .get(key)
                .is_some_and(|current| Arc::ptr_eq(current, relay))
        {
            relays.remove(key);
            relay.stopped.cancel();
        }
    }

    /// How many relays this instance runs (one per (environment, application) watched
    /// on bare connections).
    pub(super) fn relay_count(&self) -> usize {
        lock(&self.relays).len()
    }
}

impl Relay {
    /// One worker's share of sending every release to the watches, until the hub's
    /// channel closes or the relay is removed.
    async fn run(self: Arc<Self>, worker: Option<usize>, mut rx: Subscription) {
        // the sealed event of one watch at a time, and the watches taken from a pass
        let mut scratch = Vec::new();
        let mut batch = Vec::with_capacity(PASS_BATCH);
        loop {
            let changed = tokio::select! {
                changed = rx.changed() => changed,
                // the last watch left: nobody to send to, and the subscription goes
                () = self.stopped.cancelled() => return,
            };
            if changed.is_err() {
                // the hub is gone (shutting down): every stream ends; a watch opened
                // after this starts a relay task again, which ends it too
                lock(&self.workers).remove(&worker);
                let watches: Vec<Arc<Watcher>> = lock(&self.watches).values().cloned().collect();
                for watcher in &watches {
                    watcher.end();
                }
                return;
            }
            let held = rx.borrow_and_update().clone();
            let pass = self.pass_for(held);
            loop {
                {
                    let mut left = lock(&pass.left);
                    let from = left.len().saturating_sub(PASS_BATCH);
                    batch.extend(left.drain(from..));
                }
                if batch.is_empty() {
                    break;
                }
                // one clock read per batch: a batch is written without yielding
                let now = Instant::now();
                for watcher in batch.drain(..) {
                    watcher.offer(&pass.held, now, &mut scratch);
                }
                tokio::task::yield_now().await;
            }
        }
    }

    /// The pass sending `held`: the one in progress if it sends the same, else a new one
    /// over a snapshot of the watches (they come and go while a pass runs).
    fn pass_for(&self, held: Arc<Held>) -> Arc<Pass> {
        let mut pass = lock(&self.pass);
        if let Some(p) = pass.as_ref()
            && Arc::ptr_eq(&p.held, &held)
        {
            return p.clone();
        }
        let new = Arc::new(Pass {
            held,
            left: Mutex::new(lock(&self.watches).values().cloned().collect()),
        });
        *pass = Some(new.clone());
        new
    }
}

impl Watcher {
    /// Sends `held`'s release for this node if it is newer than what the node has, unless
    /// the own task is writing (it sends the newest when it is done) or the watch's token
    /// has expired at `now` (the stream is ended instead, whether or not the own task has
    /// woken for it yet).
    fn offer(&self, held: &Held, now: Instant, scratch: &mut Vec<u8>) {
        let mut state = lock(&self.state);
        if state.failed || state.ended {
            return;
        }
        if now >= self.deadline || self.cut.now() {
            state.ended = true;
            self.wake.notify_one();
            return;
        }
        if state.busy {
            return;
        }
        let Some(release) = state.who.newer(held) else {
            return;
        };
        state.who.version = release.version;
        self.push(&mut state, &release.sse, scratch);
    }

    /// Seals `data` as one chunk and writes what the socket takes now; the rest goes to
    /// the own task. The caller holds the state and nobody else is writing.
    fn push(&self, state: &mut State, data: &[u8], scratch: &mut Vec<u8>) {
        scratch.clear();
        let written = self
            .connection
            .seal_chunk(data, scratch)
            .and_then(|()| self.connection.try_write(scratch));
        match written {
            Ok(n) if n == scratch.len() => {}
            Ok(n) => {
                state.backlog.extend_from_slice(&scratch[n..]);
                state.busy = true;
                self.wake.notify_one();
            }
            Err(e) => {
                tracing::debug!(error = %e, "watch ended: the client could not be written to");
                state.failed = true;
                self.wake.notify_one();
            }
        }
    }

    /// The hub is gone: the stream ends.
    fn end(&self) {
        lock(&self.state).ended = true;
        self.wake.notify_one();
    }

    /// Serves the stream until it ends: sends what the node is behind on, finishes writes
    /// the relay handed over, and sends keep-alive comments, until the token expires.
    async fn stream(
        &self,
        rx: &watch::Receiver<Arc<Held>>,
        tick: &mut tokio::time::Interval,
    ) -> End {
        let client_done = self.connection.client_done();
        let closing = self.connection.closing().cancelled();
        let expiry = tokio::time::sleep_until(self.deadline);
        tokio::pin!(client_done, closing, expiry);
        loop {
            if self.catch_up(rx).await.is_err() {
                return End::Gone;
            }
            {
                let state = lock(&self.state);
                if state.failed {
                    return End::Gone;
                }
                if state.ended {
                    return End::Finish;
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = &mut client_done => return End::Gone,
                () = &mut closing => return End::Finish,
                () = &mut expiry => lock(&self.state).ended = true,
                _ = tick.tick() => {
                    let mut state = lock(&self.state);
                    if self.cut.now() {
                        state.ended = true;
                    // a stream that is writing needs no comment to stay open
                    } else if !state.busy && !state.failed {
                        self.push(&mut state, super::KEEP_ALIVE_COMMENT, &mut Vec::new());
                    }
                }
            }
        }
    }

    /// Writes the backlog, then the newest release for this node if it is newer than the
    /// one it has, until there is nothing more; then the relay writes again. Once the
    /// token has expired only the backlog is written: it holds the rest of TLS records
    /// sealed before, which must be complete before the stream can end properly.
    async fn catch_up(&self, rx: &watch::Receiver<Arc<Held>>) -> Result<(), DetachError> {
        loop {
            let bytes = {
                let mut state = lock(&self.state);
                if state.failed {
                    return Ok(());
                }
                if !state.backlog.is_empty() {
                    state.busy = true;
                    std::mem::take(&mut state.backlog)
                } else if Instant::now() >= self.deadline || self.cut.now() {
                    state.ended = true;
                    state.busy = false;
                    return Ok(());
                } else {
                    let held = rx.borrow().clone();
                    match state.who.newer(&held) {
                        Some(release) => {
                            state.who.version = release.version;
                            state.busy = true;
                            let mut bytes = Vec::new();
                            if let Err(e) = self.connection.seal_chunk(&release.sse, &mut bytes) {
                                state.failed = true;
                                return Err(e);
                            }
                            bytes
                        }
                        None => {
                            state.busy = false;
                            return Ok(());
                        }
                    }
                }
            };
            if let Err(e) = self.connection.write(&bytes).await {
                tracing::debug!(error = %e, "watch ended: the client could not be written to");
                lock(&self.state).failed = true;
                return Err(e);
            }
        }
    }
}

/// Ends a watch that left its relay: on [`End::Finish`], writes what is still owed, then
/// the last chunk and `close_notify`. The watch's slot is freed last.
async fn finish(mut watcher: Arc<Watcher>, end: End, slot: WatchSlot) {
    if let End::Finish = end {
        // a relay's pass may still hold the watch for a moment
        let watcher = loop {
            match Arc::try_unwrap(watcher) {
                Ok(w) => break w,
                Err(shared) => {
                    watcher = shared;
                    tokio::task::yield_now().await;
                }
            }
        };
        let (backlog, failed) = {
            let mut state = lock(&watcher.state);
            (std::mem::take(&mut state.backlog), state.failed)
        };
        if !failed && watcher.connection.write(&backlog).await.is_ok() {
            watcher.connection.finish().await;
        }
    }
    drop(slot);
}
