//! The directory registry store (`file:///dir`): one file per key, written
//! atomically; conditional writes serialised by an exclusive lock on
//! `<dir>/.lock`, so the same guarantees hold between processes on one host
//! or on a shared mount with working locks.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::{Condition, Fetched, Listed, Object, PutOutcome, Store};
use crate::error::usage;
use crate::model::MAX_BODY_BYTES;
use crate::retry::Backoff;

/// How long a conditional write waits for the registry lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A registry in a local directory.
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// Opens an existing directory.
    pub fn open(dir: &Path) -> Result<FileStore> {
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => Ok(FileStore {
                dir: dir.to_path_buf(),
            }),
            Ok(_) => Err(usage(format!(
                "registry file://{} is not a directory; fix --registry",
                dir.display()
            ))),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(usage(format!(
                "registry directory {} does not exist; create it (mkdir -p) or fix --registry",
                dir.display()
            ))),
            Err(e) => {
                Err(e).with_context(|| format!("reading registry directory {}", dir.display()))
            }
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    fn lock(&self) -> Result<File> {
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening the registry lock {}", path.display()))?;
        // Bounded: a lock held for ever on a shared mount must not hang boot.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let mut backoff = Backoff::LOCK;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) => match backoff.delay_within(deadline) {
                    Some(delay) => std::thread::sleep(delay),
                    None => anyhow::bail!(
                        "the registry lock {} is still held after {}s: is another auto-consul stuck? stop it",
                        path.display(),
                        LOCK_WAIT.as_secs()
                    ),
                },
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()));
                }
            }
        }
    }

    /// Reads a key whole (conditional writes compare version tags of
    /// whole files).
    fn read(&self, key: &str) -> Result<Option<Object>> {
        let path = self.path(key);
        let body = match fs::read(&path) {
            Ok(body) => body,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let modified = fs::metadata(&path)
            .and_then(|m| m.modified())
            .with_context(|| format!("reading the time of {}", path.display()))?;
        // A time no clock could have given (a crafted file) counts as now:
        // fresh, never taken for expired.
        let last_modified = to_utc(modified).unwrap_or_else(Utc::now);
        Ok(Some(Object {
            etag: etag(&body),
            body,
            last_modified,
        }))
    }

    /// Where a large object's metadata (its SHA-256) is kept: a hidden
    /// file beside it, which listings skip.
    fn sidecar(&self, key: &str) -> PathBuf {
        let path = self.path(key);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        path.with_file_name(format!(".{name}.sha256"))
    }

    fn write_sidecar(&self, key: &str, sha256: &str) -> Result<()> {
        let path = self.sidecar(key);
        fs::write(&path, format!("{sha256}\n"))
            .with_context(|| format!("writing {}", path.display()))
    }

    fn write(&self, key: &str, body: &[u8]) -> Result<String> {
        let path = self.path(key);
        let parent = path.parent().expect("registry keys have a parent");
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(parent)
            .with_context(|| format!("creating a temporary file in {}", parent.display()))?;
        // Readable by every node sharing the directory.
        tmp.write_all(body)
            .and_then(|()| {
                tmp.as_file()
                    .set_permissions(fs::Permissions::from_mode(0o644))
            })
            .and_then(|()| tmp.as_file().sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
        tmp.persist(&path)
            .with_context(|| format!("renaming into {}", path.display()))?;
        Ok(etag(body))
    }
}

/// A file time as UTC; `None` out of chrono's range (which its `From`
/// would panic on).
fn to_utc(t: std::time::SystemTime) -> Option<DateTime<Utc>> {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => DateTime::from_timestamp(i64::try_from(d.as_secs()).ok()?, d.subsec_nanos()),
        Err(e) => DateTime::from_timestamp(-i64::try_from(e.duration().as_secs()).ok()?, 0),
    }
}

fn etag(body: &[u8]) -> String {
    format!("\"{:x}\"", Sha256::digest(body))
}

#[async_trait]
impl Store for FileStore {
    async fn list(&self, dir: &str, start_after: Option<&str>) -> Result<Vec<Listed>> {
        let path = self.path(dir);
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", path.display())),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", path.display()))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let key = format!("{dir}{name}");
            if start_after.is_some_and(|after| key.as_str() <= after) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let Some(last_modified) = meta.modified().ok().and_then(to_utc) else {
                tracing::warn!("skipping registry key {key}: its modification time is unusable");
                continue;
            };
            out.push(Listed { key, last_modified });
        }
        Ok(out)
    }

    async fn list_page(
        &self,
        dir: &str,
        _token: Option<String>,
    ) -> Result<(Vec<Listed>, Option<String>)> {
        // A directory is read whole: one page.
        Ok((self.list(dir, None).await?, None))
    }

    async fn get(&self, key: &str) -> Result<Option<Object>> {
        let mut obj = self.read(key)?;
        // Registry bodies are small; anything past the limit is junk.
        if let Some(o) = obj.as_mut() {
            o.body.truncate(MAX_BODY_BYTES + 1);
        }
        Ok(obj)
    }

    async fn put(&self, key: &str, body: Vec<u8>, condition: Condition) -> Result<PutOutcome> {
        if condition == Condition::None {
            return self.write(key, &body).map(PutOutcome::Written);
        }
        let _lock = self.lock()?;
        let current = self.read(key)?;
        let holds = match (&condition, &current) {
            (Condition::Absent, None) => true,
            (Condition::Matches(tag), Some(obj)) => *tag == obj.etag,
            _ => false,
        };
        if !holds {
            return Ok(PutOutcome::PreconditionFailed);
        }
        self.write(key, &body).map(PutOutcome::Written)
    }

    async fn delete(&self, keys: &[String]) -> Result<usize> {
        for key in keys {
            for path in [self.path(key), self.sidecar(key)] {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("deleting {}", path.display()));
                    }
                }
            }
        }
        Ok(keys.len())
    }

    async fn put_file(&self, key: &str, path: &Path, sha256: &str) -> Result<()> {
        let dest = self.path(key);
        let parent = dest.parent().expect("registry keys have a parent");
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        // The metadata first: a key never shows without its hash.
        self.write_sidecar(key, sha256)?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(parent)
            .with_context(|| format!("creating a temporary file in {}", parent.display()))?
            .into_temp_path();
        crate::spool::copy(path, &tmp).await?;
        // A snapshot holds every ACL token: the owner (root) only.
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("writing {}", dest.display()))?;
        tmp.persist(&dest)
            .with_context(|| format!("renaming into {}", dest.display()))?;
        Ok(())
    }

    async fn get_file(&self, key: &str, dest: &Path) -> Result<Option<Fetched>> {
        let src = self.path(key);
        if !src.is_file() {
            return Ok(None);
        }
        let claimed = fs::read_to_string(self.sidecar(key))
            .ok()
            .map(|s| s.trim().to_string());
        let file = crate::spool::copy(&src, dest).await?;
        Ok(Some(Fetched { file, claimed }))
    }

    async fn now(&self) -> DateTime<Utc> {
        // The time the file system stamps on a file created now: the same
        // clock as every mtime in the registry (the file server's, on a
        // shared mount), whatever this process believes the time is.
        let stamped = tempfile::Builder::new()
            .prefix(".clock-")
            .tempfile_in(&self.dir)
            .and_then(|f| f.as_file().metadata())
            .and_then(|m| m.modified());
        match stamped {
            Ok(t) => to_utc(t).unwrap_or_else(Utc::now),
            Err(e) => {
                tracing::debug!(
                    "cannot read the clock of {} ({e}): using this host's",
                    self.dir.display()
                );
                Utc::now()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conditional_writes_hold() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let first = store
            .put("slots/server-0", b"a".to_vec(), Condition::Absent)
            .await
            .unwrap();
        let PutOutcome::Written(tag) = first else {
            panic!("first create failed")
        };
        assert!(matches!(
            store
                .put("slots/server-0", b"b".to_vec(), Condition::Absent)
                .await
                .unwrap(),
            PutOutcome::PreconditionFailed
        ));
        assert!(matches!(
            store
                .put(
                    "slots/server-0",
                    b"c".to_vec(),
                    Condition::Matches("\"nope\"".into())
                )
                .await
                .unwrap(),
            PutOutcome::PreconditionFailed
        ));
        assert!(matches!(
            store
                .put("slots/server-0", b"d".to_vec(), Condition::Matches(tag))
                .await
                .unwrap(),
            PutOutcome::Written(_)
        ));
        assert_eq!(
            store.get("slots/server-0").await.unwrap().unwrap().body,
            b"d"
        );
        let listed = store.list("slots/", None).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].key, "slots/server-0");
    }
}
