//! Reading one virtual partition in commit-safe order.
//!
//! Reads are cut into *windows*, each bounded by a transaction snapshot (as PgQ does). A
//! window holds the partition's messages committed in its snapshot and not yet published;
//! the reader walks them in id order with a cursor, in batches. Because published rows are
//! deleted before the next read, and the next window starts from the smallest id committed
//! since the previous snapshot, a transaction that took a small id and commits late is read
//! in the next window instead of being skipped, and no read walks the dead rows left behind
//! by earlier windows. Per-entity order follows from the writers' entity lock: within one
//! entity, ids are taken in commit order (see `docs/guarantees.md`).

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::sql::Statements;

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
}

/// An open window: its snapshot and how far the cursor has got.
#[derive(Debug, Clone)]
struct Window {
    snapshot: String,
    cursor: i64,
}

/// The read state of one partition, owned by that partition's worker.
#[derive(Debug)]
pub struct PartitionReader {
    partition: i32,
    batch_size: i64,
    /// The snapshot of the last fully read window; `None` after a (re)start, when the first
    /// window simply starts at the partition's smallest id.
    previous: Option<String>,
    window: Option<Window>,
    /// `settings.parked_epoch` when the current read started; a change means an entity was
    /// unparked and its held-back messages (below the cursor) must be read again.
    parked_epoch: Option<i64>,
}

impl PartitionReader {
    /// A reader for `partition` that returns at most `batch_size` rows per batch.
    pub fn new(partition: i32, batch_size: usize) -> Self {
        PartitionReader {
            partition,
            batch_size: i64::try_from(batch_size).unwrap_or(i64::MAX),
            previous: None,
            window: None,
            parked_epoch: None,
        }
    }

    /// The partition this reader serves.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Forgets the window state, e.g. after a reconnect, when it is unknown whether the last
    /// batch was retired. The next read starts again from the smallest id.
    pub fn reset(&mut self) {
        self.previous = None;
        self.window = None;
    }

    /// The next batch in order, or an empty vector when nothing new is committed. The
    /// caller must retire (delete) a returned batch before calling this again.
    pub async fn next_batch(
        &mut self,
        client: &Client,
        sql: &Statements,
    ) -> Result<Vec<OutboxRow>> {
        // Two rounds at most: a continued window can turn out empty (its last batch was
        // exactly `batch_size` rows), and then the next window is opened at once.
        for _ in 0..2 {
            let window = match self.window.take() {
                Some(w) => w,
                None => match self.open_window(client, sql).await? {
                    Some(w) => w,
                    None => return Ok(Vec::new()),
                },
            };
            let rows = client
                .query(
                    &sql.read_batch,
                    &[
                        &self.partition,
                        &window.cursor,
                        &window.snapshot,
                        &self.batch_size,
                    ],
                )
                .await
                .map_err(Error::pg("reading a batch"))?;
            let batch: Vec<OutboxRow> = rows.iter().map(row_to_message).collect();
            match batch.last() {
                Some(last) if batch.len() as i64 == self.batch_size => {
                    self.window = Some(Window {
                        snapshot: window.snapshot,
                        cursor: last.id,
                    });
                }
                // Fewer rows than asked for: the window is exhausted.
                _ => self.previous = Some(window.snapshot),
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
        Ok(Vec::new())
    }

    /// Takes a new snapshot and places the cursor before the smallest id committed since
    /// the previous one. Returns `None`, recording the snapshot as read, when there is none.
    async fn open_window(&mut self, client: &Client, sql: &Statements) -> Result<Option<Window>> {
        let row = match &self.previous {
            Some(prev) => {
                client
                    .query_one(&sql.open_window, &[&self.partition, prev])
                    .await
            }
            None => {
                client
                    .query_one(&sql.open_first_window, &[&self.partition])
                    .await
            }
        }
        .map_err(Error::pg("opening a read window"))?;
        let snapshot: String = row.get(0);
        let parked_epoch: i64 = row.get(1);
        let min_id: Option<i64> = row.get(2);
        if self.previous.is_some() && self.parked_epoch != Some(parked_epoch) {
            // An entity was released: read the partition again from its smallest id.
            self.parked_epoch = Some(parked_epoch);
            self.previous = None;
            return Box::pin(self.open_window(client, sql)).await;
        }
        self.parked_epoch = Some(parked_epoch);
        match min_id {
            Some(min_id) => Ok(Some(Window {
                snapshot,
                cursor: min_id - 1,
            })),
            None => {
                self.previous = Some(snapshot);
                Ok(None)
            }
        }
    }
}

fn row_to_message(row: &tokio_postgres::Row) -> OutboxRow {
    OutboxRow {
        id: row.get(0),
        topic: row.get(1),
        entity_key: row.get(2),
        kafka_key: row.get(3),
        kafka_partition: row.get(4),
        payload: row.get(5),
        header_names: row.get(6),
        header_values: row.get(7),
        event_type: row.get(8),
        created_at_epoch: row.get(9),
    }
}
