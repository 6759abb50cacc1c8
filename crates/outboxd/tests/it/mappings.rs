//! Forgetting sticky mappings: only when no message of the entity waits and no writer holds
//! it; mappings above a lowered partition count go as soon as they are idle, so the removed
//! partitions drain and their entities move to the current count, in order.

use std::time::Duration;

use outbox::Message;

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
    let young = outboxd::mappings::forget_mappings(&mut cleaner, &sql, Duration::from_secs(3600))
        .await
        .expect("cleanup");
    assert_eq!(young, 0, "nothing is older than the TTL");
    let forgotten = outboxd::mappings::forget_mappings(&mut cleaner, &sql, Duration::ZERO)
        .await
        .expect("cleanup");
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
    let again = outboxd::mappings::forget_mappings(&mut cleaner, &sql, Duration::ZERO)
        .await
        .expect("cleanup");
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
