//! Sharing partitions fairly between relay instances.
//!
//! The advisory locks make every partition's reader unique; this decides how many each
//! instance tries to hold. Each instance registers on its wake-up poller's connection (a
//! session advisory lock of its own) and counts the registered instances about once a
//! second; its fair share is the partition count divided by that, rounded up. A worker
//! tries to take its partition only while the instance holds fewer than its share, and an
//! instance above its share (another one started) lets partitions go between batches, so
//! the newcomer can take them. Until the first count an instance takes everything it can.
//! Rounding up leaves room for all partitions: every partition is wanted by some instance.

use std::sync::atomic::{AtomicUsize, Ordering};

/// How many partitions this instance holds and may hold.
#[derive(Debug)]
pub struct Ownership {
    owned: AtomicUsize,
    share: AtomicUsize,
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership {
            owned: AtomicUsize::new(0),
            share: AtomicUsize::new(usize::MAX),
        }
    }
}

impl Ownership {
    /// Sets the fair share for `partitions` partitions among `instances` live instances.
    pub fn set_share(&self, partitions: usize, instances: usize) {
        let share = partitions.div_ceil(instances.max(1)).max(1);
        self.share.store(share, Ordering::Relaxed);
    }

    /// The current fair share.
    pub fn share(&self) -> usize {
        self.share.load(Ordering::Relaxed)
    }

    /// True while this instance holds fewer partitions than its share.
    pub fn may_take(&self) -> bool {
        self.owned.load(Ordering::Relaxed) < self.share()
    }

    /// Records that a worker took its partition.
    pub fn took(&self) {
        self.owned.fetch_add(1, Ordering::Relaxed);
    }

    /// Records that a worker lost or let go of its partition.
    pub fn lost(&self) {
        let _ = self
            .owned
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| o.checked_sub(1));
    }

    /// When this instance holds more than its share, claims one release for the calling
    /// worker (which must then let its partition go) and returns true. Several workers
    /// asking at once release only the excess.
    pub fn release_one(&self) -> bool {
        let share = self.share();
        self.owned
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| {
                (o > share).then(|| o - 1)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_everything_until_the_first_count() {
        let o = Ownership::default();
        for _ in 0..64 {
            assert!(o.may_take());
            o.took();
        }
        assert!(!o.release_one());
    }

    #[test]
    fn share_rounds_up_so_every_partition_is_wanted() {
        let o = Ownership::default();
        o.set_share(8, 3);
        assert_eq!(o.share(), 3);
        o.set_share(8, 0);
        assert_eq!(o.share(), 8);
        o.set_share(0, 4);
        assert_eq!(o.share(), 1);
    }

    #[test]
    fn only_the_excess_is_released() {
        let o = Ownership::default();
        for _ in 0..8 {
            o.took();
        }
        o.set_share(8, 2);
        let released = (0..8).filter(|_| o.release_one()).count();
        assert_eq!(released, 4);
        assert!(!o.may_take(), "at its share");
        o.lost();
        assert!(o.may_take(), "below its share after losing one");
    }
}
