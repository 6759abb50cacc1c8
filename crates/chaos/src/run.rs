//! One chaos run from start to verdict: fresh schema and topics, relays and writers
//! started, the seeded fault schedule carried out while the writers write, a quiet tail,
//! writers stopped, the relays given time to drain, and the checker's verdict. Relays are
//! stopped whatever happens; the services stay up for the next run.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::commit_mode::CommitMode;
use crate::error::{Context, Result};
use crate::faults::{self, Target};
use crate::python::{self, PythonConfig, PythonWriter};
use crate::relays::{RelayConfig, Relays};
use crate::report::{Summary, Verdict};
use crate::services::Services;
use crate::writers::{self, WriterConfig, WriterStats};
use crate::{checker, consume, drain, setup, topics, truth};

/// Everything a run is told.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seeds the fault schedule and the writers.
    pub seed: u64,
    /// Length of the writing phase (faults, then a quiet tail).
    pub seconds: u64,
    /// The chaos services.
    pub services: Services,
    /// The `outboxd` binary.
    pub outboxd: PathBuf,
    /// The Python writer.
    pub python: PythonConfig,
    /// Logs, pid file and summary go here.
    pub work_dir: PathBuf,
    /// Relay processes.
    pub relays: usize,
    /// Size of the key space.
    pub entities: usize,
    /// Rust writer tasks.
    pub rust_writers: usize,
    /// Longest pause between a writer's transactions, in ms.
    pub pause_ms: u64,
    /// How long the relays get to drain after the writers stopped.
    pub drain_timeout: Duration,
}

/// In the work folder: the last run's seed, length and topics, for `--recheck`.
const RUN_FILE: &str = "run.json";

/// The quiet tail: no faults, writers still writing, so the end of the run shows the
/// system recovered. A fifth of the run, at least 15 s, at most half of it.
pub fn quiet_tail(seconds: u64) -> Duration {
    Duration::from_secs((seconds / 5).max(15).min(seconds / 2))
}

/// Runs the harness; `Err` means it could not run or complete its check.
pub async fn run(o: Options) -> Result<Summary> {
    let clock = Clock::start();
    o.services.check_isolated()?;
    python::preflight(&o.python)?;
    std::fs::create_dir_all(&o.work_dir).context(format!("creating {}", o.work_dir.display()))?;
    let relays = Relays::new(
        RelayConfig {
            binary: o.outboxd.clone(),
            database_url: o.services.database_url.clone(),
            brokers: o.services.brokers.clone(),
            work_dir: o.work_dir.clone(),
        },
        o.relays,
        clock,
    )?;
    let result = drive(&o, &relays, clock).await;
    let stopping = relays.clone();
    let _ = tokio::task::spawn_blocking(move || stopping.stop_all(Duration::from_secs(10))).await;
    result
}

async fn drive(o: &Options, relays: &Relays, clock: Clock) -> Result<Summary> {
    let services = &o.services;
    // An interrupted earlier run may have left a service crashed.
    if !services.pg_ready().await {
        services.run("pg-start").await?;
    }
    services.run("kafka-start").await?;

    // Its own stream, so that the first count does not shift the fault schedule's draws.
    let mut rng = StdRng::seed_from_u64(o.seed ^ 0x05ee_d0fc_4a05);
    let first_count = rng.random_range(2..=8);
    setup::prepare_database(services, &o.outboxd, o.entities, first_count).await?;
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let topics = topics::recreate(&services.brokers, &format!("{}-{unix}", o.seed)).await?;
    // The run's start on the wall clock, for commit times in the examples.
    let origin_us = unix_us() - clock.elapsed().as_micros() as i64;
    // What --recheck needs to judge this run again later.
    let record = serde_json::json!({
        "seed": o.seed, "seconds": o.seconds, "topics": topics, "origin_us": origin_us
    });
    std::fs::write(o.work_dir.join(RUN_FILE), record.to_string())
        .context(format!("writing {RUN_FILE}"))?;

    let tail = quiet_tail(o.seconds);
    let phase = Duration::from_secs(o.seconds) - tail;
    let schedule = faults::schedule(o.seed, phase, o.relays);
    clock.say(format!(
        "seed {}: {}s of writing ({}s of faults, then {}s quiet), {} relays, {} entities, topics {}, first partition_count {first_count}",
        o.seed,
        o.seconds,
        phase.as_secs(),
        tail.as_secs(),
        o.relays,
        o.entities,
        topics.join(", ")
    ));
    for f in &schedule {
        eprintln!("    +{:>6.1}s  {}", f.at.as_secs_f64(), f.action);
    }

    relays.start_all()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let commit_mode = CommitMode::new(o.work_dir.join("async-commits"));
    let config = WriterConfig {
        entities: o.entities,
        topics: topics.clone(),
        pause_ms: o.pause_ms,
        commit_mode: commit_mode.clone(),
    };
    let rust: Vec<_> = (0..o.rust_writers)
        .map(|i| writers::spawn(i, services.clone(), config.clone(), o.seed, stop_rx.clone()))
        .collect();
    let mut py = PythonWriter::start(
        &o.python,
        &services.database_url,
        &config,
        o.seed,
        o.seconds + 120,
        &o.work_dir.join("python-writer.log"),
    )?;
    let supervising = Arc::new(AtomicBool::new(true));
    let supervisor = {
        let (relays, on) = (relays.clone(), Arc::clone(&supervising));
        tokio::spawn(async move {
            while on.load(Ordering::Relaxed) {
                relays.supervise();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    let mut problems = Vec::new();
    let target = Target::new(services.clone(), relays.clone(), clock, commit_mode);
    let log = faults::execute(&schedule, Arc::clone(&target)).await;
    problems.extend(log.failures.iter().map(|f| format!("fault failed: {f}")));
    tokio::time::sleep_until(clock.at(phase).into()).await;
    let mut notes = log.notes.clone();
    if let Err(e) = faults::restore(&target, &mut notes).await {
        problems.push(format!(
            "could not bring the services back after the faults: {e}"
        ));
    }
    clock.say("fault phase over: quiet tail");
    tokio::time::sleep_until(clock.at(Duration::from_secs(o.seconds)).into()).await;

    clock.say("stopping the writers");
    if !py.running() {
        problems.push("the Python writer exited before the end (see python-writer.log)".into());
    }
    let _ = stop_tx.send(true);
    let mut rust_stats = WriterStats::default();
    for w in rust {
        match tokio::time::timeout(Duration::from_secs(30), w).await {
            Ok(Ok(s)) => rust_stats.add(&s),
            _ => problems.push("a Rust writer did not stop within 30 s".into()),
        }
    }
    let python_stats = match py.stop().await {
        Ok(v) => v,
        Err(e) => {
            problems.push(e.to_string());
            serde_json::Value::Null
        }
    };

    clock.say(format!(
        "writers stopped; waiting up to {}s for the relays to drain the outbox",
        o.drain_timeout.as_secs()
    ));
    let mut stuck = Vec::new();
    let drained = drain::wait(services, o.drain_timeout, &clock).await;
    if !drained {
        stuck = drain::stuck(services)
            .await
            .unwrap_or_else(|e| vec![e.to_string()]);
        clock.say(format!("not drained: {}", stuck.join("; ")));
        for tail in relays.log_tails(5) {
            eprintln!("{tail}");
        }
        // A fresh relay rereads every partition from its start: if that drains the rest,
        // the relays were stuck in their own state, not the database.
        clock.say("restarting every relay to see whether fresh ones drain the rest");
        let restarting = relays.clone();
        tokio::task::spawn_blocking(move || restarting.stop_all(Duration::from_secs(5)))
            .await
            .context("stopping the relays")?;
        relays.start_all()?;
        if drain::wait(services, Duration::from_secs(60), &clock).await {
            problems.push(format!(
                "the relays did not drain the outbox within {}s; fresh relays did",
                o.drain_timeout.as_secs()
            ));
        } else {
            problems.push("the outbox never drained, not even after restarting the relays".into());
        }
    }
    supervising.store(false, Ordering::Relaxed);
    let _ = supervisor.await;
    let stopping = relays.clone();
    tokio::task::spawn_blocking(move || stopping.stop_all(Duration::from_secs(10)))
        .await
        .context("stopping the relays")?;
    // Shown, not judged: a relay that cannot reach PostgreSQL when it starts exits, and
    // the supervisor starts it again as an init system would. What it did to the data is
    // what the checker judges.
    let relay_exits = relays.unexpected_exits();

    clock.say("checking: reading the committed set and every record");
    let findings = check(services, &topics, origin_us).await?;
    if findings.committed_messages == 0 {
        problems.push("nothing was committed: the run proves nothing".into());
    }
    let mut summary = Summary {
        seed: o.seed,
        verdict: Verdict::Incomplete,
        write_seconds: o.seconds as f64,
        wall_seconds: clock.elapsed().as_secs_f64(),
        faults: log.counts,
        findings,
        drained,
        stuck,
        relay_exits,
        notes,
        rust_writers: rust_stats,
        python_writer: python_stats,
        problems,
    };
    summary.decide();
    Ok(summary)
}

/// Reads the committed set and every record of `topics`, and judges them.
async fn check(
    services: &Services,
    topics: &[String],
    origin_us: i64,
) -> Result<checker::Findings> {
    let client = services.connect().await?;
    let truth = truth::read(&client).await?;
    let brokers = services.brokers.clone();
    let names = topics.to_vec();
    let records = tokio::task::spawn_blocking(move || {
        consume::read_all(&brokers, &names, Duration::from_secs(120))
    })
    .await
    .context("reading the topics")??;
    Ok(checker::check(&truth, &records, topics, origin_us))
}

/// Judges the last run again from what its database and topics hold now (after a change
/// to the checker, or to look at its findings again). Faults and writer figures are not
/// known here.
pub async fn recheck(o: Options) -> Result<Summary> {
    let clock = Clock::start();
    o.services.check_isolated()?;
    let path = o.work_dir.join(RUN_FILE);
    let text = std::fs::read_to_string(&path)
        .context(format!("reading {} (written by a run)", path.display()))?;
    let record: serde_json::Value =
        serde_json::from_str(&text).context(format!("parsing {}", path.display()))?;
    let topics: Vec<String> = record["topics"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let origin_us = record["origin_us"].as_i64().unwrap_or_default();
    let findings = check(&o.services, &topics, origin_us).await?;
    let mut summary = Summary {
        seed: record["seed"].as_u64().unwrap_or_default(),
        verdict: Verdict::Incomplete,
        write_seconds: record["seconds"].as_f64().unwrap_or_default(),
        wall_seconds: clock.elapsed().as_secs_f64(),
        faults: Default::default(),
        findings,
        drained: drain::wait(&o.services, Duration::ZERO, &clock).await,
        stuck: Vec::new(),
        relay_exits: Vec::new(),
        notes: Vec::new(),
        rust_writers: WriterStats::default(),
        python_writer: serde_json::Value::Null,
        problems: Vec::new(),
    };
    summary.decide();
    Ok(summary)
}

/// Now, in microseconds since the epoch.
fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}
