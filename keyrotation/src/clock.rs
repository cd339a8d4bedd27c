//! Time, injectable: the life cycle is tested over months without waiting.

use std::sync::{Arc, Mutex, PoisonError};

use time::OffsetDateTime;

/// A source of the current instant.
pub trait Clock: Send + Sync + 'static {
    /// The current instant (UTC).
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that only moves when told to. Clones share the same instant, so a test can hand
/// one clone to the code under test and move time with another.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<OffsetDateTime>>,
}

// === impl ManualClock ===

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Moves the clock to `instant` (backwards too: tests may need it).
    pub fn set(&self, instant: OffsetDateTime) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = instant;
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: time::Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn manual_clock_clones_share_the_instant() {
        let clock = ManualClock::new(datetime!(2030-01-01 0:00 UTC));
        let other = clock.clone();
        other.advance(time::Duration::days(3));
        assert_eq!(clock.now(), datetime!(2030-01-04 0:00 UTC));
        clock.set(datetime!(2029-12-31 0:00 UTC));
        assert_eq!(other.now(), datetime!(2029-12-31 0:00 UTC));
    }
}
