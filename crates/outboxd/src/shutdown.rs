//! The relay's one shutdown signal: a token every task, loop, tick and backoff sleep obeys,
//! so that SIGTERM ends all of them promptly, whatever each was waiting for. (A cloneable
//! cancellation token from tokio-util, as mini-redis passes its `Shutdown` around.)

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Asks for, and tells about, the relay's shutdown. Clones share one signal.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    /// A signal nobody has given yet.
    pub fn new() -> Self {
        Shutdown(CancellationToken::new())
    }

    /// Asks every holder to stop (idempotent).
    pub fn request(&self) {
        self.0.cancel();
    }

    /// True once shutdown was requested.
    pub fn is_requested(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once shutdown is requested (at once if it already was). Cancel-safe.
    pub async fn requested(&self) {
        self.0.cancelled().await;
    }

    /// Sleeps for `d`, or less when shutdown is requested meanwhile; true when it was.
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = self.0.cancelled() => {}
        }
        self.is_requested()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_sleep_ends_when_shutdown_is_requested() {
        let shutdown = Shutdown::new();
        let sleeper = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                (
                    shutdown.sleep(Duration::from_secs(3600)).await,
                    started.elapsed(),
                )
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        shutdown.request();
        let (stopped, slept) = sleeper.await.expect("sleeper");
        assert!(stopped);
        assert_eq!(slept, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_sleep_reports_no_shutdown_and_a_late_holder_sees_it_at_once() {
        let shutdown = Shutdown::new();
        assert!(!shutdown.sleep(Duration::from_secs(5)).await);
        shutdown.request();
        let late = shutdown.clone();
        assert!(late.is_requested());
        late.requested().await;
        assert!(late.sleep(Duration::from_secs(5)).await);
    }
}
