//! `outboxd status`: what the relays are doing, read from the database alone (any process
//! with the relay's role can ask): the schema's version and partition count, the live
//! instances, and per partition the backlog, its owner and the owner's state (written by the
//! owner's lease task with every renewal), the dead letters and the parked entities. Built to
//! stay cheap on a large backlog: counts stop at [`COUNT_CAP`] per partition and the ages are
//! one index probe each (docs/benchmarks.md has the figure).

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{Error, Result};

/// The most waiting messages counted per partition (`waiting` shows `100000+` beyond): the
/// backlog gauges' cap.
pub const COUNT_CAP: i64 = crate::backlog::COUNT_CAP;

/// Everything `outboxd status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The schema.
    pub schema: String,
    /// The highest migration applied.
    pub schema_version: Option<i32>,
    /// `settings.partition_count`.
    pub partition_count: i32,
    /// Relay instances registered (alive or not yet forgotten).
    pub instances: Vec<Instance>,
    /// Every partition below the count, and those above it that hold messages or a lease.
    pub partitions: Vec<Partition>,
    /// Rows in `dead_letter`.
    pub dead_letters: i64,
    /// Entities held back by the `park_entity` policy.
    pub parked_entities: i64,
}

/// One registered relay instance.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    /// Its id.
    pub id: String,
    /// Host name and process id it registered with.
    pub host: String,
    /// Its process id.
    pub pid: i32,
    /// Alive: its registration has not expired and its session holds its lock.
    pub alive: bool,
    /// Seconds since it started.
    pub up_seconds: f64,
    /// Leases it holds.
    pub leases: i64,
}

/// One virtual partition.
#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    /// Its number.
    pub partition: i32,
    /// Why an operator paused it, while it is paused.
    pub paused_reason: Option<String>,
    /// Messages waiting, counted up to [`COUNT_CAP`].
    pub waiting: i64,
    /// True when the count stopped at the cap.
    pub waiting_capped: bool,
    /// Age of the oldest waiting message in seconds.
    pub oldest_waiting_seconds: Option<f64>,
    /// The instance holding a valid lease, if any.
    pub owner: Option<String>,
    /// The lease's epoch.
    pub epoch: Option<i64>,
    /// `relaying`, `retrying`, `blocked`, `disconnected`, `restarting`, `starting` (from the
    /// owner); `paused` (by an operator); `unowned` (messages wait, no valid lease); `idle`
    /// (nothing waits, no owner).
    pub state: String,
    /// The message the state is about (retrying, blocked).
    pub message_id: Option<i64>,
    /// The error behind the state.
    pub error: Option<String>,
    /// Seconds since the owner last reported the state.
    pub reported_seconds_ago: Option<f64>,
    /// Rows of this partition in `dead_letter`.
    pub dead_letters: i64,
    /// Parked entities whose first held-back message came from this partition.
    pub parked_entities: i64,
}

/// Reads the status of `schema`.
pub async fn read(client: &Client, schema: &outbox::Schema) -> Result<Status> {
    let s = schema.name();
    let ctx = "reading the status";
    let head = client
        .query_one(
            &format!(
                "SELECT (SELECT max(version) FROM {s}.schema_migrations),
                        (SELECT partition_count FROM {s}.settings),
                        (SELECT count(*) FROM {s}.dead_letter),
                        (SELECT count(*) FROM {s}.parked_entity),
                        (SELECT paused_partitions::text FROM {s}.settings)"
            ),
            &[],
        )
        .await
        .map_err(Error::pg(ctx))?;
    let partition_count: Option<i32> = head.try_get(1).map_err(Error::pg(ctx))?;
    let paused_text: Option<String> = head.try_get(4).map_err(Error::pg(ctx))?;
    let paused: serde_json::Map<String, serde_json::Value> = paused_text
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let instances = client
        .query(
            &format!(
                "SELECT i.instance_id::text, i.host, i.pid,
                        i.expires_at > now() AND {s}.instance_lock_is_held(i.lock_key),
                        extract(epoch FROM now() - i.started_at)::float8,
                        (SELECT count(*) FROM {s}.partition_lease l
                          WHERE l.owner = i.instance_id AND l.expires_at > now())
                   FROM {s}.relay_instance i ORDER BY i.instance_id"
            ),
            &[],
        )
        .await
        .map_err(Error::pg(ctx))?
        .iter()
        .map(|r| {
            Ok(Instance {
                id: r.try_get(0)?,
                host: r.try_get(1)?,
                pid: r.try_get(2)?,
                alive: r.try_get(3)?,
                up_seconds: r.try_get(4)?,
                leases: r.try_get(5)?,
            })
        })
        .collect::<std::result::Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(Error::pg(ctx))?;
    let rows = client
        .query(
            &format!(
                "WITH parts AS (
                     SELECT p FROM generate_series(0, greatest(
                         (SELECT partition_count FROM {s}.settings) - 1,
                         coalesce((SELECT max(partition) FROM {s}.message), -1),
                         coalesce((SELECT max(partition) FROM {s}.partition_lease
                                    WHERE expires_at > now()), -1))) p
                 ), dead AS (
                     SELECT partition, count(*) AS n FROM {s}.dead_letter GROUP BY partition
                 ), parked AS (
                     SELECT d.partition, count(*) AS n
                       FROM {s}.parked_entity pe JOIN {s}.dead_letter d ON d.id = pe.message_id
                      GROUP BY d.partition
                 )
                 SELECT parts.p,
                        (SELECT count(*) FROM (SELECT 1 FROM {s}.message m
                                                WHERE m.partition = parts.p LIMIT $1) c),
                        (SELECT extract(epoch FROM now() - m.created_at)::float8
                           FROM {s}.message m WHERE m.partition = parts.p ORDER BY m.id LIMIT 1),
                        CASE WHEN l.expires_at > now() THEN l.owner::text END,
                        CASE WHEN l.expires_at > now() THEN l.epoch END,
                        CASE WHEN l.expires_at > now() THEN l.state END,
                        CASE WHEN l.expires_at > now() THEN l.state_message_id END,
                        CASE WHEN l.expires_at > now() THEN l.state_error END,
                        CASE WHEN l.expires_at > now()
                             THEN extract(epoch FROM now() - l.state_at)::float8 END,
                        coalesce(dead.n, 0), coalesce(parked.n, 0)
                   FROM parts
                   LEFT JOIN {s}.partition_lease l ON l.partition = parts.p
                   LEFT JOIN dead ON dead.partition = parts.p
                   LEFT JOIN parked ON parked.partition = parts.p
                  ORDER BY parts.p"
            ),
            &[&COUNT_CAP],
        )
        .await
        .map_err(Error::pg(ctx))?;
    let mut partitions = Vec::with_capacity(rows.len());
    for r in rows {
        let get = |e| Error::pg(ctx)(e);
        let waiting: i64 = r.try_get(1).map_err(get)?;
        let owner: Option<String> = r.try_get(3).map_err(get)?;
        let reported: Option<String> = r.try_get(5).map_err(get)?;
        let number: i32 = r.try_get(0).map_err(get)?;
        let paused_reason = paused
            .get(&number.to_string())
            .map(|p| p["reason"].as_str().unwrap_or("paused").to_owned());
        let state = match (&owner, reported) {
            _ if paused_reason.is_some() => "paused".to_owned(),
            (Some(_), Some(state)) => state,
            (Some(_), None) => "unknown".to_owned(),
            (None, _) if waiting > 0 => "unowned".to_owned(),
            (None, _) => "idle".to_owned(),
        };
        partitions.push(Partition {
            partition: number,
            paused_reason,
            waiting,
            waiting_capped: waiting >= COUNT_CAP,
            oldest_waiting_seconds: r.try_get(2).map_err(get)?,
            owner,
            epoch: r.try_get(4).map_err(get)?,
            state,
            message_id: r.try_get(6).map_err(get)?,
            error: r.try_get(7).map_err(get)?,
            reported_seconds_ago: r.try_get(8).map_err(get)?,
            dead_letters: r.try_get(9).map_err(get)?,
            parked_entities: r.try_get(10).map_err(get)?,
        });
    }
    Ok(Status {
        schema: s.to_owned(),
        schema_version: head.try_get(0).map_err(Error::pg(ctx))?,
        partition_count: partition_count.ok_or(Error::SettingsMissing)?,
        instances,
        partitions,
        dead_letters: head.try_get(2).map_err(Error::pg(ctx))?,
        parked_entities: head.try_get(3).map_err(Error::pg(ctx))?,
    })
}

impl Status {
    /// Readable tables, for a terminal.
    pub fn to_table(&self) -> String {
        use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
        let mut out = format!(
            "schema {} (version {}), {} partitions, {} dead letters, {} parked entities\n\n",
            self.schema,
            self.schema_version
                .map_or("?".to_owned(), |v| v.to_string()),
            self.partition_count,
            self.dead_letters,
            self.parked_entities
        );
        let mut instances = Table::new();
        instances
            .load_preset(UTF8_FULL_CONDENSED)
            .set_header(vec!["instance", "host", "pid", "alive", "up", "leases"]);
        for i in &self.instances {
            instances.add_row(vec![
                i.id.clone(),
                i.host.clone(),
                i.pid.to_string(),
                if i.alive { "yes" } else { "no" }.to_owned(),
                duration(i.up_seconds),
                i.leases.to_string(),
            ]);
        }
        if self.instances.is_empty() {
            out.push_str("no relay instance registered\n\n");
        } else {
            out.push_str(&format!("{instances}\n\n"));
        }
        let mut partitions = Table::new();
        partitions.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
            "partition",
            "waiting",
            "oldest",
            "state",
            "owner",
            "epoch",
            "dead letters",
            "parked",
        ]);
        for p in &self.partitions {
            let mut state = p.state.clone();
            if let Some(id) = p.message_id {
                state.push_str(&format!(" at message {id}"));
            }
            if let Some(reason) = &p.paused_reason {
                state.push_str(&format!(": {reason}"));
            }
            if let Some(error) = &p.error {
                state.push_str(&format!(": {error}"));
            }
            partitions.add_row(vec![
                p.partition.to_string(),
                if p.waiting_capped {
                    format!("{}+", p.waiting)
                } else {
                    p.waiting.to_string()
                },
                p.oldest_waiting_seconds.map_or("-".to_owned(), duration),
                state,
                p.owner
                    .as_deref()
                    .map_or("-".to_owned(), |o| o.chars().take(8).collect()),
                p.epoch.map_or("-".to_owned(), |e| e.to_string()),
                p.dead_letters.to_string(),
                p.parked_entities.to_string(),
            ]);
        }
        out.push_str(&format!("{partitions}\n"));
        out
    }
}

fn duration(seconds: f64) -> String {
    let d = std::time::Duration::from_secs_f64(seconds.max(0.0));
    humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
}
