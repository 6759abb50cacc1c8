//! Races between writers and the relay's mapping cleanup, made deterministic by holding row
//! locks and waiting until a session is blocked on them.
//!
//! Under READ COMMITTED a statement that waits for a row lock and finds the row deleted when
//! the lock is granted simply skips the row. `enqueue_batch` locks the mappings of its
//! entities in one statement, so a mapping deleted between its creation (or discovery) and the
//! lock must not make the batch lose that entity's messages.

use std::time::Duration;

use outbox::Message;
use tokio_postgres::Client;

use crate::support::TestSchema;

/// Waits until the backend `pid` waits for a lock.
async fn wait_until_blocked(observer: &Client, pid: i32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let blocked: bool = observer
            .query_one(
                "SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if blocked {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writer never blocked on the held lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The mapping of `a` is held by another transaction while the batch waits for it; meanwhile
/// the cleanup deletes the (idle, unlocked) mapping of `b`, which the batch found before it
/// started locking. Today's failure: the lock pass returned no row for `b`, the insert joined
/// against it and silently left out `b`'s message.
#[tokio::test]
async fn a_batch_whose_mapping_is_deleted_before_it_is_locked_writes_every_message() {
    let mut t = TestSchema::new().await;
    let s = t.schema.name().to_owned();
    // Mappings for a and b exist and nothing of theirs waits: both are cleanup candidates.
    let tx = t.client.transaction().await.expect("begin");
    t.outbox
        .save_all_in_tx(
            &tx,
            &[
                Message::builder("t", "a").build().expect("valid"),
                Message::builder("t", "b").build().expect("valid"),
            ],
        )
        .await
        .expect("save");
    tx.commit().await.expect("commit");
    t.client
        .batch_execute(&format!("DELETE FROM {s}.message"))
        .await
        .expect("retire");

    // Another writer of `a` holds its mapping.
    let mut holder = t.other_connection().await;
    let held = holder.transaction().await.expect("begin");
    held.execute(
        &format!("SELECT 1 FROM {s}.entity_partition WHERE entity_key = 'a' FOR NO KEY UPDATE"),
        &[],
    )
    .await
    .expect("hold a");

    // The batch writer: finds both mappings, then waits for `a`.
    let mut writer = t.other_connection().await;
    let writer_pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let outbox = t.outbox.clone();
    let batch = tokio::spawn(async move {
        let tx = writer.transaction().await.expect("begin");
        let saved = outbox
            .save_all_in_tx(
                &tx,
                &[
                    Message::builder("t", "a")
                        .payload(b"a2".to_vec())
                        .build()
                        .expect("valid"),
                    Message::builder("t", "b")
                        .payload(b"b2".to_vec())
                        .build()
                        .expect("valid"),
                ],
            )
            .await;
        match saved {
            Ok(ids) => {
                tx.commit().await.expect("commit");
                Ok(ids)
            }
            Err(e) => Err(e),
        }
    });
    wait_until_blocked(&t.client, writer_pid).await;

    // The cleanup forgets `b` (not locked by anyone, nothing waiting).
    let deleted = t
        .client
        .execute(
            &format!("DELETE FROM {s}.entity_partition WHERE entity_key = 'b'"),
            &[],
        )
        .await
        .expect("cleanup");
    assert_eq!(deleted, 1);
    held.rollback().await.expect("release a");

    let ids = batch
        .await
        .expect("writer task")
        .expect("the batch is written whole, not refused");
    assert_eq!(ids.len(), 2, "an id for every message");
    let rows: Vec<(String, Option<Vec<u8>>)> = t
        .client
        .query(
            &format!("SELECT entity_key, payload FROM {s}.message ORDER BY id"),
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("a".to_owned(), Some(b"a2".to_vec())),
            ("b".to_owned(), Some(b"b2".to_vec()))
        ],
        "both messages written"
    );
    assert_eq!(
        t.count("entity_partition").await,
        2,
        "b was mapped again, and its writer held it until commit"
    );
    t.cleanup().await;
}

/// The same race through the SQL function a service in another language calls: it must never
/// return fewer ids than messages.
#[tokio::test]
async fn enqueue_batch_from_sql_never_returns_fewer_ids_than_messages() {
    let mut t = TestSchema::new().await;
    let s = t.schema.name().to_owned();
    let tx = t.client.transaction().await.expect("begin");
    t.outbox
        .save_all_in_tx(
            &tx,
            &[
                Message::builder("t", "a").build().expect("valid"),
                Message::builder("t", "b").build().expect("valid"),
            ],
        )
        .await
        .expect("save");
    tx.commit().await.expect("commit");
    t.client
        .batch_execute(&format!("DELETE FROM {s}.message"))
        .await
        .expect("retire");
    let mut holder = t.other_connection().await;
    let held = holder.transaction().await.expect("begin");
    held.execute(
        &format!("SELECT 1 FROM {s}.entity_partition WHERE entity_key = 'a' FOR NO KEY UPDATE"),
        &[],
    )
    .await
    .expect("hold a");
    let writer = t.other_connection().await;
    let writer_pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let sql = format!(
        "SELECT count(*) FROM {s}.enqueue_batch('{{t,t}}', '{{a,b}}', '{{x,y}}', '{{NULL,NULL}}', \
         '{{NULL,NULL}}', '{{NULL,NULL}}', '{{0,0}}', '{{0,0}}', '{{}}', '{{}}')"
    );
    let batch = tokio::spawn(async move {
        writer
            .query_one(&sql, &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    });
    wait_until_blocked(&t.client, writer_pid).await;
    t.client
        .execute(
            &format!("DELETE FROM {s}.entity_partition WHERE entity_key = 'b'"),
            &[],
        )
        .await
        .expect("cleanup");
    held.rollback().await.expect("release a");
    let returned = batch.await.expect("writer task").expect("enqueue_batch");
    assert_eq!(returned, 2, "one id per message");
    assert_eq!(t.count("message").await, 2);
    t.cleanup().await;
}
