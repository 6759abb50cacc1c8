//! The relay's configuration: one struct, read from a TOML file, overridden by environment
//! variables and command-line flags (see `docs/configuration.md`), and checked by
//! `validate()`, which reports every problem at once.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::secrets::Secret;

/// Everything `outboxd run` needs. Field defaults are given on each field. `Debug` shows it
/// masked (see [`Config::masked`]).
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// PostgreSQL connection string (URL or key=value form). Required. Better without the
    /// password: see `database_password_file`.
    pub database_url: String,
    /// A file holding the database password (one trailing newline is ignored); it overrides
    /// a password in `database_url`. Default: none.
    pub database_password_file: String,
    /// The database password, from the environment (`OUTBOXD_DATABASE_PASSWORD`), never from
    /// a file of settings or a flag; `database_password_file` wins when both are set.
    #[serde(
        skip_deserializing,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::secrets::serialize_redacted"
    )]
    pub database_password: Option<Secret>,
    /// A file holding Kafka's `sasl.password`. Default: none.
    pub kafka_sasl_password_file: String,
    /// Kafka's `sasl.password` from the environment (`OUTBOXD_KAFKA_SASL_PASSWORD`);
    /// `kafka_sasl_password_file` wins when both are set.
    #[serde(
        skip_deserializing,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::secrets::serialize_redacted"
    )]
    pub kafka_sasl_password: Option<Secret>,
    /// Kafka bootstrap servers, comma-separated `host:port`. Required.
    pub brokers: String,
    /// Schema holding the outbox tables. Default: `outbox`.
    pub schema: String,
    /// Most messages read and published as one batch per partition. Default: 1000.
    pub batch_size: usize,
    /// How many batches of one partition may be on their way to Kafka at once: the next
    /// batch is read and sent while the earlier ones await their acknowledgements, which
    /// come back, and are retired, in order. 1 sends one batch at a time. Default: 4.
    pub batches_in_flight: usize,
    /// How long messages Kafka acknowledged may wait before they are deleted from the
    /// outbox table, in ms: a partition deletes what was acknowledged meanwhile in one
    /// statement (at once when a batch's worth is waiting). Publishing does not wait for
    /// it; after a crash, what was acknowledged but not yet deleted is published again (at
    /// least once). 0 deletes each batch as soon as it is acknowledged. Default: 100.
    pub retire_interval_ms: u64,
    /// Longest wait before an idle partition is read again even without a wake-up, in ms
    /// (the safety net should the wake-up poller fail). Default: 250.
    pub poll_interval_ms: u64,
    /// How often one query asks which partitions have newly committed messages and wakes
    /// their workers, in ms. Default: 5.
    pub wakeup_interval_ms: u64,
    /// First delay before retrying a failed batch or reconnecting, in ms; it doubles, with
    /// jitter, up to `retry_max_ms`. Default: 100.
    pub retry_initial_ms: u64,
    /// Longest delay between retries, in ms. Default: 10000.
    pub retry_max_ms: u64,
    /// How long, after SIGTERM/SIGINT, in-flight batches may take to finish, in ms.
    /// Default: 10000.
    pub shutdown_timeout_ms: u64,
    /// How many PostgreSQL sessions the partition workers share, whatever the number of
    /// partitions this instance owns (the relay opens three more: wake-up poller, lease task,
    /// mapping cleanup). Default: 8.
    pub pool_size: usize,
    /// How long a partition lease lasts without renewal, in ms: a paused or unreachable
    /// instance's partitions are taken over after about this long (a killed one's at once).
    /// Leases are renewed every third of it. Default: 10000.
    pub lease_ttl_ms: u64,
    /// How often idle sticky mappings are forgotten, in ms; 0 turns the cleanup off.
    /// Default: 60000.
    pub mapping_cleanup_interval_ms: u64,
    /// Age after which the mapping of an entity with no message waiting is forgotten (its
    /// next message maps it again under the current count), in seconds. Mappings above the
    /// partition count are forgotten as soon as nothing waits. Default: 86400.
    pub mapping_ttl_s: u64,
    /// Address for the HTTP endpoints `/metrics` (Prometheus) and `/health`, e.g.
    /// `127.0.0.1:9464`; empty disables them. Default: empty.
    pub http_listen: String,
    /// What to do with a message Kafka refuses for good (too large, unknown topic, not
    /// authorized), unless its topic says otherwise in `topics`. Default: `block`.
    pub on_error: ErrorPolicy,
    /// Per-topic settings, e.g. `[topics.orders] on_error = "dead_letter"`. Default: empty.
    pub topics: BTreeMap<String, TopicConfig>,
    /// librdkafka producer properties passed through as given (e.g. `linger.ms`,
    /// `security.protocol`). Ones that would break ordering are refused. Default: empty.
    pub kafka: BTreeMap<String, String>,
}

/// Never prints a password: the connection string and the secret `[kafka]` properties are
/// masked, and the secrets from the environment print as `[REDACTED]`.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.masked();
        f.debug_struct("Config")
            .field("database_url", &m.database_url)
            .field("database_password_file", &m.database_password_file)
            .field("database_password", &m.database_password)
            .field("kafka_sasl_password_file", &m.kafka_sasl_password_file)
            .field("kafka_sasl_password", &m.kafka_sasl_password)
            .field("brokers", &m.brokers)
            .field("schema", &m.schema)
            .field("batch_size", &m.batch_size)
            .field("batches_in_flight", &m.batches_in_flight)
            .field("retire_interval_ms", &m.retire_interval_ms)
            .field("poll_interval_ms", &m.poll_interval_ms)
            .field("wakeup_interval_ms", &m.wakeup_interval_ms)
            .field("retry_initial_ms", &m.retry_initial_ms)
            .field("retry_max_ms", &m.retry_max_ms)
            .field("shutdown_timeout_ms", &m.shutdown_timeout_ms)
            .field("pool_size", &m.pool_size)
            .field("lease_ttl_ms", &m.lease_ttl_ms)
            .field(
                "mapping_cleanup_interval_ms",
                &m.mapping_cleanup_interval_ms,
            )
            .field("mapping_ttl_s", &m.mapping_ttl_s)
            .field("http_listen", &m.http_listen)
            .field("on_error", &m.on_error)
            .field("topics", &m.topics)
            .field("kafka", &m.kafka)
            .finish()
    }
}

/// Settings of one topic.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// The policy for messages of this topic that Kafka refuses for good.
    pub on_error: ErrorPolicy,
}

/// What the relay does with a message that Kafka refused with a non-retriable error.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ErrorPolicy {
    /// Stop the partition (health and metrics show it blocked) and retry with the longest
    /// backoff until an operator fixes the cause or moves the message aside
    /// (`outboxd skip ID`). Keeps order: nothing behind the message overtakes it.
    #[default]
    Block,
    /// Move the message with its error to the `dead_letter` table and go on. The entity's
    /// later messages are published without it.
    DeadLetter,
    /// Move the message to `dead_letter` and hold back the entity's later messages until
    /// `outboxd unpark ENTITY`; the partition's other entities go on.
    ParkEntity,
}

impl std::fmt::Display for ErrorPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorPolicy::Block => "block",
            ErrorPolicy::DeadLetter => "dead_letter",
            ErrorPolicy::ParkEntity => "park_entity",
        })
    }
}

impl std::str::FromStr for ErrorPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "block" => Ok(ErrorPolicy::Block),
            "dead_letter" => Ok(ErrorPolicy::DeadLetter),
            "park_entity" => Ok(ErrorPolicy::ParkEntity),
            other => Err(format!(
                "unknown policy {other:?}: use block, dead_letter or park_entity"
            )),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: String::new(),
            database_password_file: String::new(),
            database_password: None,
            kafka_sasl_password_file: String::new(),
            kafka_sasl_password: None,
            brokers: String::new(),
            schema: "outbox".to_owned(),
            batch_size: 1000,
            batches_in_flight: 4,
            retire_interval_ms: 100,
            poll_interval_ms: 250,
            wakeup_interval_ms: 5,
            retry_initial_ms: 100,
            retry_max_ms: 10_000,
            shutdown_timeout_ms: 10_000,
            lease_ttl_ms: 10_000,
            pool_size: 8,
            mapping_cleanup_interval_ms: 60_000,
            mapping_ttl_s: 86_400,
            http_listen: String::new(),
            on_error: ErrorPolicy::Block,
            topics: BTreeMap::new(),
            kafka: BTreeMap::new(),
        }
    }
}

/// librdkafka properties the relay sets itself; a passthrough value would silently break
/// per-entity order or the at-least-once guarantee.
const RESERVED_KAFKA_KEYS: &[(&str, &str)] = &[
    ("bootstrap.servers", "use `brokers`"),
    (
        "enable.idempotence",
        "the relay needs the idempotent producer to keep order on retries",
    ),
    ("acks", "the idempotent producer needs acks=all"),
    (
        "max.in.flight.requests.per.connection",
        "more than 5 breaks idempotent ordering; the relay sets it",
    ),
    (
        "max.in.flight",
        "more than 5 breaks idempotent ordering; the relay sets it",
    ),
    (
        "retries",
        "the idempotent producer must retry until the broker answers",
    ),
    (
        "message.send.max.retries",
        "the idempotent producer must retry until the broker answers",
    ),
    (
        "message.timeout.ms",
        "a message that times out leaves a gap that the entity's next message can overtake; the relay never times messages out",
    ),
    (
        "delivery.timeout.ms",
        "an alias of message.timeout.ms: a message that times out leaves a gap that the entity's next message can overtake",
    ),
    ("enable.gapless.guarantee", "set by the relay"),
    ("transactional.id", "transactions are not used by the relay"),
    (
        "request.required.acks",
        "an alias of acks: the idempotent producer needs acks=all",
    ),
    (
        "metadata.broker.list",
        "an alias of bootstrap.servers: use `brokers`",
    ),
    (
        "allow.auto.create.topics",
        "the relay never lets the broker create topics (records produced while it did went missing); create topics before relaying to them",
    ),
];

/// Partitioners that put every message with one key in one Kafka partition. The relay keys
/// every message (by entity unless an explicit key is set), so the `_random` variants, which
/// only spread messages *without* a key, keep order too; `random` does not.
const KEYED_PARTITIONERS: &[&str] = &[
    "murmur2_random",
    "murmur2",
    "consistent",
    "consistent_random",
    "fnv1a",
    "fnv1a_random",
];

impl Config {
    /// Reads a TOML file. Unknown keys are refused.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Config::from_toml(&text).map_err(|message| Error::ConfigFile {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> std::result::Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks every field and returns all problems at once.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.database_url.trim().is_empty() {
            problems.push(
                "database_url is required (--database-url or OUTBOXD_DATABASE_URL)".to_owned(),
            );
        } else {
            // The TLS files are read here too: a missing CA file shows in check-config.
            match crate::connect::Database::new(&self.database_url, None) {
                Ok(_) => {}
                Err(Error::Config(found)) => problems.extend(found),
                Err(Error::Postgres { source, .. }) => problems.push(format!(
                    "database_url is not a valid connection string: {source}"
                )),
                Err(other) => problems.push(format!("database_url: {other}")),
            }
        }
        if self.brokers.trim().is_empty() {
            problems.push("brokers is required (--brokers or OUTBOXD_BROKERS)".to_owned());
        }
        if let Err(e) = outbox::Schema::new(self.schema.clone()) {
            problems.push(format!("schema: {e}"));
        }
        if !(1..=1_000).contains(&self.pool_size) {
            problems.push(format!(
                "pool_size must be 1..=1000, got {}",
                self.pool_size
            ));
        }
        if !(1..=64).contains(&self.batches_in_flight) {
            problems.push(format!(
                "batches_in_flight must be 1..=64, got {}",
                self.batches_in_flight
            ));
        }
        if self.retire_interval_ms > 60_000 {
            problems.push(format!(
                "retire_interval_ms must be 0..=60000, got {}",
                self.retire_interval_ms
            ));
        }
        if !(1..=100_000).contains(&self.batch_size) {
            problems.push(format!(
                "batch_size must be 1..=100000, got {}",
                self.batch_size
            ));
        }
        // The sane range of each duration, in its unit: below it the relay would spin, above
        // it it would look alive while doing nothing for hours.
        for (name, value, min, max) in [
            ("poll_interval_ms", self.poll_interval_ms, 1, 600_000),
            ("wakeup_interval_ms", self.wakeup_interval_ms, 1, 60_000),
            ("retry_initial_ms", self.retry_initial_ms, 1, 60_000),
            ("retry_max_ms", self.retry_max_ms, 1, 600_000),
            ("shutdown_timeout_ms", self.shutdown_timeout_ms, 0, 600_000),
            ("lease_ttl_ms", self.lease_ttl_ms, 1_000, 600_000),
            (
                "mapping_cleanup_interval_ms",
                self.mapping_cleanup_interval_ms,
                0,
                86_400_000,
            ),
            ("mapping_ttl_s", self.mapping_ttl_s, 0, 315_360_000),
        ] {
            if !(min..=max).contains(&value) {
                problems.push(format!("{name} must be {min}..={max}, got {value}"));
            }
        }
        if self.kafka.contains_key("sasl.password")
            && (!self.kafka_sasl_password_file.is_empty() || self.kafka_sasl_password.is_some())
        {
            problems.push(
                "kafka.\"sasl.password\" is set twice: in [kafka] and by kafka_sasl_password_file or OUTBOXD_KAFKA_SASL_PASSWORD; keep one (not the [kafka] one: a file of settings is no place for a secret)"
                    .to_owned(),
            );
        }
        if self.retry_initial_ms > self.retry_max_ms {
            problems.push(format!(
                "retry_initial_ms ({}) must not exceed retry_max_ms ({})",
                self.retry_initial_ms, self.retry_max_ms
            ));
        }
        if !self.http_listen.is_empty() && self.http_listen.parse::<std::net::SocketAddr>().is_err()
        {
            problems.push(format!(
                "http_listen must be host:port with an IP address, got {:?}",
                self.http_listen
            ));
        }
        for topic in self.topics.keys() {
            if let Err(e) = outbox::validate_topic(topic) {
                problems.push(format!("topics.{topic:?}: {e}"));
            }
        }
        for (key, why) in RESERVED_KAFKA_KEYS {
            if self.kafka.contains_key(*key) {
                problems.push(format!("kafka.\"{key}\" cannot be set: {why}"));
            }
        }
        if let Some(p) = self.kafka.get("partitioner")
            && !KEYED_PARTITIONERS.contains(&p.as_str())
        {
            problems.push(format!(
                "kafka.\"partitioner\" = {p:?} would spread one entity over several Kafka partitions; use one of {}",
                KEYED_PARTITIONERS.join(", ")
            ));
        }
        for key in self.kafka.keys() {
            if key.trim() != key || key.is_empty() || key.chars().any(char::is_uppercase) {
                problems.push(format!(
                    "kafka.{key:?} is not a librdkafka property name (they are lower-case, without spaces)"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(problems))
        }
    }

    /// The policy for non-retriable errors of messages to `topic`.
    pub fn policy_for(&self, topic: &str) -> ErrorPolicy {
        self.topics.get(topic).map_or(self.on_error, |t| t.on_error)
    }

    /// How to reach PostgreSQL: `database_url` (with its TLS options) and the password from
    /// `database_password_file` or the environment, when one is given.
    pub fn database(&self) -> Result<crate::connect::Database> {
        let file_secret;
        let password = if !self.database_password_file.is_empty() {
            file_secret =
                crate::secrets::read_file(&self.database_password_file, "database password")?;
            Some(&file_secret)
        } else {
            self.database_password.as_ref()
        };
        crate::connect::Database::new(&self.database_url, password)
    }

    /// Kafka's `sasl.password` from `kafka_sasl_password_file` or the environment, if given.
    pub fn kafka_sasl_password(&self) -> Result<Option<Secret>> {
        if !self.kafka_sasl_password_file.is_empty() {
            return crate::secrets::read_file(
                &self.kafka_sasl_password_file,
                "Kafka SASL password",
            )
            .map(Some);
        }
        Ok(self.kafka_sasl_password.clone())
    }

    /// A copy fit to show (`outboxd check-config`): passwords in `database_url` and secret
    /// `[kafka]` properties replaced by `***` (the secrets from the environment print as
    /// `[REDACTED]`).
    pub fn masked(&self) -> Config {
        let mut shown = self.clone();
        shown.database_url = crate::secrets::mask_connection_string(&shown.database_url);
        for key in crate::secrets::KAFKA_SECRET_KEYS {
            if let Some(v) = shown.kafka.get_mut(*key) {
                *v = "***".to_owned();
            }
        }
        shown
    }

    /// The validated schema name.
    pub fn schema(&self) -> Result<outbox::Schema> {
        Ok(outbox::Schema::new(self.schema.clone())?)
    }

    pub(crate) fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
    pub(crate) fn wakeup_interval(&self) -> Duration {
        Duration::from_millis(self.wakeup_interval_ms)
    }
    pub(crate) fn retry_initial(&self) -> Duration {
        Duration::from_millis(self.retry_initial_ms)
    }
    pub(crate) fn retire_interval(&self) -> Duration {
        Duration::from_millis(self.retire_interval_ms)
    }

    pub(crate) fn retry_max(&self) -> Duration {
        Duration::from_millis(self.retry_max_ms)
    }
    pub(crate) fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
    pub(crate) fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_password_comes_from_its_file_then_the_environment_then_the_url() {
        let mut config = Config {
            database_url: "postgres://relay:in-url@127.0.0.1/app".to_owned(),
            ..Config::default()
        };
        let password = |c: &Config| {
            c.database()
                .expect("database")
                .config()
                .get_password()
                .map(<[u8]>::to_vec)
        };
        assert_eq!(password(&config), Some(b"in-url".to_vec()));
        config.database_password = Some(Secret::new("from-env".to_owned()));
        assert_eq!(password(&config), Some(b"from-env".to_vec()));
        let file = std::env::temp_dir().join(format!("outboxd-pw-{}", std::process::id()));
        std::fs::write(&file, "from-file\n").expect("write");
        config.database_password_file = file.to_string_lossy().into_owned();
        assert_eq!(password(&config), Some(b"from-file".to_vec()));
        let _ = std::fs::remove_file(&file);
        assert!(
            !format!("{config:?}").contains("from-env"),
            "Debug redacts it"
        );
    }
}
