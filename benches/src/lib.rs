//! Shared helpers for the benchmarks: a fresh migrated schema on the real PostgreSQL
//! started by `scripts/services up`, and a driver that runs a number of transactions spread
//! over concurrent connections and returns the wall time they took.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::{Outbox, Schema};
use tokio::sync::Mutex;
use tokio_postgres::Client;

/// A migrated schema of the benchmark's own, with `connections` open connections.
pub struct BenchDb {
    /// The schema the benchmark writes to.
    pub schema: Schema,
    /// The outbox handle for that schema.
    pub outbox: Outbox,
    /// One connection per concurrent writer.
    pub clients: Vec<Arc<Mutex<Client>>>,
    admin: Client,
}

impl BenchDb {
    /// Creates and migrates a fresh schema and opens `connections` connections.
    pub async fn new(prefix: &str, connections: usize) -> BenchDb {
        let admin = outbox_testkit::connect().await;
        let schema = Schema::new(outbox_testkit::unique_name(prefix)).expect("schema name");
        outbox::migrate_schema(&admin, &schema)
            .await
            .expect("migrate");
        let mut clients = Vec::new();
        for _ in 0..connections {
            clients.push(Arc::new(Mutex::new(outbox_testkit::connect().await)));
        }
        BenchDb {
            outbox: Outbox::new(schema.clone()),
            schema,
            clients,
            admin,
        }
    }

    /// Runs SQL on the admin connection.
    pub async fn execute(&self, sql: &str) {
        self.admin
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Prepares the save statements on every connection, in connection order.
    pub async fn prepare_all(&self) -> Vec<outbox::PreparedOutbox> {
        let mut out = Vec::new();
        for c in &self.clients {
            out.push(
                self.outbox
                    .prepare(&*c.lock().await)
                    .await
                    .expect("prepare"),
            );
        }
        out
    }

    /// Drops the schema.
    pub async fn drop(self) {
        outbox_testkit::drop_schema(&self.admin, self.schema.name()).await;
    }

    /// Runs `total` units of work spread evenly over the connections, concurrently, and
    /// returns the wall time. `work(i, client, outbox)` performs one unit (one transaction)
    /// on connection `i`.
    pub async fn run<F, Fut>(&self, total: u64, work: F) -> Duration
    where
        F: Fn(usize, Arc<Mutex<Client>>, Outbox) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let n = self.clients.len() as u64;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (i, client) in self.clients.iter().enumerate() {
            let share = total / n + u64::from((i as u64) < total % n);
            let (client, outbox, work) = (client.clone(), self.outbox.clone(), work.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..share {
                    work(i, client.clone(), outbox.clone()).await;
                }
            }));
        }
        for t in tasks {
            t.await.expect("bench task");
        }
        start.elapsed()
    }
}

/// Measuring the relay: messages counted in Kafka, latencies, paced writers.
pub mod relay {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use outbox::{Message, Outbox};
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message as _};

    /// Sum of the high watermarks of `topic`'s partitions: messages written to it so far.
    pub fn topic_size(consumer: &BaseConsumer, topic: &str, partitions: i32) -> i64 {
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(5))
                    .map(|(_, high)| high)
                    .unwrap_or(0)
            })
            .sum()
    }

    /// A plain consumer for watermarks and latency probes.
    pub fn consumer(brokers: &str) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", outbox_testkit::unique_name("bench"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "100")
            .set("socket.nagle.disable", "true")
            .set("fetch.min.bytes", "1")
            .create()
            .expect("consumer")
    }

    /// Starts a relay in this process; returns a stop handle and its task.
    pub fn start_relay(
        config: outboxd::Config,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<outboxd::Result<()>>,
    ) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(outboxd::relay::run(config, async {
            let _ = stopped.await;
        }));
        (stop, task)
    }

    /// Fills the outbox with `total` messages of `payload` bytes over `entities` entity keys,
    /// `batch` per transaction, from `clients` concurrent connections. Returns the elapsed time.
    pub async fn fill(
        db: &crate::BenchDb,
        topic: &str,
        total: u64,
        batch: usize,
        entities: u32,
        payload: usize,
    ) -> Duration {
        let topic = topic.to_owned();
        db.run(total / batch as u64, move |_, client, outbox| {
            let topic = topic.clone();
            async move {
                let msgs: Vec<Message> = (0..batch)
                    .map(|_| {
                        let e = rand::random_range(0..entities);
                        Message::builder(topic.as_str(), format!("entity-{e}"))
                            .payload(vec![b'x'; payload])
                            .build()
                            .expect("valid")
                    })
                    .collect();
                let mut client = client.lock().await;
                let tx = client.transaction().await.expect("begin");
                outbox.save_all_in_tx(&tx, &msgs).await.expect("save");
                tx.commit().await.expect("commit");
            }
        })
        .await
    }

    /// Commit instants by message id, filled by paced writers.
    pub type CommitTimes = Arc<Mutex<HashMap<i64, Instant>>>;

    /// One message as the latency probe received it.
    pub struct Received {
        /// Its `outbox-id`.
        pub id: i64,
        /// When the consumer got it.
        pub at: Instant,
        /// The record's Kafka timestamp in ms since the epoch: with the topic config
        /// `message.timestamp.type=LogAppendTime`, when the broker appended it, which for
        /// this single broker with `acks=all` is when the relay's produce was acknowledged
        /// (less the response's trip back).
        pub broker_ms: Option<i64>,
    }

    /// Writes `rate` messages per second for `duration`, `per_tx` messages per transaction,
    /// spread over `writers` connections; records when each message's commit returned.
    pub async fn paced_writers(
        outbox: &Outbox,
        topic: &str,
        rate: u64,
        per_tx: usize,
        writers: usize,
        duration: Duration,
        times: CommitTimes,
    ) -> u64 {
        let tx_per_writer = rate as f64 / per_tx as f64 / writers as f64;
        let period = Duration::from_secs_f64(1.0 / tx_per_writer);
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (outbox, topic, times) = (outbox.clone(), topic.to_owned(), times.clone());
            tasks.push(tokio::spawn(async move {
                let mut client = outbox_testkit::connect().await;
                // BENCH_PREPARED=1: the writers prepare their statements once, as a tuned
                // service would; the default sends SQL text (parsed and planned per call).
                let prepared = match std::env::var("BENCH_PREPARED").as_deref() {
                    Ok("1") => Some(outbox.prepare(&client).await.expect("prepare")),
                    _ => None,
                };
                let mut ticker = tokio::time::interval(period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let end = Instant::now() + duration;
                let mut written = 0u64;
                let mut seq = 0u64;
                while Instant::now() < end {
                    ticker.tick().await;
                    let msgs: Vec<Message> = (0..per_tx)
                        .map(|_| {
                            seq += 1;
                            Message::builder(topic.as_str(), format!("w{w}-entity-{}", seq % 500))
                                .payload(vec![b'x'; 300])
                                .build()
                                .expect("valid")
                        })
                        .collect();
                    let tx = client.transaction().await.expect("begin");
                    let ids = match &prepared {
                        Some(p) => p.save_all_in_tx(&tx, &msgs).await,
                        None => outbox.save_all_in_tx(&tx, &msgs).await,
                    }
                    .expect("save");
                    tx.commit().await.expect("commit");
                    let now = Instant::now();
                    let mut t = times.lock().expect("times");
                    for id in ids {
                        t.insert(id, now);
                    }
                    written += per_tx as u64;
                }
                written
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("writer");
        }
        total
    }

    /// Consumes `topic` until `stop` is set and returns (outbox id, receive instant) pairs.
    pub fn receive_times(
        brokers: String,
        topic: String,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<Vec<Received>> {
        std::thread::spawn(move || {
            let c = consumer(&brokers);
            c.subscribe(&[&topic]).expect("subscribe");
            let mut out = Vec::new();
            let mut idle_since: Option<Instant> = None;
            loop {
                match c.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) => {
                        let now = Instant::now();
                        idle_since = None;
                        if let Some(id) = m
                            .headers()
                            .and_then(|h| {
                                h.iter()
                                    .find(|h| h.key == "outbox-id")
                                    .and_then(|h| h.value)
                            })
                            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                        {
                            out.push(Received {
                                id,
                                at: now,
                                broker_ms: m.timestamp().to_millis(),
                            });
                        }
                    }
                    _ => {
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            let since = *idle_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_secs(2) {
                                return out;
                            }
                        }
                    }
                }
            }
        })
    }

    /// Percentiles (ms) of receive - commit over the messages seen by both sides.
    pub fn latency_percentiles(times: &CommitTimes, received: &[Received]) -> (usize, [f64; 5]) {
        let commits = times.lock().expect("times");
        percentiles(
            received
                .iter()
                .filter_map(|r| {
                    commits
                        .get(&r.id)
                        .map(|c| r.at.saturating_duration_since(*c).as_secs_f64() * 1000.0)
                })
                .collect(),
        )
    }

    /// Percentiles (ms) of the broker's append time - commit, over the messages whose
    /// record carries a timestamp; commit instants are placed on the wall clock through
    /// `anchor` (an `Instant` and the `SystemTime` read right after it). The broker's
    /// timestamps have millisecond resolution.
    pub fn append_percentiles(
        times: &CommitTimes,
        received: &[Received],
        anchor: (Instant, std::time::SystemTime),
    ) -> (usize, [f64; 5]) {
        let commits = times.lock().expect("times");
        let epoch_ms = |i: &Instant| {
            let wall = if *i >= anchor.0 {
                anchor.1 + i.duration_since(anchor.0)
            } else {
                anchor.1 - anchor.0.duration_since(*i)
            };
            wall.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(f64::NAN)
        };
        percentiles(
            received
                .iter()
                .filter_map(|r| {
                    let commit = commits.get(&r.id)?;
                    Some((r.broker_ms? as f64 - epoch_ms(commit)).max(0.0))
                })
                .collect(),
        )
    }

    /// p50, p90, p99, p99.9 and max of `values`, with their count.
    pub fn percentiles(mut values: Vec<f64>) -> (usize, [f64; 5]) {
        values.sort_by(|a, b| a.total_cmp(b));
        let pick = |q: f64| {
            values
                .get(((values.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        (
            values.len(),
            [pick(0.5), pick(0.9), pick(0.99), pick(0.999), pick(1.0)],
        )
    }
}
