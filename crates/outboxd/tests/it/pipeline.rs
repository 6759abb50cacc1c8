//! Pipelined batches against the real broker: with one message per batch and eight batches
//! in flight, a message Kafka refuses for good while the batches behind it are already on
//! their way never lets a later message of its entity through, neither in the same lane
//! (the idempotent producer fails everything behind it) nor in another lane (such a batch
//! does not join the ones in flight), and the policies act as for a batch sent alone.

use std::time::Duration;

use outboxd::ErrorPolicy;
use outboxd::health::PartitionState;
use rand::Rng;

use crate::support::{RunningRelay, Setup, wait_until, write_messages};

/// What a consumer de-duplicating by payload sees of `entity` on `topic`, in order.
fn seen(topic: &str, entity: &str) -> Vec<String> {
    let size = outbox_testkit::topic_size(topic);
    let mut out: Vec<String> = Vec::new();
    for m in outbox_testkit::consume(topic, size, Duration::from_secs(30)) {
        let p = String::from_utf8_lossy(m.payload.as_deref().unwrap_or_default()).into_owned();
        if m.header("outbox-entity-key").as_deref() == Some(entity) && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

struct Scenario {
    setup: Setup,
    relay: RunningRelay,
    /// Refuses record batches above 20,000 bytes.
    small: String,
    other: String,
    a2: i64,
}

/// One virtual partition, one message per batch, eight batches in flight. Both topics have
/// had a message acknowledged (so batches for them may join others in flight). Then, in one
/// transaction (one window): A1 (small), A2 (50 KB of random bytes to `small`: the broker
/// refuses it), A3 (small), A4 (`other`: another lane), C1 and C2 (`other`).
async fn scenario(policy: ErrorPolicy) -> Scenario {
    let setup = Setup::new(1).await;
    let small =
        outbox_testkit::create_topic_with("pipe-small", 1, &[("max.message.bytes", "20000")]).await;
    let other = outbox_testkit::create_topic("pipe-other", 1).await;
    let mut config = setup.relay_config();
    config.batch_size = 1;
    config.batches_in_flight = 8;
    config.retry_max_ms = 300;
    config
        .topics
        .insert(small.clone(), outboxd::TopicConfig { on_error: policy });
    write_messages(&setup.outbox, &small, &[("W".into(), b"w1".to_vec())]).await;
    write_messages(&setup.outbox, &other, &[("W".into(), b"w2".to_vec())]).await;
    let relay = RunningRelay::start(config);
    setup.wait_drained("the warm-up messages published").await;
    let big: Vec<u8> = (0..50_000).map(|_| rand::rng().random()).collect();
    let msg = |topic: &str, entity: &str, body: Vec<u8>| {
        outbox::Message::builder(topic, entity)
            .payload(body)
            .build()
            .expect("valid")
    };
    let batch = [
        msg(&small, "A", b"a1".to_vec()),
        msg(&small, "A", big),
        msg(&small, "A", b"a3".to_vec()),
        msg(&other, "A", b"a4".to_vec()),
        msg(&other, "C", b"c1".to_vec()),
        msg(&other, "C", b"c2".to_vec()),
    ];
    let mut client = outbox_testkit::connect().await;
    let tx = client.transaction().await.expect("begin");
    let ids = setup
        .outbox
        .save_all_in_tx(&tx, &batch)
        .await
        .expect("save");
    tx.commit().await.expect("commit");
    Scenario {
        setup,
        relay,
        small,
        other,
        a2: ids[1],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_in_flight_blocks_the_entity_in_every_lane() {
    let s = scenario(ErrorPolicy::Block).await;
    wait_until(Duration::from_secs(60), "blocked at A2", || {
        let state = s.relay.state(0);
        async move {
            matches!(state, Some(PartitionState::Blocked { message_id, .. }) if message_id == s.a2)
        }
    })
    .await;
    // Long enough for anything sent behind A2 to have been acknowledged.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(seen(&s.small, "A"), vec!["a1"], "A3 must not overtake A2");
    assert!(
        seen(&s.other, "A").is_empty(),
        "A4 (another lane) must not overtake A2"
    );
    // The operator moves A2 aside: the rest follows, in order.
    let sql = outboxd::sql::Statements::new(&s.setup.schema);
    s.setup
        .client
        .query(&sql.skip_message, &[&s.a2, &"too large"])
        .await
        .expect("skip");
    s.setup.wait_drained("the rest published").await;
    assert_eq!(seen(&s.small, "A"), vec!["a1", "a3"]);
    assert_eq!(seen(&s.other, "A"), vec!["a4"]);
    assert_eq!(seen(&s.other, "C"), vec!["c1", "c2"]);
    s.relay.stop().await;
    s.setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_in_flight_is_dead_lettered_and_the_rest_goes_on_in_order() {
    let s = scenario(ErrorPolicy::DeadLetter).await;
    s.setup
        .wait_drained("everything published or dead-lettered")
        .await;
    assert_eq!(seen(&s.small, "A"), vec!["a1", "a3"]);
    assert_eq!(seen(&s.other, "A"), vec!["a4"]);
    assert_eq!(seen(&s.other, "C"), vec!["c1", "c2"]);
    let dead: Vec<i64> = s
        .setup
        .client
        .query(
            &format!("SELECT id FROM {}.dead_letter", s.setup.schema.name()),
            &[],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(dead, vec![s.a2]);
    s.relay.stop().await;
    s.setup.cleanup().await;
}

/// Sixteen partitions share two sessions, batches of five, and every acknowledged batch is
/// deleted at once: a worker that kept its read session while waiting for another one to
/// delete with would, with the others doing the same, wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_smaller_than_the_partitions_never_deadlocks() {
    let setup = Setup::new(16).await;
    let topic = outbox_testkit::create_topic("pipe-pool", 4).await;
    let mut config = setup.relay_config();
    config.pool_size = 2;
    config.batch_size = 5;
    config.retire_interval_ms = 0;
    let relay = RunningRelay::start(config);
    let entities: Vec<(String, Vec<u8>)> = (0..3000)
        .map(|i| (format!("e{}", i % 300), format!("m{i}").into_bytes()))
        .collect();
    let writers: Vec<_> = entities
        .chunks(750)
        .map(|chunk| {
            let (outbox, topic, chunk) = (setup.outbox.clone(), topic.clone(), chunk.to_vec());
            tokio::spawn(async move { write_messages(&outbox, &topic, &chunk).await })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    setup.wait_drained("all 3,000 messages published").await;
    assert!(outbox_testkit::topic_size(&topic) >= 3000);
    relay.stop().await;
    setup.cleanup().await;
}

/// Every partition busy at once, with an instance budget of rows in flight far smaller
/// than what the partitions could hold (`batch_size` 5: eight batches, 40 rows, for 32
/// partitions with up to four batches each): first a backlog in every partition, then
/// single-message transactions from eight writers while it drains. Partitions wait for
/// their share without holding any (a partition with batches on their way waits for them,
/// not for the budget), so everything drains, each entity in order. A worker that waited
/// for the budget while its own batches held part of it could wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_instance_drains_within_its_row_budget() {
    let setup = Setup::new(32).await;
    let topic = outbox_testkit::create_topic("pipe-budget", 4).await;
    let entities: Vec<(String, Vec<u8>)> = (0..2000)
        .map(|i| (format!("e{}", i % 200), format!("{i:05}").into_bytes()))
        .collect();
    for chunk in entities[..1000].chunks(250) {
        write_messages(&setup.outbox, &topic, chunk).await;
    }
    let mut config = setup.relay_config();
    config.batch_size = 5;
    let relay = RunningRelay::start(config);
    // Writer w writes the messages i with i % 8 == w, one per transaction: an entity's
    // messages (i % 200) all come from one writer, in order.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (outbox, topic) = (setup.outbox.clone(), topic.clone());
            let mine: Vec<(String, Vec<u8>)> = entities[1000..]
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 8 == w)
                .map(|(_, m)| m.clone())
                .collect();
            tokio::spawn(async move {
                for m in mine {
                    write_messages(&outbox, &topic, &[m]).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    setup.wait_drained("all 2,000 messages published").await;
    relay.stop().await;
    let size = outbox_testkit::topic_size(&topic);
    let mut last: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut distinct = std::collections::HashSet::new();
    for m in outbox_testkit::consume(&topic, size, Duration::from_secs(30)) {
        let entity = m.header("outbox-entity-key").expect("entity header");
        let p = String::from_utf8_lossy(m.payload.as_deref().unwrap_or_default()).into_owned();
        if !distinct.insert(p.clone()) {
            continue; // a copy of one already seen
        }
        if let Some(previous) = last.get(&entity) {
            assert!(*previous < p, "entity {entity}: {p} after {previous}");
        }
        last.insert(entity, p);
    }
    assert_eq!(distinct.len(), 2000, "every message arrived");
    setup.cleanup().await;
}
