//! The shipped Grafana dashboard and Prometheus alert rules (`deploy/`): the rules load and
//! pass their unit tests in `promtool`, and every relay metric the dashboard or the rules
//! query exists on a running relay's `/metrics`.

use std::process::Command;
use std::time::Duration;

use crate::support::{RelayProcess, Setup, write_messages};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(format!("{DEPLOY}/prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool cannot run ({e}): `scripts/services deps` installs it (Debian's prometheus package)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_load_and_pass_their_unit_tests() {
    let checked = promtool(&["check", "rules", "outboxd-alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "outboxd-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every `outbox_relay_*` name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices("outbox_relay_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

fn exposed(metrics: &str, name: &str) -> bool {
    metrics
        .lines()
        .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_query_exists_on_a_running_relay() {
    let dashboard = std::fs::read_to_string(format!("{DEPLOY}/grafana/outboxd-dashboard.json"))
        .expect("dashboard");
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("valid JSON");
    let exprs: Vec<String> = parsed["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 10, "the dashboard's queries: {exprs:?}");
    let rules =
        std::fs::read_to_string(format!("{DEPLOY}/prometheus/outboxd-alerts.yml")).expect("rules");
    let mut wanted = metric_names(&exprs.join("\n"));
    wanted.extend(metric_names(&rules));
    wanted.sort();
    wanted.dedup();

    // A relay that published something (the histograms appear with the first batch).
    let setup = Setup::new(2).await;
    let topic = outbox_testkit::create_topic("dashboard", 2).await;
    let messages: Vec<(String, Vec<u8>)> =
        (0..6).map(|i| (format!("e-{i}"), b"x".to_vec())).collect();
    write_messages(&setup.outbox, &topic, &messages).await;
    let mut relay = RelayProcess::start(&[
        format!("--database-url={}", outbox_testkit::database_url()),
        format!("--brokers={}", outbox_testkit::brokers()),
        format!("--schema={}", setup.schema.name()),
        "--http-listen=127.0.0.1:0".to_owned(),
    ]);
    let out = relay.wait_for("serving /healthz", Duration::from_secs(30));
    let address = out
        .lines()
        .find_map(|l| l.split("bound=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("bound address")
        .to_owned();
    setup.wait_drained("published").await;
    let url = format!("http://{address}/metrics");
    // The backlog gauges appear with the first refresh after the leases are held.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let u = url.clone();
        let text = tokio::task::spawn_blocking(move || {
            ureq::get(&u)
                .call()
                .expect("scrape")
                .body_mut()
                .read_to_string()
                .expect("body")
        })
        .await
        .expect("scrape task");
        let missing: Vec<String> = wanted
            .iter()
            .filter(|n| !exposed(&text, n))
            .cloned()
            .collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "queried but not on /metrics: {missing:?}"
    );
    assert!(wanted.len() >= 12, "the names found: {wanted:?}");
    relay.stop();
    setup.cleanup().await;
}
