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
];

/// The schema version this library expects.
pub const SCHEMA_VERSION: i32 = 3;

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
    let applied: Vec<i32> = client
        .query(
            &format!("SELECT version FROM {name}.schema_migrations"),
            &[],
        )
        .await
        .map_err(Error::db("reading applied migrations"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
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
    if !row.get::<_, bool>(0) {
        return Err(Error::SchemaNotReady {
            schema: name.to_owned(),
            problem: "missing (no schema_migrations table)".to_owned(),
        });
    }
    let version: Option<i32> = client
        .query_one(
            &format!("SELECT max(version) FROM {name}.schema_migrations"),
            &[],
        )
        .await
        .map_err(Error::db("reading the schema version"))?
        .get(0);
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
