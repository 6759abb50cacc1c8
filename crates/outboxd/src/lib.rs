//! # outboxd
//!
//! The relay of the transactional outbox: reads the messages that services committed with
//! [`outbox::save_in_tx`] and publishes them to Apache Kafka in ordered batches, one worker
//! per virtual partition, so that all messages of one entity arrive in commit order.
//!
//! The `outboxd` binary wraps [`relay::run`]; embed the relay in your own process the same
//! way:
//!
//! ```no_run
//! # async fn demo() -> Result<(), outboxd::Error> {
//! let config = outboxd::Config {
//!     database_url: "postgres://outbox@127.0.0.1:55432/outbox_demo".into(),
//!     brokers: "127.0.0.1:39092".into(),
//!     ..outboxd::Config::default()
//! };
//! outboxd::relay::run(config, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

mod backlog;
pub mod backoff;
pub mod config;
pub mod connect;
pub mod dead_letters;
mod error;
pub mod faults;
mod guards;
pub mod health;
pub mod http;
mod kafka_log;
mod kafka_watch;
pub mod layers;
pub mod logging;
pub mod mappings;
pub mod metrics;
pub mod ownership;
pub mod partitions;
pub mod periodic;
pub mod pipeline;
pub mod publisher;
pub mod relay;
pub mod secrets;
pub mod session;
mod sessions;
pub mod shutdown;
pub mod sql;
mod startup;
pub mod status;
pub mod supervisor;

pub use config::{Config, ErrorPolicy, TopicConfig};
pub use error::{Error, Result};
pub use relay::Relay;
