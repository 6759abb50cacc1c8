//! Delivering one batch of a partition to Kafka: publish, classify every outcome, retry in
//! place, and apply the topic's policy to a message Kafka refuses for good.
//!
//! **Rounds.** A batch is sent in rounds. A round holds, for every entity, its pending
//! messages in id order up to the first one bound for another *lane* (topic plus Kafka key or
//! explicit partition): within a lane the idempotent, gap-less producer keeps order and fails
//! everything behind a refused message, but across lanes nothing does, so an entity's message
//! for another lane waits until the earlier ones were acknowledged. An entity that writes to
//! one topic with its default key (the common case) is sent in one round.
//!
//! **Refusals.** A message refused for good goes through its topic's policy, and only that
//! message: the broker refuses a whole record batch and reports the error for every message
//! in it, so messages refused with a batch-level error are sent again one at a time, alone,
//! through the probe producer, and the one that is refused alone is the one at fault. The
//! innocent ones are acknowledged on the way. A message that blocked the partition is, on
//! every retry, tried alone through the probe producer, so a poison message never reaches the
//! shared producer twice (its gap-less guarantee turns a refusal into a fatal error that fails
//! every partition's messages in flight). A row the reader could not decode is refused
//! without being sent. A row handled alone is handled only once it is the batch's first
//! pending row: rounds stop before it, so nothing before it (of its entity or any other) is
//! still unacknowledged when a probe publishes it.
//!
//! **Order under each policy.** `block`: nothing of the refused message's entity after it is
//! sent, and the partition sends nothing more until the message is published or moved aside
//! (messages of other entities already in flight when the refusal came back may have been
//! published). `park_entity`: the entity's later messages are held back until it is
//! unparked; other entities go on. `dead_letter`: the entity's later messages are published
//! without the refused one.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::backoff::Backoff;
use crate::config::ErrorPolicy;
use crate::error::{Error, Result};
use crate::health::PartitionState;
use crate::pipeline::reader::OutboxRow;
use crate::pipeline::worker::Worker;
use crate::publisher::{Failure, Refusal, Sent};

/// How delivering one batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every message was acknowledged, moved aside, or held back with a parked entity.
    Done,
    /// A message was refused for good under the `block` policy.
    Blocked {
        /// The refused message.
        message_id: i64,
    },
    /// Shutdown interrupted the retries.
    Stopped,
    /// The lease was taken over while a refused message was being moved aside: nothing was
    /// moved, and this worker must stop.
    Fenced,
}

/// After this long without acknowledgements, the partition shows as retrying (Kafka is
/// unreachable or slow); the producer keeps trying.
pub(crate) const ACK_WAIT_BEFORE_RETRYING: Duration = Duration::from_secs(5);

/// Why a message is refused, as recorded in `dead_letter.error`.
#[derive(Debug)]
enum Fault {
    Kafka(Failure),
    Undecodable(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Kafka(e) => write!(f, "{e}"),
            Fault::Undecodable(e) => write!(f, "the relay cannot decode the row: {e}"),
        }
    }
}

/// Where a message goes in Kafka, as far as order is concerned: the idempotent producer keeps
/// order within one Kafka partition, and one topic with one key (or one explicit partition)
/// is one Kafka partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane<'r> {
    /// A topic and the record's key.
    Key(&'r str, &'r [u8]),
    /// A topic and an explicit Kafka partition.
    Partition(&'r str, i32),
}

/// The lane `row` goes to.
pub(crate) fn lane(row: &OutboxRow) -> Lane<'_> {
    match row.kafka_partition {
        Some(p) => Lane::Partition(&row.topic, p),
        None => Lane::Key(
            &row.topic,
            row.kafka_key
                .as_deref()
                .unwrap_or(row.entity_key.as_bytes()),
        ),
    }
}

/// The next round (see the module docs): for every entity, its pending rows up to the first
/// one bound for another lane; the whole round stops before the first row (in id order) that
/// must be handled alone.
fn next_round<'b>(
    pending: &[&'b OutboxRow],
    alone: impl Fn(&OutboxRow) -> bool,
) -> Vec<&'b OutboxRow> {
    let mut lanes: HashMap<&str, Lane<'_>> = HashMap::new();
    let mut closed: HashSet<&str> = HashSet::new();
    let mut round = Vec::new();
    for &row in pending {
        if alone(row) {
            break;
        }
        if closed.contains(row.entity_key.as_str()) {
            continue;
        }
        match lanes.get(row.entity_key.as_str()) {
            None => {
                lanes.insert(&row.entity_key, lane(row));
                round.push(row);
            }
            Some(l) if *l == lane(row) => round.push(row),
            Some(_) => {
                closed.insert(&row.entity_key);
            }
        }
    }
    round
}

/// Rows Kafka refused for good, by message id.
pub(crate) type Refusals = HashMap<i64, Failure>;

/// What handling one row alone decided.
enum Verdict {
    Acked,
    Refused(Fault),
    Retry(Failure),
}

impl Worker<'_> {
    /// Delivers `batch` (rows in id order): publishes it in rounds, retrying retriable
    /// failures in place with backoff, and applies the topic's policy to messages refused for
    /// good. `blocked` is the message that blocked this partition last time, if any: it is
    /// tried alone first. `refusals` holds rows Kafka already refused for good when they
    /// were sent in flight (see `in_flight`): they are not sent through the shared producer
    /// again. Returns the acknowledged rows (to be retired by the caller) and how it ended.
    pub(crate) async fn deliver<'b>(
        &mut self,
        batch: &'b [OutboxRow],
        blocked: Option<i64>,
        mut refusals: Refusals,
    ) -> Result<(Vec<&'b OutboxRow>, Outcome)> {
        let mut pending: Vec<&OutboxRow> = batch.iter().collect();
        let mut acked = Vec::with_capacity(batch.len());
        let ctx = self.ctx;
        let mut backoff = Backoff::new(ctx.config.retry_initial(), ctx.config.retry_max());
        let mut attempts = 0u32;
        // Rows refused for good in a round (`refusals`). Each is decided only once it is the
        // first pending row of the batch, so that nothing of its entity (nor anything else)
        // before it is still unacknowledged when a probe publishes it.
        while let Some(&first) = pending.first() {
            let mut retry: Option<(i64, Failure)> = None;
            let round = next_round(&pending, |row| {
                row.undecodable.is_some()
                    || Some(row.id) == blocked
                    || refusals.contains_key(&row.id)
            });
            if round.is_empty() {
                // The first pending row must be handled alone.
                let verdict = match (&first.undecodable, refusals.remove(&first.id)) {
                    (Some(e), _) => Verdict::Refused(Fault::Undecodable(e.clone())),
                    (None, Some(f)) if f.kind == Refusal::Permanent => self.confirm(first, f).await,
                    // Refused with its record batch, or blocked the partition last time.
                    _ => self.probe(first).await,
                };
                match verdict {
                    Verdict::Acked => {
                        acked.push(first);
                        pending.remove(0);
                    }
                    Verdict::Refused(fault) => {
                        if let Some(outcome) = self.refused(first, &fault, &mut pending).await? {
                            return Ok((acked, outcome));
                        }
                        if ctx.config.policy_for(&first.topic) == ErrorPolicy::ParkEntity {
                            // Rows the poller read before now may hold the entity's later
                            // messages: the worker stops using them.
                            self.parked_at = Some(std::time::Instant::now());
                        }
                    }
                    Verdict::Retry(e) => retry = Some((first.id, e)),
                }
            } else {
                let results = self.send_round(&round).await;
                let mut done: HashSet<i64> = HashSet::with_capacity(round.len());
                for (row, sent) in round.iter().zip(results) {
                    match sent {
                        Sent::Acked => {
                            acked.push(*row);
                            done.insert(row.id);
                        }
                        Sent::NotSent => {}
                        Sent::Failed(f) if f.kind == Refusal::Retriable => {
                            retry.get_or_insert((row.id, f));
                        }
                        Sent::Failed(f) => {
                            refusals.insert(row.id, f);
                        }
                    }
                }
                pending.retain(|r| !done.contains(&r.id));
                // A refusal in a Kafka partition is fatal for the gap-less producer; the first
                // worker to notice replaces it (counted in the publisher, shown in /health by
                // the Kafka watch).
                ctx.publisher.recover_if_fatal()?;
            }
            let Some((message_id, error)) = retry else {
                backoff.reset();
                continue;
            };
            self.metrics.retriable_errors.increment(1);
            attempts += 1;
            // Log the first failure and then every tenth, not every retry.
            if attempts == 1 || attempts % 10 == 0 {
                tracing::warn!(partition = self.partition, attempts, message_id, %error,
                    "publishing failed; retrying in place");
            }
            self.set_state(PartitionState::Retrying {
                message_id,
                error: error.to_string(),
            });
            if self.sleep_or_stop(backoff.next_delay()).await {
                return Ok((acked, Outcome::Stopped));
            }
        }
        Ok((acked, Outcome::Done))
    }

    /// Sends one round through the main producer. While acknowledgements take longer than
    /// `ACK_WAIT_BEFORE_RETRYING` (Kafka unreachable), the partition shows as retrying, with
    /// the producer's last client error; the producer itself keeps trying.
    async fn send_round(&self, round: &[&OutboxRow]) -> Vec<Sent> {
        let send = self.ctx.publisher.send(round);
        tokio::pin!(send);
        let mut waited = Duration::ZERO;
        loop {
            tokio::select! {
                results = &mut send => {
                    if waited > Duration::ZERO {
                        self.set_state(PartitionState::Relaying);
                    }
                    return results;
                }
                () = tokio::time::sleep(ACK_WAIT_BEFORE_RETRYING) => {
                    waited += ACK_WAIT_BEFORE_RETRYING;
                    let last = self.ctx.publisher.events().last_error()
                        .map_or_else(String::new, |(_, e)| format!("; last client error: {e}"));
                    let error = format!(
                        "no acknowledgement from Kafka for {} s{last}",
                        waited.as_secs()
                    );
                    tracing::warn!(partition = self.partition, message_id = round[0].id, %error,
                        "waiting for Kafka");
                    self.set_state(PartitionState::Retrying { message_id: round[0].id, error });
                }
            }
        }
    }

    /// Sends `row` alone through the probe producer.
    async fn probe(&self, row: &OutboxRow) -> Verdict {
        self.metrics.probes.increment(1);
        match self.ctx.publisher.probe(row).await {
            Ok(()) => Verdict::Acked,
            Err(f) if f.kind == Refusal::Retriable => Verdict::Retry(f),
            Err(f) => self.confirm(row, f).await,
        }
    }

    /// A refusal for a missing topic or partition is confirmed with fresh metadata before the
    /// policy acts: the producer's cache may still call "unknown" a topic an operator has just
    /// created (then, or when the cluster does not answer, the message is retried instead).
    async fn confirm(&self, row: &OutboxRow, e: Failure) -> Verdict {
        if crate::publisher::is_missing_topic(&e.error) {
            let publisher = std::sync::Arc::clone(&self.ctx.publisher);
            let (topic, partition) = (row.topic.clone(), row.kafka_partition);
            let exists = tokio::task::spawn_blocking(move || {
                publisher.topic_exists_now(&topic, partition, std::time::Duration::from_secs(5))
            })
            .await
            .ok()
            .flatten();
            if exists != Some(false) {
                return Verdict::Retry(e);
            }
        }
        Verdict::Refused(Fault::Kafka(e))
    }

    /// Applies `row`'s topic policy to it and updates `pending`; returns the outcome that ends
    /// the delivery (`block`, or a move refused because the lease was taken over), or `None`
    /// to go on.
    async fn refused(
        &self,
        row: &OutboxRow,
        fault: &Fault,
        pending: &mut Vec<&OutboxRow>,
    ) -> Result<Option<Outcome>> {
        self.metrics.permanent_errors.increment(1);
        let error = fault.to_string();
        match self.ctx.config.policy_for(&row.topic) {
            ErrorPolicy::Block => {
                tracing::error!(partition = self.partition, message_id = row.id, topic = %row.topic, %error,
                    "Kafka refused the message for good; partition blocked until an operator acts (policy block)");
                self.set_state(PartitionState::Blocked {
                    message_id: row.id,
                    error,
                });
                Ok(Some(Outcome::Blocked { message_id: row.id }))
            }
            ErrorPolicy::DeadLetter => {
                if !self
                    .move_aside(row, &error, ErrorPolicy::DeadLetter)
                    .await?
                {
                    return Ok(Some(Outcome::Fenced));
                }
                self.metrics.dead_lettered.increment(1);
                pending.retain(|r| r.id != row.id);
                Ok(None)
            }
            ErrorPolicy::ParkEntity => {
                if !self
                    .move_aside(row, &error, ErrorPolicy::ParkEntity)
                    .await?
                {
                    return Ok(Some(Outcome::Fenced));
                }
                self.metrics.parked.increment(1);
                // The entity's later messages stay in the table, held back (below the
                // reader's cursor: when the entity is unparked, the reader sees the parked
                // epoch change and reads from the start again).
                pending.retain(|r| r.entity_key != row.entity_key);
                Ok(None)
            }
        }
    }

    /// Moves `row` to the dead-letter table (and parks its entity, for `park_entity`), only
    /// while this worker's lease holds, on a session of the pool. Returns false when it was
    /// fenced (nothing moved).
    async fn move_aside(&self, row: &OutboxRow, error: &str, policy: ErrorPolicy) -> Result<bool> {
        self.ctx.faults.before_write(self.partition).await;
        let session = self.ctx.sessions.checkout().await?;
        let client = &session.client;
        let sql = &self.ctx.sql;
        let instance = self.ctx.ownership.instance();
        let result = match policy {
            ErrorPolicy::ParkEntity => {
                client
                    .query_one(
                        &sql.park_message,
                        &[&self.partition, &row.id, &error, &instance, &self.epoch],
                    )
                    .await
            }
            _ => {
                client
                    .query_one(
                        &sql.dead_letter,
                        &[
                            &self.partition,
                            &row.id,
                            &"dead_letter",
                            &error,
                            &instance,
                            &self.epoch,
                        ],
                    )
                    .await
            }
        };
        if result.is_err() {
            session.discard();
        }
        let held: bool = result
            .and_then(|r| r.try_get(0))
            .map_err(Error::pg("moving a refused message to dead_letter"))?;
        if held {
            tracing::warn!(partition = self.partition, message_id = row.id, entity_key = %row.entity_key,
                topic = %row.topic, %error, %policy, "message moved to dead_letter");
        }
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, entity: &str, topic: &str) -> OutboxRow {
        OutboxRow::for_tests(id, entity, topic)
    }

    fn ids(round: &[&OutboxRow]) -> Vec<i64> {
        round.iter().map(|r| r.id).collect()
    }

    #[test]
    fn entities_on_one_lane_go_in_one_round() {
        let rows = [row(1, "a", "t"), row(2, "b", "t"), row(3, "a", "t")];
        let pending: Vec<&OutboxRow> = rows.iter().collect();
        assert_eq!(ids(&next_round(&pending, |_| false)), vec![1, 2, 3]);
    }

    #[test]
    fn an_entity_waits_at_its_first_message_for_another_lane() {
        let mut keyed = row(5, "b", "t");
        keyed.kafka_key = Some(b"other".to_vec());
        let mut pinned = row(6, "c", "t");
        pinned.kafka_partition = Some(0);
        let rows = [
            row(1, "a", "t1"),
            row(2, "a", "t2"),
            row(3, "a", "t1"),
            row(4, "b", "t"),
            keyed,
            pinned,
            row(7, "c", "t"),
        ];
        let pending: Vec<&OutboxRow> = rows.iter().collect();
        // a: 2 goes to another topic, so 2 and 3 wait; b: 5 has another key; c: 6 comes
        // first with an explicit partition, so 7 (keyed) waits.
        assert_eq!(ids(&next_round(&pending, |_| false)), vec![1, 4, 6]);
    }

    #[test]
    fn a_round_stops_before_a_row_that_must_go_alone() {
        let rows = [row(1, "a", "t"), row(2, "b", "t"), row(3, "c", "t")];
        let pending: Vec<&OutboxRow> = rows.iter().collect();
        assert_eq!(ids(&next_round(&pending, |r| r.id == 2)), vec![1]);
        assert!(next_round(&pending, |r| r.id == 1).is_empty());
    }
}
