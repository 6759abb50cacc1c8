//! The write path's semantics: sticky mapping, commit-ordered ids under concurrency,
//! savepoints, and agreement between the SQL function and the Rust API.

use std::collections::HashMap;

use outbox::Message;

use crate::support::TestSchema;

fn msg(entity: &str) -> Message {
    Message::builder("orders", entity)
        .payload(b"p".to_vec())
        .build()
        .expect("valid")
}

async fn set_partition_count(t: &TestSchema, n: i32) {
    t.client
        .execute(
            &format!("UPDATE {}.settings SET partition_count = $1", t.schema),
            &[&n],
        )
        .await
        .expect("set partition count");
}

async fn save_batch(t: &mut TestSchema, msgs: &[Message]) {
    let tx = t.client.transaction().await.expect("begin");
    t.outbox.save_all_in_tx(&tx, msgs).await.expect("save");
    tx.commit().await.expect("commit");
}

/// The partition of every message row, per entity.
async fn partitions_by_entity(t: &TestSchema) -> HashMap<String, Vec<i32>> {
    let mut out: HashMap<String, Vec<i32>> = HashMap::new();
    for row in t
        .client
        .query(
            &format!(
                "SELECT entity_key, partition FROM {}.message ORDER BY id",
                t.schema
            ),
            &[],
        )
        .await
        .expect("rows")
    {
        out.entry(row.get(0)).or_default().push(row.get(1));
    }
    out
}

#[tokio::test]
async fn an_entity_keeps_its_partition_across_a_partition_count_change() {
    let mut t = TestSchema::new().await;
    set_partition_count(&t, 4).await;
    let old: Vec<Message> = (0..200).map(|i| msg(&format!("old-{i}"))).collect();
    save_batch(&mut t, &old).await;
    set_partition_count(&t, 7).await;
    // The old entities write again (through both APIs), and new entities appear.
    save_batch(&mut t, &old).await;
    {
        let tx = t.client.transaction().await.expect("begin");
        for m in old.iter().take(50) {
            t.outbox.save_in_tx(&tx, m).await.expect("save");
        }
        tx.commit().await.expect("commit");
    }
    let new: Vec<Message> = (0..200).map(|i| msg(&format!("new-{i}"))).collect();
    save_batch(&mut t, &new).await;

    let by_entity = partitions_by_entity(&t).await;
    for (entity, parts) in &by_entity {
        assert!(
            parts.windows(2).all(|w| w[0] == w[1]),
            "{entity} moved: {parts:?}"
        );
        if entity.starts_with("old-") {
            assert!(
                parts[0] < 4,
                "{entity} was mapped under count 4: {}",
                parts[0]
            );
        }
    }
    let new_high = by_entity
        .iter()
        .filter(|(e, p)| e.starts_with("new-") && p[0] >= 4)
        .count();
    assert!(
        new_high > 40,
        "new entities use the new partitions 4..7: {new_high} of 200"
    );
    assert!(by_entity.values().all(|p| p[0] < 7));
    t.cleanup().await;
}

#[tokio::test]
async fn new_entities_spread_evenly_over_the_partitions() {
    let mut t = TestSchema::new().await;
    set_partition_count(&t, 16).await;
    for chunk in 0..10 {
        let msgs: Vec<Message> = (0..1000)
            .map(|i| msg(&format!("customer-{}", chunk * 1000 + i)))
            .collect();
        save_batch(&mut t, &msgs).await;
    }
    let counts: Vec<i64> = t
        .client
        .query(
            &format!(
                "SELECT count(*) FROM {}.entity_partition GROUP BY partition ORDER BY partition",
                t.schema
            ),
            &[],
        )
        .await
        .expect("counts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(counts.len(), 16, "every partition used: {counts:?}");
    assert_eq!(counts.iter().sum::<i64>(), 10_000);
    let (max, min) = (
        *counts.iter().max().unwrap_or(&0),
        *counts.iter().min().unwrap_or(&1),
    );
    // 625 expected per partition; a fair hash stays well within 20% either way.
    assert!(
        max as f64 / min as f64 <= 1.3,
        "uneven spread max {max} / min {min}: {counts:?}"
    );
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_one_entity_get_ids_in_commit_order() {
    let t = TestSchema::new().await;
    let s = t.schema.clone();
    t.client
        .batch_execute(&format!(
            "CREATE TABLE {s}.commit_order (entity text PRIMARY KEY, n integer NOT NULL);
             INSERT INTO {s}.commit_order SELECT 'entity-' || i, 0 FROM generate_series(0, 3) i;
             CREATE TABLE {s}.observed (id bigint PRIMARY KEY, entity text NOT NULL, n integer NOT NULL);"
        ))
        .await
        .expect("tables");
    let mut tasks = Vec::new();
    for task in 0..64 {
        let (outbox, s) = (t.outbox.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = outbox_testkit::connect().await;
            for i in 0..10 {
                let entity = format!("entity-{}", (task + i) % 4);
                let tx = client.transaction().await.expect("begin");
                let id = outbox.save_in_tx(&tx, &msg(&entity)).await.expect("save");
                // The counter's row lock is held to commit: n is this transaction's place in
                // the entity's commit order, recorded independently of the outbox.
                let n: i32 = tx
                    .query_one(
                        &format!(
                            "UPDATE {s}.commit_order SET n = n + 1 WHERE entity = $1 RETURNING n"
                        ),
                        &[&entity],
                    )
                    .await
                    .expect("counter")
                    .get(0);
                tx.execute(
                    &format!("INSERT INTO {s}.observed VALUES ($1, $2, $3)"),
                    &[&id, &entity, &n],
                )
                .await
                .expect("observe");
                tx.commit().await.expect("commit");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    let rows = t
        .client
        .query(
            &format!("SELECT entity, id FROM {s}.observed ORDER BY entity, n"),
            &[],
        )
        .await
        .expect("observed");
    assert_eq!(rows.len(), 640);
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in rows {
        let (entity, id): (String, i64) = (r.get(0), r.get(1));
        if let Some(prev) = last.insert(entity.clone(), id) {
            assert!(id > prev, "{entity}: id {id} committed after id {prev}");
        }
    }
    t.cleanup().await;
}

#[tokio::test]
async fn rolling_back_a_savepoint_removes_only_later_messages() {
    let mut t = TestSchema::new().await;
    let tx = t.client.transaction().await.expect("begin");
    let a = t
        .outbox
        .save_in_tx(&tx, &msg("before"))
        .await
        .expect("save");
    tx.batch_execute("SAVEPOINT sp").await.expect("savepoint");
    t.outbox
        .save_in_tx(&tx, &msg("inside"))
        .await
        .expect("save");
    t.outbox
        .save_all_in_tx(&tx, &[msg("inside-batch"), msg("before")])
        .await
        .expect("save");
    tx.batch_execute("ROLLBACK TO SAVEPOINT sp")
        .await
        .expect("rollback to");
    let c = t.outbox.save_in_tx(&tx, &msg("after")).await.expect("save");
    tx.commit().await.expect("commit");
    let ids: Vec<(i64, String)> = t
        .client
        .query(
            &format!(
                "SELECT id, entity_key FROM {}.message ORDER BY id",
                t.schema
            ),
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(ids, vec![(a, "before".to_owned()), (c, "after".to_owned())]);
    let mappings: Vec<String> = t
        .client
        .query(
            &format!(
                "SELECT entity_key FROM {}.entity_partition ORDER BY 1",
                t.schema
            ),
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        mappings,
        vec!["after", "before"],
        "mappings of rolled-back entities are gone"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn sql_function_and_rust_api_write_identical_rows() {
    let mut t = TestSchema::new().await;
    let s = t.schema.name().to_owned();
    let rust = Message::builder("orders", "order-7")
        .payload(b"{\"total\":12}".to_vec())
        .header("a", b"1".to_vec())
        .header("b", b"two".to_vec())
        .event_type("OrderPlaced")
        .build()
        .expect("valid");
    let plain = Message::builder("orders", "order-8")
        .payload(b"x".to_vec())
        .build()
        .expect("valid");
    let tx = t.client.transaction().await.expect("begin");
    let r1 = t.outbox.save_in_tx(&tx, &rust).await.expect("rust");
    let r2 = t
        .outbox
        .save_all_in_tx(&tx, std::slice::from_ref(&plain))
        .await
        .expect("rust batch")[0];
    let s1: i64 = tx
        .query_one(
            &format!("SELECT {s}.save_message('orders', 'order-7', '{{\"total\":12}}'::bytea, '{{\"b\":\"two\",\"a\":\"1\"}}', 'OrderPlaced')"),
            &[],
        )
        .await
        .expect("sql")
        .get(0);
    let s2: i64 = tx
        .query_one(
            &format!("SELECT {s}.save_message('orders', 'order-8', 'x'::bytea)"),
            &[],
        )
        .await
        .expect("sql")
        .get(0);
    tx.commit().await.expect("commit");
    let row = |id: i64| {
        let client = &t.client;
        let s = s.clone();
        async move {
            let r = client
                .query_one(
                    &format!(
                        "SELECT partition, topic, entity_key, kafka_key, kafka_partition, payload,
                                header_names, header_values, event_type
                           FROM {s}.message WHERE id = $1"
                    ),
                    &[&id],
                )
                .await
                .expect("row");
            (
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, Option<Vec<u8>>>(3),
                r.get::<_, Option<i32>>(4),
                r.get::<_, Option<Vec<u8>>>(5),
                r.get::<_, Vec<String>>(6),
                r.get::<_, Vec<Vec<u8>>>(7),
                r.get::<_, Option<String>>(8),
            )
        }
    };
    assert_eq!(
        row(r1).await,
        row(s1).await,
        "save_in_tx and save_message agree"
    );
    assert_eq!(
        row(r2).await,
        row(s2).await,
        "save_all_in_tx and save_message agree"
    );
    t.cleanup().await;
}

/// How long ago each entity's mapping was last used, in minutes (rounded).
async fn minutes_since_use(t: &TestSchema) -> HashMap<String, i64> {
    t.client
        .query(
            &format!(
                "SELECT entity_key, round(extract(epoch FROM now() - last_used_at) / 60)::int8
                   FROM {}.entity_partition",
                t.schema
            ),
            &[],
        )
        .await
        .expect("mappings")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// "Idle for the TTL" must mean idle: every write keeps the mapping's last use recent, within
/// one touch interval (an hour), through both APIs, and a write does not rewrite a mapping
/// used recently (one update an hour per busy entity, not one per message).
#[tokio::test]
async fn writes_keep_the_mapping_last_use_fresh_at_most_once_an_hour() {
    let mut t = TestSchema::new().await;
    save_batch(&mut t, &[msg("single"), msg("batched"), msg("recent")]).await;
    t.client
        .batch_execute(&format!(
            "UPDATE {s}.entity_partition SET last_used_at = now() - interval '3 hours'
              WHERE entity_key IN ('single', 'batched');
             UPDATE {s}.entity_partition SET last_used_at = now() - interval '30 minutes'
              WHERE entity_key = 'recent';",
            s = t.schema
        ))
        .await
        .expect("age the mappings");
    let tx = t.client.transaction().await.expect("begin");
    t.outbox
        .save_in_tx(&tx, &msg("single"))
        .await
        .expect("save");
    t.outbox
        .save_all_in_tx(&tx, &[msg("batched"), msg("recent")])
        .await
        .expect("save");
    tx.commit().await.expect("commit");
    let ages = minutes_since_use(&t).await;
    assert_eq!(ages["single"], 0, "refreshed by save_in_tx");
    assert_eq!(ages["batched"], 0, "refreshed by save_all_in_tx");
    assert_eq!(ages["recent"], 30, "used within the hour: left alone");
    t.cleanup().await;
}
