//! Where the relay's settings come from, in increasing precedence, merged by `figment`: the
//! defaults ([`Config::default`], the one place each default is written), the TOML file
//! (`--config`), the environment (`OUTBOXD_<KEY>`, plus `OUTBOXD_KAFKA__<PROPERTY>` and
//! `OUTBOXD_TOPICS__<TOPIC>__ON_ERROR`), then the command line's flags. Unknown keys are
//! refused by name, wherever they come from. `--help` shows each flag's variable and default
//! from the same sources ([`annotate`]).
//!
//! The passwords themselves never come from here: only from their files or their own
//! variables (`OUTBOXD_DATABASE_PASSWORD`, `OUTBOXD_KAFKA_SASL_PASSWORD`; see `secrets`).

use std::collections::BTreeMap;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;

use crate::config::{Config, ErrorPolicy};
use crate::error::{Error, Result};
use crate::secrets::Secret;

/// The prefix of every variable.
pub const ENV_PREFIX: &str = "OUTBOXD_";

/// Variables with the prefix that are not settings of the file: the file's path, the log
/// format (read before the file), and the passwords (read on their own).
const NOT_SETTINGS: &[&str] = &[
    "config",
    "log_format",
    "database_password",
    "kafka_sasl_password",
];

/// The settings the command line can give: each flag overrides the file and the environment
/// when given, and is absent otherwise.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct SettingFlags {
    /// PostgreSQL connection string (URL or key=value form, with libpq's TLS options), e.g.
    /// postgres://user@127.0.0.1:5432/db?sslmode=verify-full&sslrootcert=ca.pem.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// A file holding the database password (the password itself can come from the
    /// environment, OUTBOXD_DATABASE_PASSWORD, never from a flag).
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_password_file: Option<String>,
    /// A file holding Kafka's sasl.password (or the variable OUTBOXD_KAFKA_SASL_PASSWORD).
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_sasl_password_file: Option<String>,
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// Schema holding the outbox tables.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Most messages per batch and partition.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Batches of one partition on their way to Kafka at once.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batches_in_flight: Option<usize>,
    /// Longest wait before acknowledged messages are deleted, in ms.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retire_interval_ms: Option<u64>,
    /// Longest wait before an idle partition is read again without a wake-up, in ms.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_interval_ms: Option<u64>,
    /// How often one query looks for newly committed messages, in ms.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wakeup_interval_ms: Option<u64>,
    /// First retry delay, in ms; doubles with jitter.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_initial_ms: Option<u64>,
    /// Longest retry delay, in ms.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_max_ms: Option<u64>,
    /// Time in-flight batches get after SIGTERM/SIGINT, in ms.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_ms: Option<u64>,
    /// PostgreSQL sessions the partition workers share.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<usize>,
    /// How long a partition lease lasts without renewal, in ms.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl_ms: Option<u64>,
    /// How often idle sticky mappings are forgotten, in ms; 0 = never.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping_cleanup_interval_ms: Option<u64>,
    /// Age after which an idle entity's mapping is forgotten, in s.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping_ttl_s: Option<u64>,
    /// Address for /healthz, /readyz, /health and /metrics, e.g. 127.0.0.1:9464 (empty: off).
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<String>,
    /// Policy for messages Kafka refuses for good: block, dead_letter, park_entity. Per topic:
    /// [topics.NAME] on_error, or OUTBOXD_TOPICS__<NAME>__ON_ERROR.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_error: Option<ErrorPolicy>,
    /// A librdkafka producer property, KEY=VALUE; repeat for several (also
    /// OUTBOXD_KAFKA__<PROPERTY>, dots written as _, e.g. OUTBOXD_KAFKA__LINGER_MS=5).
    #[arg(long = "kafka", value_name = "KEY=VALUE", global = true, value_parser = parse_property)]
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "as_map")]
    pub kafka: Vec<(String, String)>,
}

fn parse_property(text: &str) -> std::result::Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

fn as_map<S: serde::Serializer>(
    pairs: &[(String, String)],
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

/// Merges the layers into one configuration: defaults, `file`, the environment, `flags`.
/// The plain `OUTBOXD_<KEY>` settings are read by figment from the process's environment;
/// `vars` (the same variables, in the binary) gives the `[kafka]` and `[topics]` ones and the
/// passwords.
pub fn load(
    file: Option<&Path>,
    vars: &[(String, String)],
    flags: &SettingFlags,
) -> Result<Config> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = file {
        // figment skips a file that is missing; a file asked for must exist.
        if let Err(e) = std::fs::metadata(path) {
            return Err(Error::ConfigFile {
                path: path.display().to_string(),
                message: e.to_string(),
            });
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let (kafka, topics) = split_env(vars);
    figment = figment
        .merge(
            Env::prefixed(ENV_PREFIX)
                .ignore(NOT_SETTINGS)
                .filter(|key| !key.starts_with("kafka__") && !key.starts_with("topics__")),
        )
        .merge(Serialized::default("kafka", kafka))
        .merge(Serialized::default("topics", topics))
        .merge(Serialized::defaults(flags));
    let mut config: Config = figment
        .extract()
        .map_err(|e| Error::Config(e.into_iter().map(|e| e.to_string()).collect()))?;
    for (name, value) in vars {
        match name.as_str() {
            "OUTBOXD_DATABASE_PASSWORD" => {
                config.database_password = Some(Secret::new(value.clone()))
            }
            "OUTBOXD_KAFKA_SASL_PASSWORD" => {
                config.kafka_sasl_password = Some(Secret::new(value.clone()));
            }
            _ => {}
        }
    }
    Ok(config)
}

type TopicsLayer = BTreeMap<String, BTreeMap<String, String>>;

/// The `[kafka]` properties and `[topics.NAME]` settings among the prefixed variables (the
/// plain settings are figment's `Env`'s).
fn split_env(vars: &[(String, String)]) -> (BTreeMap<String, String>, TopicsLayer) {
    let mut kafka = BTreeMap::new();
    let mut topics: TopicsLayer = BTreeMap::new();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if let Some(property) = rest.strip_prefix("KAFKA__") {
            // librdkafka's property names are lower case with dots, no underscores.
            kafka.insert(property.to_lowercase().replace('_', "."), value.clone());
        } else if let Some(topic_setting) = rest.strip_prefix("TOPICS__") {
            let (topic, key) = topic_setting
                .rsplit_once("__")
                .unwrap_or((topic_setting, ""));
            topics
                .entry(topic.to_lowercase())
                .or_default()
                .insert(key.to_lowercase(), value.clone());
        }
    }
    (kafka, topics)
}

/// Adds to every setting flag of `command` its variable and its default (from
/// [`Config::default`]), so `--help`, the struct and the docs cannot disagree.
pub fn annotate(mut command: clap::Command) -> clap::Command {
    let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
    let ids: Vec<String> = command
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    for id in ids {
        let key = if id == "kafka" {
            "kafka".to_owned()
        } else {
            id.clone()
        };
        let Some(default) = defaults.get(&key) else {
            continue;
        };
        let variable = if key == "kafka" {
            format!("{ENV_PREFIX}KAFKA__<PROPERTY>")
        } else {
            format!("{ENV_PREFIX}{}", key.to_uppercase())
        };
        let shown = match default {
            serde_json::Value::String(s) if s.is_empty() => "none".to_owned(),
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(m) if m.is_empty() => "none".to_owned(),
            other => other.to_string(),
        };
        command = command.mut_arg(id.as_str(), |arg| {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            arg.help(format!("{help} [env: {variable}] [default: {shown}]"))
        });
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn kafka_properties_and_topic_policies_come_from_the_environment() {
        let (kafka, topics) = split_env(&vars(&[
            ("OUTBOXD_BATCH_SIZE", "10"),
            ("OUTBOXD_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
            ("OUTBOXD_TOPICS__AUDIT_LOG__ON_ERROR", "dead_letter"),
            ("OTHER", "x"),
        ]));
        assert_eq!(
            kafka.get("sasl.mechanism").map(String::as_str),
            Some("SCRAM-SHA-512")
        );
        assert_eq!(
            topics
                .get("audit_log")
                .and_then(|t| t.get("on_error"))
                .map(String::as_str),
            Some("dead_letter")
        );
    }
}
