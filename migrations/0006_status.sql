-- 0006: what each partition's owner is doing, for `outboxd status` (another process than the
-- relay). The lease task writes its workers' states with every renewal (every third of the
-- lease TTL). Additive only: a relay of the previous version keeps working (it leaves them
-- NULL, which status shows as unknown).
ALTER TABLE @schema@.partition_lease
    ADD COLUMN state            text,
    ADD COLUMN state_message_id bigint,
    ADD COLUMN state_error      text,
    ADD COLUMN state_at         timestamptz;
