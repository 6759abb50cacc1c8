//! Reading one virtual partition in commit-safe order.
//!
//! Reads are cut into *windows*, each bounded by a transaction snapshot (as PgQ does). A
//! window holds the partition's messages committed in its snapshot and not yet published;
//! the reader walks them in id order with a cursor, in batches, and the caller deletes what
//! Kafka acknowledged. Rows returned and not yet settled (on their way to Kafka, or
//! acknowledged and not yet deleted) are skipped by later reads. A window starts at the
//! smallest id committed since the previous window's snapshot, so a transaction that took a
//! small id and commits late is read in the next window instead of being skipped, and no
//! read walks the dead rows left behind by earlier windows. Per-entity order follows from the writers' entity lock: within
//! one entity, ids are taken in commit order (see `docs/guarantees.md`).
//!
//! A transaction that took a small id and commits late opens a window that starts far below
//! the head of the partition, and the id-order walk from there would step over the dead
//! rows of everything published since (hundreds of milliseconds behind a long transaction
//! that holds back vacuum). So such a window is read in two parts: first its *late* rows,
//! those at or below the highest id already published. Every row committed in the previous
//! window's snapshot up to that id is published, so the late rows are among those of
//! transactions in progress in that snapshot or started after it, which the `(xid)` index
//! finds directly. Then the rest is read in id order from that highest id. Both parts are
//! in id order and the first ends where the second begins, so together they are the window
//! in id order. (Only when the late part spans more than `LATE_READ_MIN_GAP` ids: a shorter
//! walk is cheaper than the extra query.)
//!
//! Windows normally come from the wake-up poller, which finds the new windows of every
//! partition with one query per tick (see `wakeup`); windows that pile up while a batch is
//! in flight merge into one. After a (re)start the first window is the whole partition, and
//! should the poller stall the reader opens its own window from its last snapshot.
//!
//! The reader holds no connection and runs no SQL itself: it decides which read comes next
//! and what its answer means, and asks a [`ReadStore`] (`store.rs`: the statements on a
//! worker's session) for it. Its tests run against an in-memory store.

use std::collections::HashSet;
use std::time::Instant;

use crate::error::Result;
use crate::pipeline::store::{ReadRows, ReadStore, WindowStart};
use crate::session::Incarnation;

/// One message row as read from the outbox table.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    /// The message id: increases in commit order within one entity.
    pub id: i64,
    /// Kafka topic.
    pub topic: String,
    /// The ordering key.
    pub entity_key: String,
    /// Explicit Kafka key, if any (else the entity key is used).
    pub kafka_key: Option<Vec<u8>>,
    /// Explicit Kafka partition, if any.
    pub kafka_partition: Option<i32>,
    /// Payload; `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Header names, parallel to `header_values`.
    pub header_names: Vec<String>,
    /// Header values.
    pub header_values: Vec<Vec<u8>>,
    /// Event type, if any.
    pub event_type: Option<String>,
    /// When the message was written, in seconds since the Unix epoch (for lag metrics).
    pub created_at_epoch: f64,
    /// Why the row cannot be published as stored, when it cannot: a column the relay could
    /// not decode (a NULL inside a header array, written before the SQL functions and the
    /// table refused it). Such a row goes through its topic's failure policy.
    pub undecodable: Option<String>,
}

#[cfg(test)]
impl OutboxRow {
    /// A plain row for unit tests: `entity`'s message `id` to `topic`, nothing else set.
    pub(crate) fn for_tests(id: i64, entity: &str, topic: &str) -> OutboxRow {
        OutboxRow {
            id,
            topic: topic.to_owned(),
            entity_key: entity.to_owned(),
            kafka_key: None,
            kafka_partition: None,
            payload: None,
            header_names: Vec::new(),
            header_values: Vec::new(),
            event_type: None,
            created_at_epoch: 0.0,
            undecodable: None,
        }
    }
}

/// A read window: rows committed in `snapshot` with an id above `cursor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The window's snapshot, as `pg_snapshot` text.
    pub snapshot: String,
    /// Ids up to this one are already read.
    pub cursor: i64,
    /// The database incarnation the snapshot was taken in: only a reader whose session talks
    /// to the same incarnation may use it (transaction ids of another one mean other things).
    pub incarnation: Incarnation,
}

impl Window {
    /// Merges a later window into this one: the union of two consecutive windows is the
    /// later snapshot read from the smaller start. A window of another incarnation is not
    /// consecutive: the later one replaces it.
    pub fn merge(&mut self, later: Window) {
        if later.incarnation != self.incarnation {
            *self = later;
            return;
        }
        self.snapshot = later.snapshot;
        self.cursor = self.cursor.min(later.cursor);
    }
}

/// The rows of a window, read by the wake-up poller for the partition's worker (see
/// `Statements::poll_windows`): those committed in the window's snapshot and not in
/// `previous`.
#[derive(Debug, Clone, PartialEq)]
pub struct FreshRows {
    /// The snapshot the window follows.
    pub previous: String,
    /// The rows, in id order.
    pub rows: Vec<OutboxRow>,
    /// `settings.parked_epoch` as the statement that read them saw it.
    pub parked_epoch: Option<i64>,
    /// When the statement that read them started: rows read before this worker parked an
    /// entity may hold that entity's later messages (see
    /// [`PartitionReader::refuse_fresh_read_before`]).
    pub read_at: Instant,
}

/// The read state of one partition, owned by that partition's worker.
#[derive(Debug)]
pub struct PartitionReader {
    partition: i32,
    batch_size: i64,
    /// The snapshot of the last fully read window; `None` after a (re)start, when the first
    /// window is the whole partition.
    previous: Option<String>,
    /// The window being read.
    window: Option<Window>,
    /// Windows handed over by the poller and not yet started, merged into one.
    pending: Option<Window>,
    /// Set when the poller is stale: open a window from `previous` ourselves.
    open_own: bool,
    /// The highest id returned since the last reset: every row of the partition committed
    /// in `previous` with an id up to here is published.
    high_water: Option<i64>,
    /// Set while the current window's late rows (ids up to `LateRows::until`) are read
    /// through the `(xid)` index.
    late: Option<LateRows>,
    /// The database incarnation of the session this reader reads through; windows of other
    /// incarnations are refused.
    incarnation: Incarnation,
    /// `settings.parked_epoch` as of the first read since the last reset (a read from the
    /// partition's start); see `fetch`.
    parked_epoch: Option<i64>,
    /// Ids returned and not yet settled (see [`PartitionReader::settle`]): batches still on
    /// their way to Kafka. A later window may start below them (a transaction that took a
    /// smaller id committed after they were read), and they are still in the table until
    /// retired, so a read skips them rather than send them twice, out of order.
    unsettled: HashSet<i64>,
    /// The next window's rows as the poller read them, with the window's snapshot: taken
    /// instead of a read when this reader's last window ended at the snapshot they follow.
    fresh: Option<(Window, FreshRows)>,
    /// Rows the poller read before this instant are not used (see
    /// [`PartitionReader::refuse_fresh_read_before`]).
    fresh_not_before: Option<Instant>,
}

/// Below this many ids between a window's start and the high-water mark, the window is
/// walked in id order (at most this many index entries, dead or alive); above it, its late
/// rows are looked up through the `(xid)` index first.
const LATE_READ_MIN_GAP: i64 = 1000;

/// One statement's rows, without those still in flight.
struct Fetched {
    rows: Vec<OutboxRow>,
    /// How many rows the statement returned, skipped ones included (the window is exhausted
    /// when fewer than a batch).
    read: usize,
    /// The last id the statement returned, skipped or not (where the window goes on).
    last_read: Option<i64>,
}

/// The late part of a window: rows with ids in `(cursor, until]` that were committed after
/// `previous` was taken.
#[derive(Debug, Clone)]
struct LateRows {
    previous: String,
    until: i64,
}

impl PartitionReader {
    /// A reader for `partition` that returns at most `batch_size` rows per batch.
    pub fn new(partition: i32, batch_size: usize) -> Self {
        PartitionReader {
            partition,
            batch_size: i64::try_from(batch_size).unwrap_or(i64::MAX),
            previous: None,
            window: None,
            pending: None,
            open_own: false,
            high_water: None,
            late: None,
            // Matches no real incarnation: nothing is accepted before the first `reset`.
            incarnation: Incarnation::new("none yet"),
            parked_epoch: None,
            unsettled: HashSet::new(),
            fresh: None,
            fresh_not_before: None,
        }
    }

    /// The partition this reader serves.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Forgets the read state, e.g. after a reconnect (when it is unknown whether the last
    /// batch was retired, and the database may have lost transaction ids) or after an entity
    /// was unparked: the next read is the whole partition again, through a session of
    /// `incarnation`.
    /// Only when no batch is in flight: the rows of unsettled batches are read again.
    pub fn reset(&mut self, incarnation: Incarnation) {
        self.incarnation = incarnation;
        self.unsettled.clear();
        self.reread();
    }

    /// Reads the partition from its start again (an entity was unparked: the rows it left
    /// behind below the cursor go out now), skipping the rows of batches still in flight:
    /// those are acknowledged, or their failure sends them again through the worker.
    pub fn reread(&mut self) {
        self.parked_epoch = None;
        self.fresh = None;
        self.previous = None;
        self.window = None;
        self.pending = None;
        self.high_water = None;
        self.late = None;
    }

    /// Marks rows returned earlier as done with: retired, moved aside, or held back with a
    /// parked entity (which the reads leave out).
    pub fn settle(&mut self, ids: impl IntoIterator<Item = i64>) {
        for id in ids {
            self.unsettled.remove(&id);
        }
    }

    /// The incarnation of the database this reader's windows belong to.
    pub fn incarnation(&self) -> &Incarnation {
        &self.incarnation
    }

    /// Hands over a window found by the poller. A window whose snapshot was taken in another
    /// incarnation of the database is refused (returns false): its transaction ids may have
    /// been handed out again since. Dropping it loses nothing: the rows it stood for were
    /// committed before this reader's session started, so its first window reads them.
    pub fn offer(&mut self, window: Window) -> bool {
        if window.incarnation != self.incarnation {
            return false;
        }
        match &mut self.pending {
            Some(p) => p.merge(window),
            None => self.pending = Some(window),
        }
        true
    }

    /// Hands over a window found by the poller together with its rows, as the poller read
    /// them. The rows stand for the window (and save a read) only when this reader's last
    /// window ended exactly at the snapshot they follow, nothing else is waiting to be read,
    /// and they fit in a batch: then every row committed up to that snapshot was returned
    /// already, so the window's read would return exactly these rows (less those still in
    /// flight). Otherwise the window is taken as [`PartitionReader::offer`] takes it.
    pub fn offer_fresh(&mut self, window: Window, fresh: Option<FreshRows>) -> bool {
        if window.incarnation != self.incarnation {
            return false;
        }
        if let Some(f) = fresh
            && self.window.is_none()
            && self.pending.is_none()
            && self.fresh.is_none()
            && !self.open_own
            && self.late.is_none()
            && self.previous.as_deref() == Some(f.previous.as_str())
            && f.rows.len() as i64 <= self.batch_size
            && self.fresh_not_before.is_none_or(|t| f.read_at >= t)
        {
            self.fresh = Some((window, f));
            return true;
        }
        self.offer(window)
    }

    /// Stops using rows the poller read before `t`, the moment this worker parked an entity:
    /// those rows may hold the entity's later messages, which must now wait until it is
    /// unparked (reads leave parked entities out; rows read before the park do not). Rows
    /// already handed over go back to being a window to read.
    pub fn refuse_fresh_read_before(&mut self, t: Instant) {
        self.fresh_not_before = Some(t);
        if self.fresh.as_ref().is_some_and(|(_, f)| f.read_at < t)
            && let Some((mut window, _)) = self.fresh.take()
        {
            if let Some(later) = self.pending.take() {
                window.merge(later);
            }
            self.pending = Some(window);
        }
    }

    /// Takes the rows the poller read as the next window (see `offer_fresh`): `None` when
    /// the parked epoch changed since this reader started from the partition's start (an
    /// entity was unparked: it rereads, as `fetch` does), else the rows not in flight.
    fn take_fresh(&mut self, window: Window, fresh: FreshRows) -> Option<Vec<OutboxRow>> {
        if !fresh.rows.is_empty() {
            match (self.parked_epoch, fresh.parked_epoch) {
                (Some(seen), Some(now)) if seen != now => {
                    self.reread();
                    return None;
                }
                (None, now) => self.parked_epoch = now,
                _ => {}
            }
        }
        self.previous = Some(window.snapshot);
        if let Some(last) = fresh.rows.iter().map(|r| r.id).max() {
            self.high_water = Some(self.high_water.map_or(last, |h| h.max(last)));
        }
        Some(
            fresh
                .rows
                .into_iter()
                .filter(|r| self.unsettled.insert(r.id))
                .collect(),
        )
    }

    /// Asks the next read to open a window itself (the poller is not answering).
    pub fn open_own_window(&mut self) {
        self.open_own = true;
    }

    /// True when a read has something to do without waiting for the poller.
    pub fn has_work(&self) -> bool {
        self.window.is_some()
            || self.pending.is_some()
            || self.fresh.is_some()
            || self.previous.is_none()
            || self.open_own
    }

    /// The next batch in order, or an empty vector when there is nothing to read until the
    /// poller hands over a window, read through `store`. The rows of earlier batches are
    /// skipped until they are settled (see [`PartitionReader::settle`]), so the next batch
    /// can be read while the previous ones are on their way to Kafka.
    pub async fn next_batch(&mut self, store: &impl ReadStore) -> Result<Vec<OutboxRow>> {
        loop {
            if self.window.is_none()
                && let Some((window, fresh)) = self.fresh.take()
            {
                match self.take_fresh(window, fresh) {
                    Some(rows) if !rows.is_empty() => return Ok(rows),
                    // All in flight already, or an entity was unparked (reread): go on.
                    _ => continue,
                }
            }
            let window = match self.window.take() {
                Some(w) => w,
                None => match self.start_window(store).await? {
                    Some(w) => w,
                    None => return Ok(Vec::new()),
                },
            };
            if let Some(late) = self.late.clone() {
                let Some(batch) = self.read_late(store, &window, &late).await? else {
                    continue; // an entity was unparked: reread from the start
                };
                if !batch.is_empty() {
                    return Ok(batch);
                }
                continue;
            }
            let read = store
                .read_batch(
                    self.partition,
                    window.cursor,
                    &window.snapshot,
                    self.batch_size,
                )
                .await?;
            let Some(batch) = self.fetched(read) else {
                continue; // an entity was unparked: reread from the start
            };
            match batch.last_read {
                Some(last) if batch.read as i64 == self.batch_size => {
                    self.window = Some(Window {
                        snapshot: window.snapshot,
                        cursor: last,
                        incarnation: window.incarnation,
                    });
                }
                // Fewer rows than asked for: the window is exhausted.
                _ => self.previous = Some(window.snapshot),
            }
            if !batch.rows.is_empty() {
                return Ok(batch.rows);
            }
        }
    }

    /// Reads the next batch of the current window's late rows. When they are done, the
    /// window goes on in id order from `late.until`. A late transaction with more rows than
    /// a batch goes back to the id-order walk instead: each late read scans all rows of the
    /// late transactions, so batching through many of them would cost more than the walk.
    async fn read_late(
        &mut self,
        store: &impl ReadStore,
        window: &Window,
        late: &LateRows,
    ) -> Result<Option<Vec<OutboxRow>>> {
        let read = store
            .read_late(
                self.partition,
                window.cursor,
                &window.snapshot,
                self.batch_size,
                &late.previous,
                late.until,
            )
            .await?;
        let Some(batch) = self.fetched(read) else {
            return Ok(None);
        };
        self.late = None;
        let cursor = match batch.last_read {
            Some(last) if batch.read as i64 == self.batch_size => last,
            _ => late.until,
        };
        self.window = Some(Window {
            snapshot: window.snapshot.clone(),
            cursor,
            incarnation: window.incarnation.clone(),
        });
        Ok(Some(batch.rows))
    }

    /// Takes one batch read's answer and raises the high-water mark to its last id. `None`
    /// when the parked epoch changed since this reader last started from the partition's
    /// start (an entity was unparked): the batch is dropped and the reader reset, because the
    /// rows the parked entity left behind below the cursor must go out before its rows in
    /// this batch. The epoch comes with the rows, in the same statement: an unpark deletes
    /// the parked row and bumps the epoch in one transaction, so a batch that holds rows of
    /// an entity no longer parked always shows the new epoch. (The poller also resets every
    /// worker when the epoch changes, but it can be behind, or down.)
    fn fetched(&mut self, read: ReadRows) -> Option<Fetched> {
        if !read.rows.is_empty() {
            match (self.parked_epoch, read.parked_epoch) {
                (Some(seen), Some(now)) if seen != now => {
                    self.reread();
                    return None;
                }
                (None, now) => self.parked_epoch = now,
                _ => {}
            }
        }
        let count = read.rows.len();
        let last_read = read.rows.last().map(|r| r.id);
        if let Some(last) = last_read {
            self.high_water = Some(self.high_water.map_or(last, |h| h.max(last)));
        }
        let rows: Vec<OutboxRow> = read
            .rows
            .into_iter()
            .filter(|r| self.unsettled.insert(r.id))
            .collect();
        Some(Fetched {
            rows,
            read: count,
            last_read,
        })
    }

    /// The next window to read: the whole partition after a (re)start, else a window handed
    /// over by the poller, else (when asked to) one opened from the previous snapshot.
    async fn start_window(&mut self, store: &impl ReadStore) -> Result<Option<Window>> {
        if let Some(prev) = self.previous.clone() {
            let window = match self.pending.take() {
                Some(w) => Some(w),
                None if std::mem::take(&mut self.open_own) => {
                    let start = store.open_window(self.partition, &prev).await?;
                    self.window_from(start)
                }
                None => None,
            };
            // Rows below the high-water mark not yet published can only be late ones. A
            // small gap (writers committing slightly out of id order, all the time) is
            // cheaper to walk than to look up with a second query.
            self.late = match (&window, self.high_water) {
                (Some(w), Some(until)) if until - w.cursor > LATE_READ_MIN_GAP => Some(LateRows {
                    previous: prev,
                    until,
                }),
                _ => None,
            };
            return Ok(window);
        }
        // First window: everything committed now. Windows the poller handed over meanwhile
        // are older or overlap; they stay pending and read nothing twice (rows are deleted).
        let start = store.open_first_window(self.partition).await?;
        Ok(self.window_from(start))
    }

    fn window_from(&mut self, WindowStart { snapshot, min_id }: WindowStart) -> Option<Window> {
        match min_id {
            Some(min_id) => Some(Window {
                snapshot,
                cursor: min_id - 1,
                incarnation: self.incarnation.clone(),
            }),
            None => {
                self.previous = Some(snapshot);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, entity: &str) -> OutboxRow {
        OutboxRow::for_tests(id, entity, "t")
    }

    /// A reader whose last window ended at snapshot `previous`.
    fn caught_up(previous: &str) -> PartitionReader {
        let mut r = PartitionReader::new(3, 100);
        r.reset(Incarnation::new("db"));
        r.previous = Some(previous.to_owned());
        r.parked_epoch = Some(1);
        r
    }

    fn window(snapshot: &str, cursor: i64) -> Window {
        Window {
            snapshot: snapshot.to_owned(),
            cursor,
            incarnation: Incarnation::new("db"),
        }
    }

    fn fresh(previous: &str, ids: &[i64], parked_epoch: i64) -> FreshRows {
        FreshRows {
            previous: previous.to_owned(),
            rows: ids.iter().map(|&id| row(id, "e")).collect(),
            parked_epoch: Some(parked_epoch),
            read_at: Instant::now(),
        }
    }

    #[test]
    fn fresh_rows_stand_for_the_window_right_after_the_last_one_read() {
        let mut r = caught_up("s1");
        assert!(r.offer_fresh(window("s2", 9), Some(fresh("s1", &[10, 12], 1))));
        assert!(r.has_work());
        let (w, f) = r.fresh.take().expect("taken as rows");
        let rows = r.take_fresh(w, f).expect("same parked epoch");
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![10, 12]);
        assert_eq!(r.previous.as_deref(), Some("s2"));
        assert_eq!(r.high_water, Some(12));
        assert!(r.pending.is_none() && r.window.is_none());
    }

    #[test]
    fn fresh_rows_after_another_snapshot_or_behind_a_pending_window_are_not_used() {
        // The reader's last window ended elsewhere (its own first window, say): the rows
        // would miss, or repeat, what was committed in between. The window is read instead.
        let mut r = caught_up("s0");
        assert!(r.offer_fresh(window("s2", 9), Some(fresh("s1", &[10], 1))));
        assert!(r.fresh.is_none());
        assert_eq!(r.pending, Some(window("s2", 9)));
        // Rows after a window still pending (not read yet) are not used either.
        let mut r = caught_up("s1");
        r.offer(window("s2", 4));
        assert!(r.offer_fresh(window("s3", 9), Some(fresh("s2", &[10], 1))));
        assert!(r.fresh.is_none());
        assert_eq!(r.pending.as_ref().map(|w| w.cursor), Some(4));
        // More rows than a batch: read in batches instead.
        let mut r = PartitionReader::new(3, 1);
        r.reset(Incarnation::new("db"));
        r.previous = Some("s1".to_owned());
        assert!(r.offer_fresh(window("s2", 9), Some(fresh("s1", &[10, 11], 1))));
        assert!(r.fresh.is_none());
    }

    #[test]
    fn fresh_rows_skip_rows_in_flight_and_an_unpark_rereads() {
        let mut r = caught_up("s1");
        r.unsettled.insert(10);
        r.offer_fresh(window("s2", 9), Some(fresh("s1", &[10, 11], 1)));
        let (w, f) = r.fresh.take().expect("rows");
        let rows = r.take_fresh(w, f).expect("same epoch");
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![11]);
        // The parked epoch moved (an entity was unparked): the partition is read from its
        // start instead, the rows in flight still skipped.
        r.offer_fresh(window("s3", 11), Some(fresh("s2", &[12], 2)));
        let (w, f) = r.fresh.take().expect("rows");
        assert!(r.take_fresh(w, f).is_none());
        assert!(r.previous.is_none(), "reread from the start");
        assert!(r.unsettled.contains(&10) && r.unsettled.contains(&11));
    }

    #[test]
    fn rows_read_before_a_park_are_not_used_and_their_window_is_read() {
        // The poller read rows (with the entity's later messages), then this worker parked
        // the entity: those rows must not go out; the window they stood for is read instead.
        let mut r = caught_up("s1");
        let stale = fresh("s1", &[10, 11], 1);
        assert!(r.offer_fresh(window("s2", 9), Some(stale)));
        r.offer(window("s3", 12));
        r.refuse_fresh_read_before(Instant::now());
        assert!(r.fresh.is_none());
        assert_eq!(r.pending, Some(window("s3", 9)), "both windows, to read");
        // Rows read before the park and handed over after it are not used either; rows read
        // after it are.
        let mut r = caught_up("s1");
        let before = fresh("s1", &[10], 1);
        r.refuse_fresh_read_before(Instant::now());
        assert!(r.offer_fresh(window("s2", 9), Some(before)));
        assert!(r.fresh.is_none() && r.pending.is_some());
        let mut r = caught_up("s1");
        r.refuse_fresh_read_before(Instant::now());
        assert!(r.offer_fresh(window("s2", 9), Some(fresh("s1", &[10], 1))));
        assert!(r.fresh.is_some());
    }
}

/// The reader against an in-memory partition (`store::memory`): no database, no client, and
/// no clock either (the tests run under paused time: nothing in the reader sleeps or times
/// out).
#[cfg(test)]
mod model_tests {
    use std::collections::HashMap;

    use super::*;
    use crate::pipeline::store::memory::MemoryStore;

    /// A small deterministic generator (no dependency): the same run every time.
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    fn window(store: &MemoryStore, previous: &str) -> Option<Window> {
        let (snapshot, min) = store.poll(previous);
        min.map(|min| Window {
            snapshot,
            cursor: min - 1,
            incarnation: Incarnation::new("db"),
        })
    }

    /// Writers take ids in order and commit in any order across entities (an entity's
    /// messages commit in id order: the writers' entity lock), some far behind the head; the
    /// poller hands windows over now and then; batches stay in flight (unsettled) for a
    /// while before they are retired. Every committed message is returned exactly once, and
    /// each entity's in id order, late commits included.
    #[tokio::test(start_paused = true)]
    async fn every_commit_is_read_once_and_each_entity_in_order() {
        let store = MemoryStore::default();
        let mut reader = PartitionReader::new(0, 50);
        reader.reset(Incarnation::new("db"));
        let mut rng = Lcg(7);
        let entities = ["a", "b", "c", "d", "e", "f"];
        let mut open: HashMap<&str, Vec<i64>> = HashMap::new();
        let mut returned: Vec<OutboxRow> = Vec::new();
        let mut in_flight: Vec<Vec<i64>> = Vec::new();
        let mut polled = store.snapshot();
        let mut next_id = 1;
        // One writer of entity "late" takes an id first and commits after more than
        // `LATE_READ_MIN_GAP` others were published: the late-row read finds it.
        store.write(next_id, "late");
        let late_id = next_id;
        next_id += 1;
        let mut late_committed = false;
        for _ in 0..8000 {
            match rng.below(12) {
                0..=3 => {
                    let e = entities[rng.below(entities.len() as u64) as usize];
                    store.write(next_id, e);
                    open.entry(e).or_default().push(next_id);
                    next_id += 1;
                }
                4..=7 => {
                    // Commit an entity's oldest open message (entity order = id order).
                    let e = entities[rng.below(entities.len() as u64) as usize];
                    if let Some(ids) = open.get_mut(e)
                        && !ids.is_empty()
                    {
                        store.commit(ids.remove(0));
                    }
                }
                8..=9 => {
                    if let Some(w) = window(&store, &polled) {
                        polled = w.snapshot.clone();
                        assert!(reader.offer(w));
                    }
                }
                10 => {
                    let batch = reader.next_batch(&store).await.expect("read");
                    if !batch.is_empty() {
                        in_flight.push(batch.iter().map(|r| r.id).collect());
                        returned.extend(batch);
                    }
                }
                _ => {
                    // The oldest batch in flight is acknowledged and retired.
                    if !in_flight.is_empty() {
                        let ids = in_flight.remove(0);
                        store.delete(&ids);
                        reader.settle(ids);
                    }
                }
            }
            if !late_committed && returned.len() > 1200 {
                store.commit(late_id);
                late_committed = true;
            }
        }
        assert!(
            late_committed,
            "the scenario published enough before the late commit"
        );
        // Everything commits; the poller and the reader catch up.
        for (_, ids) in open.drain() {
            for id in ids {
                store.commit(id);
            }
        }
        loop {
            if let Some(w) = window(&store, &polled) {
                polled = w.snapshot.clone();
                reader.offer(w);
            }
            let batch = reader.next_batch(&store).await.expect("read");
            for ids in in_flight.drain(..) {
                store.delete(&ids);
                reader.settle(ids);
            }
            if batch.is_empty() && !reader.has_work() {
                break;
            }
            let ids: Vec<i64> = batch.iter().map(|r| r.id).collect();
            returned.extend(batch);
            store.delete(&ids);
            reader.settle(ids);
        }
        let ids: Vec<i64> = returned.iter().map(|r| r.id).collect();
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "no message returned twice");
        assert_eq!(
            unique,
            (1..next_id).collect::<Vec<_>>(),
            "every commit read"
        );
        let mut last: HashMap<&str, i64> = HashMap::new();
        for r in &returned {
            let previous = last.insert(r.entity_key.as_str(), r.id);
            assert!(
                previous.is_none_or(|p| p < r.id),
                "entity {} out of order at {}",
                r.entity_key,
                r.id
            );
        }
        assert!(
            store.take_calls().contains(&"read_late"),
            "the late commit was found through the late-row read"
        );
    }

    /// A batch that shows a new parked epoch (an entity was unparked) is dropped and the
    /// partition read again from its start: the rows the entity left behind go out first.
    #[tokio::test(start_paused = true)]
    async fn an_unpark_seen_in_a_batch_rereads_from_the_start() {
        let store = MemoryStore::default();
        let mut reader = PartitionReader::new(0, 10);
        reader.reset(Incarnation::new("db"));
        for id in 1..=3 {
            store.write(id, "a");
            store.commit(id);
        }
        let first = reader.next_batch(&store).await.expect("read");
        assert_eq!(
            first.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        reader.settle([1, 2, 3]);
        store.delete(&[1, 2, 3]);
        let previous = store.snapshot();
        store.write(4, "a");
        store.commit(4);
        store.bump_parked_epoch();
        reader.offer(window(&store, &previous).expect("window"));
        store.take_calls();
        let batch = reader.next_batch(&store).await.expect("read");
        assert_eq!(batch.iter().map(|r| r.id).collect::<Vec<_>>(), vec![4]);
        assert_eq!(
            store.take_calls(),
            vec!["read_batch", "open_first_window", "read_batch"],
            "the window's batch showed the new epoch: dropped, and the partition read from its start"
        );
    }

    /// When the poller stalls, the worker asks its reader to open a window itself, from the
    /// snapshot its last window ended at.
    #[tokio::test(start_paused = true)]
    async fn without_the_poller_the_reader_opens_its_own_window() {
        let store = MemoryStore::default();
        let mut reader = PartitionReader::new(0, 10);
        reader.reset(Incarnation::new("db"));
        assert!(reader.next_batch(&store).await.expect("read").is_empty());
        assert!(!reader.has_work(), "caught up: waits for the poller");
        store.write(1, "a");
        store.commit(1);
        assert!(reader.next_batch(&store).await.expect("read").is_empty());
        reader.open_own_window();
        let batch = reader.next_batch(&store).await.expect("read");
        assert_eq!(batch.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1]);
        assert!(store.take_calls().contains(&"open_window"));
    }
}
