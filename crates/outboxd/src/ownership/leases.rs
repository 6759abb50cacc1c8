//! The lease task: keeps this instance registered and alive, renews every lease it holds
//! every third of the TTL, and reads the shared ownership view twice a second, on a
//! connection of its own (a busy partition cannot starve it, and the view does not wait for
//! the wake-up poller's interval). On shutdown it keeps renewing until the workers have released their partitions (or the
//! shutdown timeout ran out), then releases whatever is left and deregisters, so the other
//! instances take over at once instead of after the TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::health::{Health, PartitionState};
use crate::ownership::{Ownership, View};
use crate::shutdown::Shutdown;
use crate::sql::{SESSION_SETUP, Statements};

/// The name under which this task shows in `/health`.
const TASK: &str = "lease renewal";

/// How often the ownership view is read: a joining instance gets its partitions within
/// about this plus a worker's claim retry.
const VIEW_INTERVAL: Duration = Duration::from_millis(500);

/// This host's name, for `relay_instance.host` (operators' eyes only).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// This process's id, as `relay_instance.pid` takes it.
fn process_id() -> i32 {
    i32::try_from(std::process::id()).unwrap_or(0)
}

/// The TTL in milliseconds, as the statements take it.
fn ttl_ms(ownership: &Ownership) -> i64 {
    i64::try_from(ownership.ttl().as_millis()).unwrap_or(i64::MAX)
}

/// Registers this instance (a new id each process start). Returns its id.
pub async fn register(client: &Client, sql: &Statements, ttl: Duration) -> Result<String> {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    client
        .query_one(
            &sql.register_instance,
            &[&host_name(), &process_id(), &ttl_ms],
        )
        .await
        .map_err(Error::pg("registering the relay instance"))?
        .try_get(0)
        .map_err(Error::pg("registering the relay instance"))
}

/// The lease session: its connection and the instance lock key it holds.
struct Session {
    client: Client,
    locked_key: Option<i32>,
}

/// Runs until `stop` turns true and the workers let their partitions go; see the module docs.
pub async fn run(
    database: crate::connect::Database,
    sql: Statements,
    ownership: Arc<Ownership>,
    health: Arc<Health>,
    shutdown_timeout: Duration,
    shutdown: Shutdown,
) {
    // Who this is, for operators' eyes in `relay_instance`: read once.
    let (host, pid) = (host_name(), process_id());
    let renew_every = ownership.ttl() / 3;
    let mut session: Option<Session> = None;
    let mut renewed_at: Option<Instant> = None;
    let mut stopping_since: Option<Instant> = None;
    // Connecting and each statement end within about a minute (connect timeout, keepalives).
    let allowance = ownership.ttl() + Duration::from_secs(60);
    loop {
        health.beat("lease task", allowance);
        if session.as_ref().is_none_or(|s| s.client.is_closed()) {
            renewed_at = None;
            session = match crate::session::connect(
                &database,
                &format!("{SESSION_SETUP} SET application_name = 'outboxd leases';"),
                "lease renewal",
            )
            .await
            {
                Ok(client) => Some(Session {
                    client,
                    locked_key: None,
                }),
                Err(e) => {
                    health.set_task(TASK, Some(format!("cannot reach PostgreSQL: {e}")));
                    None
                }
            };
        }
        if let Some(s) = session.as_mut() {
            let mut result = Ok(());
            if renewed_at.is_none_or(|t| t.elapsed() >= renew_every) {
                renewed_at = Some(Instant::now());
                result = renew(s, &sql, &ownership, &health, &host, pid).await;
            }
            if result.is_ok() && !shutdown.is_requested() {
                result = read_view(&s.client, &sql, &ownership, &health).await;
            }
            match result {
                Ok(()) => health.set_task(TASK, None),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the leases or read the ownership view; leases run out after the TTL unless a renewal succeeds");
                    health.set_task(TASK, Some(e.to_string()));
                    renewed_at = None;
                }
            }
        }
        if shutdown.is_requested() {
            let since = *stopping_since.get_or_insert_with(Instant::now);
            if ownership.held_count() == 0 || since.elapsed() >= shutdown_timeout {
                break;
            }
            // Workers are finishing their batches; renew until they let go.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(VIEW_INTERVAL) => {}
            () = shutdown.requested() => {}
        }
    }
    if let Some(s) = session {
        match s
            .client
            .execute(&sql.deregister_instance, &[&ownership.instance()])
            .await
        {
            Ok(_) => tracing::info!("leases released and instance deregistered"),
            Err(e) => {
                tracing::warn!(error = %e, "could not deregister; the leases run out after the TTL")
            }
        }
    }
}

/// Reads the ownership view (and the parked-entity count, for `/health`).
async fn read_view(
    client: &Client,
    sql: &Statements,
    ownership: &Ownership,
    health: &Health,
) -> Result<()> {
    let r = client
        .query_one(&sql.ownership_view, &[])
        .await
        .map_err(Error::pg("reading the ownership view"))?;
    let instances: Option<Vec<String>> = r
        .try_get(0)
        .map_err(Error::pg("reading the ownership view"))?;
    let parked: i64 = r
        .try_get(1)
        .map_err(Error::pg("reading the ownership view"))?;
    let count: Option<i32> = r
        .try_get(2)
        .map_err(Error::pg("reading the ownership view"))?;
    let above: Option<Vec<i32>> = r
        .try_get(3)
        .map_err(Error::pg("reading the ownership view"))?;
    let paused: Vec<i32> = r
        .try_get(4)
        .map_err(Error::pg("reading the ownership view"))?;
    let count = count.ok_or(Error::SettingsMissing)?;
    ownership.set_view(View {
        count,
        instances: instances.unwrap_or_default(),
        above: above.unwrap_or_default(),
        paused,
    });
    health.set_parked_entities(parked);
    Ok(())
}

/// One renewal: registration, the instance lock, every held lease.
async fn renew(
    s: &mut Session,
    sql: &Statements,
    ownership: &Ownership,
    health: &Health,
    host: &str,
    pid: i32,
) -> Result<()> {
    let (held_partitions, held_epochs): (Vec<i32>, Vec<i64>) = ownership
        .leases()
        .into_iter()
        .map(|(p, l)| (p, l.epoch))
        .unzip();
    // What each held partition's worker is doing, for `outboxd status` in other processes.
    let states = health.snapshot();
    let state_of = |p: &i32| states.get(p);
    let kinds: Vec<Option<&str>> = held_partitions
        .iter()
        .map(|p| state_of(p).map(PartitionState::kind))
        .collect();
    let message_ids: Vec<Option<i64>> = held_partitions
        .iter()
        .map(|p| state_of(p).and_then(PartitionState::message_id))
        .collect();
    let errors: Vec<Option<&str>> = held_partitions
        .iter()
        .map(|p| state_of(p).and_then(PartitionState::error))
        .collect();
    let sent_at = Instant::now();
    let row = s
        .client
        .query_one(
            &sql.renew_leases,
            &[
                &ownership.instance(),
                &ttl_ms(ownership),
                &host,
                &pid,
                &held_partitions,
                &held_epochs,
                &kinds,
                &message_ids,
                &errors,
            ],
        )
        .await
        .map_err(Error::pg("renewing the leases"))?;
    let key: i32 = row.try_get(0).map_err(Error::pg("renewing the leases"))?;
    let partitions: Option<Vec<i32>> = row.try_get(1).map_err(Error::pg("renewing the leases"))?;
    let epochs: Option<Vec<i64>> = row.try_get(2).map_err(Error::pg("renewing the leases"))?;
    let renewed: Vec<(i32, i64)> = partitions
        .unwrap_or_default()
        .into_iter()
        .zip(epochs.unwrap_or_default())
        .collect();
    ownership.renewed(&renewed, sent_at);
    if s.locked_key != Some(key) {
        // The lock shows the other instances that this one is alive; a previous session of
        // ours may still hold it for a moment after a reconnect (then it shows that too).
        let locked: bool = s
            .client
            .query_one(&sql.lock_instance, &[&key])
            .await
            .map_err(Error::pg("locking the instance key"))?
            .try_get(0)
            .map_err(Error::pg("locking the instance key"))?;
        if locked {
            s.locked_key = Some(key);
        }
    }
    s.client
        .execute(&sql.forget_dead_instances, &[])
        .await
        .map_err(Error::pg("forgetting dead instances"))?;
    Ok(())
}
