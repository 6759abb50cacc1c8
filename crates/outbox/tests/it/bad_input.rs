//! Bad input is refused at the boundary with a typed error that names the offending value,
//! and nothing is written: not the message, not the entity mapping.

use outbox::{Error, Message, Outbox};

use crate::support::TestSchema;

/// Saves `msg` (when it builds) in a transaction that then commits, and checks that the
/// expected error came back and that no row exists afterwards.
async fn refused(t: &mut TestSchema, outbox: &Outbox, built: Result<Message, Error>) -> Error {
    let err = match built {
        Err(e) => e,
        Ok(msg) => {
            let tx = t.client.transaction().await.expect("begin");
            let err = outbox
                .save_in_tx(&tx, &msg)
                .await
                .expect_err("must be refused");
            tx.commit()
                .await
                .expect("the caller's transaction is still usable");
            err
        }
    };
    assert!(err.is_invalid_input(), "{err:?}");
    assert_eq!(
        t.count("message").await,
        0,
        "no message written after {err}"
    );
    assert_eq!(
        t.count("entity_partition").await,
        0,
        "no mapping written after {err}"
    );
    err
}

#[tokio::test]
async fn every_invalid_message_is_refused_and_nothing_is_written() {
    let mut t = TestSchema::new().await;
    let small = t
        .outbox
        .clone()
        .with_max_payload_bytes(10)
        .with_max_header_bytes(8);
    let long_topic = "t".repeat(250);

    let e = refused(
        &mut t,
        &small,
        Message::builder("", "e").payload(b"x".to_vec()).build(),
    )
    .await;
    assert!(matches!(e, Error::EmptyTopic), "{e:?}");

    for bad in [
        "orders/eu",
        "orders eu",
        "ordérs",
        ".",
        "..",
        long_topic.as_str(),
    ] {
        let e = refused(&mut t, &small, Message::builder(bad, "e").build()).await;
        assert!(
            matches!(&e, Error::InvalidTopic { topic, .. } if topic == bad),
            "{e:?}"
        );
    }

    let e = refused(&mut t, &small, Message::builder("orders", "").build()).await;
    assert!(
        matches!(&e, Error::EmptyEntityKey { topic } if topic == "orders"),
        "{e:?}"
    );

    let e = refused(
        &mut t,
        &small,
        Message::builder("orders", "e1")
            .payload(vec![0u8; 11])
            .build(),
    )
    .await;
    assert!(
        matches!(&e, Error::PayloadTooLarge { entity_key, size: 11, max: 10 } if entity_key == "e1"),
        "{e:?}"
    );

    let e = refused(
        &mut t,
        &small,
        Message::builder("orders", "e2")
            .header("abcd", b"12345".to_vec())
            .build(),
    )
    .await;
    assert!(
        matches!(
            &e,
            Error::HeadersTooLarge {
                size: 9,
                max: 8,
                ..
            }
        ),
        "{e:?}"
    );

    for (name, reason) in [
        ("", "empty"),
        ("outbox-id", "reserved"),
        ("a\nb", "control"),
    ] {
        let e = refused(
            &mut t,
            &small,
            Message::builder("orders", "e3")
                .header(name, b"v".to_vec())
                .build(),
        )
        .await;
        assert!(
            matches!(&e, Error::InvalidHeaderName { name: n, reason: r } if n == name && r.contains(reason)),
            "{e:?}"
        );
    }

    let e = refused(
        &mut t,
        &small,
        Message::builder("orders", "e4").kafka_partition(-1).build(),
    )
    .await;
    assert!(matches!(e, Error::InvalidKafkaPartition(-1)), "{e:?}");

    // serde_json refuses maps whose keys are not strings.
    let bad_json: std::collections::HashMap<Vec<u8>, i32> = [(vec![1u8], 1)].into();
    let e = refused(
        &mut t,
        &small,
        Message::builder("orders", "e5").json(&bad_json).build(),
    )
    .await;
    assert!(matches!(e, Error::Json(_)), "{e:?}");
    t.cleanup().await;
}

#[tokio::test]
async fn one_invalid_message_refuses_the_whole_batch() {
    let mut t = TestSchema::new().await;
    let outbox = t.outbox.clone().with_max_payload_bytes(100);
    let ok = |i: usize| {
        Message::builder("orders", format!("e{i}"))
            .payload(vec![1u8; 10])
            .build()
            .expect("valid")
    };
    let batch = vec![
        ok(1),
        ok(2),
        Message::builder("orders", "e3")
            .payload(vec![1u8; 101])
            .build()
            .expect("valid"),
        ok(4),
    ];
    let tx = t.client.transaction().await.expect("begin");
    let err = outbox
        .save_all_in_tx(&tx, &batch)
        .await
        .expect_err("refused");
    tx.commit().await.expect("commit");
    assert!(
        matches!(&err, Error::PayloadTooLarge { entity_key, .. } if entity_key == "e3"),
        "{err:?}"
    );
    assert_eq!(t.count("message").await, 0);
    assert_eq!(t.count("entity_partition").await, 0);
    t.cleanup().await;
}

#[tokio::test]
async fn sql_functions_refuse_bad_input_with_invalid_parameter_value() {
    let t = TestSchema::new().await;
    let s = t.schema.name();
    let cases = [
        (
            format!("SELECT {s}.save_message('', 'e', 'x')"),
            "topic must not be empty",
        ),
        (
            format!("SELECT {s}.save_message('a/b', 'e', 'x')"),
            "invalid Kafka topic name",
        ),
        (
            format!("SELECT {s}.save_message('t', '', 'x')"),
            "entity key must not be empty",
        ),
        (
            format!("SELECT {s}.save_message('t', NULL, 'x')"),
            "entity key must not be empty",
        ),
        (
            format!("SELECT {s}.save_message('t', 'e', 'x', '[1]')"),
            "headers must be a JSON object",
        ),
        (
            format!("SELECT {s}.save_message('t', 'e', 'x', '{{\"h\": 1}}')"),
            "header values must be JSON strings",
        ),
        (
            format!("SELECT {s}.save_message('t', 'e', 'x', '{{\"\": \"v\"}}')"),
            "header names must not be empty",
        ),
        (
            format!(
                "SELECT {s}.enqueue_batch('{{t}}', '{{e,f}}', '{{x}}', '{{NULL}}', '{{NULL}}', '{{NULL}}', '{{0}}', '{{0}}', '{{}}', '{{}}')"
            ),
            "arrays differ in length",
        ),
        (
            format!(
                "SELECT {s}.enqueue_batch('{{t,t}}', '{{e,\"\"}}', '{{x,y}}', '{{NULL,NULL}}', '{{NULL,NULL}}', '{{NULL,NULL}}', '{{0,0}}', '{{0,0}}', '{{}}', '{{}}')"
            ),
            "entity key must not be empty",
        ),
        (
            format!(
                "SELECT {s}.enqueue_batch('{{t}}', '{{e}}', '{{x}}', '{{NULL}}', '{{NULL}}', '{{NULL}}', '{{0}}', '{{2}}', '{{a}}', '{{b}}')"
            ),
            "invalid header slice",
        ),
        (
            format!(
                "SELECT {s}.enqueue('t', 'E', '\\x00', NULL, NULL, ARRAY['h'], ARRAY[NULL::bytea], NULL)"
            ),
            "header values must not be NULL",
        ),
        (
            format!(
                "SELECT {s}.enqueue_batch('{{t}}', '{{e}}', '{{x}}', '{{NULL}}', '{{NULL}}', '{{NULL}}', '{{0}}', '{{1}}', '{{h}}', '{{NULL}}')"
            ),
            "header values must not be NULL",
        ),
        (
            format!("SELECT {s}.save_message('t', repeat('k', 3000), 'x')"),
            "entity key is 3000 bytes",
        ),
        (
            format!(
                "SELECT {s}.enqueue_batch('{{t}}', ARRAY[repeat('k', 1025)], '{{x}}', '{{NULL}}', '{{NULL}}', '{{NULL}}', '{{0}}', '{{0}}', '{{}}', '{{}}')"
            ),
            "entity key is 1025 bytes",
        ),
    ];
    for (sql, expected) in cases {
        let err = t.client.batch_execute(&sql).await.expect_err(&sql);
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(
            db.code(),
            &tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE,
            "{sql}"
        );
        assert!(db.message().contains(expected), "{sql}: {}", db.message());
    }
    assert_eq!(t.count("message").await, 0);
    assert_eq!(t.count("entity_partition").await, 0);
    t.cleanup().await;
}

/// A row inserted around the SQL functions cannot carry what the relay cannot decode either.
#[tokio::test]
async fn a_direct_insert_of_a_null_header_value_is_refused_by_the_table() {
    let t = TestSchema::new().await;
    let s = t.schema.name();
    let err = t
        .client
        .batch_execute(&format!(
            "INSERT INTO {s}.message (partition, topic, entity_key, header_names, header_values)
             VALUES (0, 't', 'e', ARRAY['h'], ARRAY[NULL::bytea])"
        ))
        .await
        .expect_err("refused");
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(db.code(), &tokio_postgres::error::SqlState::CHECK_VIOLATION);
    assert_eq!(t.count("message").await, 0);
    t.cleanup().await;
}

#[tokio::test]
async fn an_entity_key_longer_than_the_limit_is_refused_by_the_builder() {
    let key = "k".repeat(outbox::MAX_ENTITY_KEY_BYTES + 1);
    let err = Message::builder("t", key.as_str())
        .build()
        .expect_err("too long");
    assert!(
        matches!(err, Error::EntityKeyTooLong { size, max } if size == key.len() && max == outbox::MAX_ENTITY_KEY_BYTES),
        "{err:?}"
    );
    assert!(err.is_invalid_input());
    let fits = "k".repeat(outbox::MAX_ENTITY_KEY_BYTES);
    assert!(Message::builder("t", fits).build().is_ok());
}

#[tokio::test]
async fn an_outdated_schema_is_reported_with_the_fix() {
    let t = TestSchema::new().await;
    t.client
        .batch_execute(&format!("DELETE FROM {}.schema_migrations", t.schema))
        .await
        .expect("simulate an old schema");
    let err = outbox::check_schema(&t.client, &t.schema)
        .await
        .expect_err("outdated");
    let text = err.to_string();
    assert!(matches!(err, Error::SchemaNotReady { .. }), "{err:?}");
    assert!(
        text.contains("version 0") && text.contains("outboxd migrate"),
        "{text}"
    );
    t.cleanup().await;
}
