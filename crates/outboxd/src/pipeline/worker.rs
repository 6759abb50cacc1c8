//! One virtual partition's worker: claims the partition's lease when the shared view makes
//! its instance the owner (`ownership`), then loops read a batch -> send it (joining the
//! batches in flight, `in_flight`, or alone, round by round, `delivery`) -> retire what
//! Kafka acknowledged, in order, and only while the lease carries its epoch. It takes a
//! session from the instance's bounded pool (`sessions`) for one statement at a time. When a
//! statement fails (PostgreSQL went away) the worker claims the partition again with
//! backoff and rereads it from its start, so nothing is lost (a batch whose delete did not
//! happen is published again: at least once); it rereads as well when a session talks to
//! another incarnation of the database.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::faults::Faults;
use crate::health::{Health, PartitionState};
use crate::metrics::PartitionMetrics;
use crate::ownership::Ownership;
use crate::pipeline::delivery::{ACK_WAIT_BEFORE_RETRYING, Outcome, Refusals};
use crate::pipeline::in_flight::{Flight, InFlight};
use crate::pipeline::reader::{OutboxRow, PartitionReader};
use crate::pipeline::retire::{RetireClock, Retirements};
use crate::pipeline::store::PgReadStore;
use crate::pipeline::wakeup::{Mailbox, PollerPulse};
use crate::publisher::{Publisher, Refusal, Sent};
use crate::sessions::{Checkout, SessionPool};
use crate::shutdown::Shutdown;
use crate::sql::Statements;

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
    /// Retirements of all partitions, run together (see `retire`).
    pub retirements: Retirements,
    /// The shared clock of the workers' periodic retirements.
    pub retire_clock: RetireClock,
    /// Rows the partitions of this instance may have read and not yet seen acknowledged,
    /// together (see [`row_budget`]): a backlog in many partitions at once would otherwise
    /// hold a full batch per partition in memory, twice (the relay's copy and the
    /// producer's).
    pub row_budget: Arc<tokio::sync::Semaphore>,
}

/// The budget of rows in flight for an instance whose batches hold up to `batch_size` rows:
/// eight full batches. Measured in a drain of 200,000 messages over 16 partitions
/// (`benches/peers/run`): a batch per partition in memory took the relay's RSS to 49-55 MiB;
/// eight batches keep the drain's pace with a third less memory.
pub fn row_budget(batch_size: usize) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(
        batch_size.saturating_mul(ROW_BUDGET_BATCHES),
    ))
}

/// See [`row_budget`].
const ROW_BUDGET_BATCHES: usize = 8;

/// How often a worker whose instance should own the partition tries to claim it while
/// another instance still holds the lease (until that one lets it go or its lease expires):
/// every `CLAIM_RETRY_FAST` for the first `CLAIM_FAST_FOR` (a graceful hand-over: the other
/// instance sees the same view within half a second and releases between batches, so the
/// partition waits for its new owner at most one fast retry), then every `CLAIM_RETRY` (an
/// owner that does not let go: its lease runs out after the TTL). Measured with
/// `benches/peers/run --handover`: at a fixed 500 ms the messages of the moved partitions
/// waited up to 240 ms.
const CLAIM_RETRY: Duration = Duration::from_millis(500);
const CLAIM_RETRY_FAST: Duration = Duration::from_millis(25);
const CLAIM_FAST_FOR: Duration = Duration::from_secs(2);

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
    shutdown: Shutdown,
    /// When this worker last parked an entity (see `PartitionReader::refuse_fresh_read_before`).
    pub(crate) parked_at: Option<Instant>,
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

/// Runs the worker for `partition` until shutdown is requested.
pub async fn run_worker(
    partition: i32,
    ctx: Arc<WorkerContext>,
    shutdown: Shutdown,
    mailbox: Arc<Mailbox>,
    pulse: Arc<PollerPulse>,
) {
    let mut w = Worker {
        partition,
        epoch: 0,
        metrics: PartitionMetrics::new(&ctx.config.schema, partition),
        ctx: &ctx,
        shutdown,
        parked_at: None,
    };
    let mut reconnect = Backoff::new(ctx.config.retry_initial(), ctx.config.retry_max());
    let mut reader = PartitionReader::new(partition, ctx.config.batch_size);
    let mut view = ctx.ownership.subscribe();
    w.set_state(PartitionState::Starting);
    // Since when this worker has been waiting for another instance to let the partition go.
    let mut waiting_since: Option<Instant> = None;
    loop {
        if w.stopping() {
            return;
        }
        view.borrow_and_update();
        if !ctx.ownership.is_mine(partition) {
            waiting_since = None;
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
                () = w.shutdown.requested() => {}
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
                let since = *waiting_since.get_or_insert_with(Instant::now);
                let retry = if since.elapsed() < CLAIM_FAST_FOR {
                    CLAIM_RETRY_FAST
                } else {
                    CLAIM_RETRY
                };
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = w.shutdown.requested() => {}
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
        waiting_since = None;
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
                    () = w.shutdown.requested() => {}
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
        self.shutdown.is_requested()
    }

    /// Sleeps for `d`; returns true when shutdown was requested meanwhile.
    pub(crate) async fn sleep_or_stop(&mut self, d: Duration) -> bool {
        self.shutdown.sleep(d).await
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
            () = self.shutdown.requested() => None,
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
        // The claim's session, for the first read. A worker holds a session only for one
        // statement and never waits for another one while holding it: with more partitions
        // than sessions, workers that each held one while waiting for a second (to retire
        // with) would wait for ever.
        let mut session = Some(first);
        // At most a full batch's worth of rows in flight (or one row per batch of the depth,
        // whichever is more): small batches pipeline, a backlog goes a batch at a time.
        let config = &self.ctx.config;
        let mut flights = InFlight::new(
            config.batches_in_flight,
            config.batch_size.max(config.batches_in_flight),
        );
        loop {
            if self.stopping() {
                self.retire_on_stop(&mut flights, reader).await;
                return Exit::Stop;
            }
            self.ctx.faults.before_batch(self.partition);
            if !self.ctx.ownership.is_valid(self.partition, self.epoch) {
                return Exit::Fenced("the lease was not renewed within its TTL");
            }
            if !self.ctx.ownership.is_mine(self.partition) {
                // Let the batches in flight come back and retire what Kafka acknowledged,
                // so that the next owner starts where this one stopped.
                drop(session.take());
                return match self.drain(&mut flights, reader, &mut blocked).await {
                    Ok(Step::Exit(exit)) => exit,
                    Ok(_) => Exit::Release,
                    Err(e) => Exit::Reconnect(e),
                };
            }
            if let Some(t) = self.parked_at {
                reader.refuse_fresh_read_before(t);
            }
            let delivered = mailbox.take();
            if delivered.reset {
                reader.reread();
            }
            if let Some(window) = delivered.window
                && !reader.offer_fresh(window, delivered.fresh)
            {
                tracing::debug!(
                    partition = self.partition,
                    "window from another incarnation of the database dropped (this worker rereads)"
                );
            }
            // Retire the batches Kafka has already acknowledged, oldest first.
            match self.retire_acknowledged(&mut flights, reader).await {
                Ok(Step::Exit(exit)) => return exit,
                // (Retiring acknowledged batches never blocks.)
                Ok(Step::Next | Step::Blocked) => {}
                Err(e) => return Exit::Reconnect(e),
            }
            let retire_at = self.retire_due_at(&flights);
            // The next read's share of the instance's row budget: waited for only with
            // nothing of this partition in flight (a partition with batches on their way
            // waits for them instead, so no two partitions wait for each other's rows).
            let mut budget = None;
            if reader.has_work() && flights.has_room() {
                let want = u32::try_from(self.ctx.config.batch_size).unwrap_or(u32::MAX);
                let budget_pool = Arc::clone(&self.ctx.row_budget);
                budget = if flights.is_empty() {
                    drop(session.take()); // never wait for rows while holding a session
                    tokio::select! {
                        p = budget_pool.acquire_many_owned(want) => p.ok(),
                        () = self.shutdown.requested() => continue,
                    }
                } else {
                    budget_pool.try_acquire_many_owned(want).ok()
                };
            }
            if budget.is_none() {
                // Nothing to read now: the session goes back to the pool.
                drop(session.take());
                if flights.is_empty() {
                    // Caught up.
                    self.metrics.oldest_age.set(0.0);
                    if !self.ctx.ownership.is_below_count(self.partition) {
                        // Delete what was acknowledged before letting go, or the next
                        // owner would find it and publish it again.
                        return match self.retire_held(&mut flights, reader).await {
                            Ok(Step::Exit(exit)) => exit,
                            Ok(_) => Exit::Drained,
                            Err(e) => Exit::Reconnect(e),
                        };
                    }
                    // Wait for the poller to hand over a window.
                    tokio::select! {
                        _ = mailbox.wait() => {}
                        () = tokio::time::sleep_until(retire_at) => {}
                        _ = tokio::time::sleep(self.ctx.config.poll_interval()) => {
                            if pulse.is_stale(stall) {
                                reader.open_own_window();
                            }
                        }
                        () = self.shutdown.requested() => {}
                    }
                    continue;
                }
                // Wait for the oldest batch's acknowledgements, or for a window to read
                // while it is on its way.
                let room = flights.has_room();
                let report_at = slow_acks_report_at(&flights);
                let woke = tokio::select! {
                    done = flights.next_done() => done,
                    _ = mailbox.wait(), if room => None,
                    () = tokio::time::sleep_until(retire_at) => None,
                    () = tokio::time::sleep_until(report_at) => {
                        self.report_slow_acks(&flights);
                        None
                    }
                    () = self.shutdown.requested() => None,
                };
                let step = match woke {
                    Some((flight, acks)) => {
                        self.landed(flight, acks, &mut flights, reader, &mut blocked)
                            .await
                    }
                    None => Ok(Step::Next),
                };
                match self.after(step, reader).await {
                    Some(exit) => return exit,
                    None => continue,
                }
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
                // over since the reader's windows were taken): they mean nothing here. The
                // batches in flight come back first, so that nothing is read twice while
                // on its way.
                drop(s);
                let step = self.drain(&mut flights, reader, &mut blocked).await;
                if let Some(exit) = self.after(step, reader).await {
                    return exit;
                }
                tracing::info!(
                    partition = self.partition,
                    "the database restarted from a crash or failed over: the partition is reread from its start"
                );
                let Some(s) = (match self.checkout_or_stop().await {
                    Some(Ok(s)) => Some(s),
                    Some(Err(e)) => return Exit::Reconnect(e),
                    None => None,
                }) else {
                    return Exit::Stop;
                };
                reader.reset(s.incarnation.clone());
                drop(s);
                continue;
            }
            let batch = match reader
                .next_batch(&PgReadStore::new(&s.client, &self.ctx.sql, &s.read))
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    // The session's state is unknown: close it, claim again and reread.
                    s.discard();
                    return Exit::Reconnect(e);
                }
            };
            drop(s);
            if batch.is_empty() {
                continue;
            }
            // Keep only the rows read of the budget taken for a full batch.
            if let Some(b) = budget.as_mut() {
                drop(b.split(b.num_permits().saturating_sub(batch.len())));
            }
            let read_at = Instant::now();
            tracing::debug!(
                partition = self.partition,
                messages = batch.len(),
                first_id = batch[0].id,
                "batch read"
            );
            self.metrics
                .oldest_age
                .set((now_epoch() - batch[0].created_at_epoch).max(0.0));
            let publisher = &self.ctx.publisher;
            if flights.admits(&batch, blocked, |row| publisher.known_to_exist(row)) {
                let refs: Vec<&OutboxRow> = batch.iter().collect();
                if let Ok(sending) = publisher.start(&refs, flights.producer()).await {
                    drop(refs);
                    let (producer, whole) = (sending.producer(), sending.fully_enqueued());
                    flights.push(
                        batch,
                        read_at,
                        producer,
                        whole,
                        Box::pin(publisher.finish(sending)),
                    );
                    if let Some(b) = budget.take() {
                        flights.attach_budget(b);
                    }
                    continue;
                }
                // The producer was replaced since the batches in flight were sent: this
                // batch waits until they came back.
            }
            // The batch cannot join the ones in flight: it goes alone, round by round,
            // once they came back.
            let mut step = self.drain(&mut flights, reader, &mut blocked).await;
            if matches!(step, Ok(Step::Next)) {
                step = self
                    .deliver_and_retire(batch, &mut blocked, Refusals::new(), read_at, reader)
                    .await;
            } else {
                // The pipeline's own failure path decided (blocked, fenced, ...): this batch
                // is read again.
                reader.settle(batch.iter().map(|r| r.id));
            }
            if let Some(exit) = self.after(step, reader).await {
                return exit;
            }
        }
    }

    /// Turns a step into the worker's next move: `None` to go on, or why the hold ends.
    async fn after(&mut self, step: Result<Step>, reader: &mut PartitionReader) -> Option<Exit> {
        match step {
            Ok(Step::Next) => None,
            Ok(Step::Exit(exit)) => Some(exit),
            Err(e) => Some(Exit::Reconnect(e)),
            Ok(Step::Blocked) => {
                // Reread from the database on the next try: an operator may have moved the
                // message aside (`outboxd skip`) or fixed its cause meanwhile.
                let incarnation = reader.incarnation().clone();
                reader.reset(incarnation);
                if self.sleep_or_stop(self.ctx.config.retry_max()).await {
                    return Some(Exit::Stop);
                }
                None
            }
        }
    }

    /// Shows the partition as retrying while the oldest batch in flight waits for its
    /// acknowledgements (Kafka unreachable or slow; the producer keeps trying).
    fn report_slow_acks(&self, flights: &InFlight<'_>) {
        let Some((first, read_at)) = flights.oldest() else {
            return;
        };
        let last = self
            .ctx
            .publisher
            .events()
            .last_error()
            .map_or_else(String::new, |(_, e)| format!("; last client error: {e}"));
        let error = format!(
            "no acknowledgement from Kafka for {} s{last}",
            read_at.elapsed().as_secs()
        );
        tracing::warn!(partition = self.partition, message_id = first.id, %error, "waiting for Kafka");
        self.set_state(PartitionState::Retrying {
            message_id: first.id,
            error,
        });
    }

    /// Waits until every batch in flight came back, retiring them in order (and delivering
    /// what failed, round by round).
    async fn drain(
        &mut self,
        flights: &mut InFlight<'_>,
        reader: &mut PartitionReader,
        blocked: &mut Option<i64>,
    ) -> Result<Step> {
        while let Some((flight, acks)) = flights.next_done().await {
            match self.landed(flight, acks, flights, reader, blocked).await? {
                Step::Next => {}
                other => return Ok(other),
            }
        }
        self.retire_held(flights, reader).await
    }

    /// On shutdown: waits for the batches in flight (the relay bounds the wait with
    /// `shutdown_timeout_ms`) and retires what Kafka acknowledged, so that a restart does
    /// not publish it again. What failed stays in the table for the next start.
    async fn retire_on_stop(&mut self, flights: &mut InFlight<'_>, reader: &mut PartitionReader) {
        if let Err(e) = self.retire_held(flights, reader).await {
            tracing::debug!(partition = self.partition, error = %e,
                "could not retire on shutdown; the batch is published again after a restart");
            return;
        }
        while let Some((flight, acks)) = flights.next_done().await {
            let acked: Vec<&OutboxRow> = flight
                .rows
                .iter()
                .zip(&acks)
                .filter(|(_, a)| matches!(a, Sent::Acked))
                .map(|(r, _)| r)
                .collect();
            if acked.is_empty() {
                continue;
            }
            match self.retire_now(&acked).await {
                Ok(true) => reader.settle(acked.iter().map(|r| r.id)),
                Ok(false) => return,
                Err(e) => {
                    tracing::debug!(partition = self.partition, error = %e,
                        "could not retire on shutdown; the batch is published again after a restart");
                    return;
                }
            }
        }
    }

    /// Retires the oldest batches in flight that Kafka has acknowledged whole, in one
    /// statement.
    async fn retire_acknowledged(
        &mut self,
        flights: &mut InFlight<'_>,
        reader: &mut PartitionReader,
    ) -> Result<Step> {
        let mut landed = Vec::new();
        while let Some((flight, _)) = flights.take_if_acked() {
            landed.push(flight);
        }
        self.retire_flights(landed, flights, reader).await
    }

    /// When the acknowledged messages held must be deleted (far away when none are held).
    fn retire_due_at(&self, flights: &InFlight<'_>) -> tokio::time::Instant {
        let config = &self.ctx.config;
        flights
            .retire_due_at(
                &self.ctx.retire_clock,
                config.retire_interval(),
                config.batch_size,
            )
            .map_or_else(
                || tokio::time::Instant::now() + Duration::from_secs(3600),
                tokio::time::Instant::from_std,
            )
    }

    /// Deletes the acknowledged messages held, in one statement.
    async fn retire_held(
        &mut self,
        flights: &mut InFlight<'_>,
        reader: &mut PartitionReader,
    ) -> Result<Step> {
        let ids = flights.take_acked();
        if ids.is_empty() {
            return Ok(Step::Next);
        }
        if !self.retire_ids(&ids).await? {
            return Ok(self.fenced_at_retire());
        }
        reader.settle(ids);
        Ok(Step::Next)
    }

    /// The oldest batch in flight came back with `acks`. Acknowledged whole, it is retired
    /// (with the batches behind it that are also acknowledged). Otherwise every batch in
    /// flight is waited for, what Kafka acknowledged is retired, and the rest, in read
    /// order, is delivered round by round as one batch, with the refusals already known:
    /// nothing of it is in flight any more, so retries in place and the topics' policies
    /// act as they do for a batch sent alone.
    async fn landed<'f>(
        &mut self,
        flight: Flight<'f>,
        acks: Vec<Sent>,
        flights: &mut InFlight<'f>,
        reader: &mut PartitionReader,
        blocked: &mut Option<i64>,
    ) -> Result<Step> {
        if acks.iter().all(|a| matches!(a, Sent::Acked)) {
            let mut landed = vec![flight];
            while let Some((next, _)) = flights.take_if_acked() {
                landed.push(next);
            }
            return self.retire_flights(landed, flights, reader).await;
        }
        let mut returned = vec![(flight, acks)];
        while let Some(next) = flights.next_done().await {
            returned.push(next);
        }
        let read_at = returned[0].0.read_at;
        let mut acked = Vec::new();
        let mut rest = Vec::new();
        let mut refusals = Refusals::new();
        for (flight, acks) in returned {
            for (row, sent) in flight.rows.into_iter().zip(acks) {
                match sent {
                    Sent::Acked => acked.push(row),
                    Sent::Failed(f) => {
                        if f.kind == Refusal::Retriable {
                            self.metrics.retriable_errors.increment(1);
                        } else {
                            refusals.insert(row.id, f);
                        }
                        rest.push(row);
                    }
                    Sent::NotSent => rest.push(row),
                }
            }
        }
        tracing::debug!(
            partition = self.partition,
            acknowledged = acked.len(),
            failed = rest.len(),
            "a batch in flight failed: the rest goes round by round"
        );
        // A refusal in a Kafka partition is fatal for the gap-less producer; the first worker
        // to notice replaces it.
        self.ctx.publisher.recover_if_fatal()?;
        if let Step::Exit(exit) = self.retire_held(flights, reader).await? {
            return Ok(Step::Exit(exit));
        }
        if !acked.is_empty() {
            let refs: Vec<&OutboxRow> = acked.iter().collect();
            if !self.retire_now(&refs).await? {
                return Ok(self.fenced_at_retire());
            }
            reader.settle(acked.iter().map(|r| r.id));
        }
        self.deliver_and_retire(rest, blocked, refusals, read_at, reader)
            .await
    }

    /// Retires batches Kafka acknowledged whole, in one statement.
    async fn retire_flights(
        &mut self,
        landed: Vec<Flight<'_>>,
        flights: &mut InFlight<'_>,
        reader: &mut PartitionReader,
    ) -> Result<Step> {
        if !landed.is_empty() {
            let rows: Vec<&OutboxRow> = landed.iter().flat_map(|f| f.rows.iter()).collect();
            self.acknowledged(&rows);
            flights.hold_acked(rows.iter().map(|r| r.id));
            for flight in &landed {
                self.metrics.batches.increment(1);
                self.metrics
                    .batch_duration
                    .record(flight.read_at.elapsed().as_secs_f64());
                self.metrics.batch_size.record(flight.rows.len() as f64);
            }
            self.set_state(PartitionState::Relaying);
        }
        if self.retire_due_at(flights) <= tokio::time::Instant::now() {
            return self.retire_held(flights, reader).await;
        }
        Ok(Step::Next)
    }

    fn fenced_at_retire(&self) -> Step {
        self.ctx.ownership.fencing_rejection();
        Step::Exit(Exit::Fenced(
            "another instance took the lease over: the batch was not retired (its new owner publishes it again)",
        ))
    }

    /// Counts `rows` as published (Kafka acknowledged them) and notes that their topics
    /// exist.
    fn acknowledged(&self, rows: &[&OutboxRow]) {
        self.ctx.publisher.note_acknowledged(rows.iter().copied());
        let now = now_epoch();
        for row in rows {
            self.metrics
                .commit_to_ack
                .record((now - row.created_at_epoch).max(0.0));
        }
        self.metrics.published.increment(rows.len() as u64);
    }

    /// Deletes messages Kafka acknowledged, only while this worker's lease holds, in one
    /// statement with whatever other partitions retire at the same moment (see `retire`);
    /// false when it was fenced (nothing deleted). An error means the statement failed.
    async fn retire_ids(&self, ids: &[i64]) -> Result<bool> {
        self.ctx.faults.before_write(self.partition).await;
        self.ctx
            .retirements
            .retire(
                &self.ctx.sessions,
                self.ctx.ownership.instance(),
                self.partition,
                self.epoch,
                ids.to_vec(),
            )
            .await
    }

    /// Counts `rows` as published and deletes them at once (see `retire_ids`).
    async fn retire_now(&self, rows: &[&OutboxRow]) -> Result<bool> {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let held = self.retire_ids(&ids).await?;
        if held {
            self.acknowledged(rows);
        }
        Ok(held)
    }

    /// Delivers `batch` alone, round by round (nothing else of this partition is in flight),
    /// and retires what Kafka acknowledged, on a session of the pool; an error means a
    /// session failed (it was closed; the caller claims again and rereads).
    async fn deliver_and_retire(
        &mut self,
        batch: Vec<OutboxRow>,
        blocked: &mut Option<i64>,
        refusals: Refusals,
        read_at: Instant,
        reader: &mut PartitionReader,
    ) -> Result<Step> {
        let Some(first) = batch.first() else {
            return Ok(Step::Next);
        };
        tracing::debug!(
            partition = self.partition,
            messages = batch.len(),
            first_id = first.id,
            "batch delivered round by round"
        );
        let (acked, outcome) = self.deliver(&batch, *blocked, refusals).await?;
        if !acked.is_empty() && !self.retire_now(&acked).await? {
            return Ok(self.fenced_at_retire());
        }
        match outcome {
            Outcome::Done => {
                // Acknowledged, moved aside, or held back with a parked entity (which reads
                // leave out).
                reader.settle(batch.iter().map(|r| r.id));
                *blocked = None;
                self.metrics.batches.increment(1);
                self.metrics
                    .batch_duration
                    .record(read_at.elapsed().as_secs_f64());
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

/// When to show the partition as retrying next: each time the oldest batch in flight has
/// waited another `ACK_WAIT_BEFORE_RETRYING` for its acknowledgements.
fn slow_acks_report_at(flights: &InFlight<'_>) -> tokio::time::Instant {
    let Some((_, read_at)) = flights.oldest() else {
        // Nothing in flight: far away (the other branches wake the worker).
        return tokio::time::Instant::now() + Duration::from_secs(3600);
    };
    let periods = read_at.elapsed().as_secs() / ACK_WAIT_BEFORE_RETRYING.as_secs() + 1;
    let due = ACK_WAIT_BEFORE_RETRYING * u32::try_from(periods).unwrap_or(u32::MAX);
    tokio::time::Instant::from_std(read_at + due)
}

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
