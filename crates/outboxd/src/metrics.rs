//! The relay's metrics, through the `metrics` facade (the binary installs the Prometheus
//! recorder; a library user installs whichever they like). Handles are registered once per
//! partition so the hot path does not format labels. Labels stay low-cardinality: schema,
//! partition, policy, error kind; never an entity key.

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Bucket bounds of the latency histograms (`*_seconds`): 1 ms to 1 min.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Bucket bounds of `outbox_relay_batch_size_messages`.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// The Prometheus exporter as the binary installs it: histograms with explicit buckets (not
/// summaries), so that they aggregate across partitions and instances.
pub fn prometheus_builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("outbox_relay_batch_size_messages".to_owned()),
            BATCH_SIZE_BUCKETS,
        )
}

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
    /// `outbox_relay_batch_size_messages`: messages per batch published in full.
    pub batch_size: Histogram,
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
            batch_size: metrics::histogram!("outbox_relay_batch_size_messages", "schema" => s.clone(), "partition" => p.clone()),
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

/// Registers the relay-wide counters at zero, so that they exist on `/metrics` (and in
/// dashboards and alert expressions) before their first event.
pub fn register_relay_counters() {
    for name in [
        "outbox_relay_lease_takeovers_total",
        "outbox_relay_fencing_rejections_total",
        "outbox_relay_producer_fatal_errors_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for task in [
        crate::supervisor::Task::Poller,
        crate::supervisor::Task::Leases,
        crate::supervisor::Task::KafkaWatch,
        crate::supervisor::Task::Backlog,
        crate::supervisor::Task::MappingCleanup,
    ] {
        metrics::counter!("outbox_relay_task_restarts_total", "task" => task.name()).increment(0);
    }
    metrics::gauge!("outbox_relay_leases_held").set(0.0);
}
