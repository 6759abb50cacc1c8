-- 0004: partition ownership by leases. Additive only (two new tables).
--
-- Every relay instance registers a row here and keeps it alive from a task of its own. An
-- instance is alive while its row has not expired and its lease session still holds the
-- instance's advisory lock (key: the schema's name, `lock_key`): a killed process's session
-- ends at once, and a paused one's row expires after the lease TTL. pg_locks, unlike
-- pg_stat_activity, shows every role's sessions. Every instance reads the live instances
-- from here and computes the same assignment.
CREATE SEQUENCE @schema@.relay_instance_lock_key AS integer CYCLE;

CREATE TABLE @schema@.relay_instance (
    instance_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    lock_key    integer NOT NULL UNIQUE DEFAULT nextval('@schema@.relay_instance_lock_key'),
    host        text NOT NULL DEFAULT '',
    pid         integer NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

-- One lease per virtual partition that ever had an owner. `epoch` only grows: every claim
-- bumps it, and a worker may retire rows only while the lease still carries its own epoch,
-- so an instance whose lease was taken over cannot retire anything after that. `owner` is
-- NULL once released (a graceful hand-over); an expired lease is free as well.
CREATE TABLE @schema@.partition_lease (
    partition  integer PRIMARY KEY CHECK (partition >= 0),
    owner      uuid,
    epoch      bigint NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    expires_at timestamptz NOT NULL DEFAULT '-infinity',
    taken_at   timestamptz
);

-- The first key of every instance advisory lock of this schema (the second is `lock_key`).
CREATE FUNCTION @schema@.instance_lock_class() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT hashtext('outboxd instance @schema@') $fn$;

-- True while some session holds the instance advisory lock `lock_key` of this schema
-- (pg_locks shows the keys as oids: the int4 values read unsigned).
CREATE FUNCTION @schema@.instance_lock_is_held(lock_key integer) RETURNS boolean
LANGUAGE sql STABLE AS $fn$
    SELECT EXISTS (
        SELECT 1 FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid = (@schema@.instance_lock_class()::int8 & 4294967295)::oid
           AND l.objid = (lock_key::int8 & 4294967295)::oid)
$fn$;

-- True while `instance` is alive (see relay_instance). Used by the claim and the shared view,
-- so that both apply the same rule.
CREATE FUNCTION @schema@.instance_is_alive(instance uuid) RETURNS boolean
LANGUAGE sql STABLE AS $fn$
    SELECT EXISTS (
        SELECT 1 FROM @schema@.relay_instance i
         WHERE i.instance_id = instance AND i.expires_at > now()
           AND @schema@.instance_lock_is_held(i.lock_key))
$fn$;
