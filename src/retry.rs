//! The one retry policy of every loop that tries again: exponential
//! back-off with jitter, bounded by an overall deadline. The steps differ
//! only in their first delay and cap ([`Backoff`]'s constants); the
//! deadline is the command's (the heartbeat's run, `--imds-timeout`, the
//! lock wait), and no attempt starts after it.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::error::exit_code;

/// Delays that double from `first` up to `cap`; each one drawn between half
/// and all of the current step, so nodes that failed together do not try
/// again together.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    cap: Duration,
}

impl Backoff {
    /// A command's step against a service that is down or not up yet (the
    /// local Consul agent, S3 past the SDK's own retries): 0.5 s to 8 s.
    pub const SERVICE: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
    /// Contention on one registry key (409, a claim lost to another node,
    /// an election round lost): short, many nodes are at it at once.
    pub const CONTENTION: Backoff =
        Backoff::new(Duration::from_millis(25), Duration::from_millis(800));
    /// The instance metadata service, not answering yet at boot.
    pub const IMDS: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    /// A local file lock held by another process.
    pub const LOCK: Backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(100));

    /// Delays from `first`, doubling up to `cap`.
    pub const fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff { step: first, cap }
    }

    /// The delay before the next attempt; the step then doubles.
    pub fn delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.cap);
        let half = step / 2;
        half + half.mul_f64(jitter())
    }

    /// The delay before the next attempt, or `None` when that attempt
    /// would start at or after `deadline`.
    pub fn delay_within(&mut self, deadline: Instant) -> Option<Duration> {
        let delay = self.delay();
        (Instant::now() + delay < deadline).then_some(delay)
    }

    /// Sleeps the next delay; false (and no sleep) when the attempt after
    /// it would start at or after `deadline`.
    pub async fn sleep_within(&mut self, deadline: Instant) -> bool {
        match self.delay_within(deadline) {
            Some(delay) => {
                tokio::time::sleep(delay).await;
                true
            }
            None => false,
        }
    }
}

/// A number in [0, 1) from the OS's randomness (through a v4 UUID).
fn jitter() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

/// Runs `step` until it succeeds, fails with a usage error (exit 2:
/// retrying cannot fix a flag), or the next attempt would start after
/// `deadline`; the last error is returned. Back-off: [`Backoff::SERVICE`].
pub async fn until<T, F, Fut>(deadline: Instant, what: &str, mut step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut backoff = Backoff::SERVICE;
    loop {
        match step().await {
            Ok(v) => return Ok(v),
            Err(e) if exit_code(&e) != 2 => match backoff.delay_within(deadline) {
                Some(delay) => {
                    tracing::warn!("{what} failed, trying again in {delay:.1?}: {e:#}");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_inside_each_step() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let steps = [100u64, 200, 400, 400, 400];
        for step in steps {
            let d = b.delay();
            let step = Duration::from_millis(step);
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
        }
        // Not all the same: the jitter draws.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let draws: std::collections::HashSet<Duration> = (0..20).map(|_| b.delay()).collect();
        assert!(draws.len() > 1);
    }

    #[test]
    fn no_delay_reaches_past_the_deadline() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        assert_eq!(
            b.delay_within(Instant::now() + Duration::from_secs(1)),
            None
        );
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(10));
        assert!(
            b.delay_within(Instant::now() + Duration::from_secs(5))
                .is_some()
        );
    }

    #[tokio::test]
    async fn until_stops_at_the_deadline_and_at_a_usage_error() {
        let tries = std::sync::atomic::AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_millis(1200);
        let r: Result<()> = until(deadline, "test", || {
            tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { anyhow::bail!("down") }
        })
        .await;
        assert!(r.is_err());
        // 0.25-0.5 s, then 0.5-1 s: two or three attempts fit in 1.2 s.
        let n = tries.load(std::sync::atomic::Ordering::SeqCst);
        assert!((2..=3).contains(&n), "{n} attempts");
        let tries = std::sync::atomic::AtomicU32::new(0);
        let r: Result<()> = until(Instant::now() + Duration::from_secs(60), "test", || {
            tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Err(crate::error::usage("bad flag")) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(tries.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
