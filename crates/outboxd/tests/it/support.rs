//! Per-test setup for relay tests: a migrated schema, a topic, and a relay running in the
//! background until the test stops it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::{Outbox, Schema};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

/// A migrated schema of this test's own with `partitions` virtual partitions.
pub struct Setup {
    pub client: Client,
    pub schema: Schema,
    pub outbox: Outbox,
}

impl Setup {
    pub async fn new(partitions: i32) -> Setup {
        let client = outbox_testkit::connect().await;
        let schema = Schema::new(outbox_testkit::unique_name("r")).expect("schema name");
        outbox::migrate_schema(&client, &schema)
            .await
            .expect("migrate");
        let setup = Setup {
            client,
            outbox: Outbox::new(schema.clone()),
            schema,
        };
        setup.set_partition_count(partitions).await;
        setup
    }

    /// Changes `settings.partition_count`, as an operator would.
    pub async fn set_partition_count(&self, partitions: i32) {
        self.client
            .execute(
                &format!("UPDATE {}.settings SET partition_count = $1", self.schema),
                &[&partitions],
            )
            .await
            .expect("set partition count");
    }

    pub fn relay_config(&self) -> outboxd::Config {
        outboxd::Config {
            database_url: outbox_testkit::database_url(),
            brokers: outbox_testkit::brokers(),
            schema: self.schema.name().to_owned(),
            ..outboxd::Config::default()
        }
    }

    pub async fn remaining(&self) -> i64 {
        self.client
            .query_one(
                &format!("SELECT count(*) FROM {}.message", self.schema),
                &[],
            )
            .await
            .expect("count")
            .get(0)
    }

    /// Waits until every message was retired (published and deleted).
    pub async fn wait_drained(&self, what: &str) {
        wait_until(Duration::from_secs(60), what, || async {
            self.remaining().await == 0
        })
        .await;
    }

    pub async fn cleanup(self) {
        outbox_testkit::drop_schema(&self.client, self.schema.name()).await;
    }
}

/// A relay running in the background.
pub struct RunningRelay {
    stop: oneshot::Sender<()>,
    task: JoinHandle<outboxd::Result<()>>,
    pub health: std::sync::Arc<outboxd::health::Health>,
    pub faults: std::sync::Arc<outboxd::faults::Faults>,
}

impl RunningRelay {
    pub fn start(config: outboxd::Config) -> RunningRelay {
        let (stop, stopped) = oneshot::channel::<()>();
        let relay = outboxd::Relay::new(config).expect("valid config");
        let health = relay.health();
        let faults = relay.faults();
        let task = tokio::spawn(relay.run(async {
            let _ = stopped.await;
        }));
        RunningRelay {
            stop,
            task,
            health,
            faults,
        }
    }

    /// The state of `partition`, if the relay has reported one.
    pub fn state(&self, partition: i32) -> Option<outboxd::health::PartitionState> {
        self.health.snapshot().get(&partition).cloned()
    }

    /// Stops it gracefully and checks that it ended without error.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("relay stops within 30 s")
            .expect("relay task did not panic")
            .expect("relay ended without error");
    }
}

impl RunningRelay {
    /// Ends it abruptly, as a crash would: the task is dropped mid-work, its connections
    /// close and PostgreSQL releases its partition locks.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Parses the `outbox-id` header.
pub fn outbox_id(m: &outbox_testkit::Consumed) -> i64 {
    m.header("outbox-id")
        .expect("every message carries outbox-id")
        .parse()
        .expect("outbox-id is a number")
}

/// Saves one message per `(entity, body)` in its own transaction; returns the ids per
/// entity in commit order.
pub async fn write_messages(
    outbox: &Outbox,
    topic: &str,
    messages: &[(String, Vec<u8>)],
) -> std::collections::HashMap<String, Vec<i64>> {
    let mut client = outbox_testkit::connect().await;
    let mut ids: std::collections::HashMap<String, Vec<i64>> = std::collections::HashMap::new();
    for (entity, body) in messages {
        let tx = client.transaction().await.expect("begin");
        let msg = outbox::Message::builder(topic, entity.as_str())
            .payload(body.clone())
            .build()
            .expect("valid");
        let id = outbox.save_in_tx(&tx, &msg).await.expect("save");
        tx.commit().await.expect("commit");
        ids.entry(entity.clone()).or_default().push(id);
    }
    ids
}

/// Runs the `outboxd` binary with `args` against the test services; (success, stdout,
/// stderr).
pub fn outboxd(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .env("OUTBOXD_DATABASE_URL", outbox_testkit::database_url())
        .env("OUTBOXD_BROKERS", outbox_testkit::brokers())
        .env("NO_COLOR", "1")
        .output()
        .expect("run outboxd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Pins `entity` to `partition` before its first message (the schema's owner may write
/// mappings), so a test knows which virtual partition it lands in.
pub async fn pin(setup: &Setup, entity: &str, partition: i32) {
    setup
        .client
        .execute(
            &format!(
                "INSERT INTO {}.entity_partition (entity_key, partition) VALUES ($1, $2)",
                setup.schema
            ),
            &[&entity, &partition],
        )
        .await
        .expect("pin");
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An `outboxd run` process whose output (stdout and stderr) is collected as it comes.
pub struct RelayProcess {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl RelayProcess {
    pub fn start(args: &[String]) -> RelayProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .arg("run")
            .args(args)
            .env_remove("OUTBOXD_DATABASE_URL")
            .env_remove("OUTBOXD_BROKERS")
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outboxd");
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut out = output.lock().expect("lock");
                    out.push_str(&line);
                    out.push('\n');
                }
            });
        }
        RelayProcess { child, output }
    }

    pub fn output(&self) -> String {
        self.output.lock().expect("lock").clone()
    }

    /// Waits until the output shows `needle` (or the process ended, then one last look).
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output();
            if out.contains(needle) {
                return out;
            }
            let ended = self.child.try_wait().expect("try_wait").is_some();
            if ended || Instant::now() > deadline {
                std::thread::sleep(Duration::from_millis(300));
                let out = self.output();
                assert!(
                    out.contains(needle),
                    "expected `{needle}` in the relay's output:\n{out}"
                );
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then waits for the exit; returns everything it printed.
    pub fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < deadline, "the relay stops within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        self.output()
    }
}
