//! The verdict: what arrived in Kafka against what the database committed.
//!
//! - **lost**: a committed (entity, seq) of which no record arrived.
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
//! - **duplicates**: records of committed messages minus distinct committed messages.
//! - **latency**: per committed message, its first record's append time minus its
//!   transaction's commit time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use serde::Serialize;

use crate::consume::Record;
use crate::model::Payload;
use crate::truth::{Committed, Truth};

/// How many examples of each finding the summary shows.
const EXAMPLES: usize = 8;

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
    /// Of those, still in outbox.message or outbox.dead_letter.
    pub lost_still_in_database: u64,
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
    /// Commit to arrival.
    pub latency_ms: Option<Latency>,
    /// A few examples of each finding, for a human.
    pub examples: Vec<String>,
}

impl Findings {
    /// True when nothing was lost, leaked, invented or reordered.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.leaked == 0 && self.malformed == 0 && self.reordered == 0
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

/// Judges `records` (any order) against `truth`; `topics` names them in examples, and
/// examples give commit times as seconds after `origin_us` (the run's start, µs since the
/// epoch), as the harness's log lines do.
pub fn check(truth: &Truth, records: &[Record], topics: &[String], origin_us: i64) -> Findings {
    let at = |c: Option<&Committed>| match c.and_then(|c| c.commit_us) {
        Some(us) => format!("committed at +{:.1}s", (us - origin_us) as f64 / 1e6),
        None => "commit time unknown".to_owned(),
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
        let committed = truth
            .entities
            .get(&p.entity)
            .and_then(|list| usize::try_from(p.seq - 1).ok().and_then(|i| list.get(i)))
            .is_some_and(|c| c.tx == p.tx);
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

    let mut latencies: Vec<f64> = Vec::new();
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
                    f.lost += 1;
                    let kind = c.tx.split('-').next().unwrap_or_default().to_owned();
                    *f.lost_by_writer.entry(kind).or_default() += 1;
                    let still = truth
                        .in_database
                        .contains(&(entity.clone(), seq, c.tx.clone()));
                    if still {
                        f.lost_still_in_database += 1;
                    }
                    example(
                        "lost",
                        format!(
                            "{entity} seq {seq} of transaction {}, {}{}",
                            c.tx,
                            at(Some(c)),
                            if still { " (still in the outbox)" } else { "" }
                        ),
                    );
                }
                Some(ts) => {
                    if let Some(us) = c.commit_us {
                        latencies.push((*ts * 1000 - us) as f64 / 1000.0);
                    }
                }
            }
        }
    }
    f.duplicates = arrivals_total - distinct_total;
    f.latency_ms = latency(latencies);
    // The graver findings first: cross-topic reorders can be many.
    f.examples = [
        "lost",
        "leaked",
        "malformed",
        "reordered (own topic)",
        "reordered (ids)",
        "reordered (across topics)",
    ]
    .iter()
    .flat_map(|kind| examples.remove(kind).unwrap_or_default())
    .collect();
    f
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
mod tests {
    use super::*;

    const TOPICS: [&str; 2] = ["ta", "tb"];

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
        let topics: Vec<String> = TOPICS.iter().map(|s| s.to_string()).collect();
        check(truth, records, &topics, 0)
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
        t.in_database.insert(("e000".into(), 3, "t3".into()));
        let f = run(&t, &[rec(1, 10, 0, 0, 5), rec(2, 11, 0, 1, 6)]);
        assert_eq!((f.lost, f.lost_still_in_database), (1, 1));
        assert_eq!(f.reordered, 0);
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
