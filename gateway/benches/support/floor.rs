//! The floor of the chosen stack: the least a server built from the same parts as
//! Portcullis (tokio, rustls with aws-lc, hyper) does to answer the benches' requests,
//! with none of Portcullis's own work. It puts a number on what the stack itself costs on
//! the machine at hand, in the same run as the fronts it is compared with.
//!
//! Served like Portcullis serves: one single-threaded runtime per worker thread, each
//! accepted connection handed to the next worker and kept there, the same TLS settings
//! ([`portcullis::tls::load_server_config`]), HTTP/1.1 keep-alive through hyper.
//!
//! - [`token`]: signs a fresh access token per request with Portcullis's own signing
//!   (ES256 from the key ring) and answers it as RFC 6749 JSON. No client
//!   authentication, no scope check, no audit record, no rate limit.
//! - [`proxy`]: forwards each request as it came to one upstream over pooled keep-alive
//!   connections and streams the answer back. No token check, no route table, no header
//!   rewriting, no retry, no timeout.
//!
//! Neither is a server anyone should run; each is the lower bound for what the bench
//! measures.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Serves `service` for every connection on `workers` threads; returns the address.
fn serve<F, Fut>(cert: &Path, key: &Path, workers: usize, service: F) -> SocketAddr
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<axum::body::Body>> + Send + 'static,
{
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(
        portcullis::tls::load_server_config(cert, key).unwrap(),
    ));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queues = Vec::new();
    for i in 0..workers {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
        queues.push(tx);
        let (tls, service) = (tls.clone(), service.clone());
        std::thread::Builder::new()
            .name(format!("floor-{i}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    while let Some(stream) = rx.recv().await {
                        let (tls, service) = (tls.clone(), service.clone());
                        tokio::spawn(async move {
                            stream.set_nonblocking(true).unwrap();
                            stream.set_nodelay(true).unwrap();
                            let tcp = tokio::net::TcpStream::from_std(stream).unwrap();
                            let Ok(stream) = tls.accept(tcp).await else {
                                return;
                            };
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(
                                    TokioIo::new(stream),
                                    hyper::service::service_fn(move |req| {
                                        let service = service.clone();
                                        async move {
                                            Ok::<_, std::convert::Infallible>(service(req).await)
                                        }
                                    }),
                                )
                                .await;
                        });
                    }
                });
            })
            .unwrap();
    }
    std::thread::Builder::new()
        .name("floor-accept".into())
        .spawn(move || {
            for (stream, next) in listener.incoming().zip((0..queues.len()).cycle()) {
                if let Ok(stream) = stream {
                    let _ = queues[next].send(stream);
                }
            }
        })
        .unwrap();
    addr
}

/// A token endpoint that only signs: each request's body is read, a fresh access token
/// is signed by `keys` and answered as JSON.
pub fn token(
    cert: &Path,
    key: &Path,
    workers: usize,
    keys: portcullis::keys::KeyService,
    issuer: String,
) -> SocketAddr {
    use portcullis::oauth::claims::{AccessClaims, Audiences};
    let keys = Arc::new(keys);
    serve(cert, key, workers, move |req: http::Request<Incoming>| {
        let (keys, issuer) = (keys.clone(), issuer.clone());
        async move {
            let _form = req.into_body().collect().await.map(|b| b.to_bytes());
            let now = keys.now().unix_timestamp();
            let token = keys
                .sign(&AccessClaims {
                    iss: issuer.clone(),
                    sub: "bench".to_owned(),
                    aud: Audiences::One(issuer),
                    exp: now + 300,
                    iat: now,
                    nbf: now,
                    jti: uuid::Uuid::new_v4().to_string(),
                    scope: "jobs:run".to_owned(),
                    client_id: "bench".to_owned(),
                    roles: vec![],
                    sid: None,
                })
                .unwrap();
            let body = serde_json::json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "jobs:run",
            })
            .to_string();
            http::Response::builder()
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::CACHE_CONTROL, "no-store")
                .body(axum::body::Body::new(Full::new(Bytes::from(body))))
                .unwrap()
        }
    })
}

/// How much of Portcullis's framework a [`proxy`] floor runs in front of its forwarding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// hyper calls the forwarding directly.
    Bare,
    /// An axum `Router` whose fallback forwards, behind the layers Portcullis runs
    /// around its router (request id, request span, panic catcher, timeouts).
    Framework,
}

/// A proxy that only forwards: each request goes to `upstream` (`host:port`) as it came,
/// over a worker's pool of keep-alive HTTP/1.1 connections, and the answer comes back as
/// it came.
pub fn proxy(
    cert: &Path,
    key: &Path,
    workers: usize,
    upstream: SocketAddr,
    stack: Stack,
) -> SocketAddr {
    match stack {
        Stack::Bare => serve(cert, key, workers, move |req: http::Request<Incoming>| {
            forward(upstream, req.map(axum::body::Body::new))
        }),
        Stack::Framework => {
            use axum::response::IntoResponse;
            use std::time::Duration;
            use tower_http::request_id::{
                MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer,
            };
            let id = http::HeaderName::from_static("x-request-id");
            let routes =
                axum::Router::new().fallback(move |req: axum::extract::Request| async move {
                    forward(upstream, req).await
                });
            let stack = tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(id.clone(), MakeRequestUuid))
                .layer(portcullis::request_span::RequestSpanLayer::new(
                    |_: &axum::extract::Request| tracing::info_span!("request"),
                ))
                .layer(PropagateRequestIdLayer::new(id))
                .layer(tower_http::catch_panic::CatchPanicLayer::new())
                .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                    http::StatusCode::REQUEST_TIMEOUT,
                    Duration::from_secs(30),
                ))
                .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
                    Duration::from_secs(30),
                ))
                .service(routes);
            let router = axum::Router::new().fallback_service(stack);
            serve(cert, key, workers, move |req: http::Request<Incoming>| {
                let router = router.clone();
                async move {
                    match tower::ServiceExt::oneshot(router, req.map(axum::body::Body::new)).await {
                        Ok(r) => r,
                        Err(never) => match never {},
                    }
                    .into_response()
                }
            })
        }
    }
}

async fn forward(
    upstream: SocketAddr,
    req: http::Request<axum::body::Body>,
) -> http::Response<axum::body::Body> {
    type Sender = hyper::client::conn::http1::SendRequest<axum::body::Body>;
    thread_local! {
        // each worker's own pool, as Portcullis keeps one per worker
        static IDLE: std::cell::RefCell<Vec<Sender>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut sender = match IDLE.with_borrow_mut(Vec::pop) {
        Some(s) if !s.is_closed() => s,
        _ => {
            let tcp = tokio::net::TcpStream::connect(upstream).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender
        }
    };
    sender.ready().await.unwrap();
    let response = sender.send_request(req).await.unwrap();
    IDLE.with_borrow_mut(|idle| idle.push(sender));
    response.map(axum::body::Body::new)
}
