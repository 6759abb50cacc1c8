//! Every SQL statement the relay sends, in one place. The texts depend only on the schema
//! name, so they are built once at startup; `outboxd print-sql` prints them.

use outbox::Schema;

/// Settings of every relay worker session. Each relay statement has one good plan (an
/// index scan in id or xid order); the planner's estimates cannot be trusted for a queue
/// table (a fresh backlog has no statistics, and dead rows are invisible to them), and a
/// wrong guess (a bitmap scan plus sort over the whole partition) turns each batch read
/// into a scan of the partition. So these sessions forbid the plan types they must never
/// use, and JIT, whose compile time is a latency spike for a 2 ms query.
///
/// The relay's own commits (retiring a published batch) need not wait for the WAL flush:
/// a retirement lost in a database crash only republishes its batch, a duplicate that
/// at-least-once delivery allows and consumers drop by `outbox-id`. Waiting would cost one
/// WAL flush per batch, competing with the application's commits.
///
/// TCP keepalives let PostgreSQL notice a relay host that vanished (power loss, network
/// partition) within about 25 s instead of the kernel's two hours, so the partition locks
/// its sessions held move to a live instance.
pub const SESSION_SETUP: &str = "SET enable_seqscan = off; SET enable_bitmapscan = off; \
     SET jit = off; SET synchronous_commit = off; \
     SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3;";

/// The relay's statements for one schema.
#[derive(Debug, Clone)]
pub struct Statements {
    /// How many partitions to serve: the configured count, or more while partitions above
    /// it (after the count was lowered) still hold messages. No parameters.
    pub partitions_to_serve: String,
    /// Connections the server can still give to clients without superuser rights. No
    /// parameters.
    pub free_connections: String,
    /// The largest record a message may make (`settings.max_record_bytes`), which the
    /// producer is sized for. No parameters.
    pub max_record_bytes: String,
    /// Takes the session-level advisory lock that makes this connection the only reader of
    /// a partition. `$1`: partition.
    pub try_lock_partition: String,
    /// Opens a read window: the current transaction snapshot, and the smallest id that is
    /// committed in it but was not yet committed in the previous window's snapshot. Only
    /// rows written by transactions in the previous snapshot's in-progress list, or started
    /// after it, can qualify, and the `(xid)` index finds exactly those: the scan never
    /// walks the dead rows of messages already published. (`partition + 0` keeps the
    /// planner off the primary key, which would walk the whole partition.) The wake-up
    /// poller's `poll_windows` does this for all partitions at once; workers use this one
    /// only when the poller stalls.
    /// `$1`: partition, `$2`: previous snapshot (text).
    pub open_window: String,
    /// Opens the first window after (re)start, when no previous snapshot is known.
    /// `$1`: partition.
    pub open_first_window: String,
    /// Reads the next batch of a window in id order: rows committed in the window's
    /// snapshot with an id above the cursor. `$1`: partition, `$2`: cursor, `$3`: window
    /// snapshot (text), `$4`: limit.
    pub read_batch: String,
    /// Reads the next batch of a window's *late* rows: rows with an id at or below the
    /// highest id this reader already published that were not yet committed in the
    /// reader's previous snapshot, i.e. written by a transaction in its in-progress list or
    /// started after it. The `(xid)` index finds exactly those rows, where the id-order walk
    /// would step over every dead row between the late id and the head of the partition.
    /// (`partition + 0` and `id + 0` keep the planner off the primary key, which it would
    /// otherwise scan whole for the id range.) `$1`: partition, `$2`: cursor, `$3`: window snapshot (text), `$4`:
    /// limit, `$5`: previous snapshot (text), `$6`: highest id already published.
    pub read_late: String,
    /// Retires published messages. `$1`: partition, `$2`: ids. Each id is looked up by the
    /// full primary key, a plan the planner cannot get wrong. The plain form
    /// `partition = $1 AND id = ANY ($2)`, prepared while the table looked small, got a
    /// generic plan that filtered the whole partition, dead rows included: 30 ms per
    /// delete behind a long transaction.
    pub delete_batch: String,
    /// Moves one message to `dead_letter`. `$1`: partition, `$2`: id, `$3`: policy,
    /// `$4`: error. Returns the moved id (no row when it was already gone).
    pub dead_letter: String,
    /// Moves one message to `dead_letter` by id alone, for `outboxd skip`. `$1`: id,
    /// `$2`: reason.
    pub skip_message: String,
    /// Moves one message to `dead_letter` and parks its entity, atomically. `$1`:
    /// partition, `$2`: id, `$3`: error.
    pub park_message: String,
    /// Releases a parked entity and bumps `parked_epoch` so relays reread. `$1`: entity key.
    /// Returns one row when the entity was parked.
    pub unpark_entity: String,
    /// The wake-up poller's one query for all partitions: the current snapshot, the parked
    /// epoch, and for each partition with messages committed since the previous snapshot
    /// `$1` (text) the smallest such id: a read window handed to that partition's worker.
    pub poll_windows: String,
    /// The current snapshot and parked epoch, to start the wake-up poller. No parameters.
    pub current_snapshot: String,
    /// Which life of the database this session talks to: the cluster's system identifier and
    /// the token of the unlogged `relay_incarnation` table, created by the first session
    /// that finds it empty (PostgreSQL empties it in every crash recovery, and a replica's copy
    /// is empty when it is promoted). NULL when a concurrent session created the token after
    /// this statement's snapshot: run it again. No parameters.
    pub incarnation: String,
    /// The message id sequence: its name, cache size, whether it cycles, its last value, and
    /// the highest id in use (in the outbox table, each partition's newest row through the
    /// primary key, and in `dead_letter`). No parameters.
    pub id_sequence: String,
    /// Registers this relay instance for as long as the session lives (a session advisory
    /// lock keyed by the backend pid), so instances can count each other. No parameters.
    pub register_instance: String,
    /// The view every instance shares partitions by (see `ownership`): how many relay
    /// instances are registered for this schema in this database, and the partition count;
    /// and how many entities are parked (for `/health`). No parameters.
    pub count_instances: String,
    /// Locks the next mappings that may be forgotten (see `mappings`): above the partition
    /// count, or idle for the TTL; ones a writer holds are skipped. Writers refresh
    /// `last_used_at` when it is older than `mapping_touch_interval()` (an hour), so "idle for
    /// the TTL" is `last_used_at` older than the TTL plus that interval; a TTL of 0 means as
    /// soon as nothing waits. `$1`: continue after this key, `$2`: TTL in seconds, `$3`: limit.
    pub lock_forgettable_mappings: String,
    /// Deletes the locked mappings whose entity has no message in the outbox table. Run in
    /// its own statement after the lock, so that its snapshot sees every message committed
    /// before the lock was taken. `$1`: the locked keys. Returns the forgotten keys.
    pub forget_mappings: String,
}

/// One statement that deletes the message(s) matching `condition`, copies them into
/// `dead_letter` with `policy` and `error` (SQL expressions), then runs `then` over the CTE
/// `dead(id, entity_key)` of what was moved.
fn move_to_dead_letter(s: &str, condition: &str, policy: &str, error: &str, then: &str) -> String {
    format!(
        "WITH moved AS (
             DELETE FROM {s}.message WHERE {condition} RETURNING *
         ), dead AS (
             INSERT INTO {s}.dead_letter (id, partition, topic, entity_key, kafka_key,
                    kafka_partition, payload, header_names, header_values, event_type,
                    created_at, policy, error)
             SELECT id, partition, topic, entity_key, kafka_key, kafka_partition, payload,
                    header_names, header_values, event_type, created_at, {policy}, {error}
               FROM moved
             RETURNING id, entity_key
         )
         {then}"
    )
}

impl Statements {
    /// The statements for `schema`.
    pub fn new(schema: &Schema) -> Self {
        let s = schema.name();
        // What a batch read returns; `reader::row_to_message` decodes it. The parked epoch
        // comes last, read in the same statement as the rows (see `reader::fetch`).
        let columns = format!(
            "m.id, m.topic, m.entity_key, m.kafka_key, m.kafka_partition, \
             m.payload, m.header_names, m.header_values, m.event_type, \
             extract(epoch FROM m.created_at)::float8, \
             (SELECT st.parked_epoch FROM {s}.settings st)"
        );
        Statements {
            partitions_to_serve: format!(
                "SELECT greatest(partition_count,
                                 coalesce((SELECT max(partition) + 1 FROM {s}.message), 0))
                   FROM {s}.settings"
            ),
            max_record_bytes: format!("SELECT max_record_bytes FROM {s}.settings"),
            free_connections: "SELECT current_setting('max_connections')::int8
                                      - current_setting('superuser_reserved_connections')::int8
                                      - (SELECT count(*) FROM pg_stat_activity
                                          WHERE backend_type = 'client backend')"
                .to_owned(),
            try_lock_partition: format!(
                "SELECT pg_try_advisory_lock(hashtext('outboxd {s}'), $1::int4)"
            ),
            open_window: format!(
                "SELECT pg_current_snapshot()::text,
                        (SELECT min(w.id) FROM (
                             SELECT id FROM {s}.message
                              WHERE partition + 0 = $1::int4
                                AND xid = ANY (ARRAY(SELECT pg_snapshot_xip($2::text::pg_snapshot)))
                             UNION ALL
                             SELECT id FROM {s}.message
                              WHERE partition + 0 = $1::int4
                                AND xid >= pg_snapshot_xmax($2::text::pg_snapshot)
                        ) w)"
            ),
            open_first_window: format!(
                "SELECT pg_current_snapshot()::text,
                        (SELECT min(id) FROM {s}.message WHERE partition = $1::int4)"
            ),
            read_batch: format!(
                "SELECT {columns}
                   FROM {s}.message m
                  WHERE m.partition = $1::int4 AND m.id > $2::int8
                    AND pg_visible_in_snapshot(m.xid, $3::text::pg_snapshot)
                    AND NOT EXISTS (SELECT 1 FROM {s}.parked_entity p WHERE p.entity_key = m.entity_key)
                  ORDER BY m.id
                  LIMIT $4::int8"
            ),
            read_late: format!(
                "SELECT {columns}
                   FROM (SELECT * FROM {s}.message
                          WHERE xid = ANY (ARRAY(SELECT pg_snapshot_xip($5::text::pg_snapshot)))
                            AND partition + 0 = $1::int4 AND id + 0 > $2::int8 AND id + 0 <= $6::int8
                         UNION ALL
                         SELECT * FROM {s}.message
                          WHERE xid >= pg_snapshot_xmax($5::text::pg_snapshot)
                            AND partition + 0 = $1::int4 AND id + 0 > $2::int8 AND id + 0 <= $6::int8
                        ) m
                  WHERE pg_visible_in_snapshot(m.xid, $3::text::pg_snapshot)
                    AND NOT EXISTS (SELECT 1 FROM {s}.parked_entity p WHERE p.entity_key = m.entity_key)
                  ORDER BY m.id
                  LIMIT $4::int8"
            ),
            delete_batch: format!(
                "DELETE FROM {s}.message
                  WHERE ctid = ANY (ARRAY(
                        SELECT (SELECT m.ctid FROM {s}.message m
                                 WHERE m.partition = $1::int4 AND m.id = d.id)
                          FROM unnest($2::int8[]) AS d(id)))"
            ),
            dead_letter: move_to_dead_letter(
                s,
                "partition = $1::int4 AND id = $2::int8",
                "$3::text",
                "$4::text",
                "SELECT id FROM dead",
            ),
            skip_message: move_to_dead_letter(
                s,
                "id = $1::int8",
                "'skip'",
                "$2::text",
                "SELECT id FROM dead",
            ),
            park_message: move_to_dead_letter(
                s,
                "partition = $1::int4 AND id = $2::int8",
                "'park_entity'",
                "$3::text",
                &format!(
                    "INSERT INTO {s}.parked_entity (entity_key, message_id, error)
                     SELECT entity_key, id, $3::text FROM dead
                     ON CONFLICT (entity_key) DO NOTHING"
                ),
            ),
            unpark_entity: format!(
                "WITH released AS (
                     DELETE FROM {s}.parked_entity WHERE entity_key = $1::text RETURNING 1
                 )
                 UPDATE {s}.settings SET parked_epoch = parked_epoch + 1
                  WHERE EXISTS (SELECT 1 FROM released)
                 RETURNING parked_epoch"
            ),
            poll_windows: format!(
                "WITH fresh AS (
                     SELECT partition, id FROM {s}.message
                      WHERE xid = ANY (ARRAY(SELECT pg_snapshot_xip($1::text::pg_snapshot)))
                     UNION ALL
                     SELECT partition, id FROM {s}.message
                      WHERE xid >= pg_snapshot_xmax($1::text::pg_snapshot)
                 ), per_partition AS (
                     SELECT partition, min(id) AS min_id FROM fresh GROUP BY partition
                 )
                 SELECT pg_current_snapshot()::text,
                        (SELECT parked_epoch FROM {s}.settings),
                        (SELECT array_agg(partition ORDER BY partition) FROM per_partition),
                        (SELECT array_agg(min_id ORDER BY partition) FROM per_partition)"
            ),
            current_snapshot: format!(
                "SELECT pg_current_snapshot()::text, (SELECT parked_epoch FROM {s}.settings)"
            ),
            incarnation: format!(
                "WITH created AS (
                     INSERT INTO {s}.relay_incarnation (token)
                     SELECT md5(random()::text || clock_timestamp()::text || pg_backend_pid())
                      WHERE NOT EXISTS (SELECT 1 FROM {s}.relay_incarnation)
                     ON CONFLICT DO NOTHING
                     RETURNING token
                 )
                 SELECT (SELECT system_identifier FROM pg_control_system())::text || '/'
                        || coalesce((SELECT token FROM created),
                                    (SELECT token FROM {s}.relay_incarnation))"
            ),
            id_sequence: format!(
                "SELECT q.seq, s.cache_size, s.cycle, s.last_value,
                        greatest((SELECT max(m.max_id)
                                    FROM generate_series(0, (SELECT max(partition) FROM {s}.message)) p,
                                         LATERAL (SELECT max(id) AS max_id FROM {s}.message
                                                   WHERE partition = p) m),
                                 (SELECT max(id) FROM {s}.dead_letter))
                   FROM (SELECT pg_get_serial_sequence('{s}.message', 'id') AS seq) q
                   LEFT JOIN pg_sequences s ON s.schemaname || '.' || s.sequencename = q.seq"
            ),
            register_instance: format!(
                "SELECT pg_advisory_lock(hashtext('outboxd instances {s}'), pg_backend_pid())"
            ),
            // pg_locks shows the first key as an oid: the int4 hash read unsigned.
            count_instances: format!(
                "SELECT (SELECT count(*) FROM pg_locks
                          WHERE locktype = 'advisory' AND granted AND objsubid = 2
                            AND database = (SELECT oid FROM pg_database
                                             WHERE datname = current_database())
                            AND classid = (hashtext('outboxd instances {s}')::int8 & 4294967295)::oid),
                        (SELECT count(*) FROM {s}.parked_entity),
                        (SELECT partition_count FROM {s}.settings)"
            ),
            lock_forgettable_mappings: format!(
                "SELECT e.entity_key
                   FROM {s}.entity_partition e, {s}.settings st
                  WHERE e.entity_key > $1::text
                    AND (e.partition >= st.partition_count
                         OR e.last_used_at < now() - make_interval(secs => $2::float8)
                              - CASE WHEN $2::float8 > 0 THEN {s}.mapping_touch_interval()
                                     ELSE interval '0' END)
                  ORDER BY e.entity_key
                  LIMIT $3::int8
                    FOR UPDATE OF e SKIP LOCKED"
            ),
            forget_mappings: format!(
                "DELETE FROM {s}.entity_partition e
                  WHERE e.entity_key = ANY ($1::text[])
                    AND NOT EXISTS (SELECT 1 FROM {s}.message m
                                     WHERE m.partition = e.partition
                                       AND m.entity_key = e.entity_key)
                 RETURNING e.entity_key"
            ),
        }
    }

    /// Every statement with its name, for `outboxd print-sql`.
    pub fn all(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("session_setup", SESSION_SETUP),
            ("partitions_to_serve", &self.partitions_to_serve),
            ("max_record_bytes", &self.max_record_bytes),
            ("free_connections", &self.free_connections),
            ("try_lock_partition", &self.try_lock_partition),
            ("open_first_window", &self.open_first_window),
            ("open_window", &self.open_window),
            ("read_batch", &self.read_batch),
            ("read_late", &self.read_late),
            ("delete_batch", &self.delete_batch),
            ("dead_letter", &self.dead_letter),
            ("skip_message", &self.skip_message),
            ("park_message", &self.park_message),
            ("unpark_entity", &self.unpark_entity),
            ("poll_windows", &self.poll_windows),
            ("current_snapshot", &self.current_snapshot),
            ("incarnation", &self.incarnation),
            ("id_sequence", &self.id_sequence),
            ("register_instance", &self.register_instance),
            ("count_instances", &self.count_instances),
            ("lock_forgettable_mappings", &self.lock_forgettable_mappings),
            ("forget_mappings", &self.forget_mappings),
        ]
    }
}
