//! The Rust writers: tokio tasks that write through the library's public paths
//! (`outbox::save_in_tx`, `outbox::save_all_in_tx`) inside transactions of every shape an
//! application has: single messages, batches over several entities, full rollbacks,
//! savepoints rolled back, and transactions held open for seconds across many other
//! commits. Rarely (poison.rs), one of a transaction's messages is a poison message for the
//! poison topic, which Kafka refuses; a share of the other messages go to that topic too, as
//! bystanders the relay must not blame. They keep writing through every fault: a broken connection is replaced, and a
//! commit whose outcome is unknown is left for the database to decide (the checker reads
//! the committed set from `chaos.entity_seq` and `chaos.ledger`, never from here).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::watch;
use tokio_postgres::{Client, Transaction};

use crate::commit_mode::CommitMode;
use crate::model::{self, Payload};
use crate::poison;
use crate::services::Services;

/// What every writer needs to know.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Size of the key space (entities `e000` ..).
    pub entities: usize,
    /// The topics; each message picks one, so one entity writes to all of them.
    pub topics: Vec<String>,
    /// The poison topic: the Rust writers' poison messages, and a share of their other
    /// messages (bystanders, see poison.rs).
    pub poison_topic: String,
    /// Longest pause between two transactions of one writer, in ms.
    pub pause_ms: u64,
    /// Whether to commit asynchronously right now.
    pub commit_mode: CommitMode,
}

/// What one writer did, as it saw it (informational: the verdict uses the database).
#[derive(Debug, Default, Clone, Serialize)]
pub struct WriterStats {
    /// Transactions whose commit returned success.
    pub committed_tx: u64,
    /// Messages in those transactions.
    pub committed_messages: u64,
    /// Transactions rolled back on purpose.
    pub rolled_back_tx: u64,
    /// Savepoints rolled back inside committed transactions.
    pub savepoint_rollbacks: u64,
    /// Transactions held open for seconds.
    pub long_tx: u64,
    /// Committed transactions that committed with `synchronous_commit = off`.
    pub async_commits: u64,
    /// Transactions that failed before their commit (connection lost, server shutting down).
    pub failed_tx: u64,
    /// Commits that failed: their outcome is unknown to the writer.
    pub unknown_commits: u64,
    /// `save_all_in_tx` refused because `enqueue_batch` returned fewer ids than messages.
    pub short_batch_errors: u64,
    /// Connections (re)opened.
    pub connects: u64,
    /// Poison messages written, in any transaction.
    pub poison_written: u64,
    /// Of those, in transactions whose commit returned success.
    pub poison_committed: u64,
}

impl WriterStats {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &WriterStats) {
        self.committed_tx += other.committed_tx;
        self.committed_messages += other.committed_messages;
        self.rolled_back_tx += other.rolled_back_tx;
        self.savepoint_rollbacks += other.savepoint_rollbacks;
        self.long_tx += other.long_tx;
        self.async_commits += other.async_commits;
        self.failed_tx += other.failed_tx;
        self.unknown_commits += other.unknown_commits;
        self.short_batch_errors += other.short_batch_errors;
        self.connects += other.connects;
        self.poison_written += other.poison_written;
        self.poison_committed += other.poison_committed;
    }
}

/// How a transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Commit,
    Rollback,
    /// Commit after rolling back a savepoint taken mid-way.
    Savepoint,
    /// Commit after holding the transaction (and its entity locks) open this long.
    Hold(Duration),
}

/// Which library call writes the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// `save_in_tx` once per message.
    One,
    /// `save_all_in_tx` for all of them.
    All,
}

/// One transaction, drawn before it starts.
#[derive(Debug, Clone)]
struct Plan {
    ending: Ending,
    call: Call,
    /// Entities in key order (the lock order of every writer) with how many messages each.
    entities: Vec<(String, i64)>,
    /// A short pause before the commit, widening the window between id and commit.
    linger: Option<Duration>,
    /// Commit with `synchronous_commit = off` (set from [`CommitMode`], not drawn).
    asynchronous: bool,
    /// A poison message: (index into `entities`, index among that entity's messages). Only
    /// in the first part of the transaction (never in a savepoint part).
    poison: Option<(usize, i64)>,
}

impl Plan {
    fn draw(rng: &mut StdRng, entities: usize) -> Plan {
        let ending = match rng.random_range(0..100) {
            0..72 => Ending::Commit,
            72..82 => Ending::Rollback,
            82..97 => Ending::Savepoint,
            _ => Ending::Hold(Duration::from_millis(rng.random_range(2_000..5_000))),
        };
        let call = if rng.random_bool(0.5) {
            Call::One
        } else {
            Call::All
        };
        let count = match call {
            Call::One => rng.random_range(1..=2),
            Call::All => rng.random_range(2..=4),
        };
        let mut picked: Vec<usize> = rand::seq::index::sample(rng, entities, count.min(entities))
            .into_iter()
            .collect();
        picked.sort_unstable();
        let entities: Vec<(String, i64)> = picked
            .into_iter()
            .map(|i| (model::entity_name(i), rng.random_range(1..=3)))
            .collect();
        let linger = rng
            .random_bool(0.2)
            .then(|| Duration::from_millis(rng.random_range(1..30)));
        let poison: Option<(usize, i64)> = rng.random_bool(poison::RATE).then(|| {
            let i = rng.random_range(0..entities.len());
            (i, rng.random_range(0..entities[i].1))
        });
        Plan {
            ending,
            call,
            entities,
            linger,
            asynchronous: false,
            poison,
        }
    }
}

/// Why a transaction did not commit.
enum Failure {
    /// Before the commit was sent: nothing of it is committed.
    Before(String),
    /// The commit itself failed: committed or not, only the database knows.
    Commit,
}

/// Starts writer `index`; it writes until `stop` turns true and returns its statistics.
pub fn spawn(
    index: usize,
    services: Services,
    config: WriterConfig,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<WriterStats> {
    tokio::spawn(async move {
        let name = format!("rust-{index}");
        let mut rng =
            StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(index as u64));
        let mut stats = WriterStats::default();
        let mut client: Option<Client> = None;
        let mut backoff = Duration::from_millis(50);
        let mut counter = 0u64;
        while !*stop.borrow() {
            if client.as_ref().is_none_or(Client::is_closed) {
                client = None;
                match services.connect().await {
                    Ok(c) => {
                        stats.connects += 1;
                        backoff = Duration::from_millis(50);
                        client = Some(c);
                    }
                    Err(_) => {
                        // The server is down or recovering: try again soon. Writers come
                        // back faster than the relays (whose retries reach 1 s), so
                        // commits land in the first moments after a crash recovery.
                        let _ = tokio::time::timeout(backoff, stop.changed()).await;
                        backoff = (backoff * 2).min(Duration::from_millis(250));
                        continue;
                    }
                }
            }
            let Some(c) = client.as_mut() else { continue };
            counter += 1;
            let token = format!("{name}-{counter}");
            let mut plan = Plan::draw(&mut rng, config.entities);
            plan.asynchronous = config.commit_mode.asynchronous();
            match write(c, &plan, &token, &name, &config, &mut rng, &mut stats).await {
                Ok(messages) => match plan.ending {
                    Ending::Rollback => stats.rolled_back_tx += 1,
                    _ => {
                        stats.committed_tx += 1;
                        stats.committed_messages += messages;
                        if plan.asynchronous {
                            stats.async_commits += 1;
                        }
                        if plan.poison.is_some() {
                            stats.poison_committed += 1;
                        }
                    }
                },
                Err(Failure::Before(e)) => {
                    stats.failed_tx += 1;
                    if e.contains("wrong number of ids") {
                        stats.short_batch_errors += 1;
                    }
                }
                Err(Failure::Commit) => stats.unknown_commits += 1,
            }
            if config.pause_ms > 0 {
                let pause = Duration::from_millis(rng.random_range(0..=config.pause_ms));
                let _ = tokio::time::timeout(pause, stop.changed()).await;
            }
        }
        stats
    })
}

/// Runs one transaction as planned; returns the number of messages it committed.
async fn write(
    client: &mut Client,
    plan: &Plan,
    token: &str,
    writer: &str,
    config: &WriterConfig,
    rng: &mut StdRng,
    stats: &mut WriterStats,
) -> Result<u64, Failure> {
    let before = |e: &dyn std::fmt::Display| Failure::Before(e.to_string());
    let mut tx = client.transaction().await.map_err(|e| before(&e))?;
    if plan.asynchronous {
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .await
            .map_err(|e| before(&e))?;
    }
    let rb = plan.ending == Ending::Rollback;
    let part = Part {
        entities: &plan.entities,
        token,
        rb,
        poison: plan.poison,
    };
    let mut committed = write_part(&tx, plan, &part, writer, config, rng).await?;
    if plan.poison.is_some() {
        stats.poison_written += 1;
    }
    if plan.ending == Ending::Savepoint {
        // Messages written after the savepoint disappear with it, and so do their seq
        // increments: the next part takes the same numbers again.
        let sp = tx.savepoint("chaos_sp").await.map_err(|e| before(&e))?;
        let sp_part = Part {
            entities: &plan.entities,
            token: &format!("{token}s"),
            rb: true,
            poison: None,
        };
        write_part(&sp, plan, &sp_part, writer, config, rng).await?;
        sp.rollback().await.map_err(|e| before(&e))?;
        stats.savepoint_rollbacks += 1;
        if rng.random_bool(0.5) {
            let more = Part {
                entities: &plan.entities[..1],
                token,
                rb: false,
                poison: None,
            };
            committed += write_part(&tx, plan, &more, writer, config, rng).await?;
        }
    }
    if let Ending::Hold(d) = plan.ending {
        stats.long_tx += 1;
        tokio::time::sleep(d).await;
    }
    if let Some(d) = plan.linger {
        tokio::time::sleep(d).await;
    }
    if rb {
        tx.rollback().await.map_err(|e| before(&e))?;
        return Ok(0);
    }
    tx.commit().await.map_err(|_| Failure::Commit)?;
    Ok(committed)
}

/// One part of a transaction: what [`write_part`] writes.
struct Part<'p> {
    /// Entities in key order, with how many messages each.
    entities: &'p [(String, i64)],
    /// The transaction token the payloads and the ledger carry.
    token: &'p str,
    /// The part will be rolled back.
    rb: bool,
    /// Which message is poison, as in [`Plan::poison`].
    poison: Option<(usize, i64)>,
}

/// Takes the seq numbers of the part's entities (in key order) and writes their messages;
/// returns how many it wrote.
async fn write_part(
    tx: &Transaction<'_>,
    plan: &Plan,
    part: &Part<'_>,
    writer: &str,
    config: &WriterConfig,
    rng: &mut StdRng,
) -> Result<u64, Failure> {
    let before = |e: &dyn std::fmt::Display| Failure::Before(e.to_string());
    let mut messages = Vec::new();
    for (index, (entity, k)) in part.entities.iter().enumerate() {
        let row = tx
            .query_one(model::TAKE_SEQ, &[entity, k, &part.token])
            .await
            .map_err(|e| before(&e))?;
        let hi: i64 = row.get(0);
        for seq in hi - k + 1..=hi {
            let poison = part.poison == Some((index, seq - (hi - k + 1)));
            let payload = Payload {
                entity: entity.clone(),
                seq,
                tx: part.token.to_owned(),
                writer: writer.to_owned(),
                rb: part.rb,
                async_commit: plan.asynchronous,
                poison,
                pad: if poison {
                    poison::pad(rng)
                } else {
                    String::new()
                },
            };
            let topic = if poison {
                // In the same transaction: the row exists exactly when the message does.
                tx.execute(model::RECORD_POISON, &[entity, &seq, &part.token])
                    .await
                    .map_err(|e| before(&e))?;
                &config.poison_topic
            } else if rng.random_bool(poison::BYSTANDER_RATE) {
                // A bystander: the broker refuses its record batch along with a poison
                // message's, and the relay must publish it all the same.
                &config.poison_topic
            } else {
                &config.topics[rng.random_range(0..config.topics.len())]
            };
            let msg = outbox::Message::builder(topic.as_str(), entity.as_str())
                .json(&payload)
                .event_type("chaos")
                .build()
                .map_err(|e| before(&e))?;
            messages.push(msg);
        }
    }
    match plan.call {
        Call::One => {
            for m in &messages {
                outbox::save_in_tx(tx, m).await.map_err(|e| before(&e))?;
            }
        }
        Call::All => {
            outbox::save_all_in_tx(tx, &messages)
                .await
                .map_err(|e| before(&e))?;
        }
    }
    Ok(messages.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_lock_entities_in_key_order_and_cover_every_ending() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut endings = std::collections::HashSet::new();
        let mut poisoned = 0;
        for _ in 0..4_000 {
            let plan = Plan::draw(&mut rng, 50);
            if let Some((i, j)) = plan.poison {
                poisoned += 1;
                let (_, k) = plan.entities[i];
                assert!((0..k).contains(&j), "{plan:?}");
            }
            let keys: Vec<&String> = plan.entities.iter().map(|(e, _)| e).collect();
            let mut sorted = keys.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(keys, sorted, "entities sorted and distinct");
            endings.insert(std::mem::discriminant(&plan.ending));
        }
        assert_eq!(endings.len(), 4);
        // 1 %: 40 expected.
        assert!((15..=80).contains(&poisoned), "{poisoned} poison messages");
    }
}
