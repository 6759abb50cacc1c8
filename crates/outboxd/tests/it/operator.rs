//! The operator's commands (the binary) against a running relay: `dead-letters` list, show,
//! retry (a parked entity's message goes back ahead of the entity's held-back messages and
//! everything arrives in order; an overtaken one is refused with the reason) and drop;
//! `partitions pause` stops one partition while the others flow and `resume` relays what
//! waited; `partitions resize --wait` follows the drain above a lowered count.

use std::collections::HashMap;
use std::time::Duration;

use outboxd::ErrorPolicy;
use serde_json::Value;

use crate::support::{RunningRelay, Setup, outboxd, pin, wait_until, write_messages};

fn ok_json(args: &[&str]) -> Value {
    let (ok, out, err) = outboxd(args);
    assert!(ok, "outboxd {args:?}: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn ids_in_order(topic: &str, count: usize) -> Vec<i64> {
    outbox_testkit::consume(topic, count, Duration::from_secs(60))
        .iter()
        .map(crate::support::outbox_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_retried_in_order_or_refused_and_dropped() {
    let setup = Setup::new(2).await;
    let schema = setup.schema.name().to_owned();
    // P and Q share a partition: Q's later message moves the relay's read position past P's
    // held-back ones, so putting P's first message back must make relays reread.
    pin(&setup, "P", 0).await;
    pin(&setup, "Q", 0).await;
    let good = outbox_testkit::create_topic("ops-good", 1).await;
    // Neither topic exists yet: Kafka refuses the first message of each for good.
    let parking = outbox_testkit::unique_name("ops-park").replace('_', "-");
    let lettering = outbox_testkit::unique_name("ops-dead").replace('_', "-");
    let parked = write_messages(
        &setup.outbox,
        &parking,
        &[
            ("P".into(), b"p1".to_vec()),
            ("P".into(), b"p2".to_vec()),
            ("P".into(), b"p3".to_vec()),
        ],
    )
    .await["P"]
        .clone();
    let dead =
        write_messages(&setup.outbox, &lettering, &[("D".into(), b"d1".to_vec())]).await["D"][0];
    let mut config = setup.relay_config();
    config.retry_max_ms = 300;
    for (topic, policy) in [
        (&parking, ErrorPolicy::ParkEntity),
        (&lettering, ErrorPolicy::DeadLetter),
    ] {
        config
            .topics
            .insert(topic.clone(), outboxd::TopicConfig { on_error: policy });
    }
    let relay = RunningRelay::start(config);
    wait_until(Duration::from_secs(60), "two dead letters", || async {
        ok_json(&["dead-letters", "list", "--json", "--schema", &schema])
            .as_array()
            .is_some_and(|l| l.len() == 2)
    })
    .await;
    // Written after P was parked: read in a later window, past P's held-back messages.
    let q1 = write_messages(&setup.outbox, &good, &[("Q".into(), b"q1".to_vec())]).await["Q"][0];
    assert_eq!(
        ids_in_order(&good, 1),
        vec![q1],
        "Q flows past the parked entity"
    );

    let listed = ok_json(&[
        "dead-letters",
        "list",
        "--json",
        "--schema",
        &schema,
        "--topic",
        &parking,
    ]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], parked[0]);
    assert_eq!(listed[0]["parks_its_entity"], true);
    let by_entity = ok_json(&[
        "dead-letters",
        "list",
        "--json",
        "--schema",
        &schema,
        "--entity",
        "D",
    ]);
    assert_eq!(by_entity[0]["id"], dead, "{by_entity}");
    let shown = ok_json(&[
        "dead-letters",
        "show",
        "--json",
        "--schema",
        &schema,
        &parked[0].to_string(),
    ]);
    assert_eq!(shown["payload_text"], "p1", "{shown}");
    assert_eq!(shown["policy"], "park_entity");
    assert!(
        shown["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{shown}"
    );

    // The overtaken one is refused, by name; it cannot be dropped while... it can: not parked.
    let (ok, _, err) = outboxd(&[
        "dead-letters",
        "retry",
        "--schema",
        &schema,
        &dead.to_string(),
    ]);
    assert!(!ok && err.contains("cannot go back in order"), "{err}");
    // Dropping the parked one is refused: its entity is parked on it.
    let (ok, _, err) = outboxd(&[
        "dead-letters",
        "drop",
        "--schema",
        &schema,
        &parked[0].to_string(),
    ]);
    assert!(!ok && err.contains("is parked on message"), "{err}");

    // The cause fixed (the topic exists), the parked one goes back ahead of p2, p3.
    outbox_testkit::create_named_topic(&parking, 1, &[]).await;
    let retried = ok_json(&[
        "dead-letters",
        "retry",
        "--json",
        "--schema",
        &schema,
        &parked[0].to_string(),
    ]);
    assert_eq!(retried["retried"], parked[0]);
    assert_eq!(
        ids_in_order(&parking, 3),
        parked,
        "p1, p2, p3 in commit order"
    );
    setup.wait_drained("everything relayed").await;

    let dropped = ok_json(&[
        "dead-letters",
        "drop",
        "--json",
        "--schema",
        &schema,
        &dead.to_string(),
    ]);
    assert_eq!(dropped["dropped"], dead);
    assert_eq!(
        ok_json(&["dead-letters", "list", "--json", "--schema", &schema]),
        serde_json::json!([])
    );
    let (ok, _, err) = outboxd(&["dead-letters", "show", "--schema", &schema, "424242"]);
    assert!(
        !ok && err.contains("no dead letter with id 424242"),
        "{err}"
    );
    relay.stop().await;
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partition_waits_while_the_others_flow_and_resumes_in_order() {
    let setup = Setup::new(2).await;
    let schema = setup.schema.name().to_owned();
    let topic = outbox_testkit::create_topic("ops-pause", 2).await;
    pin(&setup, "held", 1).await;
    pin(&setup, "flowing", 0).await;
    let mut config = setup.relay_config();
    config.lease_ttl_ms = 3000;
    let relay = RunningRelay::start(config);
    let paused = ok_json(&[
        "partitions",
        "pause",
        "1",
        "--json",
        "--schema",
        &schema,
        "--reason",
        "consumer repair",
    ]);
    assert_eq!(paused["paused"], 1);
    wait_until(Duration::from_secs(30), "partition 1 paused", || async {
        relay.state(1) == Some(outboxd::health::PartitionState::Paused)
    })
    .await;
    let held = write_messages(
        &setup.outbox,
        &topic,
        &(0..5)
            .map(|i| ("held".to_owned(), vec![i]))
            .collect::<Vec<_>>(),
    )
    .await;
    let flowing = write_messages(&setup.outbox, &topic, &[("flowing".into(), b"f".to_vec())]).await;
    let arrived = outbox_testkit::consume(&topic, 1, Duration::from_secs(30));
    assert_eq!(arrived.len(), 1);
    assert_eq!(
        crate::support::outbox_id(&arrived[0]),
        flowing["flowing"][0]
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        outbox_testkit::topic_size(&topic),
        1,
        "nothing of the paused partition"
    );
    let status = ok_json(&["status", "--json", "--schema", &schema]);
    let p1 = crate::status::partition(&status, 1);
    assert_eq!(p1["state"], "paused", "{p1}");
    assert_eq!(p1["paused_reason"], "consumer repair");
    assert_eq!(p1["waiting"], 5);

    ok_json(&["partitions", "resume", "1", "--json", "--schema", &schema]);
    setup.wait_drained("the paused partition relayed").await;
    let consumed = outbox_testkit::consume(&topic, 6, Duration::from_secs(30));
    let mut expected: HashMap<String, Vec<i64>> = held;
    expected.extend(flowing);
    outbox_testkit::assert_dedup_order(&consumed, &expected);
    let (ok, _, err) = outboxd(&["partitions", "resume", "1", "--schema", &schema]);
    assert!(!ok && err.contains("partition 1 is not paused"), "{err}");
    relay.stop().await;
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_waits_until_nothing_is_left_above_the_count() {
    let setup = Setup::new(4).await;
    let schema = setup.schema.name().to_owned();
    let topic = outbox_testkit::create_topic("ops-resize", 2).await;
    let messages: Vec<(String, Vec<u8>)> = (0..40).map(|i| (format!("e-{i}"), vec![1])).collect();
    write_messages(&setup.outbox, &topic, &messages).await;
    let above: i64 = setup
        .client
        .query_one(
            &format!("SELECT count(*) FROM {schema}.message WHERE partition >= 2"),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(above > 0, "some messages above the new count");
    let mut config = setup.relay_config();
    config.mapping_cleanup_interval_ms = 200;
    config.mapping_ttl_s = 0;
    let relay = RunningRelay::start(config);
    let (ok, out, err) = tokio::task::spawn_blocking({
        let schema = schema.clone();
        move || outboxd(&["partitions", "resize", "2", "--wait", "--schema", &schema])
    })
    .await
    .expect("resize");
    assert!(ok, "{out}{err}");
    assert!(out.contains("partition count 4 -> 2"), "{out}");
    assert!(
        out.contains("done: every entity is mapped below 2"),
        "{out}"
    );
    let left: i64 = setup
        .client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {schema}.message WHERE partition >= 2)
                      + (SELECT count(*) FROM {schema}.entity_partition WHERE partition >= 2)"
            ),
            &[],
        )
        .await
        .expect("left")
        .get(0);
    assert_eq!(left, 0);
    let (ok, _, err) = outboxd(&["partitions", "resize", "0", "--schema", &schema]);
    assert!(!ok && err.contains("between 1 and 4096"), "{err}");
    relay.stop().await;
    setup.cleanup().await;
}
