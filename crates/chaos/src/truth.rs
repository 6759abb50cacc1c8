//! What the database says was committed: for every entity, the seq numbers 1..=seq of
//! `chaos.entity_seq`, each with the token of the transaction that committed it and that
//! transaction's commit time (from `chaos.ledger` and `pg_xact_commit_timestamp`), which of
//! them are poison (`chaos.poison`), and what the database still holds: messages left in
//! `outbox.message`, and the ones moved to `outbox.dead_letter` with their policy and when.
//! Before anything is judged, the ledger must tile every entity's range exactly; if it does
//! not, the harness's own bookkeeping is broken and the run stops.

use std::collections::{BTreeMap, HashMap, HashSet};

use tokio_postgres::Client;

use crate::error::{Context, Error, Result};
use crate::model::{self, Payload};

/// One committed message, as the database knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The committing transaction's token.
    pub tx: String,
    /// Its commit time in microseconds since the epoch, when PostgreSQL has it.
    pub commit_us: Option<i64>,
}

/// A message's identity as its payload gives it: (entity, seq, transaction token).
pub type MessageKey = (String, i64, String);

/// A row of `outbox.dead_letter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message id (its `outbox-id`).
    pub id: i64,
    /// The topic it was bound for.
    pub topic: String,
    /// `dead_letter`, `park_entity` (the relay's policies) or `skip` (`outboxd skip`).
    pub policy: String,
    /// When it was moved aside, µs since the epoch on PostgreSQL's clock.
    pub failed_at_us: i64,
}

/// The committed set.
#[derive(Debug, Clone, Default)]
pub struct Truth {
    /// Per entity, its committed messages; index `seq - 1`.
    pub entities: BTreeMap<String, Vec<Committed>>,
    /// Committed poison messages (from `chaos.poison`, written in their transaction).
    pub poison: HashSet<MessageKey>,
    /// Messages still in `outbox.message` at check time.
    pub in_outbox: HashSet<MessageKey>,
    /// Rows of `outbox.dead_letter` whose payload is a chaos message, by that message.
    pub dead_letters: HashMap<MessageKey, DeadLetter>,
    /// Ids of `outbox.dead_letter` rows whose payload is not a chaos message.
    pub dead_letters_unreadable: Vec<i64>,
}

impl Truth {
    /// How many messages were committed.
    pub fn committed(&self) -> u64 {
        self.entities.values().map(|v| v.len() as u64).sum()
    }
}

/// One `chaos.ledger` row: seq_lo, seq_hi, tx, commit time in µs.
type LedgerRow = (i64, i64, String, Option<i64>);

/// Reads the committed set and checks the ledger against `entity_seq`.
pub async fn read(client: &Client) -> Result<Truth> {
    let mut truth = Truth::default();
    let mut ranges: BTreeMap<String, Vec<LedgerRow>> = BTreeMap::new();
    for row in client
        .query(model::READ_LEDGER, &[])
        .await
        .context("reading chaos.ledger")?
    {
        ranges.entry(row.get(0)).or_default().push((
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
        ));
    }
    for row in client
        .query(model::READ_ENTITY_SEQ, &[])
        .await
        .context("reading chaos.entity_seq")?
    {
        let (entity, seq): (String, i64) = (row.get(0), row.get(1));
        let mut list = Vec::with_capacity(usize::try_from(seq).unwrap_or_default());
        for (lo, hi, tx, commit_us) in ranges.remove(&entity).unwrap_or_default() {
            if lo != list.len() as i64 + 1 || hi < lo {
                return Err(Error::msg(format!(
                    "harness bookkeeping is inconsistent: entity {entity} has ledger range {lo}..={hi} after {} committed",
                    list.len()
                )));
            }
            for _ in lo..=hi {
                list.push(Committed {
                    tx: tx.clone(),
                    commit_us,
                });
            }
        }
        if list.len() as i64 != seq {
            return Err(Error::msg(format!(
                "harness bookkeeping is inconsistent: entity {entity} has seq {seq} but its ledger covers 1..={}",
                list.len()
            )));
        }
        truth.entities.insert(entity, list);
    }
    if let Some(entity) = ranges.keys().next() {
        return Err(Error::msg(format!(
            "harness bookkeeping is inconsistent: ledger rows for unknown entity {entity}"
        )));
    }
    for row in client
        .query(model::READ_POISON, &[])
        .await
        .context("reading chaos.poison")?
    {
        truth.poison.insert((row.get(0), row.get(1), row.get(2)));
    }
    for row in client
        .query("SELECT payload FROM outbox.message", &[])
        .await
        .context("reading the payloads left in outbox.message")?
    {
        if let Some(p) = parse(row.get(0)) {
            truth.in_outbox.insert((p.entity, p.seq, p.tx));
        }
    }
    for row in client
        .query(model::READ_DEAD_LETTER, &[])
        .await
        .context("reading outbox.dead_letter")?
    {
        let dead = DeadLetter {
            id: row.get(0),
            topic: row.get(1),
            policy: row.get(3),
            failed_at_us: row.get(4),
        };
        match parse(row.get(2)) {
            Some(p) => {
                truth.dead_letters.insert((p.entity, p.seq, p.tx), dead);
            }
            None => truth.dead_letters_unreadable.push(dead.id),
        }
    }
    Ok(truth)
}

/// A chaos payload, or `None` for anything else.
fn parse(payload: Option<Vec<u8>>) -> Option<Payload> {
    payload.and_then(|b| serde_json::from_slice::<Payload>(&b).ok())
}
