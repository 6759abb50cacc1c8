//! The relay: checks the schema, creates the producer, starts the wake-up poller, the mapping
//! cleanup and one worker per virtual partition under a supervisor (a task that ends early is
//! restarted), and on shutdown stops reading, lets in-flight batches finish and flushes the
//! producer, all within the shutdown timeout. `outboxd run` is a thin wrapper.
//!
//! The partition count can change while the relay runs: when the poller finds messages in
//! a partition without a worker (the count was raised, or entities mapped above a lowered
//! count write again), the relay starts one for it.

use std::future::Future;
use std::sync::Arc;

use crate::config::Config;
use crate::error::Result;
use crate::faults::Faults;
use crate::health::Health;
use crate::ownership::Ownership;
use crate::pipeline::wakeup::{Mailbox, Poller, PollerPulse, Served};
use crate::pipeline::worker::{WorkerContext, run_worker};
use crate::publisher::Publisher;
use crate::shutdown::Shutdown;
use crate::startup::{Started, start_up};
use crate::supervisor::{Starter, Supervisor, Task, TaskFuture};

/// Runs the relay until `shutdown` completes, then shuts down gracefully. Returns an error
/// when it cannot start (bad config, unreachable PostgreSQL, missing schema).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    Relay::new(config)?.run(shutdown).await
}

/// A relay, configured and validated but not yet running; [`Relay::health`] is available
/// before and while it runs (the binary serves it on `/health`).
pub struct Relay {
    config: Config,
    health: Arc<Health>,
    faults: Arc<Faults>,
}

impl Relay {
    /// Validates `config`.
    pub fn new(config: Config) -> Result<Relay> {
        config.validate()?;
        Ok(Relay {
            config,
            health: Arc::new(Health::default()),
            faults: Arc::new(Faults::default()),
        })
    }

    /// The state of every partition this relay serves.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Faults a test can inject into the running relay (to prove that supervision works).
    #[doc(hidden)]
    pub fn faults(&self) -> Arc<Faults> {
        Arc::clone(&self.faults)
    }

    /// Runs until `shutdown` completes, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        run_relay(self.config, self.health, self.faults, shutdown).await
    }
}

/// The most partitions a schema can have (`settings.partition_count` is checked against it).
const MAX_PARTITIONS: usize = 4096;

async fn run_relay(
    config: Config,
    health: Arc<Health>,
    faults: Arc<Faults>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    tokio::pin!(shutdown);
    let Some(Started {
        control,
        instance,
        sql,
        partitions,
        max_record_bytes,
        start,
    }) = start_up(&config, &health, shutdown.as_mut()).await?
    else {
        tracing::info!("stopped before the relay started");
        return Ok(());
    };
    let schema = config.schema()?;
    let database = config.database()?;
    tracing::info!(%instance, "registered as a relay instance");
    let ownership = Arc::new(Ownership::new(instance, config.lease_ttl()));
    health.set_ownership(Arc::clone(&ownership));
    health.set_started();
    crate::metrics::register_relay_counters();
    let publisher = Publisher::new(&config, max_record_bytes)?;
    let shutdown_timeout = config.shutdown_timeout();
    let retry = (config.retry_initial(), config.retry_max());

    let stopping = Shutdown::new();
    // A mailbox for every partition there can be, so the poller can hand a window to a
    // partition whose worker starts only then (see `Poller::run`).
    let mailboxes: Vec<Arc<Mailbox>> = (0..MAX_PARTITIONS).map(|_| Arc::default()).collect();
    let served = Arc::new(Served::new(MAX_PARTITIONS, partitions));
    let served_here = Arc::clone(&served);
    let (spawn_tx, mut spawn_rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
    let pulse = Arc::new(PollerPulse::default());
    let sessions = Arc::new(crate::sessions::SessionPool::new(
        database.clone(),
        sql.clone(),
        &schema,
        config.pool_size,
    ));
    let ctx = Arc::new(WorkerContext {
        database: database.clone(),
        sessions,
        sql: sql.clone(),
        publisher: Arc::new(publisher),
        row_budget: crate::pipeline::worker::row_budget(config.batch_size),
        config,
        health: Arc::clone(&health),
        ownership: Arc::clone(&ownership),
        faults,
        retirements: crate::pipeline::retire::Retirements::default(),
        retire_clock: crate::pipeline::retire::RetireClock::default(),
    });
    let starter: Starter = {
        let (ctx, stopping, mailboxes, pulse) = (
            Arc::clone(&ctx),
            stopping.clone(),
            mailboxes.clone(),
            Arc::clone(&pulse),
        );
        // The first poller gets the control connection and the starting point; a restarted
        // one connects and starts over (see `Poller::start`).
        let first_poller = std::sync::Mutex::new(Some((control, start)));
        Box::new(move |task| -> TaskFuture {
            match task {
                Task::Poller => {
                    let first = match first_poller.lock() {
                        Ok(mut g) => g.take(),
                        Err(poisoned) => poisoned.into_inner().take(),
                    };
                    let (client, start) = first.map_or((None, None), |(c, s)| (Some(c), Some(s)));
                    Box::pin(
                        Poller {
                            database: ctx.database.clone(),
                            client,
                            sql: ctx.sql.clone(),
                            interval: ctx.config.wakeup_interval(),
                            retry: (ctx.config.retry_initial(), ctx.config.retry_max()),
                            mailboxes: mailboxes.clone(),
                            served: Arc::clone(&served),
                            spawn: spawn_tx.clone(),
                            health: Arc::clone(&ctx.health),
                            pulse: Arc::clone(&pulse),
                            ownership: Arc::clone(&ctx.ownership),
                            start,
                        }
                        .run(stopping.clone()),
                    )
                }
                Task::Leases => Box::pin(crate::ownership::leases::run(
                    ctx.database.clone(),
                    ctx.sql.clone(),
                    Arc::clone(&ctx.ownership),
                    Arc::clone(&ctx.health),
                    ctx.config.shutdown_timeout(),
                    stopping.clone(),
                )),
                Task::KafkaWatch => Box::pin(crate::kafka_watch::run(
                    Arc::clone(&ctx.publisher),
                    Arc::clone(&ctx.health),
                    stopping.clone(),
                )),
                Task::Backlog => Box::pin(crate::backlog::run(
                    Arc::clone(&ctx.sessions),
                    ctx.sql.clone(),
                    Arc::clone(&ctx.ownership),
                    ctx.config.schema.clone(),
                    stopping.clone(),
                )),
                Task::MappingCleanup => Box::pin(crate::mappings::run_cleanup(
                    ctx.database.clone(),
                    ctx.sql.clone(),
                    std::time::Duration::from_millis(ctx.config.mapping_cleanup_interval_ms),
                    std::time::Duration::from_secs(ctx.config.mapping_ttl_s),
                    (ctx.config.retry_initial(), ctx.config.retry_max()),
                    stopping.clone(),
                )),
                Task::Worker(partition) => {
                    let mailbox = usize::try_from(partition)
                        .ok()
                        .and_then(|p| mailboxes.get(p))
                        .cloned()
                        .unwrap_or_default();
                    Box::pin(run_worker(
                        partition,
                        Arc::clone(&ctx),
                        stopping.clone(),
                        mailbox,
                        Arc::clone(&pulse),
                    ))
                }
            }
        })
    };
    let mut supervisor = Supervisor::new(starter, retry, Arc::clone(&health), stopping.clone());
    supervisor.spawn(Task::Leases);
    supervisor.spawn(Task::Poller);
    supervisor.spawn(Task::KafkaWatch);
    supervisor.spawn(Task::Backlog);
    if ctx.config.mapping_cleanup_interval_ms > 0 {
        supervisor.spawn(Task::MappingCleanup);
    }
    for partition in 0..partitions {
        supervisor.spawn(Task::Worker(partition));
    }
    tracing::info!(partitions, schema = %schema, "relay started");

    let mut view = ctx.ownership.subscribe();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(partition) = spawn_rx.recv() => {
                tracing::info!(partition, "messages in a partition without a worker: starting one");
                supervisor.spawn(Task::Worker(partition));
            }
            Ok(()) = view.changed() => {
                // Every instance runs a worker for every partition that needs an owner (below
                // the count, and above it while it holds messages), so that whichever the view
                // gives this instance is claimed at once, also one whose messages were
                // committed while this instance's poller did not see them (it started later,
                // or restarted after a crash of the database).
                let needed = view.borrow_and_update().as_deref().map(|v| {
                    (0..v.count).chain(v.above.iter().copied()).collect::<Vec<i32>>()
                });
                for partition in needed.unwrap_or_default() {
                    if usize::try_from(partition).is_ok_and(|i| served_here.claim(i)) {
                        supervisor.spawn(Task::Worker(partition));
                    }
                }
            }
            running = supervisor.watch_next() => {
                if !running {
                    break;
                }
            }
        }
    }
    tracing::info!("shutting down: finishing in-flight batches");
    stopping.request();
    // One deadline for the whole shutdown: workers finish their batches, then the producer
    // flushes whatever is still in flight, in what is left of the timeout.
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    if !supervisor.drain(shutdown_timeout).await {
        tracing::warn!(
            ?shutdown_timeout,
            "in-flight batches did not finish in time; abandoning them (they are published again on restart)"
        );
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if let Err(e) = ctx.publisher.flush(left) {
        // Messages not acknowledged were not retired: the next run publishes them.
        tracing::warn!(error = %e, "the producer could not deliver everything before the shutdown timeout; unacknowledged messages stay in the outbox");
    }
    tracing::info!("relay stopped");
    Ok(())
}
