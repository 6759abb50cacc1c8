//! Hazards 3 and 4: the partition count changes while messages flow, and several relay
//! instances share one schema. Per-entity order must survive both, and no message may be
//! stranded in a partition no worker serves.

use std::collections::HashMap;
use std::time::Duration;

use outboxd::health::PartitionState;

use crate::support::{RunningRelay, Setup, wait_until, write_messages};

/// `count` messages for each of `entities`, round-robin, each in its own transaction.
fn round_robin(prefix: &str, entities: usize, count: usize) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            (
                format!("{prefix}-{}", i % entities),
                format!("{prefix}-{i}").into_bytes(),
            )
        })
        .collect()
}

fn merge(into: &mut HashMap<String, Vec<i64>>, from: HashMap<String, Vec<i64>>) {
    for (k, v) in from {
        into.entry(k).or_default().extend(v);
    }
}

/// Reads `count` messages back from `topic` and checks each entity's order.
fn assert_relayed(topic: &str, count: usize, expected: &HashMap<String, Vec<i64>>) {
    let consumed = outbox_testkit::consume(topic, count, Duration::from_secs(60));
    assert_eq!(consumed.len(), count);
    outbox_testkit::assert_dedup_order(&consumed, expected);
}

/// The partitions of the entities whose key is `LIKE pattern`.
async fn partitions_of(setup: &Setup, pattern: &str) -> Vec<i32> {
    setup
        .client
        .query(
            &format!(
                "SELECT DISTINCT partition FROM {}.entity_partition WHERE entity_key LIKE $1 ORDER BY 1",
                setup.schema
            ),
            &[&pattern],
        )
        .await
        .expect("mappings")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_partition_count_while_relaying_serves_the_new_partitions() {
    let setup = Setup::new(2).await;
    let topic = outbox_testkit::create_topic("grow", 4).await;
    let relay = RunningRelay::start(setup.relay_config());
    let mut expected = write_messages(&setup.outbox, &topic, &round_robin("old", 10, 60)).await;
    setup.set_partition_count(16).await;
    // Old entities stay where they are; new ones spread over all 16 partitions.
    let mut mixed = round_robin("new", 40, 120);
    mixed.extend(round_robin("old", 10, 40));
    merge(
        &mut expected,
        write_messages(&setup.outbox, &topic, &mixed).await,
    );
    let used = partitions_of(&setup, "%").await;
    assert!(
        used.iter().any(|&p| p >= 2),
        "new entities landed in new partitions: {used:?}"
    );

    setup.wait_drained("every message retired").await;
    relay.stop().await;
    assert_relayed(&topic, 220, &expected);
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_above_a_lowered_count_are_still_relayed_after_a_restart() {
    let setup = Setup::new(16).await;
    let topic = outbox_testkit::create_topic("shrink", 4).await;
    let relay = RunningRelay::start(setup.relay_config());
    let mut expected = write_messages(&setup.outbox, &topic, &round_robin("e", 40, 80)).await;
    setup.wait_drained("first messages retired").await;
    relay.stop().await;
    assert!(
        partitions_of(&setup, "%").await.iter().any(|&p| p >= 2),
        "some entities live above the lowered count"
    );
    setup.set_partition_count(2).await;

    // A relay started now sees 2 partitions and an empty queue; the entities mapped above
    // them keep their partitions (sticky; the mapping cleanup, which would move idle ones
    // below the count, is off here) and must still be relayed.
    let relay = RunningRelay::start(outboxd::Config {
        mapping_cleanup_interval_ms: 0,
        ..setup.relay_config()
    });
    let mut more = round_robin("e", 40, 80);
    more.extend(round_robin("fresh", 10, 20));
    merge(
        &mut expected,
        write_messages(&setup.outbox, &topic, &more).await,
    );
    setup.wait_drained("every message retired").await;
    relay.stop().await;
    let fresh_partitions = partitions_of(&setup, "fresh-%").await;
    assert!(
        partitions_of(&setup, "e-%").await.iter().any(|&p| p >= 2),
        "old entities kept their partitions above the count"
    );
    assert!(
        fresh_partitions.iter().all(|&p| p < 2),
        "new entities use the lowered count: {fresh_partitions:?}"
    );
    assert_relayed(&topic, 180, &expected);
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_balance_the_partitions_and_one_takes_over_when_the_other_dies() {
    let setup = Setup::new(8).await;
    let topic = outbox_testkit::create_topic("pair", 4).await;
    let config = outboxd::Config {
        // Instances re-check partitions owned elsewhere every retry_max.
        retry_max_ms: 300,
        ..setup.relay_config()
    };
    let first = RunningRelay::start(config.clone());
    let relaying = |r: &RunningRelay, p: i32| r.state(p) == Some(PartitionState::Relaying);
    wait_until(
        Duration::from_secs(30),
        "the first instance owns its partitions",
        || async { (0..8).all(|p| relaying(&first, p)) },
    )
    .await;
    // A second instance starts while messages flow: the first lets half of the
    // partitions go between batches, and the second takes them.
    let second = RunningRelay::start(config);
    let mut expected = write_messages(&setup.outbox, &topic, &round_robin("a", 20, 100)).await;
    let owned = |r: &RunningRelay| (0..8).filter(|&p| relaying(r, p)).count();
    wait_until(
        Duration::from_secs(30),
        "the instances share the partitions",
        || async { owned(&first) == 4 && owned(&second) == 4 },
    )
    .await;
    for p in 0..8 {
        assert!(
            relaying(&first, p) != relaying(&second, p),
            "partition {p} has exactly one owner"
        );
    }
    setup.wait_drained("first messages retired").await;

    // The first one dies mid-stream; the second takes its partitions over.
    let writer = {
        let (outbox, topic) = (setup.outbox.clone(), topic.clone());
        tokio::spawn(
            async move { write_messages(&outbox, &topic, &round_robin("a", 20, 300)).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.kill().await;
    merge(&mut expected, writer.await.expect("writer"));
    setup.wait_drained("every message retired").await;
    // Idle partitions are taken over too, once the survivor has counted one instance.
    wait_until(
        Duration::from_secs(30),
        "the survivor relays every partition",
        || async { (0..8).all(|p| relaying(&second, p)) },
    )
    .await;
    second.stop().await;
    let records = outbox_testkit::topic_size(&topic);
    assert!(records >= 400, "at least once: {records} records");
    let consumed = outbox_testkit::consume(&topic, records, Duration::from_secs(60));
    assert_eq!(consumed.len(), records);
    let duplicates = outbox_testkit::assert_dedup_order(&consumed, &expected);
    println!(
        "two instances, one killed: {} consumed, {duplicates} duplicates dropped",
        consumed.len()
    );
    setup.cleanup().await;
}

/// The partitions of `relay` in `state`.
fn partitions_in(relay: &RunningRelay, count: i32, state: &PartitionState) -> Vec<i32> {
    (0..count)
        .filter(|&p| relay.state(p).as_ref() == Some(state))
        .collect()
}

/// Every partition below `count` is relayed by exactly one of `relays`, and they hold
/// `count / relays` each (give or take one).
fn settled(relays: &[&RunningRelay], count: i32) -> bool {
    let held: Vec<Vec<i32>> = relays
        .iter()
        .map(|r| partitions_in(r, count, &PartitionState::Relaying))
        .collect();
    let total: usize = held.iter().map(Vec::len).sum();
    let all: std::collections::BTreeSet<i32> = held.iter().flatten().copied().collect();
    let (min, max) = (
        held.iter().map(Vec::len).min().unwrap_or(0),
        held.iter().map(Vec::len).max().unwrap_or(0),
    );
    total == usize::try_from(count).unwrap_or(0) && all.len() == total && max - min <= 1
}

/// The stall the shared view removes: after the count is lowered, a long-running instance
/// used to keep its drained partitions above the count, and they used up its share, so a
/// joining instance and it could both sit "at their share" while a partition below the count
/// that holds messages had no owner. Now a drained partition above the count is let go, and
/// both instances share the partitions below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_count_lets_drained_partitions_go_and_a_joining_instance_gets_its_share() {
    let setup = Setup::new(16).await;
    let topic = outbox_testkit::create_topic("lowered", 3).await;
    let config = outboxd::Config {
        retry_max_ms: 300,
        ..setup.relay_config()
    };
    let first = RunningRelay::start(config.clone());
    wait_until(Duration::from_secs(30), "all 16 relayed", || async {
        partitions_in(&first, 16, &PartitionState::Relaying).len() == 16
    })
    .await;
    setup.set_partition_count(2).await;
    wait_until(
        Duration::from_secs(15),
        "partitions above the count let go",
        || async {
            partitions_in(&first, 16, &PartitionState::Idle) == (2..16).collect::<Vec<_>>()
        },
    )
    .await;
    let second = RunningRelay::start(config);
    wait_until(Duration::from_secs(15), "one partition each", || async {
        settled(&[&first, &second], 2)
    })
    .await;
    let expected = write_messages(&setup.outbox, &topic, &round_robin("fresh", 20, 200)).await;
    setup.wait_drained("every message relayed").await;
    first.stop().await;
    second.stop().await;
    assert_relayed(&topic, 200, &expected);
    setup.cleanup().await;
}

/// The other half of the stall: the count is raised while one instance runs, then a second
/// joins. Both work from the same count, run a worker for every partition below it, and
/// settle at half each with every partition owned once, before any message was written there
/// (before, the first instance's share came from the 8 partitions it served and 12 of the 32
/// had no owner).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_count_and_a_joining_instance_leave_no_partition_without_an_owner() {
    let setup = Setup::new(8).await;
    let topic = outbox_testkit::create_topic("raised", 4).await;
    let config = outboxd::Config {
        retry_max_ms: 300,
        ..setup.relay_config()
    };
    let first = RunningRelay::start(config.clone());
    wait_until(Duration::from_secs(30), "all 8 relayed", || async {
        partitions_in(&first, 8, &PartitionState::Relaying).len() == 8
    })
    .await;
    setup.set_partition_count(32).await;
    let second = RunningRelay::start(config);
    wait_until(
        Duration::from_secs(20),
        "16 each, every partition owned once",
        || async { settled(&[&first, &second], 32) },
    )
    .await;
    let expected = write_messages(&setup.outbox, &topic, &round_robin("spread", 200, 400)).await;
    setup.wait_drained("every message relayed").await;
    first.stop().await;
    second.stop().await;
    assert_relayed(&topic, 400, &expected);
    setup.cleanup().await;
}
