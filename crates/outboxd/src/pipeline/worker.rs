//! One virtual partition's worker, its lifecycle: claims the partition's lease when the
//! shared view makes its instance the owner (`ownership`), runs the batch loop
//! (`batch_loop`: read a batch -> send it, joining the batches in flight, `in_flight`, or
//! alone, round by round, `delivery`), whose batches coming back are settled (`settle`:
//! retire what Kafka acknowledged, in order, and only while the lease carries its epoch;
//! the failure path), and lets the partition go when the view moves it. It takes a
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

mod batch_loop;
mod settle;

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
}

/// Now, in seconds since the epoch (to compare with a row's `created_at`).
fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
