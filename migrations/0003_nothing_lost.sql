-- 0003: nothing lost, nothing stuck; bad input refused at the SQL boundary.
-- Additive only (new tables and functions, new columns with constant defaults, a constraint
-- that checks new rows, a trigger, functions replaced in place): writers and relays of the
-- previous version keep working while this is applied.

-- Identifies the database's current "life" for the relay. Transaction ids are not stable
-- across crash recovery: ids whose WAL never reached disk (asynchronous commits such as the
-- relay's own retirements, rollbacks) are handed out again after a crash, a crash of a single
-- backend included, and a failover to a replica rewinds them further. A snapshot taken before
-- that must never be compared with rows written after it. PostgreSQL empties an unlogged table
-- in every crash recovery and never replicates its contents, so the token a relay session
-- finds here changes exactly when the transaction-id history may have been rewound; a clean
-- restart keeps it (nothing is lost then). The relay pairs it with the cluster's system
-- identifier, which a dump restored into another cluster does not carry.
CREATE UNLOGGED TABLE @schema@.relay_incarnation (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    token     text NOT NULL
);

-- When a writer last used the mapping (refreshed at most once per mapping_touch_interval(),
-- so a busy entity costs one extra update an hour, not one per message). The relay forgets a
-- mapping only after its entity was idle for the configured TTL.
ALTER TABLE @schema@.entity_partition ADD COLUMN last_used_at timestamptz NOT NULL DEFAULT now();

-- How stale `last_used_at` may be: the resolution of "idle" for the mapping TTL.
CREATE FUNCTION @schema@.mapping_touch_interval() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT interval '1 hour' $fn$;

-- Rows written around the SQL functions must not carry what the relay cannot publish either.
-- NOT VALID: checked for every new row; rows written before this migration are not scanned
-- (the relay moves an undecodable one aside through its topic's policy).
ALTER TABLE @schema@.message ADD CONSTRAINT message_headers_have_no_nulls
    CHECK (array_position(header_names, NULL) IS NULL
           AND array_position(header_values, NULL) IS NULL) NOT VALID;

-- The longest entity key in bytes, shared by the Rust library (MAX_ENTITY_KEY_BYTES) and the
-- checks below: the key is the mapping table's primary key, and a btree entry must fit in a
-- third of a page (2,704 bytes).
CREATE FUNCTION @schema@.max_entity_key_bytes() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT 1024 $fn$;

-- The largest record a message may make, in bytes: the Kafka key (the explicit one, else the
-- entity key), the payload, every header name and value, and the headers the relay adds
-- (`outbox-id`, `outbox-entity-key`, `outbox-event-type`); see record_bytes(). The one place
-- this limit is configured: the SQL functions enforce it, the Rust library checks it before it
-- sends anything (reading it from here), and the relay sizes its producer for it at start.
-- The default fits librdkafka's default `message.max.bytes` and Kafka's default broker limit.
ALTER TABLE @schema@.settings
    ADD COLUMN max_record_bytes integer NOT NULL DEFAULT 1000000
        CHECK (max_record_bytes BETWEEN 1024 AND 100000000);

-- The settings row is what every writer and relay reads; without it writers of new entities
-- would find no partition count. It cannot be deleted or truncated (change its values with
-- UPDATE).
CREATE FUNCTION @schema@.settings_are_permanent() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'outbox: the settings row cannot be deleted; change it with UPDATE'
        USING ERRCODE = 'restrict_violation';
END
$fn$;
CREATE TRIGGER settings_row_is_permanent BEFORE DELETE ON @schema@.settings
    FOR EACH ROW EXECUTE FUNCTION @schema@.settings_are_permanent();
CREATE TRIGGER settings_table_is_permanent BEFORE TRUNCATE ON @schema@.settings
    FOR EACH STATEMENT EXECUTE FUNCTION @schema@.settings_are_permanent();

-- The most headers a message may carry (besides the relay's own).
CREATE FUNCTION @schema@.max_headers() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT 100 $fn$;

-- Explicit Kafka partitions are below this (Kafka topics have far fewer partitions; a larger
-- number is a caller's mistake, refused here rather than by the relay much later).
CREATE FUNCTION @schema@.max_kafka_partition() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT 999999 $fn$;

-- The size of the record a message makes; the Rust library computes the same
-- (`Message::record_bytes`).
CREATE FUNCTION @schema@.record_bytes(
    p_entity_key text, p_payload bytea, p_kafka_key bytea,
    p_header_names text[], p_header_values bytea[], p_event_type text
) RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT coalesce(octet_length(p_kafka_key), octet_length(p_entity_key))::bigint
         + coalesce(octet_length(p_payload), 0)
         + coalesce((SELECT sum(octet_length(n)) FROM unnest(p_header_names) n), 0)
         + coalesce((SELECT sum(octet_length(v)) FROM unnest(p_header_values) v), 0)
         -- outbox-id: the name and up to 20 digits; outbox-entity-key: the name and the key.
         + 9 + 20 + 17 + octet_length(p_entity_key)
         + CASE WHEN p_event_type IS NULL THEN 0 ELSE 17 + octet_length(p_event_type) END
$fn$;

CREATE OR REPLACE FUNCTION @schema@.check_message(
    p_topic text, p_entity_key text, p_kafka_partition integer,
    p_header_names text[], p_header_values bytea[]
) RETURNS void LANGUAGE plpgsql IMMUTABLE AS $fn$
BEGIN
    IF p_topic IS NULL OR p_topic = '' THEN
        RAISE EXCEPTION 'outbox: topic must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(p_topic) > 249 OR p_topic !~ '^[A-Za-z0-9._-]+$' OR p_topic IN ('.', '..') THEN
        RAISE EXCEPTION 'outbox: invalid Kafka topic name %', quote_literal(p_topic)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Kafka topics are 1 to 249 characters of [A-Za-z0-9._-], not "." or ".."';
    END IF;
    IF p_entity_key IS NULL OR p_entity_key = '' THEN
        RAISE EXCEPTION 'outbox: entity key must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(p_entity_key) > @schema@.max_entity_key_bytes() THEN
        RAISE EXCEPTION 'outbox: entity key is % bytes, longer than the maximum of % bytes',
            octet_length(p_entity_key), @schema@.max_entity_key_bytes()
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_kafka_partition IS NOT NULL
       AND (p_kafka_partition < 0 OR p_kafka_partition > @schema@.max_kafka_partition()) THEN
        RAISE EXCEPTION 'outbox: Kafka partition must be between 0 and %, got %',
            @schema@.max_kafka_partition(), p_kafka_partition
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(coalesce(p_header_names, '{}')) <> cardinality(coalesce(p_header_values, '{}')) THEN
        RAISE EXCEPTION 'outbox: % header names but % header values',
            cardinality(p_header_names), cardinality(p_header_values)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(coalesce(p_header_names, '{}')) > @schema@.max_headers() THEN
        RAISE EXCEPTION 'outbox: % headers, more than the maximum of %',
            cardinality(p_header_names), @schema@.max_headers()
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- This runs for every message: the header checks only when there are headers.
    IF coalesce(cardinality(p_header_names), 0) > 0 THEN
        IF '' = ANY (p_header_names) OR array_position(p_header_names, NULL) IS NOT NULL THEN
            RAISE EXCEPTION 'outbox: header names must not be empty'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF EXISTS (SELECT 1 FROM unnest(p_header_names) h WHERE h LIKE 'outbox-%') THEN
            RAISE EXCEPTION 'outbox: header names starting with "outbox-" are reserved for the relay'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'the relay sets outbox-id, outbox-entity-key and outbox-event-type itself';
        END IF;
        IF EXISTS (SELECT 1 FROM unnest(p_header_names) h WHERE h ~ '[[:cntrl:]]') THEN
            RAISE EXCEPTION 'outbox: header names must not contain control characters'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF array_position(p_header_values, NULL) IS NOT NULL THEN
            RAISE EXCEPTION 'outbox: header values must not be NULL (use an empty value)'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
END
$fn$;

-- Raises the error for a missing settings row (it cannot be deleted since this migration, but
-- a restore or a manual change might still lose it), instead of writers spinning.
CREATE FUNCTION @schema@.settings_are_missing() RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'outbox: the settings row of schema @schema@ is missing'
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = 'restore it: INSERT INTO @schema@.settings DEFAULT VALUES, then set partition_count';
END
$fn$;

-- Every record this small fits any configured limit (max_record_bytes is at least this), so
-- the writers read the limit only for larger messages.
CREATE FUNCTION @schema@.record_bytes_always_allowed() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT 1024 $fn$;

-- Raises program_limit_exceeded naming the message's record size and the limit.
CREATE FUNCTION @schema@.refuse_record(p_entity_key text, p_size bigint, p_max integer)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'outbox: a record of % bytes exceeds the maximum of % bytes (entity %)',
        p_size, p_max, quote_literal(p_entity_key)
        USING ERRCODE = 'program_limit_exceeded',
              DETAIL = format('size=%s max=%s', p_size, p_max),
              HINT = 'the record counts the Kafka key, payload, headers and the relay''s headers; '
                     'raise settings.max_record_bytes (and the broker''s limits) or send less';
END
$fn$;

-- As in 0001, with the record size checked (the limit is read only for messages larger than
-- record_bytes_always_allowed(): a read per message would cost a third of the write), and the
-- mapping's last use refreshed when it is older than mapping_touch_interval().
CREATE OR REPLACE FUNCTION @schema@.enqueue(
    p_topic text, p_entity_key text, p_payload bytea,
    p_kafka_key bytea, p_kafka_partition integer,
    p_header_names text[], p_header_values bytea[], p_event_type text
) RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    v_size bigint;
    v_max integer;
    v_count integer;
    v_partition integer;
    v_stale boolean;
    v_id bigint;
BEGIN
    PERFORM @schema@.check_message(p_topic, p_entity_key, p_kafka_partition, p_header_names, p_header_values);
    -- record_bytes() without its header sums, which only messages with headers need.
    v_size := coalesce(octet_length(p_kafka_key), octet_length(p_entity_key))
              + coalesce(octet_length(p_payload), 0) + 46 + octet_length(p_entity_key)
              + CASE WHEN p_event_type IS NULL THEN 0 ELSE 17 + octet_length(p_event_type) END;
    IF coalesce(cardinality(p_header_names), 0) > 0 THEN
        v_size := @schema@.record_bytes(p_entity_key, p_payload, p_kafka_key, p_header_names,
                                        p_header_values, p_event_type);
    END IF;
    IF v_size > @schema@.record_bytes_always_allowed() THEN
        SELECT max_record_bytes INTO v_max FROM @schema@.settings;
        IF NOT FOUND THEN
            PERFORM @schema@.settings_are_missing();
        END IF;
        IF v_size > v_max THEN
            PERFORM @schema@.refuse_record(p_entity_key, v_size, v_max);
        END IF;
    END IF;
    -- Find the entity's partition, creating the sticky mapping on first use (hash modulo the
    -- current count), and lock the mapping row until this transaction ends. Lock first, then
    -- take the id: the id is assigned after any earlier writer of this entity has committed.
    -- A concurrent first writer makes ON CONFLICT wait for it; then the loop locks its row. A
    -- row the cleanup deleted meanwhile is simply not found (READ COMMITTED), and the loop
    -- creates it again.
    LOOP
        SELECT partition, last_used_at < now() - @schema@.mapping_touch_interval()
          INTO v_partition, v_stale
          FROM @schema@.entity_partition
         WHERE entity_key = p_entity_key
           FOR NO KEY UPDATE;
        EXIT WHEN FOUND;
        SELECT partition_count INTO v_count FROM @schema@.settings;
        IF NOT FOUND THEN
            PERFORM @schema@.settings_are_missing();
        END IF;
        INSERT INTO @schema@.entity_partition (entity_key, partition)
        VALUES (p_entity_key,
                (((hashtextextended(p_entity_key, 0) % v_count) + v_count) % v_count)::integer)
        ON CONFLICT (entity_key) DO NOTHING
        RETURNING partition, false INTO v_partition, v_stale;
        EXIT WHEN FOUND;
    END LOOP;
    IF v_stale THEN
        UPDATE @schema@.entity_partition SET last_used_at = now() WHERE entity_key = p_entity_key;
    END IF;
    INSERT INTO @schema@.message (partition, topic, entity_key, kafka_key, kafka_partition,
                                  payload, header_names, header_values, event_type)
    VALUES (v_partition, p_topic, p_entity_key, p_kafka_key, p_kafka_partition,
            p_payload, coalesce(p_header_names, '{}'), coalesce(p_header_values, '{}'), p_event_type)
    RETURNING id INTO v_id;
    RETURN v_id;
END
$fn$;

-- As in 0001, with four changes. It never returns fewer ids than messages: the lock pass runs
-- until it holds the mapping of every entity of the batch (the cleanup may delete a mapping
-- between its creation, or discovery, and the lock; READ COMMITTED then skips the row), and
-- the insert is counted before anything is returned. Every field is checked as check_message
-- does (reserved and control-character header names, header count, partition range, NULL
-- header values, key length). Every message's record size is checked. Stale `last_used_at`
-- values are refreshed.
CREATE OR REPLACE FUNCTION @schema@.enqueue_batch(
    p_topics text[], p_entity_keys text[], p_payloads bytea[], p_kafka_keys bytea[],
    p_kafka_partitions integer[], p_event_types text[],
    p_header_offsets integer[], p_header_counts integer[],
    p_header_names text[], p_header_values bytea[]
) RETURNS SETOF bigint LANGUAGE plpgsql AS $fn$
DECLARE
    n integer := coalesce(cardinality(p_topics), 0);
    i integer;
    v_max integer;
    v_count integer;
    v_too_large record;
    v_distinct text[];
    v_keys text[];
    v_partitions integer[];
    v_stale text[];
    v_ids bigint[];
BEGIN
    IF coalesce(cardinality(p_entity_keys), 0) <> n OR coalesce(cardinality(p_payloads), 0) <> n
       OR coalesce(cardinality(p_kafka_keys), 0) <> n OR coalesce(cardinality(p_kafka_partitions), 0) <> n
       OR coalesce(cardinality(p_event_types), 0) <> n OR coalesce(cardinality(p_header_offsets), 0) <> n
       OR coalesce(cardinality(p_header_counts), 0) <> n
       OR coalesce(cardinality(p_header_names), 0) <> coalesce(cardinality(p_header_values), 0) THEN
        RAISE EXCEPTION 'outbox: enqueue_batch arrays differ in length' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF n = 0 THEN
        RETURN;
    END IF;
    -- Fast set-based check; only when it finds a problem, check row by row for the message.
    IF EXISTS (SELECT 1
                 FROM unnest(p_topics, p_entity_keys, p_kafka_partitions, p_header_offsets, p_header_counts)
                      AS u(topic, entity_key, kafka_partition, h_off, h_cnt)
                WHERE u.topic IS NULL OR u.topic !~ '^[A-Za-z0-9._-]+$' OR length(u.topic) > 249
                   OR u.topic IN ('.', '..')
                   OR u.entity_key IS NULL OR u.entity_key = ''
                   OR octet_length(u.entity_key) > @schema@.max_entity_key_bytes()
                   OR u.kafka_partition < 0 OR u.kafka_partition > @schema@.max_kafka_partition()
                   OR u.h_off IS NULL OR u.h_cnt IS NULL OR u.h_off < 0 OR u.h_cnt < 0
                   OR u.h_cnt > @schema@.max_headers()
                   OR u.h_off + u.h_cnt > coalesce(cardinality(p_header_names), 0))
       OR EXISTS (SELECT 1 FROM unnest(p_header_names) h
                   WHERE h IS NULL OR h = '' OR h LIKE 'outbox-%' OR h ~ '[[:cntrl:]]')
       OR array_position(p_header_values, NULL) IS NOT NULL THEN
        FOR i IN 1..n LOOP
            IF p_header_offsets[i] IS NULL OR p_header_counts[i] IS NULL OR p_header_offsets[i] < 0
               OR p_header_counts[i] < 0
               OR p_header_offsets[i] + p_header_counts[i] > coalesce(cardinality(p_header_names), 0) THEN
                RAISE EXCEPTION 'outbox: message % of the batch has an invalid header slice', i
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            PERFORM @schema@.check_message(p_topics[i], p_entity_keys[i], p_kafka_partitions[i],
                p_header_names[p_header_offsets[i] + 1 : p_header_offsets[i] + p_header_counts[i]],
                p_header_values[p_header_offsets[i] + 1 : p_header_offsets[i] + p_header_counts[i]]);
        END LOOP;
        -- Header names and values outside every message's slice are not sent, but still refused.
        IF array_position(p_header_values, NULL) IS NOT NULL
           OR EXISTS (SELECT 1 FROM unnest(p_header_names) h
                       WHERE h IS NULL OR h = '' OR h LIKE 'outbox-%' OR h ~ '[[:cntrl:]]') THEN
            RAISE EXCEPTION 'outbox: the batch holds a header name or value that is refused outside any message''s slice'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    -- The record size: a cheap bound first (each message plus every header of the batch);
    -- only when it may exceed what every limit allows, each message exactly, against the
    -- configured limit.
    IF (SELECT max(coalesce(octet_length(u.kafka_key), octet_length(u.entity_key))
                   + coalesce(octet_length(u.payload), 0) + 46 + octet_length(u.entity_key)
                   + coalesce(17 + octet_length(u.event_type), 0))
          FROM unnest(p_entity_keys, p_payloads, p_kafka_keys, p_event_types)
               AS u(entity_key, payload, kafka_key, event_type))
       + coalesce((SELECT sum(octet_length(h)) FROM unnest(p_header_names) h), 0)
       + coalesce((SELECT sum(octet_length(h)) FROM unnest(p_header_values) h), 0)
       > @schema@.record_bytes_always_allowed() THEN
        SELECT max_record_bytes INTO v_max FROM @schema@.settings;
        IF NOT FOUND THEN
            PERFORM @schema@.settings_are_missing();
        END IF;
        SELECT u.entity_key, u.size INTO v_too_large
          FROM (SELECT u.entity_key,
                       @schema@.record_bytes(u.entity_key, u.payload, u.kafka_key,
                           p_header_names[u.h_off + 1 : u.h_off + u.h_cnt],
                           p_header_values[u.h_off + 1 : u.h_off + u.h_cnt], u.event_type) AS size
                  FROM unnest(p_entity_keys, p_payloads, p_kafka_keys, p_event_types,
                              p_header_offsets, p_header_counts)
                       AS u(entity_key, payload, kafka_key, event_type, h_off, h_cnt)) u
         WHERE u.size > v_max
         LIMIT 1;
        IF FOUND THEN
            PERFORM @schema@.refuse_record(v_too_large.entity_key, v_too_large.size, v_max);
        END IF;
    END IF;
    SELECT partition_count INTO v_count FROM @schema@.settings;
    IF NOT FOUND THEN
        PERFORM @schema@.settings_are_missing();
    END IF;

    SELECT array_agg(DISTINCT u.entity_key ORDER BY u.entity_key)
      INTO v_distinct
      FROM unnest(p_entity_keys) AS u(entity_key);

    LOOP
        INSERT INTO @schema@.entity_partition (entity_key, partition)
        SELECT k.entity_key,
               (((hashtextextended(k.entity_key, 0) % v_count) + v_count) % v_count)::integer
          FROM unnest(v_distinct) AS k(entity_key)
         ORDER BY k.entity_key
        ON CONFLICT (entity_key) DO NOTHING;

        -- Lock first, then take the ids (see enqueue). The locked rows also give each entity's
        -- partition, so the insert needs no second lookup. One index probe per distinct key,
        -- in key order (a plain `= ANY (...)` lets the planner choose a sequential scan of the
        -- whole mapping table). Rows locked by an earlier pass are ours already.
        SELECT array_agg(k.entity_key ORDER BY k.entity_key),
               array_agg(e.partition ORDER BY k.entity_key),
               array_agg(k.entity_key ORDER BY k.entity_key) FILTER (WHERE e.stale)
          INTO v_keys, v_partitions, v_stale
          FROM unnest(v_distinct) AS k(entity_key)
         CROSS JOIN LATERAL (SELECT m.partition,
                                    m.last_used_at < now() - @schema@.mapping_touch_interval() AS stale
                               FROM @schema@.entity_partition m
                              WHERE m.entity_key = k.entity_key
                                FOR NO KEY UPDATE) e;
        EXIT WHEN coalesce(cardinality(v_keys), 0) = cardinality(v_distinct);
        -- A mapping was deleted by the cleanup between the insert above and its lock (the
        -- lateral lock then returns no row for it): create it again and lock it. Every other
        -- mapping of the batch stays locked by this transaction, so the cleanup cannot take it.
    END LOOP;

    IF v_stale IS NOT NULL THEN
        UPDATE @schema@.entity_partition SET last_used_at = now() WHERE entity_key = ANY (v_stale);
    END IF;

    WITH inserted AS (
        INSERT INTO @schema@.message (partition, topic, entity_key, kafka_key, kafka_partition,
                                      payload, header_names, header_values, event_type)
        SELECT m.partition, u.topic, u.entity_key, u.kafka_key, u.kafka_partition, u.payload,
               coalesce(p_header_names[u.h_off + 1 : u.h_off + u.h_cnt], '{}'),
               coalesce(p_header_values[u.h_off + 1 : u.h_off + u.h_cnt], '{}'),
               u.event_type
          FROM unnest(p_topics, p_entity_keys, p_payloads, p_kafka_keys, p_kafka_partitions,
                      p_event_types, p_header_offsets, p_header_counts)
               WITH ORDINALITY AS u(topic, entity_key, payload, kafka_key, kafka_partition,
                                    event_type, h_off, h_cnt, ord)
          JOIN unnest(v_keys, v_partitions) AS m(entity_key, partition) ON m.entity_key = u.entity_key
         ORDER BY u.ord
        RETURNING id
    )
    SELECT array_agg(id ORDER BY id) INTO v_ids FROM inserted;
    -- Unreachable after the loop above; a guard so that no future change can make this
    -- function lose messages silently again.
    IF coalesce(cardinality(v_ids), 0) <> n THEN
        RAISE EXCEPTION 'outbox: enqueue_batch wrote % of % messages', coalesce(cardinality(v_ids), 0), n
            USING ERRCODE = 'internal_error';
    END IF;
    RETURN QUERY SELECT unnest(v_ids);
END
$fn$;
