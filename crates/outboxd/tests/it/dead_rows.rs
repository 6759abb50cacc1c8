//! Hazard 2: dead rows at the head of the queue. While a long transaction holds back vacuum,
//! every published (deleted) message stays in the indexes. The relay's read must not walk
//! them: its cost, in buffers touched (`EXPLAIN (ANALYZE, BUFFERS)`), must not grow with the
//! number of retired rows. The naive head query is measured alongside to show the hazard is
//! really there.

use outbox::Schema;
use serde_json::Value;

use crate::support::Setup;

/// Buffers (shared hit + read) the statement touched while executing.
async fn buffers(client: &tokio_postgres::Client, sql: &str, args: &str) -> i64 {
    let name = format!("q{}", rand_suffix());
    let text = format!(
        "PREPARE {name} AS {sql}; EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE {name}({args}); DEALLOCATE {name};"
    );
    let messages = client
        .simple_query(&text)
        .await
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    let json = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("explain output");
    let plan: Value = serde_json::from_str(&json).expect("json");
    let top = &plan[0]["Plan"];
    top["Shared Hit Blocks"].as_i64().unwrap_or(0) + top["Shared Read Blocks"].as_i64().unwrap_or(0)
}

/// How many transactions were in progress in `snapshot`: the window queries look each one
/// up in the `(xid)` index, a few buffers apiece (other tests' transactions count too).
async fn in_progress(client: &tokio_postgres::Client, snapshot: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_snapshot_xip($1::text::pg_snapshot)",
            &[&snapshot],
        )
        .await
        .expect("xip")
        .get(0)
}

async fn current_snapshot(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .expect("snapshot")
        .get(0)
}

/// Applies the relay's session settings, to measure statements as the relay runs them.
async fn relay_session(client: &tokio_postgres::Client) {
    client
        .batch_execute(outboxd::sql::SESSION_SETUP)
        .await
        .expect("session setup");
}

fn rand_suffix() -> u32 {
    rand::random()
}

struct Costs {
    delete_batch: i64,
    poll_windows: i64,
    open_window: i64,
    read_batch: i64,
    naive_head: i64,
    /// Transactions in progress in the previous snapshot: the window queries look each one
    /// up in the `(xid)` index, a few buffers apiece (other tests' transactions count too).
    in_progress: i64,
}

/// Retires `retired` messages while an old snapshot is held, then measures one relay read.
async fn costs_after(retired: i64) -> Costs {
    let setup = Setup::new(1).await;
    let s: &Schema = &setup.schema;
    let mut holder = outbox_testkit::connect().await;
    let held = holder
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .expect("begin");
    held.query_one("SELECT pg_current_xact_id()", &[])
        .await
        .expect("hold back vacuum");

    let insert = |n: i64| {
        format!(
            "INSERT INTO {s}.message (partition, topic, entity_key, payload)
             SELECT 0, 't', 'e' || (i % 100), convert_to(repeat('x', 300), 'UTF8') FROM generate_series(1, {n}) i"
        )
    };
    setup
        .client
        .batch_execute(&insert(retired))
        .await
        .expect("fill");
    let previous: String = current_snapshot(&setup.client).await;
    setup
        .client
        .batch_execute(&format!("DELETE FROM {s}.message"))
        .await
        .expect("retire");
    setup
        .client
        .batch_execute(&insert(10))
        .await
        .expect("new messages");
    setup
        .client
        .batch_execute(&format!("ANALYZE {s}.message"))
        .await
        .expect("analyze");

    // Measure as the relay runs them: in a relay session.
    relay_session(&setup.client).await;
    let sql = outboxd::sql::Statements::new(s);
    let in_progress = in_progress(&setup.client, &previous).await;
    let poll_windows = buffers(
        &setup.client,
        &sql.poll_windows,
        &format!("'{previous}', ARRAY[0]::int4[], 64, 2048"),
    )
    .await;
    let open_window = buffers(&setup.client, &sql.open_window, &format!("0, '{previous}'")).await;
    let (current, min_id): (String, i64) = {
        let r = setup
            .client
            .query_one(
                &format!("SELECT pg_current_snapshot()::text, min(id) FROM {s}.message"),
                &[],
            )
            .await
            .expect("snapshot");
        (r.get(0), r.get(1))
    };
    let live: Vec<i64> = setup
        .client
        .query(
            &format!("SELECT id FROM {s}.message ORDER BY id LIMIT 5"),
            &[],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let ids = live
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    // Retiring needs the partition's lease with the caller's epoch.
    setup
        .client
        .execute(
            &format!(
                "INSERT INTO {}.partition_lease (partition, owner, epoch, expires_at)
                 VALUES (0, '00000000-0000-0000-0000-000000000001', 1, 'infinity')
                 ON CONFLICT (partition) DO UPDATE
                    SET owner = EXCLUDED.owner, epoch = 1, expires_at = 'infinity'",
                setup.schema
            ),
            &[],
        )
        .await
        .expect("lease");
    let delete_batch = buffers(
        &setup.client,
        &sql.retire,
        &format!(
            "ARRAY[0]::int4[], ARRAY[1]::int8[], '00000000-0000-0000-0000-000000000001', \
             array_fill(0, ARRAY[{n}])::int4[], ARRAY[{ids}]::int8[]",
            n = live.len()
        ),
    )
    .await;
    let read_batch = buffers(
        &setup.client,
        &sql.read_batch,
        &format!("0, {}, '{current}', 1000", min_id - 1),
    )
    .await;
    setup
        .client
        .batch_execute("RESET ALL")
        .await
        .expect("reset");
    let naive_head = buffers(
        &setup.client,
        &format!("SELECT id FROM {s}.message WHERE partition = $1 ORDER BY id LIMIT 1000"),
        "0",
    )
    .await;
    held.rollback().await.expect("release");
    setup.cleanup().await;
    Costs {
        delete_batch,
        poll_windows,
        open_window,
        read_batch,
        naive_head,
        in_progress,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_cost_does_not_grow_with_retired_rows_behind_a_long_transaction() {
    let none = costs_after(0).await;
    let many = costs_after(100_000).await;
    println!(
        "buffers touched with 0 / 100000 retired rows: poll_windows {} / {}, open_window {} / {}, read_batch {} / {}, retire {} / {}, naive head scan {} / {} ({} transactions in progress)",
        none.poll_windows,
        many.poll_windows,
        none.open_window,
        many.open_window,
        none.read_batch,
        many.read_batch,
        none.delete_batch,
        many.delete_batch,
        none.naive_head,
        many.naive_head,
        many.in_progress
    );
    assert!(
        many.naive_head > none.naive_head + 300,
        "the hazard is real: the naive read walks the dead rows"
    );
    // An index gains a level or two between 10 and 100,010 entries (each lookup then touches
    // one more page); nothing may grow with the number of retired rows itself.
    let lookups = 4 * many.in_progress;
    assert!(
        many.poll_windows <= none.poll_windows * 2 + 10 + lookups,
        "poll_windows walks dead rows ({} in progress)",
        many.in_progress
    );
    assert!(
        many.delete_batch <= none.delete_batch * 2 + 10,
        "retire walks dead rows"
    );
    assert!(
        many.open_window <= none.open_window * 2 + 10 + lookups,
        "open_window walks dead rows ({} in progress)",
        many.in_progress
    );
    assert!(
        many.read_batch <= none.read_batch * 2 + 10,
        "read_batch walks dead rows"
    );
}

/// A fresh backlog has no planner statistics (autovacuum has not analyzed it yet). The
/// relay's session settings must still give the index-ordered read; without them the
/// planner sorts the whole partition for every batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_backlog_without_statistics_is_read_in_index_order() {
    let setup = Setup::new(1).await;
    let s = &setup.schema;
    setup
        .client
        .batch_execute(&format!(
            "ALTER TABLE {s}.message SET (autovacuum_enabled = false);
             INSERT INTO {s}.message (partition, topic, entity_key, payload)
             SELECT 0, 't', 'e' || (i % 100), convert_to(repeat('x', 300), 'UTF8') FROM generate_series(1, 100000) i;"
        ))
        .await
        .expect("backlog");
    let sql = outboxd::sql::Statements::new(s);
    let snapshot: String = current_snapshot(&setup.client).await;
    let args = format!("0, 0, '{snapshot}', 1000");
    let planner_default = buffers(&setup.client, &sql.read_batch, &args).await;
    relay_session(&setup.client).await;
    let relay_session = buffers(&setup.client, &sql.read_batch, &args).await;
    println!(
        "buffers for one 1000-row batch of a 100000-row fresh backlog: planner default {planner_default}, relay session {relay_session}"
    );
    // In index order a batch touches each of its 1000 rows and probes parked_entity for
    // each (about 2 buffers a row); the default plan reads the whole 100,000-row partition.
    assert!(
        planner_default > 5000,
        "the hazard is real: {planner_default}"
    );
    assert!(
        relay_session < 2500,
        "the relay session reads in index order: {relay_session}"
    );
    setup.cleanup().await;
}

/// Buffers for reading a late transaction's message after `retired` messages with larger
/// ids were published (deleted) while it was open: the relay's late-row read, and the plain
/// id-order read from the late id that it replaces, and the number of transactions in
/// progress in the previous snapshot (each is an `(xid)` index lookup).
async fn late_read_costs_after(retired: i64) -> (i64, i64, i64) {
    let setup = Setup::new(1).await;
    let s: &Schema = &setup.schema;
    let mut late_client = outbox_testkit::connect().await;
    let late_tx = late_client.transaction().await.expect("begin");
    let late_id: i64 = late_tx
        .query_one(
            &format!(
                "INSERT INTO {s}.message (partition, topic, entity_key, payload)
                 VALUES (0, 't', 'late', '\\x00') RETURNING id"
            ),
            &[],
        )
        .await
        .expect("late message")
        .get(0);
    // The relay published everything committed so far, up to the highest id: delete it.
    setup
        .client
        .batch_execute(&format!(
            "INSERT INTO {s}.message (partition, topic, entity_key, payload)
             SELECT 0, 't', 'e' || (i % 100), convert_to(repeat('x', 300), 'UTF8')
               FROM generate_series(1, {retired}) i"
        ))
        .await
        .expect("fill");
    let (previous, high_water): (String, i64) = {
        let r = setup
            .client
            .query_one(
                &format!(
                    "SELECT pg_current_snapshot()::text, coalesce(max(id), {late_id}) FROM {s}.message"
                ),
                &[],
            )
            .await
            .expect("snapshot");
        (r.get(0), r.get(1))
    };
    setup
        .client
        .batch_execute(&format!("DELETE FROM {s}.message; ANALYZE {s}.message"))
        .await
        .expect("retire");
    late_tx.commit().await.expect("late commit");
    let current: String = current_snapshot(&setup.client).await;
    relay_session(&setup.client).await;
    let sql = outboxd::sql::Statements::new(s);
    let late = buffers(
        &setup.client,
        &sql.read_late,
        &format!(
            "0, {}, '{current}', 1000, '{previous}', {high_water}",
            late_id - 1
        ),
    )
    .await;
    let walk = buffers(
        &setup.client,
        &sql.read_batch,
        &format!("0, {}, '{current}', 1000", late_id - 1),
    )
    .await;
    // The late read finds the row (and only it).
    let found = setup
        .client
        .query(
            sql.read_late.as_str(),
            &[
                &0i32,
                &(late_id - 1),
                &current,
                &1000i64,
                &previous,
                &high_water,
            ],
        )
        .await
        .expect("late read");
    assert_eq!(found.len(), 1, "the late row is found");
    assert_eq!(found[0].get::<_, i64>(0), late_id);
    let in_progress = in_progress(&setup.client, &previous).await;
    setup.cleanup().await;
    (late, walk, in_progress)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_is_read_without_walking_the_rows_published_meanwhile() {
    let (late_none, walk_none, _) = late_read_costs_after(0).await;
    let (late_many, walk_many, in_progress) = late_read_costs_after(100_000).await;
    println!(
        "buffers to read a late commit with 0 / 100000 rows published meanwhile: late-row read {late_none} / {late_many}, id-order walk {walk_none} / {walk_many}"
    );
    assert!(
        walk_many > walk_none + 300,
        "the hazard is real: the id-order walk steps over the dead rows"
    );
    assert!(
        late_many <= late_none * 2 + 10 + 4 * in_progress,
        "the late-row read walks dead rows: {late_none} -> {late_many} ({in_progress} in progress)"
    );
}
