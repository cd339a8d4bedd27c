//! Keep-alive connections to the admin nodes, one set per connection worker.
//!
//! A node connection has no task of its own: the request using it drives it, inside the
//! task of the client's connection, from sending the request to the end of the node's
//! answer. The node's socket then wakes that one task directly, and no channel hop to a
//! second task is made per request. A request takes an idle connection of its node kept
//! by its own worker (the most recently used, whose buffers are warm) or opens one; the
//! connection goes back to its worker's set when the node's answer has been read to its
//! end. An answer abandoned half-way and a connection that failed are not reused; an
//! upgraded (`101`) connection is handed to a task of its own to finish the switch.
//!
//! Idle connections are closed after `proxy.pool_idle_timeout` (checked as connections
//! are taken and given back, and by [`NodePool::prune`] in the background), and at most
//! `proxy.pool_max_idle_per_node` are kept per node and worker. A kept connection is
//! driven once more before it is used: one the node closed meanwhile is seen closed then
//! and replaced, before any request is written to it.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode, Uri};
use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service as _;

/// Why a node did not answer.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No connection could be made (refused, unreachable, connect timeout, TLS).
    #[error("connecting failed")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed before the response head arrived, or the request body did.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// A new connection ended before it could take the request.
    #[error("the node closed a new connection before taking the request")]
    Closed,
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
    link: Link,
    since: Instant,
}

/// One HTTP/1.1 connection to a node: the handle requests are sent on, and the future
/// that reads and writes the socket, polled by whichever request is using it.
struct Link {
    sender: SendRequest<Body>,
    connection: Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>,
    /// Set once the connection future has completed: closed, failed or upgraded.
    ended: bool,
    /// How it failed, if it did.
    error: Option<hyper::Error>,
}

impl Link {
    /// Lets the connection read and write what it can; whether it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.ended
            && let Poll::Ready(result) = self.connection.as_mut().poll(cx)
        {
            self.ended = true;
            self.error = result.err();
        }
        self.ended
    }

    /// Whether it may still take a request.
    fn usable(&self) -> bool {
        !self.ended && !self.sender.is_closed()
    }

    /// Drives the connection until it can take a request (`true`) or has ended.
    async fn ready(&mut self) -> bool {
        poll_fn(|cx| {
            if self.drive(cx) {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|r| r.is_ok())
        })
        .await
    }
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
            while list.front().is_some_and(|i| i.since < oldest) {
                list.pop_front();
            }
        }
        self.nodes.retain(|(_, list)| !list.is_empty());
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

    /// Sends `req` to the node `key` (`scheme://authority`) reached at `target` (its
    /// scheme and authority). `req` carries an origin-form URI and the node's `Host`.
    /// A kept connection found closed, or closed before it took the request, is
    /// replaced by another; a request the node may have seen is never sent twice here.
    pub async fn send(
        &self,
        key: &str,
        target: &Uri,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, NodeError> {
        let index = crate::workers::current()
            .map_or(0, |i| i + 1)
            .min(self.inner.slots.len() - 1);
        let cell = &self.inner.slots[index];
        loop {
            let (key, kept) = cell.take(key);
            let fresh = kept.is_none();
            let mut link = match kept {
                Some(link) => link,
                None => self.connect(target).await?,
            };
            if !link.ready().await {
                if fresh {
                    return Err(link.error.map_or(NodeError::Closed, NodeError::Http));
                }
                // the node closed it while it was idle
                continue;
            }
            let answer = {
                let mut sent = pin!(link.sender.try_send_request(req));
                poll_fn(|cx| {
                    link.drive(cx);
                    sent.as_mut().poll(cx)
                })
                .await
            };
            match answer {
                Ok(resp) => return Ok(keep(cell, key, link, resp)),
                Err(mut e) => match e.take_message() {
                    // a kept connection closed before the request was written: another
                    Some(unsent) if !fresh => req = unsent,
                    _ => return Err(NodeError::Http(e.into_error())),
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

    async fn connect(&self, target: &Uri) -> Result<Link, NodeError> {
        let io = self
            .inner
            .connector
            .clone()
            .call(target.clone())
            .await
            .map_err(NodeError::Connect)?;
        let (sender, connection) = http1::Builder::new().handshake(io).await?;
        Ok(Link {
            sender,
            connection: Box::pin(connection.with_upgrades()),
            ended: false,
            error: None,
        })
    }
}

/// The answer, its body driving `link` and handing it back to `cell` once read to the
/// end (at once when it has none); an upgrade gets a task to finish the switch on.
fn keep(
    cell: &Arc<SlotCell>,
    key: Arc<str>,
    link: Link,
    resp: Response<Incoming>,
) -> Response<PooledBody> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if !link.ended {
            let connection = link.connection;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "admin node connection ended with an error");
                }
            });
        }
        return resp.map(|body| PooledBody { body, link: None });
    }
    resp.map(|body| {
        let mut body = PooledBody {
            body,
            link: Some((
                link,
                GiveBack {
                    cell: cell.clone(),
                    key,
                },
            )),
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
    fn take(&self, key: &str) -> (Arc<str>, Option<Link>) {
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
            if idle.link.usable() {
                return (key, Some(idle.link));
            }
        }
        (key, None)
    }

    fn put(&self, key: &str, link: Link) {
        if !link.usable() || self.max_idle_per_node == 0 {
            return;
        }
        let now = Instant::now();
        let oldest = now.checked_sub(self.idle_timeout);
        let mut slot = self.lock();
        let (_, list) = slot.node(key);
        while list
            .front()
            .is_some_and(|i| oldest.is_some_and(|o| i.since < o))
        {
            list.pop_front();
        }
        if list.len() >= self.max_idle_per_node {
            list.pop_front();
        }
        list.push_back(Idle { link, since: now });
    }
}

/// Where a connection goes back to.
struct GiveBack {
    cell: Arc<SlotCell>,
    key: Arc<str>,
}

/// A node's answer body: reading it drives the connection it arrives on, which goes back
/// to the pool when the body ends.
pub struct PooledBody {
    body: Incoming,
    link: Option<(Link, GiveBack)>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((link, GiveBack { cell, key })) = self.link.take() {
            cell.put(&key, link);
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
        if let Some((link, _)) = &mut self.link {
            link.drive(cx);
        }
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => self.give_back(),
            // a connection that failed mid-body is not kept
            Some(Err(_)) => self.link = None,
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
            .field("reusable", &self.link.is_some())
            .finish_non_exhaustive()
    }
}
