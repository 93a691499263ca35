//! The check that the registry honours conditional writes.

use anyhow::Result;
use serde_json::json;

use crate::error::usage;
use crate::registry::{Condition, PutOutcome, Store};
use crate::retry::Backoff;

/// A version tag no store ever gives.
const PROBE_TAG: &str = "\"auto-consul-probe-matches-nothing\"";
/// The key written to check that the store honours conditional writes.
const PROBE_KEY: &str = "cas-probe";

/// Checks the store honours create-only writes; `Ok(true)` means it does
/// not and the operator accepted the racy fallback.
pub(super) async fn check_conditional_writes(store: &dyn Store, allow_racy: bool) -> Result<bool> {
    // Both headers are checked, at once. A write under If-Match of a tag no
    // store gives must fail, whether the key exists (412) or not (404). A
    // create-only write must fail once the key exists; the very first one
    // on a new registry creates it, and only then is a second one needed.
    let body = json!({ "probe": "conditional writes must be honoured" })
        .to_string()
        .into_bytes();
    let put = |condition: Condition| {
        let body = body.clone();
        async move {
            let mut backoff = Backoff::CONTENTION;
            for _ in 0..3 {
                match store
                    .put(PROBE_KEY, body.clone(), condition.clone())
                    .await?
                {
                    PutOutcome::Conflict => tokio::time::sleep(backoff.delay()).await,
                    PutOutcome::Unknown(err) => return Err(err),
                    PutOutcome::PreconditionFailed => return Ok(true),
                    PutOutcome::Written(_) => return Ok(false),
                }
            }
            anyhow::bail!(
                "checking that the registry honours conditional writes: conflicts every time; run again"
            )
        }
    };
    let (if_match_refused, create_refused) = tokio::try_join!(
        put(Condition::Matches(PROBE_TAG.into())),
        put(Condition::Absent)
    )?;
    let honoured = if_match_refused && (create_refused || put(Condition::Absent).await?);
    if honoured {
        return Ok(false);
    }
    if allow_racy {
        tracing::warn!(
            "the registry ignores conditional writes: using the original, racy decision (--allow-racy); \
             nodes booting at once may bootstrap two clusters"
        );
        return Ok(true);
    }
    Err(usage(
        "the registry ignores conditional writes (a write under If-Match of a version that does not exist, \
         or a create-only write of an existing key, succeeded), so two nodes booting at once could both \
         bootstrap: use S3 or a store that honours If-None-Match and If-Match, or pass --allow-racy to \
         accept the original racy behaviour",
    ))
}
