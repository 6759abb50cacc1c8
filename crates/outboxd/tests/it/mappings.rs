//! Forgetting sticky mappings: only when no message of the entity waits and no writer holds
//! it; mappings above a lowered partition count go as soon as they are idle, so the removed
//! partitions drain and their entities move to the current count, in order.

use std::time::Duration;

use outbox::Message;
use outboxd::mappings::MappingCleanup;

use crate::support::{RunningRelay, Setup, wait_until, write_messages};

async fn mapped(setup: &Setup, entity: &str) -> Option<i32> {
    setup
        .client
        .query_opt(
            &format!(
                "SELECT partition FROM {}.entity_partition WHERE entity_key = $1",
                setup.schema
            ),
            &[&entity],
        )
        .await
        .expect("mapping")
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_mappings_without_waiting_messages_or_writers_are_forgotten() {
    let setup = Setup::new(4).await;
    let sql = outboxd::sql::Statements::new(&setup.schema);
    // "waiting" has a committed, unpublished message; "idle" and "writing" had one each,
    // already retired.
    write_messages(
        &setup.outbox,
        "t",
        &[
            ("waiting".into(), b"1".to_vec()),
            ("idle".into(), b"2".to_vec()),
            ("writing".into(), b"2".to_vec()),
        ],
    )
    .await;
    setup
        .client
        .execute(
            &format!(
                "DELETE FROM {}.message WHERE entity_key IN ('idle', 'writing')",
                setup.schema
            ),
            &[],
        )
        .await
        .expect("retire idle's message");
    // "writing" is being written again right now: its writer holds the mapping, and its
    // new message is not visible yet.
    let mut writer = outbox_testkit::connect().await;
    let tx = writer.transaction().await.expect("begin");
    let msg = Message::builder("t", "writing")
        .payload(b"3".to_vec())
        .build()
        .expect("valid");
    setup.outbox.save_in_tx(&tx, &msg).await.expect("save");

    let mut cleaner = outbox_testkit::connect().await;
    // Young mappings inside the partition count stay, whatever their state.
    let young = MappingCleanup::new(sql.clone(), Duration::from_secs(3600))
        .run_once(&mut cleaner)
        .await
        .expect("cleanup");
    assert_eq!(young, 0, "nothing is older than the TTL");
    let mut cleanup = MappingCleanup::new(sql, Duration::ZERO);
    let forgotten = cleanup.run_once(&mut cleaner).await.expect("cleanup");
    assert_eq!(forgotten, 1);
    assert_eq!(mapped(&setup, "idle").await, None, "idle entity forgotten");
    assert!(
        mapped(&setup, "waiting").await.is_some(),
        "a waiting message keeps it"
    );
    assert!(
        mapped(&setup, "writing").await.is_some(),
        "a writer's lock keeps it"
    );

    tx.commit().await.expect("commit");
    let again = cleanup.run_once(&mut cleaner).await.expect("cleanup");
    assert_eq!(again, 0, "the committed message now keeps it");
    assert!(mapped(&setup, "writing").await.is_some());
    // The forgotten entity maps again on its next message.
    write_messages(&setup.outbox, "t", &[("idle".into(), b"4".to_vec())]).await;
    assert!(mapped(&setup, "idle").await.is_some());
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_count_drains_the_removed_partitions_and_moves_their_entities_in_order() {
    let setup = Setup::new(8).await;
    let topic = outbox_testkit::create_topic("remap", 3).await;
    let entities: Vec<String> = (0..20).map(|i| format!("e-{i}")).collect();
    let first: Vec<(String, Vec<u8>)> = entities
        .iter()
        .map(|e| (e.clone(), b"before".to_vec()))
        .collect();
    let mut expected = write_messages(&setup.outbox, &topic, &first).await;
    let mut above = Vec::new();
    for e in &entities {
        if mapped(&setup, e).await.is_some_and(|p| p >= 2) {
            above.push(e.clone());
        }
    }
    assert!(!above.is_empty(), "some entities live in partitions 2..8");
    setup.set_partition_count(2).await;

    // The relay publishes what waits, then the cleanup forgets the idle mappings above 2.
    let relay = RunningRelay::start(outboxd::Config {
        mapping_cleanup_interval_ms: 100,
        ..setup.relay_config()
    });
    wait_until(
        Duration::from_secs(60),
        "mappings above the count forgotten",
        || async {
            let mut all_gone = true;
            for e in &above {
                all_gone &= mapped(&setup, e).await.is_none();
            }
            all_gone
        },
    )
    .await;
    let second: Vec<(String, Vec<u8>)> = above
        .iter()
        .map(|e| (e.clone(), b"after".to_vec()))
        .collect();
    let moved = write_messages(&setup.outbox, &topic, &second).await;
    for e in &above {
        let p = mapped(&setup, e).await.expect("mapped again");
        assert!(p < 2, "{e} now lives in partition {p}, below the count");
    }
    for (k, v) in moved {
        expected.entry(k).or_default().extend(v);
    }
    setup.wait_drained("every message retired").await;
    relay.stop().await;
    let total = entities.len() + above.len();
    let consumed = outbox_testkit::consume(&topic, total, Duration::from_secs(60));
    assert_eq!(consumed.len(), total);
    outbox_testkit::assert_dedup_order(&consumed, &expected);
    setup.cleanup().await;
}

/// Saves one message per key in one batch (in one transaction).
async fn write_batch(setup: &Setup, keys: &[String]) {
    let mut client = outbox_testkit::connect().await;
    let tx = client.transaction().await.expect("begin");
    let msgs: Vec<Message> = keys
        .iter()
        .map(|k| Message::builder("t", k.as_str()).build().expect("valid"))
        .collect();
    setup.outbox.save_all_in_tx(&tx, &msgs).await.expect("save");
    tx.commit().await.expect("commit");
}

/// More candidates than one run checks come first in key order and must stay (a message of
/// each waits); the idle mapping behind them is still forgotten, by a later run that goes on
/// where the previous one stopped. Before the fix every run started from the first key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cleanup_gets_past_candidates_that_must_stay() {
    let setup = Setup::new(4).await;
    let waiting: Vec<String> = (0..10_500).map(|i| format!("a-{i:05}")).collect();
    write_batch(&setup, &waiting).await;
    write_batch(&setup, &["z-idle".to_owned()]).await;
    setup
        .client
        .execute(
            &format!(
                "DELETE FROM {}.message WHERE entity_key = 'z-idle'",
                setup.schema
            ),
            &[],
        )
        .await
        .expect("retire z-idle's message");
    let mut cleaner = outbox_testkit::connect().await;
    let mut cleanup =
        MappingCleanup::new(outboxd::sql::Statements::new(&setup.schema), Duration::ZERO);
    let mut forgotten = 0;
    for _ in 0..3 {
        forgotten += cleanup.run_once(&mut cleaner).await.expect("cleanup");
    }
    assert_eq!(forgotten, 1, "the idle mapping behind the waiting ones");
    assert_eq!(mapped(&setup, "z-idle").await, None);
    assert!(mapped(&setup, "a-00000").await.is_some());
    setup.cleanup().await;
}

/// An entity that keeps writing is not forgotten at the TTL: its mapping's age is its last
/// use, not its creation. (Before the fix, every mapping became a candidate a TTL after it
/// was created, however busy its entity.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_entity_is_not_forgotten_at_the_ttl() {
    let setup = Setup::new(4).await;
    write_batch(&setup, &["busy".to_owned(), "idle".to_owned()]).await;
    setup
        .client
        .batch_execute(&format!(
            "UPDATE {s}.entity_partition SET created_at = now() - interval '3 days',
                                             last_used_at = now() - interval '3 days';
             DELETE FROM {s}.message;",
            s = setup.schema
        ))
        .await
        .expect("age both mappings");
    // `busy` writes again (its message is then retired); `idle` does not.
    write_batch(&setup, &["busy".to_owned()]).await;
    setup
        .client
        .execute(&format!("DELETE FROM {}.message", setup.schema), &[])
        .await
        .expect("retire");
    let mut cleaner = outbox_testkit::connect().await;
    let forgotten = MappingCleanup::new(
        outboxd::sql::Statements::new(&setup.schema),
        Duration::from_secs(86_400),
    )
    .run_once(&mut cleaner)
    .await
    .expect("cleanup");
    assert_eq!(forgotten, 1);
    assert_eq!(mapped(&setup, "idle").await, None, "idle for three days");
    assert!(mapped(&setup, "busy").await.is_some(), "used just now");
    setup.cleanup().await;
}

/// Batch writers calling `enqueue_batch` from SQL (as a service in another language does)
/// race a cleanup with TTL 0 over a small key space, so mappings are forgotten and created
/// again all the time. Every committed message arrives, in commit order per entity. Commit
/// order comes from the database: each transaction bumps a per-entity counter row, whose lock
/// is held until commit, and its messages carry the counter's values. Before the fix the batch
/// function silently left out the messages of an entity whose mapping the cleanup deleted
/// between its creation and its lock (about 1% of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_writers_racing_a_ttl_zero_cleanup_lose_nothing() {
    const WRITERS: usize = 4;
    const TRANSACTIONS: usize = 120;
    const KEYS: usize = 8;
    let setup = Setup::new(4).await;
    let s = setup.schema.name().to_owned();
    let topic = outbox_testkit::create_topic("race", 3).await;
    setup
        .client
        .batch_execute(&format!(
            "CREATE TABLE {s}.entity_seq (entity text PRIMARY KEY, seq bigint NOT NULL);
             INSERT INTO {s}.entity_seq SELECT 'k' || i, 0 FROM generate_series(0, {}) i;",
            KEYS - 1
        ))
        .await
        .expect("counters");
    let relay = RunningRelay::start(outboxd::Config {
        mapping_cleanup_interval_ms: 5,
        mapping_ttl_s: 0,
        ..setup.relay_config()
    });
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (s, topic) = (s.clone(), topic.clone());
        writers.push(tokio::spawn(async move {
            let mut client = outbox_testkit::connect().await;
            for t in 0..TRANSACTIONS {
                // 20 messages over a few entities, in a writer-specific order.
                let keys: Vec<String> = (0..20)
                    .map(|i| format!("k{}", (i * 3 + t + w) % KEYS))
                    .collect();
                let mut per_entity: std::collections::BTreeMap<&str, i64> = Default::default();
                for k in &keys {
                    *per_entity.entry(k.as_str()).or_default() += 1;
                }
                let tx = client.transaction().await.expect("begin");
                let mut next: std::collections::HashMap<&str, i64> = Default::default();
                for (k, n) in &per_entity {
                    let top: i64 = tx
                        .query_one(
                            &format!(
                                "UPDATE {s}.entity_seq SET seq = seq + $2 WHERE entity = $1 RETURNING seq"
                            ),
                            &[k, n],
                        )
                        .await
                        .expect("counter")
                        .get(0);
                    next.insert(k, top - n + 1);
                }
                let payloads: Vec<Vec<u8>> = keys
                    .iter()
                    .map(|k| {
                        let seq = next.get_mut(k.as_str()).expect("counted");
                        *seq += 1;
                        (*seq - 1).to_string().into_bytes()
                    })
                    .collect();
                let topics = vec![topic.as_str(); keys.len()];
                let nulls_b: Vec<Option<Vec<u8>>> = vec![None; keys.len()];
                let nulls_i: Vec<Option<i32>> = vec![None; keys.len()];
                let nulls_t: Vec<Option<String>> = vec![None; keys.len()];
                let zeros = vec![0i32; keys.len()];
                let empty_t: Vec<String> = Vec::new();
                let empty_b: Vec<Vec<u8>> = Vec::new();
                let ids = tx
                    .query(
                        &format!(
                            "SELECT {s}.enqueue_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                        ),
                        &[
                            &topics, &keys, &payloads, &nulls_b, &nulls_i, &nulls_t, &zeros,
                            &zeros, &empty_t, &empty_b,
                        ],
                    )
                    .await
                    .expect("enqueue_batch");
                assert_eq!(ids.len(), keys.len(), "one id per message");
                tx.commit().await.expect("commit");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    setup.wait_drained("every message retired").await;
    relay.stop().await;
    let committed: Vec<(String, i64)> = setup
        .client
        .query(&format!("SELECT entity, seq FROM {s}.entity_seq"), &[])
        .await
        .expect("counters")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let total: i64 = committed.iter().map(|(_, n)| n).sum();
    assert_eq!(total as usize, WRITERS * TRANSACTIONS * 20);
    let size = outbox_testkit::topic_size(&topic);
    assert!(
        size >= total as usize,
        "{size} records for {total} messages"
    );
    let consumed = outbox_testkit::consume(&topic, size, Duration::from_secs(60));
    assert_eq!(consumed.len(), size);
    // What a consumer that drops every outbox-id not above the entity's last one keeps.
    let mut kept: std::collections::HashMap<String, (i64, Vec<i64>)> = Default::default();
    for m in &consumed {
        let entity = m.header("outbox-entity-key").expect("entity header");
        let id = crate::support::outbox_id(m);
        let seq: i64 = String::from_utf8_lossy(m.payload.as_deref().unwrap_or_default())
            .parse()
            .expect("seq payload");
        let (last, seqs) = kept.entry(entity).or_insert((0, Vec::new()));
        if id > *last {
            *last = id;
            seqs.push(seq);
        }
    }
    for (entity, n) in committed {
        let seqs = kept
            .get(&entity)
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "entity {entity}: every committed message, in commit order"
        );
    }
    setup.cleanup().await;
}
