//! The `outboxd` binary as operators run it: SIGTERM drains and exits 0, a second signal
//! exits at once, and kill -9 loses nothing (duplicates are allowed, loss never).

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Setup, wait_until, write_messages};

fn log_path(setup: &Setup) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("outboxd-{}.log", setup.schema.name()))
}

/// Waits until the relay's log contains `needle`.
fn wait_for_log(setup: &Setup, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !std::fs::read_to_string(log_path(setup)).is_ok_and(|l| l.contains(needle)) {
        assert!(
            Instant::now() < deadline,
            "the relay never logged {needle:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_relay(setup: &Setup, brokers: &str, extra: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(setup))
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["run", "--batch-size", "50"])
        .args(extra)
        .env("OUTBOXD_DATABASE_URL", outbox_testkit::database_url())
        .env("OUTBOXD_BROKERS", brokers)
        .env("OUTBOXD_SCHEMA", setup.schema.name())
        .env("RUST_LOG", "info,outboxd=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn outboxd")
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} failed");
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn messages(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("e{}", i % 20), format!("m{i}").into_bytes()))
        .collect()
}

async fn remaining_ids(setup: &Setup) -> HashSet<i64> {
    setup
        .client
        .query(&format!("SELECT id FROM {}.message", setup.schema), &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_batches_and_exits_zero() {
    let setup = Setup::new(4).await;
    let topic = outbox_testkit::create_topic("sigterm", 3).await;
    let written = write_messages(&setup.outbox, &topic, &messages(2000)).await;
    let all_ids: HashSet<i64> = written.values().flatten().copied().collect();
    let mut child = spawn_relay(&setup, &outbox_testkit::brokers(), &[]);
    wait_until(
        Duration::from_secs(30),
        "relay started publishing",
        || async { (setup.remaining().await as usize) < 2000 },
    )
    .await;
    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20)).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "graceful exit");
    // Every retired message was acknowledged by Kafka: it must be in the topic.
    let retired: HashSet<i64> = all_ids
        .difference(&remaining_ids(&setup).await)
        .copied()
        .collect();
    assert!(!retired.is_empty());
    let consumed = outbox_testkit::consume(&topic, retired.len(), Duration::from_secs(30));
    let consumed_ids: HashSet<i64> = consumed.iter().map(crate::support::outbox_id).collect();
    assert!(
        retired.is_subset(&consumed_ids),
        "a retired message is missing from Kafka"
    );
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let setup = Setup::new(1).await;
    write_messages(&setup.outbox, "nowhere", &messages(5)).await;
    // No broker: the batch cannot be delivered, so a graceful shutdown would wait the whole
    // (long) shutdown timeout for the producer flush.
    let mut child = spawn_relay(&setup, "127.0.0.1:1", &["--shutdown-timeout-ms", "60000"]);
    // Its batch is read and handed to the producer, which cannot deliver it.
    wait_for_log(&setup, "batch read", Duration::from_secs(20));
    signal(&child, "-TERM");
    assert!(
        wait_exit(&mut child, Duration::from_secs(1)).is_none(),
        "still draining after the first signal"
    );
    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(3))
        .expect("exits at once after the second signal");
    assert_eq!(status.code(), Some(130));
    assert_eq!(setup.remaining().await, 5, "nothing retired without an ack");
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing() {
    let setup = Setup::new(4).await;
    let topic = outbox_testkit::create_topic("kill9", 3).await;
    let writer = {
        let (outbox, topic) = (setup.outbox.clone(), topic.clone());
        tokio::spawn(async move { write_messages(&outbox, &topic, &messages(3000)).await })
    };
    let mut child = spawn_relay(&setup, &outbox_testkit::brokers(), &[]);
    wait_until(Duration::from_secs(30), "some messages published", || {
        let topic = topic.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                outbox_testkit::consume(&topic, 300, Duration::from_secs(1)).len() >= 300
            })
            .await
            .expect("consume")
        }
    })
    .await;
    signal(&child, "-KILL");
    wait_exit(&mut child, Duration::from_secs(5)).expect("killed");
    let expected = writer.await.expect("writer");
    assert!(setup.remaining().await > 0, "the kill left work behind");

    let mut child = spawn_relay(&setup, &outbox_testkit::brokers(), &[]);
    wait_until(
        Duration::from_secs(60),
        "all retired after restart",
        || async { setup.remaining().await == 0 },
    )
    .await;
    signal(&child, "-TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(20)).and_then(|s| s.code()),
        Some(0)
    );
    let all = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || outbox_testkit::consume(&topic, 100_000, Duration::from_secs(5))
    })
    .await
    .expect("consume");
    let dropped = outbox_testkit::assert_dedup_order(&all, &expected);
    assert_eq!(
        all.len() - dropped,
        3000,
        "every message at least once, order kept after de-duplication"
    );
    setup.cleanup().await;
}

/// The instance of the relay process `child` (its `relay_instance` row carries the pid), and
/// the unexpired leases per owner.
async fn lease_owners(setup: &Setup) -> Vec<(i32, i32)> {
    setup
        .client
        .query(
            &format!(
                "SELECT l.partition, i.pid FROM {s}.partition_lease l
                   JOIN {s}.relay_instance i ON i.instance_id = l.owner
                  WHERE l.expires_at > now() ORDER BY l.partition",
                s = setup.schema
            ),
            &[],
        )
        .await
        .expect("leases")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn pid(child: &Child) -> i32 {
    i32::try_from(child.id()).expect("pid")
}

/// A paused instance (SIGSTOP) keeps its connections, so only its leases running out can
/// free its partitions: the other instance takes them over after the TTL and relays
/// everything. After SIGCONT the paused one finds its leases gone (it stops and claims again
/// only what the view gives it), the two share the partitions again, and every message
/// arrives in order after de-duplication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_instance_loses_its_partitions_after_the_lease_ttl_and_rejoins() {
    let setup = Setup::new(4).await;
    let topic = outbox_testkit::create_topic("paused", 2).await;
    let ttl = ["--lease-ttl-ms", "2000"];
    let mut paused = spawn_relay(&setup, &outbox_testkit::brokers(), &ttl);
    let mut other = spawn_relay(&setup, &outbox_testkit::brokers(), &ttl);
    let balanced = |owners: &[(i32, i32)], a: i32, b: i32| {
        owners.len() == 4
            && owners.iter().filter(|(_, p)| *p == a).count() == 2
            && owners.iter().filter(|(_, p)| *p == b).count() == 2
    };
    let (a, b) = (pid(&paused), pid(&other));
    wait_until(
        Duration::from_secs(30),
        "two instances share 4 partitions",
        || async { balanced(&lease_owners(&setup).await, a, b) },
    )
    .await;
    let mut expected = write_messages(&setup.outbox, &topic, &messages(100)).await;
    setup.wait_drained("first messages").await;

    signal(&paused, "-STOP");
    let stopped_at = Instant::now();
    let writer = {
        let (outbox, topic) = (setup.outbox.clone(), topic.clone());
        tokio::spawn(async move { write_messages(&outbox, &topic, &messages(200)).await })
    };
    wait_until(
        Duration::from_secs(30),
        "the other instance holds every partition",
        || async {
            lease_owners(&setup)
                .await
                .iter()
                .filter(|(_, p)| *p == b)
                .count()
                == 4
        },
    )
    .await;
    println!(
        "paused instance: partitions taken over {} ms after SIGSTOP (TTL 2000 ms)",
        stopped_at.elapsed().as_millis()
    );
    for (k, v) in writer.await.expect("writer") {
        expected.entry(k).or_default().extend(v);
    }
    setup
        .wait_drained("messages written while one instance was paused")
        .await;

    signal(&paused, "-CONT");
    wait_until(
        Duration::from_secs(30),
        "the two share the partitions again",
        || async { balanced(&lease_owners(&setup).await, a, b) },
    )
    .await;
    for (k, v) in write_messages(&setup.outbox, &topic, &messages(100)).await {
        expected.entry(k).or_default().extend(v);
    }
    setup.wait_drained("messages written after SIGCONT").await;
    for child in [&paused, &other] {
        signal(child, "-TERM");
    }
    for child in [&mut paused, &mut other] {
        assert_eq!(
            wait_exit(child, Duration::from_secs(20)).and_then(|s| s.code()),
            Some(0)
        );
    }
    let all = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || outbox_testkit::consume(&topic, 100_000, Duration::from_secs(5))
    })
    .await
    .expect("consume");
    let dropped = outbox_testkit::assert_dedup_order(&all, &expected);
    assert_eq!(
        all.len() - dropped,
        400,
        "every message, in order per entity"
    );
    setup.cleanup().await;
}
