//! Hazard 1: commit order is not id order. A transaction takes a small id, stays open while
//! later ids are published, then commits: its message must still be published (a cursor
//! `id > last_published` would skip it forever), and before the entity's next message.

use std::time::Duration;

use outbox::Message;

use crate::support::{RunningRelay, Setup, outbox_id};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_id_committed_late_is_published_and_in_order() {
    // 50 later ids: the late window is walked in id order.
    late_commit_after(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_far_behind_the_head_is_read_through_the_xid_index_in_order() {
    // 1,250 later ids: the late rows are read first, through the (xid) index.
    late_commit_after(25).await;
}

/// A transaction writes one message, stays open while 50 transactions of `per_tx`
/// messages each are published, then commits; the entity writes once more.
async fn late_commit_after(per_tx: usize) {
    let others = 50 * per_tx;
    // One partition: the late message and the others share one reader and one cursor.
    let setup = Setup::new(1).await;
    let topic = outbox_testkit::create_topic("late", 3).await;
    let relay = RunningRelay::start(setup.relay_config());
    let msg = |entity: &str, body: &str| {
        Message::builder(topic.as_str(), entity)
            .payload(body.as_bytes().to_vec())
            .build()
            .expect("valid")
    };

    let mut late_client = outbox_testkit::connect().await;
    let late_tx = late_client.transaction().await.expect("begin");
    let late_id = setup
        .outbox
        .save_in_tx(&late_tx, &msg("late", "late-1"))
        .await
        .expect("save");

    let mut writer = outbox_testkit::connect().await;
    for i in 0..50 {
        let tx = writer.transaction().await.expect("begin");
        let batch: Vec<Message> = (0..per_tx)
            .map(|j| msg(&format!("other-{}", i % 5), &format!("other-{i}-{j}")))
            .collect();
        let ids = setup
            .outbox
            .save_all_in_tx(&tx, &batch)
            .await
            .expect("save");
        assert!(ids.iter().all(|&id| id > late_id));
        tx.commit().await.expect("commit");
    }
    let first = outbox_testkit::consume(&topic, others, Duration::from_secs(60));
    assert_eq!(
        first.len(),
        others,
        "the later ids are published while the early one is open"
    );
    assert!(first.iter().all(|m| outbox_id(m) > late_id));

    late_tx.commit().await.expect("late commit");
    let tx = writer.transaction().await.expect("begin");
    let next_id = setup
        .outbox
        .save_in_tx(&tx, &msg("late", "late-2"))
        .await
        .expect("save");
    tx.commit().await.expect("commit");

    let all = outbox_testkit::consume(&topic, others + 2, Duration::from_secs(60));
    relay.stop().await;
    assert_eq!(
        all.len(),
        others + 2,
        "the late message and the one after it arrive"
    );
    let late: Vec<(i64, Vec<u8>)> = all
        .iter()
        .filter(|m| m.key.as_deref() == Some(b"late".as_slice()))
        .map(|m| (outbox_id(m), m.payload.clone().expect("payload")))
        .collect();
    assert_eq!(
        late,
        vec![(late_id, b"late-1".to_vec()), (next_id, b"late-2".to_vec())],
        "late entity's messages arrive once each, in commit order"
    );
    assert_eq!(setup.remaining().await, 0);
    setup.cleanup().await;
}

/// Many late commits at once: slow transactions stay open for 50-250 ms while a bulk writer
/// takes thousands of ids, so their windows start far below the head and take the
/// late-row path, interleaved with ordinary windows. Every entity must arrive complete and
/// in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_late_commits_under_load_keep_every_entity_complete_and_in_order() {
    let setup = Setup::new(4).await;
    let topic = outbox_testkit::create_topic("late-load", 4).await;
    let relay = RunningRelay::start(setup.relay_config());
    let msg = |topic: &str, entity: &str, body: String| {
        Message::builder(topic, entity)
            .payload(body.into_bytes())
            .build()
            .expect("valid")
    };
    let bulk = {
        let (outbox, topic) = (setup.outbox.clone(), topic.clone());
        tokio::spawn(async move {
            let mut client = outbox_testkit::connect().await;
            let mut ids: std::collections::HashMap<String, Vec<i64>> = Default::default();
            for round in 0..60 {
                let batch: Vec<Message> = (0..100)
                    .map(|i| msg(&topic, &format!("bulk-{}", i % 50), format!("{round}-{i}")))
                    .collect();
                let tx = client.transaction().await.expect("begin");
                let saved = outbox.save_all_in_tx(&tx, &batch).await.expect("save");
                tx.commit().await.expect("commit");
                for (m, id) in batch.iter().zip(saved) {
                    ids.entry(m.entity_key().to_owned()).or_default().push(id);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        })
    };
    let mut slow = Vec::new();
    for k in 0..8u64 {
        let (outbox, topic) = (setup.outbox.clone(), topic.clone());
        slow.push(tokio::spawn(async move {
            let mut client = outbox_testkit::connect().await;
            let entity = format!("slow-{k}");
            let mut ids = Vec::new();
            for n in 0..6u64 {
                let tx = client.transaction().await.expect("begin");
                let id = outbox
                    .save_in_tx(&tx, &msg(&topic, &entity, format!("{n}")))
                    .await
                    .expect("save");
                tokio::time::sleep(Duration::from_millis(50 + (k * 37 + n * 53) % 200)).await;
                tx.commit().await.expect("commit");
                ids.push(id);
            }
            (entity, ids)
        }));
    }
    let mut expected = bulk.await.expect("bulk writer");
    for s in slow {
        let (entity, ids) = s.await.expect("slow writer");
        expected.insert(entity, ids);
    }
    let total: usize = expected.values().map(Vec::len).sum();
    assert_eq!(total, 6000 + 48);
    setup.wait_drained("every message retired").await;
    relay.stop().await;
    let consumed = outbox_testkit::consume(&topic, total, Duration::from_secs(60));
    assert_eq!(consumed.len(), total);
    outbox_testkit::assert_dedup_order(&consumed, &expected);
    setup.cleanup().await;
}
