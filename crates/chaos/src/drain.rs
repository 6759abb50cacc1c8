//! Waiting for the relays to publish everything: after the writers stopped, the outbox
//! table must become empty (every message acknowledged by Kafka and retired). When it does
//! not within the deadline, [`stuck`] describes what is left, per partition.

use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::error::{Context, Result};
use crate::services::Services;

/// Waits up to `timeout` for `outbox.message` to be empty (looks at least once); true
/// when it is.
pub async fn wait(services: &Services, timeout: Duration, clock: &Clock) -> bool {
    let deadline = Instant::now() + timeout;
    let mut last_report = Instant::now();
    let mut client = None;
    loop {
        if client.is_none() {
            client = services.connect().await.ok();
        }
        if let Some(c) = &client {
            match c
                .query_one("SELECT count(*) FROM outbox.message", &[])
                .await
            {
                Ok(row) => {
                    let left: i64 = row.get(0);
                    if left == 0 {
                        return true;
                    }
                    if last_report.elapsed() >= Duration::from_secs(10) {
                        clock.say(format!("draining: {left} messages still in the outbox"));
                        last_report = Instant::now();
                    }
                }
                Err(_) => client = None,
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What is left in the outbox: one line per partition, plus the count and dead letters.
pub async fn stuck(services: &Services) -> Result<Vec<String>> {
    let client = services.connect().await?;
    let count: i32 = client
        .query_one("SELECT partition_count FROM outbox.settings", &[])
        .await
        .context("reading the partition count")?
        .get(0);
    let mut lines = vec![format!("partition_count = {count}")];
    for row in client
        .query(
            "SELECT partition, count(*), min(id), max(id),
                    extract(epoch FROM now() - min(created_at))::float8,
                    count(DISTINCT entity_key)
               FROM outbox.message GROUP BY partition ORDER BY partition",
            &[],
        )
        .await
        .context("reading what is stuck")?
    {
        let (p, n, lo, hi, age, entities): (i32, i64, i64, i64, f64, i64) = (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
        );
        lines.push(format!(
            "partition {p}: {n} messages of {entities} entities, ids {lo}..={hi}, oldest {age:.0}s old"
        ));
    }
    let dead: i64 = client
        .query_one("SELECT count(*) FROM outbox.dead_letter", &[])
        .await
        .context("counting dead letters")?
        .get(0);
    if dead > 0 {
        lines.push(format!("{dead} messages in outbox.dead_letter"));
    }
    Ok(lines)
}
