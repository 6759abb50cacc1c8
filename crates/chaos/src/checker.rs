//! The verdict: what arrived in Kafka against what the database committed.
//!
//! - **lost**: a committed (entity, seq) of which no record arrived, unless it is a poison
//!   message moved to `outbox.dead_letter` (where it is expected: Kafka refuses it).
//! - **leaked**: a record of work that was rolled back: its `rb` flag is set, or its
//!   (entity, seq, tx) is not committed (a seq above the entity's count, or a seq whose
//!   committed transaction is another one).
//! - **erased by a crash** (not a violation): a record whose transaction committed with
//!   `synchronous_commit = off` (payload flag `async`) and is not in the database: it was
//!   visible, so the relay published it, and then a PostgreSQL crash erased it before its
//!   WAL was flushed. That is what asynchronous commit means; the relay cannot know.
//! - **malformed**: a record that is not a chaos message with consistent key, headers and
//!   broker timestamp (something the writers never wrote).
//! - **reordered**: per entity, the records are merged from its Kafka partitions (one per
//!   topic) in arrival order: offset order within a partition; across partitions by the
//!   broker's append time, ties (same millisecond) going to the smaller `outbox-id`, the
//!   benefit of the doubt. A consumer that de-duplicates by `outbox-id` keeps a record
//!   only when its id is above the last one it kept for the entity. Counted: every
//!   committed message whose first delivery that consumer drops (it arrived after a later
//!   message of the entity), and every kept message whose seq is below the one kept before
//!   it (ids out of commit order). With no loss and no reorder, what it keeps is exactly
//!   seq 1, 2, 3, ... for every entity.
//!   A dead-lettered poison message is a hole that consumer is expected to see: with no loss
//!   and no reorder, it keeps every entity's committed seqs minus the poison ones moved
//!   aside, in order.
//! - **misblamed**: a committed message that is not poison found in `outbox.dead_letter`:
//!   the relay blamed a message Kafka would have taken for a refusal of another.
//! - **poison published**: a poison record that arrived: the broker must refuse it (its
//!   topic's `max.message.bytes` is far below it), so the topic is not what the harness
//!   thinks.
//! - **overtook poison**: a record of an entity appended before a poison message of the
//!   entity with a lower seq was moved aside (its `dead_letter.failed_at`). Under every
//!   policy the relay holds an entity's later messages until the earlier one is
//!   acknowledged or moved aside (under `block` by `outboxd skip`, under `park_entity` they
//!   wait further, for `outboxd unpark`). `failed_at` is PostgreSQL's clock, the append
//!   time the broker's, on the same machine; the append time is truncated to the
//!   millisecond, so a record counts only when even the end of its millisecond is more than
//!   [`OVERTAKE_TOLERANCE_US`] before `failed_at`. One exception, counted apart: the relay
//!   commits its moves asynchronously (docs/guarantees.md, section 2a), so a PostgreSQL
//!   crash can erase a `dead_letter` move after the relay went on with the entity, and the
//!   move is made again after recovery, with a later `failed_at`. A record appended while
//!   the writers committed asynchronously before a crash (when nothing flushed the WAL, see
//!   [`Crash`]), of a poison message moved by the `dead_letter` policy after that crash, is
//!   *across a crash*, not a violation.
//! - **duplicates**: records of committed messages minus distinct committed messages.
//! - **latency**: per committed message, its first record's append time minus its
//!   transaction's commit time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use serde::Serialize;

use crate::consume::Record;
use crate::model::Payload;
use crate::truth::{Committed, MessageKey, Truth};

/// How many examples of each finding the summary shows.
const EXAMPLES: usize = 8;

/// How much earlier than a poison message's `failed_at` a record of a later message must
/// have been appended to count as overtaking it: PostgreSQL's and the broker's clocks are
/// the same machine's, but `now()` and the append time are taken at different moments of
/// their operations, so a few ms of slack (on top of the append time's truncation).
pub const OVERTAKE_TOLERANCE_US: i64 = 5_000;

/// A PostgreSQL crash as the checker needs it: from `unflushed_from_us` until
/// `crashed_us` (µs since the epoch) nothing was committed synchronously (the writers
/// committed with `synchronous_commit = off` before the crash), so a relay move committed
/// then may have been erased by the crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Crash {
    /// When the writers switched to asynchronous commits, less a second of margin.
    pub unflushed_from_us: i64,
    /// When the crash was done (`pg-crash` returned).
    pub crashed_us: i64,
}

/// What the checker needs to know about the run besides the data.
#[derive(Debug, Clone, Copy)]
pub struct RunInfo<'a> {
    /// The topics, in the records' topic index order.
    pub topics: &'a [String],
    /// The run's start, µs since the epoch: examples give times as seconds after it.
    pub origin_us: i64,
    /// The PostgreSQL crashes of the run.
    pub crashes: &'a [Crash],
}

/// How long one window of commit time (`WINDOW_S` seconds) took to arrive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WindowLatency {
    /// The window's start, in seconds after the run's start.
    pub start_s: i64,
    /// Messages committed in it that arrived.
    pub count: u64,
    /// Their 99th percentile commit-to-arrival, in ms.
    pub p99_ms: f64,
    /// Their slowest, in ms.
    pub max_ms: f64,
}

/// The width of a latency window, in seconds.
const WINDOW_S: i64 = 5;

/// How many of the slowest windows the findings keep.
const SLOWEST_WINDOWS: usize = 5;

/// Commit-to-arrival latency over all committed messages that arrived, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Messages measured (those with a commit timestamp).
    pub count: u64,
}

/// Everything the checker found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Findings {
    /// Records read.
    pub records: u64,
    /// Messages committed according to the database.
    pub committed_messages: u64,
    /// Committed messages that never arrived.
    pub lost: u64,
    /// Of those, still in outbox.message (the outbox did not drain).
    pub lost_still_in_outbox: u64,
    /// Of those, in outbox.dead_letter although not poison (also counted as misblamed).
    pub lost_in_dead_letter: u64,
    /// Lost messages per kind of writer (`rust`, `py`), from the transaction token: tells
    /// a loss on the library's path from one on the SQL API's.
    pub lost_by_writer: BTreeMap<String, u64>,
    /// Records of rolled-back work.
    pub leaked: u64,
    /// Of those, records whose writer marked them as about to be rolled back.
    pub leaked_rb_flag: u64,
    /// Records of asynchronously committed transactions a crash erased (not a violation).
    pub erased_by_crash: u64,
    /// Records that are not chaos messages with consistent key and headers.
    pub malformed: u64,
    /// Order violations seen by a consumer that de-duplicates by `outbox-id`.
    pub reordered: u64,
    /// Of those, first deliveries dropped only because a later message arrived on the other
    /// topic (on its own topic the message is in order).
    pub reordered_across_topics: u64,
    /// The longest time by which a dropped first delivery arrived after the later message
    /// that was kept, in ms (a few ms: concurrent sends of one batch; seconds: a late read).
    pub reorder_max_gap_ms: i64,
    /// Records of committed messages beyond the first of each.
    pub duplicates: u64,
    /// Committed poison messages (`chaos.poison`).
    pub poison_committed: u64,
    /// Of those, in outbox.dead_letter (where they belong).
    pub poison_dead_lettered: u64,
    /// Rows of outbox.dead_letter per `policy` column (`dead_letter`, `park_entity`, `skip`).
    pub dead_letter_policies: BTreeMap<String, u64>,
    /// Rows of outbox.dead_letter that are not committed chaos messages (not judged: a
    /// crash can erase the transaction of a message the relay had already moved aside).
    pub dead_letter_uncommitted: u64,
    /// Committed messages that are not poison, found in outbox.dead_letter.
    pub misblamed: u64,
    /// Records of poison messages (which the broker must refuse).
    pub poison_published: u64,
    /// Records appended before an earlier poison message of their entity was moved aside.
    pub overtook_poison: u64,
    /// Such records explained by a crash that erased the relay's move (not a violation).
    pub overtook_poison_across_crash: u64,
    /// Over the dead-lettered poison messages followed by a record of a later message of
    /// their entity: the smallest time from `failed_at` to the first such record, in ms
    /// (how closely the relay follows a move, so how much the overtaking check can see).
    pub poison_to_next_min_ms: Option<f64>,
    /// Commit to arrival.
    pub latency_ms: Option<Latency>,
    /// The windows of commit time with the slowest arrivals (by p99), worst first: where the
    /// tail of the latency comes from, to be read against the fault timeline.
    pub slowest_windows: Vec<WindowLatency>,
    /// A few examples of each finding, for a human.
    pub examples: Vec<String>,
}

impl Findings {
    /// True when nothing was lost, leaked, invented, reordered, misblamed, published that
    /// Kafka must refuse, or published ahead of a poison message not yet moved aside.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.leaked == 0
            && self.malformed == 0
            && self.reordered == 0
            && self.misblamed == 0
            && self.poison_published == 0
            && self.overtook_poison == 0
    }
}

/// A committed message's record, as the reorder walk needs it.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    seq: i64,
    id: i64,
    ts: i64,
    topic: usize,
    offset: i64,
}

/// A poison message moved aside, as the overtaking check needs it.
#[derive(Debug, Clone, Copy)]
struct MovedAside<'t> {
    seq: i64,
    id: i64,
    failed_at_us: i64,
    policy: &'t str,
}

/// Judges `records` (any order) against `truth`; `run.topics` names them in examples, and
/// examples give times as seconds after `run.origin_us` (the run's start, µs since the
/// epoch), as the harness's log lines do.
pub fn check(truth: &Truth, records: &[Record], run: &RunInfo<'_>) -> Findings {
    let (topics, origin_us) = (run.topics, run.origin_us);
    let since = |us: i64| format!("+{:.1}s", (us - origin_us) as f64 / 1e6);
    let at = |c: Option<&Committed>| match c.and_then(|c| c.commit_us) {
        Some(us) => format!("committed at {}", since(us)),
        None => "commit time unknown".to_owned(),
    };
    let is_committed = |key: &MessageKey| {
        truth
            .entities
            .get(&key.0)
            .and_then(|list| usize::try_from(key.1 - 1).ok().and_then(|i| list.get(i)))
            .is_some_and(|c| c.tx == key.2)
    };
    let mut f = Findings {
        records: records.len() as u64,
        committed_messages: truth.committed(),
        ..Findings::default()
    };
    let topic_name = |t: usize| topics.get(t).map_or("?", String::as_str);
    let mut examples: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut example = |kind: &'static str, text: String| {
        let list = examples.entry(kind).or_default();
        if list.len() < EXAMPLES {
            list.push(format!("{kind}: {text}"));
        }
    };

    // Per entity, per (topic, partition): the committed arrivals.
    let mut streams: BTreeMap<&str, BTreeMap<(usize, i32), Vec<Arrival>>> = BTreeMap::new();
    for r in records {
        let where_ = format!("{} [{}] @{}", topic_name(r.topic), r.partition, r.offset);
        let payload = r
            .payload
            .as_deref()
            .and_then(|b| serde_json::from_slice::<Payload>(b).ok());
        let (Some(p), Some(id), Some(ts)) = (payload, r.outbox_id, r.timestamp_ms) else {
            f.malformed += 1;
            example(
                "malformed",
                format!("{where_}: no chaos payload, outbox-id or LogAppendTime"),
            );
            continue;
        };
        if p.poison {
            f.poison_published += 1;
            example(
                "poison published",
                format!(
                    "{where_}: poison message {} seq {} (id {id}, payload {} bytes) arrived: the poison topic's max.message.bytes must refuse it",
                    p.entity,
                    p.seq,
                    r.payload.as_ref().map_or(0, Vec::len)
                ),
            );
        }
        if r.key.as_deref() != Some(p.entity.as_str())
            || r.entity_header.as_deref() != Some(p.entity.as_str())
        {
            f.malformed += 1;
            example(
                "malformed",
                format!(
                    "{where_}: key {:?} / outbox-entity-key {:?} for entity {}",
                    r.key, r.entity_header, p.entity
                ),
            );
            continue;
        }
        let committed = is_committed(&(p.entity.clone(), p.seq, p.tx.clone()));
        if !p.rb && !committed && p.async_commit {
            f.erased_by_crash += 1;
            continue;
        }
        if p.rb || !committed {
            f.leaked += 1;
            if p.rb {
                f.leaked_rb_flag += 1;
            }
            example(
                "leaked",
                format!(
                    "{where_}: {} seq {} of transaction {} (rb={}) was not committed",
                    p.entity, p.seq, p.tx, p.rb
                ),
            );
            continue;
        }
        let Some((entity, _)) = truth.entities.get_key_value(&p.entity) else {
            continue;
        };
        streams
            .entry(entity.as_str())
            .or_default()
            .entry((r.topic, r.partition))
            .or_default()
            .push(Arrival {
                seq: p.seq,
                id,
                ts,
                topic: r.topic,
                offset: r.offset,
            });
    }

    // What was moved aside: poison where it belongs, anything else misblamed.
    f.poison_committed = truth.poison.iter().filter(|k| is_committed(k)).count() as u64;
    let mut moved: HashMap<&str, Vec<MovedAside<'_>>> = HashMap::new();
    for (key, dead) in &truth.dead_letters {
        *f.dead_letter_policies
            .entry(dead.policy.clone())
            .or_default() += 1;
        if !is_committed(key) {
            f.dead_letter_uncommitted += 1;
            continue;
        }
        if truth.poison.contains(key) {
            f.poison_dead_lettered += 1;
            moved.entry(key.0.as_str()).or_default().push(MovedAside {
                seq: key.1,
                id: dead.id,
                failed_at_us: dead.failed_at_us,
                policy: &dead.policy,
            });
        } else {
            f.misblamed += 1;
            example(
                "misblamed",
                format!(
                    "{} seq {} (id {}, topic {}) is not poison but was moved to dead_letter ({}) at {}",
                    key.0,
                    key.1,
                    dead.id,
                    dead.topic,
                    dead.policy,
                    since(dead.failed_at_us)
                ),
            );
        }
    }
    f.dead_letter_uncommitted += truth.dead_letters_unreadable.len() as u64;

    let mut latencies: Vec<f64> = Vec::new();
    let mut windows: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    let mut arrivals_total = 0u64;
    let mut distinct_total = 0u64;
    for (entity, committed) in &truth.entities {
        let mut parts: Vec<Vec<Arrival>> = streams
            .remove(entity.as_str())
            .map(|m| m.into_values().collect())
            .unwrap_or_default();
        for part in &mut parts {
            part.sort_by_key(|a| a.offset);
        }
        arrivals_total += parts.iter().map(|p| p.len() as u64).sum::<u64>();
        // First arrival time per seq.
        let mut first: HashMap<i64, i64> = HashMap::new();
        for a in parts.iter().flatten() {
            first
                .entry(a.seq)
                .and_modify(|t| *t = (*t).min(a.ts))
                .or_insert(a.ts);
        }
        distinct_total += first.len() as u64;

        // No record of a later message before an earlier poison message was moved aside.
        let aside = moved.get(entity.as_str()).map_or(&[][..], Vec::as_slice);
        for m in aside {
            let next = parts
                .iter()
                .flatten()
                .filter(|a| a.seq > m.seq)
                .map(|a| a.ts * 1000 - m.failed_at_us)
                .min();
            if let Some(us) = next {
                let ms = us as f64 / 1000.0;
                f.poison_to_next_min_ms = Some(f.poison_to_next_min_ms.map_or(ms, |v| v.min(ms)));
            }
        }
        for a in parts.iter().flatten() {
            // The latest instant the record can have been appended at.
            let appended_by_us = (a.ts + 1) * 1000;
            let Some(m) = aside
                .iter()
                .filter(|m| {
                    m.seq < a.seq && appended_by_us + OVERTAKE_TOLERANCE_US < m.failed_at_us
                })
                .min_by_key(|m| m.seq)
            else {
                continue;
            };
            let across_crash = m.policy == "dead_letter"
                && run.crashes.iter().any(|c| {
                    c.unflushed_from_us <= a.ts * 1000
                        && a.ts * 1000 <= c.crashed_us
                        && c.crashed_us < m.failed_at_us
                });
            let text = format!(
                "{entity} seq {} (id {}, {}) was appended at {}, {} ms before poison seq {} (id {}) was moved aside ({}) at {}",
                a.seq,
                a.id,
                topic_name(a.topic),
                since(a.ts * 1000),
                (m.failed_at_us - a.ts * 1000) / 1000,
                m.seq,
                m.id,
                m.policy,
                since(m.failed_at_us)
            );
            if across_crash {
                f.overtook_poison_across_crash += 1;
                example("overtook poison across a crash", text);
            } else {
                f.overtook_poison += 1;
                example("overtook poison", text);
            }
        }

        // The de-duplicating consumer over the merged arrival order.
        let mut heads: BinaryHeap<Reverse<(i64, i64, usize, usize)>> = parts
            .iter()
            .enumerate()
            .filter_map(|(s, part)| part.first().map(|a| Reverse((a.ts, a.id, s, 0))))
            .collect();
        let mut last: Option<Arrival> = None;
        // Per topic, the highest seq that arrived on it so far.
        let mut topic_max: HashMap<usize, i64> = HashMap::new();
        let mut kept: HashSet<i64> = HashSet::new();
        let mut dropped: HashSet<i64> = HashSet::new();
        while let Some(Reverse((_, _, s, i))) = heads.pop() {
            let a = parts[s][i];
            if let Some(next) = parts[s].get(i + 1) {
                heads.push(Reverse((next.ts, next.id, s, i + 1)));
            }
            let behind_on_own_topic = topic_max.get(&a.topic).is_some_and(|m| *m > a.seq);
            let seen = topic_max.entry(a.topic).or_insert(a.seq);
            *seen = (*seen).max(a.seq);
            match last {
                Some(l) if a.id <= l.id => {
                    if !kept.contains(&a.seq) && dropped.insert(a.seq) {
                        f.reordered += 1;
                        f.reorder_max_gap_ms = f.reorder_max_gap_ms.max(a.ts - l.ts);
                        if !behind_on_own_topic {
                            f.reordered_across_topics += 1;
                        }
                        example(
                            if behind_on_own_topic {
                                "reordered (own topic)"
                            } else {
                                "reordered (across topics)"
                            },
                            format!(
                                "{entity} seq {} (id {}, {}, {}) arrived {} ms after seq {} (id {}, {}) and is dropped by a de-duplicating consumer",
                                a.seq,
                                a.id,
                                topic_name(a.topic),
                                at(committed.get(a.seq as usize - 1)),
                                a.ts - l.ts,
                                l.seq,
                                l.id,
                                topic_name(l.topic)
                            ),
                        );
                    }
                }
                _ => {
                    if let Some(l) = last.filter(|l| a.seq < l.seq) {
                        f.reordered += 1;
                        example(
                            "reordered (ids)",
                            format!(
                                "{entity} seq {} has outbox-id {} above seq {}'s {}: ids out of commit order",
                                a.seq, a.id, l.seq, l.id
                            ),
                        );
                    }
                    kept.insert(a.seq);
                    last = Some(a);
                }
            }
        }

        for (i, c) in committed.iter().enumerate() {
            let seq = i as i64 + 1;
            match first.get(&seq) {
                None => {
                    let key = (entity.clone(), seq, c.tx.clone());
                    let dead = truth.dead_letters.contains_key(&key);
                    if dead && truth.poison.contains(&key) {
                        continue; // moved aside, as Kafka refuses it
                    }
                    f.lost += 1;
                    let kind = c.tx.split('-').next().unwrap_or_default().to_owned();
                    *f.lost_by_writer.entry(kind).or_default() += 1;
                    let still = truth.in_outbox.contains(&key);
                    if still {
                        f.lost_still_in_outbox += 1;
                    }
                    if dead {
                        f.lost_in_dead_letter += 1;
                    }
                    let poison = if truth.poison.contains(&key) {
                        " (poison)"
                    } else {
                        ""
                    };
                    example(
                        "lost",
                        format!(
                            "{entity} seq {seq}{poison} of transaction {}, {}{}",
                            c.tx,
                            at(Some(c)),
                            if still {
                                " (still in the outbox)"
                            } else if dead {
                                " (in dead_letter)"
                            } else {
                                ""
                            }
                        ),
                    );
                }
                Some(ts) => {
                    if let Some(us) = c.commit_us {
                        let ms = (*ts * 1000 - us) as f64 / 1000.0;
                        latencies.push(ms);
                        windows
                            .entry((us - origin_us).div_euclid(WINDOW_S * 1_000_000))
                            .or_default()
                            .push(ms);
                    }
                }
            }
        }
    }
    f.duplicates = arrivals_total - distinct_total;
    f.latency_ms = latency(latencies);
    f.slowest_windows = slowest_windows(windows);
    // The graver findings first: cross-topic reorders can be many.
    f.examples = [
        "lost",
        "leaked",
        "malformed",
        "misblamed",
        "poison published",
        "overtook poison",
        "reordered (own topic)",
        "reordered (ids)",
        "reordered (across topics)",
        "overtook poison across a crash",
    ]
    .iter()
    .flat_map(|kind| examples.remove(kind).unwrap_or_default())
    .collect();
    f
}

/// The `SLOWEST_WINDOWS` windows with the highest p99, worst first.
fn slowest_windows(windows: BTreeMap<i64, Vec<f64>>) -> Vec<WindowLatency> {
    let mut all: Vec<WindowLatency> = windows
        .into_iter()
        .filter_map(|(index, ms)| {
            latency(ms).map(|l| WindowLatency {
                start_s: index * WINDOW_S,
                count: l.count,
                p99_ms: l.p99,
                max_ms: l.max,
            })
        })
        .collect();
    all.sort_by(|a, b| b.p99_ms.total_cmp(&a.p99_ms));
    all.truncate(SLOWEST_WINDOWS);
    all
}

fn latency(mut ms: Vec<f64>) -> Option<Latency> {
    if ms.is_empty() {
        return None;
    }
    ms.sort_by(f64::total_cmp);
    // Nearest rank.
    let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    Some(Latency {
        p50: rank(0.50),
        p99: rank(0.99),
        max: ms[ms.len() - 1],
        count: ms.len() as u64,
    })
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn the_slowest_windows_come_first_with_their_start() {
        let mut windows = BTreeMap::new();
        windows.insert(0, vec![10.0, 20.0]);
        windows.insert(3, vec![5.0, 90_000.0]);
        windows.insert(7, vec![300.0]);
        let slowest = slowest_windows(windows);
        assert_eq!(slowest.len(), 3);
        assert_eq!((slowest[0].start_s, slowest[0].count), (15, 2));
        assert_eq!(slowest[0].p99_ms, 90_000.0);
        assert_eq!(slowest[1].start_s, 35);
        assert_eq!(slowest[2].start_s, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::truth::DeadLetter;

    const TOPICS: [&str; 3] = ["ta", "tb", "poison"];

    /// Entity "e000" committed seqs 1..=n in transactions t1..tn, committed at n ms.
    fn truth(n: i64) -> Truth {
        let mut t = Truth::default();
        t.entities.insert(
            "e000".into(),
            (1..=n)
                .map(|s| Committed {
                    tx: format!("t{s}"),
                    commit_us: Some(s * 1000),
                })
                .collect(),
        );
        t
    }

    /// A record of e000 seq `seq` (transaction t{seq}) with outbox-id `id`, on `topic`,
    /// appended at `ts` ms.
    fn rec(seq: i64, id: i64, topic: usize, offset: i64, ts: i64) -> Record {
        let payload = Payload {
            entity: "e000".into(),
            seq,
            tx: format!("t{seq}"),
            writer: "test".into(),
            rb: false,
            async_commit: false,
            poison: false,
            pad: String::new(),
        };
        Record {
            topic,
            partition: 0,
            offset,
            timestamp_ms: Some(ts),
            key: Some("e000".into()),
            outbox_id: Some(id),
            entity_header: Some("e000".into()),
            payload: serde_json::to_vec(&payload).ok(),
        }
    }

    fn run(truth: &Truth, records: &[Record]) -> Findings {
        run_with_crashes(truth, records, &[])
    }

    fn run_with_crashes(truth: &Truth, records: &[Record], crashes: &[Crash]) -> Findings {
        let topics: Vec<String> = TOPICS.iter().map(|s| s.to_string()).collect();
        let info = RunInfo {
            topics: &topics,
            origin_us: 0,
            crashes,
        };
        check(truth, records, &info)
    }

    /// `truth(n)` where seq `poison` is a poison message, moved aside by `policy` at
    /// `failed_at_us`.
    fn poisoned(n: i64, poison: i64, policy: &str, failed_at_us: i64) -> Truth {
        let mut t = truth(n);
        let key = ("e000".to_owned(), poison, format!("t{poison}"));
        t.poison.insert(key.clone());
        t.dead_letters
            .insert(key, dead(poison, policy, failed_at_us));
        t
    }

    fn dead(seq: i64, policy: &str, failed_at_us: i64) -> DeadLetter {
        DeadLetter {
            id: 10 + seq - 1,
            topic: "poison".into(),
            policy: policy.into(),
            failed_at_us,
        }
    }

    /// A record of a poison message (which Kafka must refuse).
    fn poison_rec(seq: i64, id: i64, offset: i64, ts: i64) -> Record {
        let mut r = rec(seq, id, 2, offset, ts);
        let mut p: Payload =
            serde_json::from_slice(r.payload.as_deref().unwrap_or_default()).expect("payload");
        p.poison = true;
        p.pad = "x".repeat(50);
        r.payload = serde_json::to_vec(&p).ok();
        r
    }

    #[test]
    fn complete_and_in_order_is_clean_and_duplicates_are_counted() {
        let records = [
            rec(1, 10, 0, 0, 5),
            rec(2, 11, 1, 0, 6),
            rec(3, 12, 0, 1, 7),
            rec(2, 11, 1, 1, 9), // a redelivery
        ];
        let f = run(&truth(3), &records);
        assert!(f.clean(), "{f:?}");
        assert_eq!(f.duplicates, 1);
        let l = f.latency_ms.expect("latency");
        assert_eq!((l.p50, l.max, l.count), (4.0, 4.0, 3));
    }

    #[test]
    fn a_committed_message_that_never_arrives_is_lost() {
        let mut t = truth(3);
        t.in_outbox.insert(("e000".into(), 3, "t3".into()));
        let f = run(&t, &[rec(1, 10, 0, 0, 5), rec(2, 11, 0, 1, 6)]);
        assert_eq!((f.lost, f.lost_still_in_outbox), (1, 1));
        assert_eq!(f.reordered, 0);
    }

    #[test]
    fn a_dead_lettered_poison_message_is_a_hole_not_a_loss() {
        // seq 2 is poison, moved aside at 6.5 ms; seq 3 arrives after that.
        let t = poisoned(3, 2, "dead_letter", 6_500);
        let f = run(&t, &[rec(1, 10, 0, 0, 5), rec(3, 12, 1, 0, 20)]);
        assert!(f.clean(), "{f:?}");
        assert_eq!((f.poison_committed, f.poison_dead_lettered), (1, 1));
        assert_eq!(f.poison_to_next_min_ms, Some(13.5));
        assert_eq!(f.dead_letter_policies.get("dead_letter"), Some(&1));
        // The consumer keeps 1, 3: the hole, and nothing dropped.
        assert_eq!((f.lost, f.reordered, f.duplicates), (0, 0, 0));
    }

    #[test]
    fn a_poison_message_neither_in_kafka_nor_in_dead_letter_is_lost() {
        let mut t = truth(3);
        t.poison.insert(("e000".into(), 2, "t2".into()));
        let records = [rec(1, 10, 0, 0, 5), rec(3, 12, 1, 0, 20)];
        let f = run(&t, &records);
        assert_eq!(
            (f.lost, f.lost_still_in_outbox, f.poison_committed),
            (1, 0, 1)
        );
        assert!(!f.clean());
        // Still in the outbox: lost, and said so.
        t.in_outbox.insert(("e000".into(), 2, "t2".into()));
        let f = run(&t, &records);
        assert_eq!((f.lost, f.lost_still_in_outbox), (1, 1));
        // A dead-lettered row of another transaction (rolled-back work that took the
        // same seq) does not account for the committed poison message.
        let mut t = truth(3);
        t.poison.insert(("e000".into(), 2, "t2".into()));
        t.dead_letters.insert(
            ("e000".into(), 2, "rolled-back".into()),
            dead(2, "dead_letter", 6_500),
        );
        let f = run(&t, &records);
        assert_eq!((f.lost, f.dead_letter_uncommitted, f.misblamed), (1, 1, 0));
    }

    #[test]
    fn a_message_that_is_not_poison_in_dead_letter_is_misblamed() {
        let mut t = poisoned(3, 2, "dead_letter", 6_500);
        t.dead_letters.insert(
            ("e000".into(), 1, "t1".into()),
            dead(1, "dead_letter", 6_400),
        );
        let f = run(&t, &[rec(3, 12, 1, 0, 20)]);
        assert_eq!((f.misblamed, f.lost, f.lost_in_dead_letter), (1, 1, 1));
        assert!(!f.clean());
        // Even when it also arrived (published, then blamed for another's refusal).
        let f = run(&t, &[rec(1, 10, 0, 0, 5), rec(3, 12, 1, 0, 20)]);
        assert_eq!((f.misblamed, f.lost), (1, 0));
        assert!(!f.clean());
        assert!(
            f.examples
                .iter()
                .any(|e| e.starts_with("misblamed: e000 seq 1"))
        );
    }

    #[test]
    fn a_poison_record_that_arrives_is_published_poison() {
        let mut t = truth(3);
        t.poison.insert(("e000".into(), 2, "t2".into()));
        let f = run(
            &t,
            &[
                rec(1, 10, 0, 0, 5),
                poison_rec(2, 11, 0, 6),
                rec(3, 12, 1, 0, 20),
            ],
        );
        assert_eq!((f.poison_published, f.lost, f.reordered), (1, 0, 0));
        assert!(!f.clean());
        // Rolled back or not, a poison record never should arrive.
        let mut rolled_back = poison_rec(2, 11, 1, 7);
        let mut p: Payload =
            serde_json::from_slice(rolled_back.payload.as_deref().unwrap_or_default())
                .expect("payload");
        p.rb = true;
        rolled_back.payload = serde_json::to_vec(&p).ok();
        let f = run(&truth(1), &[rec(1, 10, 0, 0, 5), rolled_back]);
        assert_eq!((f.poison_published, f.leaked), (1, 1));
    }

    #[test]
    fn a_later_message_appended_before_the_poison_message_was_moved_aside_overtook_it() {
        for policy in ["dead_letter", "park_entity", "skip"] {
            // seq 3 appended at 5 ms, seq 2 moved aside at 20 ms: overtaken, whatever the
            // policy, even though the consumer's order 1, 3 looks fine.
            let t = poisoned(3, 2, policy, 20_000);
            let f = run(&t, &[rec(1, 10, 0, 0, 4), rec(3, 12, 1, 0, 5)]);
            assert_eq!(
                (f.overtook_poison, f.reordered, f.lost),
                (1, 0, 0),
                "{policy}"
            );
            assert!(!f.clean());
            // Within the tolerance: the end of millisecond 14 is 5 ms before 20 ms.
            let f = run(&t, &[rec(1, 10, 0, 0, 4), rec(3, 12, 1, 0, 14)]);
            assert!(f.clean(), "{policy}: {f:?}");
            let f = run(&t, &[rec(1, 10, 0, 0, 4), rec(3, 12, 1, 0, 13)]);
            assert_eq!(f.overtook_poison, 1, "{policy}");
            // Earlier messages may go before it, of course.
            let f = run(&t, &[rec(1, 10, 0, 0, 4), rec(3, 12, 1, 0, 30)]);
            assert!(f.clean(), "{policy}: {f:?}");
        }
    }

    #[test]
    fn a_dead_letter_move_erased_by_a_crash_explains_an_overtaking_record() {
        // seq 3 appended at 5 ms, in the crash's unflushed window (1..=8 ms); the move that
        // counts was made again after the crash, at 20 ms.
        let crash = Crash {
            unflushed_from_us: 1_000,
            crashed_us: 8_000,
        };
        let records = [rec(1, 10, 0, 0, 4), rec(3, 12, 1, 0, 5)];
        let t = poisoned(3, 2, "dead_letter", 20_000);
        let f = run_with_crashes(&t, &records, &[crash]);
        assert_eq!((f.overtook_poison, f.overtook_poison_across_crash), (0, 1));
        assert!(f.clean(), "{f:?}");
        // Not for moves the relay never makes asynchronously before going on.
        for policy in ["park_entity", "skip"] {
            let t = poisoned(3, 2, policy, 20_000);
            let f = run_with_crashes(&t, &records, &[crash]);
            assert_eq!((f.overtook_poison, f.overtook_poison_across_crash), (1, 0));
        }
        // Nor for a record appended before the writers stopped flushing.
        let late = Crash {
            unflushed_from_us: 6_000,
            ..crash
        };
        let f = run_with_crashes(&t, &records, &[late]);
        assert_eq!(f.overtook_poison, 1);
    }

    #[test]
    fn rolled_back_work_is_leaked() {
        let mut rb = rec(2, 11, 0, 1, 6);
        let mut p: Payload =
            serde_json::from_slice(rb.payload.as_deref().unwrap_or_default()).expect("payload");
        p.rb = true;
        rb.payload = serde_json::to_vec(&p).ok();
        let mut other_tx = rec(1, 9, 0, 2, 7);
        p.rb = false;
        p.seq = 1;
        p.tx = "rolled-back".into();
        other_tx.payload = serde_json::to_vec(&p).ok();
        let above = rec(5, 20, 0, 3, 8);
        // An asynchronous commit a crash erased after it was published: not a leak.
        let mut erased = rec(3, 21, 0, 5, 10);
        p.seq = 3;
        p.tx = "erased".into();
        p.async_commit = true;
        erased.payload = serde_json::to_vec(&p).ok();
        let f = run(
            &truth(2),
            &[
                rec(1, 10, 0, 0, 5),
                rb,
                other_tx,
                above,
                rec(2, 12, 0, 4, 9),
                erased,
            ],
        );
        assert_eq!(
            (f.leaked, f.leaked_rb_flag, f.erased_by_crash),
            (3, 1, 1),
            "{f:?}"
        );
        assert_eq!((f.lost, f.reordered), (0, 0));
    }

    #[test]
    fn a_message_arriving_after_a_later_one_is_reordered_even_when_it_arrives() {
        // Same topic: seq 2 arrives after seq 3; the consumer keeps 1, 3 and drops 2.
        let f = run(
            &truth(3),
            &[
                rec(1, 10, 0, 0, 5),
                rec(3, 12, 0, 1, 6),
                rec(2, 11, 0, 2, 7),
            ],
        );
        assert_eq!((f.reordered, f.reordered_across_topics, f.lost), (1, 0, 0));
        assert_eq!(f.reorder_max_gap_ms, 1);
        // Late on its own topic even though the message kept last is on the other topic.
        let f = run(
            &truth(4),
            &[
                rec(1, 10, 0, 0, 5),
                rec(3, 12, 0, 1, 6),
                rec(4, 13, 1, 0, 7),
                rec(2, 11, 0, 2, 3_000),
            ],
        );
        assert_eq!((f.reordered, f.reordered_across_topics), (1, 0));
        assert_eq!(f.reorder_max_gap_ms, 2_993);
        // Across topics: seq 2 on topic b appended a millisecond after seq 3 on topic a.
        let f = run(
            &truth(3),
            &[
                rec(1, 10, 0, 0, 5),
                rec(3, 12, 0, 1, 6),
                rec(2, 11, 1, 0, 7),
            ],
        );
        assert_eq!((f.reordered, f.reordered_across_topics), (1, 1));
    }

    #[test]
    fn same_millisecond_across_topics_gets_the_benefit_of_the_doubt() {
        let f = run(
            &truth(3),
            &[
                rec(1, 10, 0, 0, 5),
                rec(3, 12, 0, 1, 6),
                rec(2, 11, 1, 0, 6),
            ],
        );
        assert!(f.clean(), "{f:?}");
    }

    #[test]
    fn offset_order_wins_over_timestamps_within_a_partition() {
        // Same partition, same millisecond, seq 3 before seq 2 in the log: a reorder.
        let f = run(
            &truth(3),
            &[
                rec(1, 10, 0, 0, 5),
                rec(3, 12, 0, 1, 6),
                rec(2, 11, 0, 2, 6),
            ],
        );
        assert_eq!(f.reordered, 1);
    }

    #[test]
    fn ids_out_of_commit_order_are_reordered() {
        // seq 2 got a higher id than seq 3: kept in id order, seqs descend.
        let f = run(
            &truth(3),
            &[
                rec(1, 10, 0, 0, 5),
                rec(3, 11, 0, 1, 6),
                rec(2, 12, 0, 2, 7),
            ],
        );
        assert_eq!(f.reordered, 1);
    }

    #[test]
    fn records_that_are_not_chaos_messages_are_malformed() {
        let mut wrong_key = rec(1, 10, 0, 0, 5);
        wrong_key.key = Some("e001".into());
        let mut no_id = rec(2, 11, 0, 1, 6);
        no_id.outbox_id = None;
        let mut create_time = rec(2, 11, 0, 2, 6);
        create_time.timestamp_ms = None;
        let f = run(&truth(2), &[wrong_key, no_id, create_time]);
        assert_eq!((f.malformed, f.lost), (3, 2));
    }
}
