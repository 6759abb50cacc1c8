//! Partition hand-over between relay processes, against the real PostgreSQL and Kafka: how
//! long after an event every partition below the count is held again by a live instance
//! (the same check as the relays' own view: an unexpired lease of an instance that is
//! alive), and for a join, until the new instance holds its share.
//!
//! - `kill`: two instances, one is killed with SIGKILL.
//! - `pause`: two instances, one is stopped with SIGSTOP (its leases must run out).
//! - `graceful`: two instances, one gets SIGTERM.
//! - `join`: one instance, a second one starts.
//! - `kill_every_5s`: three instances under a steady 1,000 messages/s; every 5 s one is
//!   killed with SIGKILL and started again; commit-to-consume latency over the minute.
//! - `scale`: a backlog of 500,000 messages drained by 1, 2 and 4 instances.
//!
//! Each uses 16 partitions and the default lease TTL (10 s). The relays are the release
//! `outboxd` binary, built first. Run: `scripts/services up && cargo bench -p
//! outbox-benches --bench handover` (or `-- kill`, `pause`, `graceful`, `join`,
//! `kill_every_5s`). Figures go to docs/benchmarks.md.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use outbox_benches::BenchDb;
use outbox_benches::relay::{CommitTimes, fill, latency_percentiles, paced_writers, receive_times};

const PARTITIONS: i32 = 16;
const ROUNDS: usize = 3;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("run under `cargo bench -p outbox-benches --bench handover -- MODE`");
        return;
    }
    let mode = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or("all", String::as_str)
        .to_owned();
    let binary = build_outboxd();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let modes: Vec<&str> = match mode.as_str() {
            "all" => vec![
                "join",
                "graceful",
                "kill",
                "pause",
                "kill_every_5s",
                "scale",
            ],
            m => vec![m],
        };
        for m in modes {
            if m == "kill_every_5s" {
                kill_every_5s(&binary).await;
            } else if m == "scale" {
                for instances in [1, 2, 4] {
                    scale(&binary, instances).await;
                }
            } else {
                for round in 1..=ROUNDS {
                    let took = handover(&binary, m).await;
                    println!(
                        "handover {m} round {round}: {:.0} ms",
                        took.as_secs_f64() * 1000.0
                    );
                }
            }
        }
    });
}

/// Builds the release `outboxd` and returns its path.
fn build_outboxd() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "outboxd"])
        .status()
        .expect("cargo build");
    assert!(status.success(), "building outboxd failed");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
    target.join("release").join("outboxd")
}

fn spawn(binary: &PathBuf, db: &BenchDb, log: &str) -> Child {
    spawn_for(binary, db.schema.name(), log)
}

fn spawn_for(binary: &PathBuf, schema: &str, log: &str) -> Child {
    let log = std::fs::File::create(std::env::temp_dir().join(log)).expect("log");
    Command::new(binary)
        .arg("run")
        .env("OUTBOXD_DATABASE_URL", outbox_testkit::database_url())
        .env("OUTBOXD_BROKERS", outbox_testkit::brokers())
        .env("OUTBOXD_SCHEMA", schema)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn outboxd")
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status();
}

fn stop(mut child: Child) {
    signal(&child, "-TERM");
    let _ = child.wait();
}

/// Per live instance (by process id), how many partitions below the count it holds; and how
/// many partitions below the count have no live owner.
async fn owners(db: &BenchDb) -> (Vec<(i32, i64)>, i64) {
    let client = db.clients[0].lock().await;
    let s = db.schema.name();
    let per = client
        .query(
            &format!(
                "SELECT i.pid, count(*) FROM {s}.partition_lease l
                   JOIN {s}.relay_instance i ON i.instance_id = l.owner
                  WHERE l.partition < {PARTITIONS} AND l.expires_at > now()
                    AND {s}.instance_is_alive(l.owner)
                  GROUP BY i.pid ORDER BY i.pid"
            ),
            &[],
        )
        .await
        .expect("owners")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect::<Vec<(i32, i64)>>();
    let held: i64 = per.iter().map(|(_, n)| n).sum();
    (per, i64::from(PARTITIONS) - held)
}

async fn wait_for(db: &BenchDb, what: &str, done: impl Fn(&[(i32, i64)], i64) -> bool) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (per, unowned) = owners(db).await;
        if done(&per, unowned) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {per:?}, {unowned} unowned"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pid(c: &Child) -> i32 {
    i32::try_from(c.id()).expect("pid")
}

/// One hand-over; the time from the event until the partitions are held as they should be.
async fn handover(binary: &PathBuf, mode: &str) -> Duration {
    let db = BenchDb::new("bench_handover", 1).await;
    db.execute(&format!(
        "UPDATE {}.settings SET partition_count = {PARTITIONS}",
        db.schema
    ))
    .await;
    let first = spawn(binary, &db, "handover-first.log");
    let took = if mode == "join" {
        let a = pid(&first);
        wait_for(&db, "one instance holds all", |per, u| {
            u == 0
                && per
                    .iter()
                    .any(|&(p, n)| p == a && n == i64::from(PARTITIONS))
        })
        .await;
        let event = Instant::now();
        let second = spawn(binary, &db, "handover-second.log");
        let b = pid(&second);
        let half = i64::from(PARTITIONS / 2);
        let settled = wait_for(&db, "the joining instance holds its share", |per, u| {
            u == 0 && per.iter().any(|&(p, n)| p == b && n == half)
        })
        .await;
        stop(second);
        settled - event
    } else {
        let second = spawn(binary, &db, "handover-second.log");
        let (a, b) = (pid(&first), pid(&second));
        let half = i64::from(PARTITIONS / 2);
        wait_for(&db, "two instances share", |per, u| {
            u == 0
                && per
                    .iter()
                    .filter(|&&(p, n)| (p == a || p == b) && n == half)
                    .count()
                    == 2
        })
        .await;
        let event = Instant::now();
        let mut gone = second;
        match mode {
            "kill" => signal(&gone, "-KILL"),
            "pause" => signal(&gone, "-STOP"),
            "graceful" => signal(&gone, "-TERM"),
            other => panic!("unknown mode {other}: kill, pause, graceful, join, kill_every_5s"),
        }
        let settled = wait_for(&db, "the survivor holds every partition", |per, u| {
            u == 0
                && per
                    .iter()
                    .any(|&(p, n)| p == a && n == i64::from(PARTITIONS))
        })
        .await;
        signal(&gone, "-KILL");
        signal(&gone, "-CONT");
        let _ = gone.wait();
        settled - event
    };
    stop(first);
    db.drop().await;
    took
}

/// Three instances under 1,000 messages/s for 60 s; one is killed every 5 s and started
/// again at once; prints commit-to-consume percentiles over the whole minute.
async fn kill_every_5s(binary: &PathBuf) {
    let db = BenchDb::new("bench_killing", 1).await;
    db.execute(&format!(
        "UPDATE {}.settings SET partition_count = {PARTITIONS}",
        db.schema
    ))
    .await;
    let topic = outbox_testkit::create_topic("bench-killing", 12).await;
    let mut relays: Vec<Child> = (0..3)
        .map(|i| spawn(binary, &db, &format!("killing-{i}.log")))
        .collect();
    wait_for(&db, "three instances hold every partition", |per, u| {
        u == 0 && per.len() == 3
    })
    .await;
    let times: CommitTimes = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let receiver = receive_times(outbox_testkit::brokers(), topic.clone(), done.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killer = {
        let stop_killing = Arc::clone(&done);
        let binary = binary.clone();
        let schema = db.schema.name().to_owned();
        tokio::task::spawn_blocking(move || {
            let mut kills = 0;
            let mut i = 0;
            let mut next = Instant::now() + Duration::from_secs(5);
            while !stop_killing.load(Ordering::SeqCst) {
                if Instant::now() >= next {
                    signal(&relays[i], "-KILL");
                    let _ = relays[i].wait();
                    relays[i] = spawn_for(&binary, &schema, "killing-re.log");
                    kills += 1;
                    i = (i + 1) % relays.len();
                    next += Duration::from_secs(5);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            for r in relays {
                stop(r);
            }
            kills
        })
    };
    let written = paced_writers(
        &db.outbox,
        &topic,
        1000,
        2,
        4,
        Duration::from_secs(60),
        times.clone(),
    )
    .await;
    // Let the last messages arrive before stopping the relays and the consumer.
    tokio::time::sleep(Duration::from_secs(15)).await;
    done.store(true, Ordering::SeqCst);
    let kills = killer.await.expect("killer");
    let received = tokio::task::spawn_blocking(move || receiver.join().expect("receiver"))
        .await
        .expect("join");
    let (n, [p50, p90, p99, p999, max]) = latency_percentiles(&times, &received);
    println!(
        "kill_every_5s: {kills} kills, {written} written, {n} matched; commit-to-consume p50 {p50:.1} p90 {p90:.1} p99 {p99:.1} p99.9 {p999:.1} max {max:.1} ms"
    );
    db.drop().await;
}

/// Drains a backlog of 500,000 messages (300 B, 10,000 entities, 32 partitions) with
/// `instances` relay processes; prints the drain rate.
async fn scale(binary: &PathBuf, instances: usize) {
    const BACKLOG: u64 = 500_000;
    let db = BenchDb::new("bench_scale", 4).await;
    db.execute(&format!(
        "UPDATE {}.settings SET partition_count = 32",
        db.schema
    ))
    .await;
    let topic = outbox_testkit::create_topic("bench-scale", 12).await;
    fill(&db, &topic, BACKLOG, 1000, 10_000, 300).await;
    let started = Instant::now();
    let relays: Vec<Child> = (0..instances)
        .map(|i| spawn(binary, &db, &format!("scale-{i}.log")))
        .collect();
    loop {
        let left: i64 = db.clients[0]
            .lock()
            .await
            .query_one(&format!("SELECT count(*) FROM {}.message", db.schema), &[])
            .await
            .expect("count")
            .get(0);
        if left == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "not drained");
        // Not too often: counting the backlog is a scan competing with the relays.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let took = started.elapsed();
    println!(
        "scale: {instances} instance(s) drained {BACKLOG} messages in {:.1} s: {:.0} msg/s (process start included)",
        took.as_secs_f64(),
        BACKLOG as f64 / took.as_secs_f64()
    );
    for r in relays {
        stop(r);
    }
    db.drop().await;
}
