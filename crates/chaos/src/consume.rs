//! The checker's own Kafka consumer (not the relay's code): reads every partition of the
//! run's topics from the beginning up to the high watermark it found when it started, with
//! a plain rdkafka `BaseConsumer` assigned to the partitions (no group rebalancing, no
//! offsets committed). Runs after the relays drained and stopped, so nothing new arrives.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, Timestamp, TopicPartitionList};

use crate::error::{Context, Error, Result};

/// One record as the checker saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Index into the run's topic list.
    pub topic: usize,
    /// Kafka partition.
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
    /// The broker's append time in ms (`LogAppendTime`); `None` when the record carries
    /// another kind of timestamp.
    pub timestamp_ms: Option<i64>,
    /// The Kafka key as text.
    pub key: Option<String>,
    /// The `outbox-id` header.
    pub outbox_id: Option<i64>,
    /// The `outbox-entity-key` header.
    pub entity_header: Option<String>,
    /// The value.
    pub payload: Option<Vec<u8>>,
}

/// Reads all records of `topics`, in offset order within each partition.
pub fn read_all(brokers: &str, topics: &[String], timeout: Duration) -> Result<Vec<Record>> {
    let group = format!("outbox-chaos-checker-{}", std::process::id());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50")
        .create()
        .context("creating the checker's Kafka consumer")?;
    let mut assignment = TopicPartitionList::new();
    // (topic index, partition) -> the high watermark to read up to.
    let mut remaining: HashMap<(usize, i32), i64> = HashMap::new();
    for (t, topic) in topics.iter().enumerate() {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .context(format!("reading the metadata of {topic}"))?;
        let partitions = metadata
            .topics()
            .first()
            .map(|m| m.partitions().len())
            .unwrap_or_default();
        if partitions == 0 {
            return Err(Error::msg(format!("topic {topic} has no partitions")));
        }
        for p in 0..partitions as i32 {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .context(format!("reading the watermarks of {topic} [{p}]"))?;
            if low != 0 {
                return Err(Error::msg(format!(
                    "{topic} [{p}] starts at offset {low}: records were deleted before the check"
                )));
            }
            if high > low {
                assignment
                    .add_partition_offset(topic, p, Offset::Beginning)
                    .context("building the assignment")?;
                remaining.insert((t, p), high);
            }
        }
    }
    let mut records = Vec::new();
    if remaining.is_empty() {
        return Ok(records);
    }
    consumer
        .assign(&assignment)
        .context("assigning the partitions")?;
    let deadline = Instant::now() + timeout;
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            return Err(Error::msg(format!(
                "consuming did not reach the end of {} partitions within {timeout:?}",
                remaining.len()
            )));
        }
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = result.context("consuming")?;
        let Some(t) = topics.iter().position(|n| n == m.topic()) else {
            continue;
        };
        let header = |name: &str| -> Option<String> {
            m.headers().and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        records.push(Record {
            topic: t,
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: match m.timestamp() {
                Timestamp::LogAppendTime(ms) => Some(ms),
                _ => None,
            },
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            outbox_id: header("outbox-id").and_then(|v| v.parse().ok()),
            entity_header: header("outbox-entity-key"),
            payload: m.payload().map(<[u8]>::to_vec),
        });
        let key = (t, m.partition());
        if remaining
            .get(&key)
            .is_some_and(|high| m.offset() + 1 >= *high)
        {
            remaining.remove(&key);
        }
    }
    Ok(records)
}
