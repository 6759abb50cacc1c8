//! The one rule every instance applies to the same view to know which partitions are its
//! own. Pure: no I/O, so every instance computes the same answer from the same rows.

/// What the instances share partitions by, read from the database by the wake-up poller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// `settings.partition_count`.
    pub count: i32,
    /// The live instances, in id order (the same order for everyone).
    pub instances: Vec<String>,
    /// Partitions at or above the count that still hold messages (entities mapped before
    /// the count was lowered), ascending.
    pub above: Vec<i32>,
    /// Partitions an operator paused (`outboxd partitions pause`), ascending: nobody owns
    /// them until they are resumed.
    pub paused: Vec<i32>,
}

impl View {
    /// The partitions that need an owner, in the order they are dealt: every one below the
    /// count, then the ones above it that hold messages.
    fn position(&self, partition: i32) -> Option<usize> {
        // Paused ones keep their place in the deal, so pausing one moves no other.
        if self.paused.binary_search(&partition).is_ok() {
            return None;
        }
        if (0..self.count).contains(&partition) {
            return usize::try_from(partition).ok();
        }
        let below = usize::try_from(self.count.max(0)).ok()?;
        self.above.binary_search(&partition).ok().map(|i| below + i)
    }

    /// The instance that should own `partition`: the partitions that need an owner are dealt
    /// out in turn, so the numbers per instance differ by at most one. `None` when the
    /// partition needs no owner (above the count and drained) or no instance is alive.
    pub fn owner_of(&self, partition: i32) -> Option<&str> {
        let n = self.instances.len();
        if n == 0 {
            return None;
        }
        self.position(partition)
            .map(|pos| self.instances[pos % n].as_str())
    }

    /// The partitions `instance` should own, ascending.
    pub fn owned_by(&self, instance: &str) -> Vec<i32> {
        (0..self.count)
            .chain(self.above.iter().copied())
            .filter(|&p| self.is_owner(instance, p))
            .collect()
    }

    /// True when `instance` should own `partition`.
    pub fn is_owner(&self, instance: &str, partition: i32) -> bool {
        self.owner_of(partition) == Some(instance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(count: i32, instances: &[&str], above: &[i32]) -> View {
        View {
            count,
            instances: instances.iter().map(|s| (*s).to_owned()).collect(),
            above: above.to_vec(),
            paused: Vec::new(),
        }
    }

    fn owned(v: &View, instance: &str) -> Vec<i32> {
        (0..64).filter(|&p| v.is_owner(instance, p)).collect()
    }

    #[test]
    fn every_partition_that_needs_an_owner_has_exactly_one() {
        let v = view(8, &["a", "b", "c"], &[11, 20]);
        for p in (0..8).chain([11, 20]) {
            let owners = ["a", "b", "c"].iter().filter(|i| v.is_owner(i, p)).count();
            assert_eq!(owners, 1, "partition {p}");
        }
        for p in [8, 9, 10, 12, 21] {
            assert_eq!(v.owner_of(p), None, "partition {p} needs no owner");
        }
    }

    #[test]
    fn the_numbers_per_instance_differ_by_at_most_one() {
        for count in 1..40 {
            for n in 1..7 {
                let ids: Vec<String> = (0..n).map(|i| format!("i{i}")).collect();
                let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                let v = view(count, &refs, &[count + 3, count + 5]);
                let sizes: Vec<usize> = refs.iter().map(|i| owned(&v, i).len()).collect();
                let (min, max) = (sizes.iter().min(), sizes.iter().max());
                assert!(
                    max.zip(min).is_some_and(|(a, b)| a - b <= 1),
                    "count {count}, {n} instances: {sizes:?}"
                );
                assert_eq!(sizes.iter().sum::<usize>(), count as usize + 2);
            }
        }
    }

    #[test]
    fn no_instance_alive_means_no_owner() {
        assert_eq!(view(4, &[], &[]).owner_of(0), None);
    }

    #[test]
    fn partitions_below_the_count_keep_their_owner_when_the_ones_above_drain() {
        let before = view(6, &["a", "b"], &[7, 9]);
        let after = view(6, &["a", "b"], &[9]);
        for p in 0..6 {
            assert_eq!(before.owner_of(p), after.owner_of(p));
        }
    }

    #[test]
    fn a_paused_partition_has_no_owner_and_moves_no_other() {
        let before = view(8, &["a", "b"], &[]);
        let mut paused = before.clone();
        paused.paused = vec![3];
        assert_eq!(paused.owner_of(3), None);
        for p in (0..8).filter(|&p| p != 3) {
            assert_eq!(paused.owner_of(p), before.owner_of(p), "partition {p}");
        }
        assert_eq!(paused.owned_by("b"), vec![1, 5, 7]);
    }
}
