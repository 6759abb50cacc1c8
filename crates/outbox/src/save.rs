//! Writing messages: the `Outbox` handle with `save_in_tx` and `save_all_in_tx`. Both call
//! the schema's SQL function `enqueue` (the same one services in other languages reach
//! through `save_message`), so there is one implementation of the write path. Each call is
//! one round trip: parse, bind and execute travel together.

use std::sync::LazyLock;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Statement, Transaction};

use crate::error::{Error, Result};
use crate::message::Message;
use crate::schema::Schema;

/// Default [`Outbox::max_payload_bytes`]: 1 MiB, Kafka's default `message.max.bytes`.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Default [`Outbox::max_header_bytes`]: 64 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;

/// A handle carrying non-default settings: the schema name and the size limits. Cheap to
/// clone; build one at startup and share it. The free functions [`save_in_tx`] and
/// [`save_all_in_tx`] use `Outbox::default()`.
#[derive(Debug, Clone)]
pub struct Outbox {
    schema: Schema,
    max_payload_bytes: usize,
    max_header_bytes: usize,
    // The SQL text depends on the schema name only, so it is built once here.
    enqueue_sql: String,
    enqueue_batch_sql: String,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new(Schema::default())
    }
}

impl Outbox {
    /// A handle for the outbox tables in `schema`, with default limits.
    pub fn new(schema: Schema) -> Self {
        let s = schema.name();
        Outbox {
            enqueue_sql: format!("SELECT {s}.enqueue($1, $2, $3, $4, $5, $6, $7, $8)"),
            enqueue_batch_sql: format!(
                "SELECT * FROM {s}.enqueue_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ),
            schema,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
        }
    }

    /// Sets the largest payload accepted, in bytes. Default: [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub fn with_max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload_bytes = max;
        self
    }

    /// Sets the largest total of header names and values accepted, in bytes.
    /// Default: [`DEFAULT_MAX_HEADER_BYTES`].
    pub fn with_max_header_bytes(mut self, max: usize) -> Self {
        self.max_header_bytes = max;
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

    fn check_limits(&self, msg: &Message) -> Result<()> {
        let size = msg.payload_len();
        if size > self.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                entity_key: msg.entity_key.clone(),
                size,
                max: self.max_payload_bytes,
            });
        }
        let size = msg.headers_len();
        if size > self.max_header_bytes {
            return Err(Error::HeadersTooLarge {
                entity_key: msg.entity_key.clone(),
                size,
                max: self.max_header_bytes,
            });
        }
        Ok(())
    }

    /// A missing schema or function shows up as these SQLSTATEs; say what to run instead of
    /// passing on "function outbox.enqueue does not exist".
    fn map_db_error(&self, e: tokio_postgres::Error, context: &'static str) -> Error {
        match e.code() {
            Some(c)
                if *c == SqlState::INVALID_SCHEMA_NAME || *c == SqlState::UNDEFINED_FUNCTION =>
            {
                self.schema_not_ready("missing or not migrated")
            }
            _ => Error::Database { context, source: e },
        }
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
