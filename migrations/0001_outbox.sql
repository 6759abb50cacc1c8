-- 0001: the outbox schema.
--
-- Applied by `outboxd migrate` and `outbox::migrate(&client)`, which replace @schema@ with the
-- configured schema name (default `outbox`), run each file once inside one transaction under
-- an advisory lock, and record it in @schema@.schema_migrations.

-- Where the virtual partition count lives. A single row; changing it affects only entities
-- seen for the first time afterwards (see entity_partition).
CREATE TABLE @schema@.settings (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    partition_count integer NOT NULL DEFAULT 16 CHECK (partition_count BETWEEN 1 AND 4096)
);
INSERT INTO @schema@.settings DEFAULT VALUES;

-- The sticky mapping entity key -> virtual partition. The first message of an entity picks a
-- partition (hash of the key modulo the *current* count) and records it; later messages reuse
-- it. Writers lock the entity's row until they commit, which serializes the writers of one
-- entity: their message ids are then taken in commit order (docs/guarantees.md).
CREATE TABLE @schema@.entity_partition (
    entity_key text PRIMARY KEY,
    partition  integer NOT NULL CHECK (partition >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The messages waiting to be published. A row is deleted once Kafka acknowledged it.
CREATE TABLE @schema@.message (
    partition       integer NOT NULL,
    id              bigint GENERATED ALWAYS AS IDENTITY,
    -- The writing transaction: the relay cuts its reads by transaction snapshots, so a
    -- transaction that commits late is still read, and the read never walks the dead rows
    -- of messages already published.
    xid             xid8 NOT NULL DEFAULT pg_current_xact_id(),
    topic           text NOT NULL,
    entity_key      text NOT NULL,
    kafka_key       bytea,
    kafka_partition integer,
    payload         bytea,
    header_names    text[] NOT NULL DEFAULT '{}',
    header_values   bytea[] NOT NULL DEFAULT '{}',
    event_type      text,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (partition, id),
    CHECK (topic <> '' AND entity_key <> ''),
    CHECK (cardinality(header_names) = cardinality(header_values)),
    CHECK (kafka_partition IS NULL OR kafka_partition >= 0)
);
-- The relay finds newly committed rows by transaction id: one query over this index per
-- wake-up tick serves all partitions. The partition is deliberately not in it: with it,
-- the planner may pick this index for a plain `partition = $1` read and walk every dead
-- entry of the partition (its estimates cannot see dead entries).
CREATE INDEX message_xid ON @schema@.message (xid);

-- Checks one message's fields and raises invalid_parameter_value naming the bad one, so
-- callers in any language get the same errors as the Rust library.
CREATE FUNCTION @schema@.check_message(
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
    IF p_kafka_partition IS NOT NULL AND p_kafka_partition < 0 THEN
        RAISE EXCEPTION 'outbox: Kafka partition must be >= 0, got %', p_kafka_partition
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(coalesce(p_header_names, '{}')) <> cardinality(coalesce(p_header_values, '{}')) THEN
        RAISE EXCEPTION 'outbox: % header names but % header values',
            cardinality(p_header_names), cardinality(p_header_values)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Expressions only (no queries): this runs for every message.
    IF '' = ANY (p_header_names) OR array_position(p_header_names, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'outbox: header names must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$fn$;

-- Writes one message inside the caller's transaction and returns its id. This is what the
-- Rust `save_in_tx` calls, so both paths have one implementation.
CREATE FUNCTION @schema@.enqueue(
    p_topic text, p_entity_key text, p_payload bytea,
    p_kafka_key bytea, p_kafka_partition integer,
    p_header_names text[], p_header_values bytea[], p_event_type text
) RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    v_partition integer;
    v_id bigint;
BEGIN
    PERFORM @schema@.check_message(p_topic, p_entity_key, p_kafka_partition, p_header_names, p_header_values);
    -- Find the entity's partition, creating the sticky mapping on first use (hash modulo the
    -- current count), and lock the mapping row until this transaction ends. Lock first, then
    -- take the id: the id is assigned after any earlier writer of this entity has committed.
    -- A concurrent first writer makes ON CONFLICT wait for it; then the loop locks its row.
    LOOP
        SELECT partition INTO v_partition
          FROM @schema@.entity_partition
         WHERE entity_key = p_entity_key
           FOR NO KEY UPDATE;
        EXIT WHEN FOUND;
        INSERT INTO @schema@.entity_partition (entity_key, partition)
        SELECT p_entity_key,
               (((hashtextextended(p_entity_key, 0) % s.partition_count) + s.partition_count)
                 % s.partition_count)::integer
          FROM @schema@.settings s
        ON CONFLICT (entity_key) DO NOTHING
        RETURNING partition INTO v_partition;
        EXIT WHEN FOUND;
    END LOOP;
    INSERT INTO @schema@.message (partition, topic, entity_key, kafka_key, kafka_partition,
                                  payload, header_names, header_values, event_type)
    VALUES (v_partition, p_topic, p_entity_key, p_kafka_key, p_kafka_partition,
            p_payload, coalesce(p_header_names, '{}'), coalesce(p_header_values, '{}'), p_event_type)
    RETURNING id INTO v_id;
    RETURN v_id;
END
$fn$;

-- The entry point for services written in other languages: same semantics as `save_in_tx`.
-- Header values in `headers` must be JSON strings; they are sent as their UTF-8 bytes.
CREATE FUNCTION @schema@.save_message(
    topic text, entity_key text, payload bytea,
    headers jsonb DEFAULT NULL, event_type text DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    v_names text[] := '{}';
    v_values bytea[] := '{}';
BEGIN
    IF headers IS NOT NULL THEN
        IF jsonb_typeof(headers) <> 'object' THEN
            RAISE EXCEPTION 'outbox: headers must be a JSON object of strings, got %', jsonb_typeof(headers)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF EXISTS (SELECT 1 FROM jsonb_each(headers) e WHERE jsonb_typeof(e.value) <> 'string') THEN
            RAISE EXCEPTION 'outbox: header values must be JSON strings'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT coalesce(array_agg(e.key ORDER BY e.key), '{}'),
               coalesce(array_agg(convert_to(e.value, 'UTF8') ORDER BY e.key), '{}')
          INTO v_names, v_values
          FROM jsonb_each_text(headers) e;
    END IF;
    RETURN @schema@.enqueue(topic, entity_key, payload, NULL, NULL, v_names, v_values, event_type);
END
$fn$;

-- Writes a batch of messages inside the caller's transaction and returns their ids, which
-- increase in input order. Set-based: one statement creates the missing mappings, one locks
-- every entity of the batch (in key order, to keep concurrent batches from deadlocking),
-- one inserts all messages. Headers travel flattened (arrays must be rectangular):
-- message i has the names/values at positions p_header_offsets[i] + 1 ..
-- p_header_offsets[i] + p_header_counts[i].
CREATE FUNCTION @schema@.enqueue_batch(
    p_topics text[], p_entity_keys text[], p_payloads bytea[], p_kafka_keys bytea[],
    p_kafka_partitions integer[], p_event_types text[],
    p_header_offsets integer[], p_header_counts integer[],
    p_header_names text[], p_header_values bytea[]
) RETURNS SETOF bigint LANGUAGE plpgsql AS $fn$
DECLARE
    n integer := coalesce(cardinality(p_topics), 0);
    i integer;
    v_keys text[];
    v_partitions integer[];
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
                   OR u.entity_key IS NULL OR u.entity_key = '' OR u.kafka_partition < 0
                   OR u.h_off IS NULL OR u.h_cnt IS NULL OR u.h_off < 0 OR u.h_cnt < 0
                   OR u.h_off + u.h_cnt > coalesce(cardinality(p_header_names), 0))
       OR '' = ANY (p_header_names) OR array_position(p_header_names, NULL) IS NOT NULL THEN
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
    END IF;

    INSERT INTO @schema@.entity_partition (entity_key, partition)
    SELECT k.entity_key,
           (((hashtextextended(k.entity_key, 0) % s.partition_count) + s.partition_count)
             % s.partition_count)::integer
      FROM (SELECT DISTINCT u.entity_key FROM unnest(p_entity_keys) AS u(entity_key)) k,
           @schema@.settings s
     ORDER BY k.entity_key
    ON CONFLICT (entity_key) DO NOTHING;

    -- Lock first, then take the ids (see enqueue). The locked rows also give each entity's
    -- partition, so the insert needs no second lookup.
    -- One index probe per distinct key, in key order (a plain `= ANY (...)` lets the planner
    -- choose a sequential scan of the whole mapping table).
    SELECT array_agg(k.entity_key ORDER BY k.entity_key), array_agg(e.partition ORDER BY k.entity_key)
      INTO v_keys, v_partitions
      FROM (SELECT DISTINCT u.entity_key FROM unnest(p_entity_keys) AS u(entity_key)
             ORDER BY 1) k
     CROSS JOIN LATERAL (SELECT m.partition
                           FROM @schema@.entity_partition m
                          WHERE m.entity_key = k.entity_key
                            FOR NO KEY UPDATE) e;

    RETURN QUERY
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
    SELECT id FROM inserted;
END
$fn$;
