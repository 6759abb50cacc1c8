//! The relay's log output (the binary): `--log-format json` writes one JSON object per line,
//! with tokio-postgres's and librdkafka's records in the same stream; a warning repeated
//! during an outage is written once, then counted.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::Setup;

/// Runs `outboxd run args` with `env` for `seconds`, then SIGTERM; its stderr lines.
fn run_for(args: &[String], env: &[(&str, &str)], seconds: u64) -> Vec<String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    cmd.arg("run")
        .args(args)
        .env_remove("OUTBOXD_DATABASE_URL")
        .env_remove("OUTBOXD_BROKERS")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn");
    let pid = child.id().to_string();
    std::thread::sleep(Duration::from_secs(seconds));
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let out = child.wait_with_output().expect("output");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn parse(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn a_repeated_warning_is_written_once_as_json() {
    let lines = run_for(
        &[
            "--log-format=json".to_owned(),
            "--database-url=postgres://outbox@127.0.0.1:9/outbox_test".to_owned(),
            "--brokers=127.0.0.1:9".to_owned(),
            "--retry-initial-ms=50".to_owned(),
            "--retry-max-ms=100".to_owned(),
        ],
        &[],
        4,
    );
    let records = parse(&lines);
    let waiting = records
        .iter()
        .filter(|r| r["message"] == "cannot reach PostgreSQL to start; retrying")
        .count();
    // About 40 attempts in 4 s: one line.
    assert_eq!(waiting, 1, "{lines:#?}");
    assert!(
        records
            .iter()
            .all(|r| r["level"].is_string() && r["timestamp"].is_string()),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drivers_records_reach_the_same_json_stream() {
    let setup = Setup::new(1).await;
    let lines = run_for(
        &[
            "--log-format=json".to_owned(),
            format!("--database-url={}", outbox_testkit::database_url()),
            "--brokers=127.0.0.1:9".to_owned(),
            format!("--schema={}", setup.schema.name()),
            "--shutdown-timeout-ms=500".to_owned(),
        ],
        &[("RUST_LOG", "info,tokio_postgres=debug")],
        4,
    );
    let records = parse(&lines);
    let targets: Vec<&str> = records
        .iter()
        .filter_map(|r| r["target"].as_str())
        .collect();
    assert!(
        targets.iter().any(|t| t.starts_with("tokio_postgres")),
        "{targets:?}"
    );
    assert!(targets.contains(&"librdkafka"), "{targets:?}");
    setup.cleanup().await;
}
