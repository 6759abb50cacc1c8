//! One chaos run from start to verdict: fresh schema and topics, the poison topic's policy
//! drawn, relays, writers and the operator started, the seeded fault schedule carried out
//! while the writers write, a quiet tail, writers stopped, the relays given time to drain
//! (the operator still acting), and the checker's verdict. Relays are stopped whatever
//! happens; the services stay up for the next run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use crate::checker::{Crash, RunInfo};
use crate::clock::{Clock, unix_us};
use crate::commit_mode::CommitMode;
use crate::error::{Context, Error, Result};
use crate::faults::{self, Target};
use crate::operator::{self, Operator};
use crate::poison::{self, Policy};
use crate::python::{self, PythonConfig, PythonWriter};
use crate::relays::{RelayConfig, Relays};
use crate::report::{Summary, Verdict};
use crate::services::Services;
use crate::topics::RunTopics;
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
    /// The poison topic's policy; `None`: drawn from the seed.
    pub poison_policy: Option<Policy>,
    /// The poison topic's `max.message.bytes` (only changed to show that the checker
    /// notices poison messages the broker accepts).
    pub poison_max_bytes: usize,
}

/// In the work folder: the last run's seed, length, topics, policy and crashes, for
/// `--recheck`.
const RUN_FILE: &str = "run.json";

/// In the work folder: the relays' configuration file.
const RELAY_CONFIG_FILE: &str = "relay.toml";

/// Relay log lines counted for the summary (informational): a refusal under `block`, and a
/// move to `dead_letter` under the other two policies.
const RELAY_LOG_MARKERS: [(&str, &str); 2] = [
    ("blocked", "partition blocked until an operator acts"),
    ("moved to dead_letter", "message moved to dead_letter"),
];

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
            config_file: o.work_dir.join(RELAY_CONFIG_FILE),
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
    let topics = topics::recreate(
        &services.brokers,
        &format!("{}-{unix}", o.seed),
        o.poison_max_bytes,
    )
    .await?;
    let policy = o.poison_policy.unwrap_or_else(|| Policy::for_seed(o.seed));
    write_relay_config(o, &topics, policy)?;
    // The run's start on the wall clock, for commit times in the examples.
    let origin_us = unix_us() - clock.elapsed().as_micros() as i64;
    // What --recheck needs to judge this run again later (rewritten with the crashes at
    // the end).
    write_run_file(o, &topics, policy, origin_us, &[])?;

    let tail = quiet_tail(o.seconds);
    let phase = Duration::from_secs(o.seconds) - tail;
    let schedule = faults::schedule(o.seed, phase, o.relays);
    clock.say(format!(
        "seed {}: {}s of writing ({}s of faults, then {}s quiet), {} relays, {} entities, topics {}, first partition_count {first_count}, poison topic {} (max.message.bytes {}) with policy {policy}{}",
        o.seed,
        o.seconds,
        phase.as_secs(),
        tail.as_secs(),
        o.relays,
        o.entities,
        topics.normal.join(", "),
        topics.poison,
        o.poison_max_bytes,
        if o.poison_policy.is_some() {
            " (--poison-policy)"
        } else {
            " (from the seed)"
        }
    ));
    for f in &schedule {
        eprintln!("    +{:>6.1}s  {}", f.at.as_secs_f64(), f.action);
    }

    relays.start_all()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let commit_mode = CommitMode::new(o.work_dir.join("async-commits"));
    let config = WriterConfig {
        entities: o.entities,
        topics: topics.normal.clone(),
        poison_topic: topics.poison.clone(),
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
    // The operator acts through the faults, the quiet tail and the drain.
    let (stop_operator, operator_rx) = watch::channel(false);
    let operator = operator::spawn(
        Operator {
            services: services.clone(),
            outboxd: o.outboxd.clone(),
            policy,
            poison_topic: topics.poison.clone(),
            clock,
        },
        operator_rx,
    );
    // Ownership is watched from the relays' start until the drain is over.
    let (stop_watch, watch_rx) = watch::channel(false);
    let ownership_watch = crate::ownership::spawn(services.clone(), clock, watch_rx);
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
    let _ = stop_watch.send(true);
    let longest_unowned = ownership_watch.await.unwrap_or(None);
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
    let _ = stop_operator.send(true);
    let operator_stats = match tokio::time::timeout(Duration::from_secs(60), operator).await {
        Ok(Ok(s)) => Some(s),
        _ => {
            problems.push("the operator did not stop within 60 s".into());
            None
        }
    };
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
    // Whether the relays met the poison messages at all (under `block`, the operator may
    // skip one the relay never tried, e.g. while the broker was down).
    let relay_log_counts = RELAY_LOG_MARKERS
        .iter()
        .map(|(name, needle)| (*name, relays.log_lines_with(needle)))
        .collect();

    write_run_file(o, &topics, policy, origin_us, &log.crashes)?;
    clock.say("checking: reading the committed set and every record");
    let findings = check(services, &topics, origin_us, &log.crashes).await?;
    if findings.committed_messages == 0 {
        problems.push("nothing was committed: the run proves nothing".into());
    }
    if findings.poison_committed == 0 {
        problems.push(
            "no poison message was committed: the relay's failure policy went untested".into(),
        );
    }
    // Under this policy only one kind of move may exist; another means the relays did
    // not run with the configuration the harness wrote.
    let expected = policy.dead_letter_policy();
    for (other, n) in findings
        .dead_letter_policies
        .iter()
        .filter(|(p, _)| p.as_str() != expected)
    {
        problems.push(format!(
            "{n} rows in dead_letter with policy {other}, under {policy} only {expected} is expected: the relays did not apply {RELAY_CONFIG_FILE}"
        ));
    }
    let mut summary = Summary {
        seed: o.seed,
        verdict: Verdict::Incomplete,
        poison_policy: Some(policy),
        overrides: overrides(o),
        write_seconds: o.seconds as f64,
        wall_seconds: clock.elapsed().as_secs_f64(),
        faults: log.counts,
        findings,
        drained,
        stuck,
        longest_unowned,
        relay_exits,
        relay_log_counts,
        notes,
        rust_writers: rust_stats,
        python_writer: python_stats,
        operator: operator_stats,
        problems,
    };
    summary.decide();
    Ok(summary)
}

/// The flags beyond the seed that change what the run tests, as given.
fn overrides(o: &Options) -> Vec<String> {
    let mut flags = Vec::new();
    if let Some(p) = o.poison_policy {
        flags.push(format!("--poison-policy {p}"));
    }
    if o.poison_max_bytes != poison::TOPIC_MAX_BYTES {
        flags.push(format!("--poison-max-bytes {}", o.poison_max_bytes));
    }
    flags
}

/// Writes the relays' configuration file and has `outboxd check-config` accept it with
/// the flags the relays get, so a refused file stops the run here instead of making every
/// relay exit.
fn write_relay_config(o: &Options, topics: &RunTopics, policy: Policy) -> Result<()> {
    let path = o.work_dir.join(RELAY_CONFIG_FILE);
    std::fs::write(&path, poison::relay_config(&topics.poison, policy))
        .context(format!("writing {}", path.display()))?;
    let output = Command::new(&o.outboxd)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .args(["--database-url", &o.services.database_url])
        .args(["--brokers", &o.services.brokers])
        .output()
        .context(format!("running {} check-config", o.outboxd.display()))?;
    let shown = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !shown.contains(&topics.poison) {
        return Err(Error::msg(format!(
            "outboxd check-config does not accept {} ({}): {}{}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            shown.trim()
        )));
    }
    Ok(())
}

/// Writes what `--recheck` needs to judge this run again.
fn write_run_file(
    o: &Options,
    topics: &RunTopics,
    policy: Policy,
    origin_us: i64,
    crashes: &[Crash],
) -> Result<()> {
    let record = serde_json::json!({
        "seed": o.seed, "seconds": o.seconds, "topics": topics.normal,
        "poison_topic": topics.poison, "poison_policy": policy, "origin_us": origin_us,
        "crashes": crashes,
    });
    std::fs::write(o.work_dir.join(RUN_FILE), record.to_string())
        .context(format!("writing {RUN_FILE}"))
}

/// Reads the committed set and every record of the run's topics, and judges them.
async fn check(
    services: &Services,
    topics: &RunTopics,
    origin_us: i64,
    crashes: &[Crash],
) -> Result<checker::Findings> {
    let client = services.connect().await?;
    let truth = truth::read(&client).await?;
    let brokers = services.brokers.clone();
    let names = topics.all();
    let reading = names.clone();
    let records = tokio::task::spawn_blocking(move || {
        consume::read_all(&brokers, &reading, Duration::from_secs(120))
    })
    .await
    .context("reading the topics")??;
    let run = RunInfo {
        topics: &names,
        origin_us,
        crashes,
    };
    Ok(checker::check(&truth, &records, &run))
}

/// The run file's string list `key`.
fn strings(record: &serde_json::Value, key: &str) -> Vec<String> {
    record[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The run file, parsed.
fn read_run_file(work_dir: &Path) -> Result<serde_json::Value> {
    let path = work_dir.join(RUN_FILE);
    let text = std::fs::read_to_string(&path)
        .context(format!("reading {} (written by a run)", path.display()))?;
    serde_json::from_str(&text).context(format!("parsing {}", path.display()))
}

/// Judges the last run again from what its database and topics hold now (after a change
/// to the checker, or to look at its findings again). Faults and writer figures are not
/// known here.
pub async fn recheck(o: Options) -> Result<Summary> {
    let clock = Clock::start();
    o.services.check_isolated()?;
    let record = read_run_file(&o.work_dir)?;
    let topics = RunTopics {
        normal: strings(&record, "topics"),
        poison: record["poison_topic"]
            .as_str()
            .ok_or_else(|| {
                Error::msg(format!(
                    "{RUN_FILE} names no poison topic: a run before the poison fault"
                ))
            })?
            .to_owned(),
    };
    let origin_us = record["origin_us"].as_i64().unwrap_or_default();
    let crashes: Vec<Crash> = serde_json::from_value(record["crashes"].clone()).unwrap_or_default();
    let findings = check(&o.services, &topics, origin_us, &crashes).await?;
    let mut summary = Summary {
        seed: record["seed"].as_u64().unwrap_or_default(),
        verdict: Verdict::Incomplete,
        poison_policy: record["poison_policy"]
            .as_str()
            .and_then(|p| p.parse().ok()),
        overrides: Vec::new(),
        write_seconds: record["seconds"].as_f64().unwrap_or_default(),
        wall_seconds: clock.elapsed().as_secs_f64(),
        faults: Default::default(),
        findings,
        drained: drain::wait(&o.services, Duration::ZERO, &clock).await,
        stuck: Vec::new(),
        longest_unowned: None,
        relay_exits: Vec::new(),
        relay_log_counts: Default::default(),
        notes: Vec::new(),
        rust_writers: WriterStats::default(),
        python_writer: serde_json::Value::Null,
        operator: None,
        problems: Vec::new(),
    };
    summary.decide();
    Ok(summary)
}
