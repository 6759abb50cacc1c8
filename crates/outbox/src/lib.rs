//! # outbox
//!
//! The transactional outbox for PostgreSQL, as a library your service embeds. A message is
//! written into the outbox table **inside your own transaction**, so your business change
//! and the message commit or roll back together; the `outboxd` relay then publishes the
//! committed messages to Apache Kafka, in commit order for each entity key.
//!
//! This crate depends on neither Kafka nor the relay: a service that only writes messages
//! never builds librdkafka.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let (mut client, conn) =
//!     tokio_postgres::connect("postgres://outbox@127.0.0.1:55432/outbox_demo", tokio_postgres::NoTls).await?;
//! tokio::spawn(conn);
//! outbox::migrate(&client).await?; // or `outboxd migrate`
//!
//! let tx = client.transaction().await?;
//! tx.execute("UPDATE orders SET status = 'paid' WHERE id = $1", &[&42i64]).await?;
//! let msg = outbox::Message::builder("orders", "order-42")
//!     .payload(br#"{"status":"paid"}"#.to_vec())
//!     .event_type("OrderPaid")
//!     .build()?;
//! outbox::save_in_tx(&tx, &msg).await?;
//! tx.commit().await?; // the message exists if and only if this commit succeeds
//! # Ok(()) }
//! ```

mod error;
mod message;
mod migrate;
mod save;
mod schema;
#[cfg(feature = "trace-context")]
mod trace;

pub use error::{Error, Result, describe_pg_error};
pub use message::{
    MAX_ENTITY_KEY_BYTES, MAX_HEADERS, MAX_KAFKA_PARTITION, MAX_TOPIC_LEN, Message, MessageBuilder,
    validate_topic,
};
pub use migrate::{
    MigrationStatus, SCHEMA_VERSION, check_schema, migrate, migrate_schema, migration_status,
};
pub use save::{DEFAULT_MAX_RECORD_BYTES, Outbox, PreparedOutbox, save_all_in_tx, save_in_tx};
pub use schema::Schema;
