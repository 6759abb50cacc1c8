//! The hostile-input tour at the relay's boundaries, kept as tables: configuration values,
//! command lines, and a database that lost its settings. Each input gets a clear error
//! naming the problem (or a documented acceptance); none panics, stalls or runs silently
//! doing nothing.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use outboxd::{Config, Error};

use crate::support::{RunningRelay, Setup, wait_until, write_messages};

fn valid() -> Config {
    Config {
        database_url: "postgres://u@127.0.0.1/db".into(),
        brokers: "127.0.0.1:9092".into(),
        ..Config::default()
    }
}

fn kafka(key: &str, value: &str) -> impl Fn(&mut Config) {
    let (key, value) = (key.to_owned(), value.to_owned());
    move |c: &mut Config| {
        c.kafka.insert(key.clone(), value.clone());
    }
}

/// Every configuration problem of the tour, and the words its error must contain.
#[test]
fn every_bad_configuration_value_is_refused_with_its_name() {
    type Change = Box<dyn Fn(&mut Config)>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|c| c.database_url = String::new()),
            "database_url is required",
        ),
        (
            Box::new(|c| c.database_url = "postgres://[::1".into()),
            "database_url is not a valid",
        ),
        (Box::new(|c| c.brokers = " ".into()), "brokers is required"),
        (Box::new(|c| c.schema = "Outbox".into()), "schema"),
        (Box::new(|c| c.schema = "pg_outbox".into()), "system schema"),
        (
            Box::new(|c| c.batch_size = 0),
            "batch_size must be 1..=100000",
        ),
        (
            Box::new(|c| c.batch_size = 1_000_000),
            "batch_size must be 1..=100000",
        ),
        (
            Box::new(|c| c.wakeup_interval_ms = 0),
            "wakeup_interval_ms must be 1..=60000",
        ),
        (
            Box::new(|c| c.wakeup_interval_ms = u64::MAX),
            "wakeup_interval_ms must be 1..=60000",
        ),
        (
            Box::new(|c| c.poll_interval_ms = u64::MAX),
            "poll_interval_ms must be",
        ),
        (
            Box::new(|c| c.retry_initial_ms = 0),
            "retry_initial_ms must be",
        ),
        (
            Box::new(|c| c.retry_max_ms = u64::MAX),
            "retry_max_ms must be",
        ),
        (
            Box::new(|c| c.shutdown_timeout_ms = u64::MAX),
            "shutdown_timeout_ms must be",
        ),
        (
            Box::new(|c| c.mapping_cleanup_interval_ms = u64::MAX),
            "mapping_cleanup_interval_ms must be",
        ),
        (
            Box::new(|c| c.mapping_ttl_s = u64::MAX),
            "mapping_ttl_s must be",
        ),
        (
            Box::new(|c| {
                c.retry_initial_ms = 5000;
                c.retry_max_ms = 100;
            }),
            "must not exceed retry_max_ms",
        ),
        (
            Box::new(|c| c.http_listen = "localhost:9464".into()),
            "http_listen must be host:port with an IP",
        ),
        (
            Box::new(|c| {
                c.topics.insert(
                    "bad/topic".into(),
                    outboxd::TopicConfig {
                        on_error: outboxd::ErrorPolicy::Block,
                    },
                );
            }),
            "topics.\"bad/topic\"",
        ),
        (Box::new(kafka("bootstrap.servers", "x:1")), "use `brokers`"),
        (
            Box::new(kafka("metadata.broker.list", "x:1")),
            "use `brokers`",
        ),
        (
            Box::new(kafka("enable.idempotence", "false")),
            "enable.idempotence",
        ),
        (Box::new(kafka("acks", "1")), "acks=all"),
        (
            Box::new(kafka("request.required.acks", "1")),
            "alias of acks",
        ),
        (Box::new(kafka("max.in.flight", "20")), "max.in.flight"),
        (Box::new(kafka("retries", "0")), "retries"),
        (
            Box::new(kafka("message.timeout.ms", "1000")),
            "message.timeout.ms",
        ),
        (
            Box::new(kafka("delivery.timeout.ms", "1000")),
            "delivery.timeout.ms",
        ),
        (
            Box::new(kafka("enable.gapless.guarantee", "false")),
            "enable.gapless.guarantee",
        ),
        (Box::new(kafka("transactional.id", "x")), "transactional.id"),
        (
            Box::new(kafka("allow.auto.create.topics", "true")),
            "never lets the broker create topics",
        ),
        (
            Box::new(kafka("partitioner", "random")),
            "spread one entity over several Kafka partitions",
        ),
        (
            Box::new(kafka("Linger.ms", "5")),
            "not a librdkafka property name",
        ),
        (
            Box::new(kafka(" linger.ms", "5")),
            "not a librdkafka property name",
        ),
    ];
    for (change, expected) in cases {
        let mut config = valid();
        change(&mut config);
        let Err(Error::Config(problems)) = config.validate() else {
            panic!("accepted (expected {expected:?}): {config:?}");
        };
        let text = problems.join("\n");
        assert!(text.contains(expected), "expected {expected:?} in: {text}");
    }
    // Documented acceptances: a keyed partitioner, a harmless property, timeouts of 0.
    let mut config = valid();
    config
        .kafka
        .insert("partitioner".into(), "consistent_random".into());
    config.kafka.insert("linger.ms".into(), "5".into());
    config.shutdown_timeout_ms = 0;
    config.mapping_cleanup_interval_ms = 0;
    config.validate().expect("accepted");
}

fn outboxd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    cmd.args(args)
        .env_remove("OUTBOXD_DATABASE_URL")
        .env_remove("OUTBOXD_BROKERS")
        .env_remove("OUTBOXD_SCHEMA")
        .env_remove("OUTBOXD_CONFIG")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run outboxd")
}

/// Command lines of the tour: each fails with its exit code and an error an operator can act
/// on (for PostgreSQL, the server's own message and SQLSTATE, never a bare "db error").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_command_line_fails_with_an_error_an_operator_can_act_on() {
    let setup = Setup::new(1).await;
    let db = outbox_testkit::database_url();
    let pg: tokio_postgres::Config = db.parse().expect("url");
    let missing_db = format!(
        "postgres://{}@127.0.0.1:{}/no_such_database",
        pg.get_user().unwrap_or("outbox"),
        pg.get_ports()[0]
    );
    let unmigrated = outbox_testkit::unique_name("unmigrated");
    let foreign = outbox_testkit::unique_name("foreign");
    setup
        .client
        .batch_execute(&format!(
            "CREATE SCHEMA {foreign}; CREATE TABLE {foreign}.schema_migrations (version bigint, dirty boolean);"
        ))
        .await
        .expect("foreign schema");
    let schema = setup.schema.name().to_owned();
    let bad_config = std::env::temp_dir().join(format!("{schema}.toml"));
    std::fs::write(&bad_config, "database_url = 'x'\nbatch_sise = 10\n").expect("write");
    let bad_config = bad_config.to_string_lossy().into_owned();
    let cases: Vec<(Vec<&str>, i32, Vec<&str>)> = vec![
        (
            vec!["run"],
            1,
            vec!["database_url is required", "brokers is required"],
        ),
        (
            vec![
                "run",
                "--database-url",
                &db,
                "--brokers",
                "x:1",
                "--kafka",
                "novalue",
            ],
            2,
            vec!["invalid value 'novalue' for '--kafka <KEY=VALUE>': expected KEY=VALUE"],
        ),
        (
            vec!["run", "--on-error", "bogus"],
            2,
            vec!["unknown policy \"bogus\""],
        ),
        (
            vec![
                "run",
                "--database-url",
                &db,
                "--brokers",
                "x:1",
                "--wakeup-interval-ms",
                "18446744073709551615",
            ],
            1,
            vec!["wakeup_interval_ms must be 1..=60000"],
        ),
        (
            vec![
                "run",
                "--database-url",
                &db,
                "--brokers",
                "x:1",
                "--kafka",
                "partitioner=random",
            ],
            1,
            vec!["partitioner"],
        ),
        (
            vec![
                "run",
                "--database-url",
                &db,
                "--brokers",
                "x:1",
                "--kafka",
                "request.required.acks=1",
            ],
            1,
            vec!["alias of acks"],
        ),
        (
            vec![
                "run",
                "--database-url",
                &db,
                "--brokers",
                "x:1",
                "--schema",
                &schema,
                "--kafka",
                "message.max.bytes=1000",
            ],
            1,
            vec!["cannot carry the database's largest record"],
        ),
        (
            vec!["check-config", "--config", &bad_config],
            1,
            vec!["batch_sise"],
        ),
        (
            vec!["skip", "5", "--database-url", &db, "--schema", &unmigrated],
            1,
            vec!["does not exist", "SQLSTATE 42P01"],
        ),
        (
            vec!["migrate", "--database-url", &missing_db],
            1,
            vec!["no_such_database", "SQLSTATE 3D000"],
        ),
        (
            vec!["migrate", "--database-url", &db, "--schema", &foreign],
            1,
            vec!["cannot hold the outbox", "another migration tool"],
        ),
        (
            vec![
                "migrate",
                "--database-url",
                &db,
                "--schema",
                "information_schema",
            ],
            1,
            vec!["system schema"],
        ),
        (
            vec![
                "unpark",
                "nobody",
                "--database-url",
                &db,
                "--schema",
                &schema,
            ],
            1,
            vec!["not parked"],
        ),
        (
            vec!["skip", "424242", "--database-url", &db, "--schema", &schema],
            1,
            vec!["no waiting message with id 424242"],
        ),
    ];
    for (args, code, expected) in cases {
        let out = tokio::task::spawn_blocking({
            let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            move || outboxd(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[])
        })
        .await
        .expect("outboxd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        for e in expected {
            assert!(stderr.contains(e), "{args:?}: expected {e:?} in: {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            !stderr.trim_end().ends_with("db error"),
            "{args:?}: {stderr}"
        );
    }
    outbox_testkit::drop_schema(&setup.client, &foreign).await;
    setup.cleanup().await;
}

/// With no broker to reach, `/health` says so within seconds (not 200 for half a minute),
/// and SIGTERM ends the relay within its shutdown timeout, successfully: messages not
/// acknowledged stay in the outbox for the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_show_in_health_and_sigterm_exits_in_time() {
    let setup = Setup::new(1).await;
    write_messages(&setup.outbox, "t", &[("e".into(), b"x".to_vec())]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args([
            "run",
            "--shutdown-timeout-ms",
            "3000",
            "--http-listen",
            &listen,
        ])
        .env("OUTBOXD_DATABASE_URL", outbox_testkit::database_url())
        .env("OUTBOXD_BROKERS", "127.0.0.1:1")
        .env("OUTBOXD_SCHEMA", setup.schema.name())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let health = || {
        let url = format!("http://{listen}/health");
        async move {
            tokio::task::spawn_blocking(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .into();
                match agent.get(&url).call() {
                    Ok(mut r) => (
                        r.status().as_u16(),
                        r.body_mut().read_to_string().unwrap_or_default(),
                    ),
                    Err(_) => (0, String::new()),
                }
            })
            .await
            .unwrap_or((0, String::new()))
        }
    };
    wait_until(
        Duration::from_secs(15),
        "/health reports Kafka unreachable",
        || async {
            let (status, body) = health().await;
            status == 503 && body.contains("\"kafka\":\"unreachable")
        },
    )
    .await;
    let started = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "SIGTERM took longer than the shutdown timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    assert_eq!(setup.remaining().await, 1, "nothing retired without an ack");
    setup.cleanup().await;
}

/// A settings row lost under a running relay (a restore, a manual change around the trigger
/// that refuses deletes): the poller reports it and keeps trying instead of panicking, and
/// relaying resumes once the row is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_survives_its_settings_row_going_missing() {
    let setup = Setup::new(1).await;
    let topic = outbox_testkit::create_topic("settings", 1).await;
    let relay = RunningRelay::start(setup.relay_config());
    let mut expected = write_messages(&setup.outbox, &topic, &[("e".into(), b"1".to_vec())]).await;
    setup.wait_drained("first message").await;
    let s = setup.schema.name();
    setup
        .client
        .batch_execute(&format!(
            "ALTER TABLE {s}.settings DISABLE TRIGGER USER; DELETE FROM {s}.settings;"
        ))
        .await
        .expect("lose the row");
    // A new entity's writer gets a clear error (it needs the partition count); existing
    // entities write on. The poller cannot poll.
    let mut client = outbox_testkit::connect().await;
    let tx = client.transaction().await.expect("begin");
    let err = setup
        .outbox
        .save_in_tx(
            &tx,
            &outbox::Message::builder(topic.as_str(), "new")
                .payload(b"lost?".to_vec())
                .build()
                .expect("valid"),
        )
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("settings row"), "{err}");
    drop(tx);
    for (k, v) in write_messages(&setup.outbox, &topic, &[("e".into(), b"2".to_vec())]).await {
        expected.entry(k).or_default().extend(v);
    }
    // The poller reports the problem (before the fix it panicked: its task died silently).
    wait_until(Duration::from_secs(10), "the poller reports it", || {
        let body = relay.health.to_json();
        async move { body.contains("settings row") && body.contains("\"healthy\":false") }
    })
    .await;
    setup
        .client
        .batch_execute(&format!(
            "INSERT INTO {s}.settings (partition_count) VALUES (1); ALTER TABLE {s}.settings ENABLE TRIGGER USER;"
        ))
        .await
        .expect("restore the row");
    for (k, v) in write_messages(&setup.outbox, &topic, &[("e".into(), b"3".to_vec())]).await {
        expected.entry(k).or_default().extend(v);
    }
    setup.wait_drained("relaying resumed").await;
    assert!(relay.health.is_healthy(), "{}", relay.health.to_json());
    relay.stop().await;
    let consumed = outbox_testkit::consume(&topic, 3, Duration::from_secs(30));
    outbox_testkit::assert_dedup_order(&consumed, &expected);
    setup.cleanup().await;
}
