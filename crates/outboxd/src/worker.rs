//! One virtual partition's worker: owns the partition through a session advisory lock on its
//! own connection, then loops read a batch -> deliver it (`delivery`) -> retire what Kafka
//! acknowledged, strictly one batch at a time so that order holds. When PostgreSQL goes away
//! the worker reconnects with backoff and rereads the partition from its start, so nothing is
//! lost (a batch whose delete did not happen is published again: at least once).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_postgres::{Client, Statement};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::delivery::Outcome;
use crate::error::{Error, Result};
use crate::faults::Faults;
use crate::health::{Health, PartitionState};
use crate::metrics::PartitionMetrics;
use crate::ownership::Ownership;
use crate::publisher::Publisher;
use crate::reader::{PartitionReader, ReadStatements};
use crate::session::Incarnation;
use crate::sql::Statements;
use crate::wakeup::{Mailbox, PollerPulse};

/// What every worker shares.
pub struct WorkerContext {
    /// Connection settings for the worker's own connection.
    pub pg_config: tokio_postgres::Config,
    /// The SQL texts.
    pub sql: Statements,
    /// The Kafka producers.
    pub publisher: Arc<Publisher>,
    /// Batch size, intervals, retry settings and policies.
    pub config: Config,
    /// Where workers report their state.
    pub health: Arc<Health>,
    /// This instance's share of the partitions (see `ownership`).
    pub ownership: Arc<Ownership>,
    /// Faults a test asked for (see `faults`); none in production.
    pub faults: Arc<Faults>,
}

/// A worker's connection, holding its partition's advisory lock, with the statements it
/// runs for every batch prepared.
struct Session {
    client: Client,
    read: ReadStatements,
    delete_batch: Statement,
    /// The database incarnation this connection talks to.
    incarnation: Incarnation,
}

/// Why a worker's inner loop ended.
enum Exit {
    /// Shutdown was requested.
    Stop,
    /// The connection failed; reconnect.
    Reconnect(Error),
    /// This instance holds more than its share: let the partition go to another one.
    Release,
    /// The partition is at or above the partition count and drained: let it go, so that it
    /// holds no connection and no place in the share until messages appear in it again.
    Drained,
}

/// One partition worker's own state; `delivery` adds the delivery of a batch.
pub(crate) struct Worker<'a> {
    pub(crate) partition: i32,
    pub(crate) ctx: &'a WorkerContext,
    pub(crate) metrics: PartitionMetrics,
    stop: watch::Receiver<bool>,
}

/// Records the partition as held by this instance for as long as it lives; dropping it (the
/// worker let the partition go, lost its connection, or panicked) takes the record back, so a
/// dead worker never leaves the instance believing it holds more than it does.
struct Held<'a> {
    ownership: &'a Ownership,
    partition: i32,
}

impl<'a> Held<'a> {
    fn new(ownership: &'a Ownership, partition: i32) -> Self {
        ownership.took(partition);
        Held {
            ownership,
            partition,
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.ownership.lost(self.partition);
    }
}

/// Runs the worker for `partition` until `stop` turns true.
pub async fn run_worker(
    partition: i32,
    ctx: Arc<WorkerContext>,
    stop: watch::Receiver<bool>,
    mailbox: Arc<Mailbox>,
    pulse: Arc<PollerPulse>,
) {
    let mut w = Worker {
        partition,
        metrics: PartitionMetrics::new(&ctx.config.schema, partition),
        ctx: &ctx,
        stop,
    };
    let mut reconnect = Backoff::new(ctx.config.retry_initial(), ctx.config.retry_max());
    let mut reader = PartitionReader::new(partition, ctx.config.batch_size);
    w.set_state(PartitionState::Starting);
    loop {
        if w.stopping() {
            return;
        }
        if !ctx.ownership.may_take(partition) {
            // This instance holds its share; the partition is left to another instance.
            w.set_state(PartitionState::OwnedElsewhere);
            if w.sleep_or_stop(ctx.config.retry_max()).await {
                return;
            }
            continue;
        }
        let session = match w.connect_and_lock().await {
            Ok(Some(c)) => {
                reconnect.reset();
                c
            }
            Ok(None) => {
                // Another relay instance holds this partition; check again later.
                w.set_state(PartitionState::OwnedElsewhere);
                if w.sleep_or_stop(ctx.config.retry_max()).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot reach PostgreSQL; retrying");
                w.set_state(PartitionState::Disconnected {
                    error: e.to_string(),
                });
                if w.sleep_or_stop(reconnect.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        let held = Held::new(&ctx.ownership, partition);
        tracing::debug!(partition, "partition acquired");
        w.set_state(PartitionState::Relaying);
        reader.reset(session.incarnation.clone());
        let exit = w.work(&session, &mut reader, &mailbox, &pulse).await;
        // Closing the connection releases the partition's advisory lock.
        drop(session);
        match exit {
            Exit::Stop => return,
            Exit::Release => {
                drop(held);
                tracing::info!(partition, "above this instance's share: partition released");
                w.set_state(PartitionState::OwnedElsewhere);
                if w.sleep_or_stop(ctx.config.retry_max()).await {
                    return;
                }
            }
            Exit::Drained => {
                drop(held);
                tracing::debug!(partition, "above the partition count and drained: released");
                w.set_state(PartitionState::Idle);
                // Back as soon as messages appear in it again (the poller hands a window).
                tokio::select! {
                    _ = mailbox.wait() => {}
                    _ = tokio::time::sleep(ctx.config.retry_max()) => {}
                    _ = w.stop.changed() => {}
                }
            }
            Exit::Reconnect(e) => {
                drop(held);
                tracing::warn!(partition, error = %e, "partition worker lost PostgreSQL; reconnecting");
                w.set_state(PartitionState::Disconnected {
                    error: e.to_string(),
                });
                if w.sleep_or_stop(reconnect.next_delay()).await {
                    return;
                }
            }
        }
    }
}

impl Worker<'_> {
    /// Records this partition's state for `/health` and the blocked gauge.
    pub(crate) fn set_state(&self, state: PartitionState) {
        self.metrics
            .blocked
            .set(if matches!(state, PartitionState::Blocked { .. }) {
                1.0
            } else {
                0.0
            });
        self.ctx.health.set(self.partition, state);
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps for `d`; returns true when shutdown was requested meanwhile.
    pub(crate) async fn sleep_or_stop(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.changed() => {}
        }
        self.stopping()
    }

    async fn connect_and_lock(&self) -> Result<Option<Session>> {
        let client = crate::session::connect(
            &self.ctx.pg_config,
            &format!(
                "{} SET application_name = 'outboxd partition {}';",
                crate::sql::SESSION_SETUP,
                self.partition
            ),
            "partition worker",
        )
        .await?;
        let locked: bool = client
            .query_one(&self.ctx.sql.try_lock_partition, &[&self.partition])
            .await
            .map_err(Error::pg("locking the partition"))?
            .get(0);
        if !locked {
            return Ok(None);
        }
        // Prepared once per connection: parsed and planned once, one round trip per call.
        let read = ReadStatements {
            batch: client
                .prepare(&self.ctx.sql.read_batch)
                .await
                .map_err(Error::pg("preparing the batch read"))?,
            late: client
                .prepare(&self.ctx.sql.read_late)
                .await
                .map_err(Error::pg("preparing the late-row read"))?,
        };
        let delete_batch = client
            .prepare(&self.ctx.sql.delete_batch)
            .await
            .map_err(Error::pg("preparing the batch delete"))?;
        let incarnation = crate::session::incarnation(&client, &self.ctx.sql).await?;
        Ok(Some(Session {
            client,
            read,
            delete_batch,
            incarnation,
        }))
    }

    async fn work(
        &mut self,
        session: &Session,
        reader: &mut PartitionReader,
        mailbox: &Mailbox,
        pulse: &PollerPulse,
    ) -> Exit {
        // The poller counts as stalled when it missed many ticks; then this worker opens
        // its own windows every poll interval.
        let stall = self.ctx.config.poll_interval() + self.ctx.config.wakeup_interval() * 20;
        // The message that blocked this partition, tried alone first on the next attempt.
        let mut blocked: Option<i64> = None;
        loop {
            if self.stopping() {
                return Exit::Stop;
            }
            self.ctx.faults.before_batch(self.partition);
            // Between batches (the last one is retired or will be reread), so another
            // instance can take over cleanly.
            if self.ctx.ownership.release_one(self.partition) {
                return Exit::Release;
            }
            let delivered = mailbox.take();
            if delivered.reset {
                reader.reset(session.incarnation.clone());
            }
            if let Some(window) = delivered.window
                && !reader.offer(window)
            {
                tracing::debug!(
                    partition = self.partition,
                    "window from another incarnation of the database dropped (this session rereads)"
                );
            }
            if !reader.has_work() {
                // Caught up.
                self.metrics.oldest_age.set(0.0);
                if !self.ctx.ownership.is_shared(self.partition) {
                    return Exit::Drained;
                }
                // Wait for the poller to hand over a window.
                tokio::select! {
                    _ = mailbox.wait() => {}
                    _ = tokio::time::sleep(self.ctx.config.poll_interval()) => {
                        if pulse.is_stale(stall) {
                            reader.open_own_window();
                        }
                    }
                    _ = self.stop.changed() => {}
                }
                continue;
            }
            let client = &session.client;
            let batch = match reader
                .next_batch(client, &self.ctx.sql, &session.read)
                .await
            {
                Ok(b) => b,
                Err(e) => return Exit::Reconnect(e),
            };
            let Some(first) = batch.first() else {
                continue;
            };
            tracing::debug!(
                partition = self.partition,
                messages = batch.len(),
                first_id = first.id,
                "batch read"
            );
            let started = Instant::now();
            self.metrics
                .oldest_age
                .set((now_epoch() - first.created_at_epoch).max(0.0));
            let (acked, outcome) = match self.deliver(client, &batch, blocked).await {
                Ok(r) => r,
                Err(e) => return Exit::Reconnect(e),
            };
            if !acked.is_empty() {
                let ids: Vec<i64> = acked.iter().map(|r| r.id).collect();
                if let Err(e) = client
                    .execute(&session.delete_batch, &[&self.partition, &ids])
                    .await
                {
                    return Exit::Reconnect(Error::pg("retiring a published batch")(e));
                }
                let now = now_epoch();
                for row in &acked {
                    self.metrics
                        .commit_to_ack
                        .record((now - row.created_at_epoch).max(0.0));
                }
                self.metrics.published.increment(acked.len() as u64);
            }
            match outcome {
                Outcome::Done => {
                    blocked = None;
                    self.metrics.batches.increment(1);
                    self.metrics
                        .batch_duration
                        .record(started.elapsed().as_secs_f64());
                    self.set_state(PartitionState::Relaying);
                }
                Outcome::Stopped => return Exit::Stop,
                Outcome::Blocked { message_id } => {
                    blocked = Some(message_id);
                    // Reread from the database on the next try: an operator may have moved
                    // the message aside (`outboxd skip`) or fixed its cause meanwhile.
                    reader.reset(session.incarnation.clone());
                    if self.sleep_or_stop(self.ctx.config.retry_max()).await {
                        return Exit::Stop;
                    }
                }
            }
        }
    }
}

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
