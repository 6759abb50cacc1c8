//! The run's clock and its log lines: every line the harness prints while it runs carries
//! the seconds since the run started, so faults, writer trouble and relay exits can be put
//! side by side with the relays' own logs.

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
