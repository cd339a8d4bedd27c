//! TLS for the HTTPS listener: rustls (TLS 1.2 and 1.3, aws-lc-rs) from PEM files, and
//! a certificate/key pair that is re-read without a restart.
//!
//! The acceptor reads the current `ServerConfig` from an `ArcSwap` for every new
//! connection, so a reload affects only connections accepted afterwards; connections
//! already established keep the session they negotiated.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// Why a certificate/key pair could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was missing or malformed.
        what: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("certificate and key are not usable together: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds a server configuration from a PEM certificate chain and a PEM private key.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert.to_owned(),
            what: format!("malformed PEM certificate: {e}"),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert.to_owned(),
            what: "no CERTIFICATE block found".to_owned(),
        });
    }
    // the key's bytes never appear in an error: only the file name and the PEM problem
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        path: key.to_owned(),
        what: format!("no usable private key: {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // a long-lived stream (a config watch) is written with the TLS 1.3 traffic key
    // after hyper and rustls are dropped (`detach`); the key stays in this process
    config.enable_secret_extraction = true;
    Ok(config)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

// === impl ReloadableTls ===

/// The live TLS configuration, swapped atomically when the files change.
#[derive(Clone)]
pub struct ReloadableTls {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<ArcSwap<ServerConfig>>,
    stamp: Arc<std::sync::Mutex<FileStamp>>,
}

/// What the files looked like when they were last loaded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct FileStamp {
    cert: Option<(SystemTime, u64)>,
    key: Option<(SystemTime, u64)>,
}

impl FileStamp {
    fn of(cert: &Path, key: &Path) -> Self {
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        };
        Self {
            cert: stamp(cert),
            key: stamp(key),
        }
    }
}

impl ReloadableTls {
    /// Loads the pair once; fails if it is unusable.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let stamp = FileStamp::of(cert, key);
        let config = load_server_config(cert, key)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: Arc::new(ArcSwap::from_pointee(config)),
            stamp: Arc::new(std::sync::Mutex::new(stamp)),
        })
    }

    /// The configuration new connections use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-reads the files. On failure the previous pair stays in service.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = FileStamp::of(&self.cert, &self.key);
        let config = load_server_config(&self.cert, &self.key)?;
        self.current.store(Arc::new(config));
        if let Ok(mut s) = self.stamp.lock() {
            *s = stamp;
        }
        metrics::counter!("portcullis_tls_reloads_total", "result" => "ok").increment(1);
        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// Reloads when the files' modification time or size changed since the last load.
    fn reload_if_changed(&self) {
        let now = FileStamp::of(&self.cert, &self.key);
        let changed = self.stamp.lock().map(|s| *s != now).unwrap_or(true);
        if changed {
            self.reload_logged();
        }
    }

    fn reload_logged(&self) {
        if let Err(e) = self.reload() {
            metrics::counter!("portcullis_tls_reloads_total", "result" => "error").increment(1);
            tracing::error!(error = %e, "TLS reload failed; the previous certificate stays in service");
        }
    }

    /// Watches the files every `interval` and on SIGHUP until `stop` is cancelled.
    pub fn spawn_watcher(
        &self,
        interval: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut hup = sighup();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate; the files were just loaded
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => this.reload_if_changed(),
                    Some(()) = recv_hup(&mut hup) => {
                        tracing::info!("SIGHUP: re-reading the TLS certificate");
                        this.reload_logged();
                    }
                }
            }
        })
    }
}

#[cfg(unix)]
fn sighup() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(unix)]
async fn recv_hup(sig: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match sig {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
fn sighup() -> Option<()> {
    None
}

#[cfg(not(unix))]
async fn recv_hup(_: &mut Option<()>) -> Option<()> {
    std::future::pending().await
}
