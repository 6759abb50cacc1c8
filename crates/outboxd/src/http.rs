//! A deliberately tiny HTTP/1.1 endpoint for operators: `GET /metrics` (Prometheus text, from
//! whatever render function the binary passes) and `GET /health` (200 when every partition
//! is fine, 503 otherwise, with a JSON body). One request per connection; nothing else.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::health::Health;

/// Renders the metrics text on request.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `addr` and serves until `stop` turns true. Returns the bound address (useful when
/// `addr` has port 0).
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    render: RenderMetrics,
    mut stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await.map_err(|e| Error::Io {
        context: "binding http_listen",
        source: e,
    })?;
    let bound = listener.local_addr().map_err(|e| Error::Io {
        context: "reading the bound address",
        source: e,
    })?;
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((stream, _)) = accepted {
                        let (health, render) = (Arc::clone(&health), Arc::clone(&render));
                        tokio::spawn(async move { respond(stream, &health, &render).await });
                    }
                }
                _ = stop.changed() => return,
            }
        }
    });
    Ok((bound, task))
}

async fn respond(mut stream: tokio::net::TcpStream, health: &Health, render: &RenderMetrics) {
    let mut buf = [0u8; 2048];
    let n = match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
        .await
    {
        Ok(Ok(n)) => n,
        _ => return,
    };
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) = match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", render()),
        "/health" if health.is_healthy() => ("200 OK", "application/json", health.to_json()),
        "/health" => (
            "503 Service Unavailable",
            "application/json",
            health.to_json(),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /health\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
