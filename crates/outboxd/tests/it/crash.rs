//! PostgreSQL crashes under the relay, on a cluster of the test's own (the shared server must
//! never be crashed). Transaction ids are not stable across crash recovery: ids whose WAL never
//! reached disk (asynchronous commits such as the relay's own retirements, rollbacks) are
//! handed out again. A snapshot the relay took before the crash must never be compared with
//! rows written after it, or a new row whose id repeats an old one looks "already seen".

use std::collections::HashMap;
use std::time::Duration;

use outbox::{Message, Outbox, Schema};
use outbox_testkit::ScratchPostgres;
use tokio_postgres::Client;

use crate::support::{RunningRelay, wait_until};

/// The settings that make lost transaction ids likely: the WAL writer flushes asynchronous
/// commits only every 10 s (its maximum), and nothing else writes meanwhile.
const CRASHY: &[&str] = &["wal_writer_delay = 10s", "autovacuum = off"];

async fn connect(url: &str) -> Client {
    outbox_testkit::try_connect(url)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Reconnects until the restarted server answers.
async fn reconnect(url: &str) -> Client {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = outbox_testkit::try_connect(url).await {
            return c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "PostgreSQL did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Saves one message of `entity` in its own transaction, committed durably unless `durable`
/// is false; returns the message id and the writing transaction's id.
async fn save(
    client: &mut Client,
    outbox: &Outbox,
    topic: &str,
    entity: &str,
    durable: bool,
) -> (i64, i64) {
    let tx = client.transaction().await.expect("begin");
    if !durable {
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .await
            .expect("async commit");
    }
    let msg = Message::builder(topic, entity)
        .payload(entity.as_bytes().to_vec())
        .build()
        .expect("valid");
    let id = outbox.save_in_tx(&tx, &msg).await.expect("save");
    let xid: i64 = tx
        .query_one("SELECT pg_current_xact_id()::text::int8", &[])
        .await
        .expect("xid")
        .get(0);
    tx.commit().await.expect("commit");
    (id, xid)
}

/// Takes `n` transaction ids whose WAL stays in memory: transactions that only take an id and
/// commit write no flushed record.
async fn burn_xids(client: &Client, n: usize) {
    for _ in 0..n {
        client
            .batch_execute("BEGIN; SELECT pg_current_xact_id(); COMMIT;")
            .await
            .expect("burn an xid");
    }
}

/// Waits until a session whose last statement contains `needle` is idle: a relay task has
/// run that statement since it (re)connected.
async fn wait_for_statement(client: &Client, needle: &str, what: &str) {
    wait_until(Duration::from_secs(30), what, || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle' AND strpos(query, $1) > 0",
                &[&needle],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) > 0)
    })
    .await;
}

/// The ids of `entity` that a consumer de-duplicating by `outbox-id` keeps, in arrival order.
fn kept_ids(consumed: &[outbox_testkit::Consumed], entity: &str) -> Vec<i64> {
    let mut kept: Vec<i64> = Vec::new();
    for m in consumed {
        if m.header("outbox-entity-key").as_deref() == Some(entity) {
            let id = crate::support::outbox_id(m);
            if kept.last().is_none_or(|last| id > *last) {
                kept.push(id);
            }
        }
    }
    kept
}

/// The deterministic reproduction. The relay has seen a snapshot whose `xmax` lies beyond
/// transaction ids that were never flushed; PostgreSQL crashes and hands those ids out again;
/// a new message of entity E gets one of them and commits after the partition's worker has
/// reread the partition but before the wake-up poller's first poll after the crash (the test
/// holds that poll in a proxy). E2's transaction id is below the old snapshot's `xmax` and not
/// in its in-progress list, so a poller that kept that snapshot treats the row as already
/// seen, hands E3's window over without it, and E2 stays behind: E arrives as 1, 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_id_reused_after_a_crash_is_not_mistaken_for_one_already_seen() {
    let pg = ScratchPostgres::start(CRASHY);
    let url = pg.url();
    let mut client = connect(&url).await;
    let schema = Schema::new("outbox").expect("schema");
    outbox::migrate_schema(&client, &schema)
        .await
        .expect("migrate");
    client
        .batch_execute("UPDATE outbox.settings SET partition_count = 1")
        .await
        .expect("one partition");
    let outbox = Outbox::new(schema);
    let topic = outbox_testkit::create_topic("xidreuse", 1).await;
    let proxy = crate::proxy::PgProxy::start(format!("127.0.0.1:{}", pg.port())).await;
    let relay = RunningRelay::start(outboxd::Config {
        database_url: proxy.url_for(&url),
        brokers: outbox_testkit::brokers(),
        retry_initial_ms: 50,
        retry_max_ms: 500,
        // Workers open windows of their own only every 2 s while the poller is held, so that
        // they do not read E2 themselves in the few milliseconds the test needs.
        poll_interval_ms: 2000,
        ..outboxd::Config::default()
    });

    let (e1, _) = save(&mut client, &outbox, &topic, "E", true).await;
    // Ids taken after the last flush of the WAL, then a probe committed asynchronously: once
    // the relay published the probe, its snapshot's xmax lies beyond all of them.
    let probe_xid = loop {
        let before: String = client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .expect("lsn")
            .get(0);
        burn_xids(&client, 20).await;
        let (_, probe_xid) = save(&mut client, &outbox, &topic, "probe", false).await;
        wait_until(
            Duration::from_secs(30),
            "the probe is published",
            || async {
                client
                    .query_one("SELECT count(*) FROM outbox.message", &[])
                    .await
                    .is_ok_and(|r| r.get::<_, i64>(0) == 0)
            },
        )
        .await;
        let unflushed: bool = client
            .query_one(
                "SELECT pg_current_wal_flush_lsn() <= $1::text::pg_lsn",
                &[&before],
            )
            .await
            .expect("flush lsn")
            .get(0);
        if unflushed {
            break probe_xid;
        }
        // Something flushed the WAL meanwhile (a WAL page filled up): try again.
    };

    pg.crash();
    proxy.hold("WITH fresh AS");
    pg.start_again();
    let mut client = reconnect(&url).await;
    // The relay is back: its worker has a session opened after the restart (every new session
    // rereads its partition from the start) and waits for windows; the poller's first poll is
    // held.
    wait_until(
        Duration::from_secs(30),
        "the worker reread the partition",
        || async {
            client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE application_name LIKE 'outboxd worker%' AND state = 'idle'
                        AND backend_start > pg_postmaster_start_time()
                        AND strpos(query, 'SELECT pg_current_snapshot()') > 0
                        AND NOT EXISTS (SELECT 1 FROM outbox.message)",
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 1)
        },
    )
    .await;
    let (e2, e2_xid) = save(&mut client, &outbox, &topic, "E", true).await;
    assert!(
        e2_xid < probe_xid,
        "the crash handed out a transaction id again (E2 got {e2_xid}, the probe had {probe_xid})"
    );
    proxy.release();
    wait_for_statement(&client, "WITH fresh AS", "the poller polling again").await;
    // E's next message gets an id beyond anything the relay saw before the crash.
    burn_xids(&client, 200).await;
    let (e3, _) = save(&mut client, &outbox, &topic, "E", true).await;

    let mut kept = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while kept.len() < 3 && tokio::time::Instant::now() < deadline {
        let topic = topic.clone();
        let consumed = tokio::task::spawn_blocking(move || {
            outbox_testkit::consume(&topic, 100, Duration::from_secs(1))
        })
        .await
        .expect("consume");
        kept = kept_ids(&consumed, "E");
    }
    assert_eq!(
        kept,
        vec![e1, e2, e3],
        "E arrives complete and in order after de-duplication"
    );
    let waiting: i64 = client
        .query_one("SELECT count(*) FROM outbox.message", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(waiting, 0, "nothing left behind");
    relay.stop().await;
}

/// Writers keep writing, durably, while PostgreSQL crashes twice under the relay. Every
/// commit the writers saw succeed arrives, in commit order per entity after de-duplication;
/// a commit whose outcome the writer could not learn (the crash cut it) may or may not exist,
/// and arrives in order if it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_keep_writing_through_postgres_crashes_and_every_commit_arrives_in_order() {
    let pg = ScratchPostgres::start(CRASHY);
    let url = pg.url();
    let client = connect(&url).await;
    let schema = Schema::new("outbox").expect("schema");
    outbox::migrate_schema(&client, &schema)
        .await
        .expect("migrate");
    client
        .batch_execute("UPDATE outbox.settings SET partition_count = 4")
        .await
        .expect("partitions");
    let outbox = Outbox::new(schema);
    let topic = outbox_testkit::create_topic("crashes", 3).await;
    let relay = RunningRelay::start(outboxd::Config {
        database_url: url.clone(),
        brokers: outbox_testkit::brokers(),
        retry_initial_ms: 50,
        retry_max_ms: 500,
        ..outboxd::Config::default()
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (url, outbox, topic, stop) = (url.clone(), outbox.clone(), topic.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            // Ids whose commit succeeded, and ids whose outcome is unknown, per entity.
            let mut acked: HashMap<String, Vec<i64>> = HashMap::new();
            let mut unknown: Vec<i64> = Vec::new();
            let mut client: Option<Client> = None;
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Some(c) = client.as_mut().filter(|c| !c.is_closed()) else {
                    client = outbox_testkit::try_connect(&url).await.ok();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                i += 1;
                let entity = format!("e{}", (i * 7 + w) % 10);
                let Ok(tx) = c.transaction().await else {
                    continue;
                };
                let msg = Message::builder(topic.as_str(), entity.as_str())
                    .payload(format!("{w}-{i}").into_bytes())
                    .build()
                    .expect("valid");
                let Ok(id) = outbox.save_in_tx(&tx, &msg).await else {
                    continue;
                };
                match tx.commit().await {
                    Ok(()) => acked.entry(entity).or_default().push(id),
                    Err(_) => unknown.push(id),
                }
            }
            (acked, unknown)
        }));
    }
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        pg.crash();
        pg.start_again();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked: HashMap<String, Vec<i64>> = HashMap::new();
    let mut unknown = std::collections::HashSet::new();
    for w in writers {
        let (a, u) = w.await.expect("writer");
        for (k, v) in a {
            acked.entry(k).or_default().extend(v);
        }
        unknown.extend(u);
    }
    // A transaction cut by a crash did not commit, and the id it took can be handed out again
    // after the restart (sequence values are logged ahead, and a log record that never
    // reached disk is lost with it): an id acknowledged by one writer was then only
    // "unknown" for another.
    let acked_ids: std::collections::HashSet<i64> = acked.values().flatten().copied().collect();
    unknown.retain(|id| !acked_ids.contains(id));
    let client = reconnect(&url).await;
    wait_until(Duration::from_secs(60), "every message retired", || async {
        client
            .query_one("SELECT count(*) FROM outbox.message", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 0)
    })
    .await;
    relay.stop().await;
    let size = outbox_testkit::topic_size(&topic);
    let consumed = outbox_testkit::consume(&topic, size, Duration::from_secs(60));
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total > 100, "the writers wrote ({total} commits)");
    for (entity, mut ids) in acked {
        ids.sort_unstable();
        let kept: Vec<i64> = kept_ids(&consumed, &entity)
            .into_iter()
            .filter(|id| !unknown.contains(id))
            .collect();
        assert_eq!(
            kept, ids,
            "entity {entity}: every acknowledged commit, in order"
        );
    }
}
