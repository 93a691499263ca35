//! Retrying one step of a command within a deadline: exponential back-off
//! from half a second up to eight, never past the deadline, never for a
//! usage error (exit 2: retrying cannot fix a flag).

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::error::exit_code;

/// Runs `step` until it succeeds, fails with a usage error, or the next
/// attempt would start after `deadline`; the last error is returned.
pub async fn until<T, F, Fut>(deadline: Instant, what: &str, mut step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut delay = Duration::from_millis(500);
    loop {
        match step().await {
            Ok(v) => return Ok(v),
            Err(e) if exit_code(&e) != 2 && Instant::now() + delay < deadline => {
                tracing::warn!("{what} failed, trying again in {delay:?}: {e:#}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(8));
            }
            Err(e) => return Err(e),
        }
    }
}
