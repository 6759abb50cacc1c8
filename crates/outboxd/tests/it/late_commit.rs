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
