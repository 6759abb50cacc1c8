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
    /// An explicit Kafka partition is negative.
    #[error("outbox: Kafka partition must be >= 0, got {0}")]
    InvalidKafkaPartition(i32),
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
        "outbox: invalid schema name {0:?}: use 1 to 63 characters of [a-z0-9_], not starting with a digit"
    )]
    InvalidSchemaName(String),
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
    #[error("outbox: {context}: {source}")]
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
