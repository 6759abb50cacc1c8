//! Integration tests of the relay against the real PostgreSQL and Apache Kafka started by
//! `scripts/services up`. Each test has its own schema and its own topic.

mod auto_topic;
mod config;
mod crash;
mod dashboard;
mod dead_rows;
mod end_to_end;
mod guards;
mod http;
mod late_commit;
mod leases;
mod logging;
mod mappings;
mod metrics;
mod operator;
mod outages;
mod pipeline;
mod policies;
mod process;
mod proxy;
mod refusals;
mod roles;
mod scaling;
mod secrets;
mod status;
mod supervision;
mod support;
mod tls;
mod tour;
mod trace;
