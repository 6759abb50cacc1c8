//! One virtual partition's worker: owns the partition through a session advisory lock on its
//! own connection, then loops read batch -> publish (retrying the same batch in place) ->
//! delete, strictly one batch at a time so that order holds. It reconnects with backoff when
//! PostgreSQL goes away and rereads from the start of the partition, so nothing is lost
//! (a batch whose delete did not happen is published again: at least once).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::publisher::Publisher;
use crate::reader::{OutboxRow, PartitionReader};
use crate::sql::Statements;

/// What every worker shares.
pub struct WorkerContext {
    /// Connection settings for the worker's own connection.
    pub pg_config: tokio_postgres::Config,
    /// The SQL texts.
    pub sql: Statements,
    /// The Kafka producer.
    pub publisher: Publisher,
    /// Batch size, intervals and retry settings.
    pub config: crate::config::Config,
}

/// Why a worker's inner loop ended.
enum Exit {
    /// Shutdown was requested.
    Stop,
    /// The connection failed; reconnect.
    Reconnect(Error),
}

/// Runs the worker for `partition` until `stop` turns true.
pub async fn run_worker(
    partition: i32,
    ctx: Arc<WorkerContext>,
    mut stop: watch::Receiver<bool>,
    mut wake: watch::Receiver<i64>,
) {
    let mut reconnect = Backoff::new(ctx.config.retry_initial(), ctx.config.retry_max());
    let mut reader = PartitionReader::new(partition, ctx.config.batch_size);
    loop {
        if *stop.borrow() {
            return;
        }
        let client = match connect_and_lock(&ctx, partition).await {
            Ok(Some(c)) => {
                reconnect.reset();
                c
            }
            Ok(None) => {
                // Another relay instance holds this partition; check again later.
                if sleep_or_stop(&mut stop, ctx.config.retry_max()).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot reach PostgreSQL; retrying");
                if sleep_or_stop(&mut stop, reconnect.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        tracing::debug!(partition, "partition acquired");
        reader.reset();
        match work(&ctx, &client, &mut reader, &mut stop, &mut wake).await {
            Exit::Stop => return,
            Exit::Reconnect(e) => {
                tracing::warn!(partition, error = %e, "partition worker lost PostgreSQL; reconnecting");
                if sleep_or_stop(&mut stop, reconnect.next_delay()).await {
                    return;
                }
            }
        }
    }
}

async fn connect_and_lock(ctx: &WorkerContext, partition: i32) -> Result<Option<Client>> {
    let (client, connection) = ctx
        .pg_config
        .connect(NoTls)
        .await
        .map_err(Error::pg("connecting"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "worker connection ended");
        }
    });
    let locked: bool = client
        .query_one(&ctx.sql.try_lock_partition, &[&partition])
        .await
        .map_err(Error::pg("locking the partition"))?
        .get(0);
    Ok(locked.then_some(client))
}

async fn work(
    ctx: &WorkerContext,
    client: &Client,
    reader: &mut PartitionReader,
    stop: &mut watch::Receiver<bool>,
    wake: &mut watch::Receiver<i64>,
) -> Exit {
    let min_idle = Duration::from_millis(1);
    let mut idle = min_idle;
    loop {
        if *stop.borrow() {
            return Exit::Stop;
        }
        let batch = match reader.next_batch(client, &ctx.sql).await {
            Ok(b) => b,
            Err(e) => return Exit::Reconnect(e),
        };
        if batch.is_empty() {
            // Nothing committed yet. A wake-up means a writer took an id; its commit may
            // follow shortly, so poll quickly at first and back off to the poll interval.
            tokio::select! {
                // Err means the wake-up poller is gone: fall through to plain polling.
                Ok(()) = wake.changed() => idle = min_idle,
                _ = tokio::time::sleep(idle) => idle = (idle * 2).min(ctx.config.poll_interval()),
                _ = stop.changed() => {}
            }
            continue;
        }
        idle = min_idle;
        if !publish_in_place(ctx, &batch, reader.partition(), stop).await {
            return Exit::Stop;
        }
        let ids: Vec<i64> = batch.iter().map(|r| r.id).collect();
        if let Err(e) = client
            .execute(&ctx.sql.delete_batch, &[&reader.partition(), &ids])
            .await
        {
            return Exit::Reconnect(Error::pg("retiring a published batch")(e));
        }
    }
}

/// Publishes `batch`, retrying from the first unacknowledged message with backoff until all
/// are acknowledged. Returns false when shutdown interrupted the retries (nothing is retired
/// then; the batch is published again by whoever reads the partition next).
async fn publish_in_place(
    ctx: &WorkerContext,
    batch: &[OutboxRow],
    partition: i32,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let mut backoff = Backoff::new(ctx.config.retry_initial(), ctx.config.retry_max());
    let mut done = 0;
    let mut attempts = 0u32;
    loop {
        let outcome = ctx.publisher.publish(&batch[done..]).await;
        done += outcome.acked;
        match outcome.error {
            None => return true,
            Some(e) => {
                attempts += 1;
                // Log the first failure and then every tenth, not every retry.
                if attempts == 1 || attempts % 10 == 0 {
                    tracing::warn!(partition, attempts, message_id = batch[done].id, error = %e,
                        "publishing failed; retrying the batch in place");
                }
                if *stop.borrow() || sleep_or_stop(stop, backoff.next_delay()).await {
                    return false;
                }
            }
        }
    }
}

/// Sleeps for `d`; returns true when shutdown was requested meanwhile.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.changed() => {}
    }
    *stop.borrow()
}
