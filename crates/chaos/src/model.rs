//! What the writers write and the checker reads: the payload of every chaos message, the
//! entity and topic names, and the harness's own tables. Commit order and the committed
//! set come from the database, never from a writer's bookkeeping: every transaction bumps
//! `chaos.entity_seq` for each entity it writes (the row lock serializes the writers of an
//! entity, so `seq` is commit order, and a rollback takes its increments with it) and
//! records the range it took, with its own transaction id, in `chaos.ledger`.
//! `crates/chaos/python/writer.py` follows the same protocol. A poison message (poison.rs)
//! takes its seq the same way and is also recorded in `chaos.poison`, in the same
//! transaction, so the checker knows which committed messages are poison without trusting
//! a writer or the relay.

use serde::{Deserialize, Serialize};

/// The JSON payload of every message the writers write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// The entity key (also the outbox entity key and so the Kafka key).
    pub entity: String,
    /// The entity's commit-order number, from `chaos.entity_seq`.
    pub seq: i64,
    /// The writing transaction's token (writer name and counter), as in `chaos.ledger.tx`:
    /// tells a committed message from a rolled-back one that took the same `seq`.
    pub tx: String,
    /// The writer, e.g. `rust-2` or `py-0`.
    pub writer: String,
    /// Set on messages the writer is about to roll back: such a record must never arrive.
    pub rb: bool,
    /// Set when the transaction commits with `synchronous_commit = off`: a crash may then
    /// erase it after the relay published it (see checker.rs).
    #[serde(default, rename = "async")]
    pub async_commit: bool,
    /// Set on poison messages (written to the poison topic, which Kafka refuses): such a
    /// record must never arrive. Absent on every other message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub poison: bool,
    /// A poison message's padding (poison.rs): what makes Kafka refuse it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pad: String,
}

/// The name of entity `i`: a small key space keeps entities hot.
pub fn entity_name(i: usize) -> String {
    format!("e{i:03}")
}

/// Creates the harness's tables in a fresh schema `chaos`, with one `entity_seq` row per
/// entity so that writers only ever update.
pub fn setup_sql(entities: usize) -> String {
    format!(
        "DROP SCHEMA IF EXISTS chaos CASCADE;
         CREATE SCHEMA chaos;
         -- Commit order per entity: writers bump seq under the row lock.
         CREATE TABLE chaos.entity_seq (entity text PRIMARY KEY, seq bigint NOT NULL DEFAULT 0);
         -- One row per (transaction, entity): the seq range it took and the transaction id,
         -- whose commit timestamp the checker reads (track_commit_timestamp = on).
         CREATE TABLE chaos.ledger (
             entity text NOT NULL,
             seq_lo bigint NOT NULL,
             seq_hi bigint NOT NULL,
             tx text NOT NULL,
             xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
             PRIMARY KEY (entity, seq_hi)
         );
         -- The poison messages, written in the transaction that writes them: a row exists
         -- exactly when the message was committed.
         CREATE TABLE chaos.poison (
             entity text NOT NULL,
             seq bigint NOT NULL,
             tx text NOT NULL,
             PRIMARY KEY (entity, seq)
         );
         INSERT INTO chaos.entity_seq (entity)
         SELECT 'e' || lpad(i::text, 3, '0') FROM generate_series(0, {last}) AS i;",
        last = entities.saturating_sub(1)
    )
}

/// Takes `$2` commit-order numbers for entity `$1` in transaction `$3` and records them in
/// the ledger; returns the highest. One statement, so one round trip per entity.
pub const TAKE_SEQ: &str =
    "WITH s AS (UPDATE chaos.entity_seq SET seq = seq + $2 WHERE entity = $1 RETURNING seq)
INSERT INTO chaos.ledger (entity, seq_lo, seq_hi, tx)
SELECT $1, s.seq - $2 + 1, s.seq, $3 FROM s
RETURNING seq_hi";

/// What the checker reads back as the truth: every committed range with its commit time in
/// microseconds since the epoch (NULL when PostgreSQL has none).
pub const READ_LEDGER: &str = "SELECT entity, seq_lo, seq_hi, tx,
       (extract(epoch FROM pg_xact_commit_timestamp(xid(xid))) * 1000000)::bigint
  FROM chaos.ledger ORDER BY entity, seq_lo";

/// Records that message `$2` of entity `$1`, written by transaction `$3`, is poison.
pub const RECORD_POISON: &str = "INSERT INTO chaos.poison (entity, seq, tx) VALUES ($1, $2, $3)";

/// The committed poison messages.
pub const READ_POISON: &str = "SELECT entity, seq, tx FROM chaos.poison";

/// What the relay (or the operator's `outboxd skip`) moved aside: payload, policy and when,
/// in microseconds since the epoch on PostgreSQL's clock (`failed_at` is `now()` of the
/// moving statement's transaction).
pub const READ_DEAD_LETTER: &str = "SELECT id, topic, payload, policy,
       (extract(epoch FROM failed_at) * 1000000)::bigint
  FROM outbox.dead_letter ORDER BY id";

/// Each entity's committed count.
pub const READ_ENTITY_SEQ: &str = "SELECT entity, seq FROM chaos.entity_seq ORDER BY entity";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_as_json() {
        let p = Payload {
            entity: entity_name(7),
            seq: 3,
            tx: "rust-1-9".into(),
            writer: "rust-1".into(),
            rb: false,
            async_commit: true,
            poison: false,
            pad: String::new(),
        };
        let json = serde_json::to_string(&p).expect("serialize");
        // Normal messages look as they always did (and as the Python writer's do).
        assert_eq!(
            json,
            r#"{"entity":"e007","seq":3,"tx":"rust-1-9","writer":"rust-1","rb":false,"async":true}"#
        );
        assert_eq!(serde_json::from_str::<Payload>(&json).expect("parse"), p);
        let poison = Payload {
            poison: true,
            pad: "QUJD".into(),
            ..p
        };
        let json = serde_json::to_string(&poison).expect("serialize");
        assert!(json.ends_with(r#""poison":true,"pad":"QUJD"}"#), "{json}");
        assert_eq!(
            serde_json::from_str::<Payload>(&json).expect("parse"),
            poison
        );
    }
}
