//! Relay speed against the real PostgreSQL and Kafka (release build, in-process relay):
//!
//! - `throughput`: drain a backlog of 1,000,000 messages (300 B, 10,000 entities, 32 virtual
//!   partitions) to the local broker. Target >= 30,000 messages/s.
//! - `latency`: a steady 2,000 messages/s; commit-to-consume latency (an upper bound of
//!   commit-to-ack). Target p50 <= 10 ms, p99 <= 50 ms.
//! - `long_tx`: the backlog drain again while an idle transaction holds back vacuum and a
//!   writer's transaction stays open; then 5 minutes of a steady stream with both still
//!   open, and the late transaction committed at the end.
//!
//! Run: `scripts/services up && cargo bench -p outbox-benches --bench relay -- throughput`
//! (or `latency`, `long_tx`, `all`). Figures go to docs/benchmarks.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use outbox::Message;
use outbox_benches::BenchDb;
use outbox_benches::relay::{
    CommitTimes, append_percentiles, consumer, fill, latency_percentiles, paced_writers,
    receive_times, start_relay, topic_size,
};

const BACKLOG: u64 = 1_000_000;
const KAFKA_PARTITIONS: i32 = 12;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "relay benchmarks run under `cargo bench -p outbox-benches --bench relay -- MODE`"
        );
        return;
    }
    let mode = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or("all", String::as_str)
        .to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let args2 = args.clone();
    rt.block_on(async move {
        let args = args2;
        match mode.as_str() {
            "throughput" => drop(throughput(false).await),
            "latency" => {
                // Optional second argument: the rate in messages/s (default 2000).
                let rate = args
                    .iter()
                    .filter(|a| !a.starts_with("--"))
                    .nth(1)
                    .and_then(|r| r.parse().ok());
                latency(rate.unwrap_or(2000), Duration::from_secs(60)).await
            }
            "long_tx" => long_tx().await,
            "kafka_ceiling" => kafka_ceiling().await,
            "long_stream" => {
                // Only the steady stream with transactions held open; optional seconds.
                let secs = args
                    .iter()
                    .filter(|a| !a.starts_with("--"))
                    .nth(1)
                    .and_then(|r| r.parse().ok());
                long_stream(Duration::from_secs(secs.unwrap_or(300))).await
            }
            "all" => {
                throughput(false).await;
                latency(2000, Duration::from_secs(60)).await;
                long_tx().await;
            }
            other => eprintln!(
                "unknown mode {other}: throughput, latency, long_tx, kafka_ceiling or all"
            ),
        }
    });
}

/// The relay's defaults, except `BENCH_WAKEUP_MS` (wakeup_interval_ms) and
/// `BENCH_LINGER_MS` (the producer's `linger.ms`) when set. `BENCH_KAFKA_SASL_SSL=1`: the
/// relay produces over the broker's SASL_SSL listener (TLS + SCRAM-SHA-512) of
/// `scripts/services` instead of plaintext (what TLS costs).
fn relay_config(db: &BenchDb) -> outboxd::Config {
    let defaults = outboxd::Config::default();
    let mut kafka = defaults.kafka.clone();
    if let Ok(linger) = std::env::var("BENCH_LINGER_MS") {
        kafka.insert("linger.ms".into(), linger);
    }
    let mut brokers = outbox_testkit::brokers();
    let mut kafka_sasl_password_file = String::new();
    if std::env::var("BENCH_KAFKA_SASL_SSL").is_ok_and(|v| v == "1") {
        let var = |name: &str| {
            std::env::var(name)
                .unwrap_or_else(|_| panic!("{name} is not set: eval \"$(scripts/services env)\""))
        };
        let tls = var("OUTBOX_TLS_DIR");
        brokers = var("OUTBOX_KAFKA_SASL_SSL_BROKERS");
        kafka_sasl_password_file = format!("{tls}/kafka-password");
        for (k, v) in [
            ("security.protocol", "sasl_ssl".to_owned()),
            ("ssl.ca.location", format!("{tls}/ca.crt")),
            ("sasl.mechanism", "SCRAM-SHA-512".to_owned()),
            ("sasl.username", "outbox".to_owned()),
        ] {
            kafka.insert(k.into(), v);
        }
        println!("[relay] producing over SASL_SSL ({brokers})");
    }
    outboxd::Config {
        kafka,
        kafka_sasl_password_file,
        database_url: outbox_testkit::database_url(),
        brokers,
        schema: db.schema.name().to_owned(),
        wakeup_interval_ms: std::env::var("BENCH_WAKEUP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(defaults.wakeup_interval_ms),
        ..defaults
    }
}

async fn set_partitions(db: &BenchDb, n: i32) {
    db.execute(&format!(
        "UPDATE {}.settings SET partition_count = {n}",
        db.schema
    ))
    .await;
}

/// Applies `BENCH_PARTITIONS` (virtual partition count) when set; the default is 16.
async fn bench_partitions(db: &BenchDb) {
    if let Some(n) = std::env::var("BENCH_PARTITIONS")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        set_partitions(db, n).await;
    }
}

/// Waits until `topic` holds `target` messages; returns the elapsed time since `start`.
async fn wait_for_topic(topic: &str, target: i64, start: Instant) -> Duration {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let c = consumer(&outbox_testkit::brokers());
        let mut last_report = Instant::now();
        loop {
            let n = topic_size(&c, &topic, KAFKA_PARTITIONS);
            if n >= target {
                return start.elapsed();
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                println!(
                    "  ... {n} of {target} in Kafka after {:.1} s",
                    start.elapsed().as_secs_f64()
                );
                last_report = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .expect("watermark poller")
}

/// Opens the two long transactions of the `long_tx` runs: an idle one that holds back
/// vacuum, and one that wrote a message (for entity `late-entity`) and commits late.
/// Returns both and the late message's id.
async fn hold_transactions_open<'a>(
    idle: &'a mut tokio_postgres::Client,
    late: &'a mut tokio_postgres::Client,
    db: &BenchDb,
    topic: &str,
) -> (
    tokio_postgres::Transaction<'a>,
    tokio_postgres::Transaction<'a>,
    i64,
) {
    let t1 = idle.transaction().await.expect("begin");
    t1.query_one("SELECT pg_current_xact_id()", &[])
        .await
        .expect("xid");
    let t2 = late.transaction().await.expect("begin");
    let msg = Message::builder(topic, "late-entity")
        .payload(b"late".to_vec())
        .build()
        .expect("valid");
    let late_id = db.outbox.save_in_tx(&t2, &msg).await.expect("late save");
    (t1, t2, late_id)
}

/// Fills a 1M backlog, then drains it; returns messages/s of the drain.
async fn throughput(hold_transactions: bool) -> f64 {
    let db = BenchDb::new("bench_relay", 4).await;
    set_partitions(&db, 32).await;
    let topic = outbox_testkit::create_topic("bench-drain", KAFKA_PARTITIONS).await;
    let label = if hold_transactions {
        "long_tx drain"
    } else {
        "throughput"
    };

    // Optional long transactions: one idle (holds back vacuum), one that wrote a message.
    let mut idle = outbox_testkit::connect().await;
    let mut late = outbox_testkit::connect().await;
    let held = if hold_transactions {
        Some(hold_transactions_open(&mut idle, &mut late, &db, &topic).await)
    } else {
        None
    };

    let filled = fill(&db, &topic, BACKLOG, 1000, 10_000, 300).await;
    println!(
        "[{label}] filled {BACKLOG} messages in {:.1} s ({:.0} msg/s, save_all_in_tx 1000 x 300 B, 4 connections)",
        filled.as_secs_f64(),
        BACKLOG as f64 / filled.as_secs_f64()
    );
    let start = Instant::now();
    let (stop, task) = start_relay(relay_config(&db));
    let drained = wait_for_topic(&topic, BACKLOG as i64, start).await;
    let rate = BACKLOG as f64 / drained.as_secs_f64();
    println!(
        "[{label}] drained {BACKLOG} messages in {:.1} s: {rate:.0} msg/s",
        drained.as_secs_f64()
    );

    if let Some((t1, t2, late_id)) = held {
        let commit_at = Instant::now();
        t2.commit().await.expect("late commit");
        let _ = wait_for_topic(&topic, BACKLOG as i64 + 1, commit_at).await;
        println!(
            "[{label}] late transaction (message id {late_id}) delivered {:.1} ms after its commit",
            commit_at.elapsed().as_secs_f64() * 1000.0
        );
        t1.rollback().await.expect("release");
    }
    let _ = stop.send(());
    task.await.expect("relay task").expect("relay");
    db.drop().await;
    rate
}

/// A steady stream at `rate` messages/s for `duration`; prints latency percentiles.
async fn latency(rate: u64, duration: Duration) {
    let db = BenchDb::new("bench_latency", 1).await;
    bench_partitions(&db).await;
    let topic = latency_topic("bench-latency").await;
    let (stop, task) = start_relay(relay_config(&db));
    stream_and_report("latency", &db, &topic, rate, duration).await;
    let _ = stop.send(());
    task.await.expect("relay task").expect("relay");
    db.drop().await;
}

/// A topic whose records carry the broker's append time, so the probe can tell the
/// commit-to-acknowledgement part of the latency from the consumer's fetch.
async fn latency_topic(prefix: &str) -> String {
    outbox_testkit::create_topic_with(
        prefix,
        KAFKA_PARTITIONS,
        &[("message.timestamp.type", "LogAppendTime")],
    )
    .await
}

async fn stream_and_report(label: &str, db: &BenchDb, topic: &str, rate: u64, duration: Duration) {
    let times: CommitTimes = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let receiver = receive_times(outbox_testkit::brokers(), topic.to_owned(), done.clone());
    // Let the consumer join its group before the stream starts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Messages per transaction (BENCH_PER_TX, default 2): the write side's cost per message.
    let per_tx = std::env::var("BENCH_PER_TX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let anchor = (Instant::now(), std::time::SystemTime::now());
    let written = paced_writers(&db.outbox, topic, rate, per_tx, 4, duration, times.clone()).await;
    done.store(true, Ordering::SeqCst);
    let received = tokio::task::spawn_blocking(move || receiver.join().expect("receiver"))
        .await
        .expect("join");
    let (n, [p50, p90, p99, p999, max]) = latency_percentiles(&times, &received);
    println!(
        "[{label}] {written} messages offered at {rate}/s ({per_tx} per transaction, 4 writers) for {} s = {:.0}/s achieved; {n} matched; commit-to-consume ms: p50 {p50:.1}, p90 {p90:.1}, p99 {p99:.1}, p99.9 {p999:.1}, max {max:.1}",
        duration.as_secs(),
        written as f64 / duration.as_secs_f64()
    );
    let (n, [p50, p90, p99, p999, max]) = append_percentiles(&times, &received, anchor);
    println!(
        "[{label}] commit-to-append (the broker's LogAppendTime, ms resolution; the ack is this plus the response's trip) over {n}: p50 {p50:.1}, p90 {p90:.1}, p99 {p99:.1}, p99.9 {p999:.1}, max {max:.1}"
    );
}

async fn long_tx() {
    let base = throughput(false).await;
    let held = throughput(true).await;
    println!(
        "[long_tx] drain with long transactions open: {:.0}% of the drain without",
        held / base * 100.0
    );
    long_stream(Duration::from_secs(300)).await;
}

/// Steady traffic for `duration` with an idle transaction and a writer's transaction open.
async fn long_stream(duration: Duration) {
    let db = BenchDb::new("bench_long_stream", 1).await;
    bench_partitions(&db).await;
    let topic = latency_topic("bench-long").await;
    let mut idle = outbox_testkit::connect().await;
    let mut late = outbox_testkit::connect().await;
    let (t1, t2, _) = hold_transactions_open(&mut idle, &mut late, &db, &topic).await;
    let (stop, task) = start_relay(relay_config(&db));
    let label = format!(
        "long_tx stream, {} s with transactions open",
        duration.as_secs()
    );
    stream_and_report(&label, &db, &topic, 2000, duration).await;
    let before = topic_size(
        &consumer(&outbox_testkit::brokers()),
        &topic,
        KAFKA_PARTITIONS,
    );
    let commit_at = Instant::now();
    t2.commit().await.expect("late commit");
    let after = wait_for_topic(&topic, before + 1, commit_at).await;
    println!(
        "[long_tx] late transaction delivered {:.1} ms after its commit ({} s old)",
        after.as_secs_f64() * 1000.0,
        duration.as_secs()
    );
    t1.rollback().await.expect("release");
    let _ = stop.send(());
    task.await.expect("relay task").expect("relay");
    db.drop().await;
}

/// The broker's and producer's own ceiling on this machine: 1,000,000 records of 300 B,
/// produced with the relay's producer settings, in batches of 1,000, without PostgreSQL.
async fn kafka_ceiling() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = outbox_testkit::create_topic("bench-ceiling", KAFKA_PARTITIONS).await;
    let config = outboxd::Config {
        brokers: outbox_testkit::brokers(),
        ..outboxd::Config::default()
    };
    let producer: FutureProducer =
        outboxd::publisher::producer_config(&config, outbox::DEFAULT_MAX_RECORD_BYTES)
            .expect("producer config")
            .create()
            .expect("producer");
    let payload = vec![b'x'; 300];
    let start = Instant::now();
    for batch in 0..(BACKLOG / 1000) {
        let mut acks = Vec::with_capacity(1000);
        for i in 0..1000u64 {
            let key = format!("entity-{}", (batch * 1000 + i) % 10_000);
            let mut record = FutureRecord::to(&topic)
                .key(key.as_bytes())
                .payload(payload.as_slice());
            loop {
                match producer.send_result(record) {
                    Ok(ack) => break acks.push(ack),
                    Err((_, back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        for ack in acks {
            ack.await.expect("delivery").expect("ack");
        }
    }
    let elapsed = start.elapsed();
    println!(
        "[kafka_ceiling] {BACKLOG} records in {:.1} s: {:.0} msg/s (one producer, batches of 1000 awaited in turn)",
        elapsed.as_secs_f64(),
        BACKLOG as f64 / elapsed.as_secs_f64()
    );
}
