//! Waking idle partition workers without a NOTIFY per write (which serializes commits).
//! One task polls the message id sequence's last value, a read of a single cached page, and
//! bumps a watch channel when it moved; workers wait on that channel or their poll interval.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::sql::Statements;

/// Polls `last_message_id` every `interval` until `stop` turns true; publishes each new
/// value on `tx`. Errors are logged and the poll goes on: workers still poll on their own.
pub async fn watch_sequence(
    client: Client,
    sql: Statements,
    interval: Duration,
    tx: &watch::Sender<i64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = i64::MIN;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        match client.query_one(&sql.last_message_id, &[]).await {
            Ok(row) => {
                failing = false;
                let value: i64 = row.get(0);
                if value != last {
                    last = value;
                    tx.send_replace(value);
                }
            }
            Err(e) => {
                if client.is_closed() {
                    tracing::warn!(error = %e, "wake-up poller lost its connection; workers fall back to polling");
                    return;
                }
                if !failing {
                    tracing::warn!(error = %e, "wake-up poll failed");
                    failing = true;
                }
            }
        }
    }
}
