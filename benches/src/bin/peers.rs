//! `peers`: the one load generator, latency probe and resource sampler that
//! `benches/peers/run` uses for both outboxd and Debezium, so that the two relays are
//! measured by the same code: the same paced writers (only the SQL of a message differs:
//! `outbox.save_message(...)` for outboxd, a plain `INSERT` into Debezium's outbox table),
//! the same consumer reading the broker's append time, and the same `/proc` sampling of the
//! relay process and of the relay's own PostgreSQL sessions. `report` turns the saved
//! results into the markdown table, a CSV file and the SVG plot.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message as _, Timestamp};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

/// Size of every message's payload in bytes.
const PAYLOAD_BYTES: usize = 300;
/// Messages per transaction when `fill` preloads the drain's backlog.
const FILL_CHUNK: u64 = 1000;

#[derive(Parser)]
#[command(about = "Load generator and probe of benches/peers (outboxd vs Debezium)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One latency point: paced writers for warm-up + duration, the probe, the sampler.
    Point(PointArgs),
    /// Writes a backlog of messages as fast as possible (the relay is stopped meanwhile).
    Fill(FillArgs),
    /// Waits until a backlog is in Kafka and measures how fast the relay moved it.
    Drain(DrainArgs),
    /// Prints the markdown table and writes the CSV and the SVG plot from saved results.
    Report(ReportArgs),
    /// Deletes the topics whose names start with a prefix.
    Cleanup(CleanupArgs),
}

/// Which relay reads the messages: it decides how a message is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum System {
    /// `SELECT outbox.save_message(topic, entity_key, payload)`.
    Outboxd,
    /// `INSERT INTO peers.outbox_event (id, aggregatetype, aggregateid, type, payload)`.
    Debezium,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Outboxd => "outboxd",
            System::Debezium => "debezium",
        }
    }

    /// One message: $1 topic, $2 entity key, $3 payload.
    fn insert_sql(self) -> &'static str {
        match self {
            System::Outboxd => "SELECT outbox.save_message($1::text, $2::text, $3::bytea)",
            System::Debezium => {
                "INSERT INTO peers.outbox_event (id, aggregatetype, aggregateid, type, payload) \
                 VALUES (gen_random_uuid(), $1::text, $2::text, 'bench', $3::bytea)"
            }
        }
    }

    /// Messages $2..=$3 in one statement, with the same payload format as `payload()`.
    /// Entity keys follow the sequence, so concurrent fills lock the entities of
    /// `save_message` in one order and cannot deadlock.
    fn fill_sql(self) -> &'static str {
        match self {
            System::Outboxd => {
                "SELECT count(outbox.save_message($1::text, 'entity-' || (g % 100000), \
                   convert_to(rpad('{\"seq\":' || g || ',\"pad\":\"', 298, 'x') || '\"}', 'UTF8'))) \
                 FROM generate_series($2::bigint, $3::bigint) g"
            }
            System::Debezium => {
                "INSERT INTO peers.outbox_event (id, aggregatetype, aggregateid, type, payload) \
                 SELECT gen_random_uuid(), $1::text, 'entity-' || (g % 100000), 'bench', \
                   convert_to(rpad('{\"seq\":' || g || ',\"pad\":\"', 298, 'x') || '\"}', 'UTF8') \
                 FROM generate_series($2::bigint, $3::bigint) g"
            }
        }
    }
}

/// Where to connect and what to sample, shared by `point` and `drain`.
#[derive(clap::Args, Clone)]
struct Common {
    /// The relay whose messages are written and read.
    #[arg(long, value_enum)]
    system: System,
    /// The writers' (and the sampler's) database: not the relay's user.
    #[arg(long, env = "PEERS_DATABASE_URL")]
    database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "PEERS_BROKERS")]
    brokers: String,
    /// The topic (created with LogAppendTime if missing).
    #[arg(long)]
    topic: String,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// The relay's process (outboxd, or Connect's JVM), for its CPU and RSS.
    #[arg(long)]
    relay_pid: i32,
    /// The PostgreSQL user the relay connects as: its sessions' CPU is the relay's
    /// database cost.
    #[arg(long)]
    relay_user: String,
    /// File the result is appended to as one JSON line.
    #[arg(long)]
    results: PathBuf,
    /// Free text kept with the result (e.g. the repetition number).
    #[arg(long, default_value = "")]
    tag: String,
}

#[derive(clap::Args)]
struct PointArgs {
    #[command(flatten)]
    common: Common,
    /// Target write rate in messages per second.
    #[arg(long)]
    rate: u64,
    /// Messages per transaction.
    #[arg(long, default_value_t = 1)]
    per_tx: u64,
    /// Concurrent writer connections.
    #[arg(long, default_value_t = 8)]
    writers: u64,
    /// Seconds written before the measured interval (not counted).
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Seconds to wait after the writers for the last messages to reach Kafka.
    #[arg(long, default_value_t = 60.0)]
    settle: f64,
    /// Distinct entity keys (aggregate ids) the messages are spread over.
    #[arg(long, default_value_t = 100_000)]
    entities: u64,
}

#[derive(clap::Args)]
struct FillArgs {
    /// The relay whose outbox is filled.
    #[arg(long, value_enum)]
    system: System,
    /// The writers' database.
    #[arg(long, env = "PEERS_DATABASE_URL")]
    database_url: String,
    /// Kafka bootstrap servers (to create the topic).
    #[arg(long, env = "PEERS_BROKERS")]
    brokers: String,
    /// The topic (created with LogAppendTime if missing).
    #[arg(long)]
    topic: String,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// How many messages.
    #[arg(long)]
    count: u64,
    /// Concurrent connections.
    #[arg(long, default_value_t = 4)]
    writers: u64,
}

#[derive(clap::Args)]
struct DrainArgs {
    #[command(flatten)]
    common: Common,
    /// How many messages the backlog holds (`fill --count`).
    #[arg(long)]
    count: u64,
    /// When the relay was launched, in ms since the epoch.
    #[arg(long)]
    launched_at_ms: i64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
}

#[derive(clap::Args)]
struct ReportArgs {
    /// The run's folder, holding results.jsonl.
    #[arg(long)]
    dir: PathBuf,
    /// Where the SVG plot goes (default: <dir>/latency.svg).
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CleanupArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "PEERS_BROKERS")]
    brokers: String,
    /// Topics whose names start with this are deleted.
    #[arg(long)]
    prefix: String,
}

/// One saved result: a latency point or a drain.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
struct Outcome {
    system: String,
    /// `point` or `drain`.
    kind: String,
    tag: String,
    /// UTC, RFC 3339 (seconds).
    date: String,
    topic: String,
    // --- points
    rate_target: u64,
    per_tx: u64,
    writers: u64,
    warmup_s: f64,
    duration_s: f64,
    /// Messages committed (warm-up included).
    written: u64,
    /// Messages whose transaction was scheduled in the measured interval.
    measured: u64,
    /// Measured messages the probe saw in Kafka.
    received: u64,
    /// Copies beyond the first, over all messages.
    duplicates: u64,
    /// Measured messages per second of the measured interval.
    achieved_rate: f64,
    /// Longest lateness of a transaction's start against its schedule.
    behind_max_ms: f64,
    /// Lateness of the writers' last transactions against their schedule.
    behind_end_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// p99 of the messages committed in each second of the measured interval, in order
    /// (how latency settles after a relay's start: `--warmup 0`).
    #[serde(default)]
    p99_by_second_ms: Vec<f64>,
    // --- drains
    count: u64,
    /// Relay launch to the last message's append.
    launch_to_last_s: f64,
    /// First message's append to the last one's.
    first_to_last_s: f64,
    /// count / launch_to_last_s.
    drain_rate_from_launch: f64,
    /// count / first_to_last_s.
    drain_rate: f64,
    // --- resources, over the measured interval
    interval_s: f64,
    relay_cpu_ms: f64,
    relay_rss_max_kib: u64,
    db_cpu_ms: f64,
    /// Most sessions of the relay's user seen at once.
    db_sessions_max: u64,
}

impl Outcome {
    fn messages_for_cost(&self) -> f64 {
        if self.kind == "drain" {
            self.received as f64
        } else {
            self.measured as f64
        }
    }
    fn per_1k(&self, cpu_ms: f64) -> f64 {
        cpu_ms / (self.messages_for_cost() / 1000.0)
    }
    fn pct(&self, cpu_ms: f64) -> f64 {
        cpu_ms / (self.interval_s * 1000.0) * 100.0
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Point(a) => point(a).await,
        Cmd::Fill(a) => fill(a).await,
        Cmd::Drain(a) => drain(a).await,
        Cmd::Report(a) => report(&a),
        Cmd::Cleanup(a) => cleanup(&a).await,
    };
    if let Err(e) = result {
        // A database error's Display is only "db error": its details are in the source.
        let detail = e
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(|pg| pg.as_db_error())
            .map(|db| format!(": {db}"))
            .unwrap_or_default();
        eprintln!("peers: error: {e}{detail}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn date_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        Err(_) => String::new(),
    }
}

/// The payload of message `seq`: a small JSON object padded to exactly `PAYLOAD_BYTES`,
/// the same bytes `fill_sql` makes in SQL. The probe finds `seq` again in whatever the
/// relay delivers.
fn payload(seq: u64) -> Vec<u8> {
    let mut p = format!("{{\"seq\":{seq},\"pad\":\"").into_bytes();
    p.resize(PAYLOAD_BYTES - 2, b'x');
    p.extend_from_slice(b"\"}");
    p
}

/// The `seq` of a received payload: the digits after the first `seq`. Tolerant of quoting
/// so that a converter that wraps the bytes (JSON, base64 excluded) still parses.
fn parse_seq(value: &[u8]) -> Option<u64> {
    let at = value.windows(3).position(|w| w == b"seq")? + 3;
    let digits: Vec<u8> = value[at..]
        .iter()
        .skip_while(|b| !b.is_ascii_digit())
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

async fn connect(url: &str) -> Res<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("peers: connection: {e}");
        }
    });
    client
        .batch_execute("SET application_name = 'peers-probe'")
        .await?;
    Ok(client)
}

async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Res<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    // LogAppendTime: the record's timestamp is when the broker appended it, so the probe
    // reads the relay's delivery time from the record, independent of when it is consumed.
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
        .set("message.timestamp.type", "LogAppendTime");
    for r in admin.create_topics([&new], &AdminOptions::new()).await? {
        match r {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => return Err(format!("creating topic {t}: {e}").into()),
        }
    }
    Ok(())
}

/// What the probe saw: per seq, the first append time (ms since the epoch).
struct Seen {
    appended: HashMap<u64, i64>,
    duplicates: u64,
    unparsed: u64,
}

/// Where the probe starts reading.
#[derive(Clone, Copy, PartialEq, Eq)]
enum From {
    /// The topic's beginning (a drain: the relay may append before the probe starts).
    Beginning,
    /// The topic's end when the probe starts (a point: its messages are written after
    /// `probe` returns, and a topic reused by `--restart` holds earlier points' records).
    End,
}

/// Consumes every partition of `topic` from `from` until `want` (set later, once known)
/// distinct messages were seen, or `give_up` is set and nothing more arrives. Returns once
/// the probe knows its starting offsets.
fn probe(
    brokers: String,
    topic: String,
    partitions: i32,
    want: Arc<AtomicU64>,
    give_up: Arc<AtomicBool>,
    from: From,
) -> std::thread::JoinHandle<Res<Seen>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "peers-probe")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "50")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let offset = match from {
                From::Beginning => Offset::Beginning,
                From::End => {
                    let (_, high) =
                        consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
                    Offset::Offset(high)
                }
            };
            tpl.add_partition_offset(&topic, p, offset)?;
        }
        consumer.assign(&tpl)?;
        let _ = ready_tx.send(());
        let mut seen = Seen {
            appended: HashMap::new(),
            duplicates: 0,
            unparsed: 0,
        };
        loop {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let Some(seq) = m.payload().and_then(parse_seq) else {
                        seen.unparsed += 1;
                        continue;
                    };
                    let ts = match m.timestamp() {
                        Timestamp::LogAppendTime(ms) => ms,
                        other => return Err(format!("not LogAppendTime: {other:?}").into()),
                    };
                    if seen.appended.insert(seq, ts).is_some() {
                        seen.duplicates += 1;
                    }
                }
                Some(Err(e)) => eprintln!("peers: consumer: {e}"),
                None => {}
            }
            let want = want.load(Ordering::SeqCst);
            if want > 0 && seen.appended.len() as u64 >= want {
                return Ok(seen);
            }
            if give_up.load(Ordering::SeqCst) {
                return Ok(seen);
            }
        }
    });
    // The starting offsets are known (or the probe failed) before anything is written.
    let _ = ready_rx.recv_timeout(Duration::from_secs(30));
    handle
}

/// CPU ticks (utime + stime) of a process, from /proc/PID/stat.
fn proc_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields that follow start after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn proc_rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn clock_ticks_per_s() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Sums CPU deltas of the relay process and of the relay user's backends, sampled once a
/// second: backends come and go (a pool opens sessions), so each one's ticks are taken
/// relative to its first sample (or counted whole when it appeared after the start), and a
/// backend that ended between two samples loses at most its last second.
struct Sampler {
    client: Client,
    relay_pid: i32,
    relay_user: String,
    tick_ms: f64,
    relay_first: Option<u64>,
    relay_last: Option<u64>,
    rss_max: u64,
    backends: HashMap<i32, u64>,
    db_ticks: u64,
    sessions_max: u64,
    samples: u64,
    started: Option<Instant>,
    /// Count the relay's CPU from its start (a drain launches the relay with the probe).
    from_process_start: bool,
}

impl Sampler {
    async fn new(url: &str, relay_pid: i32, relay_user: &str) -> Res<Sampler> {
        Ok(Sampler {
            client: connect(url).await?,
            relay_pid,
            relay_user: relay_user.to_owned(),
            tick_ms: 1000.0 / clock_ticks_per_s(),
            relay_first: None,
            relay_last: None,
            rss_max: 0,
            backends: HashMap::new(),
            db_ticks: 0,
            sessions_max: 0,
            samples: 0,
            started: None,
            from_process_start: false,
        })
    }

    async fn sample(&mut self) -> Res<()> {
        let first = self.samples == 0;
        if first {
            self.started = Some(Instant::now());
        }
        self.samples += 1;
        let pids: Vec<i32> = self
            .client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE usename = $1",
                &[&self.relay_user],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        self.sessions_max = self.sessions_max.max(pids.len() as u64);
        for pid in pids {
            let Some(t) = proc_ticks(pid) else { continue };
            match self.backends.insert(pid, t) {
                Some(prev) => self.db_ticks += t.saturating_sub(prev),
                None if !first || self.from_process_start => self.db_ticks += t,
                None => {}
            }
        }
        if let Some(t) = proc_ticks(self.relay_pid) {
            self.relay_first
                .get_or_insert(if self.from_process_start { 0 } else { t });
            self.relay_last = Some(t);
        }
        if let Some(rss) = proc_rss_kib(self.relay_pid) {
            self.rss_max = self.rss_max.max(rss);
        }
        Ok(())
    }

    /// Samples once a second until `stop` is set, then once more.
    async fn run(mut self, stop: Arc<AtomicBool>) -> Res<Sampler> {
        self.sample().await?;
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if self
                .started
                .map(|s| s.elapsed())
                .unwrap_or_default()
                .as_millis() as u64
                >= self.samples * 1000
            {
                self.sample().await?;
            }
        }
        self.sample().await?;
        Ok(self)
    }

    fn fill(&self, o: &mut Outcome) {
        o.interval_s = self
            .started
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        o.relay_cpu_ms = match (self.relay_first, self.relay_last) {
            (Some(a), Some(b)) => (b - a) as f64 * self.tick_ms,
            _ => f64::NAN,
        };
        o.relay_rss_max_kib = self.rss_max;
        o.db_cpu_ms = self.db_ticks as f64 * self.tick_ms;
        o.db_sessions_max = self.sessions_max;
    }
}

/// One writer's account: (seq, commit time in ms since the epoch, measured?) per message,
/// and how late it ran against its schedule.
struct WriterLog {
    commits: Vec<(u64, f64, bool)>,
    behind_max: Duration,
    behind_end: Duration,
}

#[allow(clippy::too_many_arguments)]
async fn writer(
    system: System,
    url: String,
    topic: String,
    period: Duration,
    offset: Duration,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    per_tx: u64,
    entities: u64,
    next_seq: Arc<AtomicU64>,
) -> Res<WriterLog> {
    let client = connect(&url).await?;
    let stmt = client.prepare(system.insert_sql()).await?;
    let (begin, commit) = (
        client.prepare("BEGIN").await?,
        client.prepare("COMMIT").await?,
    );
    let mut log = WriterLog {
        commits: Vec::new(),
        behind_max: Duration::ZERO,
        behind_end: Duration::ZERO,
    };
    for k in 0u32.. {
        // Open loop: transaction k is due at a fixed instant whatever happened before, so a
        // slow database shows as lateness instead of a silently lower rate.
        let due = start + offset + period * k;
        if due >= end || Instant::now() >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let late = Instant::now().saturating_duration_since(due);
        log.behind_max = log.behind_max.max(late);
        log.behind_end = late;
        let measured = due >= measure_from;
        client.execute(&begin, &[]).await?;
        let mut seqs = Vec::with_capacity(per_tx as usize);
        for _ in 0..per_tx {
            let seq = next_seq.fetch_add(1, Ordering::SeqCst);
            let key = format!("entity-{}", rand::random_range(0..entities));
            client
                .execute(&stmt, &[&topic, &key, &payload(seq)])
                .await?;
            seqs.push(seq);
        }
        client.execute(&commit, &[]).await?;
        // The commit time: after COMMIT returned, as the application would see it.
        let at = now_ms();
        log.commits
            .extend(seqs.into_iter().map(|s| (s, at, measured)));
    }
    Ok(log)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn append_result(path: &Path, o: &Outcome) -> Res<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{}", serde_json::to_string(o)?)?;
    Ok(())
}

async fn point(a: PointArgs) -> Res<()> {
    let c = &a.common;
    create_topic(&c.brokers, &c.topic, c.partitions).await?;
    let want = Arc::new(AtomicU64::new(0));
    let give_up = Arc::new(AtomicBool::new(false));
    let probe = probe(
        c.brokers.clone(),
        c.topic.clone(),
        c.partitions,
        want.clone(),
        give_up.clone(),
        From::End,
    );

    // Each writer runs rate / per_tx / writers transactions per second, the writers
    // staggered evenly within one period.
    let tx_rate = a.rate as f64 / a.per_tx as f64;
    let period = Duration::from_secs_f64(a.writers as f64 / tx_rate);
    let start = Instant::now() + Duration::from_millis(500);
    let measure_from = start + Duration::from_secs_f64(a.warmup);
    let end = measure_from + Duration::from_secs_f64(a.duration);
    let next_seq = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..a.writers {
        writers.push(tokio::spawn(writer(
            c.system,
            c.database_url.clone(),
            c.topic.clone(),
            period,
            period.mul_f64(w as f64 / a.writers as f64),
            start,
            measure_from,
            end,
            a.per_tx,
            a.entities,
            next_seq.clone(),
        )));
    }
    // The sampler covers the measured interval only.
    let sampler = Sampler::new(&c.database_url, c.relay_pid, &c.relay_user).await?;
    tokio::time::sleep_until(measure_from).await;
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampling = tokio::spawn(sampler.run(stop_sampling.clone()));
    let mut logs = Vec::new();
    for w in writers {
        logs.push(w.await??);
    }
    stop_sampling.store(true, Ordering::SeqCst);
    let sampler = sampling.await??;

    let written = next_seq.load(Ordering::SeqCst);
    want.store(written, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs_f64(a.settle);
    while !probe.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    give_up.store(true, Ordering::SeqCst);
    let seen = probe.join().map_err(|_| "probe panicked")??;

    let mut lat = Vec::new();
    let mut by_commit = Vec::new();
    let mut measured = 0u64;
    for log in &logs {
        for &(seq, commit_ms, m) in &log.commits {
            if !m {
                continue;
            }
            measured += 1;
            if let Some(&appended) = seen.appended.get(&seq) {
                lat.push(appended as f64 - commit_ms);
                by_commit.push((commit_ms, appended as f64 - commit_ms));
            }
        }
    }
    let p99_by_second_ms = p99_by_second(&by_commit);
    lat.sort_by(|x, y| x.total_cmp(y));
    let mut o = Outcome {
        system: c.system.name().into(),
        kind: "point".into(),
        tag: c.tag.clone(),
        date: date_now(),
        topic: c.topic.clone(),
        rate_target: a.rate,
        per_tx: a.per_tx,
        writers: a.writers,
        warmup_s: a.warmup,
        duration_s: a.duration,
        written,
        measured,
        received: lat.len() as u64,
        duplicates: seen.duplicates,
        achieved_rate: measured as f64 / a.duration,
        behind_max_ms: logs
            .iter()
            .map(|l| l.behind_max.as_secs_f64() * 1000.0)
            .fold(0.0, f64::max),
        behind_end_ms: logs
            .iter()
            .map(|l| l.behind_end.as_secs_f64() * 1000.0)
            .fold(0.0, f64::max),
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        max_ms: percentile(&lat, 1.0),
        p99_by_second_ms,
        ..Outcome::default()
    };
    sampler.fill(&mut o);
    if seen.unparsed > 0 {
        eprintln!("peers: {} records without a seq", seen.unparsed);
    }
    append_result(&c.results, &o)?;
    println!(
        "{} {} msg/s x{}: achieved {:.0} msg/s (behind max {:.0} ms), received {}/{} (dup {}), \
         p50 {:.1} ms p99 {:.1} ms max {:.1} ms; relay CPU {:.0} ms/1k msgs ({:.1}% core), \
         RSS {} MiB; DB CPU {:.0} ms/1k msgs ({:.1}% core, {} sessions)",
        o.system,
        o.rate_target,
        o.per_tx,
        o.achieved_rate,
        o.behind_max_ms,
        o.received,
        o.measured,
        o.duplicates,
        o.p50_ms,
        o.p99_ms,
        o.max_ms,
        o.per_1k(o.relay_cpu_ms),
        o.pct(o.relay_cpu_ms),
        o.relay_rss_max_kib / 1024,
        o.per_1k(o.db_cpu_ms),
        o.pct(o.db_cpu_ms),
        o.db_sessions_max,
    );
    println!(
        "  p99 by second of commit (ms): {}",
        o.p99_by_second_ms
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

/// The p99 latency of the messages committed in each second after the first commit, from
/// (commit time in ms, latency in ms) pairs.
fn p99_by_second(by_commit: &[(f64, f64)]) -> Vec<f64> {
    let Some(start) = by_commit.iter().map(|&(c, _)| c).reduce(f64::min) else {
        return Vec::new();
    };
    let mut seconds: Vec<Vec<f64>> = Vec::new();
    for &(commit, latency) in by_commit {
        let s = ((commit - start) / 1000.0) as usize;
        if seconds.len() <= s {
            seconds.resize_with(s + 1, Vec::new);
        }
        seconds[s].push(latency);
    }
    seconds
        .into_iter()
        .map(|mut l| {
            l.sort_by(|x, y| x.total_cmp(y));
            percentile(&l, 0.99)
        })
        .collect()
}

async fn fill(a: FillArgs) -> Res<()> {
    create_topic(&a.brokers, &a.topic, a.partitions).await?;
    let chunks = a.count.div_ceil(FILL_CHUNK);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.writers {
        let (url, topic, next, count, system) = (
            a.database_url.clone(),
            a.topic.clone(),
            next.clone(),
            a.count,
            a.system,
        );
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await?;
            let stmt = client.prepare(system.fill_sql()).await?;
            loop {
                let chunk = next.fetch_add(1, Ordering::SeqCst);
                if chunk >= chunks {
                    return Res::Ok(());
                }
                let from = (chunk * FILL_CHUNK) as i64;
                let to = ((chunk + 1) * FILL_CHUNK).min(count) as i64 - 1;
                client.execute(&stmt, &[&topic, &from, &to]).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!(
        "{}: wrote {} messages in {:.1} s",
        a.system.name(),
        a.count,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn drain(a: DrainArgs) -> Res<()> {
    let c = &a.common;
    let want = Arc::new(AtomicU64::new(a.count));
    let give_up = Arc::new(AtomicBool::new(false));
    let mut sampler = Sampler::new(&c.database_url, c.relay_pid, &c.relay_user).await?;
    sampler.from_process_start = true;
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampling = tokio::spawn(sampler.run(stop_sampling.clone()));
    let probe = probe(
        c.brokers.clone(),
        c.topic.clone(),
        c.partitions,
        want,
        give_up.clone(),
        From::Beginning,
    );
    let deadline = Instant::now() + Duration::from_secs_f64(a.timeout);
    while !probe.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    give_up.store(true, Ordering::SeqCst);
    stop_sampling.store(true, Ordering::SeqCst);
    let seen = probe.join().map_err(|_| "probe panicked")??;
    let sampler = sampling.await??;
    let first = seen.appended.values().min().copied().unwrap_or(0);
    let last = seen.appended.values().max().copied().unwrap_or(0);
    let received = seen.appended.len() as u64;
    let launch_to_last_s = (last - a.launched_at_ms) as f64 / 1000.0;
    let first_to_last_s = (last - first) as f64 / 1000.0;
    let mut o = Outcome {
        system: c.system.name().into(),
        kind: "drain".into(),
        tag: c.tag.clone(),
        date: date_now(),
        topic: c.topic.clone(),
        count: a.count,
        received,
        duplicates: seen.duplicates,
        launch_to_last_s,
        first_to_last_s,
        drain_rate_from_launch: received as f64 / launch_to_last_s,
        drain_rate: received as f64 / first_to_last_s,
        ..Outcome::default()
    };
    sampler.fill(&mut o);
    append_result(&c.results, &o)?;
    println!(
        "{} drain of {}: received {} (dup {}), launch->last {:.1} s ({:.0} msg/s), first->last \
         {:.1} s ({:.0} msg/s); relay CPU {:.0} ms/1k msgs, RSS {} MiB; DB CPU {:.0} ms/1k msgs",
        o.system,
        o.count,
        o.received,
        o.duplicates,
        o.launch_to_last_s,
        o.drain_rate_from_launch,
        o.first_to_last_s,
        o.drain_rate,
        o.per_1k(o.relay_cpu_ms),
        o.relay_rss_max_kib / 1024,
        o.per_1k(o.db_cpu_ms),
    );
    if received < a.count {
        return Err(format!("only {received} of {} messages arrived", a.count).into());
    }
    Ok(())
}

async fn cleanup(a: &CleanupArgs) -> Res<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .create()?;
    let md = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))?;
    let names: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|n| n.starts_with(&a.prefix))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    admin.delete_topics(&refs, &AdminOptions::new()).await?;
    println!("deleted {} topics", names.len());
    Ok(())
}

fn load(dir: &Path) -> Res<Vec<Outcome>> {
    let text = std::fs::read_to_string(dir.join("results.jsonl"))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        out.push(serde_json::from_str(line)?);
    }
    Ok(out)
}

fn f0(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "-".into()
    }
}

fn f1(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}")
    } else {
        "-".into()
    }
}

fn report(a: &ReportArgs) -> Res<()> {
    let all = load(&a.dir)?;
    let points: Vec<&Outcome> = all.iter().filter(|o| o.kind == "point").collect();
    let drains: Vec<&Outcome> = all.iter().filter(|o| o.kind == "drain").collect();
    let systems = ["outboxd", "debezium"];

    let mut md = String::new();
    md.push_str("### Latency (commit -> broker append) and cost per point\n\n");
    md.push_str("| rate msg/s | msgs/tx | rep | system | achieved msg/s | behind max ms | received/measured | p50 ms | p99 ms | max ms | relay CPU ms/1k | relay CPU % core | relay RSS MiB | DB CPU ms/1k | DB CPU % core |\n");
    md.push_str("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut keys: Vec<(u64, u64, String)> = points
        .iter()
        .map(|o| (o.rate_target, o.per_tx, o.tag.clone()))
        .collect();
    keys.sort();
    keys.dedup();
    for (rate, per_tx, tag) in &keys {
        for s in systems {
            for o in points
                .iter()
                .filter(|o| o.system == s && o.rate_target == *rate && o.per_tx == *per_tx)
                .filter(|o| &o.tag == tag)
            {
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    rate,
                    per_tx,
                    tag,
                    s,
                    f0(o.achieved_rate),
                    f0(o.behind_max_ms),
                    o.received,
                    o.measured,
                    f1(o.p50_ms),
                    f1(o.p99_ms),
                    f1(o.max_ms),
                    f0(o.per_1k(o.relay_cpu_ms)),
                    f1(o.pct(o.relay_cpu_ms)),
                    o.relay_rss_max_kib / 1024,
                    f0(o.per_1k(o.db_cpu_ms)),
                    f1(o.pct(o.db_cpu_ms)),
                ));
            }
        }
    }
    if !drains.is_empty() {
        md.push_str("\n### Drain (backlog written while the relay was stopped)\n\n");
        md.push_str("| system | rep | messages | received | launch->last s | msg/s from launch | first->last s | msg/s first->last | relay CPU ms/1k | relay RSS MiB | DB CPU ms/1k |\n");
        md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for s in systems {
            for o in drains.iter().filter(|o| o.system == s) {
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    s,
                    o.tag,
                    o.count,
                    o.received,
                    f1(o.launch_to_last_s),
                    f0(o.drain_rate_from_launch),
                    f1(o.first_to_last_s),
                    f0(o.drain_rate),
                    f0(o.per_1k(o.relay_cpu_ms)),
                    o.relay_rss_max_kib / 1024,
                    f0(o.per_1k(o.db_cpu_ms)),
                ));
            }
        }
    }
    print!("{md}");
    std::fs::write(a.dir.join("summary.md"), &md)?;

    let mut csv = String::from(
        "system,kind,tag,date,rate_target,per_tx,writers,warmup_s,duration_s,written,measured,received,duplicates,achieved_rate,behind_max_ms,behind_end_ms,p50_ms,p99_ms,max_ms,count,launch_to_last_s,first_to_last_s,drain_rate_from_launch,drain_rate,interval_s,relay_cpu_ms,relay_cpu_ms_per_1k,relay_cpu_pct,relay_rss_max_kib,db_cpu_ms,db_cpu_ms_per_1k,db_cpu_pct,db_sessions_max\n",
    );
    for o in &all {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.2},{:.2},{:.2},{},{:.2},{:.2},{:.0},{:.0},{:.2},{:.0},{:.1},{:.2},{},{:.0},{:.1},{:.2},{}\n",
            o.system, o.kind, o.tag, o.date, o.rate_target, o.per_tx, o.writers, o.warmup_s,
            o.duration_s, o.written, o.measured, o.received, o.duplicates, o.achieved_rate,
            o.behind_max_ms, o.behind_end_ms, o.p50_ms, o.p99_ms, o.max_ms, o.count,
            o.launch_to_last_s, o.first_to_last_s, o.drain_rate_from_launch, o.drain_rate,
            o.interval_s, o.relay_cpu_ms, o.per_1k(o.relay_cpu_ms), o.pct(o.relay_cpu_ms),
            o.relay_rss_max_kib, o.db_cpu_ms, o.per_1k(o.db_cpu_ms), o.pct(o.db_cpu_ms),
            o.db_sessions_max,
        ));
    }
    std::fs::write(a.dir.join("results.csv"), csv)?;

    let svg = a.svg.clone().unwrap_or_else(|| a.dir.join("latency.svg"));
    plot(&points, &svg)?;
    eprintln!(
        "wrote {}, {} and {}",
        a.dir.join("summary.md").display(),
        a.dir.join("results.csv").display(),
        svg.display()
    );
    Ok(())
}

/// p50 and p99 against the achieved write rate, one panel per messages-per-transaction,
/// both systems in each; the median over repetitions; log-scaled latency.
fn plot(points: &[&Outcome], path: &Path) -> Res<()> {
    use plotters::prelude::*;

    let mut per_txs: Vec<u64> = points.iter().map(|o| o.per_tx).collect();
    per_txs.sort();
    per_txs.dedup();
    if per_txs.is_empty() {
        return Err("no latency points to plot".into());
    }
    let max_rate = points.iter().map(|o| o.rate_target).max().unwrap_or(1) as f64;
    let lats = points
        .iter()
        .flat_map(|o| [o.p50_ms, o.p99_ms])
        .filter(|x| x.is_finite() && *x > 0.0);
    let (lo, hi) = lats.fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (lo, hi) = if hi > 0.0 {
        (lo / 1.5, hi * 1.5)
    } else {
        (0.1, 1000.0)
    };

    let root = SVGBackend::new(path, (560 * per_txs.len() as u32, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, per_txs.len()));
    for (panel, per_tx) in panels.iter().zip(&per_txs) {
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("commit -> Kafka append, {per_tx} msg/tx"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_rate * 1.08, (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("achieved write rate (msg/s)")
            .max_light_lines(2)
            .y_desc("latency (ms)")
            .draw()?;
        for (system, color) in [("outboxd", BLUE), ("debezium", RED)] {
            for (q, dashed) in [("p50", false), ("p99", true)] {
                let mut rates: Vec<u64> = points
                    .iter()
                    .filter(|o| o.system == system && o.per_tx == *per_tx)
                    .map(|o| o.rate_target)
                    .collect();
                rates.sort();
                rates.dedup();
                // x: the rate the writers achieved (the median over repetitions), so that a
                // point whose writers fell behind is drawn where it was measured.
                let series: Vec<(f64, f64)> = rates
                    .iter()
                    .filter_map(|r| {
                        let at_rate: Vec<&&Outcome> = points
                            .iter()
                            .filter(|o| {
                                o.system == system && o.per_tx == *per_tx && o.rate_target == *r
                            })
                            .collect();
                        let mut x: Vec<f64> = at_rate.iter().map(|o| o.achieved_rate).collect();
                        let mut y: Vec<f64> = at_rate
                            .iter()
                            .map(|o| if q == "p50" { o.p50_ms } else { o.p99_ms })
                            .filter(|v| v.is_finite() && *v > 0.0)
                            .collect();
                        x.sort_by(|a, b| a.total_cmp(b));
                        y.sort_by(|a, b| a.total_cmp(b));
                        Some((*x.get(x.len() / 2)?, *y.get(y.len() / 2)?))
                    })
                    .collect();
                if series.is_empty() {
                    continue;
                }
                let label = format!("{system} {q}");
                let style = color.stroke_width(2);
                if dashed {
                    chart
                        .draw_series(DashedLineSeries::new(series.clone(), 6, 4, style))?
                        .label(label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 8, y)], color.stroke_width(2))
                        });
                } else {
                    chart
                        .draw_series(LineSeries::new(series.clone(), style))?
                        .label(label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                        });
                }
                chart.draw_series(
                    series
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                )?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_300_bytes_and_parses_back() {
        for seq in [0, 7, 123_456_789] {
            let p = payload(seq);
            assert_eq!(p.len(), PAYLOAD_BYTES);
            assert_eq!(parse_seq(&p), Some(seq));
        }
        // A converter that quoted the JSON still parses.
        assert_eq!(parse_seq(br#""{\"seq\":42,\"pad\":\"xx\"}""#), Some(42));
    }
}
