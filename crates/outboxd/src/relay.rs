//! The relay: checks the schema, creates the producer, starts the wake-up poller and one
//! worker per virtual partition, and on shutdown stops reading, lets in-flight batches
//! finish within the timeout, and flushes the producer. `outboxd run` is a thin wrapper.
//!
//! The partition count can change while the relay runs: when the poller finds messages in
//! a partition without a worker (the count was raised, or entities mapped above a lowered
//! count write again), the relay starts one for it.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::health::Health;
use crate::ownership::Ownership;
use crate::publisher::Publisher;
use crate::sql::Statements;
use crate::wakeup::{Mailbox, Poller, PollerPulse, initial_state};
use crate::worker::{WorkerContext, run_worker};

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
}

impl Relay {
    /// Validates `config`.
    pub fn new(config: Config) -> Result<Relay> {
        config.validate()?;
        Ok(Relay {
            config,
            health: Arc::new(Health::default()),
        })
    }

    /// The state of every partition this relay serves.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Runs until `shutdown` completes, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        run_relay(self.config, self.health, shutdown).await
    }
}

/// The most partitions a schema can have (`settings.partition_count` is checked against it).
const MAX_PARTITIONS: usize = 4096;

async fn run_relay(
    config: Config,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let schema = config.schema()?;
    let pg_config: tokio_postgres::Config = config
        .database_url
        .parse()
        .map_err(Error::pg("parsing database_url"))?;
    let control = crate::session::connect(&pg_config, crate::sql::SESSION_SETUP, "control").await?;
    outbox::check_schema(&control, &schema).await?;
    let sql = Statements::new(&schema);
    // The control connection becomes the poller's: it carries this instance's registration.
    control
        .batch_execute(&sql.register_instance)
        .await
        .map_err(Error::pg("registering the relay instance"))?;
    let ownership = Arc::new(Ownership::default());
    let partitions: i32 = control
        .query_one(&sql.partitions_to_serve, &[])
        .await
        .map_err(Error::pg("reading the partition count"))?
        .get(0);
    let publisher = Publisher::new(&config)?;
    let shutdown_timeout = config.shutdown_timeout();

    let (stop_tx, stop_rx) = watch::channel(false);
    // A mailbox for every partition there can be, so the poller can hand a window to a
    // partition whose worker starts only then (see `Poller::spawn`).
    let mailboxes: Vec<Arc<Mailbox>> = (0..MAX_PARTITIONS).map(|_| Arc::default()).collect();
    let served: Vec<bool> = (0..MAX_PARTITIONS)
        .map(|p| i32::try_from(p).is_ok_and(|p| p < partitions))
        .collect();
    let (spawn_tx, mut spawn_rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
    let pulse = Arc::new(PollerPulse::default());
    // Taken before any worker starts, so every later commit reaches a worker in a window.
    let start = initial_state(&control, &sql)
        .await
        .map_err(Error::pg("reading the initial snapshot"))?;
    let mut tasks = JoinSet::new();
    tasks.spawn(
        Poller {
            pg_config: pg_config.clone(),
            client: control,
            sql: sql.clone(),
            interval: config.wakeup_interval(),
            retry: (config.retry_initial(), config.retry_max()),
            mailboxes: mailboxes.clone(),
            served,
            spawn: spawn_tx,
            ownership: Arc::clone(&ownership),
            pulse: Arc::clone(&pulse),
            start,
        }
        .run(stop_rx.clone()),
    );
    if config.mapping_cleanup_interval_ms > 0 {
        tasks.spawn(crate::mappings::run_cleanup(
            pg_config.clone(),
            sql.clone(),
            std::time::Duration::from_millis(config.mapping_cleanup_interval_ms),
            std::time::Duration::from_secs(config.mapping_ttl_s),
            (config.retry_initial(), config.retry_max()),
            stop_rx.clone(),
        ));
    }
    let ctx = Arc::new(WorkerContext {
        pg_config,
        sql,
        publisher,
        config,
        health,
        ownership,
    });
    let spawn_worker = |tasks: &mut JoinSet<()>, partition: i32| {
        let Some(mailbox) = usize::try_from(partition)
            .ok()
            .and_then(|p| mailboxes.get(p))
        else {
            return;
        };
        tasks.spawn(run_worker(
            partition,
            Arc::clone(&ctx),
            stop_rx.clone(),
            Arc::clone(mailbox),
            Arc::clone(&pulse),
        ));
    };
    for partition in 0..partitions {
        spawn_worker(&mut tasks, partition);
    }
    tracing::info!(partitions, schema = %schema, "relay started");

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(partition) = spawn_rx.recv() => {
                tracing::info!(partition, "messages in a partition without a worker: starting one");
                spawn_worker(&mut tasks, partition);
            }
        }
    }
    tracing::info!("shutting down: finishing in-flight batches");
    stop_tx.send_replace(true);
    let drained = tokio::time::timeout(shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?shutdown_timeout,
            "in-flight batches did not finish in time; abandoning them (they are published again on restart)"
        );
        tasks.abort_all();
    }
    ctx.publisher.flush(shutdown_timeout)?;
    tracing::info!("relay stopped");
    Ok(())
}
