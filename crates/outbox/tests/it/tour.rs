//! The hostile-input tour, kept as tables: bad input at the library's boundaries (the SQL
//! functions a service in any language calls, the tables, and the Rust API), each with the
//! error it must get. Nothing may panic, be accepted silently, or leave anything written.
//! (The relay's boundaries, configuration and command line, have their own table in the
//! `outboxd` tests.)

use outbox::{Error, Message, Schema};
use tokio_postgres::error::SqlState;

use crate::support::TestSchema;

/// One SQL input: the statement (`{s}` is the schema), and the SQLSTATE and message part it
/// must be refused with.
struct SqlCase {
    sql: &'static str,
    code: SqlState,
    message: &'static str,
}

const fn refused(sql: &'static str, code: SqlState, message: &'static str) -> SqlCase {
    SqlCase { sql, code, message }
}

fn sql_cases() -> Vec<SqlCase> {
    use SqlState as S;
    let bad = S::INVALID_PARAMETER_VALUE;
    vec![
        // Topics.
        refused(
            "SELECT {s}.save_message('', 'e', 'x')",
            bad.clone(),
            "topic must not be empty",
        ),
        refused(
            "SELECT {s}.save_message(NULL, 'e', 'x')",
            bad.clone(),
            "topic must not be empty",
        ),
        refused(
            "SELECT {s}.save_message('a/b', 'e', 'x')",
            bad.clone(),
            "invalid Kafka topic name",
        ),
        refused(
            "SELECT {s}.save_message('.', 'e', 'x')",
            bad.clone(),
            "invalid Kafka topic name",
        ),
        refused(
            "SELECT {s}.save_message('ordérs', 'e', 'x')",
            bad.clone(),
            "invalid Kafka topic name",
        ),
        refused(
            "SELECT {s}.save_message(repeat('t', 250), 'e', 'x')",
            bad.clone(),
            "invalid Kafka topic name",
        ),
        // Entity keys.
        refused(
            "SELECT {s}.save_message('t', '', 'x')",
            bad.clone(),
            "entity key must not be empty",
        ),
        refused(
            "SELECT {s}.save_message('t', NULL, 'x')",
            bad.clone(),
            "entity key must not be empty",
        ),
        refused(
            "SELECT {s}.save_message('t', repeat('k', 1025), 'x')",
            bad.clone(),
            "entity key is 1025 bytes",
        ),
        refused(
            "SELECT {s}.save_message('t', repeat('é', 600), 'x')",
            bad.clone(),
            "entity key is 1200 bytes",
        ),
        refused(
            "SELECT {s}.save_message('t', repeat('k', 3000), 'x')",
            bad.clone(),
            "entity key is 3000 bytes",
        ),
        // Headers through save_message (JSON).
        refused(
            "SELECT {s}.save_message('t', 'e', 'x', '[1]')",
            bad.clone(),
            "headers must be a JSON object",
        ),
        refused(
            "SELECT {s}.save_message('t', 'e', 'x', '{\"h\": 1}')",
            bad.clone(),
            "header values must be JSON strings",
        ),
        refused(
            "SELECT {s}.save_message('t', 'e', 'x', '{\"\": \"v\"}')",
            bad.clone(),
            "header names must not be empty",
        ),
        refused(
            "SELECT {s}.save_message('t', 'e', 'x', '{\"outbox-id\": \"1\"}')",
            bad.clone(),
            "reserved for the relay",
        ),
        refused(
            "SELECT {s}.save_message('t', 'e', 'x', '{\"outbox-entity-key\": \"x\"}')",
            bad.clone(),
            "reserved for the relay",
        ),
        refused(
            "SELECT {s}.save_message('t', 'e', 'x', '{\"outbox-event-type\": \"x\"}')",
            bad.clone(),
            "reserved for the relay",
        ),
        refused(
            "SELECT {s}.save_message('t', 'e', 'x', '{\"a\\nb\": \"v\"}')",
            bad.clone(),
            "control characters",
        ),
        refused(
            "SELECT {s}.save_message('t', 'e', 'x', (SELECT jsonb_object_agg('h' || i, 'v') FROM generate_series(1, 101) i))",
            bad.clone(),
            "101 headers, more than the maximum of 100",
        ),
        // Sizes: the whole record counts, key, headers and event type included.
        refused(
            "SELECT {s}.save_message('t', 'e', convert_to(repeat('x', 2000000), 'UTF8'))",
            S::PROGRAM_LIMIT_EXCEEDED,
            "exceeds the maximum of 1000000 bytes",
        ),
        refused(
            "SELECT {s}.save_message('t', 'e', convert_to(repeat('x', 999953), 'UTF8'))",
            S::PROGRAM_LIMIT_EXCEEDED,
            "a record of 1000001 bytes",
        ),
        refused(
            "SELECT {s}.enqueue('t', 'e', 'x', convert_to(repeat('k', 1000000), 'UTF8'), NULL, NULL, NULL, NULL)",
            S::PROGRAM_LIMIT_EXCEEDED,
            "exceeds the maximum",
        ),
        refused(
            "SELECT {s}.enqueue('t', 'e', 'x', NULL, NULL, NULL, NULL, repeat('t', 1000000))",
            S::PROGRAM_LIMIT_EXCEEDED,
            "exceeds the maximum",
        ),
        refused(
            "SELECT {s}.enqueue('t', 'e', 'x', NULL, NULL, ARRAY['h'], ARRAY[convert_to(repeat('v', 1000000), 'UTF8')], NULL)",
            S::PROGRAM_LIMIT_EXCEEDED,
            "exceeds the maximum",
        ),
        // enqueue: headers and partitions.
        refused(
            "SELECT {s}.enqueue('t', 'E', '\\x00', NULL, NULL, ARRAY['h'], ARRAY[NULL::bytea], NULL)",
            bad.clone(),
            "header values must not be NULL",
        ),
        refused(
            "SELECT {s}.enqueue('t', 'E', 'x', NULL, NULL, ARRAY['h', 'i'], ARRAY['v'::bytea], NULL)",
            bad.clone(),
            "2 header names but 1 header values",
        ),
        refused(
            "SELECT {s}.enqueue('t', 'E', 'x', NULL, NULL, ARRAY[NULL::text], ARRAY['v'::bytea], NULL)",
            bad.clone(),
            "header names must not be empty",
        ),
        refused(
            "SELECT {s}.enqueue('t', 'E', 'x', NULL, -1, NULL, NULL, NULL)",
            bad.clone(),
            "Kafka partition must be between 0 and 999999, got -1",
        ),
        refused(
            "SELECT {s}.enqueue('t', 'E', 'x', NULL, 2147483647, NULL, NULL, NULL)",
            bad.clone(),
            "got 2147483647",
        ),
        // enqueue_batch.
        refused(
            "SELECT {s}.enqueue_batch('{t}', '{e,f}', '{x}', '{NULL}', '{NULL}', '{NULL}', '{0}', '{0}', '{}', '{}')",
            bad.clone(),
            "arrays differ in length",
        ),
        refused(
            "SELECT {s}.enqueue_batch('{t}', '{e}', '{x}', '{NULL}', '{NULL}', '{NULL}', '{0}', '{2}', '{a}', '{b}')",
            bad.clone(),
            "invalid header slice",
        ),
        refused(
            "SELECT {s}.enqueue_batch('{t}', '{e}', '{x}', '{NULL}', '{NULL}', '{NULL}', '{0}', '{-1}', '{}', '{}')",
            bad.clone(),
            "invalid header slice",
        ),
        refused(
            "SELECT {s}.enqueue_batch('{t,t}', '{e,NULL}', '{x,y}', '{NULL,NULL}', '{NULL,NULL}', '{NULL,NULL}', '{0,0}', '{0,0}', '{}', '{}')",
            bad.clone(),
            "entity key must not be empty",
        ),
        refused(
            "SELECT {s}.enqueue_batch('{t}', '{e}', '{x}', '{NULL}', '{NULL}', '{NULL}', '{0}', '{1}', '{outbox-id}', '{1}')",
            bad.clone(),
            "reserved for the relay",
        ),
        refused(
            "SELECT {s}.enqueue_batch('{t}', '{e}', '{x}', '{NULL}', '{NULL}', '{NULL}', '{0}', '{0}', '{h}', '{NULL}')",
            bad.clone(),
            "outside any message",
        ),
        refused(
            "SELECT {s}.enqueue_batch('{t}', '{e}', '{x}', '{NULL}', '{1000000}', '{NULL}', '{0}', '{0}', '{}', '{}')",
            bad.clone(),
            "Kafka partition must be between",
        ),
        refused(
            "SELECT {s}.enqueue_batch(ARRAY['t', 't'], ARRAY['e', 'f'], ARRAY['x'::bytea, convert_to(repeat('x', 2000000), 'UTF8')], '{NULL,NULL}', '{NULL,NULL}', '{NULL,NULL}', '{0,0}', '{0,0}', '{}', '{}')",
            S::PROGRAM_LIMIT_EXCEEDED,
            "(entity 'f')",
        ),
        refused(
            "SELECT {s}.enqueue_batch('{t}', '{e}', '{x}', '{NULL}', '{NULL}', '{NULL}', '{0}', '{101}', (SELECT array_agg('h' || i) FROM generate_series(1, 101) i), (SELECT array_agg('v'::bytea) FROM generate_series(1, 101) i))",
            bad.clone(),
            "101 headers",
        ),
        // The tables.
        refused(
            "DELETE FROM {s}.settings",
            S::RESTRICT_VIOLATION,
            "settings row cannot be deleted",
        ),
        refused(
            "TRUNCATE {s}.settings",
            S::RESTRICT_VIOLATION,
            "settings row cannot be deleted",
        ),
        refused(
            "INSERT INTO {s}.settings DEFAULT VALUES",
            S::UNIQUE_VIOLATION,
            "settings_pkey",
        ),
        refused(
            "UPDATE {s}.settings SET partition_count = 0",
            S::CHECK_VIOLATION,
            "settings_partition_count_check",
        ),
        refused(
            "UPDATE {s}.settings SET partition_count = 5000",
            S::CHECK_VIOLATION,
            "settings_partition_count_check",
        ),
        refused(
            "UPDATE {s}.settings SET max_record_bytes = 10",
            S::CHECK_VIOLATION,
            "settings_max_record_bytes_check",
        ),
        refused(
            "INSERT INTO {s}.message (partition, topic, entity_key, header_names, header_values) VALUES (0, 't', 'e', ARRAY['h'], ARRAY[NULL::bytea])",
            S::CHECK_VIOLATION,
            "message_headers_have_no_nulls",
        ),
        refused(
            "INSERT INTO {s}.message (partition, topic, entity_key) VALUES (0, '', 'e')",
            S::CHECK_VIOLATION,
            "message_check",
        ),
    ]
}

#[tokio::test]
async fn every_bad_sql_input_gets_its_typed_error_and_nothing_is_written() {
    let t = TestSchema::new().await;
    let s = t.schema.name();
    let cases = sql_cases();
    assert!(cases.len() >= 45, "the table keeps the whole tour");
    for case in cases {
        let sql = case.sql.replace("{s}", s);
        let err = t
            .client
            .batch_execute(&sql)
            .await
            .expect_err(&format!("accepted: {sql}"));
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{sql}: not a server error: {err}"));
        assert_eq!(db.code(), &case.code, "{sql}: {}", db.message());
        let text = format!("{} {}", db.message(), db.constraint().unwrap_or_default());
        assert!(text.contains(case.message), "{sql}: {text}");
    }
    assert_eq!(t.count("message").await, 0);
    assert_eq!(t.count("entity_partition").await, 0);
    assert_eq!(t.count("settings").await, 1);
    t.cleanup().await;
}

/// Inputs that are accepted on purpose, documented in docs/guarantees.md: a tombstone, an
/// empty header value, an empty event type, a record exactly at the limit.
#[tokio::test]
async fn documented_acceptances_are_written() {
    let t = TestSchema::new().await;
    let s = t.schema.name();
    for sql in [
        "SELECT {s}.save_message('t', 'e', NULL)",
        "SELECT {s}.save_message('t', 'e', 'x', '{\"h\": \"\"}')",
        "SELECT {s}.save_message('t', 'e', 'x', NULL, '')",
        "SELECT {s}.enqueue('t', 'e', 'x', NULL, 999999, NULL, NULL, NULL)",
        // 1,000,000 bytes exactly: the payload, the key "e" twice, and the relay's headers.
        "SELECT {s}.save_message('t', 'e', convert_to(repeat('x', 1000000 - 2 - 46), 'UTF8'))",
    ] {
        let sql = sql.replace("{s}", s);
        t.client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", outbox::describe_pg_error(&e)));
    }
    assert_eq!(t.count("message").await, 5);
    t.cleanup().await;
}

/// Without its settings row (a restore that lost it: the table refuses deletes), a writer of a
/// new entity gets a clear error instead of looping until its statement timeout.
#[tokio::test]
async fn a_missing_settings_row_is_a_clear_error_for_writers() {
    let mut t = TestSchema::new().await;
    let s = t.schema.name().to_owned();
    t.client
        .batch_execute(&format!(
            "ALTER TABLE {s}.settings DISABLE TRIGGER USER; DELETE FROM {s}.settings;"
        ))
        .await
        .expect("lose the settings row");
    let tx = t.client.transaction().await.expect("begin");
    let err = t
        .outbox
        .save_in_tx(&tx, &Message::builder("t", "new").build().expect("valid"))
        .await
        .expect_err("refused");
    drop(tx);
    assert!(
        matches!(&err, Error::SchemaNotReady { problem, .. } if problem.contains("settings row")),
        "{err:?}"
    );
    t.cleanup().await;
}

/// The Rust API's boundaries: what the builder refuses, and what the handle refuses before
/// anything is sent (so the caller's transaction stays usable).
#[tokio::test]
async fn every_bad_rust_input_gets_its_typed_error() {
    type Check = fn(&Error) -> bool;
    let long_key = "k".repeat(outbox::MAX_ENTITY_KEY_BYTES + 1);
    let cases: Vec<(&str, Result<Message, Error>, Check)> = vec![
        ("empty topic", Message::builder("", "e").build(), |e| {
            matches!(e, Error::EmptyTopic)
        }),
        ("bad topic", Message::builder("a b", "e").build(), |e| {
            matches!(e, Error::InvalidTopic { .. })
        }),
        ("empty entity", Message::builder("t", "").build(), |e| {
            matches!(e, Error::EmptyEntityKey { .. })
        }),
        (
            "long entity",
            Message::builder("t", long_key.as_str()).build(),
            |e| matches!(e, Error::EntityKeyTooLong { .. }),
        ),
        (
            "negative partition",
            Message::builder("t", "e").kafka_partition(-1).build(),
            |e| matches!(e, Error::InvalidKafkaPartition(-1)),
        ),
        (
            "huge partition",
            Message::builder("t", "e").kafka_partition(i32::MAX).build(),
            |e| matches!(e, Error::InvalidKafkaPartition(_)),
        ),
        (
            "reserved header",
            Message::builder("t", "e").header("outbox-id", "1").build(),
            |e| matches!(e, Error::InvalidHeaderName { .. }),
        ),
        (
            "control header",
            Message::builder("t", "e").header("a\tb", "1").build(),
            |e| matches!(e, Error::InvalidHeaderName { .. }),
        ),
        (
            "empty header",
            Message::builder("t", "e").header("", "1").build(),
            |e| matches!(e, Error::InvalidHeaderName { .. }),
        ),
        (
            "101 headers",
            (0..101)
                .fold(Message::builder("t", "e"), |b, i| {
                    b.header(format!("h{i}"), "v")
                })
                .build(),
            |e| {
                matches!(
                    e,
                    Error::TooManyHeaders {
                        count: 101,
                        max: 100
                    }
                )
            },
        ),
    ];
    for (what, built, check) in cases {
        let err = built.expect_err(what);
        assert!(check(&err), "{what}: {err:?}");
        assert!(err.is_invalid_input(), "{what}: {err:?}");
    }

    let mut t = TestSchema::new().await;
    t.client
        .batch_execute(&format!(
            "UPDATE {}.settings SET max_record_bytes = 2048",
            t.schema
        ))
        .await
        .expect("lower the limit");
    let outbox = outbox::Outbox::new(t.schema.clone());
    let too_large = Message::builder("t", "e")
        .payload(vec![b'x'; 3000])
        .build()
        .expect("builds: the limit lives in the database");
    assert_eq!(too_large.record_bytes(), 3000 + 1 + 46 + 1);
    let tx = t.client.transaction().await.expect("begin");
    let err = outbox
        .save_in_tx(&tx, &too_large)
        .await
        .expect_err("too large");
    assert!(
        matches!(&err, Error::RecordTooLarge { size: 3048, max: 2048, entity_key } if entity_key == "e"),
        "{err:?}"
    );
    let err = outbox
        .save_all_in_tx(
            &tx,
            &[
                Message::builder("t", "ok").build().expect("valid"),
                too_large.clone(),
            ],
        )
        .await
        .expect_err("too large");
    assert!(matches!(err, Error::RecordTooLarge { .. }), "{err:?}");
    // Refused before anything was sent: the transaction is still usable.
    outbox
        .save_in_tx(&tx, &Message::builder("t", "fine").build().expect("valid"))
        .await
        .expect("the transaction goes on");
    tx.commit().await.expect("commit");
    assert_eq!(t.count("message").await, 1);
    t.cleanup().await;
}

/// `migrate` refuses a schema that belongs to something else, and never panics on it.
#[tokio::test]
async fn migrate_refuses_schemas_that_are_not_the_outboxs() {
    let client = outbox_testkit::connect().await;
    for name in ["pg_outbox", "information_schema"] {
        assert!(
            matches!(Schema::new(name), Err(Error::InvalidSchemaName(_))),
            "{name}"
        );
    }
    // Another migration tool's table (golang-migrate's), and an application's tables.
    let foreign = Schema::new(outbox_testkit::unique_name("foreign")).expect("name");
    let busy = Schema::new(outbox_testkit::unique_name("busy")).expect("name");
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {foreign};
             CREATE TABLE {foreign}.schema_migrations (version bigint PRIMARY KEY, dirty boolean NOT NULL);
             INSERT INTO {foreign}.schema_migrations VALUES (20240101, false);
             CREATE SCHEMA {busy};
             CREATE TABLE {busy}.orders (id int);"
        ))
        .await
        .expect("setup");
    for schema in [&foreign, &busy] {
        let err = outbox::migrate_schema(&client, schema)
            .await
            .expect_err("refused");
        assert!(matches!(err, Error::SchemaConflict { .. }), "{err:?}");
        let err = outbox::check_schema(&client, schema)
            .await
            .expect_err("not an outbox schema");
        assert!(
            matches!(
                err,
                Error::SchemaConflict { .. } | Error::SchemaNotReady { .. }
            ),
            "{err:?}"
        );
    }
    let created: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = ANY ($1) AND tablename = 'message'",
            &[&vec![foreign.name(), busy.name()]],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(created, 0, "nothing was created in them");
    // An existing empty schema (made by a DBA for permissions) is fine.
    let empty = Schema::new(outbox_testkit::unique_name("empty")).expect("name");
    client
        .batch_execute(&format!("CREATE SCHEMA {empty}"))
        .await
        .expect("setup");
    outbox::migrate_schema(&client, &empty)
        .await
        .expect("an empty schema is used");
    for schema in [&foreign, &busy, &empty] {
        outbox_testkit::drop_schema(&client, schema.name()).await;
    }
}

/// A schema whose recorded migration of some version has another name than this build's
/// (an unreleased branch applied its own) is refused by name, instead of being migrated on
/// top into a schema that lacks what this build's migration creates. Found on a development
/// database that had an unreleased `0004_limits`: the relay then failed on a missing table.
#[tokio::test]
async fn migrate_refuses_a_version_recorded_under_another_name() {
    let client = outbox_testkit::connect().await;
    let schema = Schema::new(outbox_testkit::unique_name("renamed")).expect("name");
    outbox::migrate_schema(&client, &schema)
        .await
        .expect("migrate");
    client
        .execute(
            &format!(
                "UPDATE {schema}.schema_migrations SET name = '0004_limits' WHERE version = 4"
            ),
            &[],
        )
        .await
        .expect("rename");
    let err = outbox::migrate_schema(&client, &schema)
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, Error::SchemaConflict { problem, .. } if problem.contains("0004_limits") && problem.contains("0004_leases")),
        "{err}"
    );
    outbox_testkit::drop_schema(&client, schema.name()).await;
}
