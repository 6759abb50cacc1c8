//! One virtual partition's worker: owns the partition through a session advisory lock on its
//! own connection, then loops read batch -> publish (retrying in place) -> delete, strictly
//! one batch at a time so that order holds. Messages Kafka refuses for good go through the
//! topic's policy (block, dead_letter, park_entity). When PostgreSQL goes away the worker
//! reconnects with backoff and rereads the partition from its start, so nothing is lost (a
//! batch whose delete did not happen is published again: at least once).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::error::KafkaError;
use tokio::sync::watch;
use tokio_postgres::{Client, Statement};

use crate::backoff::Backoff;
use crate::config::{Config, ErrorPolicy};
use crate::error::{Error, Result};
use crate::health::{Health, PartitionState};
use crate::metrics::PartitionMetrics;
use crate::ownership::Ownership;
use crate::publisher::{Publisher, is_permanent};
use crate::reader::{OutboxRow, PartitionReader, ReadStatements};
use crate::sql::Statements;
use crate::wakeup::{Mailbox, PollerPulse};

/// What every worker shares.
pub struct WorkerContext {
    /// Connection settings for the worker's own connection.
    pub pg_config: tokio_postgres::Config,
    /// The SQL texts.
    pub sql: Statements,
    /// The Kafka producer.
    pub publisher: Publisher,
    /// Batch size, intervals, retry settings and policies.
    pub config: Config,
    /// Where workers report their state.
    pub health: Arc<Health>,
    /// This instance's share of the partitions (see `ownership`).
    pub ownership: Arc<Ownership>,
}

/// A worker's connection, holding its partition's advisory lock, with the statements it
/// runs for every batch prepared.
struct Session {
    client: Client,
    read: ReadStatements,
    delete_batch: Statement,
}

/// Why a worker's inner loop ended.
enum Exit {
    /// Shutdown was requested.
    Stop,
    /// The connection failed; reconnect.
    Reconnect(Error),
    /// This instance holds more than its share: let the partition go to another one.
    Release,
}

/// How delivering one batch ended.
enum Delivery {
    /// Every message was acknowledged or moved aside by its policy.
    Done,
    /// A message was refused for good under the `block` policy.
    Blocked,
    /// Shutdown interrupted the retries.
    Stopped,
}

/// One partition worker's own state.
struct Worker<'a> {
    partition: i32,
    ctx: &'a WorkerContext,
    metrics: PartitionMetrics,
    stop: watch::Receiver<bool>,
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
        if !ctx.ownership.may_take() {
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
                ctx.ownership.took();
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
        tracing::debug!(partition, "partition acquired");
        w.set_state(PartitionState::Relaying);
        reader.reset();
        let exit = w.work(&session, &mut reader, &mailbox, &pulse).await;
        // Closing the connection releases the partition's advisory lock.
        drop(session);
        match exit {
            Exit::Stop => return,
            Exit::Release => {
                tracing::info!(partition, "above this instance's share: partition released");
                w.set_state(PartitionState::OwnedElsewhere);
                if w.sleep_or_stop(ctx.config.retry_max()).await {
                    return;
                }
            }
            Exit::Reconnect(e) => {
                ctx.ownership.lost();
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
    fn set_state(&self, state: PartitionState) {
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
    async fn sleep_or_stop(&mut self, d: Duration) -> bool {
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
        Ok(Some(Session {
            client,
            read,
            delete_batch,
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
        loop {
            if self.stopping() {
                return Exit::Stop;
            }
            // Between batches (the last one is retired or will be reread), so another
            // instance can take over cleanly.
            if self.ctx.ownership.release_one() {
                return Exit::Release;
            }
            let delivered = mailbox.take();
            if delivered.reset {
                reader.reset();
            }
            if let Some(window) = delivered.window {
                reader.offer(window);
            }
            if !reader.has_work() {
                // Caught up: wait for the poller to hand over a window.
                self.metrics.oldest_age.set(0.0);
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
            let (acked, outcome) = match self.deliver(client, &batch).await {
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
                Delivery::Done => {
                    self.metrics.batches.increment(1);
                    self.metrics
                        .batch_duration
                        .record(started.elapsed().as_secs_f64());
                    self.set_state(PartitionState::Relaying);
                }
                Delivery::Stopped => return Exit::Stop,
                Delivery::Blocked => {
                    // Reread from the database on the next try: an operator may have moved
                    // the message aside (`outboxd skip`) or fixed its cause meanwhile.
                    reader.reset();
                    if self.sleep_or_stop(self.ctx.config.retry_max()).await {
                        return Exit::Stop;
                    }
                }
            }
        }
    }

    /// Publishes `batch`, retrying from the first unacknowledged message with backoff, and
    /// applies the topic's policy to messages refused for good. Returns the acknowledged rows
    /// (to be deleted by the caller) and how it ended.
    async fn deliver<'b>(
        &mut self,
        client: &Client,
        batch: &'b [OutboxRow],
    ) -> Result<(Vec<&'b OutboxRow>, Delivery)> {
        let mut pending: Vec<&OutboxRow> = batch.iter().collect();
        let mut acked = Vec::with_capacity(batch.len());
        let mut backoff =
            Backoff::new(self.ctx.config.retry_initial(), self.ctx.config.retry_max());
        let mut attempts = 0u32;
        loop {
            let outcome = self.ctx.publisher.publish(&pending).await;
            acked.extend(pending.drain(..outcome.acked));
            let (Some(error), Some(&row)) = (outcome.error, pending.first()) else {
                return Ok((acked, Delivery::Done));
            };
            if self.ctx.publisher.recover_if_fatal()? {
                continue;
            }
            if is_permanent(&error) {
                self.metrics.permanent_errors.increment(1);
                match self.ctx.config.policy_for(&row.topic) {
                    ErrorPolicy::Block => {
                        tracing::error!(partition = self.partition, message_id = row.id, topic = %row.topic, %error,
                            "Kafka refused the message for good; partition blocked until an operator acts (policy block)");
                        self.set_state(PartitionState::Blocked {
                            message_id: row.id,
                            error: error.to_string(),
                        });
                        return Ok((acked, Delivery::Blocked));
                    }
                    ErrorPolicy::DeadLetter => {
                        self.move_aside(
                            client,
                            &self.ctx.sql.dead_letter,
                            row,
                            &error,
                            Some("dead_letter"),
                        )
                        .await?;
                        self.metrics.dead_lettered.increment(1);
                        pending.remove(0);
                    }
                    ErrorPolicy::ParkEntity => {
                        self.move_aside(client, &self.ctx.sql.park_message, row, &error, None)
                            .await?;
                        self.metrics.parked.increment(1);
                        // The entity's later messages stay in the table, held back.
                        pending.retain(|r| r.entity_key != row.entity_key);
                    }
                }
                continue;
            }
            self.metrics.retriable_errors.increment(1);
            attempts += 1;
            // Log the first failure and then every tenth, not every retry.
            if attempts == 1 || attempts % 10 == 0 {
                tracing::warn!(partition = self.partition, attempts, message_id = row.id, %error,
                    "publishing failed; retrying the batch in place");
            }
            self.set_state(PartitionState::Retrying {
                message_id: row.id,
                error: error.to_string(),
            });
            if self.sleep_or_stop(backoff.next_delay()).await {
                return Ok((acked, Delivery::Stopped));
            }
        }
    }

    /// Moves `row` to the dead-letter table (and parks its entity, for `park_message`).
    async fn move_aside(
        &self,
        client: &Client,
        sql: &str,
        row: &OutboxRow,
        error: &KafkaError,
        policy: Option<&str>,
    ) -> Result<()> {
        let error = error.to_string();
        let result = match policy {
            Some(policy) => {
                client
                    .execute(sql, &[&self.partition, &row.id, &policy, &error])
                    .await
            }
            None => {
                client
                    .execute(sql, &[&self.partition, &row.id, &error])
                    .await
            }
        };
        result.map_err(Error::pg("moving a refused message to dead_letter"))?;
        tracing::warn!(partition = self.partition, message_id = row.id, entity_key = %row.entity_key,
            topic = %row.topic, %error, policy = policy.unwrap_or("park_entity"), "message moved to dead_letter");
        Ok(())
    }
}

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
