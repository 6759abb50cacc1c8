//! Shared helpers for the benchmarks: a fresh migrated schema on the real PostgreSQL
//! started by `scripts/services up`, and a driver that runs a number of transactions spread
//! over concurrent connections and returns the wall time they took.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::{Outbox, Schema};
use tokio::sync::Mutex;
use tokio_postgres::Client;

/// A migrated schema of the benchmark's own, with `connections` open connections.
pub struct BenchDb {
    /// The schema the benchmark writes to.
    pub schema: Schema,
    /// The outbox handle for that schema.
    pub outbox: Outbox,
    /// One connection per concurrent writer.
    pub clients: Vec<Arc<Mutex<Client>>>,
    admin: Client,
}

impl BenchDb {
    /// Creates and migrates a fresh schema and opens `connections` connections.
    pub async fn new(prefix: &str, connections: usize) -> BenchDb {
        let admin = outbox_testkit::connect().await;
        let schema = Schema::new(outbox_testkit::unique_name(prefix)).expect("schema name");
        outbox::migrate_schema(&admin, &schema)
            .await
            .expect("migrate");
        let mut clients = Vec::new();
        for _ in 0..connections {
            clients.push(Arc::new(Mutex::new(outbox_testkit::connect().await)));
        }
        BenchDb {
            outbox: Outbox::new(schema.clone()),
            schema,
            clients,
            admin,
        }
    }

    /// Runs SQL on the admin connection.
    pub async fn execute(&self, sql: &str) {
        self.admin
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Drops the schema.
    pub async fn drop(self) {
        outbox_testkit::drop_schema(&self.admin, self.schema.name()).await;
    }

    /// Runs `total` units of work spread evenly over the connections, concurrently, and
    /// returns the wall time. `work(client, outbox)` performs one unit (one transaction).
    pub async fn run<F, Fut>(&self, total: u64, work: F) -> Duration
    where
        F: Fn(Arc<Mutex<Client>>, Outbox) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let n = self.clients.len() as u64;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (i, client) in self.clients.iter().enumerate() {
            let share = total / n + u64::from((i as u64) < total % n);
            let (client, outbox, work) = (client.clone(), self.outbox.clone(), work.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..share {
                    work(client.clone(), outbox.clone()).await;
                }
            }));
        }
        for t in tasks {
            t.await.expect("bench task");
        }
        start.elapsed()
    }
}
