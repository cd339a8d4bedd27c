//! Keep-alive connections to the admin nodes, one set per connection worker.
//!
//! A node connection is an HTTP/1.1 connection driven by a task on the thread that
//! opened it; only requests served on that thread take it, so a proxied request never
//! wakes another core. A request takes an idle connection of its node (the most recently
//! used, whose buffers are warm) or opens one; the connection goes back to its set when
//! the node's answer has been read to its end, with nothing spawned per request. An
//! answer abandoned half-way, an upgraded (`101`) connection and a connection that failed
//! are not reused.
//!
//! Idle connections are closed after `proxy.pool_idle_timeout` (checked as connections
//! are taken and given back, and by [`NodePool::prune`] in the background), and at most
//! `proxy.pool_max_idle_per_node` are kept per node and worker.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode, Uri, header};
use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service as _;

use super::upstream::Node;

/// Why a node did not answer.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No connection could be made (refused, unreachable, connect timeout, TLS).
    #[error("connecting failed")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed before the response head arrived, or the request body did.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl NodeError {
    /// Whether no connection could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

/// The node connections of one instance; cheap to clone.
#[derive(Clone)]
pub struct NodePool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: HttpsConnector<HttpConnector>,
    idle_timeout: Duration,
    /// Slot 0 for requests served off the connection workers, then one per worker.
    slots: Box<[Arc<SlotCell>]>,
}

/// One thread's idle connections, on cache lines of its own: a request writes only its
/// own worker's lock and reference counts, never a line the other cores read.
#[repr(align(128))]
struct SlotCell {
    slot: Mutex<Slot>,
    idle_timeout: Duration,
    max_idle_per_node: usize,
}

/// Idle connections per node (a handful of nodes: a list is searched faster than a map
/// is hashed). Each key is the slot's own copy, so cloning it touches no shared count.
#[derive(Default)]
struct Slot {
    nodes: Vec<(Arc<str>, VecDeque<Idle>)>,
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

impl Slot {
    /// The slot's key for `key` and its idle connections, added when missing.
    fn node(&mut self, key: &str) -> (&Arc<str>, &mut VecDeque<Idle>) {
        let i = match self.nodes.iter().position(|(k, _)| &**k == key) {
            Some(i) => i,
            None => {
                self.nodes.push((Arc::from(key), VecDeque::new()));
                self.nodes.len() - 1
            }
        };
        let (k, list) = &mut self.nodes[i];
        (k, list)
    }

    /// Drops the connections idle since before `oldest` (the oldest are at the front).
    fn prune(&mut self, oldest: Instant) {
        for (_, list) in &mut self.nodes {
            drop_expired(list, Some(oldest));
        }
        self.nodes.retain(|(_, list)| !list.is_empty());
    }
}

/// Drops the connections idle since before `oldest` (the oldest are at the front).
fn drop_expired(list: &mut VecDeque<Idle>, oldest: Option<Instant>) {
    while list
        .front()
        .is_some_and(|i| oldest.is_some_and(|o| i.since < o))
    {
        list.pop_front();
    }
}

impl std::fmt::Debug for NodePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePool")
            .field("idle_timeout", &self.inner.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl NodePool {
    /// A pool connecting with `connector`.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        idle_timeout: Duration,
        max_idle_per_node: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                idle_timeout,
                slots: (0..=crate::workers::MAX_WORKERS)
                    .map(|_| {
                        Arc::new(SlotCell {
                            slot: Mutex::new(Slot::default()),
                            idle_timeout,
                            max_idle_per_node,
                        })
                    })
                    .collect(),
            }),
        }
    }

    /// Sends `req` (with an origin-form URI) to `node`, naming the node itself as its
    /// `Host`. A kept connection found closed, or closed before it took the request, is
    /// replaced by another; a request the node may have seen is never sent twice here.
    pub async fn send(
        &self,
        node: &Node,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, NodeError> {
        if let Some(host) = &node.host {
            req.headers_mut().insert(header::HOST, host.clone());
        }
        let (key, target) = (node.key.as_str(), &node.target);
        let index = crate::workers::current()
            .map_or(0, |i| i + 1)
            .min(self.inner.slots.len() - 1);
        let cell = &self.inner.slots[index];
        loop {
            let (key, kept) = cell.take(key);
            let Some(mut sender) = kept else {
                // boxed: opening a connection is rare next to reusing one, and its future
                // (connector and handshake) would otherwise size every request's future
                let mut sender = Box::pin(self.connect(target)).await?;
                let resp = sender.send_request(req).await?;
                return Ok(keep(cell, key, sender, resp));
            };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(keep(cell, key, sender, resp)),
                Err(mut e) => match e.take_message() {
                    // the connection closed before the request was written: try another
                    Some(unsent) => req = unsent,
                    None => return Err(NodeError::Http(e.into_error())),
                },
            }
        }
    }

    /// Closes the connections idle for longer than `proxy.pool_idle_timeout`.
    pub fn prune(&self) {
        let Some(oldest) = Instant::now().checked_sub(self.inner.idle_timeout) else {
            return;
        };
        for cell in &self.inner.slots {
            cell.lock().prune(oldest);
        }
    }

    async fn connect(&self, target: &Uri) -> Result<SendRequest<Body>, NodeError> {
        let io = self
            .inner
            .connector
            .clone()
            .call(target.clone())
            .await
            .map_err(NodeError::Connect)?;
        let (sender, connection) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "admin node connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// The answer, with `sender` handed back to `cell` once its body has been read to the
/// end (at once when it has none); an upgrade keeps the connection.
fn keep(
    cell: &Arc<SlotCell>,
    key: Arc<str>,
    sender: SendRequest<Body>,
    resp: Response<Incoming>,
) -> Response<PooledBody> {
    let reuse = resp.status() != StatusCode::SWITCHING_PROTOCOLS;
    resp.map(|body| {
        let mut body = PooledBody {
            body,
            back: reuse.then(|| GiveBack {
                cell: cell.clone(),
                key,
                sender,
            }),
        };
        if body.body.is_end_stream() {
            body.give_back();
        }
        body
    })
}

impl SlotCell {
    /// The guarded lists stay valid whatever a panicking holder did.
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slot's key for `key`, and the most recently used idle connection of that
    /// node that is still open, if any.
    fn take(&self, key: &str) -> (Arc<str>, Option<SendRequest<Body>>) {
        let oldest = Instant::now().checked_sub(self.idle_timeout);
        let mut slot = self.lock();
        let (key, list) = slot.node(key);
        let key = key.clone();
        while let Some(idle) = list.pop_back() {
            if oldest.is_some_and(|o| idle.since < o) {
                // the ones before it are older still
                list.clear();
                break;
            }
            if !idle.sender.is_closed() {
                return (key, Some(idle.sender));
            }
        }
        (key, None)
    }

    fn put(&self, key: &str, sender: SendRequest<Body>) {
        if sender.is_closed() || self.max_idle_per_node == 0 {
            return;
        }
        let now = Instant::now();
        let oldest = now.checked_sub(self.idle_timeout);
        let mut slot = self.lock();
        let (_, list) = slot.node(key);
        drop_expired(list, oldest);
        if list.len() >= self.max_idle_per_node {
            list.pop_front();
        }
        list.push_back(Idle { sender, since: now });
    }
}

struct GiveBack {
    cell: Arc<SlotCell>,
    key: Arc<str>,
    sender: SendRequest<Body>,
}

/// A node's answer body; its connection returns to the pool when the body ends.
pub struct PooledBody {
    body: Incoming,
    back: Option<GiveBack>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some(GiveBack { cell, key, sender }) = self.back.take() {
            cell.put(&key, sender);
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => self.give_back(),
            // a connection that failed mid-body is not kept
            Some(Err(_)) => self.back = None,
            Some(Ok(_)) if self.body.is_end_stream() => self.give_back(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("reusable", &self.back.is_some())
            .finish_non_exhaustive()
    }
}
