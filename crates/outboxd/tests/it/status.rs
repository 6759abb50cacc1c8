//! `outboxd status` (the binary, `--json` and tables) against running relays: a partition in
//! each state it can show: relaying, blocked (with the blocking message and Kafka's error),
//! parked entities and dead letters, retrying while Kafka is away, and unowned once the
//! owner died and its lease ran out. `migrate --status` lists applied and pending
//! migrations.

use std::time::Duration;

use outboxd::ErrorPolicy;
use serde_json::Value;

use crate::support::{RunningRelay, Setup, pin, wait_until, write_messages};

/// Runs `outboxd args`, which must succeed; its stdout.
fn outboxd(args: &[&str]) -> String {
    let (ok, out, err) = crate::support::outboxd(args);
    assert!(ok, "outboxd {args:?}: {out}{err}");
    out
}

fn status(schema: &str) -> Value {
    serde_json::from_str(&outboxd(&["status", "--json", "--schema", schema])).expect("JSON")
}

/// Partition `p` of a `status --json` answer.
pub fn partition(status: &Value, p: i32) -> Value {
    status["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|x| x["partition"] == p)
        .cloned()
        .unwrap_or_else(|| panic!("partition {p} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_each_partition_state() {
    let setup = Setup::new(4).await;
    let schema = setup.schema.name().to_owned();
    let good = outbox_testkit::create_topic("status-good", 2).await;
    let missing_block = outbox_testkit::unique_name("status-missing-block");
    let missing_park = outbox_testkit::unique_name("status-missing-park");
    pin(&setup, "relayed", 0).await;
    pin(&setup, "blocker", 1).await;
    pin(&setup, "parker", 2).await;
    write_messages(&setup.outbox, &good, &[("relayed".into(), b"1".to_vec())]).await;
    let blocked_id = write_messages(
        &setup.outbox,
        &missing_block,
        &[("blocker".into(), b"2".to_vec())],
    )
    .await["blocker"][0];
    write_messages(
        &setup.outbox,
        &missing_park,
        &[("parker".into(), b"3".to_vec())],
    )
    .await;

    let mut config = setup.relay_config();
    config.lease_ttl_ms = 3000;
    config.retry_max_ms = 500;
    config.topics.insert(
        missing_park.clone(),
        outboxd::TopicConfig {
            on_error: ErrorPolicy::ParkEntity,
        },
    );
    let relay = RunningRelay::start(config);
    wait_until(
        Duration::from_secs(60),
        "blocked, parked and reported",
        || async {
            let s = status(&schema);
            partition(&s, 1)["state"] == "blocked"
                && partition(&s, 2)["parked_entities"] == 1
                && partition(&s, 0)["state"] == "relaying"
        },
    )
    .await;
    let s = status(&schema);
    let blocked = partition(&s, 1);
    assert_eq!(blocked["message_id"], blocked_id, "{blocked}");
    assert!(
        blocked["error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("unknown topic")),
        "{blocked}"
    );
    assert_eq!(blocked["waiting"], 1, "{blocked}");
    assert!(
        blocked["oldest_waiting_seconds"].as_f64().is_some(),
        "{blocked}"
    );
    assert_eq!(partition(&s, 2)["dead_letters"], 1);
    assert_eq!(s["parked_entities"], 1);
    assert_eq!(s["dead_letters"], 1);
    assert_eq!(s["partition_count"], 4);
    assert_eq!(s["schema_version"], outbox::SCHEMA_VERSION);
    let instances = s["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 1, "{s}");
    assert_eq!(instances[0]["alive"], true);
    assert_eq!(instances[0]["leases"], 4);
    for p in 0..4 {
        assert_eq!(
            partition(&s, p)["owner"],
            instances[0]["id"],
            "partition {p}"
        );
    }
    let table = outboxd(&["status", "--schema", &schema]);
    assert!(
        table.contains(&format!("blocked at message {blocked_id}")),
        "{table}"
    );

    // The owner dies: once its leases run out, the blocked partition is unowned.
    relay.kill().await;
    wait_until(Duration::from_secs(30), "unowned", || async {
        partition(&status(&schema), 1)["state"] == "unowned"
    })
    .await;
    let s = status(&schema);
    assert_eq!(s["instances"][0]["alive"], false, "{s}");
    assert_eq!(
        partition(&s, 0)["state"],
        "idle",
        "nothing waits in partition 0: {s}"
    );
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_retrying_while_kafka_is_away() {
    let setup = Setup::new(2).await;
    let schema = setup.schema.name().to_owned();
    let topic = outbox_testkit::create_topic("status-retry", 2).await;
    pin(&setup, "waiting", 1).await;
    write_messages(&setup.outbox, &topic, &[("waiting".into(), b"1".to_vec())]).await;
    let mut config = setup.relay_config();
    config.brokers = "127.0.0.1:9".to_owned(); // nothing listens
    config.lease_ttl_ms = 3000;
    let relay = RunningRelay::start(config);
    wait_until(Duration::from_secs(60), "retrying", || async {
        partition(&status(&schema), 1)["state"] == "retrying"
    })
    .await;
    let p = partition(&status(&schema), 1);
    assert!(p["message_id"].as_i64().is_some(), "{p}");
    assert!(p["error"].as_str().is_some(), "{p}");
    relay.kill().await;
    setup.cleanup().await;
}

#[tokio::test]
async fn migrate_status_lists_applied_and_pending_migrations() {
    let fresh = outbox_testkit::unique_name("mig");
    let before: Value = serde_json::from_str(&outboxd(&[
        "migrate", "--status", "--json", "--schema", &fresh,
    ]))
    .expect("JSON");
    let migrations = before["migrations"].as_array().expect("list");
    assert_eq!(migrations.len(), outbox::SCHEMA_VERSION as usize);
    assert!(migrations.iter().all(|m| m["pending"] == true), "{before}");
    outboxd(&["migrate", "--schema", &fresh]);
    let after: Value = serde_json::from_str(&outboxd(&[
        "migrate", "--status", "--json", "--schema", &fresh,
    ]))
    .expect("JSON");
    assert!(
        after["migrations"]
            .as_array()
            .expect("list")
            .iter()
            .all(|m| m["pending"] == false && m["applied_at"].is_string()),
        "{after}"
    );
    let table = outboxd(&["migrate", "--status", "--schema", &fresh]);
    assert!(
        table.contains("0 pending") && table.contains("0006_status"),
        "{table}"
    );
    let client = outbox_testkit::connect().await;
    outbox_testkit::drop_schema(&client, &fresh).await;
}

#[test]
fn completions_man_page_and_json_outputs_are_generated() {
    let bash = outboxd(&["completions", "bash"]);
    for word in [
        "outboxd",
        "dead-letters",
        "partitions",
        "status",
        "--log-format",
    ] {
        assert!(bash.contains(word), "the bash completion knows {word}");
    }
    assert!(outboxd(&["completions", "zsh"]).contains("#compdef outboxd"));
    let man = outboxd(&["man"]);
    assert!(man.contains(".TH outboxd 1"), "{man}");
    assert!(
        man.contains("OUTBOXD_BATCH_SIZE"),
        "the man page names the variables"
    );
    let sql: Value =
        serde_json::from_str(&outboxd(&["print-sql", "--json", "--schema", "x"])).expect("JSON");
    assert!(
        sql["renew_leases"]
            .as_str()
            .is_some_and(|s| s.contains("x.partition_lease"))
    );
    let config: Value = serde_json::from_str(&outboxd(&["check-config", "--json"])).expect("JSON");
    assert_eq!(config["batch_size"], 1000);
}
