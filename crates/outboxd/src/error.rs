//! The relay's error type. Each variant carries what the relay was doing, so a log line
//! says which step failed and where, never a bare "failed".

/// A specialized `Result` for the relay.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the relay could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was refused; every problem found is listed.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Config(Vec<String>),
    /// The configuration file could not be read or parsed.
    #[error("configuration file {path}: {message}")]
    ConfigFile {
        /// The file.
        path: String,
        /// What went wrong, with the line when TOML parsing failed.
        message: String,
    },
    /// A PostgreSQL operation failed. The message carries the server's message, detail, hint
    /// and SQLSTATE.
    #[error("postgres: {context}: {}", outbox::describe_pg_error(source))]
    Postgres {
        /// What the relay was doing.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A Kafka client operation failed.
    #[error("kafka: {context}: {source}")]
    Kafka {
        /// What the relay was doing.
        context: &'static str,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The database incarnation token could not be read (it kept being created concurrently).
    #[error(
        "postgres: the relay_incarnation token could not be read; is the schema migrated (outboxd migrate)?"
    )]
    Incarnation,
    /// A retirement statement (run for several workers at once, see `pipeline::retire`)
    /// failed, or the worker that ran it stopped before answering.
    #[error("retiring published messages failed: {0}")]
    Retirement(String),
    /// The worker session pool was closed (the relay is shutting down).
    #[error("the relay's session pool is closed")]
    PoolClosed,
    /// The database is in a state that would break the relay's guarantees; every problem
    /// found is listed with its fix.
    #[error("the relay refuses to start:\n  - {}", .0.join("\n  - "))]
    UnsafeDatabase(Vec<String>),
    /// The settings row of the outbox schema is missing (someone deleted it).
    #[error(
        "the outbox settings row is missing (DELETE FROM outbox.settings?); restore it with \
         INSERT INTO <schema>.settings DEFAULT VALUES, then set partition_count"
    )]
    SettingsMissing,
    /// An operator command found nothing to act on.
    #[error("not found: {0}")]
    NotFound(String),
    /// An operator command was refused, with the reason (e.g. a retry that would break an
    /// entity's order).
    #[error("refused: {0}")]
    Refused(String),
    /// A socket or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the relay was doing.
        context: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The outbox library refused (schema missing or outdated, ...).
    #[error(transparent)]
    Outbox(#[from] outbox::Error),
}

impl Error {
    /// True when PostgreSQL could not be reached or the connection broke (refused, reset,
    /// timed out, the server shutting down or still starting up): waiting and retrying may
    /// help, unlike for a refusal of what was asked.
    pub fn is_connection_failure(&self) -> bool {
        let source = match self {
            Error::Postgres { source, .. } => source,
            Error::Outbox(outbox::Error::Database { source, .. }) => source,
            _ => return false,
        };
        if let Some(db) = source.as_db_error() {
            let code = db.code().code();
            return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03");
        }
        source.is_closed()
            || std::error::Error::source(source).is_some_and(|s| s.is::<std::io::Error>())
    }

    pub(crate) fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
        move |source| Error::Postgres { context, source }
    }

    pub(crate) fn kafka(context: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
        move |source| Error::Kafka { context, source }
    }
}
