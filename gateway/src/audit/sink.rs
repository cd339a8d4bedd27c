//! The JSON-lines sink: every stored record, once, as one JSON object per line (with its
//! seq and hashes, so a SIEM can verify the chain too), to stdout or appended to a file.
//!
//! A file sink follows rotation: before each batch it checks that the path still names
//! the file it has open (a rotated-away file is closed and the path created anew), and
//! SIGHUP makes it reopen the path in any case.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use super::AuditRecord;
use crate::config::AuditSinkKind;

/// Where stored records are streamed.
#[derive(Debug)]
pub enum Sink {
    /// Nowhere.
    None,
    /// Standard output (logs go to standard error, so the two never mix).
    Stdout,
    /// Appended to a file.
    File(FileSink),
}

/// An append-only file that follows rotation.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    open: Option<(File, FileId)>,
    /// Whether a missing file is created (the instance), or refused (the CLI: a file it
    /// created would belong to its user, and the instance could not append to it).
    create: bool,
}

/// What identifies a file whatever its name (device and inode).
type FileId = (u64, u64);

impl Sink {
    /// The sink `kind` configures.
    pub fn new(kind: &AuditSinkKind) -> Self {
        match kind {
            AuditSinkKind::None => Self::None,
            AuditSinkKind::Stdout => Self::Stdout,
            AuditSinkKind::File(path) => Self::File(FileSink {
                path: path.clone(),
                open: None,
                create: true,
            }),
        }
    }

    /// Like [`Self::new`], but a file sink only appends to a file that exists: the CLI's,
    /// run as another user than the instance, must not create the instance's file.
    pub fn existing(kind: &AuditSinkKind) -> Self {
        let mut sink = Self::new(kind);
        if let Self::File(f) = &mut sink {
            f.create = false;
        }
        sink
    }

    /// Whether records go anywhere.
    pub fn is_enabled(&self) -> bool {
        !matches!(self, Self::None)
    }

    /// Writes `records`, one line each. A failure is logged and counted; the records are
    /// stored in the database whatever happens here.
    pub fn write(&mut self, records: &[AuditRecord]) {
        if let Err(e) = self.try_write(records) {
            metrics::counter!("portcullis_audit_sink_failures_total").increment(1);
            tracing::error!(error = %e, records = records.len(), "audit sink write failed; the records are in the database");
        }
    }

    /// Writes `records`, one line each, and says whether that worked (the CLI, which
    /// reports it rather than logs it).
    pub fn try_write(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
        if records.is_empty() || !self.is_enabled() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(records.len() * 400);
        for r in records {
            if serde_json::to_writer(&mut buf, r).is_ok() {
                buf.push(b'\n');
            }
        }
        match self {
            Self::None => Ok(()),
            Self::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&buf).and_then(|()| out.flush())
            }
            Self::File(f) => f.append(&buf),
        }
    }

    /// Closes a file sink, so the next write opens its path anew (SIGHUP).
    pub fn reopen(&mut self) {
        if let Self::File(f) = self {
            f.open = None;
        }
    }
}

impl FileSink {
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        // rotated (renamed or removed) since we opened it: start a new file at the path
        let current = file_id_of_path(&self.path);
        if let Some((_, id)) = &self.open
            && current.as_ref() != Some(id)
        {
            self.open = None;
        }
        let file = match &mut self.open {
            Some((file, _)) => file,
            None => {
                let file = OpenOptions::new()
                    .create(self.create)
                    .append(true)
                    .open(&self.path)?;
                let id = file_id(&file.metadata()?);
                &mut self.open.insert((file, id)).0
            }
        };
        file.write_all(buf)?;
        file.flush()
    }
}

fn file_id_of_path(path: &std::path::Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|m| file_id(&m))
}

#[cfg(unix)]
fn file_id(m: &std::fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(not(unix))]
fn file_id(m: &std::fs::Metadata) -> FileId {
    // no inode to compare: rotation is followed on SIGHUP only
    let _ = m;
    (0, 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_cli_appends_only_to_a_sink_file_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let kind = AuditSinkKind::File(path.clone());
        let record = AuditRecord {
            seq: 1,
            at: time::OffsetDateTime::UNIX_EPOCH,
            at_unix_ms: 0,
            actor: "operator:cli:x".to_owned(),
            action: "client.create".to_owned(),
            target: "svc".to_owned(),
            source_ip: None,
            detail: serde_json::json!({}),
            prev_hash: "0".to_owned(),
            hash: "1".to_owned(),
            hash_version: 1,
        };
        let err = Sink::existing(&kind)
            .try_write(std::slice::from_ref(&record))
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert!(!path.exists(), "the CLI created the instance's file");
        // the instance creates it; then the CLI appends
        Sink::new(&kind)
            .try_write(std::slice::from_ref(&record))
            .unwrap();
        Sink::existing(&kind)
            .try_write(std::slice::from_ref(&record))
            .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }
}
