//! A clean start for every run: checks that the chaos PostgreSQL runs with the settings the
//! harness relies on, recreates the outbox schema with the real `outboxd migrate`, creates
//! the harness's own tables, and sets the first partition count.

use std::path::Path;
use std::process::Command;

use crate::error::{Context, Error, Result};
use crate::model;
use crate::services::Services;

/// Server settings the run depends on, with the value it needs and why.
const REQUIRED_SETTINGS: [(&str, &str, &str); 2] = [
    (
        "track_commit_timestamp",
        "on",
        "the checker computes commit-to-arrival latency from commit timestamps",
    ),
    (
        "wal_writer_delay",
        "10s",
        "widens the window in which unflushed transaction ids are lost in a crash and reused",
    ),
];

/// Prepares the chaos database for a run of `entities` entities.
pub async fn prepare_database(
    services: &Services,
    outboxd: &Path,
    entities: usize,
    partition_count: i32,
) -> Result<()> {
    let client = services.connect().await.map_err(|e| {
        Error::msg(format!(
            "{e}; the chaos PostgreSQL is not running: scripts/chaos starts it"
        ))
    })?;
    for (name, wanted, why) in REQUIRED_SETTINGS {
        let rows = client
            .simple_query(&format!("SHOW {name}"))
            .await
            .context(format!("reading {name}"))?;
        let value = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        if value.as_deref() != Some(wanted) {
            return Err(Error::msg(format!(
                "the chaos PostgreSQL has {name} = {value:?}, the harness needs {wanted} ({why}); \
                 it was started without the chaos options: scripts/chaos down, then scripts/chaos"
            )));
        }
    }
    // A stale schema from an earlier run would mix its messages into this one.
    client
        .batch_execute("DROP SCHEMA IF EXISTS outbox CASCADE")
        .await
        .context("dropping the previous run's outbox schema")?;
    let output = Command::new(outboxd)
        .args(["migrate", "--database-url", &services.database_url])
        .output()
        .context(format!(
            "running {} migrate (build it: cargo build -p outboxd)",
            outboxd.display()
        ))?;
    if !output.status.success() {
        return Err(Error::msg(format!(
            "outboxd migrate failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    client
        .batch_execute(&model::setup_sql(entities))
        .await
        .context("creating the chaos tables")?;
    client
        .execute(
            "UPDATE outbox.settings SET partition_count = $1",
            &[&partition_count],
        )
        .await
        .context("setting the first partition count")?;
    Ok(())
}
