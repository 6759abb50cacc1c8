//! Sharing partitions fairly between relay instances.
//!
//! The advisory locks make every partition's reader unique; this decides which partitions
//! each instance tries to hold. Every instance works from the same view, read from the
//! database about once a second by its wake-up poller: the partition count
//! (`settings.partition_count`) and the number of registered instances (each registers with a
//! session advisory lock on its poller's connection). Its fair share is the count divided by
//! the instances, rounded up, so the shares always leave room for every partition below the
//! count, and every instance runs a worker for each of them (the poller starts missing ones).
//! A worker takes its partition only while the instance holds fewer partitions below the
//! count than its share; an instance above its share (one joined, or the count was lowered)
//! lets partitions go between batches.
//!
//! A partition at or above the count (it holds messages of entities mapped before the count
//! was lowered) is not shared out: any instance's worker takes it while it has messages, and
//! lets it go once it is drained, so it never occupies a place that a partition below the
//! count needs. (Before, each instance computed its share from the partitions it happened to
//! serve, which only grew: instances disagreed about the total, kept drained partitions above
//! a lowered count, and could all sit at their share while a partition with messages had no
//! owner.) Until the first view an instance takes everything it can.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// Which partitions this instance holds, and the view it shares them by.
#[derive(Debug)]
pub struct Ownership {
    held: Mutex<BTreeSet<i32>>,
    share: AtomicUsize,
    count: AtomicI32,
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership {
            held: Mutex::new(BTreeSet::new()),
            share: AtomicUsize::new(usize::MAX),
            count: AtomicI32::new(i32::MAX),
        }
    }
}

impl Ownership {
    fn held(&self) -> std::sync::MutexGuard<'_, BTreeSet<i32>> {
        match self.held.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Records the shared view: the partition count and the number of live instances.
    pub fn set_view(&self, count: i32, instances: usize) {
        let partitions = usize::try_from(count.max(1)).unwrap_or(1);
        let share = partitions.div_ceil(instances.max(1)).max(1);
        self.count.store(count.max(1), Ordering::Relaxed);
        self.share.store(share, Ordering::Relaxed);
    }

    /// The current fair share of partitions below the count.
    pub fn share(&self) -> usize {
        self.share.load(Ordering::Relaxed)
    }

    /// The partition count of the current view.
    pub fn count(&self) -> i32 {
        self.count.load(Ordering::Relaxed)
    }

    /// True when `partition` is shared out (below the count).
    pub fn is_shared(&self, partition: i32) -> bool {
        partition < self.count()
    }

    fn owned_below_count(&self, held: &BTreeSet<i32>) -> usize {
        held.range(..self.count()).count()
    }

    /// True when a worker may take `partition`: one at or above the count always (it is
    /// drained by whoever gets it first), one below while this instance holds fewer of those
    /// than its share.
    pub fn may_take(&self, partition: i32) -> bool {
        !self.is_shared(partition) || self.owned_below_count(&self.held()) < self.share()
    }

    /// Records that this instance holds `partition`.
    pub fn took(&self, partition: i32) {
        self.held().insert(partition);
    }

    /// Records that this instance let go of `partition` or lost it.
    pub fn lost(&self, partition: i32) {
        self.held().remove(&partition);
    }

    /// When this instance holds more partitions below the count than its share, lets go of
    /// `partition` (the caller must then release it) and returns true. Several workers asking
    /// at once release only the excess.
    pub fn release_one(&self, partition: i32) -> bool {
        let mut held = self.held();
        if !self.is_shared(partition) || !held.contains(&partition) {
            return false;
        }
        if self.owned_below_count(&held) > self.share() {
            held.remove(&partition);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_everything_until_the_first_view() {
        let o = Ownership::default();
        for p in 0..64 {
            assert!(o.may_take(p));
            o.took(p);
        }
        assert!(!o.release_one(0));
    }

    #[test]
    fn shares_round_up_so_every_partition_below_the_count_is_wanted() {
        let o = Ownership::default();
        o.set_view(8, 3);
        assert_eq!(o.share(), 3);
        o.set_view(8, 0);
        assert_eq!(o.share(), 8);
        o.set_view(0, 4);
        assert_eq!(o.share(), 1);
    }

    #[test]
    fn only_the_excess_below_the_count_is_released() {
        let o = Ownership::default();
        for p in 0..8 {
            o.took(p);
        }
        o.set_view(8, 2);
        let released = (0..8).filter(|&p| o.release_one(p)).count();
        assert_eq!(released, 4);
        assert!(!o.may_take(0), "at its share (4..8 held)");
        o.lost(4);
        assert!(o.may_take(0), "below its share after losing one");
    }

    /// The stall this replaced: drained partitions above a lowered count must not use up the
    /// share that partitions below it need.
    #[test]
    fn partitions_above_the_count_neither_use_up_the_share_nor_wait_for_it() {
        let o = Ownership::default();
        for p in 0..16 {
            o.took(p);
        }
        o.set_view(2, 2);
        assert_eq!(o.share(), 1);
        // Above the count: never released by the share (its worker lets go once drained),
        // and always takeable.
        assert!(!o.release_one(9));
        assert!(o.may_take(12));
        // Below the count, the excess goes.
        assert!(o.release_one(0));
        assert!(!o.release_one(1), "one below the count is the share");
        for p in 2..16 {
            o.lost(p);
        }
        assert!(!o.may_take(0), "holds its share (partition 1)");
    }
}
