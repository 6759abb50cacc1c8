//! `outboxd dead-letters`: the messages moved aside (by the `dead_letter` and `park_entity`
//! policies, or `outboxd skip`), listed, shown, retried or dropped by an operator.
//!
//! **Retry keeps order or refuses.** A message parked its entity (`park_entity`): every
//! later message of the entity still waits, held back, so the message can go back ahead of
//! them: it returns to the outbox table with its own id (in its entity's partition, the
//! mapping locked as a writer locks it) and the entity is released in the same transaction;
//! relays reread and publish it first. A message moved aside by `dead_letter` or `skip` (or
//! whose entity was unparked since) was overtaken: later messages of its entity may already
//! be in Kafka, so putting it back would break the entity's order. That retry is refused,
//! with the reason.

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{Error, Result};

/// One dead letter, as `list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The message id (`outbox-id`).
    pub id: i64,
    /// Its virtual partition.
    pub partition: i32,
    /// Its topic.
    pub topic: String,
    /// Its entity.
    pub entity_key: String,
    /// `dead_letter`, `park_entity` or `skip`.
    pub policy: String,
    /// True while its entity is parked on it (retry puts it back in order).
    pub parks_its_entity: bool,
    /// When it was moved aside (RFC 3339).
    pub failed_at: String,
    /// Why.
    pub error: String,
    /// Payload size in bytes (`None`: a tombstone).
    pub payload_bytes: Option<i32>,
}

/// One dead letter in full.
#[derive(Debug, Clone, Serialize)]
pub struct Detail {
    /// What `list` shows.
    #[serde(flatten)]
    pub summary: Summary,
    /// The Kafka key, base64.
    pub kafka_key_base64: Option<String>,
    /// An explicit Kafka partition.
    pub kafka_partition: Option<i32>,
    /// The payload as text, when it is UTF-8.
    pub payload_text: Option<String>,
    /// The payload, base64.
    pub payload_base64: Option<String>,
    /// Header names and values (values as text, lossy).
    pub headers: Vec<(String, Option<String>)>,
    /// The event type.
    pub event_type: Option<String>,
    /// When the message was written (RFC 3339).
    pub created_at: String,
}

/// What `list` filters by.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this entity.
    pub entity_key: Option<String>,
    /// At most this many, oldest id first.
    pub limit: i64,
}

const SUMMARY_COLUMNS: &str = "d.id, d.partition, d.topic, d.entity_key, d.policy,
    EXISTS (SELECT 1 FROM {s}.parked_entity p WHERE p.entity_key = d.entity_key AND p.message_id = d.id),
    to_char(d.failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), d.error,
    octet_length(d.payload)";

fn summary(row: &tokio_postgres::Row) -> std::result::Result<Summary, tokio_postgres::Error> {
    Ok(Summary {
        id: row.try_get(0)?,
        partition: row.try_get(1)?,
        topic: row.try_get(2)?,
        entity_key: row.try_get(3)?,
        policy: row.try_get(4)?,
        parks_its_entity: row.try_get(5)?,
        failed_at: row.try_get(6)?,
        error: row.try_get(7)?,
        payload_bytes: row.try_get(8)?,
    })
}

/// Lists dead letters, oldest id first.
pub async fn list(
    client: &Client,
    schema: &outbox::Schema,
    filter: &Filter,
) -> Result<Vec<Summary>> {
    let s = schema.name();
    let columns = SUMMARY_COLUMNS.replace("{s}", s);
    client
        .query(
            &format!(
                "SELECT {columns} FROM {s}.dead_letter d
                  WHERE ($1::text IS NULL OR d.topic = $1) AND ($2::text IS NULL OR d.entity_key = $2)
                  ORDER BY d.id LIMIT $3"
            ),
            &[&filter.topic, &filter.entity_key, &filter.limit],
        )
        .await
        .map_err(Error::pg("listing dead letters"))?
        .iter()
        .map(summary)
        .collect::<std::result::Result<_, _>>()
        .map_err(Error::pg("listing dead letters"))
}

/// One dead letter in full.
pub async fn show(client: &Client, schema: &outbox::Schema, id: i64) -> Result<Detail> {
    let s = schema.name();
    let columns = SUMMARY_COLUMNS.replace("{s}", s);
    let row = client
        .query_opt(
            &format!(
                "SELECT {columns}, encode(d.kafka_key, 'base64'), d.kafka_partition,
                        CASE WHEN d.payload IS NOT NULL THEN encode(d.payload, 'base64') END,
                        d.header_names,
                        ARRAY(SELECT encode(v, 'escape') FROM unnest(d.header_values) v),
                        d.event_type,
                        to_char(d.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                        d.payload
                   FROM {s}.dead_letter d WHERE d.id = $1"
            ),
            &[&id],
        )
        .await
        .map_err(Error::pg("reading the dead letter"))?
        .ok_or_else(|| Error::NotFound(format!("no dead letter with id {id}")))?;
    detail(&row).map_err(Error::pg("reading the dead letter"))
}

fn detail(row: &tokio_postgres::Row) -> std::result::Result<Detail, tokio_postgres::Error> {
    let names: Vec<String> = row.try_get(12)?;
    let values: Vec<Option<String>> = row.try_get(13)?;
    let payload: Option<Vec<u8>> = row.try_get(16)?;
    Ok(Detail {
        summary: summary(row)?,
        kafka_key_base64: row.try_get(9)?,
        kafka_partition: row.try_get(10)?,
        payload_base64: row.try_get(11)?,
        payload_text: payload.and_then(|p| String::from_utf8(p).ok()),
        headers: names.into_iter().zip(values).collect(),
        event_type: row.try_get(14)?,
        created_at: row.try_get(15)?,
    })
}

/// Puts a parked entity's message back ahead of the entity's held-back messages and releases
/// the entity; refuses (with the reason) a message that was overtaken. Returns the partition
/// it went back to.
pub async fn retry(client: &mut Client, schema: &outbox::Schema, id: i64) -> Result<i32> {
    let s = schema.name();
    let tx = client
        .transaction()
        .await
        .map_err(Error::pg("starting the retry"))?;
    let row = tx
        .query_opt(
            &format!(
                "WITH target AS (
                     SELECT d.* FROM {s}.dead_letter d
                       JOIN {s}.parked_entity p ON p.entity_key = d.entity_key AND p.message_id = d.id
                      WHERE d.id = $1
                        FOR UPDATE OF d, p
                 ), mapping AS (
                     INSERT INTO {s}.entity_partition (entity_key, partition)
                     SELECT entity_key, partition FROM target
                     ON CONFLICT (entity_key) DO UPDATE SET entity_key = EXCLUDED.entity_key
                     RETURNING entity_key, partition
                 ), back AS (
                     INSERT INTO {s}.message (partition, id, topic, entity_key, kafka_key,
                                              kafka_partition, payload, header_names,
                                              header_values, event_type, created_at)
                     OVERRIDING SYSTEM VALUE
                     SELECT m.partition, t.id, t.topic, t.entity_key, t.kafka_key,
                            t.kafka_partition, t.payload, t.header_names, t.header_values,
                            t.event_type, t.created_at
                       FROM target t JOIN mapping m USING (entity_key)
                     RETURNING id, entity_key, partition
                 ), gone AS (
                     DELETE FROM {s}.dead_letter d USING back WHERE d.id = back.id RETURNING 1
                 ), released AS (
                     DELETE FROM {s}.parked_entity p USING back
                      WHERE p.entity_key = back.entity_key RETURNING 1
                 ), epoch AS (
                     UPDATE {s}.settings SET parked_epoch = parked_epoch + 1
                      WHERE EXISTS (SELECT 1 FROM released) RETURNING 1
                 )
                 SELECT back.partition FROM back"
            ),
            &[&id],
        )
        .await
        .map_err(Error::pg("putting the message back"))?;
    let Some(row) = row else {
        drop(tx);
        return Err(why_not(client, schema, id).await?);
    };
    let partition: i32 = row
        .try_get(0)
        .map_err(Error::pg("putting the message back"))?;
    tx.commit()
        .await
        .map_err(Error::pg("committing the retry"))?;
    Ok(partition)
}

/// Why a dead letter cannot go back in order.
async fn why_not(client: &Client, schema: &outbox::Schema, id: i64) -> Result<Error> {
    let s = schema.name();
    let row = client
        .query_opt(
            &format!("SELECT policy, entity_key FROM {s}.dead_letter WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(Error::pg("reading the dead letter"))?;
    let Some(row) = row else {
        return Ok(Error::NotFound(format!("no dead letter with id {id}")));
    };
    let policy: String = row
        .try_get(0)
        .map_err(Error::pg("reading the dead letter"))?;
    let entity: String = row
        .try_get(1)
        .map_err(Error::pg("reading the dead letter"))?;
    let why = if policy == "park_entity" {
        format!(
            "entity {entity:?} was released (unparked) after message {id} was moved aside: its later messages may already be in Kafka, and putting {id} back would place it after them"
        )
    } else {
        format!(
            "message {id} was moved aside by {policy}: the later messages of entity {entity:?} went on past it and may already be in Kafka, so it cannot go back in order (only messages that parked their entity can); drop it, or publish its content anew if the entity's consumers accept it out of order"
        )
    };
    Ok(Error::Refused(why))
}

/// Deletes a dead letter for good; refuses one its entity is parked on (unpark or retry it).
pub async fn drop_message(client: &Client, schema: &outbox::Schema, id: i64) -> Result<()> {
    let s = schema.name();
    let row = client
        .query_opt(
            &format!(
                "WITH d AS (SELECT entity_key FROM {s}.dead_letter WHERE id = $1),
                      dropped AS (
                     DELETE FROM {s}.dead_letter WHERE id = $1
                        AND NOT EXISTS (SELECT 1 FROM {s}.parked_entity p WHERE p.message_id = $1)
                     RETURNING id
                 )
                 SELECT (SELECT entity_key FROM d), EXISTS (SELECT 1 FROM dropped)"
            ),
            &[&id],
        )
        .await
        .map_err(Error::pg("dropping the dead letter"))?
        .ok_or_else(|| Error::NotFound(format!("no dead letter with id {id}")))?;
    let entity: Option<String> = row
        .try_get(0)
        .map_err(Error::pg("dropping the dead letter"))?;
    let dropped: bool = row
        .try_get(1)
        .map_err(Error::pg("dropping the dead letter"))?;
    match (entity, dropped) {
        (None, _) => Err(Error::NotFound(format!("no dead letter with id {id}"))),
        (Some(_), true) => Ok(()),
        (Some(entity), false) => Err(Error::Refused(format!(
            "entity {entity:?} is parked on message {id}: retry it (`outboxd dead-letters retry {id}`) or release the entity first (`outboxd unpark {entity}`)"
        ))),
    }
}
