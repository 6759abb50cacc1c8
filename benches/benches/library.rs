//! Library speed, against the real PostgreSQL (durable commits):
//!
//! - `overhead`: 8 concurrent writers; a transaction that inserts one business row, with and
//!   without `save_in_tx` of a 300-byte message. Issue target: ratio <= 1.3.
//! - `batch`: 4 connections, each transaction `save_all_in_tx` of 100 messages of 300
//!   bytes. Issue target: >= 80,000 messages/s.
//!
//! Run: `scripts/services up && cargo bench -p outbox-benches --bench library`

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use outbox::Message;
use outbox_benches::BenchDb;
use rand::Rng;
use tokio_postgres::Statement;

const PAYLOAD: [u8; 300] = [b'x'; 300];
const ENTITIES: u32 = 10_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn random_entity() -> String {
    format!("order-{}", rand::rng().random_range(0..ENTITIES))
}

/// How the overhead bench writes the message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Save {
    None,
    Text,
    Prepared,
}

fn overhead(c: &mut Criterion) {
    let rt = runtime();
    let db = rt.block_on(BenchDb::new("bench_overhead", 8));
    let s = db.schema.name().to_owned();
    rt.block_on(db.execute(&format!(
        "CREATE TABLE {s}.business (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, entity text NOT NULL, body bytea NOT NULL)"
    )));
    let insert = format!("INSERT INTO {s}.business (entity, body) VALUES ($1, $2)");

    // A well-tuned service prepares its own statements once per connection; so do we.
    let prepared = Arc::new(rt.block_on(db.prepare_all()));
    let inserts: Arc<Vec<Statement>> = Arc::new(rt.block_on(async {
        let mut v = Vec::new();
        for c in &db.clients {
            v.push(
                c.lock()
                    .await
                    .prepare(&insert)
                    .await
                    .expect("prepare insert"),
            );
        }
        v
    }));
    let mut group = c.benchmark_group("overhead_8_writers");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(20)
        .measurement_time(Duration::from_secs(15));
    for (name, mode) in [
        ("business_row_only", Save::None),
        ("business_row_plus_save_in_tx", Save::Text),
        ("business_row_plus_prepared_save_in_tx", Save::Prepared),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (prepared, inserts) = (prepared.clone(), inserts.clone());
                rt.block_on(db.run(iters, move |i, client, outbox| {
                    let (prepared, inserts) = (prepared.clone(), inserts.clone());
                    async move {
                        let mut client = client.lock().await;
                        let tx = client.transaction().await.expect("begin");
                        let entity = random_entity();
                        tx.execute(&inserts[i], &[&entity, &PAYLOAD.as_slice()])
                            .await
                            .expect("business insert");
                        let msg = || {
                            Message::builder("orders", entity.as_str())
                                .payload(PAYLOAD.to_vec())
                                .build()
                                .expect("valid")
                        };
                        let id = match mode {
                            Save::None => 0,
                            Save::Text => outbox.save_in_tx(&tx, &msg()).await.expect("save"),
                            Save::Prepared => {
                                prepared[i].save_in_tx(&tx, &msg()).await.expect("save")
                            }
                        };
                        assert!(mode == Save::None || id > 0, "a saved message has an id");
                        tx.commit().await.expect("commit");
                    }
                }))
            })
        });
    }
    group.finish();
    rt.block_on(db.drop());
}

fn batch(c: &mut Criterion) {
    let rt = runtime();
    let db = rt.block_on(BenchDb::new("bench_batch", 4));
    let mut group = c.benchmark_group("batch_4_connections");
    group
        .throughput(Throughput::Elements(100))
        .sample_size(20)
        .measurement_time(Duration::from_secs(15));
    group.bench_function("save_all_in_tx_100x300B", |b| {
        b.iter_custom(|iters| {
            rt.block_on(db.run(iters, |_, client, outbox| async move {
                let msgs: Vec<Message> = (0..100)
                    .map(|_| {
                        Message::builder("orders", random_entity())
                            .payload(PAYLOAD.to_vec())
                            .build()
                            .expect("valid")
                    })
                    .collect();
                let mut client = client.lock().await;
                let tx = client.transaction().await.expect("begin");
                outbox.save_all_in_tx(&tx, &msgs).await.expect("save all");
                tx.commit().await.expect("commit");
            }))
        })
    });
    // The alternative the issue asks to compare: lock the entities and read their
    // partitions (one round trip), then binary COPY the rows (a second one). Every entity
    // is mapped beforehand, so this does less than save_all_in_tx (no mapping creation,
    // no validation) and still needs two round trips.
    let s = db.schema.name().to_owned();
    rt.block_on(db.execute(&format!(
        "INSERT INTO {s}.entity_partition (entity_key, partition)
         SELECT 'order-' || i, i % 16 FROM generate_series(0, {max}) i ON CONFLICT DO NOTHING",
        max = ENTITIES - 1
    )));
    let lock = Arc::new(format!(
        "SELECT k.entity_key, m.partition
           FROM (SELECT DISTINCT u.entity_key FROM unnest($1::text[]) AS u(entity_key) ORDER BY 1) k
          CROSS JOIN LATERAL (SELECT e.partition FROM {s}.entity_partition e
                               WHERE e.entity_key = k.entity_key FOR NO KEY UPDATE) m"
    ));
    let copy = Arc::new(format!(
        "COPY {s}.message (partition, topic, entity_key, payload) FROM STDIN (FORMAT binary)"
    ));
    group.bench_function("binary_copy_100x300B", |b| {
        b.iter_custom(|iters| {
            let (lock, copy) = (lock.clone(), copy.clone());
            rt.block_on(db.run(iters, move |_, client, _| {
                let (lock, copy) = (lock.clone(), copy.clone());
                async move {
                    use futures_util::pin_mut;
                    use tokio_postgres::binary_copy::BinaryCopyInWriter;
                    use tokio_postgres::types::Type;
                    let keys: Vec<String> = (0..100).map(|_| random_entity()).collect();
                    let mut client = client.lock().await;
                    let tx = client.transaction().await.expect("begin");
                    let partitions: std::collections::HashMap<String, i32> = tx
                        .query(lock.as_str(), &[&keys])
                        .await
                        .expect("lock")
                        .iter()
                        .map(|r| (r.get(0), r.get(1)))
                        .collect();
                    let sink = tx.copy_in(copy.as_str()).await.expect("copy in");
                    let writer = BinaryCopyInWriter::new(
                        sink,
                        &[Type::INT4, Type::TEXT, Type::TEXT, Type::BYTEA],
                    );
                    pin_mut!(writer);
                    for k in &keys {
                        writer
                            .as_mut()
                            .write(&[&partitions[k], &"orders", k, &PAYLOAD.as_slice()])
                            .await
                            .expect("row");
                    }
                    writer.finish().await.expect("finish");
                    tx.commit().await.expect("commit");
                }
            }))
        })
    });
    group.finish();
    rt.block_on(db.drop());
}

// The macro generates an undocumented public function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, overhead, batch);
}
criterion_main!(group::benches);
