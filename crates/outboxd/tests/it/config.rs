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

/// The defaults in docs/configuration.md's table are `Config::default()`'s (which `--help`
/// shows too, from the same struct).
#[test]
fn the_documented_defaults_are_the_structs() {
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/configuration.md"
    ))
    .expect("docs");
    let defaults = serde_json::to_value(Config::default()).expect("serializes");
    let mut checked = 0;
    for line in docs.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = cells[0].trim_start_matches("| ").trim_matches('`');
        let Some(value) = defaults.get(key) else {
            continue;
        };
        let documented = cells[2].trim();
        let expected = match value {
            serde_json::Value::String(s) if s.is_empty() => None,
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(_) => continue,
            other => Some(other.to_string()),
        };
        match expected {
            Some(v) => assert_eq!(documented, format!("`{v}`"), "the default of {key}"),
            None => assert!(
                ["(required)", "none", "empty (off)"].contains(&documented),
                "{key} has no default, the docs say {documented}"
            ),
        }
        checked += 1;
    }
    assert!(checked >= 17, "only {checked} keys found in the table");
}

/// Defaults, file, environment and flags, in that order, through the binary.
#[test]
fn settings_layer_file_then_environment_then_flags_and_unknown_variables_are_refused() {
    use std::process::Command;
    let file = std::env::temp_dir().join(outbox_testkit::unique_name("layers.toml"));
    std::fs::write(
        &file,
        "batch_size = 3\npool_size = 4\n[kafka]\n\"linger.ms\" = \"7\"\n",
    )
    .expect("write");
    let run = |env: &[(&str, &str)], flags: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd"));
        cmd.args(["check-config", "--json", "--config"])
            .arg(&file)
            .args([
                "--database-url",
                "postgres://a@127.0.0.1/b",
                "--brokers",
                "x:1",
            ])
            .args(flags)
            .env_remove("OUTBOXD_DATABASE_URL")
            .env_remove("OUTBOXD_BROKERS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(
        &[
            ("OUTBOXD_POOL_SIZE", "5"),
            ("OUTBOXD_BATCH_SIZE", "6"),
            ("OUTBOXD_KAFKA__LINGER_MS", "9"),
            ("OUTBOXD_KAFKA__SASL_MECHANISM", "PLAIN"),
            ("OUTBOXD_TOPICS__AUDIT__ON_ERROR", "dead_letter"),
        ],
        &["--batch-size", "8"],
    );
    assert!(ok, "{err}");
    let c: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(c["batch_size"], 8, "the flag wins");
    assert_eq!(c["pool_size"], 5, "the environment over the file");
    assert_eq!(c["kafka"]["linger.ms"], "9");
    assert_eq!(c["kafka"]["sasl.mechanism"], "PLAIN");
    assert_eq!(c["topics"]["audit"]["on_error"], "dead_letter");
    assert_eq!(c["retry_max_ms"], 10000, "the default");
    let (ok, _, err) = run(&[("OUTBOXD_BATCH_SIZ", "6")], &[]);
    assert!(
        !ok && err.contains("batch_siz") && err.contains("OUTBOXD_"),
        "{err}"
    );
    let (ok, _, err) = run(&[("OUTBOXD_POOL_SIZE", "many")], &[]);
    assert!(!ok && err.contains("POOL_SIZE"), "{err}");
    let _ = std::fs::remove_file(&file);
}
