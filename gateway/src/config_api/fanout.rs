//! Releases to the watches on bare connections (`crate::detach`), one pass per
//! connection worker.
//!
//! Each such watch registers with the relay of its (connection worker, environment,
//! application). The relay is the only task on that worker waiting on the hub's channel:
//! when a release comes, it walks its watches and, for each whose node should get it,
//! seals the shared event as one chunk and writes it to the socket without waiting — no
//! task wake-up and no poll per watch. A socket that cannot take the whole event at once
//! (a node that reads slowly) gets the rest from its watch's own task, which then owns the
//! writing until it has caught up, and sends the newest release it skipped meanwhile.
//!
//! A watch's own task also sends the release a node is behind on when it connects, the
//! keep-alive comments, and ends the stream (the client left, the server shuts down, or
//! the hub is gone).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, watch};

use super::hub::Held;
use super::{WatchSlot, Who};
use crate::detach::{DetachError, Detached};

/// Watches a relay walks before it lets the worker's other tasks run.
const PASS_BATCH: usize = 64;
/// The keep-alive comment of an idle stream.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

type RelayKey = (Option<usize>, String, String);

/// The relays of one instance, by (connection worker, environment, application).
#[derive(Debug, Default)]
pub struct FanOut {
    relays: Mutex<HashMap<RelayKey, Arc<Relay>>>,
}

/// The watches of one (worker, environment, application) and the task that sends them
/// each release.
#[derive(Debug, Default)]
struct Relay {
    watches: Mutex<HashMap<u64, Arc<Watcher>>>,
    next_id: AtomicU64,
    /// Cleared when its task ends (the hub's channel closed): a new watch then starts a
    /// new relay.
    running: AtomicBool,
}

/// One watch as the relay and its own task share it.
struct Watcher {
    connection: Detached,
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
    /// The hub's channel closed: the stream ends properly.
    ended: bool,
}

/// How a watch's stream ends.
enum End {
    /// The client left, or writing to it failed: the connection is just dropped.
    Gone,
    /// The server or the hub ends it: the last chunk and `close_notify` are sent.
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
            _slot: slot,
        } = watch;
        let watcher = Arc::new(Watcher {
            connection,
            state: Mutex::new(State {
                who,
                backlog: Vec::new(),
                busy: false,
                failed: false,
                ended: false,
            }),
            wake: Notify::new(),
        });
        let (relay, id) = self.register(key, &rx, &watcher);
        let end = watcher.stream(&rx, &mut tick).await;
        lock(&relay.watches).remove(&id);
        finish(watcher, end, slot).await;
    }

    /// Adds `watcher` to the relay of this worker for `key`, starting the relay if none
    /// runs.
    fn register(
        &self,
        (env, app): (String, String),
        rx: &watch::Receiver<Arc<Held>>,
        watcher: &Arc<Watcher>,
    ) -> (Arc<Relay>, u64) {
        let mut relays = lock(&self.relays);
        let relay = relays
            .entry((crate::workers::current(), env, app))
            .or_default();
        if !relay.running.load(Ordering::Acquire) {
            *relay = Arc::new(Relay::default());
            relay.running.store(true, Ordering::Release);
            // on this worker: the relay's writes never cross threads
            tokio::spawn(relay.clone().run(rx.clone()));
        }
        let id = relay.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&relay.watches).insert(id, watcher.clone());
        (relay.clone(), id)
    }
}

impl Relay {
    /// Sends every release to the watches, until the hub's channel closes.
    async fn run(self: Arc<Self>, mut rx: watch::Receiver<Arc<Held>>) {
        // the sealed event of one watch at a time, reused
        let mut scratch = Vec::new();
        loop {
            let closed = rx.changed().await.is_err();
            if closed {
                self.running.store(false, Ordering::Release);
            }
            let held = rx.borrow_and_update().clone();
            // a snapshot: watches come and go while the pass lets other tasks run
            let watches: Vec<Arc<Watcher>> = lock(&self.watches).values().cloned().collect();
            for (i, watcher) in watches.iter().enumerate() {
                if closed {
                    watcher.end();
                } else {
                    watcher.offer(&held, &mut scratch);
                }
                if i % PASS_BATCH == PASS_BATCH - 1 {
                    tokio::task::yield_now().await;
                }
            }
            if closed {
                return;
            }
        }
    }
}

impl Watcher {
    /// Sends `held`'s release for this node if it is newer than what the node has, unless
    /// the own task is writing (it sends the newest when it is done).
    fn offer(&self, held: &Held, scratch: &mut Vec<u8>) {
        let mut state = lock(&self.state);
        if state.busy || state.failed || state.ended {
            return;
        }
        let Some(release) = newer(&state.who, held) else {
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
    /// the relay handed over, and sends keep-alive comments.
    async fn stream(
        &self,
        rx: &watch::Receiver<Arc<Held>>,
        tick: &mut tokio::time::Interval,
    ) -> End {
        let client_done = self.connection.client_done();
        let closing = self.connection.closing().cancelled();
        tokio::pin!(client_done, closing);
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
                _ = tick.tick() => {
                    let mut state = lock(&self.state);
                    // a stream that is writing needs no comment to stay open
                    if !state.busy && !state.failed {
                        self.push(&mut state, KEEP_ALIVE, &mut Vec::new());
                    }
                }
            }
        }
    }

    /// Writes the backlog, then the newest release for this node if it is newer than the
    /// one it has, until there is nothing more; then the relay writes again.
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
                } else {
                    let held = rx.borrow().clone();
                    match newer(&state.who, &held) {
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

/// The release for the node `who` is, if it is newer than the one it has.
fn newer(who: &Who, held: &Held) -> Option<Arc<super::Published>> {
    who.pick(held).filter(|p| p.version > who.version)
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
