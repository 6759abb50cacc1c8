//! Least-privilege roles (migration 0005): a writer role can write messages through the
//! library and the SQL functions and do nothing else with the outbox tables; the relay runs
//! as a relay role. The roles log in without a password: the test cluster trusts loopback.

use std::time::Duration;

use outbox::Message;

use crate::support::{RunningRelay, Setup, write_messages};

/// A login role of this test's own, with the grants `grant` (`grant_writer` or `grant_relay`)
/// gives it; dropped with `drop_role`.
async fn role(setup: &Setup, grant: &str) -> String {
    let name = outbox_testkit::unique_name("role").replace('-', "_");
    setup
        .client
        .batch_execute(&format!(
            "CREATE ROLE {name} LOGIN; SELECT {}.{grant}('{name}');",
            setup.schema
        ))
        .await
        .expect("create the role");
    name
}

async fn drop_role(setup: &Setup, name: &str) {
    setup
        .client
        .batch_execute(&format!("DROP OWNED BY {name}; DROP ROLE {name};"))
        .await
        .expect("drop the role");
}

/// The test database's URL with `user` as the user.
fn url_as(user: &str) -> String {
    let mut config: tokio_postgres::Config = outbox_testkit::database_url().parse().expect("url");
    config.user(user);
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("outbox_test");
    format!("postgres://{user}@{host}:{port}/{db}")
}

async fn connect_as(user: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&url_as(user), tokio_postgres::NoTls)
        .await
        .expect("connect as the role");
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_role_writes_messages_and_can_do_nothing_else() {
    let setup = Setup::new(2).await;
    let writer = role(&setup, "grant_writer").await;
    let mut client = connect_as(&writer).await;
    let s = setup.schema.name();

    // Through the library, in the writer's own transaction.
    let tx = client.transaction().await.expect("begin");
    let msg = Message::builder("orders", "order-1")
        .payload(b"created".to_vec())
        .build()
        .expect("valid");
    let id = setup
        .outbox
        .save_in_tx(&tx, &msg)
        .await
        .expect("save_in_tx");
    let ids = setup
        .outbox
        .save_all_in_tx(&tx, &[msg.clone(), msg])
        .await
        .expect("save_all_in_tx");
    tx.commit().await.expect("commit");
    assert!(ids.iter().all(|i| *i > id));
    // Through the SQL function, as another language would.
    let from_sql: i64 = client
        .query_one(
            &format!("SELECT {s}.save_message('orders', 'order-2', 'x'::bytea)"),
            &[],
        )
        .await
        .expect("save_message")
        .get(0);
    assert!(from_sql > id);
    assert_eq!(setup.remaining().await, 4, "every write arrived");

    // Nothing else.
    for sql in [
        format!("SELECT payload FROM {s}.message"),
        format!("DELETE FROM {s}.message"),
        format!("UPDATE {s}.message SET payload = NULL"),
        format!("INSERT INTO {s}.message (partition, topic, entity_key) VALUES (0, 't', 'e')"),
        format!("SELECT * FROM {s}.entity_partition"),
        format!("SELECT * FROM {s}.dead_letter"),
        format!("UPDATE {s}.settings SET partition_count = 1"),
        format!("SELECT {s}.grant_relay('{writer}')"),
    ] {
        let err = client
            .batch_execute(&sql)
            .await
            .expect_err(&format!("{sql} must be refused"));
        let code = err.code().map(|c| c.code().to_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err:?}");
    }
    assert_eq!(setup.remaining().await, 4, "nothing was deleted");
    drop(client);
    drop_role(&setup, &writer).await;
    setup.cleanup().await;
}

/// The relay runs as a relay role: it claims leases, publishes and retires, moves a message
/// Kafka refuses for good to `dead_letter`, and forgets mappings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_runs_as_a_relay_role() {
    let setup = Setup::new(2).await;
    let relay_role = role(&setup, "grant_relay").await;
    let topic = outbox_testkit::create_topic("roles", 2).await;
    let messages: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("r{}", i % 8), format!("m{i}").into_bytes()))
        .collect();
    let expected = write_messages(&setup.outbox, &topic, &messages).await;
    let missing = outbox_testkit::unique_name("missing-topic");
    write_messages(
        &setup.outbox,
        &missing,
        &[("x".into(), b"refused".to_vec())],
    )
    .await;
    let mut config = outboxd::Config {
        database_url: url_as(&relay_role),
        on_error: outboxd::config::ErrorPolicy::DeadLetter,
        mapping_cleanup_interval_ms: 100,
        mapping_ttl_s: 0,
        ..setup.relay_config()
    };
    config
        .kafka
        .insert("topic.metadata.propagation.max.ms".into(), "1000".into());
    let relay = RunningRelay::start(config);
    setup
        .wait_drained("every message retired or moved aside")
        .await;
    let consumed = outbox_testkit::consume(&topic, 40, Duration::from_secs(30));
    outbox_testkit::assert_dedup_order(&consumed, &expected);
    let c = &setup.client;
    let dead: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM {}.dead_letter", setup.schema),
            &[],
        )
        .await
        .expect("dead letters")
        .get(0);
    assert_eq!(dead, 1, "the refused message was moved aside");
    crate::support::wait_until(Duration::from_secs(30), "mappings forgotten", || async {
        c.query_one(
            &format!("SELECT count(*) FROM {}.entity_partition", setup.schema),
            &[],
        )
        .await
        .is_ok_and(|r| r.get::<_, i64>(0) == 0)
    })
    .await;
    assert!(
        relay.health.is_healthy(),
        "no task fails for lack of a privilege: {}",
        relay.health.to_json()
    );
    relay.stop().await;
    drop_role(&setup, &relay_role).await;
    setup.cleanup().await;
}
