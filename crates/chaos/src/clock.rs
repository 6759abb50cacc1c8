//! The run's clock and its log lines: every line the harness prints while it runs carries
//! the seconds since the run started, so faults, writer trouble and relay exits can be put
//! side by side with the relays' own logs. Instants that the checker compares with
//! PostgreSQL's and the broker's timestamps are taken on the wall clock ([`unix_us`]).

use std::time::{Duration, Instant};

/// When the run started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn start() -> Self {
        Clock {
            start: Instant::now(),
        }
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The instant `offset` after the start.
    pub fn at(&self, offset: Duration) -> Instant {
        self.start + offset
    }

    /// Prints `[chaos +12.3s] message` to stderr.
    pub fn say(&self, message: impl std::fmt::Display) {
        eprintln!("[chaos +{:.1}s] {message}", self.elapsed().as_secs_f64());
    }
}

/// Now on the wall clock, in microseconds since the epoch: the clock PostgreSQL's `now()`
/// and the broker's append times use (all on this machine).
pub fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}
