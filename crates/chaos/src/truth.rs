//! What the database says was committed: for every entity, the seq numbers 1..=seq of
//! `chaos.entity_seq`, each with the token of the transaction that committed it and that
//! transaction's commit time (from `chaos.ledger` and `pg_xact_commit_timestamp`). Before
//! anything is judged, the ledger must tile every entity's range exactly; if it does not,
//! the harness's own bookkeeping is broken and the run stops.

use std::collections::{BTreeMap, HashSet};

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

/// The committed set.
#[derive(Debug, Clone, Default)]
pub struct Truth {
    /// Per entity, its committed messages; index `seq - 1`.
    pub entities: BTreeMap<String, Vec<Committed>>,
    /// Messages still in the outbox or moved to dead_letter, as (entity, seq, tx).
    pub in_database: HashSet<(String, i64, String)>,
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
    for table in ["outbox.message", "outbox.dead_letter"] {
        for row in client
            .query(&format!("SELECT payload FROM {table}"), &[])
            .await
            .context(format!("reading the payloads left in {table}"))?
        {
            let payload: Option<Vec<u8>> = row.get(0);
            if let Some(p) = payload.and_then(|b| serde_json::from_slice::<Payload>(&b).ok()) {
                truth.in_database.insert((p.entity, p.seq, p.tx));
            }
        }
    }
    Ok(truth)
}
