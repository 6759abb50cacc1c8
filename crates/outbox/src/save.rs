//! Writing messages: the `Outbox` handle with `save_in_tx` and `save_all_in_tx`. Both call
//! the schema's SQL function `enqueue` (the same one services in other languages reach
//! through `save_message`), so there is one implementation of the write path. Each call is
//! one round trip: parse, bind and execute travel together.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Statement, Transaction};

use crate::error::{Error, Result};
use crate::message::Message;
use crate::schema::Schema;

/// The default of the database's `settings.max_record_bytes` (see
/// [`Message::record_bytes`]): it fits librdkafka's default `message.max.bytes` and Kafka's
/// default broker limit.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1_000_000;

/// How long a handle trusts the record limit it read from the database before it reads it
/// again (an operator may change `settings.max_record_bytes` while services run).
const RECORD_LIMIT_TTL: Duration = Duration::from_secs(60);

/// A handle carrying non-default settings: the schema name and optional client-side size
/// caps. Cheap to clone; build one at startup and share it. The free functions
/// [`save_in_tx`] and [`save_all_in_tx`] use `Outbox::default()`.
///
/// The limit every message must fit is the database's `settings.max_record_bytes`, the one
/// place it is configured: the SQL functions enforce it, and the handle checks it before it
/// sends a message (reading it once a minute), so that an oversized message is refused without
/// aborting the caller's transaction.
#[derive(Debug, Clone)]
pub struct Outbox {
    schema: Schema,
    max_payload_bytes: Option<usize>,
    max_header_bytes: Option<usize>,
    // The SQL text depends on the schema name only, so it is built once here.
    enqueue_sql: String,
    enqueue_batch_sql: String,
    record_limit_sql: String,
    record_limit: Arc<Mutex<Option<(Instant, usize)>>>,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new(Schema::default())
    }
}

impl Outbox {
    /// A handle for the outbox tables in `schema`, without client-side caps.
    pub fn new(schema: Schema) -> Self {
        let s = schema.name();
        Outbox {
            enqueue_sql: format!("SELECT {s}.enqueue($1, $2, $3, $4, $5, $6, $7, $8)"),
            enqueue_batch_sql: format!(
                "SELECT * FROM {s}.enqueue_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ),
            record_limit_sql: format!("SELECT max_record_bytes FROM {s}.settings"),
            record_limit: Arc::new(Mutex::new(None)),
            schema,
            max_payload_bytes: None,
            max_header_bytes: None,
        }
    }

    /// Refuses payloads larger than `max` bytes in this client, a cap stricter than the
    /// database's record limit (which applies anyway). Default: none.
    pub fn with_max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload_bytes = Some(max);
        self
    }

    /// Refuses headers whose names and values together exceed `max` bytes in this client, a
    /// cap stricter than the database's record limit (which applies anyway). Default: none.
    pub fn with_max_header_bytes(mut self, max: usize) -> Self {
        self.max_header_bytes = Some(max);
        self
    }

    /// The schema this handle writes to.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Writes `msg` inside the caller's transaction and returns its id. The message becomes
    /// visible to the relay when, and only if, the transaction commits.
    ///
    /// Takes a row lock on the entity's mapping row until the transaction ends, so writers of
    /// one entity are serialized and its ids follow commit order.
    pub async fn save_in_tx(&self, tx: &Transaction<'_>, msg: &Message) -> Result<i64> {
        self.save_one(tx, msg, Target::Text(&self.enqueue_sql))
            .await
    }

    async fn save_one(
        &self,
        tx: &Transaction<'_>,
        msg: &Message,
        target: Target<'_>,
    ) -> Result<i64> {
        self.check_limits(msg)?;
        self.check_record(tx, msg).await?;
        let params: [(&(dyn ToSql + Sync), Type); 8] = [
            (&msg.topic, Type::TEXT),
            (&msg.entity_key, Type::TEXT),
            (&msg.payload, Type::BYTEA),
            (&msg.kafka_key, Type::BYTEA),
            (&msg.kafka_partition, Type::INT4),
            (&msg.header_names, Type::TEXT_ARRAY),
            (&msg.header_values, Type::BYTEA_ARRAY),
            (&msg.event_type, Type::TEXT),
        ];
        let rows = target
            .query(tx, &params)
            .await
            .map_err(|e| self.map_db_error(e, "saving a message"))?;
        rows.first()
            .map(|r| r.get(0))
            .ok_or_else(|| self.schema_not_ready("enqueue returned no row"))
    }

    /// Writes all `msgs` inside the caller's transaction in one round trip and returns their
    /// ids in the same order (they increase along the slice). Either every message is written or none is: one invalid
    /// message refuses the whole batch before anything is sent.
    ///
    /// The batch's entity rows are locked in key order, which keeps concurrent batches from
    /// deadlocking in the common case; with other row locks the caller holds, a deadlock is
    /// still possible (PostgreSQL aborts one transaction and [`Error::is_retryable`] is true).
    pub async fn save_all_in_tx(&self, tx: &Transaction<'_>, msgs: &[Message]) -> Result<Vec<i64>> {
        self.save_many(tx, msgs, Target::Text(&self.enqueue_batch_sql))
            .await
    }

    async fn save_many(
        &self,
        tx: &Transaction<'_>,
        msgs: &[Message],
        target: Target<'_>,
    ) -> Result<Vec<i64>> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        for m in msgs {
            self.check_limits(m)?;
        }
        for m in msgs {
            self.check_record(tx, m).await?;
        }
        let topics: Vec<&str> = msgs.iter().map(|m| m.topic.as_str()).collect();
        let keys: Vec<&str> = msgs.iter().map(|m| m.entity_key.as_str()).collect();
        let payloads: Vec<Option<&[u8]>> = msgs.iter().map(|m| m.payload.as_deref()).collect();
        let kafka_keys: Vec<Option<&[u8]>> = msgs.iter().map(|m| m.kafka_key.as_deref()).collect();
        let kafka_partitions: Vec<Option<i32>> = msgs.iter().map(|m| m.kafka_partition).collect();
        let event_types: Vec<Option<&str>> = msgs.iter().map(|m| m.event_type.as_deref()).collect();
        // Headers travel flattened (PostgreSQL arrays must be rectangular), each message
        // addressing its slice by offset and count.
        let mut h_off = Vec::with_capacity(msgs.len());
        let mut h_cnt = Vec::with_capacity(msgs.len());
        let mut h_names: Vec<&str> = Vec::new();
        let mut h_values: Vec<&[u8]> = Vec::new();
        for m in msgs {
            h_off.push(to_i32(h_names.len())?);
            h_cnt.push(to_i32(m.header_names.len())?);
            h_names.extend(m.header_names.iter().map(String::as_str));
            h_values.extend(m.header_values.iter().map(Vec::as_slice));
        }
        let params: [(&(dyn ToSql + Sync), Type); 10] = [
            (&topics, Type::TEXT_ARRAY),
            (&keys, Type::TEXT_ARRAY),
            (&payloads, Type::BYTEA_ARRAY),
            (&kafka_keys, Type::BYTEA_ARRAY),
            (&kafka_partitions, Type::INT4_ARRAY),
            (&event_types, Type::TEXT_ARRAY),
            (&h_off, Type::INT4_ARRAY),
            (&h_cnt, Type::INT4_ARRAY),
            (&h_names, Type::TEXT_ARRAY),
            (&h_values, Type::BYTEA_ARRAY),
        ];
        let rows = target
            .query(tx, &params)
            .await
            .map_err(|e| self.map_db_error(e, "saving a batch of messages"))?;
        // The ids were taken in input order; the order rows come back in is not promised.
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        if ids.len() != msgs.len() {
            // enqueue_batch raises an error rather than writing part of a batch; a short answer
            // means the function in the database is not the one this library was built for.
            return Err(Error::IncompleteBatch {
                messages: msgs.len(),
                ids: ids.len(),
            });
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Prepares the write statements on `client`'s connection, so that each save is bound
    /// and executed without being parsed again. Use the result only with transactions of
    /// that same connection (a statement prepared on another one does not exist there).
    pub async fn prepare(&self, client: &tokio_postgres::Client) -> Result<PreparedOutbox> {
        let prepare = |sql: String| async move {
            client
                .prepare(&sql)
                .await
                .map_err(|e| self.map_db_error(e, "preparing the save statements"))
        };
        Ok(PreparedOutbox {
            enqueue: prepare(self.enqueue_sql.clone()).await?,
            enqueue_batch: prepare(self.enqueue_batch_sql.clone()).await?,
            outbox: self.clone(),
        })
    }

    /// The client-side caps, when set.
    fn check_limits(&self, msg: &Message) -> Result<()> {
        let size = msg.payload_len();
        if let Some(max) = self.max_payload_bytes
            && size > max
        {
            return Err(Error::PayloadTooLarge {
                entity_key: msg.entity_key.clone(),
                size,
                max,
            });
        }
        let size = msg.headers_len();
        if let Some(max) = self.max_header_bytes
            && size > max
        {
            return Err(Error::HeadersTooLarge {
                entity_key: msg.entity_key.clone(),
                size,
                max,
            });
        }
        Ok(())
    }

    /// The database's record limit, before anything is sent (the SQL functions check it too,
    /// but a refusal there aborts the caller's transaction).
    async fn check_record(&self, tx: &Transaction<'_>, msg: &Message) -> Result<()> {
        let size = msg.record_bytes();
        // Every message fits a limit this small; no need to ask the database.
        if size <= 1024 {
            return Ok(());
        }
        let max = self.record_limit(tx).await?;
        if size > max {
            return Err(Error::RecordTooLarge {
                entity_key: msg.entity_key.clone(),
                size,
                max,
            });
        }
        Ok(())
    }

    /// `settings.max_record_bytes`, read at most once a minute.
    async fn record_limit(&self, tx: &Transaction<'_>) -> Result<usize> {
        let cached = match self.record_limit.lock() {
            Ok(g) => *g,
            Err(poisoned) => *poisoned.into_inner(),
        };
        if let Some((at, max)) = cached
            && at.elapsed() < RECORD_LIMIT_TTL
        {
            return Ok(max);
        }
        let row = tx
            .query_opt(&self.record_limit_sql, &[])
            .await
            .map_err(|e| self.map_db_error(e, "reading the record limit"))?
            .ok_or_else(|| self.schema_not_ready("its settings row is missing"))?;
        let max: i32 = row
            .try_get(0)
            .map_err(|e| self.map_db_error(e, "reading the record limit"))?;
        let max = usize::try_from(max).unwrap_or(DEFAULT_MAX_RECORD_BYTES);
        let mut guard = match self.record_limit.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Some((Instant::now(), max));
        Ok(max)
    }

    /// Turns the errors the SQL functions raise on purpose into typed errors: a missing
    /// schema or function (say what to run instead of passing on "function outbox.enqueue does
    /// not exist"), a missing settings row, a record above the limit.
    fn map_db_error(&self, e: tokio_postgres::Error, context: &'static str) -> Error {
        let Some(db) = e.as_db_error() else {
            return Error::Database { context, source: e };
        };
        let code = db.code();
        if *code == SqlState::INVALID_SCHEMA_NAME
            || *code == SqlState::UNDEFINED_FUNCTION
            || *code == SqlState::UNDEFINED_TABLE
            || *code == SqlState::UNDEFINED_COLUMN
        {
            return self.schema_not_ready("missing or not migrated");
        }
        if *code == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE {
            return self.schema_not_ready(db.message());
        }
        if *code == SqlState::PROGRAM_LIMIT_EXCEEDED
            && let Some((size, max)) = db.detail().and_then(parse_size_detail)
        {
            let entity_key = db
                .message()
                .split_once("(entity '")
                .and_then(|(_, rest)| rest.rsplit_once("')"))
                .map(|(key, _)| key.replace("''", "'"))
                .unwrap_or_default();
            return Error::RecordTooLarge {
                entity_key,
                size,
                max,
            };
        }
        Error::Database { context, source: e }
    }

    fn schema_not_ready(&self, problem: &str) -> Error {
        Error::SchemaNotReady {
            schema: self.schema.name().to_owned(),
            problem: problem.to_owned(),
        }
    }
}

/// An [`Outbox`] whose statements are prepared on one connection: keep one per pooled
/// connection (or use `deadpool_postgres`'s statement cache) when the parse time matters.
#[derive(Debug, Clone)]
pub struct PreparedOutbox {
    outbox: Outbox,
    enqueue: Statement,
    enqueue_batch: Statement,
}

impl PreparedOutbox {
    /// [`Outbox::save_in_tx`] with the prepared statement.
    pub async fn save_in_tx(&self, tx: &Transaction<'_>, msg: &Message) -> Result<i64> {
        self.outbox
            .save_one(tx, msg, Target::Prepared(&self.enqueue))
            .await
    }

    /// [`Outbox::save_all_in_tx`] with the prepared statement.
    pub async fn save_all_in_tx(&self, tx: &Transaction<'_>, msgs: &[Message]) -> Result<Vec<i64>> {
        self.outbox
            .save_many(tx, msgs, Target::Prepared(&self.enqueue_batch))
            .await
    }
}

/// How a save reaches the server: SQL text sent with explicit parameter types (parse, bind
/// and execute in one round trip), or a statement prepared earlier (bind and execute).
enum Target<'a> {
    Text(&'a str),
    Prepared(&'a Statement),
}

impl Target<'_> {
    async fn query(
        &self,
        tx: &Transaction<'_>,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        match self {
            Target::Text(sql) => tx.query_typed(sql, params).await,
            Target::Prepared(statement) => {
                let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
                tx.query(*statement, &values).await
            }
        }
    }
}

fn to_i32(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::HeadersTooLarge {
        entity_key: String::new(),
        size: n,
        max: i32::MAX as usize,
    })
}

static DEFAULT_OUTBOX: LazyLock<Outbox> = LazyLock::new(Outbox::default);

/// Writes `msg` into the `outbox` schema inside the caller's transaction; see
/// [`Outbox::save_in_tx`]. Works with a `deadpool_postgres::Transaction` too (it derefs to
/// `tokio_postgres::Transaction`).
pub async fn save_in_tx(tx: &Transaction<'_>, msg: &Message) -> Result<i64> {
    DEFAULT_OUTBOX.save_in_tx(tx, msg).await
}

/// Writes all `msgs` into the `outbox` schema in one round trip; see
/// [`Outbox::save_all_in_tx`].
pub async fn save_all_in_tx(tx: &Transaction<'_>, msgs: &[Message]) -> Result<Vec<i64>> {
    DEFAULT_OUTBOX.save_all_in_tx(tx, msgs).await
}

/// Reads `size=N max=M`, the detail of the SQL functions' record-size refusal.
fn parse_size_detail(detail: &str) -> Option<(usize, usize)> {
    let mut size = None;
    let mut max = None;
    for part in detail.split_whitespace() {
        if let Some(v) = part.strip_prefix("size=") {
            size = v.parse().ok();
        } else if let Some(v) = part.strip_prefix("max=") {
            max = v.parse().ok();
        }
    }
    Some((size?, max?))
}
