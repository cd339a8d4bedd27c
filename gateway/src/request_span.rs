//! The request's span, around everything inside the edge layer: made once per request,
//! entered whenever the request's future or its response body is polled, and kept until
//! the body ends, so an exported server span covers the whole exchange.
//!
//! In place of tower-http's `TraceLayer`, which reads the clock on every request, every
//! body frame and the body's end to time callbacks that log at DEBUG. Here the clock is
//! read only when a line is written: at DEBUG, "response head ready" with the status
//! and the time since the request arrived; at ERROR, a 5xx answer ("response failed",
//! as `TraceLayer` wrote it) and a response body that failed while it was sent.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tower::{Layer, Service};
use tracing::Span;

use crate::edge::Arrived;

/// Makes each request's span with `make` (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct RequestSpanLayer<M> {
    make: M,
}

impl<M> RequestSpanLayer<M> {
    /// A layer making each request's span with `make`.
    pub fn new(make: M) -> Self {
        Self { make }
    }
}

impl<S, M: Clone> Layer<S> for RequestSpanLayer<M> {
    type Service = RequestSpan<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSpan {
            inner,
            make: self.make.clone(),
        }
    }
}

/// See [`RequestSpanLayer`].
#[derive(Clone, Copy, Debug)]
pub struct RequestSpan<S, M> {
    inner: S,
    make: M,
}

impl<S, M, B, RB> Service<Request<B>> for RequestSpan<S, M>
where
    S: Service<Request<B>, Response = Response<RB>>,
    M: Fn(&Request<B>) -> Span,
{
    type Response = Response<SpanBody<RB>>;
    type Error = S::Error;
    type Future = SpanFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let span = (self.make)(&req);
        let arrived = req.extensions().get::<Arrived>().map(|a| a.0);
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        SpanFuture {
            inner,
            span,
            arrived,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RequestSpan`].
    pub struct SpanFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        arrived: Option<Instant>,
    }
}

impl<F, RB, E> Future for SpanFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<SpanBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.span.enter();
            let result = ready!(this.inner.poll(cx));
            if let Ok(response) = &result {
                head_ready(response.status(), *this.arrived);
            }
            result
        };
        // the body holds the span from here on
        let span = std::mem::replace(this.span, Span::none());
        Poll::Ready(result.map(|response| response.map(|inner| SpanBody { inner, span })))
    }
}

/// Logs the response head: at DEBUG always, at ERROR when it is a 5xx. The clock is read
/// only for a line that is written.
fn head_ready(status: http::StatusCode, arrived: Option<Instant>) {
    let millis = || arrived.map_or(0.0, |a| a.elapsed().as_secs_f64() * 1e3);
    if status.is_server_error() {
        tracing::error!(
            status = status.as_u16(),
            latency_ms = millis(),
            "response failed"
        );
    } else if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!(
            status = status.as_u16(),
            latency_ms = millis(),
            "response head ready"
        );
    }
}

pin_project_lite::pin_project! {
    /// A response body that enters the request's span when polled and holds it until the
    /// body is dropped.
    pub struct SpanBody<B> {
        #[pin]
        inner: B,
        span: Span,
    }
}

impl<B> HttpBody for SpanBody<B>
where
    B: HttpBody,
    B::Error: std::fmt::Display,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let _entered = this.span.enter();
        let polled = ready!(this.inner.poll_frame(cx));
        if let Some(Err(e)) = &polled {
            tracing::error!(error = %e, "response body failed while it was sent");
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
