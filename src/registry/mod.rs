//! The registry: a small key-value store with conditional writes (S3 or a
//! directory), and the reads that turn its keys into members, slots and the
//! cluster record.

pub mod clock;
mod file;
mod s3;
pub mod view;

use std::fmt;
use std::path::Path;

use anyhow::Result;
use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use file::FileStore;
pub use s3::S3Store;
pub use view::{
    Agents, ClusterView, HeartbeatEntry, Member, RegistryView, SlotView, list_heartbeats,
    parse_listing, read_cluster, read_slot, read_slots, read_slots_from, read_view,
};

use crate::error::usage;

/// A key as listed, relative to the registry prefix.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Key relative to the prefix, e.g. `servers/20240101000000-n1`.
    pub key: String,
    /// When the store last wrote it, on the store's clock.
    pub last_modified: DateTime<Utc>,
}

/// An object read back with its version tag.
#[derive(Debug, Clone)]
pub struct Object {
    /// The body.
    pub body: Vec<u8>,
    /// Opaque version tag for `If-Match`.
    pub etag: String,
    /// When the store last wrote it.
    pub last_modified: DateTime<Utc>,
}

/// A large object read into a file.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// What was written, with the hash of its bytes.
    pub file: crate::spool::Spooled,
    /// The SHA-256 the object's metadata claims, if any.
    pub claimed: Option<String>,
}

impl Fetched {
    /// Whether the bytes are what was saved: the metadata names a SHA-256
    /// and the bytes have it.
    pub fn intact(&self) -> Result<(), String> {
        match &self.claimed {
            None => Err("it carries no sha256 metadata".into()),
            Some(c) if !crate::spool::is_sha256(c) => Err(format!(
                "its sha256 metadata `{}` is not a SHA-256",
                c.escape_debug()
            )),
            Some(c) if !c.eq_ignore_ascii_case(&self.file.sha256) => Err(format!(
                "its bytes hash to {}, not the {c} saved with it",
                self.file.sha256
            )),
            Some(_) => Ok(()),
        }
    }
}

/// The precondition of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Write whatever is there.
    None,
    /// Create only (`If-None-Match: *`).
    Absent,
    /// Replace only this version (`If-Match: <etag>`).
    Matches(String),
}

/// What became of a write.
#[derive(Debug)]
pub enum PutOutcome {
    /// Written; the new version tag.
    Written(String),
    /// The condition did not hold (HTTP 412): someone else wrote first.
    PreconditionFailed,
    /// A concurrent conflicting write (HTTP 409): try again.
    Conflict,
    /// The request may or may not have been applied (timeout, 5xx after
    /// send): read the key back to know.
    Unknown(anyhow::Error),
}

/// A registry store. The decision code never knows which one it talks to.
#[async_trait]
pub trait Store: Send + Sync {
    /// Lists the keys under `dir` (relative, ending in `/`).
    /// Only keys that sort after `start_after` (a full relative key), when
    /// given.
    async fn list(&self, dir: &str, start_after: Option<&str>) -> Result<Vec<Listed>>;
    /// [`Store::list`], stopping after the first page (S3: 1000 keys) at
    /// which `enough` holds for what is listed so far: a reader that needs
    /// a few keys pays a page, not the whole listing. A store without pages
    /// lists everything.
    async fn list_until(
        &self,
        dir: &str,
        start_after: Option<&str>,
        enough: &(dyn for<'x> Fn(&'x [Listed]) -> bool + Send + Sync),
    ) -> Result<Vec<Listed>> {
        let _ = enough;
        self.list(dir, start_after).await
    }
    /// One page of the keys under `dir` (S3: up to 1000), from `token`
    /// (`None`: the first page); the token of the next page, if any. For
    /// work whose memory must stay bounded by a page (the purge).
    async fn list_page(
        &self,
        dir: &str,
        token: Option<String>,
    ) -> Result<(Vec<Listed>, Option<String>)>;
    /// Reads one key; `None` when it does not exist. Bodies are cut after
    /// `MAX_BODY_BYTES + 1` bytes: enough to tell they are too big.
    async fn get(&self, key: &str) -> Result<Option<Object>>;
    /// Writes one key under a condition.
    async fn put(&self, key: &str, body: Vec<u8>, condition: Condition) -> Result<PutOutcome>;
    /// Deletes keys; returns the number of requests made.
    async fn delete(&self, keys: &[String]) -> Result<usize>;
    /// Writes the file at `path` to `key`, streamed (S3: multipart past
    /// one part), with its SHA-256 (hex) kept as the object's metadata
    /// `sha256`. For snapshots; never a registry record.
    async fn put_file(&self, key: &str, path: &Path, sha256: &str) -> Result<()>;
    /// Reads `key` into the file `dest`, streamed and hashed; `None` when
    /// the key does not exist.
    async fn get_file(&self, key: &str, dest: &Path) -> Result<Option<Fetched>>;
    /// The store's current time: what every age is measured against
    /// (DESIGN.md, Day-2 rules: one clock, the store's). For S3, the `Date`
    /// of its latest response, advanced by the time elapsed here since; for
    /// a directory, the time the file system stamps on a file written now.
    /// This host's clock only when the store cannot tell.
    async fn now(&self) -> DateTime<Utc>;
}

/// A parsed registry URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryUrl {
    /// `s3://bucket/prefix`
    S3 {
        /// Bucket name.
        bucket: String,
        /// Prefix without leading or trailing `/`; may be empty.
        prefix: String,
    },
    /// `file:///dir`
    File {
        /// Absolute directory.
        dir: std::path::PathBuf,
    },
}

impl RegistryUrl {
    /// Parses `s3://bucket/prefix` or `file:///dir`.
    pub fn parse(s: &str) -> Result<RegistryUrl> {
        let hint = "use s3://BUCKET/PREFIX or file:///ABSOLUTE/DIR";
        let url = url::Url::parse(s).map_err(|e| {
            usage(format!(
                "registry URL `{}` is malformed ({e}): {hint}",
                s.escape_debug()
            ))
        })?;
        match url.scheme() {
            "s3" => {
                let bucket = url.host_str().unwrap_or("").to_string();
                if !bucket_name_ok(&bucket) {
                    return Err(usage(format!(
                        "registry URL `{s}` has no valid bucket name: {hint}"
                    )));
                }
                if url.query().is_some() || url.fragment().is_some() {
                    return Err(usage(format!(
                        "registry URL `{s}` has a query or fragment: {hint}"
                    )));
                }
                let prefix = url.path().trim_matches('/').to_string();
                if prefix.split('/').any(|seg| seg == "." || seg == "..") || prefix.contains("//") {
                    return Err(usage(format!(
                        "registry URL `{s}` has an unusable prefix: {hint}"
                    )));
                }
                Ok(RegistryUrl::S3 { bucket, prefix })
            }
            "file" => {
                if url
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(usage(format!("registry URL `{s}` names a host: {hint}")));
                }
                let dir = url.to_file_path().map_err(|()| {
                    usage(format!("registry URL `{s}` is not a local path: {hint}"))
                })?;
                Ok(RegistryUrl::File { dir })
            }
            other => Err(usage(format!(
                "registry URL `{}` has unsupported scheme `{other}`: {hint}",
                s.escape_debug()
            ))),
        }
    }
}

impl fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RegistryUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            RegistryUrl::File { dir } => write!(f, "file://{}", dir.display()),
        }
    }
}

fn bucket_name_ok(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
}

/// Opens the store behind a registry URL.
pub async fn open(
    url: &RegistryUrl,
    aws: Option<&aws_config::SdkConfig>,
) -> Result<Box<dyn Store>> {
    match url {
        RegistryUrl::S3 { bucket, prefix } => {
            let config = aws
                .ok_or_else(|| anyhow::anyhow!("an s3:// registry needs the AWS configuration"))?;
            Ok(Box::new(S3Store::new(
                config,
                bucket.clone(),
                prefix.clone(),
            )))
        }
        RegistryUrl::File { dir } => Ok(Box::new(FileStore::open(dir)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            RegistryUrl::parse("s3://my-bucket/consul/prod/").unwrap(),
            RegistryUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "consul/prod".into()
            }
        );
        assert_eq!(
            RegistryUrl::parse("s3://my-bucket").unwrap(),
            RegistryUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            RegistryUrl::parse("file:///var/lib/reg").unwrap(),
            RegistryUrl::File {
                dir: "/var/lib/reg".into()
            }
        );
        for bad in [
            "",
            "my-bucket/x",
            "http://x/y",
            "s3:///x",
            "s3://B/x",
            "s3://b/../x",
            "file://host/x",
            "s3://ab/x",
        ] {
            let err = RegistryUrl::parse(bad).unwrap_err();
            assert_eq!(crate::error::exit_code(&err), 2, "{bad}");
        }
    }
}
