//! What the relay reads from PostgreSQL before its tasks start: the schema's version, the
//! safety checks, this instance's registration (a new instance id), the partition count, the record limit, and
//! the wake-up poller's starting snapshot. While PostgreSQL cannot be reached (the relay came
//! up before the database, or the database restarts) it waits with backoff, visible in
//! `/health`, instead of exiting; what waiting cannot fix (a missing schema, an unsafe id
//! sequence) is refused at once.

use std::future::Future;
use std::pin::Pin;

use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::health::Health;
use crate::pipeline::wakeup::{PollerStart, initial_state};
use crate::sql::Statements;

/// What the relay starts from.
pub struct Started {
    /// The control connection; it becomes the poller's.
    pub control: Client,
    /// This instance's id (`relay_instance.instance_id`).
    pub instance: String,
    /// The statements for the schema.
    pub sql: Statements,
    /// How many partitions to serve at start.
    pub partitions: i32,
    /// `settings.max_record_bytes`.
    pub max_record_bytes: usize,
    /// The wake-up poller's starting point, taken before any worker starts.
    pub start: PollerStart,
}

/// Reads everything the relay starts from, waiting while PostgreSQL cannot be reached.
/// `None` when `shutdown` completed while it waited.
pub async fn start_up(
    config: &Config,
    health: &Health,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<Started>> {
    let mut backoff = Backoff::new(config.retry_initial(), config.retry_max());
    loop {
        match read(config).await {
            Ok(started) => {
                health.set_task(TASK, None);
                return Ok(Some(started));
            }
            Err(e) if e.is_connection_failure() => {
                tracing::warn!(error = %e, "cannot reach PostgreSQL to start; retrying");
                health.set_task(TASK, Some(format!("waiting for PostgreSQL: {e}")));
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = &mut shutdown => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// The name under which a start that waits shows in `/health`.
const TASK: &str = "startup";

async fn read(config: &Config) -> Result<Started> {
    let schema = config.schema()?;
    let database = config.database()?;
    let control = crate::session::connect(&database, crate::sql::SESSION_SETUP, "control").await?;
    report_encryption(&control, &database).await?;
    outbox::check_schema(&control, &schema).await?;
    let sql = Statements::new(&schema);
    crate::guards::check_id_sequence(&control, &sql).await?;
    let instance = crate::ownership::leases::register(&control, &sql, config.lease_ttl()).await?;
    let partitions: i32 = control
        .query_one(&sql.partitions_to_serve, &[])
        .await
        .map_err(Error::pg("reading the partition count"))?
        .try_get::<_, Option<i32>>(0)
        .map_err(Error::pg("reading the partition count"))?
        .ok_or(Error::SettingsMissing)?;
    crate::guards::warn_about_connections(&control, &sql, config.pool_size).await;
    let max_record_bytes: i32 = control
        .query_one(&sql.max_record_bytes, &[])
        .await
        .map_err(Error::pg("reading the record limit"))?
        .try_get::<_, Option<i32>>(0)
        .map_err(Error::pg("reading the record limit"))?
        .ok_or(Error::SettingsMissing)?;
    // Taken before any worker starts, so every later commit reaches a worker in a window.
    let start = initial_state(&control, &sql).await?;
    Ok(Started {
        control,
        instance,
        sql,
        partitions,
        max_record_bytes: usize::try_from(max_record_bytes).unwrap_or(0),
        start,
    })
}

/// Says whether the sessions are encrypted. `sslmode=prefer` (libpq's and the relay's
/// default) falls back to plaintext without an error when the server offers no TLS: that
/// must at least show.
async fn report_encryption(control: &Client, database: &crate::connect::Database) -> Result<()> {
    let mode = database.ssl_mode().name();
    if crate::connect::session_is_encrypted(control).await? {
        tracing::info!(sslmode = mode, "PostgreSQL sessions are encrypted (TLS)");
    } else if database.ssl_mode() == crate::connect::SslMode::Prefer {
        tracing::warn!(
            sslmode = mode,
            "PostgreSQL sessions are NOT encrypted: the server offers no TLS and sslmode=prefer \
             fell back to plaintext; set sslmode=verify-full (or require) to insist on TLS"
        );
    } else {
        tracing::info!(sslmode = mode, "PostgreSQL sessions are not encrypted");
    }
    Ok(())
}
