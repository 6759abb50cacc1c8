//! Faults a test can inject into a running relay, to prove that supervision works: a panic in
//! a partition worker is exactly what supervision must survive, and no input can cause one on
//! purpose. Production code never arms anything; an unarmed check is one atomic load.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Faults armed by a test; see [`crate::Relay::faults`].
#[derive(Debug, Default)]
pub struct Faults {
    armed: AtomicBool,
    panic_partitions: Mutex<HashSet<i32>>,
}

impl Faults {
    /// Makes the worker of `partition` panic once, before its next batch.
    pub fn panic_worker_once(&self, partition: i32) {
        self.lock().insert(partition);
        self.armed.store(true, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        match self.panic_partitions.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Called by the worker of `partition` before each batch.
    pub(crate) fn before_batch(&self, partition: i32) {
        if !self.armed.load(Ordering::Relaxed) {
            return;
        }
        let fire = self.lock().remove(&partition);
        if fire {
            panic!("fault injected by a test: worker of partition {partition} panics");
        }
    }
}
