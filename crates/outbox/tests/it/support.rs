//! Per-test setup: a connection and a freshly migrated schema of the test's own.

use outbox::{Outbox, Schema};
use tokio_postgres::Client;

/// A migrated schema that only this test uses; dropped by `cleanup`.
pub struct TestSchema {
    pub client: Client,
    pub schema: Schema,
    pub outbox: Outbox,
}

impl TestSchema {
    pub async fn new() -> TestSchema {
        let client = outbox_testkit::connect().await;
        let schema = Schema::new(outbox_testkit::unique_name("t")).expect("valid schema name");
        outbox::migrate_schema(&client, &schema)
            .await
            .expect("migrate");
        TestSchema {
            client,
            outbox: Outbox::new(schema.clone()),
            schema,
        }
    }

    /// A second, independent connection (another session).
    pub async fn other_connection(&self) -> Client {
        outbox_testkit::connect().await
    }

    pub async fn count(&self, table: &str) -> i64 {
        self.client
            .query_one(
                &format!("SELECT count(*) FROM {}.{table}", self.schema),
                &[],
            )
            .await
            .expect("count")
            .get(0)
    }

    pub async fn cleanup(self) {
        outbox_testkit::drop_schema(&self.client, self.schema.name()).await;
    }
}
