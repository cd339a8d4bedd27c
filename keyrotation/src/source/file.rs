//! The `--dev` key source: one JSON file, mode 0600, replaced atomically, with a version
//! counter so that check-and-set works as it does with Vault.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::json_error_summary;
use crate::source::{KeySource, StoreOutcome, Versioned};
use crate::{KeyError, KeyRing};

const FILE_NAME: &str = "keyring.json";
const LOCK_NAME: &str = "keyring.json.lock";
/// How long a writer waits for another writer's lock.
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// A lock older than this was left by a crashed writer (a write takes milliseconds).
const STALE_LOCK: Duration = Duration::from_secs(30);

/// A key ring kept in `<dir>/keyring.json`.
///
/// Writers serialise on an exclusive lock file (`O_EXCL`), so check-and-set holds across
/// threads and processes sharing the directory; the file is written to a temporary file
/// (mode 0600), synced, then renamed over the old one, so readers never see half a ring.
#[derive(Debug, Clone)]
pub struct FileKeySource {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u64,
    ring: KeyRing,
}

/// Removes the lock file when the write is over.
struct LockGuard {
    path: PathBuf,
}

// === impl FileKeySource ===

impl FileKeySource {
    /// A source in `dir`, created (mode 0700) if missing.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, KeyError> {
        let dir = dir.into();
        let source = Self { dir };
        create_private_dir(&source.dir).map_err(|e| source.io_error("create directory", &e))?;
        Ok(source)
    }

    /// The ring file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn io_error(&self, what: &str, e: &std::io::Error) -> KeyError {
        KeyError::Source {
            source_name: self.describe(),
            message: format!("{what}: {e}"),
        }
    }

    fn read(&self) -> Result<Option<Versioned<KeyRing>>, KeyError> {
        let bytes = match fs::read(self.path()) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_error("read", &e)),
        };
        let stored: Stored = serde_json::from_slice(&bytes)
            .map_err(|e| KeyError::CorruptRing(json_error_summary(&e)))?;
        stored.ring.check()?;
        Ok(Some(Versioned {
            value: stored.ring,
            version: stored.version,
        }))
    }

    fn write(&self, ring: &KeyRing, expected: Option<u64>) -> Result<StoreOutcome, KeyError> {
        let _lock = self.lock()?;
        let current = self.read()?.map(|v| v.version);
        if current != expected {
            return Ok(StoreOutcome::Conflict);
        }
        let version = current.map_or(1, |v| v + 1);
        let body = serde_json::to_vec_pretty(&Stored {
            version,
            ring: ring.clone(),
        })
        .map_err(|e| KeyError::Source {
            source_name: self.describe(),
            message: format!("serialise: {}", json_error_summary(&e)),
        })?;

        let temp = self
            .dir
            .join(format!("{FILE_NAME}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let result = (|| {
            let mut file = create_private_file(&temp)?;
            file.write_all(&body)?;
            file.sync_all()?;
            fs::rename(&temp, self.path())?;
            // Make the rename itself durable.
            File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&temp);
            return Err(self.io_error("write", &e));
        }
        Ok(StoreOutcome::Stored(version))
    }

    fn lock(&self) -> Result<LockGuard, KeyError> {
        let path = self.dir.join(LOCK_NAME);
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match create_private_file(&path) {
                Ok(_) => return Ok(LockGuard { path }),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let stale = fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .is_some_and(|age| age > STALE_LOCK);
                    if stale {
                        tracing::warn!(lock = %path.display(), "removing a stale key ring lock");
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                    if Instant::now() >= deadline {
                        return Err(KeyError::Source {
                            source_name: self.describe(),
                            message: "timed out waiting for the ring lock".to_owned(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(self.io_error("lock", &e)),
            }
        }
    }
}

#[async_trait]
impl KeySource for FileKeySource {
    async fn load(&self) -> Result<Option<Versioned<KeyRing>>, KeyError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read())
            .await
            .map_err(|_| self.io_error("read", &std::io::Error::other("task failed")))?
    }

    async fn store(
        &self,
        ring: &KeyRing,
        expected_version: Option<u64>,
    ) -> Result<StoreOutcome, KeyError> {
        let (this, ring) = (self.clone(), ring.clone());
        tokio::task::spawn_blocking(move || this.write(&ring, expected_version))
            .await
            .map_err(|_| self.io_error("write", &std::io::Error::other("task failed")))?
    }

    fn describe(&self) -> String {
        format!("file:{}", self.path().display())
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)
}
