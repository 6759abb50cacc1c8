//! Opening the relay's PostgreSQL sessions: every task (workers, wake-up poller, mapping
//! cleanup, control) connects the same way, drives the connection in the background, and
//! applies its session settings before its first statement. Sessions that compare
//! transaction snapshots with rows also learn which incarnation of the database they talk to.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::sql::Statements;

/// Which life of the database a session talks to. Transaction ids are not stable across
/// crash recovery (ids whose WAL was not flushed are handed out again; a crash of a single
/// backend is enough) or a failover, so a snapshot taken in one incarnation must never be
/// compared with rows written in another: sessions of the same incarnation may share
/// snapshots, others must start over. See `migrations/0003_nothing_lost.sql`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incarnation(Arc<str>);

impl Incarnation {
    /// An incarnation from its text (system identifier and token).
    pub fn new(text: impl Into<Arc<str>>) -> Self {
        Incarnation(text.into())
    }
}

impl std::fmt::Display for Incarnation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads (creating it when needed) the incarnation of the database `client` talks to.
pub async fn incarnation(client: &Client, sql: &Statements) -> Result<Incarnation> {
    // Two sessions that find the table empty at once: one creates the token, the other's
    // statement cannot see it yet and answers NULL; its next statement can.
    for _ in 0..10 {
        let token: Option<String> = client
            .query_one(&sql.incarnation, &[])
            .await
            .map_err(Error::pg("reading the database incarnation"))?
            .try_get(0)
            .map_err(Error::pg("reading the database incarnation"))?;
        if let Some(token) = token {
            return Ok(Incarnation::new(token));
        }
    }
    Err(Error::Incarnation)
}

/// Connects, spawns the connection's driver, and runs `setup` (e.g. `sql::SESSION_SETUP`
/// plus an `application_name`). `role` names the session in logs and errors.
pub async fn connect(
    database: &crate::connect::Database,
    setup: &str,
    role: &'static str,
) -> Result<Client> {
    let client = database.connect(role).await?;
    client
        .batch_execute(setup)
        .await
        .map_err(Error::pg("setting up the session"))?;
    Ok(client)
}
