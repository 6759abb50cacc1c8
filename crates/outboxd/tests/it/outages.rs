//! Outages: PostgreSQL going away under the relay (cut by a TCP proxy the test controls),
//! and Kafka going away (the in-process mock cluster, since the real broker is shared by
//! the other tests). Application writes carry on; the relay backs off, resumes by itself,
//! and nothing is lost or reordered.

use std::time::Duration;

use crate::proxy::PgProxy;
use crate::support::{RunningRelay, Setup, wait_until, write_messages};
use outboxd::health::PartitionState;
use rdkafka::mocking::MockCluster;

fn entity_messages(prefix: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}-{}", i % 7),
                format!("{prefix}{i}").into_bytes(),
            )
        })
        .collect()
}

fn merge(
    into: &mut std::collections::HashMap<String, Vec<i64>>,
    from: std::collections::HashMap<String, Vec<i64>>,
) {
    for (k, v) in from {
        into.entry(k).or_default().extend(v);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_relay_reconnects_and_loses_nothing() {
    let setup = Setup::new(2).await;
    let topic = outbox_testkit::create_topic("pgdown", 3).await;
    let pg: tokio_postgres::Config = outbox_testkit::database_url().parse().expect("url");
    let proxy = PgProxy::start(format!("127.0.0.1:{}", pg.get_ports()[0])).await;
    let url = proxy.url_for(&outbox_testkit::database_url());
    let relay = RunningRelay::start(outboxd::Config {
        database_url: url,
        retry_initial_ms: 50,
        retry_max_ms: 500,
        ..setup.relay_config()
    });
    let mut expected = write_messages(&setup.outbox, &topic, &entity_messages("a", 100)).await;
    let first = outbox_testkit::consume(&topic, 100, Duration::from_secs(30));
    assert_eq!(first.len(), 100);

    proxy.cut();
    // The application writes on (directly, not through the proxy) while the relay is cut off.
    merge(
        &mut expected,
        write_messages(&setup.outbox, &topic, &entity_messages("b", 200)).await,
    );
    wait_until(Duration::from_secs(10), "relay notices the outage", || {
        let state = relay.state(0);
        async move { matches!(state, Some(PartitionState::Disconnected { .. })) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();

    wait_until(Duration::from_secs(60), "all retired", || async {
        setup.remaining().await == 0
    })
    .await;
    relay.stop().await;
    // Everything the topic holds: what was acknowledged but not yet deleted when the relay
    // was cut off is published again (at least once), so there are more than 300 records.
    let size = outbox_testkit::topic_size(&topic);
    let all = outbox_testkit::consume(&topic, size, Duration::from_secs(60));
    let dropped = outbox_testkit::assert_dedup_order(&all, &expected);
    assert!(
        all.len() - dropped == 300,
        "every message once after de-duplication"
    );
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_outage_writes_carry_on_and_relay_resumes_in_order() {
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = "mock-outage";
    mock.create_topic(topic, 2, 1).expect("topic");
    let setup = Setup::new(2).await;
    let config = outboxd::Config {
        brokers: mock.bootstrap_servers(),
        retry_initial_ms: 50,
        retry_max_ms: 500,
        ..setup.relay_config()
    };
    let relay = RunningRelay::start(config);
    let mut expected = write_messages(&setup.outbox, topic, &entity_messages("a", 50)).await;
    let first = outbox_testkit::consume_from(
        &mock.bootstrap_servers(),
        topic,
        50,
        Duration::from_secs(30),
    );
    assert_eq!(first.len(), 50);

    mock.broker_down(1).expect("broker down");
    let started = std::time::Instant::now();
    merge(
        &mut expected,
        write_messages(&setup.outbox, topic, &entity_messages("b", 150)).await,
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "application writes are not held up by Kafka"
    );
    wait_until(Duration::from_secs(20), "relay retrying", || {
        let snapshot = relay.health.snapshot();
        async move {
            snapshot
                .values()
                .any(|s| matches!(s, PartitionState::Retrying { .. }))
        }
    })
    .await;
    assert!(
        setup.remaining().await > 0,
        "nothing is retired while Kafka is down"
    );
    mock.broker_up(1).expect("broker up");

    wait_until(Duration::from_secs(60), "all retired", || async {
        setup.remaining().await == 0
    })
    .await;
    let all = outbox_testkit::consume_from(
        &mock.bootstrap_servers(),
        topic,
        1_000,
        Duration::from_secs(5),
    );
    assert!(
        relay.health.is_healthy(),
        "healthy again: {}",
        relay.health.to_json()
    );
    relay.stop().await;
    let dropped = outbox_testkit::assert_dedup_order(&all, &expected);
    assert_eq!(
        all.len() - dropped,
        200,
        "every message once after de-duplication"
    );
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_produce_errors_are_retried_in_place_without_reordering() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = "mock-retriable";
    mock.create_topic(topic, 1, 1).expect("topic");
    let setup = Setup::new(1).await;
    let relay = RunningRelay::start(outboxd::Config {
        brokers: mock.bootstrap_servers(),
        batch_size: 20,
        ..setup.relay_config()
    });
    // A burst of retriable broker errors on Produce while messages flow.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 12],
    );
    let expected = write_messages(&setup.outbox, topic, &entity_messages("r", 120)).await;
    wait_until(Duration::from_secs(60), "all retired", || async {
        setup.remaining().await == 0
    })
    .await;
    let all = outbox_testkit::consume_from(
        &mock.bootstrap_servers(),
        topic,
        1_000,
        Duration::from_secs(5),
    );
    relay.stop().await;
    let dropped = outbox_testkit::assert_dedup_order(&all, &expected);
    assert_eq!(all.len() - dropped, 120);
    setup.cleanup().await;
}

/// A relay that comes up before PostgreSQL (a host reboot, a database restart) waits for it,
/// showing why in `/health`, instead of exiting; once the database answers it starts and
/// relays. Before, it exited at once with "connection refused".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_before_postgres_waits_for_it() {
    let setup = Setup::new(1).await;
    let topic = outbox_testkit::create_topic("early", 1).await;
    let pg: tokio_postgres::Config = outbox_testkit::database_url().parse().expect("url");
    let proxy = PgProxy::start(format!("127.0.0.1:{}", pg.get_ports()[0])).await;
    proxy.cut();
    let relay = RunningRelay::start(outboxd::Config {
        database_url: proxy.url_for(&outbox_testkit::database_url()),
        retry_initial_ms: 50,
        retry_max_ms: 300,
        ..setup.relay_config()
    });
    wait_until(Duration::from_secs(10), "health says it waits", || {
        let body = relay.health.to_json();
        async move { body.contains("waiting for PostgreSQL") && body.contains("\"healthy\":false") }
    })
    .await;
    let expected = write_messages(&setup.outbox, &topic, &entity_messages("w", 20)).await;
    proxy.restore();
    setup.wait_drained("relayed once PostgreSQL answers").await;
    assert!(relay.health.is_healthy(), "{}", relay.health.to_json());
    relay.stop().await;
    let consumed = outbox_testkit::consume(&topic, 20, Duration::from_secs(30));
    outbox_testkit::assert_dedup_order(&consumed, &expected);
    setup.cleanup().await;
}
