//! `outbox-chaos`: a Jepsen-style harness for the outbox. It runs the real relay
//! (`outboxd`, several processes) against its own PostgreSQL and Kafka, writes through the
//! library and, from Python, through the SQL API while a seeded schedule of faults crashes
//! and restarts what it runs, and then checks with its own consumer that nothing committed
//! was lost, nothing rolled back leaked, and every entity's messages arrived in commit
//! order. Usually started by `scripts/chaos`, which builds and starts what it needs;
//! see docs/chaos.md.

mod checker;
mod clock;
mod commit_mode;
mod consume;
mod drain;
mod error;
mod faults;
mod model;
mod operator;
mod ownership;
mod poison;
mod python;
mod relays;
mod report;
mod run;
mod services;
mod setup;
mod topics;
mod truth;
mod writers;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use rand::Rng;

/// Runs the outbox relay under faults and checks what arrived in Kafka.
#[derive(Debug, Parser)]
#[command(name = "outbox-chaos")]
struct Cli {
    /// Length of the writing phase in seconds (faults, then a quiet tail).
    #[arg(long, default_value_t = 120, conflicts_with = "minutes")]
    seconds: u64,
    /// Length of the writing phase in minutes.
    #[arg(long)]
    minutes: Option<u64>,
    /// Seed of the fault schedule and the writers [default: random, printed].
    #[arg(long, env = "CHAOS_SEED")]
    seed: Option<u64>,
    /// The chaos database (never the shared one).
    #[arg(long, env = "OUTBOX_CHAOS_DATABASE_URL")]
    database_url: String,
    /// The chaos broker (never the shared one).
    #[arg(long, env = "OUTBOX_CHAOS_BROKERS")]
    brokers: String,
    /// scripts/services, which starts, crashes and kills the chaos services.
    #[arg(long, default_value = "scripts/services")]
    services: PathBuf,
    /// The relay binary.
    #[arg(long, default_value = "target/debug/outboxd")]
    outboxd: PathBuf,
    /// Python interpreter with psycopg.
    #[arg(long, default_value = ".local/chaos/venv/bin/python")]
    python: PathBuf,
    /// The Python writer script.
    #[arg(long, default_value = "crates/chaos/python/writer.py")]
    python_writer: PathBuf,
    /// Threads (connections) of the Python writer.
    #[arg(long, default_value_t = 3)]
    python_threads: usize,
    /// Folder for relay logs, the pid file and summary.json.
    #[arg(long, default_value = ".local/chaos")]
    work_dir: PathBuf,
    /// Relay processes.
    #[arg(long, default_value_t = 3)]
    relays: usize,
    /// Entities (a small key space keeps them hot).
    #[arg(long, default_value_t = 120)]
    entities: usize,
    /// Rust writer tasks.
    #[arg(long, default_value_t = 6)]
    rust_writers: usize,
    /// Longest pause between two transactions of a writer, in ms.
    #[arg(long, default_value_t = 20)]
    pause_ms: u64,
    /// How long the relays get to empty the outbox after the writers stopped, in s.
    #[arg(long, default_value_t = 120)]
    drain_timeout_s: u64,
    /// Run nothing: judge the last run again from its database and topics.
    #[arg(long)]
    recheck: bool,
    /// The poison topic's failure policy: block, dead_letter or park_entity
    /// [default: drawn from the seed].
    #[arg(long)]
    poison_policy: Option<poison::Policy>,
    /// The poison topic's max.message.bytes. Only for showing that the checker notices
    /// poison messages the broker accepts: a limit above 50,000 fails the run.
    #[arg(long, default_value_t = poison::TOPIC_MAX_BYTES)]
    poison_max_bytes: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let seed = cli
        .seed
        .unwrap_or_else(|| rand::rng().random_range(1..1_000_000_000));
    let seconds = cli.minutes.map_or(cli.seconds, |m| m * 60);
    eprintln!("[chaos] seed {seed}");
    if seconds < 30 || cli.relays == 0 || cli.entities == 0 {
        eprintln!("[chaos] error: need --seconds >= 30, --relays >= 1, --entities >= 1");
        return ExitCode::from(2);
    }
    let options = run::Options {
        seed,
        seconds,
        services: services::Services {
            script: cli.services,
            database_url: cli.database_url,
            brokers: cli.brokers,
        },
        outboxd: cli.outboxd,
        python: python::PythonConfig {
            python: cli.python,
            script: cli.python_writer,
            threads: cli.python_threads,
        },
        work_dir: cli.work_dir.clone(),
        relays: cli.relays,
        entities: cli.entities,
        rust_writers: cli.rust_writers,
        pause_ms: cli.pause_ms,
        drain_timeout: Duration::from_secs(cli.drain_timeout_s),
        poison_policy: cli.poison_policy,
        poison_max_bytes: cli.poison_max_bytes,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("[chaos] error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let recheck = cli.recheck;
    match runtime.block_on(async move {
        if recheck {
            run::recheck(options).await
        } else {
            run::run(options).await
        }
    }) {
        Ok(summary) => {
            eprint!("{}", summary.human());
            let json = summary.json();
            println!("{json}");
            let _ = std::fs::write(cli.work_dir.join("summary.json"), format!("{json}\n"));
            ExitCode::from(summary.exit_code())
        }
        Err(e) => {
            eprintln!("[chaos] seed {seed}: the run could not complete: {e}");
            ExitCode::from(2)
        }
    }
}
