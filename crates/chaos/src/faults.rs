//! The fault schedule and its execution. The schedule is a pure function of the seed, the
//! length of the fault phase and the number of relays, so one seed always gives the same
//! faults at the same offsets (the timing of everything else still varies from run to
//! run). Every kind occurs at least once in a phase long enough for it; more faults are
//! drawn at random times and may overlap. Faults on one resource (PostgreSQL, the broker,
//! one relay) wait for each other; faults on different resources run at the same time.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;

use crate::checker::Crash;
use crate::clock::{Clock, unix_us};
use crate::commit_mode::CommitMode;
use crate::error::{Error, Result};
use crate::relays::Relays;
use crate::services::Services;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `kill -9` a relay, start it again after `down`.
    RelayKill {
        /// Which relay.
        relay: usize,
        /// How long it stays dead.
        down: Duration,
    },
    /// Writers commit asynchronously for `lead`, then `pg_ctl -m immediate stop` (a crash:
    /// unflushed WAL is lost, and with it the transaction ids of those seconds), start
    /// after `down`.
    PgCrash {
        /// How long the writers commit asynchronously before the crash.
        lead: Duration,
        /// How long the server stays down.
        down: Duration,
    },
    /// A clean `-m fast` restart of PostgreSQL.
    PgRestart,
    /// `kill -9` the broker, start it again after `down`.
    KafkaKill {
        /// How long the broker stays dead.
        down: Duration,
    },
    /// `UPDATE outbox.settings SET partition_count = count`.
    PartitionCount {
        /// The new count.
        count: i32,
    },
    /// A transaction with an assigned xid kept open (holds back vacuum and every snapshot's
    /// xmin) for `hold`.
    IdleTransaction {
        /// How long it stays open.
        hold: Duration,
    },
    /// SIGSTOP a relay, SIGCONT it after `pause`: its connections stay up, so only its
    /// leases running out (the relays run with a 3 s TTL) free its partitions.
    RelayPause {
        /// Which relay.
        relay: usize,
        /// How long it stays stopped.
        pause: Duration,
    },
    /// Stop a relay gracefully (SIGTERM: it releases its leases and leaves), start it again
    /// after `down` (a new instance joins).
    RelayLeave {
        /// Which relay.
        relay: usize,
        /// How long it stays away.
        down: Duration,
    },
}

impl Action {
    /// The kind's name in the summary.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::RelayKill { .. } => "relay_kill",
            Action::PgCrash { .. } => "pg_crash",
            Action::PgRestart => "pg_restart",
            Action::KafkaKill { .. } => "kafka_kill",
            Action::PartitionCount { .. } => "partition_count",
            Action::IdleTransaction { .. } => "idle_transaction",
            Action::RelayPause { .. } => "relay_pause",
            Action::RelayLeave { .. } => "relay_leave",
        }
    }

    /// How long the fault lasts, as drawn (restarts take longer in practice).
    fn nominal(&self) -> Duration {
        match *self {
            Action::RelayKill { down, .. }
            | Action::KafkaKill { down }
            | Action::RelayLeave { down, .. } => down,
            Action::RelayPause { pause, .. } => pause,
            Action::PgCrash { lead, down } => lead + down,
            Action::IdleTransaction { hold } => hold,
            Action::PgRestart | Action::PartitionCount { .. } => Duration::ZERO,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |d: &Duration| d.as_secs_f64();
        match self {
            Action::RelayKill { relay, down } => {
                write!(f, "kill -9 relay-{relay}, down {:.1}s", s(down))
            }
            Action::PgCrash { lead, down } => write!(
                f,
                "asynchronous commits for {:.1}s, then PostgreSQL crash (immediate), down {:.1}s",
                s(lead),
                s(down)
            ),
            Action::PgRestart => write!(f, "PostgreSQL clean restart"),
            Action::KafkaKill { down } => write!(f, "kill -9 Kafka, down {:.1}s", s(down)),
            Action::PartitionCount { count } => write!(f, "partition_count = {count}"),
            Action::IdleTransaction { hold } => {
                write!(f, "idle transaction with an xid, open {:.1}s", s(hold))
            }
            Action::RelayPause { relay, pause } => {
                write!(f, "SIGSTOP relay-{relay}, SIGCONT after {:.1}s", s(pause))
            }
            Action::RelayLeave { relay, down } => {
                write!(
                    f,
                    "relay-{relay} leaves (SIGTERM), back after {:.1}s",
                    s(down)
                )
            }
        }
    }
}

/// A fault at an offset from the start of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// When it starts.
    pub at: Duration,
    /// What it does.
    pub action: Action,
}

/// Faults start no earlier than this, so the relays are up and messages flow.
const FIRST_FAULT: Duration = Duration::from_secs(3);

/// Draws the schedule for a fault phase of `phase` (faults end within it).
pub fn schedule(seed: u64, phase: Duration, relays: usize) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..=hi));
    let draw = |rng: &mut StdRng, kind: usize| -> Action {
        match kind {
            0 => Action::RelayKill {
                relay: rng.random_range(0..relays.max(1)),
                down: ms(rng, 200, 3_000),
            },
            1 => Action::PgCrash {
                lead: ms(rng, 2_000, 8_000),
                down: ms(rng, 500, 5_000),
            },
            2 => Action::PgRestart,
            3 => Action::KafkaKill {
                down: ms(rng, 1_000, 6_000),
            },
            4 => Action::PartitionCount {
                count: rng.random_range(2..=16),
            },
            5 => Action::IdleTransaction {
                hold: ms(rng, 10_000, 30_000),
            },
            6 => Action::RelayPause {
                relay: rng.random_range(0..relays.max(1)),
                pause: ms(rng, 1_000, 8_000),
            },
            _ => Action::RelayLeave {
                relay: rng.random_range(0..relays.max(1)),
                down: ms(rng, 500, 5_000),
            },
        }
    };
    // Every kind once (the partition count twice: up and down), then one more fault per
    // ten seconds of phase, weighted towards the cheap ones.
    let mut kinds: Vec<usize> = vec![0, 1, 2, 3, 4, 4, 5, 6, 7];
    let extra = phase.as_secs() / 10;
    for _ in 0..extra {
        kinds.push(match rng.random_range(0..100) {
            0..22 => 0,
            22..45 => 4,
            45..58 => 1,
            58..67 => 3,
            67..76 => 2,
            76..84 => 5,
            84..92 => 6,
            _ => 7,
        });
    }
    let mut faults = Vec::new();
    for kind in kinds {
        let mut action = draw(&mut rng, kind);
        // Restarting a service takes seconds beyond the drawn down time.
        let settle = match action {
            Action::KafkaKill { .. } => Duration::from_secs(15),
            Action::PgCrash { .. } | Action::PgRestart => Duration::from_secs(5),
            _ => Duration::from_secs(1),
        };
        let Some(room) = phase.checked_sub(FIRST_FAULT + settle) else {
            continue;
        };
        if let Action::IdleTransaction { hold } = &mut action {
            // Short phases get shorter idle transactions rather than none.
            *hold = (*hold).min(room);
        }
        let Some(latest) = room.checked_sub(action.nominal()) else {
            continue;
        };
        let at = FIRST_FAULT + ms(&mut rng, 0, latest.as_millis() as u64);
        faults.push(Fault { at, action });
    }
    // Stable: faults drawn at the same millisecond keep their drawing order.
    faults.sort_by_key(|f| f.at);
    // The two partition-count changes go up and then down, so both directions happen.
    let counts: Vec<usize> = faults
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(f.action, Action::PartitionCount { .. }))
        .map(|(i, _)| i)
        .collect();
    if let [a, b, ..] = counts[..] {
        faults[a].action = Action::PartitionCount { count: 16 };
        faults[b].action = Action::PartitionCount { count: 2 };
    }
    faults
}

/// What the faults did.
#[derive(Debug, Default, Clone)]
pub struct FaultLog {
    /// Faults carried out, per kind.
    pub counts: BTreeMap<&'static str, u64>,
    /// Faults that could not be carried out or undone (the run is then incomplete).
    pub failures: Vec<String>,
    /// Service starts that failed before a later attempt succeeded.
    pub notes: Vec<String>,
    /// The PostgreSQL crashes, for the checker (a crash can erase the relay's moves).
    pub crashes: Vec<Crash>,
}

/// Everything a fault may touch, with one lock per resource.
#[derive(Debug)]
pub struct Target {
    /// The chaos services.
    pub services: Services,
    /// The relays.
    pub relays: Relays,
    /// The run's clock, for log lines.
    pub clock: Clock,
    /// The writers' commit mode, asynchronous before a crash.
    pub commit_mode: CommitMode,
    pg: Mutex<()>,
    kafka: Mutex<()>,
    relay_locks: Vec<Mutex<()>>,
    crashes: std::sync::Mutex<Vec<Crash>>,
}

impl Target {
    /// A target over these services and relays.
    pub fn new(
        services: Services,
        relays: Relays,
        clock: Clock,
        commit_mode: CommitMode,
    ) -> Arc<Target> {
        let relay_locks = (0..relays.count()).map(|_| Mutex::new(())).collect();
        Arc::new(Target {
            services,
            relays,
            clock,
            commit_mode,
            pg: Mutex::new(()),
            kafka: Mutex::new(()),
            relay_locks,
            crashes: std::sync::Mutex::new(Vec::new()),
        })
    }
}

/// Carries out `faults` at their offsets and waits until all have ended.
pub async fn execute(faults: &[Fault], target: Arc<Target>) -> FaultLog {
    let tasks: Vec<_> = faults
        .iter()
        .copied()
        .map(|fault| {
            let target = Arc::clone(&target);
            tokio::spawn(async move {
                tokio::time::sleep_until(target.clock.at(fault.at).into()).await;
                target.clock.say(format!("fault: {}", fault.action));
                let mut notes = Vec::new();
                let result = perform(fault.action, &target, &mut notes).await;
                for n in &notes {
                    target.clock.say(format!("retried: {n}"));
                }
                (fault.action, result, notes)
            })
        })
        .collect();
    let mut log = FaultLog::default();
    for task in tasks {
        match task.await {
            Ok((action, result, notes)) => {
                log.notes
                    .extend(notes.into_iter().map(|n| format!("{action}: {n}")));
                match result {
                    Ok(()) => *log.counts.entry(action.kind()).or_default() += 1,
                    Err(e) => {
                        target.clock.say(format!("fault failed: {action}: {e}"));
                        log.failures.push(format!("{action}: {e}"));
                    }
                }
            }
            Err(e) => log.failures.push(format!("a fault task panicked: {e}")),
        }
    }
    log.crashes = match target.crashes.lock() {
        Ok(c) => c.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    log
}

/// Starts a service again, retrying; failed attempts go to `notes`.
async fn start_again(t: &Target, command: &'static str, notes: &mut Vec<String>) -> Result<()> {
    let (result, failed) = t.services.run_retrying(command).await;
    notes.extend(failed);
    result
}

async fn perform(action: Action, t: &Target, notes: &mut Vec<String>) -> Result<()> {
    match action {
        Action::RelayKill { relay, down } => {
            let lock = t
                .relay_locks
                .get(relay)
                .ok_or_else(|| Error::msg(format!("no relay {relay}")))?;
            let _guard = lock.lock().await;
            t.relays.kill(relay)?;
            tokio::time::sleep(down).await;
            t.relays.start(relay)?;
            t.clock.say(format!("relay-{relay} started again"));
        }
        Action::RelayPause { relay, pause } => {
            let lock = t
                .relay_locks
                .get(relay)
                .ok_or_else(|| Error::msg(format!("no relay {relay}")))?;
            let _guard = lock.lock().await;
            if let Err(e) = t.relays.signal(relay, "-STOP") {
                // Not running right now (the supervisor is restarting it): nothing to pause.
                notes.push(format!("pause of relay-{relay} skipped: {e}"));
                return Ok(());
            }
            tokio::time::sleep(pause).await;
            t.relays.signal(relay, "-CONT")?;
            t.clock.say(format!("relay-{relay} continued"));
        }
        Action::RelayLeave { relay, down } => {
            let lock = t
                .relay_locks
                .get(relay)
                .ok_or_else(|| Error::msg(format!("no relay {relay}")))?;
            let _guard = lock.lock().await;
            let relays = t.relays.clone();
            tokio::task::spawn_blocking(move || relays.stop_one(relay, Duration::from_secs(10)))
                .await
                .map_err(|e| Error::msg(format!("stopping relay-{relay}: {e}")))??;
            tokio::time::sleep(down).await;
            t.relays.start(relay)?;
            t.clock.say(format!("relay-{relay} joined again"));
        }
        Action::PgCrash { lead, down } => {
            let _guard = t.pg.lock().await;
            // Until now the writers commit synchronously many times a second, and each such
            // commit flushes all earlier WAL; a second of margin for the last ones.
            let unflushed_from_us = unix_us() - 1_000_000;
            t.commit_mode.set_asynchronous(true);
            tokio::time::sleep(lead).await;
            let crashed = t.services.run("pg-crash").await;
            t.commit_mode.set_asynchronous(false);
            crashed?;
            if let Ok(mut c) = t.crashes.lock() {
                c.push(Crash {
                    unflushed_from_us,
                    crashed_us: unix_us(),
                });
            }
            tokio::time::sleep(down).await;
            start_again(t, "pg-start", notes).await?;
            t.clock.say("PostgreSQL is back after the crash");
        }
        Action::PgRestart => {
            let _guard = t.pg.lock().await;
            t.services.run("pg-restart").await?;
            t.clock.say("PostgreSQL restarted");
        }
        Action::KafkaKill { down } => {
            let _guard = t.kafka.lock().await;
            t.services.run("kafka-kill").await?;
            tokio::time::sleep(down).await;
            start_again(t, "kafka-start", notes).await?;
            t.clock.say("Kafka is back");
        }
        Action::PartitionCount { count } => {
            // Waits out a PostgreSQL fault in progress, then changes the count.
            let _guard = t.pg.lock().await;
            let mut last = String::new();
            for _ in 0..20 {
                match t.services.connect().await {
                    Ok(c) => match c
                        .execute("UPDATE outbox.settings SET partition_count = $1", &[&count])
                        .await
                    {
                        Ok(_) => return Ok(()),
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) => last = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            return Err(Error::msg(format!(
                "could not change the partition count: {last}"
            )));
        }
        Action::IdleTransaction { hold } => {
            // Not under the PostgreSQL lock: a crash may well end it early, as in life.
            // PostgreSQL may be down when it starts: keep trying for a while.
            let mut tries = 0;
            let client = loop {
                match t.services.connect().await {
                    Ok(c) => break c,
                    Err(e) if tries >= 60 => return Err(e),
                    Err(_) => tries += 1,
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            client
                .batch_execute("BEGIN; SELECT pg_current_xact_id();")
                .await
                .map_err(|e| Error::msg(format!("opening the idle transaction: {e}")))?;
            tokio::time::sleep(hold).await;
            let _ = client.batch_execute("ROLLBACK").await;
            t.clock.say("idle transaction ended");
        }
    }
    Ok(())
}

/// After the fault phase: makes sure PostgreSQL, Kafka and every relay run again; failed
/// attempts that a later one made good go to `notes`.
pub async fn restore(t: &Target, notes: &mut Vec<String>) -> Result<()> {
    if !t.services.pg_ready().await {
        start_again(t, "pg-start", notes).await?;
    }
    start_again(t, "kafka-start", notes).await?;
    t.relays.start_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_gives_one_schedule_and_another_seed_another() {
        let phase = Duration::from_secs(96);
        assert_eq!(schedule(42, phase, 3), schedule(42, phase, 3));
        assert_ne!(schedule(42, phase, 3), schedule(43, phase, 3));
    }

    #[test]
    fn every_kind_occurs_and_ends_within_the_phase() {
        for seed in 0..200 {
            let phase = Duration::from_secs(96);
            let faults = schedule(seed, phase, 3);
            let kinds: std::collections::BTreeSet<&str> =
                faults.iter().map(|f| f.action.kind()).collect();
            assert_eq!(kinds.len(), 8, "seed {seed}: {faults:?}");
            for f in &faults {
                assert!(f.at >= FIRST_FAULT);
                assert!(f.at + f.action.nominal() <= phase, "seed {seed}: {f:?}");
                if let Action::RelayKill { relay, .. }
                | Action::RelayPause { relay, .. }
                | Action::RelayLeave { relay, .. } = f.action
                {
                    assert!(relay < 3);
                }
            }
            let counts: Vec<i32> = faults
                .iter()
                .filter_map(|f| match f.action {
                    Action::PartitionCount { count } => Some(count),
                    _ => None,
                })
                .collect();
            assert_eq!(&counts[..2], &[16, 2], "seed {seed}: first up, then down");
        }
    }
}
