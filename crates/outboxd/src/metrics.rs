//! The relay's metrics, through the `metrics` facade (the binary installs the Prometheus
//! recorder; a library user installs whichever they like). Handles are registered once per
//! partition so the hot path does not format labels. Labels stay low-cardinality: schema,
//! partition, policy, error kind; never an entity key.

use metrics::{Counter, Gauge, Histogram};

/// Metric handles of one partition worker.
pub struct PartitionMetrics {
    /// `outbox_relay_messages_published_total`: messages acknowledged by Kafka.
    pub published: Counter,
    /// `outbox_relay_batches_published_total`: batches fully acknowledged.
    pub batches: Counter,
    /// `outbox_relay_batch_duration_seconds`: from reading a batch to retiring it.
    pub batch_duration: Histogram,
    /// `outbox_relay_commit_to_ack_seconds`: from a message's insert to its ack.
    pub commit_to_ack: Histogram,
    /// `outbox_relay_oldest_message_age_seconds`: age of the oldest message of the last
    /// batch read; 0 when the partition is caught up. The lag.
    pub oldest_age: Gauge,
    /// `outbox_relay_partition_blocked`: 1 while a `block` policy holds the partition.
    pub blocked: Gauge,
    /// `outbox_relay_publish_errors_total{kind="retriable"}`.
    pub retriable_errors: Counter,
    /// `outbox_relay_publish_errors_total{kind="permanent"}`.
    pub permanent_errors: Counter,
    /// `outbox_relay_dead_lettered_total{policy="dead_letter"}`.
    pub dead_lettered: Counter,
    /// `outbox_relay_dead_lettered_total{policy="park_entity"}`.
    pub parked: Counter,
    /// `outbox_relay_probes_total`: messages sent alone to find the one Kafka refuses, or to
    /// retry a message that blocks the partition.
    pub probes: Counter,
}

impl PartitionMetrics {
    /// Registers the handles for `partition` of `schema`.
    pub fn new(schema: &str, partition: i32) -> Self {
        let s = schema.to_owned();
        let p = partition.to_string();
        PartitionMetrics {
            published: metrics::counter!("outbox_relay_messages_published_total", "schema" => s.clone(), "partition" => p.clone()),
            batches: metrics::counter!("outbox_relay_batches_published_total", "schema" => s.clone(), "partition" => p.clone()),
            batch_duration: metrics::histogram!("outbox_relay_batch_duration_seconds", "schema" => s.clone(), "partition" => p.clone()),
            commit_to_ack: metrics::histogram!("outbox_relay_commit_to_ack_seconds", "schema" => s.clone(), "partition" => p.clone()),
            oldest_age: metrics::gauge!("outbox_relay_oldest_message_age_seconds", "schema" => s.clone(), "partition" => p.clone()),
            blocked: metrics::gauge!("outbox_relay_partition_blocked", "schema" => s.clone(), "partition" => p.clone()),
            retriable_errors: metrics::counter!("outbox_relay_publish_errors_total", "schema" => s.clone(), "partition" => p.clone(), "kind" => "retriable"),
            permanent_errors: metrics::counter!("outbox_relay_publish_errors_total", "schema" => s.clone(), "partition" => p.clone(), "kind" => "permanent"),
            dead_lettered: metrics::counter!("outbox_relay_dead_lettered_total", "schema" => s.clone(), "partition" => p.clone(), "policy" => "dead_letter"),
            parked: metrics::counter!("outbox_relay_dead_lettered_total", "schema" => s.clone(), "partition" => p.clone(), "policy" => "park_entity"),
            probes: metrics::counter!("outbox_relay_probes_total", "schema" => s, "partition" => p),
        }
    }
}
