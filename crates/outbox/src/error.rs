//! The library's one error type: every way a write can be refused or fail, each variant
//! naming the offending value so the caller can tell what to fix without reading our code.

/// A specialized `Result` for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a message could not be built or saved, or the schema could not be migrated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The topic is the empty string.
    #[error("outbox: topic must not be empty")]
    EmptyTopic,
    /// The topic is a name Kafka would reject.
    #[error("outbox: invalid Kafka topic name {topic:?}: {reason}")]
    InvalidTopic {
        /// The topic as given.
        topic: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The entity key (the ordering key) is the empty string.
    #[error("outbox: entity key must not be empty (topic {topic:?})")]
    EmptyEntityKey {
        /// The message's topic, to find the call site.
        topic: String,
    },
    /// The entity key is longer than [`MAX_ENTITY_KEY_BYTES`](crate::MAX_ENTITY_KEY_BYTES):
    /// it is a primary key of the mapping table, whose index entries have a size limit.
    #[error("outbox: entity key is {size} bytes, longer than the maximum of {max} bytes")]
    EntityKeyTooLong {
        /// The key's size in bytes (UTF-8).
        size: usize,
        /// The maximum.
        max: usize,
    },
    /// An explicit Kafka partition is negative or above
    /// [`MAX_KAFKA_PARTITION`](crate::MAX_KAFKA_PARTITION).
    #[error("outbox: Kafka partition must be between 0 and {max}, got {0}", max = crate::MAX_KAFKA_PARTITION)]
    InvalidKafkaPartition(i32),
    /// A trace context that is not a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, ids not
    /// all zeros).
    #[error(
        "outbox: not a W3C traceparent ({0}); expected 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>"
    )]
    InvalidTraceparent(String),
    /// More headers than [`MAX_HEADERS`](crate::MAX_HEADERS).
    #[error("outbox: {count} headers, more than the maximum of {max}")]
    TooManyHeaders {
        /// Headers given.
        count: usize,
        /// The maximum.
        max: usize,
    },
    /// The message's Kafka record would be larger than the database's
    /// `settings.max_record_bytes` (see [`Message::record_bytes`](crate::Message::record_bytes)).
    #[error(
        "outbox: a record of {size} bytes exceeds the maximum of {max} bytes (entity {entity_key:?}); the record counts the Kafka key, payload, headers and the relay's headers"
    )]
    RecordTooLarge {
        /// The message's entity key.
        entity_key: String,
        /// The record's size in bytes.
        size: usize,
        /// `settings.max_record_bytes`.
        max: usize,
    },
    /// A header name is empty or not valid UTF-8-safe text.
    #[error("outbox: invalid header name {name:?}: {reason}")]
    InvalidHeaderName {
        /// The header name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The payload is larger than the configured maximum.
    #[error(
        "outbox: payload of {size} bytes exceeds the maximum of {max} bytes (entity {entity_key:?})"
    )]
    PayloadTooLarge {
        /// The message's entity key.
        entity_key: String,
        /// The payload's size in bytes.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The headers together are larger than the configured maximum.
    #[error(
        "outbox: headers of {size} bytes exceed the maximum of {max} bytes (entity {entity_key:?})"
    )]
    HeadersTooLarge {
        /// The message's entity key.
        entity_key: String,
        /// Names plus values, in bytes.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The payload could not be encoded as JSON.
    #[cfg(feature = "json")]
    #[error("outbox: payload could not be encoded as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The schema name is not a plain lower-case SQL identifier.
    #[error(
        "outbox: invalid schema name {0:?}: use 1 to 63 characters of [a-z0-9_], not starting with a digit, and not a system schema (pg_*, information_schema)"
    )]
    InvalidSchemaName(String),
    /// The schema belongs to something else: another tool's `schema_migrations` table, or
    /// tables that are not the outbox's. Nothing was created in it.
    #[error(
        "outbox: schema {schema:?} cannot hold the outbox: {problem}; use a schema of its own (--schema / OUTBOXD_SCHEMA)"
    )]
    SchemaConflict {
        /// The schema.
        schema: String,
        /// What is in the way.
        problem: String,
    },
    /// The outbox schema is missing or older than this library.
    #[error(
        "outbox: schema {schema:?} is {problem}; run `outboxd migrate` (or `outbox::migrate`) first"
    )]
    SchemaNotReady {
        /// The schema that was looked for.
        schema: String,
        /// What was found: missing, or at which version.
        problem: String,
    },
    /// The batch function answered with fewer ids than messages. The transaction must be
    /// rolled back: part of the batch may be missing from it.
    #[error(
        "outbox: enqueue_batch returned {ids} ids for {messages} messages; roll the transaction back (is the schema migrated with this library's version?)"
    )]
    IncompleteBatch {
        /// Messages given.
        messages: usize,
        /// Ids returned.
        ids: usize,
    },
    /// PostgreSQL refused the write or the connection failed; `context` says what we were doing.
    /// The message carries the server's message, detail, hint and SQLSTATE.
    #[error("outbox: {context}: {}", describe_pg_error(source))]
    Database {
        /// What the library was doing.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl Error {
    /// The SQLSTATE code when PostgreSQL itself refused the statement.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            Error::Database { source, .. } => source.code(),
            _ => None,
        }
    }

    /// True when the caller's input was refused (nothing was written); retrying the same
    /// message cannot succeed.
    pub fn is_invalid_input(&self) -> bool {
        match self {
            Error::Database { source, .. } => {
                source.code() == Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE)
            }
            Error::SchemaNotReady { .. }
            | Error::SchemaConflict { .. }
            | Error::InvalidSchemaName(_)
            | Error::IncompleteBatch { .. } => false,
            _ => true,
        }
    }

    /// True when retrying the whole transaction may succeed: a serialization failure or a
    /// deadlock between writers of the same entities.
    pub fn is_retryable(&self) -> bool {
        use tokio_postgres::error::SqlState;
        matches!(
            self.code(),
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
        )
    }

    pub(crate) fn db(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
        move |source| Error::Database { context, source }
    }
}

/// A PostgreSQL error as an operator can act on it: the server's message with its detail,
/// hint and SQLSTATE when the server refused something (`tokio_postgres::Error` displays only
/// "db error" then), else the driver's error with its cause (a refused connection, ...).
pub fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            text.push_str(&format!("; detail: {detail}"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(&format!(": {s_text}"));
        }
        source = s.source();
    }
    text
}
