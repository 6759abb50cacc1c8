-- 0006: what each partition's owner is doing, for `outboxd status` (another process than the
-- relay), and partitions paused on purpose. The lease task writes its workers' states with every renewal (every third of the
-- lease TTL). Additive only: a relay of the previous version keeps working (it leaves them
-- NULL, which status shows as unknown).
ALTER TABLE @schema@.partition_lease
    ADD COLUMN state            text,
    ADD COLUMN state_message_id bigint,
    ADD COLUMN state_error      text,
    ADD COLUMN state_at         timestamptz;

-- Partitions an operator paused (`outboxd partitions pause`): partition -> {reason, since}.
-- The relays give them no owner until they are resumed.
ALTER TABLE @schema@.settings
    ADD COLUMN paused_partitions jsonb NOT NULL DEFAULT '{}'::jsonb;
