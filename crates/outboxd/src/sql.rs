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
/// The same distrust decides the plan cache: every statement runs its *generic* plan, made
/// once per session. PostgreSQL would otherwise keep planning a statement afresh at every
/// execution whenever the generic plan's estimate looks worse than a custom plan's, which it
/// did for the poller's row read and the retirement (measured under load: planning cost more
/// database CPU than executing, 0.08-0.12 ms per call). With the plan types above forbidden
/// each statement has the one index plan it is written for (`dead_rows` tests measure them).
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
     SET jit = off; SET plan_cache_mode = force_generic_plan; SET synchronous_commit = off; \
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
    /// Claims a partition's lease for this instance (see `ownership`): succeeds when the
    /// lease is free, expired, this instance's own, or held by an instance that is no longer
    /// alive, and bumps the epoch. `$1`: partition, `$2`: instance id, `$3`: TTL in ms.
    /// Returns the new epoch and the previous owner (NULL when there was none), or no row.
    pub claim_lease: String,
    /// Gives a lease up at once (a graceful hand-over). `$1`: partition, `$2`: instance id,
    /// `$3`: epoch.
    pub release_lease: String,
    /// Registers this instance. `$1`: host, `$2`: process id, `$3`: TTL in ms. Returns the
    /// instance id (text).
    pub register_instance: String,
    /// Keeps this instance alive and renews the leases its workers hold, and only those: a
    /// lease of this instance that no worker holds any more (one that was fenced, or whose
    /// release failed) runs out instead of being kept alive for ever. A held lease that
    /// expired (PostgreSQL was away longer than the TTL) is renewed too while it still
    /// carries the worker's epoch: nobody claimed it meanwhile (a claim changes the owner and
    /// the epoch, and the row lock orders a claim and a renewal). The lease rows are locked
    /// in partition order first, as `retire` share-locks them, so that a renewal and a
    /// retirement of several partitions never wait for each other in a cycle (a deadlock
    /// PostgreSQL would break by failing one of them). `$1`: instance id, `$2`: TTL in ms, `$3`: host, `$4`: process id, `$5`: held partitions, `$6`: their
    /// epochs. Returns the instance's lock key and the renewed partitions and their epochs.
    pub renew_leases: String,
    /// Takes the advisory lock that shows this instance's lease session is alive. `$1`: the
    /// instance's lock key.
    pub lock_instance: String,
    /// Forgets instances that have been dead for an hour. No parameters.
    pub forget_dead_instances: String,
    /// A graceful exit: gives up every lease of the instance and deregisters it. `$1`:
    /// instance id.
    pub deregister_instance: String,
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
    /// Retires published messages of one or more partitions, each only while its lease
    /// still carries its worker's epoch (fencing): the lease rows are share-locked in the
    /// same statement, in partition order (as the renewal locks them, so the two never wait
    /// on each other in a cycle), so a takeover either committed before (nothing of that
    /// partition is retired) or waits until the retirement committed. Each id is looked up
    /// by the full primary key, a plan the planner cannot get wrong. The plain form
    /// `partition = $1 AND id = ANY ($2)`, prepared while the table looked small, got a
    /// generic plan that filtered the whole partition, dead rows included: 30 ms per delete
    /// behind a long transaction. `$1`: partitions, `$2`: their workers' epochs, `$3`:
    /// instance id, `$4`: each id's partition, `$5`: the ids. Returns the partitions whose
    /// lease held (int4[]) and how many messages were deleted (the count also puts the
    /// delete inside the statement's plan, where `EXPLAIN` counts its buffers).
    pub retire: String,
    /// Moves one message to `dead_letter`, only while the worker's lease holds (fencing, as
    /// for `retire`). `$1`: partition, `$2`: id, `$3`: policy, `$4`: error, `$5`:
    /// instance id, `$6`: epoch. Returns whether the lease was held.
    pub dead_letter: String,
    /// Moves one message to `dead_letter` by id alone, for `outboxd skip`. `$1`: id,
    /// `$2`: reason.
    pub skip_message: String,
    /// Moves one message to `dead_letter` and parks its entity, atomically, only while the
    /// worker's lease holds. `$1`: partition, `$2`: id, `$3`: error, `$4`: instance id,
    /// `$5`: epoch. Returns whether the lease was held.
    pub park_message: String,
    /// Releases a parked entity and bumps `parked_epoch` so relays reread. `$1`: entity key.
    /// Returns one row when the entity was parked.
    pub unpark_entity: String,
    /// The wake-up poller's one statement for all partitions, one row per message it reads
    /// (or one row when it reads none). Every row carries: the batch read's columns (NULL
    /// in a row without a message), the parked epoch among them; then the partition, the
    /// smallest id committed there since the previous snapshot `$1` (text) and how many
    /// there are (the partition's read window), the id of a message it read (NULL when it
    /// read none of the partition), and the current snapshot. A partition with
    /// new messages has at least one row. For the partitions of `$2` (int4[], those this
    /// instance holds) whose window has at most `$3` rows, while the windows read stay within
    /// `$4` rows together, the rows carry the window's messages themselves (not of a parked
    /// entity; by partition and id): in one snapshot with the window, so exactly what the
    /// worker's read of it would return. Each message is one primary-key probe and the
    /// parked check one more (the `LIMIT` keeps the planner from turning the lookup into a
    /// join that walks the table; as an anti-join the parked check hashed all of
    /// `parked_entity` at every poll).
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
    /// The view every instance shares partitions by (see `ownership`): the live instances
    /// in id order, the partition count, the partitions at or above it that hold messages,
    /// the paused partitions; and how many entities are parked (for `/health`). No
    /// parameters.
    pub ownership_view: String,
    /// The backlog gauges (see `backlog`): per partition of `$1` (int4[]), the waiting
    /// messages counted up to `$2` (an index-only walk that stops there) and the age of the
    /// oldest in seconds (one index probe); one more row, partition NULL, with the number of
    /// dead letters and of parked entities.
    pub backlog: String,
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
/// The CTE `lease`: the partition's lease row, share-locked, when it still carries the
/// worker's instance and epoch and has not expired (fencing; see `retire`).
fn lease_cte(s: &str, partition: &str, instance: &str, epoch: &str) -> String {
    format!(
        "lease AS (
             SELECT 1 FROM {s}.partition_lease
              WHERE partition = {partition}::int4 AND owner = {instance}::text::uuid
                AND epoch = {epoch}::int8 AND expires_at > now()
                FOR SHARE
         )"
    )
}

/// A relay worker's move to `dead_letter`: only while its lease holds (`fence`, a `lease`
/// CTE); returns whether it held.
fn fenced_move(
    s: &str,
    condition: &str,
    policy: &str,
    error: &str,
    also: &str,
    fence: &str,
) -> String {
    move_to_dead_letter(
        s,
        &format!("{condition} AND EXISTS (SELECT 1 FROM lease)"),
        policy,
        error,
        &format!("{also} SELECT EXISTS (SELECT 1 FROM lease)"),
        Some(fence),
    )
}

fn move_to_dead_letter(
    s: &str,
    condition: &str,
    policy: &str,
    error: &str,
    then: &str,
    fence: Option<&str>,
) -> String {
    let fence = fence.map_or_else(String::new, |f| format!("{f}, "));
    format!(
        "WITH {fence}moved AS (
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
        // What a batch read returns; `store::row_to_message` decodes it. The parked epoch
        // comes last, read in the same statement as the rows (see `reader::fetched`).
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
            claim_lease: format!(
                "WITH previous AS (
                     SELECT owner FROM {s}.partition_lease WHERE partition = $1::int4
                 ), claimed AS (
                     INSERT INTO {s}.partition_lease AS l (partition, owner, epoch, expires_at, taken_at)
                     VALUES ($1::int4, $2::text::uuid, 1,
                             now() + $3::int8 * interval '1 millisecond', now())
                     ON CONFLICT (partition) DO UPDATE
                        SET owner = EXCLUDED.owner, epoch = l.epoch + 1,
                            expires_at = EXCLUDED.expires_at, taken_at = now()
                      WHERE l.owner IS NULL OR l.owner = EXCLUDED.owner OR l.expires_at <= now()
                         OR NOT {s}.instance_is_alive(l.owner)
                     RETURNING l.epoch
                 )
                 SELECT epoch, (SELECT owner::text FROM previous) FROM claimed"
            ),
            release_lease: format!(
                "UPDATE {s}.partition_lease SET owner = NULL, expires_at = '-infinity'
                  WHERE partition = $1::int4 AND owner = $2::text::uuid AND epoch = $3::int8"
            ),
            register_instance: format!(
                "INSERT INTO {s}.relay_instance (host, pid, expires_at)
                 VALUES ($1::text, $2::int4, now() + $3::int8 * interval '1 millisecond')
                 RETURNING instance_id::text"
            ),
            renew_leases: format!(
                "WITH instance AS (
                     INSERT INTO {s}.relay_instance (instance_id, host, pid, expires_at)
                     VALUES ($1::text::uuid, $3::text, $4::int4,
                             now() + $2::int8 * interval '1 millisecond')
                     ON CONFLICT (instance_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
                     RETURNING lock_key
                 ), locked AS (
                     SELECT l.partition FROM {s}.partition_lease l
                      WHERE l.owner = $1::text::uuid AND l.partition = ANY ($5::int4[])
                      ORDER BY l.partition
                        FOR NO KEY UPDATE
                 ), renewed AS (
                     UPDATE {s}.partition_lease l
                        SET expires_at = now() + $2::int8 * interval '1 millisecond',
                            state = h.state, state_message_id = h.message_id,
                            state_error = h.error, state_at = now()
                       FROM unnest($5::int4[], $6::int8[], $7::text[], $8::int8[], $9::text[])
                            AS h(partition, epoch, state, message_id, error)
                      WHERE l.owner = $1::text::uuid AND l.partition = h.partition
                        AND l.epoch = h.epoch
                        AND l.partition IN (SELECT partition FROM locked)
                     RETURNING l.partition, l.epoch
                 )
                 SELECT (SELECT lock_key FROM instance),
                        (SELECT array_agg(partition ORDER BY partition) FROM renewed),
                        (SELECT array_agg(epoch ORDER BY partition) FROM renewed)"
            ),
            lock_instance: format!(
                "SELECT pg_try_advisory_lock({s}.instance_lock_class(), $1::int4)"
            ),
            forget_dead_instances: format!(
                "DELETE FROM {s}.relay_instance WHERE expires_at < now() - interval '1 hour'"
            ),
            deregister_instance: format!(
                "WITH released AS (
                     UPDATE {s}.partition_lease SET owner = NULL, expires_at = '-infinity'
                      WHERE owner = $1::text::uuid
                 )
                 DELETE FROM {s}.relay_instance WHERE instance_id = $1::text::uuid"
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
            retire: format!(
                "WITH lease AS (
                     SELECT l.partition FROM {s}.partition_lease l
                       JOIN unnest($1::int4[], $2::int8[]) AS w(partition, epoch)
                         ON l.partition = w.partition AND l.epoch = w.epoch
                      WHERE l.owner = $3::text::uuid AND l.expires_at > now()
                      ORDER BY l.partition
                        FOR SHARE OF l
                 ), retired AS (
                     DELETE FROM {s}.message
                      WHERE ctid = ANY (ARRAY(
                            SELECT (SELECT m.ctid FROM {s}.message m
                                     WHERE m.partition = d.partition AND m.id = d.id)
                              FROM unnest($4::int4[], $5::int8[]) AS d(partition, id)
                             WHERE d.partition IN (SELECT partition FROM lease)))
                        RETURNING 1
                 )
                 SELECT ARRAY(SELECT partition FROM lease), (SELECT count(*) FROM retired)"
            ),
            dead_letter: fenced_move(
                s,
                "partition = $1::int4 AND id = $2::int8",
                "$3::text",
                "$4::text",
                "",
                &lease_cte(s, "$1", "$5", "$6"),
            ),
            skip_message: move_to_dead_letter(
                s,
                "id = $1::int8",
                "'skip'",
                "$2::text",
                "SELECT id FROM dead",
                None,
            ),
            park_message: fenced_move(
                s,
                "partition = $1::int4 AND id = $2::int8",
                "'park_entity'",
                "$3::text",
                &format!(
                    ", parked AS (
                         INSERT INTO {s}.parked_entity (entity_key, message_id, error)
                         SELECT entity_key, id, $3::text FROM dead
                         ON CONFLICT (entity_key) DO NOTHING
                     )"
                ),
                &lease_cte(s, "$1", "$4", "$5"),
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
                     SELECT partition, min(id) AS min_id, count(*) AS rows
                       FROM fresh GROUP BY partition
                 ), read AS (
                     SELECT partition FROM (
                         SELECT partition, sum(rows) OVER (ORDER BY partition) AS running
                           FROM per_partition
                          WHERE rows <= $3::int8 AND partition = ANY ($2::int4[])
                     ) r WHERE running <= $4::int8
                 ), listed AS (
                     SELECT p.partition, p.min_id, p.rows, f.id
                       FROM per_partition p
                       LEFT JOIN fresh f ON f.partition = p.partition
                                        AND p.partition IN (SELECT partition FROM read)
                 )
                 SELECT {columns}, l.partition, l.min_id, l.rows, l.id, now.snapshot
                   FROM (SELECT pg_current_snapshot()::text AS snapshot) now
                   LEFT JOIN listed l ON true
                   LEFT JOIN LATERAL (
                       SELECT * FROM {s}.message r
                        WHERE r.partition = l.partition AND r.id = l.id
                          AND (SELECT true FROM {s}.parked_entity p
                                WHERE p.entity_key = r.entity_key) IS NULL
                        LIMIT 1
                   ) m ON true
                  ORDER BY l.partition, m.id"
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
            ownership_view: format!(
                "SELECT (SELECT array_agg(i.instance_id::text ORDER BY i.instance_id)
                           FROM {s}.relay_instance i
                          WHERE i.expires_at > now() AND {s}.instance_lock_is_held(i.lock_key)),
                        (SELECT count(*) FROM {s}.parked_entity),
                        st.partition_count,
                        (SELECT array_agg(p ORDER BY p)
                           FROM generate_series(st.partition_count,
                                                (SELECT max(partition) FROM {s}.message)) p
                          WHERE EXISTS (SELECT 1 FROM {s}.message m WHERE m.partition = p)),
                        ARRAY(SELECT k::int4 FROM jsonb_object_keys(st.paused_partitions) k
                               ORDER BY 1)
                   FROM {s}.settings st"
            ),
            backlog: format!(
                "SELECT p, (SELECT count(*) FROM (SELECT 1 FROM {s}.message m
                                                  WHERE m.partition = p LIMIT $2) c),
                        coalesce((SELECT extract(epoch FROM now() - m.created_at)::float8
                                    FROM {s}.message m WHERE m.partition = p
                                   ORDER BY m.id LIMIT 1), 0)
                   FROM unnest($1::int4[]) p
                 UNION ALL
                 SELECT NULL, (SELECT count(*) FROM {s}.dead_letter),
                        (SELECT count(*) FROM {s}.parked_entity)::float8"
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
            ("claim_lease", &self.claim_lease),
            ("release_lease", &self.release_lease),
            ("register_instance", &self.register_instance),
            ("renew_leases", &self.renew_leases),
            ("lock_instance", &self.lock_instance),
            ("forget_dead_instances", &self.forget_dead_instances),
            ("deregister_instance", &self.deregister_instance),
            ("open_first_window", &self.open_first_window),
            ("open_window", &self.open_window),
            ("read_batch", &self.read_batch),
            ("read_late", &self.read_late),
            ("retire", &self.retire),
            ("dead_letter", &self.dead_letter),
            ("skip_message", &self.skip_message),
            ("park_message", &self.park_message),
            ("unpark_entity", &self.unpark_entity),
            ("poll_windows", &self.poll_windows),
            ("current_snapshot", &self.current_snapshot),
            ("incarnation", &self.incarnation),
            ("id_sequence", &self.id_sequence),
            ("ownership_view", &self.ownership_view),
            ("backlog", &self.backlog),
            ("lock_forgettable_mappings", &self.lock_forgettable_mappings),
            ("forget_mappings", &self.forget_mappings),
        ]
    }
}
