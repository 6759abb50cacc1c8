-- 0002: where messages go that Kafka refused for good, and entities held back by an operator.
-- Additive only (new tables, a new column with a default): a relay of the previous version
-- keeps working while this is applied.

-- Messages moved aside by the `dead_letter` and `park_entity` policies or by
-- `outboxd skip`, with the error that caused it.
CREATE TABLE @schema@.dead_letter (
    id              bigint PRIMARY KEY,
    partition       integer NOT NULL,
    topic           text NOT NULL,
    entity_key      text NOT NULL,
    kafka_key       bytea,
    kafka_partition integer,
    payload         bytea,
    header_names    text[] NOT NULL,
    header_values   bytea[] NOT NULL,
    event_type      text,
    created_at      timestamptz NOT NULL,
    failed_at       timestamptz NOT NULL DEFAULT now(),
    policy          text NOT NULL,
    error           text NOT NULL
);

-- Entities whose messages the relay holds back (policy `park_entity`) until
-- `outboxd unpark` removes the row.
CREATE TABLE @schema@.parked_entity (
    entity_key  text PRIMARY KEY,
    message_id  bigint NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now(),
    error       text NOT NULL
);

-- Bumped by `outboxd unpark`: a relay that sees it change rereads its partitions from the
-- start, so held-back messages below its read cursor are found again.
ALTER TABLE @schema@.settings ADD COLUMN parked_epoch bigint NOT NULL DEFAULT 0;
