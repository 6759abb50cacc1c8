//! Finding new work for the partition workers without a NOTIFY per write (which takes a
//! global lock at commit and serializes commits). One task asks PostgreSQL every
//! `wakeup_interval_ms` which partitions hold messages committed since its previous
//! snapshot, with one query over the xid index for all partitions, and hands each such
//! partition its read window through a [`Mailbox`]. Workers of quiet partitions do nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::ownership::Ownership;
use crate::periodic::Periodic;
use crate::pipeline::reader::{FreshRows, Window};
use crate::pipeline::store::{PARKED_EPOCH_COLUMN, row_to_message};
use crate::session::Incarnation;
use crate::shutdown::Shutdown;
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
    /// The window's rows, when the poller read them (small windows of partitions this
    /// instance holds): the worker then need not read.
    pub fresh: Option<FreshRows>,
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

    /// Leaves a window, with its rows when the poller read them, merging it into one not yet
    /// taken. Rows of consecutive windows are joined (up to `MAX_FRESH_ROWS`); otherwise the
    /// merged window goes without rows and the worker reads it.
    pub fn offer(&self, window: Window, fresh: Option<FreshRows>) {
        {
            let mut guard = self.lock();
            let s = &mut *guard;
            match &mut s.window {
                Some(w) => {
                    s.fresh = match (s.fresh.take(), fresh) {
                        (Some(mut old), Some(new))
                            if new.previous == w.snapshot
                                && new.parked_epoch == old.parked_epoch
                                && old.rows.len() + new.rows.len() <= MAX_FRESH_ROWS =>
                        {
                            old.rows.extend(new.rows);
                            old.rows.sort_by_key(|r| r.id);
                            Some(old)
                        }
                        _ => None,
                    };
                    w.merge(window);
                }
                None => {
                    s.window = Some(window);
                    s.fresh = fresh;
                }
            }
        }
        self.notify.notify_one();
    }

    /// Asks the worker to reread its partition from the start. A window not yet taken is
    /// dropped: the reread covers it.
    pub fn reset(&self) {
        {
            let mut s = self.lock();
            s.reset = true;
            s.window = None;
            s.fresh = None;
        }
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

/// The most rows a mailbox holds for its worker; a window with more is read by the worker.
const MAX_FRESH_ROWS: usize = 64;

/// The poller reads a window's rows for the worker (one statement for all partitions,
/// instead of one read per partition) when it has at most this many rows...
const FRESH_ROWS_PER_PARTITION: i64 = 64;

/// ... and the windows it reads hold at most this many rows together.
const FRESH_ROWS_PER_POLL: i64 = 2048;

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

/// Where the poller starts from: a snapshot with the parked epoch of its moment, and the
/// incarnation of the database it was taken in.
#[derive(Debug, Clone)]
pub struct PollerStart {
    /// The snapshot, as `pg_snapshot` text.
    pub snapshot: String,
    /// `settings.parked_epoch` at the time.
    pub parked_epoch: i64,
    /// The incarnation of the session the snapshot was taken on.
    pub incarnation: Incarnation,
}

/// The poller's starting point, read before any worker starts (so every commit after it
/// reaches a worker through a window), and again whenever the poller reconnects to another
/// incarnation of the database.
pub async fn initial_state(client: &Client, sql: &Statements) -> crate::Result<PollerStart> {
    let incarnation = crate::session::incarnation(client, sql).await?;
    let row = client
        .query_one(&sql.current_snapshot, &[])
        .await
        .map_err(crate::Error::pg("reading the current snapshot"))?;
    Ok(PollerStart {
        snapshot: row
            .try_get(0)
            .map_err(crate::Error::pg("reading the current snapshot"))?,
        parked_epoch: parked_epoch(&row, 1)?,
        incarnation,
    })
}

/// Column `index` of `row`: `settings.parked_epoch`, which is missing when someone deleted
/// the settings row.
fn parked_epoch(row: &tokio_postgres::Row, index: usize) -> crate::Result<i64> {
    row.try_get::<_, Option<i64>>(index)
        .map_err(crate::Error::pg("reading settings.parked_epoch"))?
        .ok_or(crate::Error::SettingsMissing)
}

/// The partitions that have a worker in this relay instance, shared by the relay (which
/// starts the workers) and the poller (which asks for a worker where it finds messages).
#[derive(Debug)]
pub struct Served(Vec<AtomicBool>);

impl Served {
    /// Room for `capacity` partitions; `0..initial` are served.
    pub fn new(capacity: usize, initial: i32) -> Self {
        Served(
            (0..capacity)
                .map(|p| AtomicBool::new(i32::try_from(p).is_ok_and(|p| p < initial)))
                .collect(),
        )
    }

    /// Marks `partition` served; true when it was not yet (the caller starts its worker).
    pub fn claim(&self, index: usize) -> bool {
        self.0
            .get(index)
            .is_some_and(|s| !s.swap(true, Ordering::Relaxed))
    }
}

/// Everything the poller needs.
pub struct Poller {
    /// Connection settings, for reconnecting.
    pub database: crate::connect::Database,
    /// The first connection (already set up), or `None` to connect (a restarted poller).
    pub client: Option<Client>,
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
    pub served: Arc<Served>,
    /// Where to ask for a new worker.
    pub spawn: tokio::sync::mpsc::UnboundedSender<i32>,
    /// Where the poller reports its problems.
    pub health: Arc<crate::health::Health>,
    /// Where the poller reports that it is alive.
    pub pulse: Arc<PollerPulse>,
    /// The leases this instance holds: the poller reads the rows of small windows only for
    /// partitions whose worker works them now.
    pub ownership: Arc<Ownership>,
    /// From [`initial_state`], taken before the workers started; `None` for a restarted
    /// poller, which starts from a fresh snapshot and has every worker reread its partition
    /// (commits made while no poller ran are announced by no window).
    pub start: Option<PollerStart>,
}

impl Poller {
    /// Polls until `stop` turns true. Keeps its last snapshot across a reconnect to the same
    /// incarnation of the database, so the first window after an outage covers the outage.
    /// After a reconnect to another incarnation (crash recovery, failover) the old snapshot
    /// means nothing: it starts from a fresh one and has every worker reread its partition
    /// from the start (the fresh snapshot is taken first, so every commit is in a reread or in
    /// a later window).
    pub async fn run(self, shutdown: Shutdown) {
        let Poller {
            database,
            mut client,
            sql,
            interval,
            retry,
            mailboxes,
            served,
            spawn,
            health,
            pulse,
            ownership,
            start,
        } = self;
        let mut state = start;
        let mut periodic = Periodic::new(interval, shutdown);
        let mut backoff = Backoff::new(retry.0, retry.1);
        // `poll_windows` prepared on the current connection.
        let mut prepared: Option<tokio_postgres::Statement> = None;
        // Said once, not every tick.
        let mut warned_outside = false;
        // The snapshot of the last window handed to each partition. A partition the poller
        // found no new rows in since then has none committed between that snapshot and the
        // previous one, so the rows it reads now follow that window directly: that is what
        // a worker's reader compares with the end of its last window.
        let mut last_window: std::collections::HashMap<i32, String> =
            std::collections::HashMap::new();
        // Quiet for longer than two of the longest backoffs plus a minute: stuck.
        let allowance = retry.1 * 2 + Duration::from_secs(60);
        while periodic.tick().await {
            health.beat("wake-up poller", allowance);
            let (Some(c), Some(current)) = (client.as_ref().filter(|c| !c.is_closed()), &mut state)
            else {
                prepared = None;
                client = reconnect(&database).await;
                let fresh = match &client {
                    Some(c) => initial_state(c, &sql).await.map_err(|e| {
                        tracing::warn!(error = %e, "wake-up poller cannot read its starting point");
                    }),
                    None => Err(()),
                };
                match (fresh, &state) {
                    (Ok(fresh), Some(s)) if fresh.incarnation == s.incarnation => {}
                    (Ok(fresh), old) => {
                        match old {
                            Some(s) => tracing::warn!(
                                old = %s.incarnation, new = %fresh.incarnation,
                                "the database restarted from a crash or failed over (transaction \
                                 ids may repeat): every partition is reread from its start"
                            ),
                            None => tracing::info!(
                                "wake-up poller (re)started: every partition is reread from its start"
                            ),
                        }
                        state = Some(fresh);
                        last_window.clear();
                        mailboxes.iter().for_each(|m| m.reset());
                    }
                    (Err(()), _) => {
                        client = None;
                        periodic.shutdown().sleep(backoff.next_delay()).await;
                    }
                }
                continue;
            };
            if prepared.is_none() {
                prepared = c.prepare(&sql.poll_windows).await.ok();
            }
            let Some(poll) = prepared.as_ref() else {
                client = None;
                periodic.shutdown().sleep(backoff.next_delay()).await;
                continue;
            };
            let held: Vec<i32> = ownership.leases().into_keys().collect();
            // Before the statement, so no later than its snapshot (see `FreshRows::read_at`).
            let read_at = Instant::now();
            match c
                .query(
                    poll,
                    &[
                        &current.snapshot,
                        &held,
                        &FRESH_ROWS_PER_PARTITION,
                        &FRESH_ROWS_PER_POLL,
                    ],
                )
                .await
            {
                Ok(rows) => {
                    backoff.reset();
                    pulse.beat();
                    let polled = match Polled::decode(&rows, &current.snapshot, read_at) {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::error!(error = %e, "wake-up poll answered something unusable; workers fall back to polling");
                            health.set_task("wake-up poller", Some(format!("cannot poll: {e}")));
                            periodic.shutdown().sleep(backoff.next_delay()).await;
                            continue;
                        }
                    };
                    health.set_task("wake-up poller", None);
                    if polled.parked_epoch != current.parked_epoch {
                        current.parked_epoch = polled.parked_epoch;
                        last_window.clear();
                        mailboxes.iter().for_each(|m| m.reset());
                    }
                    for (p, min_id, rows) in polled.windows {
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
                        let rows = rows.map(|mut f| {
                            if let Some(previous) = last_window.get(&p) {
                                f.previous.clone_from(previous);
                            }
                            f
                        });
                        last_window.insert(p, polled.snapshot.clone());
                        mailboxes[index].offer(
                            Window {
                                snapshot: polled.snapshot.clone(),
                                cursor: min_id - 1,
                                incarnation: current.incarnation.clone(),
                            },
                            rows,
                        );
                        if served.claim(index) {
                            // The new worker's first window is the whole partition; the
                            // window left here stays pending and reads nothing twice.
                            let _ = spawn.send(p);
                        }
                    }
                    current.snapshot = polled.snapshot;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "wake-up poll failed; workers fall back to polling");
                    health.set_task(
                        "wake-up poller",
                        Some(format!("cannot poll: {}", outbox::describe_pg_error(&e))),
                    );
                    if c.is_closed() {
                        client = None;
                    }
                    periodic.shutdown().sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

/// What one poll found: the new snapshot, the parked epoch, and each partition's window
/// (partition, smallest new id) with its rows when the poll read them.
#[derive(Debug)]
struct Polled {
    snapshot: String,
    parked_epoch: i64,
    windows: Vec<(i32, i64, Option<FreshRows>)>,
}

/// The columns of `poll_windows` after the batch read's (see `Statements::poll_windows`).
const POLL_PARTITION: usize = PARKED_EPOCH_COLUMN + 1;
const POLL_MIN_ID: usize = PARKED_EPOCH_COLUMN + 2;
const POLL_LISTED_ID: usize = PARKED_EPOCH_COLUMN + 4;
const POLL_SNAPSHOT: usize = PARKED_EPOCH_COLUMN + 5;

impl Polled {
    /// Decodes `poll_windows`' rows, polled after the snapshot `previous` with the statement
    /// sent at `read_at`. Rows come by partition and id.
    fn decode(
        rows: &[tokio_postgres::Row],
        previous: &str,
        read_at: Instant,
    ) -> crate::Result<Polled> {
        let unusable = |e| crate::Error::pg("reading the poll")(e);
        // The statement returns at least one row by construction (a LEFT JOIN from the
        // one-row current snapshot).
        let first = rows
            .first()
            .ok_or_else(|| crate::Error::NotFound("the wake-up poll's row".to_owned()))?;
        let mut polled = Polled {
            snapshot: first.try_get(POLL_SNAPSHOT).map_err(&unusable)?,
            parked_epoch: parked_epoch(first, PARKED_EPOCH_COLUMN)?,
            windows: Vec::new(),
        };
        for row in rows {
            let Some(partition) = row
                .try_get::<_, Option<i32>>(POLL_PARTITION)
                .map_err(&unusable)?
            else {
                continue; // no partition has new messages
            };
            if polled.windows.last().is_none_or(|w| w.0 != partition) {
                let min_id: i64 = row.try_get(POLL_MIN_ID).map_err(&unusable)?;
                let listed = row
                    .try_get::<_, Option<i64>>(POLL_LISTED_ID)
                    .map_err(&unusable)?;
                let fresh = listed.map(|_| FreshRows {
                    previous: previous.to_owned(),
                    rows: Vec::new(),
                    parked_epoch: Some(polled.parked_epoch),
                    read_at,
                });
                polled.windows.push((partition, min_id, fresh));
            }
            // A read row of a parked entity has no message columns.
            if row
                .try_get::<_, Option<i64>>(0)
                .map_err(&unusable)?
                .is_some()
                && let Some((_, _, rows @ Some(_))) = polled.windows.last_mut()
            {
                // A row that cannot be decoded: the worker reads this window itself (its
                // read reports the problem where the partition's policies apply).
                match (row_to_message(row), rows.as_mut()) {
                    (Ok(message), Some(fresh)) => fresh.rows.push(message),
                    _ => *rows = None,
                }
            }
        }
        Ok(polled)
    }
}

async fn reconnect(database: &crate::connect::Database) -> Option<Client> {
    crate::session::connect(database, SESSION_SETUP, "wake-up poller")
        .await
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::reader::OutboxRow;

    fn window(snapshot: &str, cursor: i64) -> Window {
        Window {
            snapshot: snapshot.to_owned(),
            cursor,
            incarnation: Incarnation::new("db"),
        }
    }

    fn fresh(previous: &str, ids: &[i64]) -> FreshRows {
        FreshRows {
            previous: previous.to_owned(),
            rows: ids
                .iter()
                .map(|&id| OutboxRow::for_tests(id, "e", "t"))
                .collect(),
            parked_epoch: Some(1),
            read_at: Instant::now(),
        }
    }

    fn ids(d: &Delivered) -> Option<Vec<i64>> {
        d.fresh
            .as_ref()
            .map(|f| f.rows.iter().map(|r| r.id).collect())
    }

    #[test]
    fn rows_of_consecutive_windows_join_and_others_fall_back_to_a_read() {
        let m = Mailbox::default();
        m.offer(window("s2", 9), Some(fresh("s1", &[10, 12])));
        m.offer(window("s3", 10), Some(fresh("s2", &[11, 13])));
        let d = m.take();
        assert_eq!(d.window, Some(window("s3", 9)));
        assert_eq!(ids(&d), Some(vec![10, 11, 12, 13]));
        assert_eq!(d.fresh.map(|f| f.previous), Some("s1".to_owned()));
        // A window without rows in between: the merged window is read by the worker.
        m.offer(window("s4", 20), Some(fresh("s3", &[21])));
        m.offer(window("s5", 22), None);
        m.offer(window("s6", 24), Some(fresh("s5", &[25])));
        let d = m.take();
        assert_eq!(d.window, Some(window("s6", 20)));
        assert_eq!(ids(&d), None);
        // A reset drops both.
        m.offer(window("s7", 30), Some(fresh("s6", &[31])));
        m.reset();
        let d = m.take();
        assert!(d.reset && d.window.is_none() && d.fresh.is_none());
    }

    #[test]
    fn a_mailbox_holds_a_bounded_number_of_rows() {
        let m = Mailbox::default();
        let many: Vec<i64> = (1..=MAX_FRESH_ROWS as i64).collect();
        m.offer(window("s2", 0), Some(fresh("s1", &many)));
        m.offer(window("s3", 100), Some(fresh("s2", &[1000])));
        let d = m.take();
        assert_eq!(ids(&d), None, "over the bound: the worker reads the window");
        assert_eq!(d.window, Some(window("s3", 0)));
    }
}
