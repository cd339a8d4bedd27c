//! Long-lived response streams taken off hyper and rustls once their head is sent.
//!
//! A config watch holds its connection for hours and carries an event now and then.
//! Served by hyper over rustls to the end, every open watch keeps hyper's read and write
//! buffers (8 KiB each), rustls' record reader (4 KiB and a record) and a connection task
//! sized for the whole HTTP stack: about 40 KiB per idle watcher, and a trip through
//! hyper's dispatcher and rustls' buffers for each event.
//!
//! So an HTTP/1.1 connection over TLS 1.3 offers its socket to the response ([`Detach`],
//! in the request's extensions). A handler that streams answers with [`Detach::body`]:
//! once hyper has flushed the response head, the connection's task drops hyper and
//! rustls, keeps only the socket and the server's TLS 1.3 traffic key, and hands them to
//! the handler's own small task as a [`Detached`]. That task writes each body chunk
//! (HTTP/1.1 chunked encoding, as hyper began it) as a TLS record it seals itself (RFC
//! 8446 §5.2) with the same key and record sequence rustls would have used.
//!
//! The client has nothing to send on such a stream; whatever it sends (a request it
//! pipelined, a `close_notify`, a `KeyUpdate`) or its leaving ends the stream, and it
//! reconnects as it would after any drop. At shutdown the stream ends properly: the last
//! chunk, then `close_notify`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey,
};
use bytes::Bytes;
use hyper::body::{Body, Frame};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Why a connection could not be taken over, or a detached stream ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    /// Only TLS 1.3 records are sealed here.
    #[error("the connection does not use TLS 1.3")]
    NotTls13,
    /// rustls would not give up the connection's traffic secrets.
    #[error("the TLS traffic secrets could not be taken over: {0}")]
    Secrets(#[from] rustls::Error),
    /// The negotiated cipher is not one this module seals with.
    #[error("unsupported TLS 1.3 cipher")]
    Cipher,
    /// Sealing a record failed.
    #[error("a TLS record could not be sealed")]
    Seal,
    /// The record limit of the traffic key is reached; the client reconnects.
    #[error("the traffic key has sealed its limit of records")]
    KeyExhausted,
    /// Writing to the socket failed or timed out.
    #[error("the client could not be written to: {0}")]
    Io(#[from] std::io::Error),
}

/// What a detached stream does with its connection.
pub type Takeover = Box<dyn FnOnce(Detached) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A connection's offer to hand its socket to the response (see the module docs). In the
/// request's extensions on HTTP/1.1 connections over TLS 1.3 served by [`crate::server`].
#[derive(Clone)]
pub struct Detach(Arc<Handoff>);

impl std::fmt::Debug for Detach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detach").finish_non_exhaustive()
    }
}

impl Detach {
    pub(crate) fn new(handoff: Arc<Handoff>) -> Self {
        Self(handoff)
    }

    /// A response body that takes the connection over once hyper has sent the response
    /// head, and runs `run` on it. The response must not declare a length: its body goes
    /// out chunked.
    pub fn body<F, Fut>(self, run: F) -> axum::body::Body
    where
        F: FnOnce(Detached) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let run: Takeover = Box::new(move |detached| Box::pin(run(detached)));
        axum::body::Body::new(DetachBody {
            handoff: self.0,
            run: Some(run),
        })
    }
}

/// Shared by a connection's task, its stream and a response that takes it over.
#[derive(Default)]
pub(crate) struct Handoff {
    /// Set by the response body when hyper first polls it: the connection is wanted.
    run: Mutex<Option<Takeover>>,
    /// Whether the last write-side call on the connection was a completed flush, i.e.
    /// hyper and rustls hold no bytes still to send.
    flushed: AtomicBool,
    /// Set with `run`, and kept when the connection's task takes `run`.
    wanted: AtomicBool,
}

impl Handoff {
    /// A write began: bytes may be buffered until the next completed flush.
    pub(crate) fn on_write(&self) {
        self.flushed.store(false, Ordering::Relaxed);
    }

    /// A flush completed.
    pub(crate) fn on_flushed(&self) {
        self.flushed.store(true, Ordering::Relaxed);
    }

    /// Whether a response wants the connection.
    pub(crate) fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Relaxed)
    }

    /// The takeover, once a response wants the connection and everything before it has
    /// been flushed to the socket.
    pub(crate) fn ready(&self) -> Option<Takeover> {
        // checked after every poll of every HTTP/1.1 connection over TLS 1.3: two loads,
        // and the lock only once a response has asked
        if !self.wanted() || !self.flushed.load(Ordering::Relaxed) {
            return None;
        }
        self.run
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// The body of a response that takes its connection over: it never yields a frame.
/// When first polled (hyper has the head buffered and flushes it next) it tells the
/// connection's task, which drops hyper, and this body with it.
struct DetachBody {
    handoff: Arc<Handoff>,
    run: Option<Takeover>,
}

impl Body for DetachBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(run) = self.run.take() {
            *self
                .handoff
                .run
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(run);
            self.handoff.wanted.store(true, Ordering::Relaxed);
        }
        // the connection's task checks the handoff after every poll of hyper, so no
        // wake-up is needed
        Poll::Pending
    }
}

/// How long one write to a detached stream may wait for a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// TLS 1.3 records carry at most 2^14 bytes of plaintext.
const MAX_FRAGMENT: usize = 1 << 14;
/// The AEAD tag of every TLS 1.3 cipher.
const TAG_LEN: usize = 16;
/// Records sealed with one key before the stream is ended (the client reconnects with a
/// fresh key); below every TLS 1.3 AEAD's confidentiality limit (2^23 for AES-256-GCM).
const RECORD_LIMIT: u64 = 1 << 22;
/// A record's header: type, legacy version, length.
const HEADER_LEN: usize = 5;
/// What a record adds to its plaintext: the header, the real content type and the tag.
const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;
const APPLICATION_DATA: u8 = 0x17;
const ALERT: u8 = 0x15;

/// The server's side of a TLS 1.3 connection after the handshake: its traffic key and the
/// next record's sequence number. Never printed.
struct Sealer {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    // only its stream's task seals; atomic so that sending can take `&self`
    seq: AtomicU64,
}

impl Sealer {
    fn new(secrets: ConnectionTrafficSecrets, seq: u64) -> Result<Self, DetachError> {
        let (algorithm, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => return Err(DetachError::Cipher),
        };
        let key = UnboundKey::new(algorithm, key.as_ref()).map_err(|_| DetachError::Cipher)?;
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| DetachError::Cipher)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq: AtomicU64::new(seq),
        })
    }

    /// Appends the plaintext `parts`, one after the other, to `out` as TLS 1.3 records of
    /// `content_type`, split at the record size limit; each part is copied once, straight
    /// into its record.
    fn seal(
        &self,
        content_type: u8,
        parts: &[&[u8]],
        out: &mut Vec<u8>,
    ) -> Result<(), DetachError> {
        // where the record being filled begins in `out`
        let mut record: Option<usize> = None;
        for mut part in parts.iter().copied() {
            while !part.is_empty() {
                let start = *record.get_or_insert_with(|| {
                    out.extend_from_slice(&[0; HEADER_LEN]);
                    out.len() - HEADER_LEN
                });
                let room = MAX_FRAGMENT - (out.len() - start - HEADER_LEN);
                let (now, rest) = part.split_at(room.min(part.len()));
                out.extend_from_slice(now);
                part = rest;
                if now.len() == room {
                    self.seal_in_place(content_type, out, start)?;
                    record = None;
                }
            }
        }
        match record {
            Some(start) => self.seal_in_place(content_type, out, start),
            None => Ok(()),
        }
    }

    /// Seals the record that begins at `out[start]`: a header's room, then its plaintext
    /// (at most [`MAX_FRAGMENT`] bytes) up to the end of `out`. Writes the header, appends
    /// the real content type and the tag.
    fn seal_in_place(
        &self,
        content_type: u8,
        out: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), DetachError> {
        let seq = self.seq.load(Ordering::Relaxed);
        if seq >= RECORD_LIMIT {
            return Err(DetachError::KeyExhausted);
        }
        out.push(content_type);
        let body = start + HEADER_LEN;
        // the inner plaintext (the fragment, then its real type) and the tag
        let length = u16::try_from(out.len() - body + TAG_LEN).map_err(|_| DetachError::Seal)?;
        let [high, low] = length.to_be_bytes();
        // the outer header says application data, TLS 1.2, and is the additional data
        let header = [APPLICATION_DATA, 0x03, 0x03, high, low];
        out[start..body].copy_from_slice(&header);
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut out[body..],
            )
            .map_err(|_| DetachError::Seal)?;
        out.extend_from_slice(tag.as_ref());
        self.seq.store(seq + 1, Ordering::Relaxed);
        Ok(())
    }
}

/// The size line of an HTTP/1.1 chunk of `len` bytes (upper-case hex, CRLF), in `buf`.
fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut at = 16;
    let mut rest = len;
    loop {
        at -= 1;
        buf[at] = HEX[rest & 0xF];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    buf[16..].copy_from_slice(b"\r\n");
    &buf[at..]
}

/// A response stream's connection after the takeover: the socket and the key to seal
/// records with.
pub struct Detached {
    socket: TcpStream,
    sealer: Sealer,
    closing: CancellationToken,
}

impl std::fmt::Debug for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the key
        f.debug_struct("Detached")
            .field("peer", &self.socket.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Detached {
    /// Takes over a TLS 1.3 connection whose outgoing records are all sent. `closing` is
    /// cancelled when the server shuts down.
    pub(crate) fn from_tls(
        stream: tokio_rustls::server::TlsStream<TcpStream>,
        closing: CancellationToken,
    ) -> Result<Self, DetachError> {
        let (socket, connection) = stream.into_inner();
        if connection.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
            return Err(DetachError::NotTls13);
        }
        let (seq, secrets) = connection.dangerous_extract_secrets()?.tx;
        // a writer's waker the connection's task may have left (after a write that would
        // block) is dropped now if the socket cannot take more, else at the next such write
        let _ = socket.poll_write_ready(&mut Context::from_waker(std::task::Waker::noop()));
        Ok(Self {
            socket,
            sealer: Sealer::new(secrets, seq)?,
            closing,
        })
    }

    /// Appends `data` to `out` as one chunk of the response body, sealed as TLS records.
    /// Records must reach the socket in the order they are sealed: a stream seals and
    /// writes under one lock (see `config_api::fanout`).
    pub fn seal_chunk(&self, data: &[u8], out: &mut Vec<u8>) -> Result<(), DetachError> {
        if data.is_empty() {
            // an empty chunk would end the body
            return Ok(());
        }
        let mut line = [0u8; 18];
        let size = chunk_size_line(data.len(), &mut line);
        let chunk_len = size.len() + data.len() + 2;
        out.reserve(chunk_len + (chunk_len / MAX_FRAGMENT + 1) * OVERHEAD);
        self.sealer
            .seal(APPLICATION_DATA, &[size, data, b"\r\n"], out)
    }

    /// Writes as much of `bytes` as the socket takes now, without waiting: how much that
    /// was (all of it unless the socket's buffer is full).
    pub fn try_write(&self, mut bytes: &[u8]) -> Result<usize, DetachError> {
        let total = bytes.len();
        while !bytes.is_empty() {
            match self.socket.try_write(bytes) {
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(total - bytes.len())
    }

    /// Ends the body (its last chunk), says `close_notify` and closes the connection.
    pub async fn finish(mut self) {
        let mut records = Vec::with_capacity(64);
        let sealed = self
            .sealer
            .seal(APPLICATION_DATA, &[b"0\r\n\r\n"], &mut records)
            .and_then(|()| self.sealer.seal(ALERT, &[&[1, 0]], &mut records));
        if sealed.is_ok() && self.write(&records).await.is_ok() {
            let _ = tokio::time::timeout(WRITE_TIMEOUT, self.socket.shutdown()).await;
        }
    }

    /// Completes when the stream should end: the client sent something or left.
    pub async fn client_done(&self) {
        let mut scratch = [0u8; 64];
        loop {
            // `poll_read_ready`, not `readable()`: it takes over the socket's reader slot,
            // where the connection's finished task stays registered otherwise — and with
            // it that task's whole allocation (3.8 KiB) for as long as the watch lasts
            if std::future::poll_fn(|cx| self.socket.poll_read_ready(cx))
                .await
                .is_err()
            {
                return;
            }
            match self.socket.try_read(&mut scratch) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                // end of stream, an error, or bytes a stream has no use for
                _ => return,
            }
        }
    }

    /// Cancelled when the server begins to shut down.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// Writes all of `bytes`, waiting at most [`WRITE_TIMEOUT`] for a client that does
    /// not read.
    pub async fn write(&self, mut bytes: &[u8]) -> Result<(), DetachError> {
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        loop {
            bytes = &bytes[self.try_write(bytes)?..];
            if bytes.is_empty() {
                return Ok(());
            }
            // the writer slot, as `client_done` takes the reader's
            let writable = std::future::poll_fn(|cx| self.socket.poll_write_ready(cx));
            tokio::time::timeout_at(deadline, writable)
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};

    /// A rustls client and server over memory, handshaken, the server able to give up
    /// its secrets.
    fn pair(
        suite: rustls::SupportedCipherSuite,
    ) -> (rustls::ClientConnection, rustls::ServerConnection) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..rustls::crypto::aws_lc_rs::default_provider()
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
            )
            .unwrap();
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client =
            rustls::ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap())
                .unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        while client.is_handshaking() || server.is_handshaking() || server.wants_write() {
            shuttle(&mut client, &mut server);
        }
        // the server writes a little through rustls first, so the sequence is not zero
        server
            .writer()
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .unwrap();
        let head = shuttle(&mut client, &mut server);
        assert_eq!(head, b"HTTP/1.1 200 OK\r\n\r\n");
        (client, server)
    }

    /// One round trip of records; the plaintext the client read.
    fn shuttle(
        client: &mut rustls::ClientConnection,
        server: &mut rustls::ServerConnection,
    ) -> Vec<u8> {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut slice = wire.as_slice();
        while !slice.is_empty() {
            server.read_tls(&mut slice).unwrap();
            server.process_new_packets().unwrap();
        }
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        deliver(client, &wire).0
    }

    /// Feeds `wire` to the client, reading its plaintext as it goes; and whether the
    /// stream was closed cleanly.
    fn deliver(client: &mut rustls::ClientConnection, wire: &[u8]) -> (Vec<u8>, bool) {
        let mut slice = wire;
        let mut got = Vec::new();
        let mut closed = false;
        while !slice.is_empty() {
            client.read_tls(&mut slice).unwrap();
            client
                .process_new_packets()
                .expect("the client accepts the records");
            let (more, end) = read_all(client);
            got.extend_from_slice(&more);
            closed |= end;
        }
        (got, closed)
    }

    fn read_all(client: &mut rustls::ClientConnection) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match client.reader().read(&mut buf) {
                Ok(0) => return (got, true),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (got, false),
                Err(e) => panic!("client read failed: {e}"),
            }
        }
    }

    #[test]
    fn records_sealed_here_are_read_by_a_rustls_client_in_order_then_close_cleanly() {
        let suites = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
        for suite in [
            suites,
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let (mut client, server) = pair(suite);
            let (seq, secrets) = server.dangerous_extract_secrets().unwrap().tx;
            let sealer = Sealer::new(secrets, seq).unwrap();
            // one record, then one larger than a record's limit, then a close_notify
            let big: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
            let mut wire = Vec::new();
            sealer
                .seal(APPLICATION_DATA, &[b"event: a\n\n"], &mut wire)
                .unwrap();
            sealer.seal(APPLICATION_DATA, &[&big], &mut wire).unwrap();
            let (got, closed) = deliver(&mut client, &wire);
            assert!(!closed);
            assert_eq!(&got[..10], b"event: a\n\n");
            assert_eq!(&got[10..], &big[..], "{suite:?}");
            let mut wire = Vec::new();
            sealer.seal(ALERT, &[&[1, 0]], &mut wire).unwrap();
            let (rest, closed) = deliver(&mut client, &wire);
            assert!(rest.is_empty());
            assert!(closed, "close_notify ends the client's stream cleanly");
        }
    }

    #[test]
    fn a_record_with_a_wrong_sequence_is_refused_by_the_client() {
        let (mut client, server) =
            pair(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256);
        let (seq, secrets) = server.dangerous_extract_secrets().unwrap().tx;
        // one ahead: a record the client never saw would be skipped
        let sealer = Sealer::new(secrets, seq + 1).unwrap();
        let mut wire = Vec::new();
        sealer
            .seal(APPLICATION_DATA, &[b"data"], &mut wire)
            .unwrap();
        let mut slice = wire.as_slice();
        client.read_tls(&mut slice).unwrap();
        assert!(
            client.process_new_packets().is_err(),
            "the nonce is bound to the sequence"
        );
    }

    #[test]
    fn chunk_size_lines_are_upper_case_hex_with_crlf() {
        let mut buf = [0u8; 18];
        for (len, line) in [
            (1usize, "1\r\n"),
            (15, "F\r\n"),
            (16, "10\r\n"),
            (2_047, "7FF\r\n"),
            (1 << 20, "100000\r\n"),
            (usize::MAX, "FFFFFFFFFFFFFFFF\r\n"),
        ] {
            assert_eq!(chunk_size_line(len, &mut buf), line.as_bytes(), "{len}");
        }
    }

    #[test]
    fn the_key_is_retired_before_its_record_limit() {
        let (_client, server) =
            pair(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384);
        let (_, secrets) = server.dangerous_extract_secrets().unwrap().tx;
        let sealer = Sealer::new(secrets, RECORD_LIMIT).unwrap();
        assert!(matches!(
            sealer.seal(APPLICATION_DATA, &[b"x"], &mut Vec::new()),
            Err(DetachError::KeyExhausted)
        ));
    }
}
