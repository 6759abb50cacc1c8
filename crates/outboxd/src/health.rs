//! What each partition worker is doing, for `/health` and for tests: a small shared map
//! updated on every state change (not per message), read on request.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The state of one virtual partition in this relay instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionState {
    /// Connecting to PostgreSQL or acquiring the partition.
    Starting,
    /// Owned by this instance and relaying.
    Relaying,
    /// Owned by another relay instance; this one checks again later.
    OwnedElsewhere,
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
}

impl PartitionState {
    /// True when this state needs attention (health answers 503).
    pub fn is_failing(&self) -> bool {
        matches!(
            self,
            PartitionState::Disconnected { .. }
                | PartitionState::Retrying { .. }
                | PartitionState::Blocked { .. }
        )
    }

    fn describe(&self) -> String {
        match self {
            PartitionState::Starting => "starting".to_owned(),
            PartitionState::Relaying => "relaying".to_owned(),
            PartitionState::OwnedElsewhere => "owned by another instance".to_owned(),
            PartitionState::Disconnected { error } => format!("disconnected: {error}"),
            PartitionState::Retrying { message_id, error } => {
                format!("retrying message {message_id}: {error}")
            }
            PartitionState::Blocked { message_id, error } => {
                format!("blocked at message {message_id}: {error}")
            }
        }
    }
}

/// The relay's health: the state of every partition it serves.
#[derive(Debug, Default)]
pub struct Health {
    partitions: Mutex<BTreeMap<i32, PartitionState>>,
}

impl Health {
    /// Records the state of `partition`.
    pub fn set(&self, partition: i32, state: PartitionState) {
        let mut map = match self.partitions.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.insert(partition, state);
    }

    /// A copy of every partition's state.
    pub fn snapshot(&self) -> BTreeMap<i32, PartitionState> {
        match self.partitions.lock() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// True when no partition is failing.
    pub fn is_healthy(&self) -> bool {
        self.snapshot().values().all(|s| !s.is_failing())
    }

    /// The `/health` body: `{"healthy": bool, "partitions": {"0": "relaying", ...}}`.
    pub fn to_json(&self) -> String {
        let snapshot = self.snapshot();
        let partitions: serde_json::Map<String, serde_json::Value> = snapshot
            .iter()
            .map(|(p, s)| (p.to_string(), serde_json::Value::String(s.describe())))
            .collect();
        serde_json::json!({
            "healthy": snapshot.values().all(|s| !s.is_failing()),
            "partitions": partitions,
        })
        .to_string()
    }
}
