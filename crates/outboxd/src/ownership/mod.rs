//! Who works which partition: leases with epochs, one assignment every instance computes the
//! same way, and fencing.
//!
//! **Leases.** Ownership is recorded in `partition_lease`: per partition an owner instance,
//! an epoch that only grows (every claim bumps it) and an expiry. Each instance renews its
//! leases, and its own registration in `relay_instance`, from a task of its own
//! (`leases::run`), every third of the TTL, so a busy partition cannot starve the renewal.
//!
//! **One view, one rule.** About twice a second the wake-up poller reads one view for
//! everyone: the live instances in id order (an instance is alive while its registration has
//! not expired and its lease session holds its advisory lock, so a killed process drops out
//! at once and a paused one after the TTL), the partition count, and the partitions at or
//! above it that still hold messages. The partitions that need an owner are dealt out to the
//! live instances in turn (`assignment`): every instance computes the same owner for every
//! partition, and the numbers per instance differ by at most one. No coordinator is elected,
//! so there is no election to lose or to wait for.
//!
//! **Claim and hand-over.** A worker claims its partition's lease only when the view makes
//! its instance the owner, and the claim succeeds only when the lease is free, expired, its
//! own, or held by an instance that is no longer alive. A worker whose instance is no longer
//! the owner (one joined, the count changed) releases the lease between batches, so the new
//! owner's next claim (every half second while it waits) gets it at once. A graceful exit
//! releases everything; a dead instance's leases are taken when it drops out of the view; a
//! paused instance's when they expire.
//!
//! **Fencing.** A worker retires rows only in a statement that share-locks its lease row
//! with its own epoch (`sql::retire`): after a takeover it retires nothing and stops.
//! It also stops reading once its lease has not been renewed for the TTL by its own clock,
//! which runs out before the database lets another instance take it.

pub mod assignment;
pub mod leases;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use assignment::View;

/// A lease this instance holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The epoch the claim got.
    pub epoch: i64,
    /// Until when this instance may act on it, by its own clock: the TTL after the last
    /// claim or renewal was sent (the database's expiry comes later).
    pub valid_until: Instant,
    /// When it was last claimed or renewed.
    pub renewed_at: Instant,
}

/// This instance's identity, the shared view, and the leases it holds.
#[derive(Debug)]
pub struct Ownership {
    instance: String,
    ttl: Duration,
    view: watch::Sender<Option<Arc<View>>>,
    held: Mutex<BTreeMap<i32, Lease>>,
    takeovers: AtomicU64,
    fenced: AtomicU64,
}

impl Ownership {
    /// Ownership for the instance registered as `instance`, with leases of `ttl`.
    pub fn new(instance: String, ttl: Duration) -> Self {
        Ownership {
            instance,
            ttl,
            view: watch::Sender::new(None),
            held: Mutex::new(BTreeMap::new()),
            takeovers: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, Lease>> {
        match self.held.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// This instance's id (`relay_instance.instance_id`).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Records a fresh view; workers waiting for one wake up when it changed.
    pub fn set_view(&self, view: View) {
        self.view.send_if_modified(|current| {
            if current.as_deref() == Some(&view) {
                return false;
            }
            *current = Some(Arc::new(view));
            true
        });
    }

    /// The current view, once there is one.
    pub fn view(&self) -> Option<Arc<View>> {
        self.view.borrow().clone()
    }

    /// A receiver that wakes when the view changes.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<View>>> {
        self.view.subscribe()
    }

    /// True when the current view makes this instance the owner of `partition`.
    pub fn is_mine(&self, partition: i32) -> bool {
        self.view
            .borrow()
            .as_deref()
            .is_some_and(|v| v.is_owner(&self.instance, partition))
    }

    /// True when the current view gives `partition` no owner (above the count and drained).
    pub fn needs_no_owner(&self, partition: i32) -> bool {
        self.view
            .borrow()
            .as_deref()
            .is_some_and(|v| !v.instances.is_empty() && v.owner_of(partition).is_none())
    }

    /// True when an operator paused `partition`.
    pub fn is_paused(&self, partition: i32) -> bool {
        self.view
            .borrow()
            .as_deref()
            .is_some_and(|v| v.paused.binary_search(&partition).is_ok())
    }

    /// True when `partition` is below the partition count of the current view (or no view
    /// was read yet).
    pub fn is_below_count(&self, partition: i32) -> bool {
        self.view
            .borrow()
            .as_deref()
            .is_none_or(|v| partition < v.count)
    }

    /// Records a successful claim, sent at `sent_at`; `previous` is the lease's owner before
    /// (another live or dead instance's counts as a takeover).
    pub fn claimed(&self, partition: i32, epoch: i64, previous: Option<&str>, sent_at: Instant) {
        if previous.is_some_and(|p| p != self.instance) {
            self.takeovers.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("outbox_relay_lease_takeovers_total").increment(1);
        }
        let held = {
            let mut held = self.held();
            held.insert(
                partition,
                Lease {
                    epoch,
                    valid_until: sent_at + self.ttl,
                    renewed_at: sent_at,
                },
            );
            held.len()
        };
        metrics::gauge!("outbox_relay_lease_epoch", "partition" => partition.to_string())
            .set(epoch as f64);
        metrics::gauge!("outbox_relay_leases_held").set(held as f64);
    }

    /// Records a renewal sent at `sent_at` that renewed `renewed` (partition, epoch) pairs.
    /// A held lease the renewal did not return is left to run out.
    pub fn renewed(&self, renewed: &[(i32, i64)], sent_at: Instant) {
        let mut held = self.held();
        for (partition, epoch) in renewed {
            if let Some(lease) = held.get_mut(partition)
                && lease.epoch == *epoch
            {
                lease.valid_until = sent_at + self.ttl;
                lease.renewed_at = sent_at;
            }
        }
    }

    /// The lease held on `partition`, if any.
    pub fn lease(&self, partition: i32) -> Option<Lease> {
        self.held().get(&partition).copied()
    }

    /// True while this instance may act on `partition` under `epoch`.
    pub fn is_valid(&self, partition: i32, epoch: i64) -> bool {
        self.lease(partition)
            .is_some_and(|l| l.epoch == epoch && Instant::now() < l.valid_until)
    }

    /// Records that `partition`'s lease was released, lost or fenced.
    pub fn dropped(&self, partition: i32) {
        let held = {
            let mut held = self.held();
            held.remove(&partition);
            held.len()
        };
        // 0: not held by this instance.
        metrics::gauge!("outbox_relay_lease_epoch", "partition" => partition.to_string()).set(0.0);
        metrics::gauge!("outbox_relay_leases_held").set(held as f64);
    }

    /// Records that a retirement was refused because the lease had been taken over.
    pub fn fencing_rejection(&self) {
        self.fenced.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("outbox_relay_fencing_rejections_total").increment(1);
    }

    /// How many partitions this instance holds.
    pub fn held_count(&self) -> usize {
        self.held().len()
    }

    /// Every held lease.
    pub fn leases(&self) -> BTreeMap<i32, Lease> {
        self.held().clone()
    }

    /// Takeovers and fencing rejections so far.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.takeovers.load(Ordering::Relaxed),
            self.fenced.load(Ordering::Relaxed),
        )
    }
}
