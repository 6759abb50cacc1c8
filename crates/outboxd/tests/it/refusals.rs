//! Messages Kafka refuses for good, as they happen with a real broker: a record batch above a
//! topic's `max.message.bytes` (the broker refuses the whole batch and reports the error for
//! every message in it), a missing topic, an explicit partition that does not exist, and a
//! row the relay cannot decode. Only the message at fault goes through its topic's policy,
//! nothing of its entity overtakes it under `block` and `park_entity`, other entities and
//! partitions keep flowing, and the shared producer's fatal error is not repeated in a loop.

use std::collections::HashMap;
use std::time::Duration;

use outboxd::ErrorPolicy;
use outboxd::health::PartitionState;
use rand::Rng;

use crate::support::{RunningRelay, Setup, wait_until, write_messages};

/// The records of `topic`, each as (entity, payload), in arrival order.
fn arrivals(topic: &str) -> Vec<(String, Vec<u8>)> {
    let size = outbox_testkit::topic_size(topic);
    outbox_testkit::consume(topic, size, Duration::from_secs(30))
        .into_iter()
        .map(|m| {
            (
                m.header("outbox-entity-key").expect("entity header"),
                m.payload.unwrap_or_default(),
            )
        })
        .collect()
}

/// What a consumer de-duplicating by payload sees of `entity`, in order.
fn seen(arrived: &[(String, Vec<u8>)], entity: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (e, p) in arrived {
        let p = String::from_utf8_lossy(p).into_owned();
        if e == entity && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// How many fatal errors the relay's producer reported in `/health`.
fn fatal_errors(relay: &RunningRelay) -> u64 {
    let health: serde_json::Value =
        serde_json::from_str(&relay.health.to_json()).expect("health is JSON");
    health["producer"]["fatal_errors"].as_u64().unwrap_or(0)
}

struct SizeScenario {
    setup: Setup,
    small: String,
    healthy: String,
    a2: i64,
    /// Every message to the healthy topic, per entity, in commit order.
    healthy_expected: HashMap<String, Vec<i64>>,
}

/// Two virtual partitions. Topic `small` refuses record batches above 20,000 bytes; A2 is
/// 50 KB of random bytes (lz4 cannot shrink it), A1 and A3 are tiny, B writes beside A to
/// the same Kafka partition. C and ten D entities write to a healthy topic in both virtual
/// partitions.
async fn size_scenario(policy: ErrorPolicy) -> (SizeScenario, RunningRelay) {
    let setup = Setup::new(2).await;
    let small =
        outbox_testkit::create_topic_with("small", 1, &[("max.message.bytes", "20000")]).await;
    let healthy = outbox_testkit::create_topic("healthy", 2).await;
    let big: Vec<u8> = (0..50_000).map(|_| rand::rng().random()).collect();
    let mut config = setup.relay_config();
    config.retry_max_ms = 300;
    config
        .topics
        .insert(small.clone(), outboxd::TopicConfig { on_error: policy });
    write_messages(
        &setup.outbox,
        &small,
        &[("A".into(), b"a1".to_vec()), ("B".into(), b"b1".to_vec())],
    )
    .await;
    let a2 = write_messages(&setup.outbox, &small, &[("A".into(), big)]).await["A"][0];
    write_messages(
        &setup.outbox,
        &small,
        &[("B".into(), b"b2".to_vec()), ("A".into(), b"a3".to_vec())],
    )
    .await;
    let mut beside: Vec<(String, Vec<u8>)> = vec![("C".into(), b"c1".to_vec())];
    for i in 0..20 {
        beside.push((format!("D{}", i % 10), format!("d{i}").into_bytes()));
    }
    beside.push(("C".into(), b"c2".to_vec()));
    let healthy_expected = write_messages(&setup.outbox, &healthy, &beside).await;
    let relay = RunningRelay::start(config);
    (
        SizeScenario {
            setup,
            small,
            healthy,
            a2,
            healthy_expected,
        },
        relay,
    )
}

/// The healthy topic got everything, in order, and nothing in a loop.
fn assert_healthy_topic_flowed(s: &SizeScenario) {
    let records = outbox_testkit::topic_size(&s.healthy);
    let consumed = outbox_testkit::consume(&s.healthy, records, Duration::from_secs(30));
    let duplicates = outbox_testkit::assert_dedup_order(&consumed, &s.healthy_expected);
    assert!(
        duplicates <= 22,
        "at most one resend of what was in flight when the producer failed, not a storm: {duplicates} duplicates"
    );
}

async fn dead_letters(setup: &Setup) -> Vec<(i64, String, String)> {
    setup
        .client
        .query(
            &format!(
                "SELECT id, policy, error FROM {}.dead_letter ORDER BY id",
                setup.schema
            ),
            &[],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_for_size_dead_letters_only_the_message_at_fault() {
    let (s, relay) = size_scenario(ErrorPolicy::DeadLetter).await;
    s.setup.wait_drained("everything handled").await;
    let dead = dead_letters(&s.setup).await;
    assert_eq!(dead.len(), 1, "only the message at fault: {dead:?}");
    assert_eq!(dead[0].0, s.a2);
    assert_eq!(dead[0].1, "dead_letter");
    assert!(dead[0].2.to_lowercase().contains("too large"), "{dead:?}");
    let small = arrivals(&s.small);
    assert_eq!(seen(&small, "A"), vec!["a1", "a3"]);
    assert_eq!(seen(&small, "B"), vec!["b1", "b2"]);
    assert_healthy_topic_flowed(&s);
    assert!(fatal_errors(&relay) <= 1, "{}", relay.health.to_json());
    relay.stop().await;
    s.setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_for_size_parks_only_the_entity_at_fault() {
    let (s, relay) = size_scenario(ErrorPolicy::ParkEntity).await;
    wait_until(Duration::from_secs(60), "all but A3 handled", || async {
        s.setup.remaining().await == 1
    })
    .await;
    let dead = dead_letters(&s.setup).await;
    assert_eq!(dead.len(), 1, "only the message at fault: {dead:?}");
    assert_eq!((dead[0].0, dead[0].1.as_str()), (s.a2, "park_entity"));
    let small = arrivals(&s.small);
    assert_eq!(seen(&small, "A"), vec!["a1"], "A3 is held back");
    assert_eq!(seen(&small, "B"), vec!["b1", "b2"]);
    assert_healthy_topic_flowed(&s);
    // Released, A3 follows.
    let sql = outboxd::sql::Statements::new(&s.setup.schema);
    s.setup
        .client
        .query(&sql.unpark_entity, &[&"A"])
        .await
        .expect("unpark");
    s.setup.wait_drained("A3 published").await;
    assert_eq!(seen(&arrivals(&s.small), "A"), vec!["a1", "a3"]);
    assert!(fatal_errors(&relay) <= 1, "{}", relay.health.to_json());
    relay.stop().await;
    s.setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_for_size_blocks_at_the_message_at_fault_without_a_storm() {
    let (s, relay) = size_scenario(ErrorPolicy::Block).await;
    let blocked_partition = async || {
        relay.health.snapshot().into_iter().find_map(|(p, state)| {
            matches!(state, PartitionState::Blocked { message_id, .. } if message_id == s.a2)
                .then_some(p)
        })
    };
    wait_until(Duration::from_secs(60), "blocked at A2", || async {
        blocked_partition().await.is_some()
    })
    .await;
    // The healthy topic drains beside the blocked partition (its entities in the blocked
    // partition behind A2 excepted), and retries of A2 go through the probe producer: the
    // shared producer fails once, not on every retry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(fatal_errors(&relay) <= 1, "{}", relay.health.to_json());
    let small = arrivals(&s.small);
    assert_eq!(seen(&small, "A"), vec!["a1"], "nothing of A after A2");
    assert!(
        relay
            .health
            .to_json()
            .contains(&format!("blocked at message {}", s.a2)),
        "{}",
        relay.health.to_json()
    );
    // The operator moves A2 aside; the partition resumes and everything arrives in order.
    let sql = outboxd::sql::Statements::new(&s.setup.schema);
    s.setup
        .client
        .query(&sql.skip_message, &[&s.a2, &"too large"])
        .await
        .expect("skip");
    s.setup.wait_drained("everything published").await;
    let small = arrivals(&s.small);
    assert_eq!(seen(&small, "A"), vec!["a1", "a3"]);
    assert_eq!(seen(&small, "B"), vec!["b1", "b2"]);
    assert_healthy_topic_flowed(&s);
    assert!(fatal_errors(&relay) <= 1, "{}", relay.health.to_json());
    relay.stop().await;
    s.setup.cleanup().await;
}

/// Entity E writes E1 to an existing topic, E2 somewhere Kafka refuses, E3 to the existing
/// topic again. Under `block` nothing of E after E2 may reach Kafka, whether the refusal
/// comes at enqueue time or in a delivery report. Before the fix the whole batch was
/// enqueued, and E3 arrived while the partition reported "blocked at E2".
async fn refused_in_another_lane(
    second: impl FnOnce(&str) -> (String, Option<i32>),
) -> (Setup, RunningRelay, String, i64) {
    let setup = Setup::new(1).await;
    let topic = outbox_testkit::create_topic("lanes", 2).await;
    let (e2_topic, e2_partition) = second(&topic);
    let mut config = setup.relay_config();
    config.retry_max_ms = 300;
    // Give up on an unknown topic after 1 s instead of librdkafka's default 30 s.
    config
        .kafka
        .insert("topic.metadata.propagation.max.ms".into(), "1000".into());
    write_messages(&setup.outbox, &topic, &[("E".into(), b"e1".to_vec())]).await;
    let e2 = {
        let mut client = outbox_testkit::connect().await;
        let tx = client.transaction().await.expect("begin");
        let mut msg = outbox::Message::builder(e2_topic.as_str(), "E").payload(b"e2".to_vec());
        if let Some(p) = e2_partition {
            msg = msg.kafka_partition(p);
        }
        let id = setup
            .outbox
            .save_in_tx(&tx, &msg.build().expect("valid"))
            .await
            .expect("save");
        tx.commit().await.expect("commit");
        id
    };
    write_messages(
        &setup.outbox,
        &topic,
        &[("E".into(), b"e3".to_vec()), ("F".into(), b"f1".to_vec())],
    )
    .await;
    let relay = RunningRelay::start(config);
    wait_until(Duration::from_secs(60), "blocked at E2", || {
        let state = relay.state(0);
        async move {
            matches!(state, Some(PartitionState::Blocked { message_id, .. }) if message_id == e2)
        }
    })
    .await;
    (setup, relay, topic, e2)
}

async fn assert_held_until_skipped(setup: Setup, relay: RunningRelay, topic: String, e2: i64) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        seen(&arrivals(&topic), "E"),
        vec!["e1"],
        "E3 must not overtake the refused E2"
    );
    let sql = outboxd::sql::Statements::new(&setup.schema);
    setup
        .client
        .query(&sql.skip_message, &[&e2, &"refused"])
        .await
        .expect("skip");
    setup.wait_drained("the rest published").await;
    let arrived = arrivals(&topic);
    assert_eq!(seen(&arrived, "E"), vec!["e1", "e3"]);
    assert_eq!(seen(&arrived, "F"), vec!["f1"]);
    relay.stop().await;
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_message_to_a_missing_topic_holds_back_its_later_messages() {
    let (setup, relay, topic, e2) = refused_in_another_lane(|_| {
        (
            outbox_testkit::unique_name("missing").replace('_', "-"),
            None,
        )
    })
    .await;
    assert_held_until_skipped(setup, relay, topic, e2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_message_to_a_missing_partition_holds_back_its_later_messages() {
    let (setup, relay, topic, e2) = refused_in_another_lane(|t| (t.to_owned(), Some(7))).await;
    assert_held_until_skipped(setup, relay, topic, e2).await;
}

/// Inserts, around the SQL functions, a row whose header value is NULL: what a row written
/// before migration 0003 can hold. (The table refuses such rows now; the test drops that
/// check first.) Returns its id.
async fn insert_undecodable(setup: &Setup, topic: &str, entity: &str) -> i64 {
    let s = setup.schema.name();
    setup
        .client
        .batch_execute(&format!(
            "ALTER TABLE {s}.message DROP CONSTRAINT IF EXISTS message_headers_have_no_nulls"
        ))
        .await
        .expect("drop the check");
    setup
        .client
        .query_one(
            &format!(
                "INSERT INTO {s}.message (partition, topic, entity_key, payload, header_names, header_values)
                 VALUES (0, $1, $2, 'x', ARRAY['h'], ARRAY[NULL::bytea]) RETURNING id"
            ),
            &[&topic, &entity],
        )
        .await
        .expect("insert")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_relay_cannot_decode_is_dead_lettered_and_the_partition_goes_on() {
    let setup = Setup::new(1).await;
    let topic = outbox_testkit::create_topic("undecodable", 1).await;
    write_messages(&setup.outbox, &topic, &[("U".into(), b"u1".to_vec())]).await;
    let bad = insert_undecodable(&setup, &topic, "U").await;
    write_messages(
        &setup.outbox,
        &topic,
        &[("U".into(), b"u3".to_vec()), ("V".into(), b"v1".to_vec())],
    )
    .await;
    let relay = RunningRelay::start(outboxd::Config {
        on_error: ErrorPolicy::DeadLetter,
        ..setup.relay_config()
    });
    setup.wait_drained("every row handled").await;
    let dead = dead_letters(&setup).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, bad);
    assert!(dead[0].2.contains("header_values"), "{dead:?}");
    let arrived = arrivals(&topic);
    assert_eq!(seen(&arrived, "U"), vec!["u1", "u3"]);
    assert_eq!(seen(&arrived, "V"), vec!["v1"]);
    assert!(relay.health.is_healthy(), "{}", relay.health.to_json());
    relay.stop().await;
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_relay_cannot_decode_blocks_its_partition_visibly() {
    let setup = Setup::new(1).await;
    let topic = outbox_testkit::create_topic("undecodable", 1).await;
    let bad = insert_undecodable(&setup, &topic, "U").await;
    write_messages(&setup.outbox, &topic, &[("V".into(), b"v1".to_vec())]).await;
    let relay = RunningRelay::start(outboxd::Config {
        retry_max_ms: 300,
        ..setup.relay_config()
    });
    wait_until(Duration::from_secs(30), "blocked at the bad row", || {
        let state = relay.state(0);
        async move {
            matches!(state, Some(PartitionState::Blocked { message_id, ref error })
                if message_id == bad && error.contains("cannot decode"))
        }
    })
    .await;
    assert!(!relay.health.is_healthy());
    // The worker is alive: once the row is moved aside, the partition goes on.
    let sql = outboxd::sql::Statements::new(&setup.schema);
    setup
        .client
        .query(&sql.skip_message, &[&bad, &"bad row"])
        .await
        .expect("skip");
    setup.wait_drained("V published").await;
    assert_eq!(seen(&arrivals(&topic), "V"), vec!["v1"]);
    relay.stop().await;
    setup.cleanup().await;
}

/// Under `park_entity`, the parked entity's later rows stay in the table below the worker's
/// read cursor. When the entity is unparked while the worker reads on through a backlog, the
/// worker used to reach the entity's newer row above its cursor and publish it before the rows
/// left behind: A4 before A3, and a consumer de-duplicating by `outbox-id` dropped A3. (The
/// wake-up poller's reset comes later, or not at all while it is down.) The chaos harness found
/// it (seed 1009). Now a batch read carries the parked epoch, and a changed epoch makes the
/// worker reread the partition from its start. Deterministic: the poller polls once a minute,
/// and the worker is held mid-backlog by a row lock on one of the rows it retires, while the
/// entity is unparked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_unparked_while_the_worker_reads_on_keeps_its_order() {
    let setup = Setup::new(1).await;
    let topic = outbox_testkit::create_topic("unpark", 1).await;
    let missing = outbox_testkit::unique_name("missing").replace('_', "-");
    let mut config = outboxd::Config {
        on_error: ErrorPolicy::ParkEntity,
        batch_size: 5,
        wakeup_interval_ms: 60_000,
        ..setup.relay_config()
    };
    config
        .kafka
        .insert("topic.metadata.propagation.max.ms".into(), "1000".into());
    write_messages(&setup.outbox, &topic, &[("A".into(), b"a1".to_vec())]).await;
    write_messages(&setup.outbox, &missing, &[("A".into(), b"a2".to_vec())]).await;
    write_messages(&setup.outbox, &topic, &[("A".into(), b"a3".to_vec())]).await;
    let backlog: Vec<(String, Vec<u8>)> = (0..100)
        .map(|i| (format!("B{}", i % 5), format!("b{i}").into_bytes()))
        .collect();
    let b_ids = write_messages(&setup.outbox, &topic, &backlog).await;
    write_messages(&setup.outbox, &topic, &[("A".into(), b"a4".to_vec())]).await;
    // A row halfway through the backlog: the worker blocks when it retires it.
    let mut locker = outbox_testkit::connect().await;
    let lock = locker.transaction().await.expect("begin");
    let held_id = b_ids["B2"][10];
    lock.execute(
        &format!(
            "SELECT 1 FROM {}.message WHERE id = $1 FOR UPDATE",
            setup.schema
        ),
        &[&held_id],
    )
    .await
    .expect("lock a row");
    let relay = RunningRelay::start(config);
    wait_until(
        Duration::from_secs(30),
        "the worker waits on the lock",
        || async {
            setup
                .client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name LIKE 'outboxd worker%' AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 1)
        },
    )
    .await;
    let parked: i64 = setup
        .client
        .query_one(
            &format!("SELECT count(*) FROM {}.parked_entity", setup.schema),
            &[],
        )
        .await
        .expect("parked")
        .get(0);
    assert_eq!(parked, 1, "A is parked before the worker reached the lock");
    let sql = outboxd::sql::Statements::new(&setup.schema);
    setup
        .client
        .query(&sql.unpark_entity, &[&"A"])
        .await
        .expect("unpark");
    lock.rollback().await.expect("release the row");
    setup.wait_drained("everything published").await;
    relay.stop().await;
    let order: Vec<String> = arrivals(&topic)
        .iter()
        .filter(|(e, _)| e == "A")
        .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert_eq!(order, vec!["a1", "a3", "a4"], "A arrives in order");
    setup.cleanup().await;
}
