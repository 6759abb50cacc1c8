//! Publishing one batch to Kafka: every record is enqueued into the idempotent producer
//! before any acknowledgement is awaited (awaiting them one by one is slow), then the acks
//! are collected in order. The caller retires rows only for a fully acknowledged prefix.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::reader::OutboxRow;

/// Header carrying the outbox message id: increasing in commit order within one entity, so
/// consumers can drop redelivered duplicates by remembering the last id per entity.
pub const HEADER_ID: &str = "outbox-id";
/// Header carrying the entity key (the ordering key).
pub const HEADER_ENTITY_KEY: &str = "outbox-entity-key";
/// Header carrying the event type, when the message has one.
pub const HEADER_EVENT_TYPE: &str = "outbox-event-type";

/// The producer properties the relay always sets; see `docs/configuration.md`.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        // Idempotence keeps order under internal retries (acks=all, <= 5 in flight).
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // A failure that would leave a gap (a later message of a Kafka partition delivered
        // while an earlier one failed) becomes a fatal error instead; the relay then
        // recreates the producer and resends from the first unacknowledged message.
        .set("enable.gapless.guarantee", "true")
        // Never create topics from the relay. Records produced while the broker was
        // auto-creating a topic were twice acknowledged yet missing from its log (see
        // docs/guarantees.md); a missing topic is now a non-retriable error instead, handled
        // by the topic's policy.
        .set("allow.auto.create.topics", "false")
        .set("compression.type", "lz4")
        // Same key -> same partition as the Java client's default partitioner.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1")
        // Small produce requests must not wait for Nagle's algorithm (tens of ms).
        .set("socket.nagle.disable", "true")
        .set("message.timeout.ms", "30000")
        .set("queue.buffering.max.messages", "1000000");
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    c
}

/// The relay's Kafka producer, shared by all partition workers. Replaced as a whole after a
/// fatal error (an idempotent producer cannot continue after one).
pub struct Publisher {
    config: ClientConfig,
    producer: RwLock<Arc<FutureProducer>>,
}

/// How far a batch got: the number of leading messages acknowledged, and the first error.
#[derive(Debug)]
pub struct PublishOutcome {
    /// Messages `[0, acked)` are acknowledged by Kafka.
    pub acked: usize,
    /// The error of the first message that failed, if any did.
    pub error: Option<KafkaError>,
}

impl Publisher {
    /// Creates the producer.
    pub fn new(config: &Config) -> Result<Self> {
        let config = producer_config(config);
        let producer: FutureProducer = config
            .create()
            .map_err(Error::kafka("creating the producer"))?;
        Ok(Publisher {
            config,
            producer: RwLock::new(Arc::new(producer)),
        })
    }

    fn current(&self) -> Arc<FutureProducer> {
        match self.producer.read() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the producer when the current one has raised a fatal error. Several
    /// workers may notice the same fatal error; only the first replaces it.
    pub fn recover_if_fatal(&self) -> Result<bool> {
        let mut guard = match self.producer.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some((code, reason)) = guard.client().fatal_error() else {
            return Ok(false);
        };
        tracing::warn!(
            ?code,
            reason,
            "Kafka producer hit a fatal error; creating a new one"
        );
        let fresh: FutureProducer = self
            .config
            .create()
            .map_err(Error::kafka("recreating the producer"))?;
        *guard = Arc::new(fresh);
        Ok(true)
    }

    /// Sends `rows` in order and waits for every acknowledgement.
    pub async fn publish(&self, rows: &[&OutboxRow]) -> PublishOutcome {
        let producer = self.current();
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in rows {
            match enqueue(&producer, row).await {
                Ok(d) => deliveries.push(d),
                Err(e) => {
                    // Later rows must not go out ahead of this one: stop enqueuing.
                    let acked = count_acked(join_all(deliveries).await);
                    return PublishOutcome {
                        acked: acked.0,
                        error: acked.1.or(Some(e)),
                    };
                }
            }
        }
        let (acked, error) = count_acked(join_all(deliveries).await);
        PublishOutcome { acked, error }
    }

    /// Waits until every enqueued message is delivered or failed; called before exit, since
    /// dropping a producer purges what is still in flight.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.current()
            .flush(timeout)
            .map_err(Error::kafka("flushing the producer"))
    }
}

/// True for errors that retrying the same message cannot fix: the per-topic policy
/// decides what happens to it. Everything else is retried in place.
pub fn is_permanent(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        error.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::MessageBatchTooLarge
                | C::UnknownTopic
                | C::UnknownPartition
                | C::UnknownTopicOrPartition
                | C::TopicAuthorizationFailed
                | C::InvalidTopic
                | C::InvalidRecord
        )
    )
}

/// Enqueues one record, waiting while the producer's local queue is full.
async fn enqueue(
    producer: &FutureProducer,
    row: &OutboxRow,
) -> std::result::Result<DeliveryFuture, KafkaError> {
    {
        let id = row.id.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(row.header_names.len() + 3)
            .insert(Header {
                key: HEADER_ID,
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: HEADER_ENTITY_KEY,
                value: Some(row.entity_key.as_bytes()),
            });
        if let Some(t) = &row.event_type {
            headers = headers.insert(Header {
                key: HEADER_EVENT_TYPE,
                value: Some(t.as_bytes()),
            });
        }
        for (k, v) in row.header_names.iter().zip(&row.header_values) {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        let key: &[u8] = row
            .kafka_key
            .as_deref()
            .unwrap_or(row.entity_key.as_bytes());
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&row.topic).key(key).headers(headers);
        if let Some(p) = &row.payload {
            record = record.payload(p.as_slice());
        }
        if let Some(p) = row.kafka_partition {
            record = record.partition(p);
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
}

/// Counts the acknowledged prefix and returns the first error after it.
fn count_acked(results: Vec<<DeliveryFuture as Future>::Output>) -> (usize, Option<KafkaError>) {
    let mut acked = 0;
    for r in results {
        match r {
            Ok(Ok(_)) => acked += 1,
            Ok(Err((e, _))) => return (acked, Some(e)),
            Err(_) => return (acked, Some(KafkaError::Canceled)),
        }
    }
    (acked, None)
}
