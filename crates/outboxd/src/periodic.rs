//! The loop shape shared by the relay's periodic tasks (wake-up poller, mapping cleanup):
//! run every `interval`, never catch up on missed ticks in a burst, and end promptly when
//! shutdown is requested.

use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};

use crate::shutdown::Shutdown;

/// Ticks every `interval` until shutdown is requested.
pub struct Periodic {
    ticker: Interval,
    shutdown: Shutdown,
}

impl Periodic {
    /// Starts ticking; the first tick is immediate.
    pub fn new(interval: Duration, shutdown: Shutdown) -> Self {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Periodic { ticker, shutdown }
    }

    /// Waits for the next tick; false when shutdown was requested instead.
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.ticker.tick() => {}
            () = self.shutdown.requested() => {}
        }
        !self.shutdown.is_requested()
    }

    /// The shutdown signal this loop obeys (for its backoff sleeps).
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ticks_end_and_backoff_sleeps_are_cut_short_on_shutdown() {
        let shutdown = Shutdown::new();
        let mut periodic = Periodic::new(Duration::from_secs(60), shutdown.clone());
        assert!(periodic.tick().await, "the first tick is immediate");
        let started = tokio::time::Instant::now();
        let stopper = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                shutdown.request();
            })
        };
        // A backoff sleep of the loop (the poller's after a failed query) ends with it.
        assert!(periodic.shutdown().sleep(Duration::from_secs(600)).await);
        assert!(!periodic.tick().await);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        stopper.await.expect("stopper");
    }
}
