//! `outboxd partitions`: the operator's levers on virtual partitions. `resize` changes
//! `settings.partition_count` (what an operator did with raw SQL before) and reports what
//! still waits above a lowered count; `pause` and `resume` take one partition out of the
//! relays' hands on purpose (the relays give a paused partition no owner; its messages wait,
//! the others flow). All three change `settings`: run them as the schema's owner.

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{Error, Result};

/// The most virtual partitions (`settings.partition_count`'s check).
pub const MAX_PARTITIONS: i32 = 4096;

/// What remains above the partition count while it drains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AboveCount {
    /// The partition count.
    pub count: i32,
    /// Partitions at or above it that still hold messages.
    pub partitions: Vec<i32>,
    /// Messages waiting in them (counted up to 1,000,000).
    pub waiting: i64,
    /// Entities still mapped at or above it (counted up to 1,000,000): each keeps its
    /// partition while messages of its wait, and is remapped below the count afterwards.
    pub mapped_entities: i64,
}

/// Sets the partition count; returns the previous one.
pub async fn resize(client: &Client, schema: &outbox::Schema, count: i32) -> Result<i32> {
    if !(1..=MAX_PARTITIONS).contains(&count) {
        return Err(Error::Config(vec![format!(
            "the partition count must be between 1 and {MAX_PARTITIONS}, not {count}"
        )]));
    }
    let s = schema.name();
    client
        .query_one(
            &format!(
                "WITH old AS (SELECT partition_count FROM {s}.settings)
                 UPDATE {s}.settings SET partition_count = $1
                 RETURNING (SELECT partition_count FROM old)"
            ),
            &[&count],
        )
        .await
        .map_err(Error::pg("changing the partition count"))?
        .try_get(0)
        .map_err(Error::pg("changing the partition count"))
}

/// What still waits, or is mapped, at or above the partition count.
pub async fn above_count(client: &Client, schema: &outbox::Schema) -> Result<AboveCount> {
    let s = schema.name();
    let row = client
        .query_one(
            &format!(
                "SELECT st.partition_count,
                        ARRAY(SELECT p FROM generate_series(st.partition_count,
                                  (SELECT max(partition) FROM {s}.message)) p
                               WHERE EXISTS (SELECT 1 FROM {s}.message m WHERE m.partition = p)
                               ORDER BY p),
                        (SELECT count(*) FROM (SELECT 1 FROM {s}.message m
                                                WHERE m.partition >= st.partition_count
                                                LIMIT 1000000) w),
                        (SELECT count(*) FROM (SELECT 1 FROM {s}.entity_partition e
                                                WHERE e.partition >= st.partition_count
                                                LIMIT 1000000) e)
                   FROM {s}.settings st"
            ),
            &[],
        )
        .await
        .map_err(Error::pg("reading what waits above the count"))?;
    let decode = |row: &tokio_postgres::Row| {
        Ok::<_, tokio_postgres::Error>(AboveCount {
            count: row.try_get(0)?,
            partitions: row.try_get(1)?,
            waiting: row.try_get(2)?,
            mapped_entities: row.try_get(3)?,
        })
    };
    decode(&row).map_err(Error::pg("reading what waits above the count"))
}

/// Pauses `partition`, recording `reason`.
pub async fn pause(
    client: &Client,
    schema: &outbox::Schema,
    partition: i32,
    reason: &str,
) -> Result<()> {
    if !(0..MAX_PARTITIONS).contains(&partition) {
        return Err(Error::Config(vec![format!(
            "a partition is between 0 and {}, not {partition}",
            MAX_PARTITIONS - 1
        )]));
    }
    let s = schema.name();
    client
        .execute(
            &format!(
                "UPDATE {s}.settings SET paused_partitions = paused_partitions
                     || jsonb_build_object($1::int4::text,
                            jsonb_build_object('reason', $2::text, 'since', now()))"
            ),
            &[&partition, &reason],
        )
        .await
        .map_err(Error::pg("pausing the partition"))?;
    Ok(())
}

/// Resumes `partition`; not found when it was not paused.
pub async fn resume(client: &Client, schema: &outbox::Schema, partition: i32) -> Result<()> {
    let s = schema.name();
    let resumed = client
        .query_opt(
            &format!(
                "UPDATE {s}.settings SET paused_partitions = paused_partitions - $1::int4::text
                  WHERE paused_partitions ? $1::int4::text RETURNING 1"
            ),
            &[&partition],
        )
        .await
        .map_err(Error::pg("resuming the partition"))?;
    match resumed {
        Some(_) => Ok(()),
        None => Err(Error::NotFound(format!(
            "partition {partition} is not paused"
        ))),
    }
}
