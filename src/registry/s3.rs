//! The S3 registry store: ListObjectsV2, GetObject, conditional PutObject and
//! batched DeleteObjects under one prefix.

use anyhow::{Context, Result};
use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::primitives::Length;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use chrono::{DateTime, Utc};
use std::path::Path;

use std::sync::Arc;

use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};

use super::clock::{StoreClock, parse_http_date};
use super::{Condition, Fetched, Listed, Object, PutOutcome, Store};
use crate::error::usage_because;
use crate::model::MAX_BODY_BYTES;

/// S3 allows at most this many keys in one DeleteObjects request.
const DELETE_BATCH: usize = 1000;
/// DeleteObjects requests in flight at once.
const DELETE_CONCURRENCY: usize = 4;

/// A registry under `s3://bucket/prefix`.
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    clock: Arc<StoreClock>,
}

/// Reads S3's clock off the `Date` header of every response, errors
/// included.
#[derive(Debug)]
struct ReadDate(Arc<StoreClock>);

impl Intercept for ReadDate {
    fn name(&self) -> &'static str {
        "auto-consul: the store's clock"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if let Some(at) = context
            .response()
            .headers()
            .get("date")
            .and_then(parse_http_date)
        {
            self.0.observe(at);
        }
        Ok(())
    }
}

impl S3Store {
    /// A store on `bucket`/`prefix`. A custom endpoint (S3-compatible
    /// servers, the test suite) gets path-style addressing.
    pub fn new(config: &aws_config::SdkConfig, bucket: String, prefix: String) -> S3Store {
        let custom_endpoint = config.endpoint_url().is_some()
            || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some()
            || std::env::var_os("AWS_ENDPOINT_URL").is_some();
        let clock = Arc::new(StoreClock::default());
        let s3_config = aws_sdk_s3::config::Builder::from(config)
            .force_path_style(custom_endpoint)
            .interceptor(ReadDate(clock.clone()))
            .build();
        S3Store {
            client: Client::from_conf(s3_config),
            bucket,
            prefix,
            clock,
        }
    }

    /// The region of the bucket (`GetBucketLocation`, answered in any
    /// region; S3's empty answer is `us-east-1`, its legacy `EU`
    /// `eu-west-1`).
    pub async fn bucket_region(config: &aws_config::SdkConfig, bucket: &str) -> Result<String> {
        let store = S3Store::new(config, bucket.to_string(), String::new());
        let out = store
            .client
            .get_bucket_location()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(aws_sdk_s3::error::DisplayErrorContext(e))
                    .context(format!("GetBucketLocation of bucket {bucket}"))
            })?;
        Ok(match out.location_constraint().map(|c| c.as_str()) {
            None | Some("") => "us-east-1".to_string(),
            Some("EU") => "eu-west-1".to_string(),
            Some(r) => r.to_string(),
        })
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.full_key(key))
    }
}

impl S3Store {
    /// One DeleteObjects request; keys S3 could not delete are warned about.
    async fn delete_batch(&self, batch: &[String]) -> Result<()> {
        let objects = batch
            .iter()
            .map(|k| ObjectIdentifier::builder().key(self.full_key(k)).build())
            .collect::<Result<Vec<_>, _>>()
            .context("building a DeleteObjects request")?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .context("building a DeleteObjects request")?;
        let resp = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| {
                explain(
                    e,
                    format!("deleting {} keys under {}", batch.len(), self.url("")),
                    ("s3:DeleteObject", batch.first().map_or("", |k| k.as_str())),
                )
            })?;
        for err in resp.errors() {
            tracing::warn!(
                "could not delete {}: {}",
                err.key().unwrap_or("?"),
                err.message().unwrap_or("no message")
            );
        }
        Ok(())
    }
}

/// Turns an SDK error into one that says what failed and what to do.
/// `access`: the IAM action the request needed and the registry key (or
/// directory) it was on, relative to the prefix: a denial names both, and
/// which of the module's roles grants it.
fn explain<E>(err: SdkError<E>, what: String, access: (&str, &str)) -> anyhow::Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    // The chain's messages, plus what only the raw response says: its HTTP
    // status (an empty 403 or a proxy's HTML page has no other) and, on a
    // region mismatch, the bucket's region.
    let raw = match &err {
        SdkError::ServiceError(ctx) => Some(ctx.raw()),
        SdkError::ResponseError(ctx) => Some(ctx.raw()),
        _ => None,
    };
    let mut detail = crate::error::messages(&err);
    if let Some(raw) = raw {
        detail = format!("HTTP {}: {detail}", raw.status().as_u16());
        if let Some(region) = raw.headers().get("x-amz-bucket-region") {
            detail.push_str(&format!(
                " (the bucket is in region {region}: set AWS_REGION={region})"
            ));
        }
    }
    match &err {
        SdkError::ServiceError(ctx) => match ctx.err().code() {
            Some("NoSuchBucket") => usage_because(
                format!("{what}: the bucket does not exist; create it or fix --registry"),
                anyhow::anyhow!(detail),
            ),
            Some("AccessDenied") => {
                let (action, key) = access;
                anyhow::anyhow!(detail).context(format!(
                    "{what}: access denied: {action} on {key} {}; check this instance's role (docs/deploy.md)",
                    who_may(action, key)
                ))
            }
            Some("InvalidAccessKeyId") | Some("SignatureDoesNotMatch") => {
                anyhow::anyhow!(detail).context(format!(
                    "{what}: access denied: the credentials are not valid; check the instance role's S3 permissions on the registry prefix"
                ))
            }
            _ => anyhow::anyhow!(detail).context(what),
        },
        // The SDK reports a request it could not sign for want of
        // credentials as a dispatch failure: say so, not "unreachable".
        SdkError::DispatchFailure(_) if detail.contains("credentials") => {
            anyhow::anyhow!(detail).context(format!(
                "{what}: no AWS credentials: on EC2, give the instance a profile with a role \
                 (docs/deploy.md); elsewhere set AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ))
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => anyhow::anyhow!(detail).context(format!(
            "{what}: the S3 endpoint cannot be reached; check the network, AWS_ENDPOINT_URL and the region"
        )),
        SdkError::ConstructionFailure(_) => anyhow::anyhow!(detail).context(format!(
            "{what}: the request could not be built; check AWS_REGION and the credentials"
        )),
        _ => anyhow::anyhow!(detail).context(what),
    }
}

/// Which of the roles in the Terraform module (policies/*.json.tftpl) may
/// do `action` on registry key `key`: the servers' write slots, servers'
/// heartbeats and the cluster record; both may read the registry and
/// write agents' heartbeats.
fn who_may(action: &str, key: &str) -> &'static str {
    let servers_only = ["slots/", "servers/", "cluster", "snapshots/"]
        .iter()
        .any(|p| key.starts_with(p));
    match action {
        "s3:PutObject" | "s3:DeleteObject" if servers_only => {
            "is granted to the servers' role only (an agent never writes there)"
        }
        _ => "is granted to both the servers' and the agents' roles",
    }
}

fn to_chrono(t: Option<&aws_sdk_s3::primitives::DateTime>) -> Option<DateTime<Utc>> {
    let t = t?;
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

#[async_trait]
impl Store for S3Store {
    async fn list(&self, dir: &str, start_after: Option<&str>) -> Result<Vec<Listed>> {
        self.list_until(dir, start_after, &|_| false).await
    }

    async fn list_until(
        &self,
        dir: &str,
        start_after: Option<&str>,
        enough: &(dyn for<'x> Fn(&'x [Listed]) -> bool + Send + Sync),
    ) -> Result<Vec<Listed>> {
        let full = self.full_key(dir);
        let strip = self.full_key("");
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .set_start_after(start_after.map(|k| self.full_key(k)))
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| {
                explain(
                    e,
                    format!("listing {}", self.url(dir)),
                    ("s3:ListBucket", dir),
                )
            })?;
            for obj in page.contents() {
                let Some(key) = obj.key() else { continue };
                let Some(rel) = key.strip_prefix(&strip) else {
                    continue;
                };
                let Some(last_modified) = to_chrono(obj.last_modified()) else {
                    tracing::warn!("skipping registry key {rel}: listed without a time");
                    continue;
                };
                out.push(Listed {
                    key: rel.to_string(),
                    last_modified,
                });
            }
            if enough(&out) {
                break;
            }
        }
        Ok(out)
    }

    async fn list_page(
        &self,
        dir: &str,
        token: Option<String>,
    ) -> Result<(Vec<Listed>, Option<String>)> {
        let strip = self.full_key("");
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full_key(dir))
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| {
                explain(
                    e,
                    format!("listing {}", self.url(dir)),
                    ("s3:ListBucket", dir),
                )
            })?;
        let items = page
            .contents()
            .iter()
            .filter_map(|obj| {
                let rel = obj.key()?.strip_prefix(&strip)?;
                Some(Listed {
                    key: rel.to_string(),
                    last_modified: to_chrono(obj.last_modified())?,
                })
            })
            .collect();
        let next = page
            .is_truncated()
            .unwrap_or(false)
            .then(|| page.next_continuation_token().map(str::to_string))
            .flatten();
        Ok((items, next))
    }

    async fn get(&self, key: &str) -> Result<Option<Object>> {
        let Some(resp) = self.get_object(key, "reading").await? else {
            return Ok(None);
        };
        let etag = resp.e_tag().unwrap_or_default().to_string();
        // Without a time, the object counts as written now: fresh, never
        // taken for expired.
        let last_modified =
            to_chrono(resp.last_modified()).unwrap_or_else(|| self.clock.now_or_local("S3"));
        // Registry bodies are small; a huge one is junk, and is not
        // downloaded past the point where that is known.
        let mut body = Vec::new();
        let mut stream = resp.body;
        while body.len() <= MAX_BODY_BYTES {
            match stream
                .try_next()
                .await
                .with_context(|| format!("reading the body of {}", self.url(key)))?
            {
                Some(chunk) => body.extend_from_slice(&chunk),
                None => break,
            }
        }
        body.truncate(MAX_BODY_BYTES + 1);
        Ok(Some(Object {
            body,
            etag,
            last_modified,
        }))
    }

    async fn put(&self, key: &str, body: Vec<u8>, condition: Condition) -> Result<PutOutcome> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_type("application/json")
            .body(ByteStream::from(body));
        let conditional = condition != Condition::None;
        req = match condition {
            Condition::None => req,
            Condition::Absent => req.if_none_match("*"),
            Condition::Matches(etag) => req.if_match(etag),
        };
        match req.send().await {
            Ok(resp) => Ok(PutOutcome::Written(
                resp.e_tag().unwrap_or_default().to_string(),
            )),
            Err(SdkError::ServiceError(ctx)) => {
                let status = ctx.raw().status().as_u16();
                let code = ctx.err().code().unwrap_or_default().to_string();
                match (status, code.as_str()) {
                    (412, _) | (_, "PreconditionFailed") => Ok(PutOutcome::PreconditionFailed),
                    // If-Match on a key that does not exist.
                    (404, "NoSuchKey") if conditional => Ok(PutOutcome::PreconditionFailed),
                    (409, _) | (_, "ConditionalRequestConflict") => Ok(PutOutcome::Conflict),
                    (s, _) if s >= 500 => Ok(PutOutcome::Unknown(explain(
                        SdkError::ServiceError(ctx),
                        format!("writing {}", self.url(key)),
                        ("s3:PutObject", key),
                    ))),
                    _ => Err(explain(
                        SdkError::ServiceError(ctx),
                        format!("writing {}", self.url(key)),
                        ("s3:PutObject", key),
                    )),
                }
            }
            Err(
                e @ (SdkError::TimeoutError(_)
                | SdkError::ResponseError(_)
                | SdkError::DispatchFailure(_)),
            ) => {
                // A dispatch failure may have happened after the body was sent.
                Ok(PutOutcome::Unknown(explain(
                    e,
                    format!("writing {}", self.url(key)),
                    ("s3:PutObject", key),
                )))
            }
            Err(e) => Err(explain(
                e,
                format!("writing {}", self.url(key)),
                ("s3:PutObject", key),
            )),
        }
    }

    async fn delete(&self, keys: &[String]) -> Result<usize> {
        use futures::stream::{self, StreamExt, TryStreamExt};
        let requests = keys.len().div_ceil(DELETE_BATCH);
        // By index: a closure over borrowed slices trips async-trait's
        // lifetimes.
        stream::iter(0..requests)
            .map(|i| {
                self.delete_batch(&keys[i * DELETE_BATCH..((i + 1) * DELETE_BATCH).min(keys.len())])
            })
            .buffer_unordered(DELETE_CONCURRENCY)
            .try_collect::<()>()
            .await?;
        Ok(requests)
    }

    async fn put_file(&self, key: &str, path: &Path, sha256: &str) -> Result<()> {
        let size = tokio::fs::metadata(path)
            .await
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        if size <= PART_BYTES {
            let body = file_part(path, 0, size).await?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .content_type(SNAPSHOT_TYPE)
                .metadata("sha256", sha256)
                .body(body)
                .send()
                .await
                .map_err(|e| self.upload_error(key, e))?;
            return Ok(());
        }
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_type(SNAPSHOT_TYPE)
            .metadata("sha256", sha256)
            .send()
            .await
            .map_err(|e| self.upload_error(key, e))?;
        let id = upload
            .upload_id()
            .context("S3 started a multipart upload without an id")?
            .to_string();
        let parts = self.upload_parts(key, &id, path, size).await;
        let done = match parts {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .upload_id(&id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.upload_error(key, e)),
            Err(e) => Err(e),
        };
        if done.is_err() {
            // Parts left behind cost storage: dropped now (the module's
            // lifecycle rule also aborts incomplete uploads).
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .upload_id(&id)
                .send()
                .await;
        }
        done
    }

    async fn get_file(&self, key: &str, dest: &Path) -> Result<Option<Fetched>> {
        let Some(resp) = self.get_object(key, "downloading").await? else {
            return Ok(None);
        };
        let claimed = resp
            .metadata()
            .and_then(|m| m.get("sha256"))
            .map(|s| s.trim().to_string());
        let mut spool = crate::spool::Spool::create(dest).await?;
        let mut body = resp.body;
        while let Some(chunk) = body
            .try_next()
            .await
            .with_context(|| format!("downloading {}", self.url(key)))?
        {
            spool.write(&chunk).await?;
        }
        Ok(Some(Fetched {
            file: spool.finish().await?,
            claimed,
        }))
    }

    async fn now(&self) -> DateTime<Utc> {
        self.clock.now_or_local(&format!("S3 ({})", self.url("")))
    }
}

/// A multipart upload's part size: the file is read a part at a time,
/// streamed (memory stays far below it); 10 000 parts make 160 GiB.
const PART_BYTES: u64 = 16 * 1024 * 1024;
/// What a Consul snapshot is (`GET /v1/snapshot`'s Content-Type).
const SNAPSHOT_TYPE: &str = "application/x-gzip";

/// `length` bytes of the file at `path` from `offset`, streamed.
async fn file_part(path: &Path, offset: u64, length: u64) -> Result<ByteStream> {
    ByteStream::read_from()
        .path(path)
        .offset(offset)
        .length(Length::Exact(length))
        .build()
        .await
        .with_context(|| format!("reading {}", path.display()))
}

impl S3Store {
    /// `GetObject` on `key`: `None` when it does not exist; an error that
    /// says what was being done (`what`: "reading", "downloading").
    async fn get_object(
        &self,
        key: &str,
        what: &str,
    ) -> Result<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(resp) => Ok(Some(resp)),
            Err(SdkError::ServiceError(ctx))
                if matches!(ctx.err(), GetObjectError::NoSuchKey(_)) =>
            {
                Ok(None)
            }
            Err(e) => Err(explain(
                e,
                format!("{what} {}", self.url(key)),
                ("s3:GetObject", key),
            )),
        }
    }

    fn upload_error<E>(&self, key: &str, err: SdkError<E>) -> anyhow::Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        explain(
            err,
            format!("uploading {}", self.url(key)),
            ("s3:PutObject", key),
        )
    }

    /// Uploads the parts of `path` one after the other.
    async fn upload_parts(
        &self,
        key: &str,
        id: &str,
        path: &Path,
        size: u64,
    ) -> Result<Vec<CompletedPart>> {
        let mut parts = Vec::new();
        let mut offset = 0;
        let mut number = 1;
        while offset < size {
            let length = PART_BYTES.min(size - offset);
            let body = file_part(path, offset, length).await?;
            let resp = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .upload_id(id)
                .part_number(number)
                .body(body)
                .send()
                .await
                .map_err(|e| {
                    explain(
                        e,
                        format!("uploading part {number} of {}", self.url(key)),
                        ("s3:PutObject", key),
                    )
                })?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(resp.e_tag().map(str::to_string))
                    .build(),
            );
            offset += length;
            number += 1;
        }
        Ok(parts)
    }
}
