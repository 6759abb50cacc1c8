//! The operator's HTTP endpoints, served by axum on `http_listen`:
//!
//! - `GET /healthz`: liveness. 200 while the relay's loops go round; 503 when one is stuck.
//!   Outages of PostgreSQL or Kafka never fail it (a restarted pod would not end them).
//! - `GET /readyz`: readiness. 200 when PostgreSQL and Kafka are reachable and this instance
//!   holds every partition of its share; blocked partitions are listed.
//! - `GET /health`: every detail (partition states, leases, tasks, producer); 503 when
//!   anything needs attention, Kafka retries included.
//! - `GET /metrics`: Prometheus text.
//!
//! Bodies are JSON (but `/metrics`). Other methods get 405, other paths 404.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::health::Health;
use crate::shutdown::Shutdown;

/// Renders the metrics text on request.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct Endpoints {
    health: Arc<Health>,
    render: RenderMetrics,
}

/// Binds `addr` and serves until `stop` turns true. Returns the bound address (useful when
/// `addr` has port 0) and the server's task; should the server fail, `/health` shows it.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    render: RenderMetrics,
    shutdown: Shutdown,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await.map_err(|e| Error::Io {
        context: "binding http_listen",
        source: e,
    })?;
    let bound = listener.local_addr().map_err(|e| Error::Io {
        context: "reading the bound address",
        source: e,
    })?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/health", get(everything))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(Endpoints {
            health: Arc::clone(&health),
            render,
        });
    let task = tokio::spawn(async move {
        let stopped = async move {
            shutdown.requested().await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %e, "the HTTP endpoint stopped");
            health.set_task("http endpoint", Some(format!("stopped: {e}")));
        }
    });
    Ok((bound, task))
}

fn json(ok: bool, body: &serde_json::Value) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn healthz(State(e): State<Endpoints>) -> Response {
    let (alive, body) = e.health.liveness();
    json(alive, &body)
}

async fn readyz(State(e): State<Endpoints>) -> Response {
    let (ready, body) = e.health.readiness();
    json(ready, &body)
}

async fn everything(State(e): State<Endpoints>) -> Response {
    let status = if e.health.is_healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        e.health.to_json(),
    )
        .into_response()
}

async fn metrics(State(e): State<Endpoints>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        (e.render)(),
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "try /healthz, /readyz, /health or /metrics\n",
    )
        .into_response()
}
