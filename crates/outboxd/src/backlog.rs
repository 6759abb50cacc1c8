//! The backlog gauges, from one periodic query instead of per-message bookkeeping: for each
//! partition this instance holds, how many messages wait (counted up to a cap) and how old
//! the oldest is; and how many dead letters and parked entities the schema holds. Each instance reports only the
//! partitions it holds (and zeroes the ones it let go), so summing over instances is right.
//! Dead letters and parked entities are the schema's, the same from every instance: take the
//! maximum.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::ownership::Ownership;
use crate::periodic::Periodic;
use crate::sessions::SessionPool;
use crate::shutdown::Shutdown;
use crate::sql::Statements;

/// How often the gauges are refreshed.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// The most waiting messages counted per partition: counting walks the primary key, and a
/// backlog that large is news enough (the oldest age says the rest).
pub const COUNT_CAP: i64 = 100_000;

/// Refreshes the gauges every [`INTERVAL`] until `stop` turns true.
pub async fn run(
    sessions: Arc<SessionPool>,
    sql: Statements,
    ownership: Arc<Ownership>,
    schema: String,
    shutdown: Shutdown,
) {
    let mut periodic = Periodic::new(INTERVAL, shutdown);
    let mut reported: BTreeSet<i32> = BTreeSet::new();
    let dead_letters = metrics::gauge!("outbox_relay_dead_letters", "schema" => schema.clone());
    let parked = metrics::gauge!("outbox_relay_parked_entities", "schema" => schema.clone());
    while periodic.tick().await {
        let held: Vec<i32> = ownership.leases().into_keys().collect();
        let session = match sessions.checkout().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "backlog gauges: no session; next time");
                continue;
            }
        };
        let rows = match session
            .client
            .query(&sql.backlog, &[&held, &COUNT_CAP])
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, "backlog gauges: query failed; next time");
                session.discard();
                continue;
            }
        };
        drop(session);
        for row in rows {
            let (Ok(partition), Ok(waiting), Ok(age)) = (
                row.try_get::<_, Option<i32>>(0),
                row.try_get::<_, i64>(1),
                row.try_get::<_, f64>(2),
            ) else {
                continue;
            };
            match partition {
                Some(p) => {
                    let (waiting_gauge, age_gauge) = gauges(&schema, p);
                    waiting_gauge.set(waiting as f64);
                    age_gauge.set(age);
                }
                None => {
                    dead_letters.set(waiting as f64);
                    parked.set(age);
                }
            }
        }
        let now: BTreeSet<i32> = held.into_iter().collect();
        for gone in reported.difference(&now) {
            let (waiting_gauge, age_gauge) = gauges(&schema, *gone);
            waiting_gauge.set(0.0);
            age_gauge.set(0.0);
        }
        reported = now;
    }
}

fn gauges(schema: &str, partition: i32) -> (metrics::Gauge, metrics::Gauge) {
    let (s, p) = (schema.to_owned(), partition.to_string());
    (
        metrics::gauge!("outbox_relay_waiting_messages", "schema" => s.clone(), "partition" => p.clone()),
        metrics::gauge!("outbox_relay_oldest_waiting_age_seconds", "schema" => s, "partition" => p),
    )
}
