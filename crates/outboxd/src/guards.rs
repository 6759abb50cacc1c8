//! Checks the relay makes before it starts, for database states that would silently break
//! its guarantees (refused) or its host (warned about).
//!
//! The message ids come from the table's identity sequence, and per-entity order rests on
//! them: a writer takes its id after the entity's previous writer committed, so ids follow
//! commit order, and consumers de-duplicate by the `outbox-id` header. A sequence with a
//! cache larger than 1 hands each session a range of its own (a later commit can get a
//! smaller id), a cycling sequence starts over, and a sequence set back below ids already
//! used (`ALTER SEQUENCE ... RESTART`, `setval`) issues ids that consumers have seen: all
//! three reorder or drop messages. The relay refuses to start on such a sequence.

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::sql::Statements;

/// Refuses to start when the id sequence is cached, cycles, or was set back below the ids in
/// the outbox or dead-letter table.
pub async fn check_id_sequence(client: &Client, sql: &Statements) -> Result<()> {
    let row = client
        .query_one(&sql.id_sequence, &[])
        .await
        .map_err(Error::pg("checking the message id sequence"))?;
    let name: Option<String> = row
        .try_get(0)
        .map_err(Error::pg("checking the message id sequence"))?;
    let cache: Option<i64> = row
        .try_get(1)
        .map_err(Error::pg("checking the message id sequence"))?;
    let cycles: Option<bool> = row
        .try_get(2)
        .map_err(Error::pg("checking the message id sequence"))?;
    let last_value: Option<i64> = row
        .try_get(3)
        .map_err(Error::pg("checking the message id sequence"))?;
    let highest_used: Option<i64> = row
        .try_get(4)
        .map_err(Error::pg("checking the message id sequence"))?;
    let name = name.unwrap_or_else(|| "the message id sequence".to_owned());
    let mut problems = Vec::new();
    if cache.is_some_and(|c| c > 1) {
        problems.push(format!(
            "{name} has CACHE {}: each session takes a range of ids, so a later commit can get a smaller id; run ALTER SEQUENCE {name} CACHE 1",
            cache.unwrap_or_default()
        ));
    }
    if cycles == Some(true) {
        problems.push(format!(
            "{name} cycles: ids would start over; run ALTER SEQUENCE {name} NO CYCLE"
        ));
    }
    match (highest_used, last_value) {
        (Some(used), Some(last)) if last < used => problems.push(format!(
            "{name} was set back (last value {last}, but id {used} is already used): new messages would repeat ids consumers have seen; run SELECT setval('{name}', {used})"
        )),
        (Some(_), None) => problems.push(format!(
            "the last value of {name} cannot be read: grant the relay's role SELECT on it"
        )),
        _ => {}
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::UnsafeDatabase(problems))
    }
}

/// Warns when this relay instance would open more PostgreSQL connections than the server has
/// free: its workers' pool, plus its poller, lease task and mapping cleanup.
pub async fn warn_about_connections(client: &Client, sql: &Statements, pool_size: usize) {
    let free: Option<i64> = match client.query_one(&sql.free_connections, &[]).await {
        Ok(row) => row.try_get(0).ok(),
        Err(e) => {
            tracing::debug!(error = %e, "could not read the connection limits");
            None
        }
    };
    if let Some(text) = connection_warning(pool_size, free) {
        tracing::warn!("{text}");
    }
}

/// The warning for a pool of `pool_size` when the server has `free` connections left, if one
/// is due.
fn connection_warning(pool_size: usize, free: Option<i64>) -> Option<String> {
    let needed = i64::try_from(pool_size)
        .unwrap_or(i64::MAX)
        .saturating_add(3);
    match free {
        Some(free) if needed > free => Some(format!(
            "this relay opens up to {needed} PostgreSQL connections (pool_size {pool_size} plus 3 of its own), but the server has {free} free: lower pool_size or raise max_connections"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_when_the_server_has_too_few_connections() {
        assert!(connection_warning(8, Some(100)).is_none());
        assert!(connection_warning(8, None).is_none());
        let tight = connection_warning(98, Some(100)).expect("98 + 3 > 100");
        assert!(tight.contains("100 free"), "{tight}");
    }
}
