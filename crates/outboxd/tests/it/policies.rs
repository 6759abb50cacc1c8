//! Non-retriable per-message errors and the per-topic policies. The real broker refuses a
//! payload above the producer's `message.max.bytes` (1,000,000 by default) for good:
//! `MSG_SIZE_TOO_LARGE`. One virtual partition, so every entity shares one worker.

use std::time::Duration;

use outboxd::health::PartitionState;

use crate::support::{RunningRelay, Setup, wait_until, write_messages};

const TOO_LARGE: usize = 1_500_000;

fn body(tag: &str) -> Vec<u8> {
    tag.as_bytes().to_vec()
}

/// Writes A1, A2 (too large), A3, B1, B2 and returns the id of A2. A2 is written while the
/// schema's record limit was higher, then the limit is set back to the default: the relay's
/// producer is sized for the default and refuses A2 for good.
async fn write_sequence(
    setup: &Setup,
    topic: &str,
) -> (std::collections::HashMap<String, Vec<i64>>, i64) {
    let set_limit = |max: i32| async move {
        setup
            .client
            .execute(
                &format!("UPDATE {}.settings SET max_record_bytes = $1", setup.schema),
                &[&max],
            )
            .await
            .expect("record limit");
    };
    set_limit(2_000_000).await;
    let big = setup.outbox.clone();
    let mut ids = write_messages(&big, topic, &[("A".into(), body("A1"))]).await;
    let a2 = write_messages(&big, topic, &[("A".into(), vec![b'x'; TOO_LARGE])]).await["A"][0];
    for (k, v) in write_messages(
        &big,
        topic,
        &[
            ("A".into(), body("A3")),
            ("B".into(), body("B1")),
            ("B".into(), body("B2")),
        ],
    )
    .await
    {
        ids.entry(k).or_default().extend(v);
    }
    set_limit(1_000_000).await;
    (ids, a2)
}

fn payloads(consumed: &[outbox_testkit::Consumed]) -> Vec<String> {
    consumed
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload.as_deref().unwrap_or_default()).into_owned())
        .collect()
}

async fn count(setup: &Setup, sql: &str) -> i64 {
    setup
        .client
        .query_one(&sql.replace("{s}", setup.schema.name()), &[])
        .await
        .expect(sql)
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_stops_the_partition_until_an_operator_skips_the_message() {
    let setup = Setup::new(1).await;
    let topic = outbox_testkit::create_topic("block", 1).await;
    let (_, a2) = write_sequence(&setup, &topic).await;
    let relay = RunningRelay::start(outboxd::Config {
        retry_max_ms: 300,
        ..setup.relay_config()
    });

    wait_until(Duration::from_secs(30), "partition blocked", || {
        let state = relay.state(0);
        async move {
            matches!(state, Some(PartitionState::Blocked { message_id, .. }) if message_id == a2)
        }
    })
    .await;
    assert!(
        !relay.health.is_healthy(),
        "a blocked partition makes health fail"
    );
    assert!(
        relay
            .health
            .to_json()
            .contains(&format!("blocked at message {a2}"))
    );
    // Nothing behind the refused message overtakes it, not even another entity's.
    let before = outbox_testkit::consume(&topic, 2, Duration::from_secs(3));
    assert_eq!(
        payloads(&before),
        vec!["A1"],
        "only the message before the refused one"
    );
    assert_eq!(count(&setup, "SELECT count(*) FROM {s}.message").await, 4);

    // The operator moves it aside (what `outboxd skip` runs); the partition resumes.
    let sql = outboxd::sql::Statements::new(&setup.schema);
    let moved = setup
        .client
        .query(&sql.skip_message, &[&a2, &"too large"])
        .await
        .expect("skip");
    assert_eq!(moved.len(), 1);
    let all = outbox_testkit::consume(&topic, 4, Duration::from_secs(30));
    relay.stop().await;
    assert_eq!(payloads(&all), vec!["A1", "A3", "B1", "B2"]);
    assert_eq!(
        count(
            &setup,
            "SELECT count(*) FROM {s}.dead_letter WHERE policy = 'skip'"
        )
        .await,
        1
    );
    assert_eq!(setup.remaining().await, 0);
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_moves_the_message_aside_and_goes_on() {
    let setup = Setup::new(1).await;
    let topic = outbox_testkit::create_topic("deadletter", 1).await;
    let (_, a2) = write_sequence(&setup, &topic).await;
    let mut config = setup.relay_config();
    config.topics.insert(
        topic.clone(),
        outboxd::TopicConfig {
            on_error: outboxd::ErrorPolicy::DeadLetter,
        },
    );
    let relay = RunningRelay::start(config);
    let all = outbox_testkit::consume(&topic, 4, Duration::from_secs(30));
    assert_eq!(payloads(&all), vec!["A1", "A3", "B1", "B2"]);
    wait_until(Duration::from_secs(10), "all retired", || async {
        setup.remaining().await == 0
    })
    .await;
    relay.stop().await;
    let row = setup
        .client
        .query_one(
            &format!(
                "SELECT id, entity_key, policy, error, length(payload) FROM {}.dead_letter",
                setup.schema
            ),
            &[],
        )
        .await
        .expect("one dead letter");
    assert_eq!(row.get::<_, i64>(0), a2);
    assert_eq!(row.get::<_, String>(1), "A");
    assert_eq!(row.get::<_, String>(2), "dead_letter");
    assert!(
        row.get::<_, String>(3).to_lowercase().contains("too large"),
        "{}",
        row.get::<_, String>(3)
    );
    assert_eq!(
        row.get::<_, Option<i32>>(4),
        Some(TOO_LARGE as i32),
        "the payload is kept"
    );
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn park_entity_holds_back_that_entity_until_unparked() {
    let setup = Setup::new(1).await;
    let topic = outbox_testkit::create_topic("park", 1).await;
    let (_, a2) = write_sequence(&setup, &topic).await;
    let relay = RunningRelay::start(outboxd::Config {
        on_error: outboxd::ErrorPolicy::ParkEntity,
        ..setup.relay_config()
    });

    let first = outbox_testkit::consume(&topic, 3, Duration::from_secs(30));
    assert_eq!(
        payloads(&first),
        vec!["A1", "B1", "B2"],
        "the other entity goes on"
    );
    wait_until(Duration::from_secs(10), "B retired", || async {
        setup.remaining().await == 1
    })
    .await;
    // More traffic for B flows past the parked A; A's new messages wait too.
    write_messages(
        &setup.outbox,
        &topic,
        &[("B".into(), body("B3")), ("A".into(), body("A4"))],
    )
    .await;
    let more = outbox_testkit::consume(&topic, 4, Duration::from_secs(30));
    assert_eq!(payloads(&more), vec!["A1", "B1", "B2", "B3"]);
    let parked: i64 = setup
        .client
        .query_one(
            &format!(
                "SELECT message_id FROM {}.parked_entity WHERE entity_key = 'A'",
                setup.schema
            ),
            &[],
        )
        .await
        .expect("A is parked")
        .get(0);
    assert_eq!(parked, a2);
    // /health shows it (counted with the instances, about once a second).
    wait_until(
        Duration::from_secs(10),
        "health shows the parked entity",
        || {
            let body = relay.health.to_json();
            async move { body.contains("\"parked_entities\":1") }
        },
    )
    .await;
    // Caught up and idle: a message of A alone, then one of B, each a window of one row
    // that the wake-up poller reads itself (its rows leave parked entities out, as a
    // worker's read does).
    write_messages(&setup.outbox, &topic, &[("A".into(), body("A5"))]).await;
    write_messages(&setup.outbox, &topic, &[("B".into(), body("B4"))]).await;
    let idle = outbox_testkit::consume(&topic, 5, Duration::from_secs(30));
    assert_eq!(payloads(&idle), vec!["A1", "B1", "B2", "B3", "B4"]);

    // The operator releases A (what `outboxd unpark A` runs): A3, A4, A5 follow, in order.
    let sql = outboxd::sql::Statements::new(&setup.schema);
    assert_eq!(
        setup
            .client
            .query(&sql.unpark_entity, &[&"A"])
            .await
            .expect("unpark")
            .len(),
        1
    );
    let all = outbox_testkit::consume(&topic, 8, Duration::from_secs(30));
    relay.stop().await;
    assert_eq!(
        payloads(&all),
        vec!["A1", "B1", "B2", "B3", "B4", "A3", "A4", "A5"]
    );
    assert_eq!(setup.remaining().await, 0);
    setup.cleanup().await;
}
