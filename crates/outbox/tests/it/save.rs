//! `save_in_tx` inside the caller's transaction: visible only on commit, gone on rollback.

use outbox::Message;

use crate::support::TestSchema;

fn order_event(entity: &str, body: &str) -> Message {
    Message::builder("orders", entity)
        .payload(body.as_bytes().to_vec())
        .header("trace", b"abc".to_vec())
        .event_type("OrderCreated")
        .build()
        .expect("valid message")
}

#[tokio::test]
async fn rollback_leaves_no_message_and_no_mapping() {
    let mut t = TestSchema::new().await;
    let tx = t.client.transaction().await.expect("begin");
    let id = t
        .outbox
        .save_in_tx(&tx, &order_event("order-1", "x"))
        .await
        .expect("save");
    assert!(id > 0);
    tx.rollback().await.expect("rollback");
    assert_eq!(
        t.count("message").await,
        0,
        "rolled-back message must not exist"
    );
    assert_eq!(
        t.count("entity_partition").await,
        0,
        "rolled-back mapping must not exist"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn message_is_invisible_to_others_until_commit() {
    let mut t = TestSchema::new().await;
    let other = t.other_connection().await;
    let select = format!(
        "SELECT count(*) FROM {}.message WHERE entity_key = 'order-2'",
        t.schema
    );
    let tx = t.client.transaction().await.expect("begin");
    t.outbox
        .save_in_tx(&tx, &order_event("order-2", "x"))
        .await
        .expect("save");
    let before: i64 = other.query_one(&select, &[]).await.expect("count").get(0);
    assert_eq!(
        before, 0,
        "another session must not see an uncommitted message"
    );
    tx.commit().await.expect("commit");
    let after: i64 = other.query_one(&select, &[]).await.expect("count").get(0);
    assert_eq!(after, 1, "the message is visible once committed");
    t.cleanup().await;
}

#[tokio::test]
async fn saved_row_has_every_field_and_the_sticky_partition() {
    let mut t = TestSchema::new().await;
    let tx = t.client.transaction().await.expect("begin");
    let msg = Message::builder("orders", "order-3")
        .payload(b"{\"a\":1}".to_vec())
        .kafka_key(b"k3".to_vec())
        .kafka_partition(2)
        .header("h1", b"v1".to_vec())
        .header("h2", b"".to_vec())
        .event_type("OrderPaid")
        .build()
        .expect("valid");
    let id1 = t.outbox.save_in_tx(&tx, &msg).await.expect("save");
    let id2 = t
        .outbox
        .save_in_tx(&tx, &order_event("order-3", "second"))
        .await
        .expect("save");
    tx.commit().await.expect("commit");
    assert!(id2 > id1, "ids increase within a transaction");

    let row = t
        .client
        .query_one(
            &format!(
                "SELECT m.topic, m.entity_key, m.kafka_key, m.kafka_partition, m.payload,
                        m.header_names, m.header_values, m.event_type, m.partition, e.partition
                   FROM {s}.message m JOIN {s}.entity_partition e USING (entity_key)
                  WHERE m.id = $1",
                s = t.schema
            ),
            &[&id1],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "orders");
    assert_eq!(row.get::<_, String>(1), "order-3");
    assert_eq!(row.get::<_, Option<Vec<u8>>>(2), Some(b"k3".to_vec()));
    assert_eq!(row.get::<_, Option<i32>>(3), Some(2));
    assert_eq!(
        row.get::<_, Option<Vec<u8>>>(4),
        Some(b"{\"a\":1}".to_vec())
    );
    assert_eq!(row.get::<_, Vec<String>>(5), vec!["h1", "h2"]);
    assert_eq!(
        row.get::<_, Vec<Vec<u8>>>(6),
        vec![b"v1".to_vec(), Vec::new()]
    );
    assert_eq!(
        row.get::<_, Option<String>>(7),
        Some("OrderPaid".to_owned())
    );
    let partition: i32 = row.get(8);
    assert_eq!(
        partition,
        row.get::<_, i32>(9),
        "message uses the entity's mapped partition"
    );
    assert!((0..16).contains(&partition));
    t.cleanup().await;
}

#[tokio::test]
async fn batch_save_returns_ids_in_order_and_writes_all() {
    let mut t = TestSchema::new().await;
    let msgs: Vec<Message> = (0..50)
        .map(|i| {
            let mut b =
                Message::builder("orders", format!("order-{}", i % 7)).payload(vec![b'x'; i]);
            for h in 0..(i % 3) {
                b = b.header(format!("h{h}"), vec![h as u8]);
            }
            b.build().expect("valid")
        })
        .collect();
    let tx = t.client.transaction().await.expect("begin");
    let ids = t.outbox.save_all_in_tx(&tx, &msgs).await.expect("save all");
    tx.commit().await.expect("commit");
    assert_eq!(ids.len(), 50);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids follow input order: {ids:?}"
    );
    let rows = t
        .client
        .query(
            &format!(
                "SELECT id, entity_key, length(payload), header_names FROM {}.message ORDER BY id",
                t.schema
            ),
            &[],
        )
        .await
        .expect("rows");
    for (i, (row, id)) in rows.iter().zip(&ids).enumerate() {
        assert_eq!(row.get::<_, i64>(0), *id);
        assert_eq!(row.get::<_, String>(1), format!("order-{}", i % 7));
        assert_eq!(row.get::<_, Option<i32>>(2), Some(i as i32));
        assert_eq!(row.get::<_, Vec<String>>(3).len(), i % 3);
    }
    t.cleanup().await;
}

#[tokio::test]
async fn free_functions_need_a_migrated_outbox_schema_and_say_so() {
    // The default schema `outbox` does not exist in the test database: the error must name
    // the schema and the command that fixes it, and nothing may be written.
    let mut client = outbox_testkit::connect().await;
    let exists: bool = client
        .query_one("SELECT to_regnamespace('outbox') IS NOT NULL", &[])
        .await
        .expect("query")
        .get(0);
    assert!(
        !exists,
        "the test database must not have an `outbox` schema"
    );
    let tx = client.transaction().await.expect("begin");
    let err = outbox::save_in_tx(&tx, &order_event("order-9", "x"))
        .await
        .expect_err("must fail without a schema");
    let text = err.to_string();
    assert!(
        matches!(err, outbox::Error::SchemaNotReady { .. }),
        "{err:?}"
    );
    assert!(
        text.contains("\"outbox\"") && text.contains("outboxd migrate"),
        "{text}"
    );
    drop(tx);
    let err = outbox::check_schema(&client, &outbox::Schema::default())
        .await
        .expect_err("missing");
    assert!(err.to_string().contains("outboxd migrate"), "{err}");
}

#[tokio::test]
async fn migrate_is_idempotent_and_safe_when_run_concurrently() {
    let client = outbox_testkit::connect().await;
    let schema = outbox::Schema::new(outbox_testkit::unique_name("m")).expect("name");
    let mut runs = Vec::new();
    for _ in 0..4 {
        let schema = schema.clone();
        runs.push(tokio::spawn(async move {
            let c = outbox_testkit::connect().await;
            outbox::migrate_schema(&c, &schema).await
        }));
    }
    for r in runs {
        r.await.expect("join").expect("concurrent migrate succeeds");
    }
    outbox::migrate_schema(&client, &schema)
        .await
        .expect("again");
    outbox::check_schema(&client, &schema)
        .await
        .expect("schema ready");
    let applied: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {schema}.schema_migrations"),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        applied,
        i64::from(outbox::SCHEMA_VERSION),
        "each migration recorded once"
    );
    outbox_testkit::drop_schema(&client, schema.name()).await;
}

#[tokio::test]
async fn prepared_statements_write_the_same_rows() {
    let mut t = TestSchema::new().await;
    let prepared = t.outbox.prepare(&t.client).await.expect("prepare");
    let one = order_event("order-p", "one");
    let many = vec![
        order_event("order-p", "two"),
        order_event("order-q", "three"),
    ];
    let tx = t.client.transaction().await.expect("begin");
    let a = prepared.save_in_tx(&tx, &one).await.expect("prepared save");
    let b = prepared
        .save_all_in_tx(&tx, &many)
        .await
        .expect("prepared batch");
    let c = t.outbox.save_in_tx(&tx, &one).await.expect("text save");
    tx.commit().await.expect("commit");
    assert!(a < b[0] && b[0] < b[1] && b[1] < c);
    type Row = (String, Vec<u8>, Vec<String>, Option<String>);
    let rows: Vec<Row> = t
        .client
        .query(
            &format!(
                "SELECT entity_key, payload, header_names, event_type FROM {}.message ORDER BY id",
                t.schema
            ),
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let expect = |e: &str, p: &str| {
        (
            e.to_owned(),
            p.as_bytes().to_vec(),
            vec!["trace".to_owned()],
            Some("OrderCreated".to_owned()),
        )
    };
    assert_eq!(
        rows,
        vec![
            expect("order-p", "one"),
            expect("order-p", "two"),
            expect("order-q", "three"),
            expect("order-p", "one")
        ]
    );
    t.cleanup().await;
}
