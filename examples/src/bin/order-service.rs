//! An example service: an order shop that changes its own `orders` table and writes an
//! event for each change with `outbox::save_in_tx`, in the same deadpool-postgres
//! transaction. Several orders are worked on concurrently, so events of different orders
//! interleave, while each order's own events keep their order.
//!
//!     order-service --database-url postgres://outbox@127.0.0.1:55432/outbox_demo --orders 20

use std::time::Duration;

use clap::Parser;
use deadpool_postgres::{Manager, Pool};
use outbox::Message;
use rand::Rng;
use tokio_postgres::NoTls;

/// Writes orders and their events through the transactional outbox.
#[derive(Debug, Parser)]
struct Args {
    /// PostgreSQL connection string.
    #[arg(long, env = "OUTBOX_DATABASE_URL")]
    database_url: String,
    /// Kafka topic for the order events.
    #[arg(long, default_value = "orders")]
    topic: String,
    /// How many orders to create.
    #[arg(long, default_value_t = 20)]
    orders: usize,
    /// Prefix of this run's order ids (default: random), so runs don't mix.
    #[arg(long)]
    run: Option<String>,
    /// Concurrent workers.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The life of an order; each step is one transaction and one event.
const STEPS: [&str; 4] = ["OrderCreated", "OrderPaid", "OrderPacked", "OrderShipped"];

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let pg: tokio_postgres::Config = args.database_url.parse()?;
    let pool = Pool::builder(Manager::new(pg, NoTls))
        .max_size(args.concurrency)
        .build()?;
    {
        let client = pool.get().await?;
        outbox::migrate(&client).await?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, status text NOT NULL, updated_at timestamptz NOT NULL)",
            )
            .await?;
    }
    let run = args
        .run
        .clone()
        .unwrap_or_else(|| format!("{:04x}", rand::rng().random::<u16>()));
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency {
        let (pool, topic, run) = (pool.clone(), args.topic.clone(), run.clone());
        let orders: Vec<String> = (0..args.orders)
            .filter(|i| i % args.concurrency == worker)
            .map(|i| format!("order-{run}-{i:03}"))
            .collect();
        tasks.push(tokio::spawn(async move {
            work_orders(pool, topic, orders).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!(
        "order-service: wrote {} events for {} orders",
        args.orders * STEPS.len(),
        args.orders
    );
    Ok(())
}

/// Moves each order one step at a time, round-robin, so orders interleave.
async fn work_orders(pool: Pool, topic: String, orders: Vec<String>) -> Result<(), BoxError> {
    for (step, event) in STEPS.iter().enumerate() {
        for order in &orders {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            tx.execute(
                "INSERT INTO orders (id, status, updated_at) VALUES ($1, $2, now())
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, updated_at = now()",
                &[order, event],
            )
            .await?;
            let msg = Message::builder(topic.as_str(), order.as_str())
                .payload(format!(
                    r#"{{"order":"{order}","step":{},"event":"{event}"}}"#,
                    step + 1
                ))
                .event_type(*event)
                .build()?;
            outbox::save_in_tx(&tx, &msg).await?;
            tx.commit().await?;
            let jitter = rand::rng().random_range(0..3);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
        }
    }
    Ok(())
}
