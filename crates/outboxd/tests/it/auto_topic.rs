//! The relay never auto-creates topics: a message to a topic that does not exist is a
//! non-retriable error for the topic's policy (here `dead_letter`), and the partition goes
//! on. (Records produced while the broker auto-created a topic were, twice, acknowledged
//! but missing from its log.)

use std::time::Duration;

use crate::support::{RunningRelay, Setup, wait_until, write_messages};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_not_created_and_goes_through_the_policy() {
    let setup = Setup::new(1).await;
    let existing = outbox_testkit::create_topic("exists", 1).await;
    let missing = outbox_testkit::unique_name("missing").replace('_', "-");
    let mut config = setup.relay_config();
    config.on_error = outboxd::ErrorPolicy::DeadLetter;
    // Give up on an unknown topic after 1 s instead of librdkafka's default 30 s.
    config
        .kafka
        .insert("topic.metadata.propagation.max.ms".into(), "1000".into());
    let relay = RunningRelay::start(config);
    write_messages(&setup.outbox, &missing, &[("a".into(), b"lost?".to_vec())]).await;
    write_messages(&setup.outbox, &existing, &[("b".into(), b"fine".to_vec())]).await;

    wait_until(Duration::from_secs(60), "both handled", || async {
        setup.remaining().await == 0
    })
    .await;
    relay.stop().await;
    let consumed = outbox_testkit::consume(&existing, 1, Duration::from_secs(30));
    assert_eq!(consumed.len(), 1);
    assert_eq!(consumed[0].payload.as_deref(), Some(b"fine".as_slice()));
    let row = setup
        .client
        .query_one(
            &format!("SELECT topic, error FROM {}.dead_letter", setup.schema),
            &[],
        )
        .await
        .expect("the message to the missing topic is dead-lettered");
    assert_eq!(row.get::<_, String>(0), missing);
    let error: String = row.get(1);
    assert!(error.to_lowercase().contains("unknown topic"), "{error}");
    // And the broker did not create it.
    let exists = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", outbox_testkit::brokers())
            .create()
            .expect("client");
        let md = c
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("metadata");
        md.topics()
            .iter()
            .any(|t| t.name() == missing && t.error().is_none())
    })
    .await
    .expect("metadata");
    assert!(!exists, "the relay must not create topics");
    setup.cleanup().await;
}
