//! What each partition worker is doing, for the probes (`/healthz`, `/readyz`, `/health`)
//! and for tests: a small shared map updated on every state change (not per message), the
//! heartbeats of the relay's loops, read on request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ownership::Ownership;

/// The state of one virtual partition in this relay instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionState {
    /// Connecting to PostgreSQL or acquiring the partition.
    Starting,
    /// Owned by this instance and relaying.
    Relaying,
    /// Owned by another relay instance; this one checks again later.
    OwnedElsewhere,
    /// At or above the partition count and drained: held by nobody until messages appear
    /// in it again.
    Idle,
    /// Paused by an operator (`outboxd partitions pause`): nobody relays it until resumed.
    Paused,
    /// PostgreSQL is unreachable; reconnecting with backoff.
    Disconnected {
        /// The last connection error.
        error: String,
    },
    /// Publishing fails with a retriable error; retrying the batch in place.
    Retrying {
        /// The message being retried.
        message_id: i64,
        /// The last error.
        error: String,
    },
    /// A message was refused for good and the policy is `block`: waiting for an operator.
    Blocked {
        /// The refused message.
        message_id: i64,
        /// Kafka's error.
        error: String,
    },
    /// The worker ended unexpectedly (a panic); it is started again after a backoff.
    Restarting {
        /// How it ended.
        error: String,
        /// How many times it was restarted so far.
        restarts: u64,
    },
}

impl PartitionState {
    /// True when this state needs attention (health answers 503).
    pub fn is_failing(&self) -> bool {
        matches!(
            self,
            PartitionState::Disconnected { .. }
                | PartitionState::Retrying { .. }
                | PartitionState::Blocked { .. }
                | PartitionState::Restarting { .. }
        )
    }

    /// The state's name, as `outboxd status` shows it.
    pub fn kind(&self) -> &'static str {
        match self {
            PartitionState::Starting => "starting",
            PartitionState::Relaying => "relaying",
            PartitionState::OwnedElsewhere => "owned elsewhere",
            PartitionState::Idle => "idle",
            PartitionState::Paused => "paused",
            PartitionState::Disconnected { .. } => "disconnected",
            PartitionState::Retrying { .. } => "retrying",
            PartitionState::Blocked { .. } => "blocked",
            PartitionState::Restarting { .. } => "restarting",
        }
    }

    /// The message it is about (retrying, blocked), if any.
    pub fn message_id(&self) -> Option<i64> {
        match self {
            PartitionState::Retrying { message_id, .. }
            | PartitionState::Blocked { message_id, .. } => Some(*message_id),
            _ => None,
        }
    }

    /// The error behind it, if any.
    pub fn error(&self) -> Option<&str> {
        match self {
            PartitionState::Disconnected { error }
            | PartitionState::Retrying { error, .. }
            | PartitionState::Blocked { error, .. }
            | PartitionState::Restarting { error, .. } => Some(error),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            PartitionState::Starting => "starting".to_owned(),
            PartitionState::Relaying => "relaying".to_owned(),
            PartitionState::OwnedElsewhere => "owned by another instance".to_owned(),
            PartitionState::Idle => "idle (above the partition count, drained)".to_owned(),
            PartitionState::Paused => "paused by an operator".to_owned(),
            PartitionState::Disconnected { error } => format!("disconnected: {error}"),
            PartitionState::Retrying { message_id, error } => {
                format!("retrying message {message_id}: {error}")
            }
            PartitionState::Blocked { message_id, error } => {
                format!("blocked at message {message_id}: {error}")
            }
            PartitionState::Restarting { error, restarts } => {
                format!("restarting (restart {restarts}): {error}")
            }
        }
    }
}

/// The relay's health: the state of every partition it serves, of its other background
/// tasks, and of its Kafka producer.
#[derive(Debug, Default)]
pub struct Health {
    partitions: Mutex<BTreeMap<i32, PartitionState>>,
    /// Background tasks that cannot do their job (ended unexpectedly and wait for their
    /// restart, or cannot reach what they need), with why.
    task_problems: Mutex<BTreeMap<&'static str, String>>,
    /// The producer's fatal errors so far and the last one, when there was one.
    producer: Mutex<Option<(u64, String)>>,
    /// Why Kafka counts as unreachable, while it does.
    kafka: Mutex<Option<String>>,
    /// Entities the `park_entity` policy holds back, in the whole schema.
    parked_entities: Mutex<i64>,
    /// This instance's leases, once the relay runs.
    ownership: Mutex<Option<Arc<Ownership>>>,
    /// The loops that say they are alive: when each last did, and how long it may be quiet.
    beats: Mutex<BTreeMap<&'static str, (Instant, Duration)>>,
    /// Start-up has read what the relay starts from (PostgreSQL was reached once).
    started: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Health {
    /// Records the state of `partition`.
    pub fn set(&self, partition: i32, state: PartitionState) {
        lock(&self.partitions).insert(partition, state);
    }

    /// Records that the background task `name` cannot do its job (`Some(why)`: it ended
    /// unexpectedly, or its queries fail) or works again (`None`).
    pub fn set_task(&self, name: &'static str, failure: Option<String>) {
        let mut tasks = lock(&self.task_problems);
        match failure {
            Some(how) => tasks.insert(name, how),
            None => tasks.remove(name),
        };
    }

    /// Records the producer's fatal errors: how many so far, and the last one.
    pub fn set_producer_fatal(&self, count: u64, last: String) {
        *lock(&self.producer) = Some((count, last));
    }

    /// Records whether Kafka is unreachable (`Some(why)`) or not.
    pub fn set_kafka(&self, unreachable: Option<String>) {
        *lock(&self.kafka) = unreachable;
    }

    /// Shows `ownership`'s instance id, leases and counters in `/health`.
    pub fn set_ownership(&self, ownership: Arc<Ownership>) {
        *lock(&self.ownership) = Some(ownership);
    }

    /// Records how many entities are parked.
    pub fn set_parked_entities(&self, count: i64) {
        *lock(&self.parked_entities) = count;
    }

    /// Records that the loop `name` is alive; liveness fails when it stays quiet for longer
    /// than `allowance` (it is stuck: no outage makes a loop stop going round).
    pub fn beat(&self, name: &'static str, allowance: Duration) {
        lock(&self.beats).insert(name, (Instant::now(), allowance));
    }

    /// Records that start-up reached PostgreSQL and the relay's tasks run.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// Liveness (`/healthz`): every loop went round within its allowance. Outages of
    /// PostgreSQL or Kafka never fail it: a restart would not end them.
    pub fn liveness(&self) -> (bool, serde_json::Value) {
        let beats = lock(&self.beats).clone();
        let mut alive = true;
        let loops: serde_json::Map<String, serde_json::Value> = beats
            .into_iter()
            .map(|(name, (at, allowance))| {
                let quiet = at.elapsed();
                alive &= quiet <= allowance;
                (
                    name.to_owned(),
                    serde_json::json!({
                        "quiet_ms": millis(quiet),
                        "allowed_ms": millis(allowance),
                    }),
                )
            })
            .collect();
        (alive, serde_json::json!({ "alive": alive, "loops": loops }))
    }

    /// Readiness (`/readyz`): PostgreSQL reached and no task failing, Kafka reachable, and
    /// every partition the shared view gives this instance held under a lease. Blocked
    /// partitions are listed, but do not make the instance unready: another instance would
    /// be blocked by the same message.
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        let mut reasons = Vec::new();
        if !self.started.load(Ordering::Relaxed) {
            reasons.push("starting: PostgreSQL not reached yet".to_owned());
        }
        let tasks = lock(&self.task_problems).clone();
        for (task, why) in &tasks {
            reasons.push(format!("{task}: {why}"));
        }
        let snapshot = self.snapshot();
        for (p, state) in &snapshot {
            if let PartitionState::Disconnected { error } = state {
                reasons.push(format!("partition {p} disconnected: {error}"));
            }
        }
        let kafka = lock(&self.kafka).clone();
        if let Some(why) = &kafka {
            reasons.push(format!("Kafka unreachable: {why}"));
        }
        let mut share = serde_json::Value::Null;
        if let Some(o) = lock(&self.ownership).clone() {
            let held: Vec<i32> = o.leases().into_keys().collect();
            match o.view() {
                Some(view) => {
                    let assigned = view.owned_by(o.instance());
                    let missing: Vec<i32> = assigned
                        .iter()
                        .copied()
                        .filter(|p| !held.contains(p))
                        .collect();
                    if !missing.is_empty() {
                        reasons.push(format!(
                            "not holding partitions {missing:?} of its share yet"
                        ));
                    }
                    share = serde_json::json!({
                        "assigned": assigned, "held": held, "missing": missing,
                    });
                }
                None => reasons.push("no ownership view read yet".to_owned()),
            }
        }
        let blocked: Vec<serde_json::Value> = snapshot
            .iter()
            .filter_map(|(p, state)| match state {
                PartitionState::Blocked { message_id, error } => Some(serde_json::json!({
                    "partition": p, "message_id": message_id, "error": error,
                })),
                _ => None,
            })
            .collect();
        let ready = reasons.is_empty();
        let body = serde_json::json!({
            "ready": ready,
            "reasons": reasons,
            "partitions": share,
            "blocked": blocked,
        });
        (ready, body)
    }

    /// A copy of every partition's state.
    pub fn snapshot(&self) -> BTreeMap<i32, PartitionState> {
        lock(&self.partitions).clone()
    }

    /// True when no partition is failing, no background task waits for a restart, and Kafka
    /// is reachable. (Parked entities are shown but do not fail health: the relay works, an
    /// operator has a decision to make.)
    pub fn is_healthy(&self) -> bool {
        self.snapshot().values().all(|s| !s.is_failing())
            && lock(&self.task_problems).is_empty()
            && lock(&self.kafka).is_none()
    }

    /// The `/health` body (every detail; 503 when anything needs attention): `{"healthy": bool, "partitions": {"0": "relaying", ...}}`, this
    /// instance's id, its `leases` (epoch and age per partition), `lease_takeovers` and
    /// `fencing_rejections`, plus `task_problems`, `kafka`, `parked_entities` and `producer`
    /// when there is something to say.
    pub fn to_json(&self) -> String {
        let snapshot = self.snapshot();
        let partitions: serde_json::Map<String, serde_json::Value> = snapshot
            .iter()
            .map(|(p, s)| (p.to_string(), serde_json::Value::String(s.describe())))
            .collect();
        let mut body = serde_json::json!({
            "healthy": self.is_healthy(),
            "partitions": partitions,
        });
        let tasks = lock(&self.task_problems).clone();
        if !tasks.is_empty() {
            body["task_problems"] = serde_json::json!(tasks);
        }
        if let Some(why) = lock(&self.kafka).clone() {
            body["kafka"] = serde_json::json!(why);
        }
        let parked = *lock(&self.parked_entities);
        if parked > 0 {
            body["parked_entities"] = serde_json::json!(parked);
        }
        if let Some(o) = lock(&self.ownership).clone() {
            let leases: serde_json::Map<String, serde_json::Value> = o
                .leases()
                .into_iter()
                .map(|(p, l)| {
                    (
                        p.to_string(),
                        serde_json::json!({
                            "epoch": l.epoch,
                            "renewed_ms_ago": u64::try_from(l.renewed_at.elapsed().as_millis())
                                .unwrap_or(u64::MAX),
                        }),
                    )
                })
                .collect();
            let (takeovers, fenced) = o.counters();
            body["instance"] = serde_json::json!(o.instance());
            body["leases"] = serde_json::Value::Object(leases);
            body["lease_takeovers"] = serde_json::json!(takeovers);
            body["fencing_rejections"] = serde_json::json!(fenced);
        }
        if let Some((count, last)) = lock(&self.producer).clone() {
            body["producer"] = serde_json::json!({
                "fatal_errors": count,
                "last_fatal_error": last,
            });
        }
        body.to_string()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
