//! `portcullis serve --dev`: everything on one machine, no external service.
//!
//! A data directory holds a self-signed certificate (made once with rcgen, reused after),
//! the SQLite database and the local key ring. Secrets written there are mode 0600.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

use crate::config::{
    Config, DatabaseConfig, KeySourceKind, KeysConfig, LogConfig, LogFormat, ServerConfig,
    TlsConfig,
};

/// Failures preparing the dev data directory.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// Creating or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("generating the self-signed certificate: {0}")]
    Cert(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The default data directory of `--dev`.
pub const DEFAULT_DATA_DIR: &str = "portcullis-dev-data";

/// Where `--dev` listens unless told otherwise.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8443);

/// Prepares `data_dir` and returns the configuration of a dev instance.
pub fn dev_config(
    data_dir: &Path,
    listen: SocketAddr,
    admin_listen: SocketAddr,
) -> Result<Config, DevError> {
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let (cert, key) = ensure_certificate(data_dir)?;
    let hash_key = ensure_hash_key(data_dir)?;
    let db_path = data_dir.join("portcullis.db");
    let public_host = if listen.ip().is_unspecified() || listen.ip().is_loopback() {
        "localhost".to_owned()
    } else {
        listen.ip().to_string()
    };
    Ok(Config {
        server: ServerConfig {
            listen,
            admin_listen,
            public_url: format!("https://{public_host}:{}", listen.port()),
            shutdown_grace: Duration::from_secs(5),
            ..ServerConfig::default()
        },
        tls: Some(TlsConfig {
            cert,
            key,
            reload_interval: Duration::from_secs(10),
        }),
        log: LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Pretty,
        },
        tracing: crate::config::TracingConfig::default(),
        database: DatabaseConfig {
            url: SecretString::from(format!("sqlite://{}", db_path.display())),
            max_connections: 4,
            min_connections: 1,
            acquire_timeout: Duration::from_secs(3),
        },
        redis: None,
        tokens: crate::config::TokensConfig {
            hash_key_file: Some(hash_key),
            ..Default::default()
        },
        refresh: Default::default(),
        keys: KeysConfig {
            source: KeySourceKind::File,
            file_dir: Some(data_dir.to_owned()),
            ..KeysConfig::default()
        },
        vault: None,
        admin: Default::default(),
        // values sealed under `config-master.key` in the data directory; this instance's
        // own runtime settings under dev/portcullis
        config_center: crate::config::ConfigCenterConfig {
            runtime_environment: Some("dev".to_owned()),
            ..Default::default()
        },
        sso: Default::default(),
        protection: Default::default(),
        proxy: Default::default(),
        audit: Default::default(),
    })
}

/// Makes `cert.pem`/`key.pem` in `dir` unless both exist; returns their paths.
pub fn ensure_certificate(dir: &Path) -> Result<(PathBuf, PathBuf), DevError> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.is_file() && key.is_file() {
        return Ok((cert, key));
    }
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let certified = rcgen::generate_simple_self_signed(names)?;
    write_private(&key, certified.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&cert, certified.cert.pem()).map_err(io(&cert))?;
    tracing::info!(cert = %cert.display(), "generated a self-signed development certificate");
    Ok((cert, key))
}

/// Makes `hash.key` (the keyed-hash key, base64, mode 0600) in `dir` unless it exists.
pub fn ensure_hash_key(dir: &Path) -> Result<PathBuf, DevError> {
    let path = dir.join("hash.key");
    if !path.is_file() {
        let (_, text) = crate::server_key::ServerKey::generate().map_err(|e| DevError::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        write_private(&path, text.as_bytes())?;
    }
    Ok(path)
}

/// Writes a file only its owner can read (0600 on Unix), atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), DevError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(contents).map_err(io(&tmp.0))?;
    tmp.1.sync_all().map_err(io(&tmp.0))?;
    std::fs::rename(&tmp.0, path).map_err(io(path))?;
    Ok(())
}

fn tempfile_in(dir: &Path) -> Result<(PathBuf, std::fs::File), DevError> {
    let path = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts.open(&path).map_err(io(&path))?;
    Ok((path, file))
}

/// Where `--dev` keeps the bootstrap admin client's credentials.
#[derive(Debug)]
pub struct DevCredentials {
    /// The client id.
    pub client_id: String,
    /// `dev-credentials.json`.
    pub path: PathBuf,
}

/// Creates the bootstrap admin client on first start and writes its id and secret to
/// `dev-credentials.json` (mode 0600) — as a Vault dev server hands out its root token.
/// On later starts the file is left as it is; when it is gone, the admin client's secret
/// is rotated (the old one ends at once: it is nowhere to be read any more, but may have
/// been copied) and the file written again, so that `--dev` always starts with
/// credentials at hand.
pub async fn bootstrap_admin(
    state: &crate::state::AppState,
    data_dir: &Path,
) -> Result<DevCredentials, String> {
    use secrecy::ExposeSecret;
    let path = data_dir.join("dev-credentials.json");
    // the schema is migrated in the background; give it a moment on first start
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !state.db.is_migrated() {
        if std::time::Instant::now() > deadline {
            return Err("the dev database did not become ready".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let created = state
        .clients
        .bootstrap_admin(state.keys.now())
        .await
        .map_err(|e| format!("creating the bootstrap admin client: {e}"))?;
    let secret = match created {
        Some((_, secret)) => Some(secret),
        None if !path.is_file() => {
            let id = crate::clients::ClientId::parse(crate::clients::ADMIN_CLIENT_ID)
                .map_err(|e| e.to_string())?;
            let now = state.keys.now();
            let secret = state
                .clients
                .rotate_secret(&id, Duration::ZERO, now)
                .await
                .map_err(|e| format!("rotating the bootstrap admin client's secret: {e}"))?;
            state.audit.record(crate::audit::AuditEvent {
                at: now,
                actor: "operator:dev".to_owned(),
                action: "client.rotate_secret".to_owned(),
                target: id.to_string(),
                source_ip: None,
                detail: serde_json::json!({
                    "overlap": "0s",
                    "previous_secret_expires_at": null,
                    "reason": "dev-credentials.json was gone",
                })
                .into(),
            });
            tracing::warn!(
                path = %path.display(),
                "dev-credentials.json was gone: the bootstrap admin client's secret was \
                 rotated and the file written again"
            );
            Some(secret)
        }
        None => None,
    };
    if let Some(secret) = secret {
        let json = serde_json::json!({
            "client_id": crate::clients::ADMIN_CLIENT_ID,
            "client_secret": secret.expose_secret(),
            "token_endpoint": format!("{}/oauth2/token", state.config.issuer()),
        });
        let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
        write_private(&path, text.as_bytes()).map_err(|e| e.to_string())?;
    }
    Ok(DevCredentials {
        client_id: crate::clients::ADMIN_CLIENT_ID.to_owned(),
        path,
    })
}
