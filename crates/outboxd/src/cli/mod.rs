//! The operator commands of the `outboxd` binary, one file per command group (the relay and
//! the small commands stay in `main.rs`).

pub mod dead_letters;
pub mod output;
pub mod partitions;
