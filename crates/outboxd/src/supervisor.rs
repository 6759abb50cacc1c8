//! Keeps the relay's background tasks running. A task that ends while the relay runs, by a
//! panic or by returning early, is logged, counted (`outbox_relay_task_restarts_total`),
//! shown in `/health`, and started again after a backoff, so that no partition is ever left
//! silently unowned while the process lives. A task that ran for a while before it ended
//! restarts quickly again; one that keeps failing at once backs off up to `retry_max_ms`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::{Id, JoinError, JoinSet};

use crate::backoff::Backoff;
use crate::health::{Health, PartitionState};
use crate::shutdown::Shutdown;

/// One of the relay's background tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// The wake-up poller.
    Poller,
    /// The lease renewal.
    Leases,
    /// The sticky-mapping cleanup.
    MappingCleanup,
    /// The Kafka reachability watch.
    KafkaWatch,
    /// The backlog gauges.
    Backlog,
    /// The worker of one virtual partition.
    Worker(i32),
}

impl Task {
    /// The name used in logs, metrics and `/health`.
    pub fn name(self) -> &'static str {
        match self {
            Task::Poller => "wake-up poller",
            Task::Leases => "lease renewal",
            Task::MappingCleanup => "mapping cleanup",
            Task::KafkaWatch => "kafka watch",
            Task::Backlog => "backlog gauges",
            Task::Worker(_) => "partition worker",
        }
    }
}

/// A started task's future.
pub type TaskFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Starts a task's future (called again for every restart).
pub type Starter = Box<dyn Fn(Task) -> TaskFuture + Send + Sync>;

/// A task that ran at least this long before it ended restarts with the shortest backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// The relay's tasks, restarted when they end early.
pub struct Supervisor {
    tasks: JoinSet<()>,
    running: HashMap<Id, (Task, Instant)>,
    backoffs: HashMap<Task, Backoff>,
    restarts: HashMap<Task, u64>,
    retry: (Duration, Duration),
    health: Arc<Health>,
    shutdown: Shutdown,
    start: Starter,
}

impl Supervisor {
    /// A supervisor that starts tasks with `start`, restarts them with a backoff between
    /// `retry.0` and `retry.1`, reports to `health`, and stops restarting once shutdown is requested.
    pub fn new(
        start: Starter,
        retry: (Duration, Duration),
        health: Arc<Health>,
        shutdown: Shutdown,
    ) -> Self {
        Supervisor {
            tasks: JoinSet::new(),
            running: HashMap::new(),
            backoffs: HashMap::new(),
            restarts: HashMap::new(),
            retry,
            health,
            shutdown,
            start,
        }
    }

    /// Starts `task` now.
    pub fn spawn(&mut self, task: Task) {
        self.spawn_after(task, Duration::ZERO);
    }

    fn spawn_after(&mut self, task: Task, delay: Duration) {
        let future = (self.start)(task);
        let shutdown = self.shutdown.clone();
        let health = Arc::clone(&self.health);
        let handle = self.tasks.spawn(async move {
            if !delay.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.requested() => {}
                }
                if shutdown.is_requested() {
                    return;
                }
            }
            health.set_task(task.name(), None);
            future.await;
        });
        self.running.insert(handle.id(), (task, Instant::now()));
    }

    /// How many times `task` was restarted.
    pub fn restarts(&self, task: Task) -> u64 {
        self.restarts.get(&task).copied().unwrap_or(0)
    }

    /// Waits until a task ends and handles it: while the relay runs, a task that ends is
    /// reported and started again. Returns `false` when no task is left.
    pub async fn watch_next(&mut self) -> bool {
        let Some(ended) = self.tasks.join_next_with_id().await else {
            return false;
        };
        let (id, failure) = match ended {
            Ok((id, ())) => (id, "it returned".to_owned()),
            Err(e) => (e.id(), describe(&e)),
        };
        let Some((task, started)) = self.running.remove(&id) else {
            return true;
        };
        if self.shutdown.is_requested() {
            return true;
        }
        let restarts = {
            let n = self.restarts.entry(task).or_default();
            *n += 1;
            *n
        };
        let backoff = self
            .backoffs
            .entry(task)
            .or_insert_with(|| Backoff::new(self.retry.0, self.retry.1));
        if started.elapsed() >= HEALTHY_RUN {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let error = format!("{} ended unexpectedly: {failure}", task.name());
        tracing::error!(?task, restarts, ?delay, %error, "restarting the task");
        match task {
            Task::Worker(partition) => {
                metrics::counter!("outbox_relay_task_restarts_total",
                    "task" => task.name(), "partition" => partition.to_string())
                .increment(1);
                self.health.set(
                    partition,
                    PartitionState::Restarting {
                        error: error.clone(),
                        restarts,
                    },
                );
            }
            _ => {
                metrics::counter!("outbox_relay_task_restarts_total", "task" => task.name())
                    .increment(1);
            }
        }
        self.health.set_task(task.name(), Some(error));
        self.spawn_after(task, delay);
        true
    }

    /// Waits for every task to end, for at most `timeout`; aborts the rest. Returns true
    /// when they all ended in time.
    pub async fn drain(&mut self, timeout: Duration) -> bool {
        let ended = tokio::time::timeout(timeout, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        if !ended {
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        ended
    }
}

/// A panic's message, or why the task was cancelled.
fn describe(e: &JoinError) -> String {
    if e.is_panic() {
        // The payload is gone with `JoinError::is_panic`'s borrow; `Display` names the panic.
        format!("panic: {e}")
    } else {
        format!("cancelled: {e}")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A starter whose worker 0 panics on its first two starts and then runs until stopped.
    fn flaky(starts: Arc<AtomicU32>, shutdown: Shutdown) -> Starter {
        Box::new(move |task| {
            let n = starts.fetch_add(1, Ordering::SeqCst);
            let shutdown = shutdown.clone();
            Box::pin(async move {
                if task == Task::Worker(0) && n < 2 {
                    panic!("boom {n}");
                }
                shutdown.requested().await;
            })
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_reported_and_restarted_with_backoff() {
        let shutdown = Shutdown::new();
        let health = Arc::new(Health::default());
        let starts = Arc::new(AtomicU32::new(0));
        let mut s = Supervisor::new(
            flaky(Arc::clone(&starts), shutdown.clone()),
            (Duration::from_millis(100), Duration::from_secs(1)),
            Arc::clone(&health),
            shutdown.clone(),
        );
        s.spawn(Task::Worker(0));
        assert!(s.watch_next().await);
        assert_eq!(s.restarts(Task::Worker(0)), 1);
        assert!(
            matches!(
                health.snapshot().get(&0),
                Some(PartitionState::Restarting { restarts: 1, error }) if error.contains("boom 0")
            ),
            "{}",
            health.to_json()
        );
        assert!(!health.is_healthy(), "a restarting worker fails health");
        let before = tokio::time::Instant::now();
        assert!(s.watch_next().await);
        assert_eq!(s.restarts(Task::Worker(0)), 2);
        // The second restart waited for the backoff (at least half of the first delay).
        assert!(before.elapsed() >= Duration::from_millis(50));
        // The third start runs until stopped.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        shutdown.request();
        assert!(s.drain(Duration::from_secs(1)).await);
        assert_eq!(s.restarts(Task::Worker(0)), 2, "no restart after stop");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_returns_early_is_restarted_too() {
        let shutdown = Shutdown::new();
        let health = Arc::new(Health::default());
        let starts = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&starts);
        let mut s = Supervisor::new(
            Box::new(move |_| {
                counter.fetch_add(1, Ordering::SeqCst);
                Box::pin(async {})
            }),
            (Duration::from_millis(10), Duration::from_millis(10)),
            Arc::clone(&health),
            shutdown.clone(),
        );
        s.spawn(Task::Poller);
        assert!(s.watch_next().await);
        assert!(
            health
                .to_json()
                .contains("wake-up poller ended unexpectedly")
        );
        assert!(s.watch_next().await);
        assert_eq!(s.restarts(Task::Poller), 2);
        shutdown.request();
        s.drain(Duration::from_secs(1)).await;
        assert!(starts.load(Ordering::SeqCst) >= 2);
    }
}
