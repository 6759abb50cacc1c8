//! No background task dies silently: a partition worker that panics is reported in
//! `/health`, counted, and started again with backoff, and its partition is relayed again
//! from where it stood, in order. The panic is injected (no input can cause one on purpose).

use std::time::Duration;

use outboxd::health::PartitionState;

use crate::support::{RunningRelay, Setup, wait_until, write_messages};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_panics_is_reported_and_restarted() {
    let setup = Setup::new(2).await;
    let topic = outbox_testkit::create_topic("panic", 2).await;
    let relay = RunningRelay::start(outboxd::Config {
        // The restart waits at least half of this, long enough to be seen in /health.
        retry_initial_ms: 3000,
        retry_max_ms: 6000,
        ..setup.relay_config()
    });
    let messages = |tag: &str| -> Vec<(String, Vec<u8>)> {
        (0..40)
            .map(|i| (format!("e{}", i % 8), format!("{tag}{i}").into_bytes()))
            .collect()
    };
    let mut expected = write_messages(&setup.outbox, &topic, &messages("a")).await;
    setup.wait_drained("first messages").await;

    relay.faults.panic_worker_once(0);
    wait_until(Duration::from_secs(10), "the panic is reported", || {
        let state = relay.state(0);
        async move {
            matches!(state, Some(PartitionState::Restarting { restarts: 1, ref error })
                if error.contains("panic"))
        }
    })
    .await;
    assert!(!relay.health.is_healthy(), "{}", relay.health.to_json());
    // Messages written meanwhile wait for the restarted worker, and then arrive in order.
    for (k, v) in write_messages(&setup.outbox, &topic, &messages("b")).await {
        expected.entry(k).or_default().extend(v);
    }
    setup.wait_drained("messages after the restart").await;
    wait_until(Duration::from_secs(10), "relaying again", || {
        let state = relay.state(0);
        async move { state == Some(PartitionState::Relaying) }
    })
    .await;
    assert!(relay.health.is_healthy(), "{}", relay.health.to_json());
    relay.stop().await;
    let records = outbox_testkit::topic_size(&topic);
    let consumed = outbox_testkit::consume(&topic, records, Duration::from_secs(30));
    outbox_testkit::assert_dedup_order(&consumed, &expected);
    setup.cleanup().await;
}
