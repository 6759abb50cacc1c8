//! Watches partition ownership through the run: how long a partition with waiting messages
//! (of entities that are not parked) had no live owner, i.e. no unexpired lease held by an
//! instance that is alive. Sampled every 250 ms; a period counts only while every sample in
//! it succeeded (while PostgreSQL is down nothing can be owned or seen). Shown, not judged:
//! a killed relay's partitions wait for the next owner's claim, a paused one's for its leases
//! to run out (the relays run with a 3 s TTL).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::clock::Clock;
use crate::services::Services;

/// The longest period a partition with waiting messages had no live owner.
#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    /// The partition.
    pub partition: i32,
    /// How long, in s.
    pub seconds: f64,
    /// When it began, in s since the run started.
    pub from_s: f64,
}

const SAMPLE: Duration = Duration::from_millis(250);

const UNOWNED: &str = "
    WITH owned AS (
        SELECT l.partition FROM outbox.partition_lease l
         WHERE l.owner IS NOT NULL AND l.expires_at > now()
           AND outbox.instance_is_alive(l.owner)
    ), waiting AS (
        SELECT DISTINCT m.partition FROM outbox.message m
         WHERE NOT EXISTS (SELECT 1 FROM outbox.parked_entity p WHERE p.entity_key = m.entity_key)
    )
    SELECT partition FROM waiting WHERE partition NOT IN (SELECT partition FROM owned)";

/// Samples until `stop` turns true; returns the longest gap seen, if any.
pub fn spawn(
    services: Services,
    clock: Clock,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Option<Gap>> {
    tokio::spawn(async move {
        let mut client: Option<Client> = None;
        // Partitions unowned since when (only while sampling works).
        let mut open: HashMap<i32, Instant> = HashMap::new();
        let mut longest: Option<Gap> = None;
        let close = |p: i32, since: Instant, longest: &mut Option<Gap>| {
            let seconds = since.elapsed().as_secs_f64();
            if longest.as_ref().is_none_or(|g| seconds > g.seconds) {
                *longest = Some(Gap {
                    partition: p,
                    seconds,
                    from_s: clock.elapsed().as_secs_f64() - seconds,
                });
            }
        };
        while !*stop.borrow() {
            let _ = tokio::time::timeout(SAMPLE, stop.changed()).await;
            if client.as_ref().is_none_or(Client::is_closed) {
                client = services.connect().await.ok();
            }
            let unowned: Option<Vec<i32>> = match client.as_ref() {
                Some(c) => c
                    .query(UNOWNED, &[])
                    .await
                    .ok()
                    .map(|rows| rows.iter().map(|r| r.get(0)).collect()),
                None => None,
            };
            let Some(unowned) = unowned else {
                // Not seen: what was open is closed as it was last seen.
                for (p, since) in open.drain() {
                    close(p, since, &mut longest);
                }
                client = None;
                continue;
            };
            let ended: Vec<i32> = open
                .keys()
                .filter(|p| !unowned.contains(p))
                .copied()
                .collect();
            for p in ended {
                if let Some(since) = open.remove(&p) {
                    close(p, since, &mut longest);
                }
            }
            for p in unowned {
                open.entry(p).or_insert_with(Instant::now);
            }
        }
        for (p, since) in open.drain() {
            close(p, since, &mut longest);
        }
        longest
    })
}
