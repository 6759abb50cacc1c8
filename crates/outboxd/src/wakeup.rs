//! Finding new work for the partition workers without a NOTIFY per write (which takes a
//! global lock at commit and serializes commits). One task asks PostgreSQL every
//! `wakeup_interval_ms` which partitions hold messages committed since its previous
//! snapshot, with one query over the xid index for all partitions, and hands each such
//! partition its read window through a [`Mailbox`]. Workers of quiet partitions do nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::ownership::Ownership;
use crate::periodic::Periodic;
use crate::reader::Window;
use crate::sql::{SESSION_SETUP, Statements};

/// What the poller left for one worker: a window (merged with earlier ones not yet
/// taken), or the order to reread the whole partition (after `outboxd unpark`).
#[derive(Debug, Default)]
pub struct Mailbox {
    state: Mutex<Delivered>,
    notify: Notify,
}

/// The contents of a [`Mailbox`].
#[derive(Debug, Default)]
pub struct Delivered {
    /// A window to read, if new messages were committed.
    pub window: Option<Window>,
    /// True when the partition must be reread from its start.
    pub reset: bool,
}

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Delivered> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Leaves a window, merging it into one not yet taken.
    pub fn offer(&self, window: Window) {
        {
            let mut s = self.lock();
            match &mut s.window {
                Some(w) => w.merge(window),
                None => s.window = Some(window),
            }
        }
        self.notify.notify_one();
    }

    /// Asks the worker to reread its partition from the start.
    pub fn reset(&self) {
        self.lock().reset = true;
        self.notify.notify_one();
    }

    /// Takes whatever was left.
    pub fn take(&self) -> Delivered {
        std::mem::take(&mut *self.lock())
    }

    /// Waits until something is left (returns at once if something already was).
    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

/// When the poller last succeeded, so workers can tell whether to rely on it.
#[derive(Debug)]
pub struct PollerPulse {
    started: Instant,
    last_ok_ms: AtomicU64,
}

impl Default for PollerPulse {
    fn default() -> Self {
        PollerPulse {
            started: Instant::now(),
            last_ok_ms: AtomicU64::new(0),
        }
    }
}

impl PollerPulse {
    fn beat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ok_ms.store(ms, Ordering::Relaxed);
    }

    /// True when the poller has not succeeded for longer than `limit`.
    pub fn is_stale(&self, limit: Duration) -> bool {
        let last = Duration::from_millis(self.last_ok_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last) > limit
    }
}

/// The poller's starting point: the snapshot and parked epoch read before any worker
/// starts, so every commit after it reaches a worker through a window.
pub async fn initial_state(
    client: &Client,
    sql: &Statements,
) -> Result<(String, i64), tokio_postgres::Error> {
    let row = client.query_one(&sql.current_snapshot, &[]).await?;
    Ok((row.get(0), row.get(1)))
}

/// Everything the poller needs.
pub struct Poller {
    /// Connection settings, for reconnecting.
    pub pg_config: tokio_postgres::Config,
    /// The first connection (already set up).
    pub client: Client,
    /// The SQL texts.
    pub sql: Statements,
    /// Time between polls.
    pub interval: Duration,
    /// Reconnect backoff bounds.
    pub retry: (Duration, Duration),
    /// One mailbox per possible partition (`0..MAX_PARTITIONS`).
    pub mailboxes: Vec<Arc<Mailbox>>,
    /// Partitions with a worker; `spawn` asks for a worker for any other partition the
    /// poller finds messages in (the partition count was raised, or a lowered count left
    /// sticky entities above it).
    pub served: Vec<bool>,
    /// Where to ask for a new worker.
    pub spawn: tokio::sync::mpsc::UnboundedSender<i32>,
    /// This instance's fair share of partitions, updated from the count of registered
    /// instances about once a second. The poller's connection carries the registration.
    pub ownership: Arc<Ownership>,
    /// Where the poller reports that it is alive.
    pub pulse: Arc<PollerPulse>,
    /// From [`initial_state`].
    pub start: (String, i64),
}

impl Poller {
    /// Polls until `stop` turns true. Keeps its last snapshot across reconnects, so the
    /// first window after an outage covers the outage.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let Poller {
            pg_config,
            client,
            sql,
            interval,
            retry,
            mailboxes,
            mut served,
            spawn,
            ownership,
            pulse,
            start,
        } = self;
        let mut client = Some(client);
        let (mut previous, mut epoch) = start;
        let mut periodic = Periodic::new(interval, stop);
        let mut backoff = Backoff::new(retry.0, retry.1);
        // `poll_windows` prepared on the current connection.
        let mut prepared: Option<tokio_postgres::Statement> = None;
        let mut counted_at: Option<Instant> = None;
        // Said once, not every tick.
        let mut warned_outside = false;
        while periodic.tick().await {
            let Some(c) = client.as_ref().filter(|c| !c.is_closed()) else {
                prepared = None;
                client = reconnect(&pg_config, &sql.register_instance).await;
                if client.is_none() {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                continue;
            };
            if prepared.is_none() {
                prepared = c.prepare(&sql.poll_windows).await.ok();
            }
            let Some(poll) = prepared.as_ref() else {
                client = None;
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            };
            match c.query_one(poll, &[&previous]).await {
                Ok(row) => {
                    backoff.reset();
                    pulse.beat();
                    if counted_at.is_none_or(|t| t.elapsed() >= INSTANCE_COUNT_INTERVAL) {
                        counted_at = Some(Instant::now());
                        if let Ok(r) = c.query_one(&sql.count_instances, &[]).await {
                            let instances: i64 = r.get(0);
                            ownership.set_share(
                                served.iter().filter(|s| **s).count(),
                                usize::try_from(instances).unwrap_or(1),
                            );
                        }
                    }
                    let snapshot: String = row.get(0);
                    let parked_epoch: i64 = row.get(1);
                    let partitions: Option<Vec<i32>> = row.get(2);
                    let min_ids: Option<Vec<i64>> = row.get(3);
                    if parked_epoch != epoch {
                        epoch = parked_epoch;
                        mailboxes.iter().for_each(|m| m.reset());
                    }
                    for (p, min_id) in partitions
                        .unwrap_or_default()
                        .into_iter()
                        .zip(min_ids.unwrap_or_default())
                    {
                        let Some(index) = usize::try_from(p).ok().filter(|&i| i < mailboxes.len())
                        else {
                            if !std::mem::replace(&mut warned_outside, true) {
                                tracing::warn!(
                                    partition = p,
                                    "messages in a partition outside 0..4096 are not relayed"
                                );
                            }
                            continue;
                        };
                        mailboxes[index].offer(Window {
                            snapshot: snapshot.clone(),
                            cursor: min_id - 1,
                        });
                        if !served[index] {
                            // The new worker's first window is the whole partition; the
                            // window left here stays pending and reads nothing twice.
                            served[index] = true;
                            let _ = spawn.send(p);
                        }
                    }
                    previous = snapshot;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "wake-up poll failed; workers fall back to polling");
                    if c.is_closed() {
                        client = None;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

async fn reconnect(pg_config: &tokio_postgres::Config, register: &str) -> Option<Client> {
    crate::session::connect(
        pg_config,
        &format!("{SESSION_SETUP} {register};"),
        "wake-up poller",
    )
    .await
    .ok()
}

/// How often the poller counts the relay instances.
const INSTANCE_COUNT_INTERVAL: Duration = Duration::from_secs(1);
