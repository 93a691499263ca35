//! The store's clock: every age in the registry is measured on it, never on
//! this host's (DESIGN.md, Day-2 rules). A reading taken from a response is
//! carried forward with this process's monotonic clock, which measures only
//! durations, and is right however far this host's wall clock is off.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use chrono::{DateTime, Utc};

/// The latest reading of a store's clock.
#[derive(Debug, Default)]
pub struct StoreClock {
    reading: Mutex<Option<(DateTime<Utc>, Instant)>>,
    warned: AtomicBool,
}

impl StoreClock {
    /// Records that the store said `at` just now. Readings only move the
    /// clock forward: responses to requests in flight at once may arrive
    /// in any order.
    pub fn observe(&self, at: DateTime<Utc>) {
        let now = Instant::now();
        let mut reading = self.reading.lock().unwrap_or_else(|e| e.into_inner());
        let newer = reading.is_none_or(|(t, seen)| at > t + (now - seen));
        if newer {
            *reading = Some((at, now));
        }
    }

    /// The store's time now, when it has been read.
    pub fn read(&self) -> Option<DateTime<Utc>> {
        let reading = *self.reading.lock().unwrap_or_else(|e| e.into_inner());
        reading.map(|(t, seen)| t + seen.elapsed())
    }

    /// The store's time now; this host's clock, with one warning, when the
    /// store never told its time.
    pub fn now_or_local(&self, what: &str) -> DateTime<Utc> {
        self.read().unwrap_or_else(|| {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "{what} did not tell its time: measuring ages on this host's clock, which must then be right"
                );
            }
            Utc::now()
        })
    }
}

/// Parses an HTTP `Date` header (`Wed, 25 Nov 2026 21:47:09 GMT`).
pub fn parse_http_date(value: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc2822(value.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        let t = parse_http_date("Wed, 25 Nov 2026 21:47:09 GMT").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-25T21:47:09+00:00");
        assert!(parse_http_date("yesterday").is_none());
    }

    #[test]
    fn the_clock_moves_forward_only() {
        let clock = StoreClock::default();
        assert!(clock.read().is_none());
        let t = parse_http_date("Wed, 25 Nov 2026 21:47:09 GMT").unwrap();
        clock.observe(t);
        clock.observe(t - chrono::Duration::seconds(30));
        let now = clock.read().unwrap();
        assert!(now >= t && now < t + chrono::Duration::seconds(5), "{now}");
    }
}
