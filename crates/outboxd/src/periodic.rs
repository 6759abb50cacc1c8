//! The loop shape shared by the relay's periodic tasks (wake-up poller, mapping cleanup):
//! run every `interval`, never catch up on missed ticks in a burst, and end promptly when
//! shutdown is requested.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior};

/// Ticks every `interval` until `stop` turns true.
pub struct Periodic {
    ticker: Interval,
    stop: watch::Receiver<bool>,
}

impl Periodic {
    /// Starts ticking; the first tick is immediate.
    pub fn new(interval: Duration, stop: watch::Receiver<bool>) -> Self {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Periodic { ticker, stop }
    }

    /// Waits for the next tick; false when shutdown was requested instead.
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.ticker.tick() => {}
            _ = self.stop.changed() => {}
        }
        !*self.stop.borrow()
    }
}
