//! The operator's HTTP endpoints, through a real HTTP client (ureq): liveness stays 200
//! through PostgreSQL and Kafka outages and fails only for a stuck loop; readiness needs
//! PostgreSQL, Kafka and the instance's share of partitions, and lists blocked partitions;
//! `/health` answers 503 naming a blocked partition; `/metrics` serves what the render
//! function returns; other methods and paths are refused.

use std::sync::Arc;
use std::time::Duration;

use outboxd::health::{Health, PartitionState};
use serde_json::Value;

use crate::support::{RunningRelay, Setup, wait_until};

/// One request; the status and the body, whatever the status.
async fn request(method: &'static str, url: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut response = match method {
            "GET" => agent.get(&url).call(),
            "POST" => agent.post(&url).send_empty(),
            other => panic!("method {other}"),
        }
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().expect("body");
        (status, body)
    })
    .await
    .expect("request task")
}

async fn get(base: &str, path: &str) -> (u16, String) {
    request("GET", format!("{base}{path}")).await
}

async fn get_json(base: &str, path: &str) -> (u16, Value) {
    let (status, body) = get(base, path).await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (status, json)
}

async fn serve(health: Arc<Health>) -> (String, outboxd::shutdown::Shutdown) {
    let render: outboxd::http::RenderMetrics =
        Arc::new(|| "outbox_relay_partition_blocked 1\n".to_owned());
    let stop = outboxd::shutdown::Shutdown::new();
    let (addr, _task) = outboxd::http::serve(
        "127.0.0.1:0".parse().expect("addr"),
        health,
        render,
        stop.clone(),
    )
    .await
    .expect("serve");
    (format!("http://{addr}"), stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_health_and_metrics_answer_by_state() {
    let health = Arc::new(Health::default());
    let (base, _stop) = serve(health.clone()).await;

    // Not started: alive, not ready.
    let (status, live) = get_json(&base, "/healthz").await;
    assert_eq!(
        (status, &live["alive"]),
        (200, &Value::Bool(true)),
        "{live}"
    );
    let (status, ready) = get_json(&base, "/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert!(
        ready["reasons"][0]
            .as_str()
            .is_some_and(|r| r.contains("starting")),
        "{ready}"
    );

    health.set_started();
    health.set(0, PartitionState::Relaying);
    health.set(
        1,
        PartitionState::Blocked {
            message_id: 42,
            error: "Message size too large".into(),
        },
    );
    // Blocked: listed by readiness (still ready), and /health answers 503.
    let (status, ready) = get_json(&base, "/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["blocked"][0]["message_id"], 42, "{ready}");
    let (status, everything) = get(&base, "/health").await;
    assert_eq!(status, 503);
    assert!(everything.contains("blocked at message 42"), "{everything}");
    health.set(1, PartitionState::Relaying);
    assert_eq!(get(&base, "/health").await.0, 200);

    // Kafka unreachable: not ready, still alive.
    health.set_kafka(Some("1/1 brokers are down".into()));
    let (status, ready) = get_json(&base, "/readyz").await;
    assert_eq!(status, 503);
    assert!(ready.to_string().contains("Kafka unreachable"), "{ready}");
    assert_eq!(get(&base, "/healthz").await.0, 200);
    health.set_kafka(None);

    // A loop that stops going round fails liveness, by name.
    health.beat("wake-up poller", Duration::from_millis(100));
    assert_eq!(get(&base, "/healthz").await.0, 200);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (status, live) = get_json(&base, "/healthz").await;
    assert_eq!(status, 503, "{live}");
    assert!(
        live["loops"]["wake-up poller"]["quiet_ms"].as_u64() >= Some(200),
        "{live}"
    );

    let (status, metrics) = get(&base, "/metrics").await;
    assert_eq!(
        (status, metrics.as_str()),
        (200, "outbox_relay_partition_blocked 1\n")
    );
    assert_eq!(get(&base, "/other").await.0, 404);
    assert_eq!(request("POST", format!("{base}/healthz")).await.0, 405);
}

/// A relay whose database or brokers are a closed port: alive, and not ready, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_keeps_the_relay_alive_and_unready() {
    let setup = Setup::new(2).await;
    let closed = "127.0.0.1:9"; // discard: nothing listens
    for (config, why) in [
        (
            outboxd::Config {
                database_url: format!("postgres://outbox@{closed}/outbox_test"),
                ..setup.relay_config()
            },
            "starting",
        ),
        (
            outboxd::Config {
                brokers: closed.to_owned(),
                ..setup.relay_config()
            },
            "Kafka unreachable",
        ),
    ] {
        let relay = RunningRelay::start(config);
        let (base, _stop) = serve(relay.health.clone()).await;
        wait_until(Duration::from_secs(60), why, || async {
            let (status, ready) = get_json(&base, "/readyz").await;
            status == 503 && ready["reasons"].to_string().contains(why)
        })
        .await;
        let (status, live) = get_json(&base, "/healthz").await;
        assert_eq!(status, 200, "alive during the outage ({why}): {live}");
        relay.kill().await;
    }
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_relay_is_ready_once_it_holds_its_share() {
    let setup = Setup::new(4).await;
    let relay = RunningRelay::start(setup.relay_config());
    let (base, _stop) = serve(relay.health.clone()).await;
    wait_until(Duration::from_secs(30), "ready", || async {
        get(&base, "/readyz").await.0 == 200
    })
    .await;
    let (_, ready) = get_json(&base, "/readyz").await;
    assert_eq!(
        ready["partitions"]["assigned"],
        serde_json::json!([0, 1, 2, 3]),
        "{ready}"
    );
    assert_eq!(
        ready["partitions"]["held"],
        serde_json::json!([0, 1, 2, 3]),
        "{ready}"
    );
    let (status, live) = get_json(&base, "/healthz").await;
    assert_eq!(status, 200, "{live}");
    assert!(live["loops"]["wake-up poller"].is_object(), "{live}");
    assert!(live["loops"]["lease task"].is_object(), "{live}");
    relay.stop().await;
    setup.cleanup().await;
}
