//! Faults a test can inject into a running relay: a panic in a partition worker (what
//! supervision must survive; no input can cause one on purpose), and a worker held between
//! publishing a batch and writing its outcome (a pause at the worst moment, to prove
//! fencing).
//! Production code never arms anything; an unarmed check is one atomic load.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Faults armed by a test; see [`crate::Relay::faults`].
#[derive(Debug, Default)]
pub struct Faults {
    armed: AtomicBool,
    panic_partitions: Mutex<HashSet<i32>>,
    hold_partitions: Mutex<HashSet<i32>>,
    holding: AtomicBool,
    release: Notify,
}

impl Faults {
    /// Makes the worker of `partition` panic once, before its next batch.
    pub fn panic_worker_once(&self, partition: i32) {
        lock(&self.panic_partitions).insert(partition);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Makes the worker of `partition` wait, once, after it published its next batch and
    /// before it writes its outcome to the database (retires the batch, or moves a refused
    /// message aside), until [`Faults::release_write`].
    pub fn hold_before_write(&self, partition: i32) {
        lock(&self.hold_partitions).insert(partition);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// True while a worker waits in [`Faults::hold_before_write`].
    pub fn holding_before_write(&self) -> bool {
        self.holding.load(Ordering::SeqCst)
    }

    /// Lets the held worker go on.
    pub fn release_write(&self) {
        self.release.notify_waiters();
    }

    /// Called by the worker of `partition` before it retires a published batch or moves a
    /// refused message aside.
    pub(crate) async fn before_write(&self, partition: i32) {
        if !self.armed.load(Ordering::Relaxed) || !lock(&self.hold_partitions).remove(&partition) {
            return;
        }
        let released = self.release.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        self.holding.store(true, Ordering::SeqCst);
        released.await;
        self.holding.store(false, Ordering::SeqCst);
    }

    /// Called by the worker of `partition` before each batch.
    pub(crate) fn before_batch(&self, partition: i32) {
        if !self.armed.load(Ordering::Relaxed) {
            return;
        }
        let fire = lock(&self.panic_partitions).remove(&partition);
        if fire {
            panic!("fault injected by a test: worker of partition {partition} panics");
        }
    }
}

fn lock(m: &Mutex<HashSet<i32>>) -> std::sync::MutexGuard<'_, HashSet<i32>> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
