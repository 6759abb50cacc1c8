//! The Prometheus metrics of a running `outboxd` (the binary, with its exporter): latency and
//! batch-size histograms carry explicit buckets (they aggregate; no summaries); the backlog
//! gauges count what waits and how old it is while Kafka is away, and drop to zero once it
//! was published; the producer's queue, dead letters and parked entities are exported.

use std::time::Duration;

use crate::support::{RelayProcess, Setup, write_messages};

/// The address the relay says it serves on (it binds port 0).
fn bound_address(relay: &mut RelayProcess) -> String {
    let out = relay.wait_for("serving /healthz", Duration::from_secs(30));
    let line = out
        .lines()
        .find(|l| l.contains("serving /healthz"))
        .expect("the serving line");
    let at = line.find("bound=").expect("bound=") + "bound=".len();
    line[at..]
        .split_whitespace()
        .next()
        .expect("address")
        .to_owned()
}

async fn scrape(address: &str) -> String {
    let url = format!("http://{address}/metrics");
    tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .body_mut()
            .read_to_string()
            .expect("body")
    })
    .await
    .expect("scrape")
}

/// The sum of the samples of `name` whose labels contain `schema`.
fn sum(text: &str, name: &str, schema: &str) -> Option<f64> {
    let samples: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(schema))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

fn args(setup: &Setup, brokers: &str) -> Vec<String> {
    vec![
        format!("--database-url={}", outbox_testkit::database_url()),
        format!("--brokers={brokers}"),
        format!("--schema={}", setup.schema.name()),
        "--http-listen=127.0.0.1:0".to_owned(),
        "--shutdown-timeout-ms=1000".to_owned(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histograms_have_buckets_and_the_backlog_gauges_follow_the_backlog() {
    let setup = Setup::new(2).await;
    let schema = setup.schema.name().to_owned();
    let topic = outbox_testkit::create_topic("metrics", 2).await;
    let messages: Vec<(String, Vec<u8>)> = (0..25)
        .map(|i| (format!("entity-{}", i % 5), vec![b'x'; 10]))
        .collect();
    write_messages(&setup.outbox, &topic, &messages).await;

    // Kafka away (nothing listens on the discard port): everything waits.
    let mut relay = RelayProcess::start(&args(&setup, "127.0.0.1:9"));
    let address = bound_address(&mut relay);
    crate::support::wait_until(Duration::from_secs(40), "the backlog gauges", || async {
        let text = scrape(&address).await;
        sum(&text, "outbox_relay_waiting_messages", &schema) == Some(25.0)
            && sum(&text, "outbox_relay_oldest_waiting_age_seconds", &schema)
                .is_some_and(|age| age > 0.0)
    })
    .await;
    let text = scrape(&address).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("outbox_relay_producer_queue_messages ")),
        "{text}"
    );
    for gauge in ["outbox_relay_dead_letters", "outbox_relay_parked_entities"] {
        assert_eq!(sum(&text, gauge, &schema), Some(0.0), "{gauge}: {text}");
    }
    relay.stop();

    // Kafka back: published; the histograms have buckets, the backlog drops to zero.
    let mut relay = RelayProcess::start(&args(&setup, &outbox_testkit::brokers()));
    let address = bound_address(&mut relay);
    setup.wait_drained("published").await;
    crate::support::wait_until(Duration::from_secs(40), "the backlog at zero", || async {
        let text = scrape(&address).await;
        sum(&text, "outbox_relay_waiting_messages", &schema) == Some(0.0)
    })
    .await;
    let text = scrape(&address).await;
    for histogram in [
        "outbox_relay_commit_to_ack_seconds",
        "outbox_relay_batch_duration_seconds",
        "outbox_relay_batch_size_messages",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{histogram}_bucket{{")) && l.contains("le=\"")),
            "{histogram} has buckets: {text}"
        );
        assert!(
            !text.contains(&format!("{histogram}{{")) || !text.contains("quantile="),
            "{histogram} is not a summary"
        );
    }
    assert_eq!(
        sum(&text, "outbox_relay_commit_to_ack_seconds_count", &schema),
        Some(25.0),
        "{text}"
    );
    relay.stop();
    setup.cleanup().await;
}
