//! One virtual partition's worker: claims the partition's lease when the shared view makes
//! its instance the owner (`ownership`), then loops read a batch -> deliver it (`delivery`)
//! -> retire what Kafka acknowledged, strictly one batch at a time so that order holds, and
//! only while the lease carries its epoch. When PostgreSQL goes away the worker reconnects
//! with backoff and rereads the partition from its start, so nothing is lost (a batch whose
//! delete did not happen is published again: at least once).

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
    /// Which partitions are this instance's, and the leases it holds (see `ownership`).
    pub ownership: Arc<Ownership>,
    /// Faults a test asked for (see `faults`); none in production.
    pub faults: Arc<Faults>,
}

/// A worker's connection, with the statements it runs for every batch prepared, and the
/// lease it claimed.
struct Session {
    client: Client,
    read: ReadStatements,
    delete_batch: Statement,
    /// The database incarnation this connection talks to.
    incarnation: Incarnation,
    /// The epoch of the partition's lease this worker holds.
    epoch: i64,
}

/// How often a worker whose instance should own the partition tries to claim it while
/// another instance still holds the lease (until that one lets it go or its lease expires).
const CLAIM_RETRY: Duration = Duration::from_millis(500);

/// Why a worker's inner loop ended.
enum Exit {
    /// Shutdown was requested.
    Stop,
    /// The connection failed; reconnect.
    Reconnect(Error),
    /// The shared view gives the partition to another instance: let it go.
    Release,
    /// The lease was taken over or ran out: this worker may not retire anything more.
    Fenced(&'static str),
    /// The partition is at or above the partition count and drained: let it go, so that it
    /// holds no connection and no place in the share until messages appear in it again.
    Drained,
}

/// One partition worker's own state; `delivery` adds the delivery of a batch.
pub(crate) struct Worker<'a> {
    pub(crate) partition: i32,
    /// The epoch of the lease this worker holds (0 while it holds none).
    pub(crate) epoch: i64,
    pub(crate) ctx: &'a WorkerContext,
    pub(crate) metrics: PartitionMetrics,
    stop: watch::Receiver<bool>,
}

/// The lease this worker holds, recorded in `Ownership` (for renewal and `/health`) for as long
/// as it lives; dropping it (the worker let the partition go, lost its connection, was
/// fenced, or panicked) takes the record back, so a dead worker's lease is no longer renewed
/// and runs out.
struct Held<'a> {
    ownership: &'a Ownership,
    partition: i32,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.ownership.dropped(self.partition);
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
        epoch: 0,
        metrics: PartitionMetrics::new(&ctx.config.schema, partition),
        ctx: &ctx,
        stop,
    };
    let mut reconnect = Backoff::new(ctx.config.retry_initial(), ctx.config.retry_max());
    let mut reader = PartitionReader::new(partition, ctx.config.batch_size);
    let mut view = ctx.ownership.subscribe();
    w.set_state(PartitionState::Starting);
    loop {
        if w.stopping() {
            return;
        }
        view.borrow_and_update();
        if !ctx.ownership.is_mine(partition) {
            w.set_state(if ctx.ownership.needs_no_owner(partition) {
                PartitionState::Idle
            } else {
                PartitionState::OwnedElsewhere
            });
            tokio::select! {
                _ = view.changed() => {}
                () = tokio::time::sleep(ctx.config.retry_max()) => {}
                _ = w.stop.changed() => {}
            }
            continue;
        }
        let session = match w.connect_and_claim().await {
            Ok(Some(c)) => {
                reconnect.reset();
                c
            }
            Ok(None) => {
                // Another instance still holds the lease: it lets go between batches, or its
                // lease runs out.
                w.set_state(PartitionState::OwnedElsewhere);
                tokio::select! {
                    () = tokio::time::sleep(CLAIM_RETRY) => {}
                    _ = w.stop.changed() => {}
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
        let held = Held {
            ownership: &ctx.ownership,
            partition,
        };
        w.epoch = session.epoch;
        tracing::debug!(partition, epoch = session.epoch, "partition lease claimed");
        w.set_state(PartitionState::Relaying);
        reader.reset(session.incarnation.clone());
        let exit = w.work(&session, &mut reader, &mailbox, &pulse).await;
        if matches!(
            exit,
            Exit::Stop | Exit::Release | Exit::Drained | Exit::Fenced(_)
        ) {
            // Let the next owner claim it now rather than after the TTL (a fenced lease is
            // released only if it still carries this worker's epoch).
            w.release(&session).await;
        }
        drop(session);
        drop(held);
        match exit {
            Exit::Stop => return,
            Exit::Release => {
                tracing::info!(
                    partition,
                    "the view gives this partition to another instance: lease released"
                );
                w.set_state(PartitionState::OwnedElsewhere);
            }
            Exit::Fenced(why) => {
                tracing::warn!(
                    partition,
                    why,
                    "lease lost: this worker stops and retires nothing more"
                );
                w.set_state(PartitionState::OwnedElsewhere);
            }
            Exit::Drained => {
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

    async fn connect_and_claim(&self) -> Result<Option<Session>> {
        let mut client = crate::session::connect(
            &self.ctx.pg_config,
            &format!(
                "{} SET application_name = 'outboxd partition {}';",
                crate::sql::SESSION_SETUP,
                self.partition
            ),
            "partition worker",
        )
        .await?;
        let ownership = &self.ctx.ownership;
        let ttl_ms = i64::try_from(ownership.ttl().as_millis()).unwrap_or(i64::MAX);
        let sent_at = Instant::now();
        // The claim commits durably (the session commits asynchronously otherwise): a claim
        // lost in a crash would hand its epoch out again.
        let tx = client
            .transaction()
            .await
            .map_err(Error::pg("claiming the partition lease"))?;
        tx.batch_execute("SET LOCAL synchronous_commit = on")
            .await
            .map_err(Error::pg("claiming the partition lease"))?;
        let claimed = tx
            .query_opt(
                &self.ctx.sql.claim_lease,
                &[&self.partition, &ownership.instance(), &ttl_ms],
            )
            .await
            .map_err(Error::pg("claiming the partition lease"))?;
        tx.commit()
            .await
            .map_err(Error::pg("claiming the partition lease"))?;
        let Some(claimed) = claimed else {
            return Ok(None);
        };
        let epoch: i64 = claimed
            .try_get(0)
            .map_err(Error::pg("claiming the partition lease"))?;
        let previous: Option<String> = claimed
            .try_get(1)
            .map_err(Error::pg("claiming the partition lease"))?;
        ownership.claimed(self.partition, epoch, previous.as_deref(), sent_at);
        // Prepared once per connection: parsed and planned once, one round trip per call.
        let prepared = async {
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
            Ok::<_, Error>((read, delete_batch, incarnation))
        }
        .await;
        let (read, delete_batch, incarnation) = match prepared {
            Ok(p) => p,
            Err(e) => {
                // Claimed but not usable: the lease runs out (nothing renews it).
                ownership.dropped(self.partition);
                return Err(e);
            }
        };
        Ok(Some(Session {
            client,
            read,
            delete_batch,
            incarnation,
            epoch,
        }))
    }

    /// Gives the lease up (best effort: if it fails, the lease runs out after the TTL).
    async fn release(&self, session: &Session) {
        if let Err(e) = session
            .client
            .execute(
                &self.ctx.sql.release_lease,
                &[
                    &self.partition,
                    &self.ctx.ownership.instance(),
                    &session.epoch,
                ],
            )
            .await
        {
            tracing::debug!(partition = self.partition, error = %e, "could not release the lease; it runs out after the TTL");
        }
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
            if !self.ctx.ownership.is_mine(self.partition) {
                return Exit::Release;
            }
            if !self.ctx.ownership.is_valid(self.partition, session.epoch) {
                return Exit::Fenced("the lease was not renewed within its TTL");
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
                if !self.ctx.ownership.is_below_count(self.partition) {
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
                self.ctx.faults.before_write(self.partition).await;
                let held = client
                    .query_one(
                        &session.delete_batch,
                        &[
                            &self.partition,
                            &ids,
                            &self.ctx.ownership.instance(),
                            &session.epoch,
                        ],
                    )
                    .await
                    .and_then(|row| row.try_get::<_, bool>(0));
                match held {
                    Ok(true) => {}
                    Ok(false) => {
                        self.ctx.ownership.fencing_rejection();
                        return Exit::Fenced(
                            "another instance took the lease over: the batch was not retired (its new owner publishes it again)",
                        );
                    }
                    Err(e) => {
                        return Exit::Reconnect(Error::pg("retiring a published batch")(e));
                    }
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
                Outcome::Fenced => {
                    self.ctx.ownership.fencing_rejection();
                    return Exit::Fenced(
                        "another instance took the lease over: the refused message was not moved aside",
                    );
                }
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
