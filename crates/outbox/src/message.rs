//! `Message` and its builder: what a service hands to `save_in_tx`. The builder checks
//! everything that does not depend on the `Outbox` handle's limits, so a bad message is
//! refused before any SQL is sent.

use crate::error::{Error, Result};

/// The longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// The most headers a message may carry (besides the relay's own), checked the same way by
/// the SQL functions (`max_headers()`).
pub const MAX_HEADERS: usize = 100;

/// The largest explicit Kafka partition accepted (`max_kafka_partition()` in SQL): Kafka topics
/// have far fewer partitions, so a larger number is a caller's mistake.
pub const MAX_KAFKA_PARTITION: i32 = 999_999;

/// The longest entity key, in bytes (UTF-8). The key is the primary key of the sticky mapping
/// table, and a btree index entry must fit in a third of a page (2,704 bytes); the limit leaves
/// room for that with a margin, and is checked the same way by the SQL functions.
pub const MAX_ENTITY_KEY_BYTES: usize = 1024;

/// One message to publish: where it goes (topic, optional Kafka key and partition), which
/// business entity it belongs to (the ordering key), and what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub(crate) topic: String,
    pub(crate) entity_key: String,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) kafka_key: Option<Vec<u8>>,
    pub(crate) kafka_partition: Option<i32>,
    pub(crate) header_names: Vec<String>,
    pub(crate) header_values: Vec<Vec<u8>>,
    pub(crate) event_type: Option<String>,
}

impl Message {
    /// Starts a message for `topic` about the business entity `entity_key`. All messages of
    /// one entity key are published in commit order; by default the entity key is also the
    /// Kafka key, so they land in one Kafka partition.
    pub fn builder(topic: impl Into<String>, entity_key: impl Into<String>) -> MessageBuilder {
        MessageBuilder {
            message: Message {
                topic: topic.into(),
                entity_key: entity_key.into(),
                payload: None,
                kafka_key: None,
                kafka_partition: None,
                header_names: Vec::new(),
                header_values: Vec::new(),
                event_type: None,
            },
            #[cfg(feature = "json")]
            json_error: None,
            #[cfg(feature = "trace-context")]
            trace_error: None,
        }
    }

    /// The Kafka topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The entity key, the unit of ordering.
    pub fn entity_key(&self) -> &str {
        &self.entity_key
    }
    /// The payload; `None` is a Kafka tombstone.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }
    /// The explicit Kafka key, if one was set (otherwise the entity key is used).
    pub fn kafka_key(&self) -> Option<&[u8]> {
        self.kafka_key.as_deref()
    }
    /// The explicit Kafka partition, if one was set.
    pub fn kafka_partition(&self) -> Option<i32> {
        self.kafka_partition
    }
    /// The headers in the order they were added.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.header_names
            .iter()
            .map(String::as_str)
            .zip(self.header_values.iter().map(Vec::as_slice))
    }
    /// The event type, if one was set.
    pub fn event_type(&self) -> Option<&str> {
        self.event_type.as_deref()
    }

    /// Payload size in bytes (0 for a tombstone).
    pub(crate) fn payload_len(&self) -> usize {
        self.payload.as_ref().map_or(0, Vec::len)
    }

    /// The size of the Kafka record this message makes, in bytes: what the database's
    /// `settings.max_record_bytes` limits. The Kafka key (the explicit one, else the entity
    /// key), the payload, every header name and value, and the headers the relay adds:
    /// `outbox-id` (counted with 20 digits), `outbox-entity-key` and, with an event type,
    /// `outbox-event-type`. The SQL function `record_bytes()` computes the same.
    pub fn record_bytes(&self) -> usize {
        let key = self
            .kafka_key
            .as_ref()
            .map_or(self.entity_key.len(), Vec::len);
        let relay_headers = "outbox-id".len()
            + 20
            + "outbox-entity-key".len()
            + self.entity_key.len()
            + self
                .event_type
                .as_ref()
                .map_or(0, |t| "outbox-event-type".len() + t.len());
        key + self.payload_len() + self.headers_len() + relay_headers
    }

    /// Header names plus values, in bytes.
    pub(crate) fn headers_len(&self) -> usize {
        self.header_names.iter().map(String::len).sum::<usize>()
            + self.header_values.iter().map(Vec::len).sum::<usize>()
    }
}

/// Builds a [`Message`]; [`MessageBuilder::build`] validates it.
#[derive(Debug)]
#[must_use = "call .build() to get the Message"]
pub struct MessageBuilder {
    message: Message,
    #[cfg(feature = "json")]
    json_error: Option<serde_json::Error>,
    #[cfg(feature = "trace-context")]
    trace_error: Option<String>,
}

impl MessageBuilder {
    /// Sets the payload to raw bytes.
    pub fn payload(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.message.payload = Some(bytes.into());
        self
    }

    /// Sets the payload to `value` encoded as JSON. An encoding error is reported by `build`.
    #[cfg(feature = "json")]
    pub fn json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(bytes) => self.message.payload = Some(bytes),
            Err(e) => self.json_error = Some(e),
        }
        self
    }

    /// Makes the message a tombstone (no payload), for compacted topics.
    pub fn tombstone(mut self) -> Self {
        self.message.payload = None;
        self
    }

    /// Sets the Kafka key; by default the entity key is the Kafka key.
    pub fn kafka_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.message.kafka_key = Some(key.into());
        self
    }

    /// Sends the message to this Kafka partition instead of the partitioner's choice.
    pub fn kafka_partition(mut self, partition: i32) -> Self {
        self.message.kafka_partition = Some(partition);
        self
    }

    /// Adds a Kafka header. Names starting with `outbox-` are reserved for the relay.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.message.header_names.push(name.into());
        self.message.header_values.push(value.into());
        self
    }

    /// Stores a W3C trace context with the message (feature `trace-context`): the relay sends
    /// it as the Kafka headers `traceparent` and, when given, `tracestate`, so a consumer
    /// continues the writer's trace. `build` refuses a malformed `traceparent`.
    #[cfg(feature = "trace-context")]
    pub fn trace_context(mut self, traceparent: &str, tracestate: Option<&str>) -> Self {
        if crate::trace::is_traceparent(traceparent) {
            self = self.header("traceparent", traceparent);
            if let Some(state) = tracestate {
                self = self.header("tracestate", state);
            }
        } else {
            self.trace_error = Some(traceparent.chars().take(80).collect());
        }
        self
    }

    /// Sets the event type, sent as the `outbox-event-type` header.
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.message.event_type = Some(event_type.into());
        self
    }

    /// Validates and returns the message.
    pub fn build(self) -> Result<Message> {
        #[cfg(feature = "json")]
        if let Some(e) = self.json_error {
            return Err(Error::Json(e));
        }
        #[cfg(feature = "trace-context")]
        if let Some(bad) = self.trace_error {
            return Err(Error::InvalidTraceparent(bad));
        }
        let m = self.message;
        validate_topic(&m.topic)?;
        if m.entity_key.is_empty() {
            return Err(Error::EmptyEntityKey { topic: m.topic });
        }
        if m.entity_key.len() > MAX_ENTITY_KEY_BYTES {
            return Err(Error::EntityKeyTooLong {
                size: m.entity_key.len(),
                max: MAX_ENTITY_KEY_BYTES,
            });
        }
        if let Some(p) = m.kafka_partition
            && !(0..=MAX_KAFKA_PARTITION).contains(&p)
        {
            return Err(Error::InvalidKafkaPartition(p));
        }
        if m.header_names.len() > MAX_HEADERS {
            return Err(Error::TooManyHeaders {
                count: m.header_names.len(),
                max: MAX_HEADERS,
            });
        }
        for name in &m.header_names {
            validate_header_name(name)?;
        }
        Ok(m)
    }
}

/// Checks a topic name against Kafka's rules (`org.apache.kafka.common.internals.Topic`).
pub fn validate_topic(topic: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::InvalidTopic {
            topic: topic.to_owned(),
            reason,
        })
    };
    if topic.is_empty() {
        return Err(Error::EmptyTopic);
    }
    if topic == "." || topic == ".." {
        return invalid("\".\" and \"..\" are not allowed");
    }
    if topic.len() > MAX_TOPIC_LEN {
        return invalid("longer than 249 characters");
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return invalid("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

fn validate_header_name(name: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::InvalidHeaderName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("empty");
    }
    if name.starts_with("outbox-") {
        return invalid("names starting with \"outbox-\" are reserved for the relay");
    }
    if name.chars().any(char::is_control) {
        return invalid("control characters are not allowed");
    }
    Ok(())
}
