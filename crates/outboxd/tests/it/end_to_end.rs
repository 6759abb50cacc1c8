//! The walking skeleton's acceptance test: 16 concurrent writers, 200 entities, 20,000
//! committed messages and about 10% of the transactions rolled back, relayed to a real Kafka
//! broker and consumed back.
//!
//! Commit order per entity is recorded independently of the outbox: after `save_in_tx`,
//! each transaction increments its entity's counter row, whose row lock is held until
//! commit, so the counter value is the transaction's position in that entity's commit
//! order. The consumed messages of every entity must carry 1, 2, 3, ... in that order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox::Message;
use rand::Rng;

use crate::support::{RunningRelay, Setup, outbox_id};

const WRITERS: usize = 16;
const ENTITIES: usize = 200;
const COMMITTED: usize = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_with_rollbacks_arrive_complete_and_in_commit_order() {
    let setup = Setup::new(8).await;
    let s = setup.schema.clone();
    setup
        .client
        .batch_execute(&format!(
            "CREATE TABLE {s}.entity_counter (entity text PRIMARY KEY, n integer NOT NULL);
             INSERT INTO {s}.entity_counter SELECT 'entity-' || i, 0 FROM generate_series(0, {last}) i;
             CREATE TABLE {s}.committed (token text PRIMARY KEY, entity text NOT NULL, n integer NOT NULL);",
            last = ENTITIES - 1
        ))
        .await
        .expect("test tables");
    let topic = outbox_testkit::create_topic("e2e", 6).await;
    let relay = RunningRelay::start(outboxd::Config {
        batch_size: 500,
        ..setup.relay_config()
    });

    let slots = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (slots, outbox, topic, s) = (
            slots.clone(),
            setup.outbox.clone(),
            topic.clone(),
            s.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut client = outbox_testkit::connect().await;
            let mut rolled_back = Vec::new();
            let mut seq = 0u64;
            loop {
                let (entity, rollback, pause) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..ENTITIES),
                        rng.random_bool(0.1),
                        rng.random_bool(0.05),
                    )
                };
                if !rollback && slots.fetch_add(1, Ordering::SeqCst) >= COMMITTED {
                    return rolled_back;
                }
                seq += 1;
                let token = format!("w{w}-{seq}");
                let entity = format!("entity-{entity}");
                let tx = client.transaction().await.expect("begin");
                let msg = Message::builder(topic.as_str(), entity.as_str())
                    .payload(token.clone().into_bytes())
                    .build()
                    .expect("valid");
                outbox.save_in_tx(&tx, &msg).await.expect("save");
                if pause {
                    // Hold the transaction open a little so others queue up behind it.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let n: i32 = tx
                    .query_one(
                        &format!(
                            "UPDATE {s}.entity_counter SET n = n + 1 WHERE entity = $1 RETURNING n"
                        ),
                        &[&entity],
                    )
                    .await
                    .expect("counter")
                    .get(0);
                tx.execute(
                    &format!("INSERT INTO {s}.committed VALUES ($1, $2, $3)"),
                    &[&token, &entity, &n],
                )
                .await
                .expect("record");
                if rollback {
                    tx.rollback().await.expect("rollback");
                    rolled_back.push(token);
                } else {
                    tx.commit().await.expect("commit");
                }
            }
        }));
    }
    let mut rolled_back = HashSet::new();
    for w in writers {
        rolled_back.extend(w.await.expect("writer"));
    }
    assert!(
        rolled_back.len() > COMMITTED / 20,
        "about 10% rolled back: {}",
        rolled_back.len()
    );

    let consumed = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || outbox_testkit::consume(&topic, COMMITTED, Duration::from_secs(180))
    })
    .await
    .expect("consumer");
    // Give a duplicate or a rolled-back message the chance to show up before judging.
    let extra = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || outbox_testkit::consume(&topic, COMMITTED + 1, Duration::from_secs(3))
    })
    .await
    .expect("consumer");
    relay.stop().await;

    let committed: HashMap<String, (String, i32)> = setup
        .client
        .query(&format!("SELECT token, entity, n FROM {s}.committed"), &[])
        .await
        .expect("committed")
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(committed.len(), COMMITTED);
    assert_eq!(consumed.len(), COMMITTED, "every committed message arrives");
    assert_eq!(
        extra.len(),
        COMMITTED,
        "no duplicates and no rolled-back messages arrive"
    );

    let mut seen_tokens = HashSet::new();
    let mut by_entity: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
    let mut entity_partition: HashMap<String, i32> = HashMap::new();
    for m in &consumed {
        let token = String::from_utf8(m.payload.clone().expect("payload")).expect("utf8");
        assert!(
            !rolled_back.contains(&token),
            "rolled-back message {token} was published"
        );
        let (entity, n) = committed
            .get(&token)
            .unwrap_or_else(|| panic!("unknown message {token}"));
        assert!(seen_tokens.insert(token.clone()), "duplicate {token}");
        assert_eq!(m.key.as_deref(), Some(entity.as_bytes()), "keyed by entity");
        assert_eq!(
            m.header("outbox-entity-key").as_deref(),
            Some(entity.as_str())
        );
        let p = *entity_partition
            .entry(entity.clone())
            .or_insert(m.partition);
        assert_eq!(p, m.partition, "all of {entity} in one Kafka partition");
        by_entity
            .entry(entity.clone())
            .or_default()
            .push((*n, outbox_id(m)));
    }
    // Within one Kafka partition the consumer sees offset order, so each entity's list is in
    // publish order: it must be its commit order 1, 2, 3, ... with increasing outbox ids.
    for (entity, seq) in &by_entity {
        let ns: Vec<i32> = seq.iter().map(|(n, _)| *n).collect();
        let expected: Vec<i32> = (1..=ns.len() as i32).collect();
        assert_eq!(ns, expected, "{entity} arrived out of commit order");
        assert!(
            seq.windows(2).all(|w| w[0].1 < w[1].1),
            "{entity}: outbox ids increase"
        );
    }
    assert_eq!(setup.remaining().await, 0, "all messages retired");
    setup.cleanup().await;
}
