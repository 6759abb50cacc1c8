-- 0005: least-privilege roles. Additive: the write functions run with their owner's rights,
-- so a writer role needs no privilege on the tables at all (it cannot read, change or
-- delete anyone's messages), and two functions grant what a writer role and a relay role
-- need. Run them as the schema's owner, e.g. SELECT outbox.grant_writer('orders_service').

-- The entry points run as the schema's owner, with a fixed search path (every name inside
-- is schema-qualified or in pg_catalog), so that callers need only EXECUTE and USAGE.
ALTER FUNCTION @schema@.enqueue(text, text, bytea, bytea, integer, text[], bytea[], text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION @schema@.enqueue_batch(text[], text[], bytea[], bytea[], integer[], text[],
                                      integer[], integer[], text[], bytea[])
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION @schema@.save_message(text, text, bytea, jsonb, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- What a service that writes messages needs: the schema, the three write functions, and the
-- record limit (the Rust library reads it to refuse an oversized message before the call).
CREATE FUNCTION @schema@.grant_writer(role_name name) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA @schema@ TO %I', role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION
        @schema@.enqueue(text, text, bytea, bytea, integer, text[], bytea[], text),
        @schema@.enqueue_batch(text[], text[], bytea[], bytea[], integer[], text[],
                               integer[], integer[], text[], bytea[]),
        @schema@.save_message(text, text, bytea, jsonb, text) TO %I', role_name);
    EXECUTE format('GRANT SELECT (max_record_bytes) ON @schema@.settings TO %I', role_name);
    -- check_schema: the library checks the schema's version before it writes.
    EXECUTE format('GRANT SELECT ON @schema@.schema_migrations TO %I', role_name);
END
$fn$;

-- What `outboxd run` needs: read and retire messages, move them to dead_letter and park
-- entities, manage leases, instances and mappings, read the settings; plus what the operator
-- commands `outboxd skip` and `unpark` need, so an operator can use the relay's role.
-- `outboxd migrate` needs more: run it as the schema's owner.
CREATE FUNCTION @schema@.grant_relay(role_name name) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA @schema@ TO %I', role_name);
    EXECUTE format('GRANT SELECT ON @schema@.schema_migrations TO %I', role_name);
    EXECUTE format('GRANT SELECT, UPDATE (parked_epoch) ON @schema@.settings TO %I', role_name);
    EXECUTE format('GRANT SELECT, DELETE ON @schema@.message TO %I', role_name);
    EXECUTE format('GRANT SELECT ON SEQUENCE %s TO %I',
                   pg_get_serial_sequence('@schema@.message', 'id'), role_name);
    EXECUTE format('GRANT SELECT, INSERT ON @schema@.dead_letter TO %I', role_name);
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON @schema@.parked_entity TO %I', role_name);
    EXECUTE format('GRANT SELECT, UPDATE, DELETE ON @schema@.entity_partition TO %I', role_name);
    EXECUTE format('GRANT SELECT, INSERT ON @schema@.relay_incarnation TO %I', role_name);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON @schema@.partition_lease, @schema@.relay_instance TO %I', role_name);
    EXECUTE format('GRANT USAGE ON SEQUENCE @schema@.relay_instance_lock_key TO %I', role_name);
END
$fn$;

REVOKE EXECUTE ON FUNCTION @schema@.grant_writer(name), @schema@.grant_relay(name) FROM PUBLIC;
