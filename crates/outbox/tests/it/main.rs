//! Integration tests of the `outbox` library against the real PostgreSQL started by
//! `scripts/services up`. Each test works in a schema of its own, so they run in parallel.

mod save;
mod services;
mod support;
