//! One virtual partition's worker: claims the partition's lease when the shared view makes
//! its instance the owner (`ownership`), then loops read a batch -> deliver it (`delivery`)
//! -> retire what Kafka acknowledged, strictly one batch at a time so that order holds, and
//! only while the lease carries its epoch. It takes a session from the instance's bounded
//! pool (`sessions`) only while it has work. When a statement fails (PostgreSQL went away)
//! the worker claims the partition again with backoff and rereads it from its start, so
//! nothing is lost (a batch whose delete did not happen is published again: at least once);
//! it rereads as well when a session talks to another incarnation of the database.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::pipeline::delivery::Outcome;
use crate::error::{Error, Result};
use crate::faults::Faults;
use crate::health::{Health, PartitionState};
use crate::metrics::PartitionMetrics;
use crate::ownership::Ownership;
use crate::publisher::Publisher;
use crate::pipeline::reader::PartitionReader;
use crate::sessions::{Checkout, SessionPool};
use crate::sql::Statements;
use crate::pipeline::wakeup::{Mailbox, PollerPulse};

/// What every worker shares.
pub struct WorkerContext {
    /// Connection settings, for the relay's other tasks.
    pub database: crate::connect::Database,
    /// The workers' bounded pool of sessions.
    pub sessions: Arc<SessionPool>,
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

/// What one batch led to.
enum Step {
    /// Go on with the next batch.
    Next,
    /// A message blocked the partition (policy `block`): wait, then reread.
    Blocked,
    /// The worker's hold on the partition ends.
    Exit(Exit),
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
            w.set_state(if ctx.ownership.is_paused(partition) {
                PartitionState::Paused
            } else if ctx.ownership.needs_no_owner(partition) {
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
        let session = match w.claim().await {
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
        tracing::debug!(partition, epoch = w.epoch, "partition lease claimed");
        w.set_state(PartitionState::Relaying);
        reader.reset(session.incarnation.clone());
        let exit = w.work(session, &mut reader, &mailbox, &pulse).await;
        if matches!(exit, Exit::Release | Exit::Drained | Exit::Fenced(_)) {
            // Let the next owner claim it now rather than after the TTL (a fenced lease is
            // released only if it still carries this worker's epoch). On shutdown the lease
            // task releases every lease of the instance.
            w.release().await;
        }
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

    /// Takes a session and claims the partition's lease on it; the session when the claim
    /// succeeded (the epoch is in `self.epoch`), `None` when another instance holds it.
    async fn claim(&mut self) -> Result<Option<Checkout>> {
        let checkout = self.ctx.sessions.checkout().await?;
        match self.claim_on(&checkout).await {
            Ok(Some(epoch)) => {
                self.epoch = epoch;
                Ok(Some(checkout))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                checkout.discard();
                Err(e)
            }
        }
    }

    async fn claim_on(&self, session: &Checkout) -> Result<Option<i64>> {
        let ownership = &self.ctx.ownership;
        let ttl_ms = i64::try_from(ownership.ttl().as_millis()).unwrap_or(i64::MAX);
        let sent_at = Instant::now();
        // The claim commits durably (the session commits asynchronously otherwise): a claim
        // lost in a crash would hand its epoch out again.
        // (`BEGIN` as a statement: the session is shared through the pool, so no `&mut`
        // for a client-side transaction; a failure discards the session.)
        let client = &session.client;
        client
            .batch_execute("BEGIN; SET LOCAL synchronous_commit = on")
            .await
            .map_err(Error::pg("claiming the partition lease"))?;
        let claimed = client
            .query_opt(
                &self.ctx.sql.claim_lease,
                &[&self.partition, &ownership.instance(), &ttl_ms],
            )
            .await
            .map_err(Error::pg("claiming the partition lease"))?;
        client
            .batch_execute("COMMIT")
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
        Ok(Some(epoch))
    }

    /// Gives the lease up (best effort: if it fails, the lease runs out after the TTL).
    async fn release(&self) {
        let result = match self.ctx.sessions.checkout().await {
            Ok(session) => session
                .client
                .execute(
                    &self.ctx.sql.release_lease,
                    &[&self.partition, &self.ctx.ownership.instance(), &self.epoch],
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::debug!(partition = self.partition, error = %e, "could not release the lease; it runs out after the TTL");
        }
    }

    /// Takes a session from the pool, unless shutdown is requested first (`None`).
    async fn checkout_or_stop(&mut self) -> Option<Result<Checkout>> {
        tokio::select! {
            c = self.ctx.sessions.checkout() => Some(c),
            _ = self.stop.changed() => None,
        }
    }

    async fn work(
        &mut self,
        first: Checkout,
        reader: &mut PartitionReader,
        mailbox: &Mailbox,
        pulse: &PollerPulse,
    ) -> Exit {
        // The poller counts as stalled when it missed many ticks; then this worker opens
        // its own windows every poll interval.
        let stall = self.ctx.config.poll_interval() + self.ctx.config.wakeup_interval() * 20;
        // The message that blocked this partition, tried alone first on the next attempt.
        let mut blocked: Option<i64> = None;
        // Held for reading; back in the pool while Kafka acknowledges and while caught up.
        let mut session = Some(first);
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
            if !self.ctx.ownership.is_valid(self.partition, self.epoch) {
                return Exit::Fenced("the lease was not renewed within its TTL");
            }
            let delivered = mailbox.take();
            if delivered.reset {
                let incarnation = reader.incarnation().clone();
                reader.reset(incarnation);
            }
            if let Some(window) = delivered.window
                && !reader.offer(window)
            {
                tracing::debug!(
                    partition = self.partition,
                    "window from another incarnation of the database dropped (this worker rereads)"
                );
            }
            if !reader.has_work() {
                // Caught up: the session goes back to the pool.
                session = None;
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
            let s = match session.take() {
                Some(s) => s,
                None => match self.checkout_or_stop().await {
                    Some(Ok(s)) => s,
                    Some(Err(e)) => return Exit::Reconnect(e),
                    None => return Exit::Stop,
                },
            };
            if s.incarnation != *reader.incarnation() {
                // This session talks to another life of the database (it crashed or failed
                // over since the reader's windows were taken): they mean nothing here.
                tracing::info!(
                    partition = self.partition,
                    "the database restarted from a crash or failed over: the partition is reread from its start"
                );
                reader.reset(s.incarnation.clone());
            }
            let batch = match reader.next_batch(&s.client, &self.ctx.sql, &s.read).await {
                Ok(b) => b,
                Err(e) => {
                    // The session's state is unknown: close it, claim again and reread.
                    s.discard();
                    return Exit::Reconnect(e);
                }
            };
            if batch.is_empty() {
                session = Some(s);
                continue;
            }
            // The session goes back to the pool while Kafka acknowledges the batch: with a
            // pool smaller than the partitions, waiting for acknowledgements must not hold
            // it.
            drop(s);
            match self.deliver_and_retire(&batch, &mut blocked).await {
                Ok(Step::Next) => {}
                Ok(Step::Exit(exit)) => return exit,
                Err(e) => return Exit::Reconnect(e),
                Ok(Step::Blocked) => {
                    // Reread from the database on the next try: an operator may have moved
                    // the message aside (`outboxd skip`) or fixed its cause meanwhile.
                    let incarnation = reader.incarnation().clone();
                    reader.reset(incarnation);
                    if self.sleep_or_stop(self.ctx.config.retry_max()).await {
                        return Exit::Stop;
                    }
                }
            }
        }
    }

    /// Delivers one batch and retires what Kafka acknowledged, on a session of the pool; an
    /// error means a session failed (it was closed; the caller claims again and rereads).
    async fn deliver_and_retire(
        &mut self,
        batch: &[crate::pipeline::reader::OutboxRow],
        blocked: &mut Option<i64>,
    ) -> Result<Step> {
        let Some(first) = batch.first() else {
            return Ok(Step::Next);
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
        let (acked, outcome) = self.deliver(batch, *blocked).await?;
        if !acked.is_empty() {
            let ids: Vec<i64> = acked.iter().map(|r| r.id).collect();
            self.ctx.faults.before_write(self.partition).await;
            let s = self.ctx.sessions.checkout().await?;
            let retired = s
                .client
                .query_one(
                    &s.delete_batch,
                    &[
                        &self.partition,
                        &ids,
                        &self.ctx.ownership.instance(),
                        &self.epoch,
                    ],
                )
                .await
                .and_then(|row| row.try_get(0));
            let held: bool = match retired {
                Ok(held) => held,
                Err(e) => {
                    s.discard();
                    return Err(Error::pg("retiring a published batch")(e));
                }
            };
            if !held {
                self.ctx.ownership.fencing_rejection();
                return Ok(Step::Exit(Exit::Fenced(
                    "another instance took the lease over: the batch was not retired (its new owner publishes it again)",
                )));
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
                *blocked = None;
                self.metrics.batches.increment(1);
                self.metrics
                    .batch_duration
                    .record(started.elapsed().as_secs_f64());
                self.metrics.batch_size.record(batch.len() as f64);
                self.set_state(PartitionState::Relaying);
                Ok(Step::Next)
            }
            Outcome::Stopped => Ok(Step::Exit(Exit::Stop)),
            Outcome::Fenced => {
                self.ctx.ownership.fencing_rejection();
                Ok(Step::Exit(Exit::Fenced(
                    "another instance took the lease over: the refused message was not moved aside",
                )))
            }
            Outcome::Blocked { message_id } => {
                *blocked = Some(message_id);
                Ok(Step::Blocked)
            }
        }
    }
}

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
