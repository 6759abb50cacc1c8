//! Helpers for integration tests and benchmarks that run against the real services started
//! by `scripts/services up`: a PostgreSQL connection and a fresh schema per test, a fresh
//! Kafka topic per test, and a consumer that reads a topic back. When a service is missing,
//! the helpers fail loudly and say how to start it; they never skip.

use std::time::Duration;

use rand::Rng;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use tokio_postgres::{Client, NoTls};

/// What to run when a service is not reachable.
pub const START_HINT: &str =
    "start the services with `scripts/services up` (or run `scripts/test`, which does)";

/// The test database URL: `OUTBOX_TEST_DATABASE_URL`, else the one `scripts/services` creates.
pub fn database_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://outbox@127.0.0.1:55432/outbox_test".to_owned())
}

/// The Kafka bootstrap servers: `OUTBOX_TEST_BROKERS`, else the broker `scripts/services` starts.
pub fn brokers() -> String {
    std::env::var("OUTBOX_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:39092".to_owned())
}

/// Connects to PostgreSQL at `url`; the error names the URL and says how to start it.
pub async fn try_connect(url: &str) -> Result<Client, String> {
    match tokio_postgres::connect(url, NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
        Err(e) => Err(format!(
            "PostgreSQL is not reachable at {url}: {e}; {START_HINT}"
        )),
    }
}

/// Connects to the test database, panicking with a hint when it is not running.
pub async fn connect() -> Client {
    match try_connect(&database_url()).await {
        Ok(c) => c,
        Err(msg) => panic!("{msg}"),
    }
}

/// A random lower-case name with `prefix`, for schemas and topics that no other test uses.
pub fn unique_name(prefix: &str) -> String {
    let n: u64 = rand::rng().random();
    format!("{prefix}_{n:016x}")
}

/// Drops `schema` and everything in it.
pub async fn drop_schema(client: &Client, schema: &str) {
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .unwrap_or_else(|e| panic!("dropping schema {schema}: {e}"));
}

/// Checks that a Kafka broker answers at `brokers` within `timeout`.
pub fn try_kafka(brokers: &str, timeout: Duration) -> Result<(), String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| format!("cannot create a Kafka client for {brokers}: {e}"))?;
    consumer
        .fetch_metadata(None, timeout)
        .map(|_| ())
        .map_err(|e| format!("Kafka is not reachable at {brokers}: {e}; {START_HINT}"))
}

/// Creates a fresh topic with `partitions` partitions and returns its name; panics with a
/// hint when Kafka is not running.
pub async fn create_topic(prefix: &str, partitions: i32) -> String {
    create_topic_with(prefix, partitions, &[]).await
}

/// [`create_topic`] with topic configs, e.g. `("message.timestamp.type", "LogAppendTime")`.
pub async fn create_topic_with(prefix: &str, partitions: i32, configs: &[(&str, &str)]) -> String {
    create_named_topic(&unique_name(prefix).replace('_', "-"), partitions, configs).await
}

/// Creates the topic `name` (e.g. one a test first wrote to while it did not exist).
pub async fn create_named_topic(name: &str, partitions: i32, configs: &[(&str, &str)]) -> String {
    let name = name.to_owned();
    let brokers = brokers();
    if let Err(msg) = try_kafka(&brokers, Duration::from_secs(10)) {
        panic!("{msg}");
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap_or_else(|e| panic!("creating a Kafka admin client: {e}"));
    let topic = configs.iter().fold(
        NewTopic::new(&name, partitions, TopicReplication::Fixed(1)),
        |t, (k, v)| t.set(k, v),
    );
    let results = admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap_or_else(|e| panic!("creating topic {name}: {e}"));
    for r in results {
        if let Err((t, code)) = r {
            panic!("creating topic {t}: {code}");
        }
    }
    name
}

/// How many records `topic` holds (the sum of its partitions' high watermarks), e.g. to
/// consume everything when duplicates make the count unknown.
pub fn topic_size(topic: &str) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap_or_else(|e| panic!("creating a Kafka client: {e}"));
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or_default();
    (0..partitions)
        .map(|p| {
            let p = i32::try_from(p).unwrap_or(i32::MAX);
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("watermarks of {topic} [{p}]: {e}"));
            usize::try_from(high - low).unwrap_or_default()
        })
        .sum()
}

/// One message read back from Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    /// Kafka partition it landed in.
    pub partition: i32,
    /// Offset within that partition.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Payload bytes (`None` for a tombstone).
    pub payload: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Consumed {
    /// The value of the first header called `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_ref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

fn to_consumed(m: &BorrowedMessage<'_>) -> Consumed {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    Consumed {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
    }
}

/// Reads `topic` from the beginning until `expected` messages arrived or `timeout` passed;
/// returns what arrived, in per-partition offset order (partitions interleaved as read).
pub fn consume(topic: &str, expected: usize, timeout: Duration) -> Vec<Consumed> {
    consume_from(&brokers(), topic, expected, timeout)
}

/// [`consume`] from the cluster at `brokers` (e.g. an in-process mock cluster).
pub fn consume_from(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("test_group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap_or_else(|e| panic!("creating a Kafka consumer: {e}"));
    consumer
        .subscribe(&[topic])
        .unwrap_or_else(|e| panic!("subscribing to {topic}: {e}"));
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::with_capacity(expected);
    while out.len() < expected && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(to_consumed(&m)),
            Some(Err(e)) => panic!("consuming {topic}: {e}"),
            None => {}
        }
    }
    out
}

/// Checks what a consumer that de-duplicates by `outbox-id` would see: for every entity
/// (Kafka key), dropping each message whose id is not above the last one kept leaves
/// exactly `expected[entity]`, in order. Returns how many duplicates were dropped.
pub fn assert_dedup_order(
    consumed: &[Consumed],
    expected: &std::collections::HashMap<String, Vec<i64>>,
) -> usize {
    let mut kept: std::collections::HashMap<String, Vec<i64>> = std::collections::HashMap::new();
    let mut dropped = 0;
    for m in consumed {
        let key = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
        let id: i64 = m
            .header("outbox-id")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("message without outbox-id: {m:?}"));
        let list = kept.entry(key).or_default();
        if list.last().is_some_and(|last| id <= *last) {
            dropped += 1;
        } else {
            list.push(id);
        }
    }
    for (entity, ids) in expected {
        assert_eq!(
            kept.get(entity),
            Some(ids),
            "entity {entity}: kept ids differ from the committed ones"
        );
    }
    assert_eq!(kept.len(), expected.len(), "unexpected entities arrived");
    dropped
}

/// A PostgreSQL cluster of one test's own, for tests that crash or restart the database
/// (which the shared server of `scripts/services` must never be). Uses the server binaries
/// `scripts/services up` installs from Debian's packages; runs the server as the `postgres`
/// system user when the test runs as root (PostgreSQL refuses to run as root). Stopped
/// (immediately) and deleted on drop.
pub struct ScratchPostgres {
    dir: std::path::PathBuf,
    bindir: std::path::PathBuf,
    port: u16,
}

impl ScratchPostgres {
    /// Creates and starts a cluster on a free loopback port with the superuser `outbox` and
    /// `settings` (postgresql.conf lines, e.g. `wal_writer_delay = 10s`) added.
    pub fn start(settings: &[&str]) -> ScratchPostgres {
        let bindir = postgres_bindir();
        let dir = std::env::temp_dir().join(unique_name("outbox_pg"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
        if is_root() {
            run(
                "chown",
                &["postgres:postgres", &dir.to_string_lossy()],
                None,
            );
        }
        let port = free_port();
        let data = dir.join("data");
        run(
            &bindir.join("initdb").to_string_lossy(),
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "outbox",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            Some(&dir),
        );
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n",
            dir.display()
        );
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        let path = data.join("postgresql.conf");
        let mut text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path:?}: {e}"));
        text.push_str(&conf);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {path:?}: {e}"));
        let pg = ScratchPostgres { dir, bindir, port };
        pg.start_again();
        pg
    }

    /// The port it listens on (loopback).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `postgres` as the superuser `outbox`.
    pub fn url(&self) -> String {
        format!("postgres://outbox@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server the way a crash does (`pg_ctl -m immediate`): no checkpoint, WAL not
    /// yet flushed is lost, and the next start runs crash recovery.
    pub fn crash(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    /// Stops the server cleanly (`pg_ctl -m fast`).
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "stop"]);
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub fn start_again(&self) {
        let log = self.dir.join("postgres.log");
        self.pg_ctl(&["-l", &log.to_string_lossy(), "-w", "-t", "60", "start"]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.join("data");
        let mut all = vec!["-D", data.to_str().unwrap_or_default()];
        all.extend_from_slice(args);
        run(
            &self.bindir.join("pg_ctl").to_string_lossy(),
            &all,
            Some(&self.dir),
        );
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = as_postgres_user(&self.bindir.join("pg_ctl").to_string_lossy())
            .args(["-D", &data.to_string_lossy(), "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn postgres_bindir() -> std::path::PathBuf {
    let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop().unwrap_or_else(|| {
        panic!("PostgreSQL server binaries not found under /usr/lib/postgresql; {START_HINT}")
    })
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A command for PostgreSQL's binaries, run as the `postgres` user when we are root.
fn as_postgres_user(program: &str) -> std::process::Command {
    if is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        std::process::Command::new(program)
    }
}

/// Runs a PostgreSQL tool (or `chown`), panicking with its output when it fails.
fn run(program: &str, args: &[&str], dir: Option<&std::path::Path>) {
    let mut cmd = if program == "chown" {
        std::process::Command::new(program)
    } else {
        as_postgres_user(program)
    };
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("finding a free port: {e}"))
}
