//! Configuration at the boundary: unknown keys, every problem reported at once, and
//! librdkafka passthrough options that would break ordering are refused.

use outboxd::{Config, Error};

#[test]
fn unknown_keys_are_refused_with_their_name() {
    let err = Config::from_toml("database_url = 'x'\nbatch_sise = 10\n").expect_err("typo");
    assert!(err.contains("batch_sise"), "{err}");
}

#[test]
fn validate_reports_every_problem_at_once() {
    let config = Config {
        database_url: String::new(),
        brokers: String::new(),
        schema: "Bad-Schema".into(),
        batch_size: 0,
        retry_initial_ms: 5000,
        retry_max_ms: 100,
        ..Config::default()
    };
    let Err(Error::Config(problems)) = config.validate() else {
        panic!("invalid config accepted");
    };
    let text = problems.join("\n");
    for needle in [
        "database_url",
        "brokers",
        "schema",
        "batch_size",
        "retry_initial_ms",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    assert_eq!(problems.len(), 5, "{text}");
}

#[test]
fn passthrough_that_breaks_ordering_is_refused() {
    let mut config = Config {
        database_url: "postgres://u@127.0.0.1/db".into(),
        brokers: "127.0.0.1:9092".into(),
        ..Config::default()
    };
    config.kafka.insert("linger.ms".into(), "10".into());
    config.validate().expect("harmless passthrough is accepted");
    config
        .kafka
        .insert("enable.idempotence".into(), "false".into());
    config
        .kafka
        .insert("max.in.flight.requests.per.connection".into(), "20".into());
    // A message that times out leaves a gap its entity's next message can overtake.
    config
        .kafka
        .insert("message.timeout.ms".into(), "1500".into());
    config
        .kafka
        .insert("delivery.timeout.ms".into(), "1500".into());
    let err = config
        .validate()
        .expect_err("ordering-breaking passthrough")
        .to_string();
    for key in [
        "enable.idempotence",
        "max.in.flight",
        "message.timeout.ms",
        "delivery.timeout.ms",
    ] {
        assert!(err.contains(key), "{key} not refused: {err}");
    }
}

#[test]
fn a_full_file_parses() {
    let config = Config::from_toml(
        r#"
        database_url = "postgres://outbox@127.0.0.1:55432/outbox_demo"
        brokers = "127.0.0.1:39092"
        schema = "outbox"
        batch_size = 200
        poll_interval_ms = 50
        [kafka]
        "linger.ms" = "2"
        "#,
    )
    .expect("valid file");
    config.validate().expect("valid config");
    assert_eq!(config.batch_size, 200);
    assert_eq!(config.kafka.get("linger.ms").map(String::as_str), Some("2"));
}
