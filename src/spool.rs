//! Large bodies (Consul snapshots, up to gigabytes) written to a file as
//! they arrive, hashed on the way: memory stays bounded by a chunk.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// A file being filled, and the SHA-256 of what was written so far.
pub struct Spool {
    path: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    size: u64,
}

/// A file filled: where, its SHA-256 (hex) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spooled {
    /// The file.
    pub path: PathBuf,
    /// Its SHA-256, lower-case hex.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

impl Spool {
    /// Creates (or truncates) `path`, readable by its owner only.
    pub async fn create(path: &Path) -> Result<Spool> {
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .await
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Spool {
            path: path.to_path_buf(),
            file,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Appends a chunk.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        self.file
            .write_all(chunk)
            .await
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Flushes to disk; the file's hash and size.
    pub async fn finish(mut self) -> Result<Spooled> {
        self.file
            .flush()
            .await
            .and(self.file.sync_all().await)
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(Spooled {
            path: self.path,
            sha256: hex(&self.hasher.finalize()),
            size: self.size,
        })
    }
}

/// Copies the file at `from` into a spool at `to`, chunk by chunk.
pub async fn copy(from: &Path, to: &Path) -> Result<Spooled> {
    use tokio::io::AsyncReadExt;
    let mut src = tokio::fs::File::open(from)
        .await
        .with_context(|| format!("opening {}", from.display()))?;
    let mut spool = Spool::create(to).await?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = src
            .read(&mut buf)
            .await
            .with_context(|| format!("reading {}", from.display()))?;
        if n == 0 {
            break;
        }
        spool.write(&buf[..n]).await?;
    }
    spool.finish().await
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` looks like a SHA-256 in hex (what a snapshot's metadata must
/// hold to be trusted at all).
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}
