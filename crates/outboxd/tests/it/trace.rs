//! Trace context end to end: a writer stores its W3C trace context with the message
//! (`MessageBuilder::trace_context`, feature `trace-context` of the `outbox` crate); the relay
//! sends it as the Kafka headers `traceparent` and `tracestate`; a consumer reads back the
//! writer's trace id.

use std::time::Duration;

use crate::support::{RunningRelay, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_reads_back_the_writers_trace_id() {
    let setup = Setup::new(2).await;
    let topic = outbox_testkit::create_topic("trace", 1).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
    let mut client = outbox_testkit::connect().await;
    let tx = client.transaction().await.expect("begin");
    let message = outbox::Message::builder(&topic, "order-7")
        .payload(b"paid".to_vec())
        .trace_context(&traceparent, Some("congo=t61rcWkgMzE"))
        .build()
        .expect("valid");
    setup.outbox.save_in_tx(&tx, &message).await.expect("save");
    tx.commit().await.expect("commit");

    let relay = RunningRelay::start(setup.relay_config());
    let consumed = outbox_testkit::consume(&topic, 1, Duration::from_secs(60));
    assert_eq!(consumed.len(), 1);
    let header = consumed[0]
        .header("traceparent")
        .expect("traceparent header");
    assert_eq!(header.split('-').nth(1), Some(trace_id), "{header}");
    assert_eq!(
        consumed[0].header("tracestate").as_deref(),
        Some("congo=t61rcWkgMzE")
    );
    relay.stop().await;
    setup.cleanup().await;
}
