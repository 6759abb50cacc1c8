//! The run's Kafka topics: two fresh normal ones per run (so entities write across topics)
//! and the poison topic (one partition, `max.message.bytes` far below a poison message, see
//! poison.rs), all with `message.timestamp.type=LogAppendTime` so every record carries the
//! broker's arrival time. Topics of earlier runs are deleted first. The relay never creates
//! topics.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::error::{Context, Error, Result};

/// Every chaos topic starts with this, so a later run can find and delete it.
const PREFIX: &str = "chaos-";

/// Kafka partitions per topic: entities of one topic spread over several of them.
const PARTITIONS: i32 = 3;

/// The run's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunTopics {
    /// `chaos-{run_id}-a` and `-b`: every entity writes to both.
    pub normal: Vec<String>,
    /// `chaos-{run_id}-poison`: only poison messages, which Kafka refuses.
    pub poison: String,
}

impl RunTopics {
    /// Every topic, the normal ones first: the order the checker's topic indexes use.
    pub fn all(&self) -> Vec<String> {
        let mut all = self.normal.clone();
        all.push(self.poison.clone());
        all
    }
}

/// Deletes earlier runs' topics and creates `chaos-{run_id}-a`, `-b` and `-poison` (whose
/// `max.message.bytes` is `poison_max_bytes`).
pub async fn recreate(brokers: &str, run_id: &str, poison_max_bytes: usize) -> Result<RunTopics> {
    let hint = "the chaos Kafka broker is not reachable: scripts/chaos starts it";
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating a Kafka admin client")?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let old: Vec<String> = existing(brokers)
        .map_err(|e| Error::msg(format!("{e}; {hint}")))?
        .into_iter()
        .filter(|t| t.starts_with(PREFIX))
        .collect();
    if !old.is_empty() {
        let names: Vec<&str> = old.iter().map(String::as_str).collect();
        admin
            .delete_topics(&names, &options)
            .await
            .context("deleting earlier chaos topics")?;
    }
    let topics = RunTopics {
        normal: vec![format!("{PREFIX}{run_id}-a"), format!("{PREFIX}{run_id}-b")],
        poison: format!("{PREFIX}{run_id}-poison"),
    };
    let names = topics.all();
    let limit = poison_max_bytes.to_string();
    let mut new: Vec<NewTopic<'_>> = topics
        .normal
        .iter()
        .map(|n| {
            NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1))
                .set("message.timestamp.type", "LogAppendTime")
        })
        .collect();
    // One partition: every poison message of the run goes to one Kafka partition, so the
    // broker refuses record batches that may hold several of them.
    new.push(
        NewTopic::new(&topics.poison, 1, TopicReplication::Fixed(1))
            .set("message.timestamp.type", "LogAppendTime")
            .set("max.message.bytes", &limit),
    );
    for result in admin
        .create_topics(new.iter(), &options)
        .await
        .context("creating the chaos topics")?
    {
        result.map_err(|(t, code)| Error::msg(format!("creating topic {t}: {code}")))?;
    }
    // Creation is acknowledged by the controller; wait until the broker serves them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let have = existing(brokers)?;
        if names.iter().all(|n| have.contains(n)) {
            return Ok(topics);
        }
        if Instant::now() > deadline {
            return Err(Error::msg(format!(
                "topics {names:?} were created but never appeared in the metadata"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The topics the broker knows.
fn existing(brokers: &str) -> Result<Vec<String>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating a Kafka client")?;
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .context(format!("reading the topic list from {brokers}"))?;
    Ok(metadata
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .collect())
}
