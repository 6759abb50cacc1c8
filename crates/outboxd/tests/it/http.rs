//! The operator endpoint: `/health` answers 503 naming a blocked partition and 200 when all
//! are relaying; `/metrics` serves what the render function returns.

use std::sync::Arc;

use outboxd::health::{Health, PartitionState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

#[tokio::test]
async fn health_and_metrics_endpoints() {
    let health = Arc::new(Health::default());
    health.set(0, PartitionState::Relaying);
    health.set(
        1,
        PartitionState::Blocked {
            message_id: 42,
            error: "Message size too large".into(),
        },
    );
    let render: outboxd::http::RenderMetrics =
        Arc::new(|| "outbox_relay_partition_blocked 1\n".to_owned());
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let (addr, _task) = outboxd::http::serve(
        "127.0.0.1:0".parse().expect("addr"),
        health.clone(),
        render,
        stop_rx,
    )
    .await
    .expect("serve");

    let blocked = get(addr, "/health").await;
    assert!(blocked.starts_with("HTTP/1.1 503"), "{blocked}");
    assert!(blocked.contains("blocked at message 42"), "{blocked}");

    health.set(1, PartitionState::Relaying);
    let ok = get(addr, "/health").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"healthy\":true"), "{ok}");

    let metrics = get(addr, "/metrics").await;
    assert!(
        metrics.starts_with("HTTP/1.1 200")
            && metrics.ends_with("outbox_relay_partition_blocked 1\n"),
        "{metrics}"
    );
    assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
}
