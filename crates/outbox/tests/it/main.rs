//! Integration tests of the `outbox` library against the real PostgreSQL started by
//! `scripts/services up`. Each test works in a schema of its own, so they run in parallel.

mod bad_input;
mod races;
mod save;
mod semantics;
mod services;
mod support;
mod tour;
