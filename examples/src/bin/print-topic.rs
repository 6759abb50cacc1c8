//! Reads a Kafka topic from the beginning and prints its messages grouped by key (the
//! entity), in the order they arrived, checking that each entity's `outbox-id` header
//! increases. The demo uses it to show messages arriving in order.
//!
//!     print-topic --brokers 127.0.0.1:39092 --topic orders --expect 80

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};

/// Prints a topic's messages grouped by key.
#[derive(Debug, Parser)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "OUTBOX_BROKERS")]
    brokers: String,
    /// Topic to read.
    #[arg(long, default_value = "orders")]
    topic: String,
    /// Stop after this many messages.
    #[arg(long, default_value_t = 0)]
    expect: usize,
    /// Only print keys starting with this prefix (the demo's run id).
    #[arg(long, default_value = "")]
    key_prefix: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Only create the topic with this many partitions if it does not exist, then exit.
    #[arg(long, value_name = "PARTITIONS")]
    create: Option<i32>,
}

/// Creates `topic` unless it exists. Production topics are created explicitly too; the
/// demo does not rely on the broker's auto-creation.
fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<(), String> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| format!("admin client: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let results = runtime
        .block_on(admin.create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        ))
        .map_err(|e| format!("creating {topic}: {e}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(format!("creating {t}: {code}")),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(partitions) = args.create {
        return match create_topic(&args.brokers, &args.topic, partitions) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("print-topic: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", format!("print-topic-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("print-topic: cannot create a consumer: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = consumer.subscribe(&[&args.topic]) {
        eprintln!("print-topic: cannot subscribe to {}: {e}", args.topic);
        return ExitCode::FAILURE;
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut by_key: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    let mut count = 0;
    while count < args.expect && Instant::now() < deadline {
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = match result {
            Ok(m) => m,
            Err(e) => {
                eprintln!("print-topic: {e}");
                continue;
            }
        };
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        if !key.starts_with(&args.key_prefix) {
            continue;
        }
        let id = m
            .headers()
            .and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == "outbox-id")
                    .and_then(|h| h.value)
            })
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(-1);
        let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
        by_key.entry(key).or_default().push((id, payload));
        count += 1;
    }
    let mut in_order = true;
    for (key, msgs) in &by_key {
        let ordered = msgs.windows(2).all(|w| w[0].0 < w[1].0);
        in_order &= ordered;
        println!(
            "{key}  ({} messages, {})",
            msgs.len(),
            if ordered { "in order" } else { "OUT OF ORDER" }
        );
        for (id, payload) in msgs {
            println!("    outbox-id {id:>6}  {payload}");
        }
    }
    println!(
        "print-topic: {count} of {} expected messages, {} keys, {}",
        args.expect,
        by_key.len(),
        if in_order {
            "every key in order"
        } else {
            "SOME KEY OUT OF ORDER"
        }
    );
    if count < args.expect || !in_order {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
