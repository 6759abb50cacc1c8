//! Keeps `/health` honest about Kafka while nothing is being published: librdkafka reports
//! when no broker can be reached, but says nothing when they come back, and an idle relay
//! sends nothing that could be acknowledged. So while the producer counts Kafka as
//! unreachable, this task asks the cluster for its metadata every few seconds, and it mirrors
//! the state into `/health` (a partition with messages to publish shows `retrying` on its own
//! after a few seconds without acknowledgements). It also mirrors the producer's fatal errors
//! (however they were noticed: by a round waiting for acknowledgements or after one), and
//! replaces a fatal producer that no round has noticed yet, and exports the producer's queue
//! depth (`outbox_relay_producer_queue_messages`).

use std::sync::Arc;
use std::time::Duration;

use crate::health::Health;
use crate::periodic::Periodic;
use crate::publisher::Publisher;
use crate::shutdown::Shutdown;

/// How often the state is mirrored and, while unreachable, the cluster asked.
const INTERVAL: Duration = Duration::from_secs(2);

/// Runs until `stop` turns true.
pub async fn run(publisher: Arc<Publisher>, health: Arc<Health>, shutdown: Shutdown) {
    let mut periodic = Periodic::new(INTERVAL, shutdown);
    let queue = metrics::gauge!("outbox_relay_producer_queue_messages");
    while periodic.tick().await {
        queue.set(f64::from(publisher.queue_depth()));
        if publisher.events().unreachable_for().is_some() {
            let p = Arc::clone(&publisher);
            // fetch_metadata blocks; keep it off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || p.check_reachable(INTERVAL)).await;
        }
        let state = publisher.events().unreachable_for().map(|d| {
            let last = publisher
                .events()
                .last_error()
                .map_or_else(String::new, |(_, e)| format!(": {e}"));
            format!("unreachable for {} s{last}", d.as_secs())
        });
        health.set_kafka(state);
        if let Err(e) = publisher.recover_if_fatal() {
            tracing::error!(error = %e, "could not replace the fatal Kafka producer");
        }
        if let (count @ 1.., Some((_, last))) = publisher.fatal_errors() {
            health.set_producer_fatal(count, last);
        }
    }
}
