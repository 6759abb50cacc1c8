//! The batches of one partition on their way to Kafka (pipelining): each is enqueued on the
//! main producer as soon as it is read, while the earlier ones still await their
//! acknowledgements, and they come back in the order they were sent, so that they are
//! retired in order.
//!
//! **Who may join.** A batch joins only when, sent whole and at once, it can keep every
//! entity's order on its own: none of its rows must be handled alone (a row the reader could
//! not decode, or the message that blocked the partition last time), each entity's rows go
//! to one *lane* (topic plus key or explicit partition), and that lane is the one its
//! messages already in flight use. Within a lane the idempotent, gap-less producer keeps
//! order and fails everything behind a refused message, so a later message of an entity is
//! never acknowledged while an earlier one fails. That holds only among the messages of one
//! producer, so a batch joins only while the producer that carries the batches in flight is
//! still the main one, and none joins after a batch that could not be fully enqueued. A
//! message for a topic the producer does not know waits and then fails, but one sent after
//! that failure succeeds if the topic has appeared meanwhile: so behind other batches, only
//! rows for topics (and explicit partitions) Kafka has acknowledged a message for go. Any
//! other batch waits until the pipeline is empty and is delivered alone, round by round
//! (`delivery`). The full argument is in `docs/guarantees.md`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use crate::pipeline::delivery::{Lane, lane};
use crate::pipeline::reader::OutboxRow;
use crate::pipeline::retire::RetireClock;
use crate::publisher::{ProducerHandle, Sent};

/// The acknowledgements of one batch, in row order.
type Acks<'a> = Pin<Box<dyn Future<Output = Vec<Sent>> + Send + 'a>>;

/// One batch on its way to Kafka.
pub(crate) struct Flight<'a> {
    /// The batch's rows, in read order.
    pub(crate) rows: Vec<OutboxRow>,
    /// When it was read.
    pub(crate) read_at: Instant,
    acks: Acks<'a>,
    /// The acknowledgements, once they all came back.
    result: Option<Vec<Sent>>,
    /// The batch's share of the instance's budget of rows in flight (see
    /// `WorkerContext::row_budget`), given back when the batch is dropped.
    budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A lane as the in-flight queue keeps it (the rows it was taken from may be gone).
#[derive(Debug, PartialEq, Eq)]
enum OwnedLane {
    Key(String, Vec<u8>),
    Partition(String, i32),
}

impl OwnedLane {
    fn of(lane: &Lane<'_>) -> OwnedLane {
        match *lane {
            Lane::Key(topic, key) => OwnedLane::Key(topic.to_owned(), key.to_vec()),
            Lane::Partition(topic, p) => OwnedLane::Partition(topic.to_owned(), p),
        }
    }

    fn is(&self, lane: &Lane<'_>) -> bool {
        match (self, *lane) {
            (OwnedLane::Key(t, k), Lane::Key(topic, key)) => t == topic && k == key,
            (OwnedLane::Partition(t, p), Lane::Partition(topic, partition)) => {
                t == topic && *p == partition
            }
            _ => false,
        }
    }
}

/// The batches of one partition in flight, oldest first.
pub(crate) struct InFlight<'a> {
    flights: VecDeque<Flight<'a>>,
    /// For every entity with messages in flight: their lane and how many there are.
    lanes: HashMap<String, (OwnedLane, usize)>,
    /// The producer that carries every batch in flight.
    producer: Option<ProducerHandle>,
    /// Set when a batch could not be fully enqueued: nothing joins until the pipeline is
    /// empty again.
    closed: bool,
    depth: usize,
    /// Rows in flight, and the most there may be before another batch joins (a full
    /// batch's worth): small batches pipeline up to `depth` deep, full ones (a backlog) go
    /// one at a time, which keeps the memory they take bounded.
    rows: usize,
    max_rows: usize,
    /// Ids Kafka acknowledged that are not deleted yet (retired together, see
    /// `retire_interval_ms`), and since when the oldest of them waits.
    acked: Vec<i64>,
    acked_since: Option<Instant>,
}

impl<'a> InFlight<'a> {
    /// An empty pipeline of at most `depth` batches (at least one), which takes no batch
    /// while `max_rows` rows or more are in flight.
    pub(crate) fn new(depth: usize, max_rows: usize) -> Self {
        InFlight {
            flights: VecDeque::new(),
            lanes: HashMap::new(),
            producer: None,
            closed: false,
            depth: depth.max(1),
            rows: 0,
            max_rows,
            acked: Vec::new(),
            acked_since: None,
        }
    }

    /// Holds acknowledged ids until they are retired together.
    pub(crate) fn hold_acked(&mut self, ids: impl IntoIterator<Item = i64>) {
        let before = self.acked.len();
        self.acked.extend(ids);
        if before == 0 && !self.acked.is_empty() {
            self.acked_since = Some(Instant::now());
        }
    }

    /// When the acknowledged ids held must be retired: at the first tick of `clock` after
    /// the oldest was held (at most `interval` later), or at once when `max` of them are
    /// held. `None` when none are held.
    pub(crate) fn retire_due_at(
        &self,
        clock: &RetireClock,
        interval: Duration,
        max: usize,
    ) -> Option<Instant> {
        let since = self.acked_since?;
        if self.acked.len() >= max {
            return Some(since);
        }
        Some(clock.next_tick(since, interval))
    }

    /// Takes the acknowledged ids held, to retire them.
    pub(crate) fn take_acked(&mut self) -> Vec<i64> {
        self.acked_since = None;
        std::mem::take(&mut self.acked)
    }

    /// True when no batch is in flight.
    pub(crate) fn is_empty(&self) -> bool {
        self.flights.is_empty()
    }

    /// True when another batch may be read now to join (room left, not closed).
    pub(crate) fn has_room(&self) -> bool {
        !self.closed && self.flights.len() < self.depth && self.rows < self.max_rows
    }

    /// The producer the next batch must go through, if batches are in flight.
    pub(crate) fn producer(&self) -> Option<&ProducerHandle> {
        self.producer.as_ref()
    }

    /// The oldest batch in flight: its first row and when it was read.
    pub(crate) fn oldest(&self) -> Option<(&OutboxRow, Instant)> {
        let f = self.flights.front()?;
        Some((f.rows.first()?, f.read_at))
    }

    /// Whether `rows` (one batch, in read order) may be sent now, whole, behind the batches
    /// in flight (see the module docs). `blocked` is the message that blocked the partition
    /// last time, if any; `exists` tells whether Kafka acknowledged a message for a row's
    /// topic (and explicit partition) before: behind batches in flight, only such rows go.
    pub(crate) fn admits(
        &self,
        rows: &[OutboxRow],
        blocked: Option<i64>,
        exists: impl Fn(&OutboxRow) -> bool,
    ) -> bool {
        if !self.has_room() {
            return false;
        }
        let behind_others = !self.flights.is_empty();
        let mut batch_lanes: HashMap<&str, Lane<'_>> = HashMap::new();
        for row in rows {
            if row.undecodable.is_some()
                || Some(row.id) == blocked
                || (behind_others && !exists(row))
            {
                return false;
            }
            let l = lane(row);
            match batch_lanes.get(row.entity_key.as_str()) {
                Some(seen) if *seen != l => return false,
                Some(_) => {}
                None => {
                    if let Some((flying, _)) = self.lanes.get(&row.entity_key)
                        && !flying.is(&l)
                    {
                        return false;
                    }
                    batch_lanes.insert(&row.entity_key, l);
                }
            }
        }
        true
    }

    /// Adds a batch that was enqueued on `producer` (whole when `fully_enqueued`) and whose
    /// acknowledgements `acks` resolves to.
    pub(crate) fn push(
        &mut self,
        rows: Vec<OutboxRow>,
        read_at: Instant,
        producer: ProducerHandle,
        fully_enqueued: bool,
        acks: Acks<'a>,
    ) {
        for row in &rows {
            self.lanes
                .entry(row.entity_key.clone())
                .or_insert_with(|| (OwnedLane::of(&lane(row)), 0))
                .1 += 1;
        }
        self.producer = Some(producer);
        self.closed |= !fully_enqueued;
        self.rows += rows.len();
        self.flights.push_back(Flight {
            rows,
            read_at,
            acks,
            result: None,
            budget: None,
        });
    }

    /// Makes the batch pushed last hold `permit` (its rows' share of the instance's budget)
    /// until it is dropped.
    pub(crate) fn attach_budget(&mut self, permit: tokio::sync::OwnedSemaphorePermit) {
        if let Some(last) = self.flights.back_mut() {
            last.budget = Some(permit);
        }
    }

    /// Waits for the oldest batch's acknowledgements and takes it out. Cancel-safe: the
    /// acknowledgements that came back are kept for the next call.
    pub(crate) async fn next_done(&mut self) -> Option<(Flight<'a>, Vec<Sent>)> {
        let front = self.flights.front_mut()?;
        if front.result.is_none() {
            let acks = (&mut front.acks).await;
            front.result = Some(acks);
        }
        self.pop()
    }

    /// Takes the oldest batch out if every row of it is already acknowledged.
    pub(crate) fn take_if_acked(&mut self) -> Option<(Flight<'a>, Vec<Sent>)> {
        let front = self.flights.front_mut()?;
        if front.result.is_none() {
            front.result = (&mut front.acks).now_or_never();
        }
        let all_acked = front
            .result
            .as_ref()?
            .iter()
            .all(|s| matches!(s, Sent::Acked));
        if all_acked { self.pop() } else { None }
    }

    fn pop(&mut self) -> Option<(Flight<'a>, Vec<Sent>)> {
        let mut flight = self.flights.pop_front()?;
        let result = flight.result.take().unwrap_or_default();
        self.rows -= flight.rows.len();
        for row in &flight.rows {
            if let Some(entry) = self.lanes.get_mut(&row.entity_key) {
                entry.1 -= 1;
                if entry.1 == 0 {
                    self.lanes.remove(&row.entity_key);
                }
            }
        }
        if self.flights.is_empty() {
            self.producer = None;
            self.closed = false;
        }
        Some((flight, result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, entity: &str, topic: &str) -> OutboxRow {
        OutboxRow::for_tests(id, entity, topic)
    }

    async fn acked(n: usize) -> Vec<Sent> {
        (0..n).map(|_| Sent::Acked).collect()
    }

    fn producer() -> ProducerHandle {
        ProducerHandle::for_tests()
    }

    /// Adds a batch, fully enqueued, that Kafka acknowledges whole.
    fn push_acked(q: &mut InFlight<'_>, rows: Vec<OutboxRow>) {
        let n = rows.len();
        q.push(rows, Instant::now(), producer(), true, Box::pin(acked(n)));
    }

    #[tokio::test]
    async fn an_entity_keeps_its_lane_across_batches_in_flight() {
        let mut q = InFlight::new(4, 1000);
        let first = vec![row(1, "a", "t1"), row(2, "b", "t1")];
        assert!(q.admits(&first, None, |_| true));
        push_acked(&mut q, first);
        // a's next message goes to another topic: it must wait for 1's acknowledgement.
        assert!(!q.admits(&[row(3, "a", "t2")], None, |_| true));
        // Same lane, or an entity with nothing in flight: may go.
        assert!(q.admits(&[row(4, "a", "t1"), row(5, "c", "t2")], None, |_| true));
        // Once the first batch is out, a's lane is free again.
        let (done, acks) = q.next_done().await.expect("a batch in flight");
        assert_eq!(done.rows.len(), 2);
        assert_eq!(acks.len(), 2);
        assert!(q.admits(&[row(3, "a", "t2")], None, |_| true));
    }

    #[tokio::test]
    async fn behind_others_only_rows_for_topics_known_to_exist_join() {
        let mut q = InFlight::new(4, 1000);
        let unknown = |r: &OutboxRow| r.topic != "new";
        // Alone, a batch for a new topic goes (nothing is behind it).
        assert!(q.admits(&[row(1, "a", "new")], None, unknown));
        push_acked(&mut q, vec![row(1, "a", "old")]);
        assert!(!q.admits(&[row(2, "b", "new")], None, unknown));
        assert!(q.admits(&[row(2, "b", "old")], None, unknown));
    }

    #[test]
    fn a_batch_that_needs_rounds_or_a_lone_row_does_not_join() {
        let q = InFlight::new(4, 1000);
        assert!(!q.admits(&[row(1, "a", "t1"), row(2, "a", "t2")], None, |_| true));
        assert!(!q.admits(&[row(1, "a", "t1")], Some(1), |_| true));
        let mut bad = row(1, "a", "t1");
        bad.undecodable = Some("column payload".into());
        assert!(!q.admits(&[bad], None, |_| true));
        let mut keyed = row(2, "a", "t1");
        keyed.kafka_key = Some(b"other".to_vec());
        assert!(!q.admits(&[row(1, "a", "t1"), keyed], None, |_| true));
    }

    #[tokio::test]
    async fn the_depth_bounds_the_pipeline_and_a_partial_enqueue_closes_it() {
        let mut q = InFlight::new(2, 1000);
        push_acked(&mut q, vec![row(1, "a", "t")]);
        assert!(q.has_room());
        push_acked(&mut q, vec![row(2, "b", "t")]);
        assert!(!q.has_room());
        assert!(!q.admits(&[row(3, "c", "t")], None, |_| true));
        let _ = q.next_done().await;
        assert!(q.has_room());
        q.push(
            vec![row(4, "d", "t")],
            Instant::now(),
            producer(),
            false,
            Box::pin(acked(0)),
        );
        assert!(
            !q.has_room(),
            "nothing joins behind a batch not fully enqueued"
        );
        let _ = q.next_done().await;
        let _ = q.next_done().await;
        assert!(q.is_empty() && q.has_room());
    }

    #[tokio::test]
    async fn a_full_batch_in_flight_leaves_no_room_for_another() {
        let mut q = InFlight::new(4, 3);
        push_acked(&mut q, vec![row(1, "a", "t"), row(2, "b", "t")]);
        assert!(q.has_room(), "two rows of at most three");
        push_acked(&mut q, vec![row(3, "c", "t")]);
        assert!(!q.has_room(), "a batch's worth in flight");
        let _ = q.next_done().await;
        assert!(q.has_room());
    }

    #[test]
    fn acknowledged_ids_are_retired_after_the_interval_or_when_many() {
        let mut q = InFlight::new(4, 1000);
        let clock = RetireClock::default();
        let interval = Duration::from_millis(100);
        assert_eq!(q.retire_due_at(&clock, interval, 3), None);
        q.hold_acked([1, 2]);
        let due = q.retire_due_at(&clock, interval, 3).expect("held");
        assert!(due > Instant::now() && due <= Instant::now() + interval);
        q.hold_acked([3]);
        assert!(q.retire_due_at(&clock, interval, 3).expect("held") <= Instant::now());
        assert_eq!(q.take_acked(), vec![1, 2, 3]);
        assert_eq!(q.retire_due_at(&clock, interval, 3), None);
    }

    #[tokio::test]
    async fn batches_come_back_in_the_order_they_were_sent() {
        let mut q = InFlight::new(4, 1000);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        q.push(
            vec![row(1, "a", "t")],
            Instant::now(),
            producer(),
            true,
            Box::pin(async move {
                let _ = rx.await;
                vec![Sent::Acked]
            }),
        );
        push_acked(&mut q, vec![row(2, "b", "t")]);
        // The second batch is acknowledged first, but the first is not: nothing is taken.
        assert!(q.take_if_acked().is_none());
        tx.send(()).expect("receiver alive");
        let (first, _) = q.next_done().await.expect("first");
        assert_eq!(first.rows[0].id, 1);
        let (second, _) = q.take_if_acked().expect("already acknowledged");
        assert_eq!(second.rows[0].id, 2);
    }

    #[tokio::test]
    async fn a_batch_with_a_failure_is_not_taken_as_acknowledged() {
        let mut q = InFlight::new(4, 1000);
        q.push(
            vec![row(1, "a", "t"), row(2, "b", "t")],
            Instant::now(),
            producer(),
            true,
            Box::pin(async {
                vec![
                    Sent::Acked,
                    Sent::Failed(crate::publisher::Failure {
                        error: rdkafka::error::KafkaError::Canceled,
                        kind: crate::publisher::Refusal::Retriable,
                    }),
                ]
            }),
        );
        assert!(q.take_if_acked().is_none());
        let (_, acks) = q.next_done().await.expect("in flight");
        assert!(matches!(acks[1], Sent::Failed(_)));
    }
}
