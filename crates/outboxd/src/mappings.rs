//! Forgetting sticky mappings once it is provably safe.
//!
//! An entity keeps its partition while any of its messages waits in the outbox table, so
//! its messages never sit in two partitions at once. Once none waits, the mapping can go:
//! the entity's next message creates a new one under the current partition count. That
//! drains partitions above a lowered count, and keeps the mapping table from growing by
//! one row per entity ever seen (mappings of entities idle for `mapping_ttl_s` are candidates).
//!
//! Why it is safe: a writer locks the entity's mapping row (`FOR NO KEY UPDATE`) before it
//! takes a message id and holds the lock until it commits. The cleanup first locks its
//! candidates `FOR UPDATE SKIP LOCKED` (skipping any a writer holds), then, in a second
//! statement whose snapshot is taken after those locks, deletes the ones whose entity has no
//! message in the table. A writer that committed before the lock is seen by that snapshot;
//! one that comes after waits for the cleanup to commit, finds the row gone, and creates a
//! new mapping for an entity with nothing in flight. A message the relay is publishing is
//! still in the table until Kafka acknowledged it, so it also keeps the mapping.

use std::time::Duration;

use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::periodic::Periodic;
use crate::session::connect;
use crate::shutdown::Shutdown;
use crate::sql::Statements;

/// Mappings locked and checked per transaction.
const CHUNK: i64 = 1000;
/// Chunks per run, so one run stays short however large the table is.
const CHUNKS_PER_RUN: usize = 10;

/// The cleanup's state between runs: where in key order the next run continues. Each run
/// checks at most `CHUNKS_PER_RUN` chunks and the next one goes on after the last key checked,
/// wrapping around at the end of the table, so candidates that must stay (a message of theirs
/// waits) cannot keep the ones behind them from ever being checked.
#[derive(Debug)]
pub struct MappingCleanup {
    sql: Statements,
    ttl: Duration,
    /// Continue after this key; empty: from the first key.
    cursor: String,
}

impl MappingCleanup {
    /// A cleanup that forgets mappings idle for at least `ttl` (see the module docs).
    pub fn new(sql: Statements, ttl: Duration) -> Self {
        MappingCleanup {
            sql,
            ttl,
            cursor: String::new(),
        }
    }

    /// Forgets the mappings that are safe to forget, up to `CHUNKS_PER_RUN` chunks from where
    /// the previous run stopped; returns how many were forgotten.
    pub async fn run_once(&mut self, client: &mut Client) -> Result<u64> {
        let mut forgotten = 0u64;
        for _ in 0..CHUNKS_PER_RUN {
            let tx = client
                .transaction()
                .await
                .map_err(Error::pg("starting a mapping cleanup"))?;
            let locked: Vec<String> = tx
                .query(
                    &self.sql.lock_forgettable_mappings,
                    &[&self.cursor, &self.ttl.as_secs_f64(), &CHUNK],
                )
                .await
                .map_err(Error::pg("locking forgettable mappings"))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let deleted = if locked.is_empty() {
                0
            } else {
                tx.query(&self.sql.forget_mappings, &[&locked])
                    .await
                    .map_err(Error::pg("forgetting mappings"))?
                    .len()
            };
            tx.commit()
                .await
                .map_err(Error::pg("committing a mapping cleanup"))?;
            forgotten += deleted as u64;
            match locked.last() {
                // A full chunk: more may follow.
                Some(last) if locked.len() as i64 == CHUNK => self.cursor.clone_from(last),
                // The end of the table: the next run starts from the first key again.
                _ => {
                    self.cursor.clear();
                    break;
                }
            }
        }
        Ok(forgotten)
    }
}

/// Runs [`MappingCleanup::run_once`] every `interval` until `stop` turns true, on its own
/// connection (reconnecting with backoff).
pub async fn run_cleanup(
    database: crate::connect::Database,
    sql: Statements,
    interval: Duration,
    ttl: Duration,
    retry: (Duration, Duration),
    shutdown: Shutdown,
) {
    let mut cleanup = MappingCleanup::new(sql, ttl);
    let mut client: Option<Client> = None;
    let mut backoff = Backoff::new(retry.0, retry.1);
    let mut periodic = Periodic::new(interval, shutdown);
    while periodic.tick().await {
        if client.as_ref().is_none_or(Client::is_closed) {
            // Default planner settings: the check for waiting messages is an anti-join the
            // planner should be free to hash.
            client = match connect(&database, "SET jit = off;", "mapping cleanup").await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "mapping cleanup cannot connect; retrying");
                    periodic.shutdown().sleep(backoff.next_delay()).await;
                    continue;
                }
            };
        }
        let Some(c) = client.as_mut() else { continue };
        match cleanup.run_once(c).await {
            Ok(n) => {
                backoff.reset();
                if n > 0 {
                    tracing::info!(forgotten = n, "forgot sticky mappings of idle entities");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "mapping cleanup failed; retrying next interval");
                periodic.shutdown().sleep(backoff.next_delay()).await;
            }
        }
    }
}
