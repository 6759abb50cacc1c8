//! Opening the relay's PostgreSQL sessions: every task (workers, wake-up poller, mapping
//! cleanup, control) connects the same way, drives the connection in the background, and
//! applies its session settings before its first statement.

use tokio_postgres::{Client, NoTls};

use crate::error::{Error, Result};

/// Connects, spawns the connection's driver, and runs `setup` (e.g. `sql::SESSION_SETUP`
/// plus an `application_name`). `role` names the session in logs and errors.
pub async fn connect(
    pg_config: &tokio_postgres::Config,
    setup: &str,
    role: &'static str,
) -> Result<Client> {
    let (client, connection) = pg_config
        .connect(NoTls)
        .await
        .map_err(Error::pg("connecting"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, session = role, "connection ended");
        }
    });
    client
        .batch_execute(setup)
        .await
        .map_err(Error::pg("setting up the session"))?;
    Ok(client)
}
