//! Schema migrations: the versioned SQL files of the top-level `migrations/` folder, applied
//! once each, in order, in one transaction under an advisory lock so that several processes
//! starting at once do not race. `outboxd migrate` calls the same code.

use crate::error::{Error, Result};
use crate::schema::Schema;

/// One versioned migration.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in order. The files use `@schema@` where the schema name goes.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_outbox",
        sql: include_str!("../../../migrations/0001_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "0002_failures",
        sql: include_str!("../../../migrations/0002_failures.sql"),
    },
    Migration {
        version: 3,
        name: "0003_nothing_lost",
        sql: include_str!("../../../migrations/0003_nothing_lost.sql"),
    },
    Migration {
        version: 4,
        name: "0004_leases",
        sql: include_str!("../../../migrations/0004_leases.sql"),
    },
    Migration {
        version: 5,
        name: "0005_roles",
        sql: include_str!("../../../migrations/0005_roles.sql"),
    },
    Migration {
        version: 6,
        name: "0006_status",
        sql: include_str!("../../../migrations/0006_status.sql"),
    },
];

/// The schema version this library expects.
pub const SCHEMA_VERSION: i32 = 6;

/// One migration as `migration_status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Its version.
    pub version: i32,
    /// Its name (the file name without `.sql`).
    pub name: String,
    /// When it was applied to the schema; `None`: pending.
    pub applied_at: Option<std::time::SystemTime>,
}

/// Every migration this build knows, with when it was applied to `schema` (`None`:
/// pending); then any the schema records that this build does not know (a newer build
/// applied them). An empty list of applied ones when the schema does not exist yet.
pub async fn migration_status(
    client: &tokio_postgres::Client,
    schema: &Schema,
) -> Result<Vec<MigrationStatus>> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1::text || '.schema_migrations') IS NOT NULL",
            &[&schema.name()],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(Error::db("looking for schema_migrations"))?;
    let mut applied: Vec<(i32, String, std::time::SystemTime)> = Vec::new();
    if exists {
        let rows = client
            .query(
                &format!(
                    "SELECT version, name, applied_at FROM {}.schema_migrations ORDER BY version",
                    schema.name()
                ),
                &[],
            )
            .await
            .map_err(Error::db("reading schema_migrations"))?;
        for row in rows {
            applied.push((
                row.try_get(0)
                    .map_err(Error::db("reading schema_migrations"))?,
                row.try_get(1)
                    .map_err(Error::db("reading schema_migrations"))?,
                row.try_get(2)
                    .map_err(Error::db("reading schema_migrations"))?,
            ));
        }
    }
    let mut status: Vec<MigrationStatus> = MIGRATIONS
        .iter()
        .map(|m| MigrationStatus {
            version: m.version,
            name: m.name.to_owned(),
            applied_at: applied
                .iter()
                .find(|(v, _, _)| *v == m.version)
                .map(|(_, _, at)| *at),
        })
        .collect();
    for (version, name, at) in applied {
        if !MIGRATIONS.iter().any(|m| m.version == version) {
            status.push(MigrationStatus {
                version,
                name,
                applied_at: Some(at),
            });
        }
    }
    Ok(status)
}

/// Applies the pending migrations to the schema `outbox`. Idempotent.
pub async fn migrate(client: &tokio_postgres::Client) -> Result<()> {
    migrate_schema(client, &Schema::default()).await
}

/// Applies the pending migrations to `schema`. Idempotent; concurrent callers serialize on
/// an advisory lock and the later ones find nothing to do.
pub async fn migrate_schema(client: &tokio_postgres::Client, schema: &Schema) -> Result<()> {
    // A plain client cannot open a transaction through `&self`, so drive it with SQL; the
    // advisory lock is transaction-scoped and released by COMMIT or ROLLBACK.
    client
        .batch_execute("BEGIN")
        .await
        .map_err(Error::db("starting the migration transaction"))?;
    let outcome = apply_pending(client, schema).await;
    let end = if outcome.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    let ended = client
        .batch_execute(end)
        .await
        .map_err(Error::db("ending the migration transaction"));
    outcome.and(ended)
}

/// The columns of the outbox's own `schema_migrations` table, as `name type`.
const MIGRATION_COLUMNS: [&str; 3] = [
    "version integer",
    "name text",
    "applied_at timestamp with time zone",
];

/// What the schema holds before a migration: whether it exists, the relations in it, and the
/// columns of a `schema_migrations` table if there is one.
const INSPECT_SCHEMA: &str = "SELECT n.oid IS NOT NULL,
        coalesce((SELECT array_agg(c.relname::text ORDER BY c.relname) FROM pg_class c
                   WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p', 'v', 'm', 'f')), '{}'),
        coalesce((SELECT array_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                                   ORDER BY a.attnum)
                    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                   WHERE c.relnamespace = n.oid AND c.relname = 'schema_migrations'
                     AND a.attnum > 0 AND NOT a.attisdropped), '{}')
   FROM (SELECT $1::text AS name) q LEFT JOIN pg_namespace n ON n.nspname = q.name";

/// Refuses a schema that belongs to someone else: one whose `schema_migrations` table is
/// another tool's, or one that already holds tables but no `schema_migrations` at all. The
/// outbox needs a schema of its own (an existing empty one is fine).
async fn check_ownership(client: &tokio_postgres::Client, schema: &Schema) -> Result<()> {
    let row = client
        .query_one(INSPECT_SCHEMA, &[&schema.name()])
        .await
        .map_err(Error::db("inspecting the schema"))?;
    let read = |e| Error::db("inspecting the schema")(e);
    let exists: bool = row.try_get(0).map_err(read)?;
    let relations: Vec<String> = row.try_get(1).map_err(Error::db("inspecting the schema"))?;
    let migration_columns: Vec<String> =
        row.try_get(2).map_err(Error::db("inspecting the schema"))?;
    if !exists {
        return Ok(());
    }
    let conflict = |problem: String| {
        Err(Error::SchemaConflict {
            schema: schema.name().to_owned(),
            problem,
        })
    };
    if !migration_columns.is_empty() {
        if migration_columns != MIGRATION_COLUMNS {
            return conflict(format!(
                "its schema_migrations table is not the outbox's (columns: {}): another migration tool uses this schema",
                migration_columns.join(", ")
            ));
        }
        return Ok(());
    }
    if !relations.is_empty() {
        let mut shown: Vec<&str> = relations.iter().map(String::as_str).take(5).collect();
        if relations.len() > 5 {
            shown.push("...");
        }
        return conflict(format!(
            "it already holds {} table(s) or view(s) of something else ({})",
            relations.len(),
            shown.join(", ")
        ));
    }
    Ok(())
}

async fn apply_pending(client: &tokio_postgres::Client, schema: &Schema) -> Result<()> {
    let name = schema.name();
    // IF NOT EXISTS notices are expected on every run after the first; keep them quiet.
    client
        .batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(Error::db("setting up the migration transaction"))?;
    client
        .execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('outbox migrate ' || $1::text, 0))",
            &[&name],
        )
        .await
        .map_err(Error::db("taking the migration lock"))?;
    check_ownership(client, schema).await?;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {name};
             CREATE TABLE IF NOT EXISTS {name}.schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await
        .map_err(Error::db("creating the schema"))?;
    let applied: Vec<(i32, String)> = client
        .query(
            &format!("SELECT version, name FROM {name}.schema_migrations"),
            &[],
        )
        .await
        .map_err(Error::db("reading applied migrations"))?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<std::result::Result<_, tokio_postgres::Error>>()
        .map_err(Error::db("reading applied migrations"))?;
    // A version recorded under another name is not this migration (a build from an
    // unreleased branch applied its own): applying the rest on top would leave the schema
    // missing what this build's migration of that number creates.
    for (version, applied_name) in &applied {
        if let Some(m) = MIGRATIONS
            .iter()
            .find(|m| m.version == *version && m.name != applied_name)
        {
            return Err(Error::SchemaConflict {
                schema: name.to_owned(),
                problem: format!(
                    "its version {version} was applied as {applied_name:?}, but this build's migration {version} is {:?}; restore the schema from a release's migrations or recreate it",
                    m.name
                ),
            });
        }
    }
    let applied: Vec<i32> = applied.into_iter().map(|(v, _)| v).collect();
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        tracing::info!(schema = name, migration = m.name, "applying migration");
        client
            .batch_execute(&m.sql.replace("@schema@", name))
            .await
            .map_err(Error::db("applying a migration"))?;
        client
            .execute(
                &format!("INSERT INTO {name}.schema_migrations (version, name) VALUES ($1, $2)"),
                &[&m.version, &m.name],
            )
            .await
            .map_err(Error::db("recording a migration"))?;
    }
    Ok(())
}

/// Checks that `schema` exists and is at [`SCHEMA_VERSION`]; otherwise returns
/// [`Error::SchemaNotReady`] naming what is missing and the command that fixes it.
pub async fn check_schema(client: &tokio_postgres::Client, schema: &Schema) -> Result<()> {
    let name = schema.name();
    let row = client
        .query_one(
            "SELECT to_regclass($1::text || '.schema_migrations') IS NOT NULL",
            &[&name],
        )
        .await
        .map_err(Error::db("checking the outbox schema"))?;
    if !row
        .try_get::<_, bool>(0)
        .map_err(Error::db("checking the outbox schema"))?
    {
        return Err(Error::SchemaNotReady {
            schema: name.to_owned(),
            problem: "missing (no schema_migrations table)".to_owned(),
        });
    }
    check_ownership(client, schema).await?;
    let version: Option<i32> = client
        .query_one(
            &format!("SELECT max(version) FROM {name}.schema_migrations"),
            &[],
        )
        .await
        .map_err(Error::db("reading the schema version"))?
        .try_get(0)
        .map_err(Error::db("reading the schema version"))?;
    match version {
        Some(v) if v >= SCHEMA_VERSION => Ok(()),
        found => Err(Error::SchemaNotReady {
            schema: name.to_owned(),
            problem: format!(
                "at version {} but this library needs {SCHEMA_VERSION}",
                found.unwrap_or(0)
            ),
        }),
    }
}
