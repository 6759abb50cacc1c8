//! The partition worker's statements against the outbox table: where the reader's reads
//! meet a session. [`ReadStore`] is what the reader asks for (open a window, read a batch,
//! read a window's late rows); [`PgReadStore`] runs those statements, prepared on a worker's
//! session, and decodes their rows. Keeping them here leaves the reader free of any client,
//! so its order logic is tested against an in-memory store.

use std::future::Future;

use tokio_postgres::{Client, Statement};

use crate::error::{Error, Result};
use crate::pipeline::reader::OutboxRow;
use crate::sql::Statements;

/// Where a window starts: the snapshot it was opened in and the smallest id committed in it
/// and not yet published (`None`: nothing to read).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowStart {
    /// The snapshot, as `pg_snapshot` text.
    pub snapshot: String,
    /// The smallest id to read, if any.
    pub min_id: Option<i64>,
}

/// The answer to a batch read: its rows in id order, and `settings.parked_epoch` as the same
/// statement saw it (`None` when it returned no row).
#[derive(Debug, Clone, Default)]
pub struct ReadRows {
    /// The rows.
    pub rows: Vec<OutboxRow>,
    /// The parked epoch read with them.
    pub parked_epoch: Option<i64>,
}

/// The reads a partition's reader needs. Every method is one statement; see `Statements`
/// for what each returns.
pub trait ReadStore {
    /// The first window after a (re)start: everything committed now
    /// (`Statements::open_first_window`).
    fn open_first_window(&self, partition: i32)
    -> impl Future<Output = Result<WindowStart>> + Send;
    /// A window from `previous`, when the poller does not answer (`Statements::open_window`).
    fn open_window(
        &self,
        partition: i32,
        previous: &str,
    ) -> impl Future<Output = Result<WindowStart>> + Send;
    /// At most `limit` rows committed in `snapshot` with ids above `cursor`, in id order
    /// (`Statements::read_batch`).
    fn read_batch(
        &self,
        partition: i32,
        cursor: i64,
        snapshot: &str,
        limit: i64,
    ) -> impl Future<Output = Result<ReadRows>> + Send;
    /// At most `limit` rows committed in `snapshot`, not in `previous`, with ids in
    /// `(cursor, until]`, in id order (`Statements::read_late`).
    fn read_late(
        &self,
        partition: i32,
        cursor: i64,
        snapshot: &str,
        limit: i64,
        previous: &str,
        until: i64,
    ) -> impl Future<Output = Result<ReadRows>> + Send;
}

/// The prepared statements a reader uses, prepared on the worker's connection.
#[derive(Debug, Clone)]
pub struct ReadStatements {
    /// `Statements::read_batch`.
    pub batch: Statement,
    /// `Statements::read_late`.
    pub late: Statement,
}

/// [`ReadStore`] on a worker's session.
pub struct PgReadStore<'a> {
    client: &'a Client,
    sql: &'a Statements,
    statements: &'a ReadStatements,
}

impl<'a> PgReadStore<'a> {
    /// The reads on `client`, whose `statements` were prepared on it.
    pub fn new(client: &'a Client, sql: &'a Statements, statements: &'a ReadStatements) -> Self {
        PgReadStore {
            client,
            sql,
            statements,
        }
    }

    async fn window(
        &self,
        text: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        what: &'static str,
    ) -> Result<WindowStart> {
        let row = self
            .client
            .query_one(text, params)
            .await
            .map_err(Error::pg(what))?;
        Ok(WindowStart {
            snapshot: row.try_get(0).map_err(Error::pg(what))?,
            min_id: row.try_get(1).map_err(Error::pg(what))?,
        })
    }

    async fn rows(
        &self,
        statement: &Statement,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        what: &'static str,
    ) -> Result<ReadRows> {
        let rows = self
            .client
            .query(statement, params)
            .await
            .map_err(Error::pg(what))?;
        let parked_epoch = match rows.first() {
            Some(first) => first
                .try_get(PARKED_EPOCH_COLUMN)
                .map_err(Error::pg(what))?,
            None => None,
        };
        Ok(ReadRows {
            rows: rows
                .iter()
                .map(row_to_message)
                .collect::<std::result::Result<_, _>>()
                .map_err(Error::pg(what))?,
            parked_epoch,
        })
    }
}

impl ReadStore for PgReadStore<'_> {
    async fn open_first_window(&self, partition: i32) -> Result<WindowStart> {
        self.window(
            &self.sql.open_first_window,
            &[&partition],
            "opening the first read window",
        )
        .await
    }

    async fn open_window(&self, partition: i32, previous: &str) -> Result<WindowStart> {
        self.window(
            &self.sql.open_window,
            &[&partition, &previous],
            "opening a read window",
        )
        .await
    }

    async fn read_batch(
        &self,
        partition: i32,
        cursor: i64,
        snapshot: &str,
        limit: i64,
    ) -> Result<ReadRows> {
        self.rows(
            &self.statements.batch,
            &[&partition, &cursor, &snapshot, &limit],
            "reading a batch",
        )
        .await
    }

    async fn read_late(
        &self,
        partition: i32,
        cursor: i64,
        snapshot: &str,
        limit: i64,
        previous: &str,
        until: i64,
    ) -> Result<ReadRows> {
        self.rows(
            &self.statements.late,
            &[&partition, &cursor, &snapshot, &limit, &previous, &until],
            "reading late rows",
        )
        .await
    }
}

/// The column of a batch read that carries `settings.parked_epoch` (after the row columns).
pub(crate) const PARKED_EPOCH_COLUMN: usize = 10;

/// Decodes one row. The id, topic and entity key are NOT NULL columns of plain types: a
/// failure there means the table is not what the relay expects, an error for the caller. Any
/// other column that cannot be decoded marks the row as undecodable (see
/// [`OutboxRow::undecodable`]) instead of failing the batch or panicking.
pub(crate) fn row_to_message(
    row: &tokio_postgres::Row,
) -> std::result::Result<OutboxRow, tokio_postgres::Error> {
    let mut problems: Vec<String> = Vec::new();
    let kafka_key = lenient(row, 3, "kafka_key", &mut problems).flatten();
    let kafka_partition = lenient(row, 4, "kafka_partition", &mut problems).flatten();
    let payload = lenient(row, 5, "payload", &mut problems).flatten();
    let header_names = lenient(row, 6, "header_names", &mut problems).unwrap_or_default();
    let header_values = lenient(row, 7, "header_values", &mut problems).unwrap_or_default();
    let event_type = lenient(row, 8, "event_type", &mut problems).flatten();
    let created_at_epoch = lenient(row, 9, "created_at", &mut problems).unwrap_or_default();
    Ok(OutboxRow {
        id: row.try_get(0)?,
        topic: row.try_get(1)?,
        entity_key: row.try_get(2)?,
        kafka_key,
        kafka_partition,
        payload,
        header_names,
        header_values,
        event_type,
        created_at_epoch,
        undecodable: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

/// Column `index` of `row`, or `None` with the problem noted.
fn lenient<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r tokio_postgres::Row,
    index: usize,
    name: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    match row.try_get(index) {
        Ok(v) => Some(v),
        Err(e) => {
            problems.push(format!("column {name}: {e}"));
            None
        }
    }
}

/// An in-memory outbox partition for the reader's tests: rows commit at points of a logical
/// clock, a snapshot is such a point (`t<n>`), and each read returns what the statement it
/// stands for returns on PostgreSQL (visible in the snapshot means committed at or before
/// its point).
#[cfg(test)]
pub(crate) mod memory {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::{ReadRows, ReadStore, WindowStart};
    use crate::error::Result;
    use crate::pipeline::reader::OutboxRow;

    #[derive(Default)]
    struct Table {
        now: u64,
        /// By id: the row and when it committed (`None`: not yet).
        rows: BTreeMap<i64, (OutboxRow, Option<u64>)>,
        parked_epoch: i64,
        /// Statements run, by name.
        calls: Vec<&'static str>,
    }

    /// See the module docs.
    #[derive(Default)]
    pub(crate) struct MemoryStore(Mutex<Table>);

    fn point(snapshot: &str) -> u64 {
        snapshot
            .strip_prefix('t')
            .and_then(|n| n.parse().ok())
            .expect("a memory snapshot")
    }

    impl MemoryStore {
        fn table(&self) -> std::sync::MutexGuard<'_, Table> {
            self.0.lock().expect("memory store")
        }

        /// Writes `entity`'s message `id`, not committed yet.
        pub(crate) fn write(&self, id: i64, entity: &str) {
            self.table()
                .rows
                .insert(id, (OutboxRow::for_tests(id, entity, "t"), None));
        }

        /// Commits message `id` now.
        pub(crate) fn commit(&self, id: i64) {
            let mut t = self.table();
            t.now += 1;
            let now = t.now;
            if let Some(row) = t.rows.get_mut(&id) {
                row.1 = Some(now);
            }
        }

        /// Deletes published messages (a retirement).
        pub(crate) fn delete(&self, ids: &[i64]) {
            let mut t = self.table();
            for id in ids {
                t.rows.remove(id);
            }
        }

        /// An unpark elsewhere: the parked epoch moves on.
        pub(crate) fn bump_parked_epoch(&self) {
            self.table().parked_epoch += 1;
        }

        /// The current snapshot.
        pub(crate) fn snapshot(&self) -> String {
            format!("t{}", self.table().now)
        }

        /// What the wake-up poller finds after `previous`: the current snapshot and the
        /// smallest id committed since (`None`: nothing new).
        pub(crate) fn poll(&self, previous: &str) -> (String, Option<i64>) {
            let t = self.table();
            let after = point(previous);
            let min = t
                .rows
                .iter()
                .find(|(_, (_, c))| c.is_some_and(|c| c > after))
                .map(|(id, _)| *id);
            (format!("t{}", t.now), min)
        }

        /// The statements run so far, by name, and forgets them.
        pub(crate) fn take_calls(&self) -> Vec<&'static str> {
            std::mem::take(&mut self.table().calls)
        }

        fn rows(
            &self,
            call: &'static str,
            keep: impl Fn(i64, u64) -> bool,
            limit: i64,
        ) -> ReadRows {
            let mut t = self.table();
            t.calls.push(call);
            let rows: Vec<OutboxRow> = t
                .rows
                .iter()
                .filter_map(|(id, (row, c))| c.filter(|&c| keep(*id, c)).map(|_| row.clone()))
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .collect();
            let parked_epoch = (!rows.is_empty()).then_some(t.parked_epoch);
            ReadRows { rows, parked_epoch }
        }

        fn window(&self, call: &'static str, after: Option<u64>) -> WindowStart {
            let mut t = self.table();
            t.calls.push(call);
            let min_id = t
                .rows
                .iter()
                .find(|(_, (_, c))| c.is_some_and(|c| after.is_none_or(|a| c > a)))
                .map(|(id, _)| *id);
            WindowStart {
                snapshot: format!("t{}", t.now),
                min_id,
            }
        }
    }

    impl ReadStore for MemoryStore {
        async fn open_first_window(&self, _partition: i32) -> Result<WindowStart> {
            Ok(self.window("open_first_window", None))
        }

        async fn open_window(&self, _partition: i32, previous: &str) -> Result<WindowStart> {
            Ok(self.window("open_window", Some(point(previous))))
        }

        async fn read_batch(
            &self,
            _partition: i32,
            cursor: i64,
            snapshot: &str,
            limit: i64,
        ) -> Result<ReadRows> {
            let at = point(snapshot);
            Ok(self.rows("read_batch", |id, c| id > cursor && c <= at, limit))
        }

        async fn read_late(
            &self,
            _partition: i32,
            cursor: i64,
            snapshot: &str,
            limit: i64,
            previous: &str,
            until: i64,
        ) -> Result<ReadRows> {
            let (at, before) = (point(snapshot), point(previous));
            Ok(self.rows(
                "read_late",
                |id, c| id > cursor && id <= until && c <= at && c > before,
                limit,
            ))
        }
    }
}
