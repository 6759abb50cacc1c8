#!/usr/bin/env bash
# The floor under the batch target of issue 3: how many messages/s this machine's PostgreSQL
# takes when 4 clients insert 100-row batches of 300-byte rows into a table shaped like
# `message` (heap, primary key (partition, id), `(xid)` index) with plain multi-row INSERTs:
# no function, no validation, no entity lock. `save_all_in_tx` cannot be faster than this.
# Also run: the same rows into a table with only a primary key (what the xid index costs).
#
#   scripts/services up && benches/batch_floor.sh [SECONDS]
set -euo pipefail
SECS="${1:-15}"
PORT="${OUTBOX_PG_PORT:-55432}"
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
PSQL=("$BIN/psql" -q -h 127.0.0.1 -p "$PORT" -U outbox -d outbox_test)
"${PSQL[@]}" <<'SQL'
SET client_min_messages = warning;
DROP TABLE IF EXISTS floor_message, floor_pk_only;
CREATE TABLE floor_message (
    partition integer NOT NULL, id bigint GENERATED ALWAYS AS IDENTITY,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(), topic text NOT NULL, entity_key text NOT NULL,
    payload bytea, created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (partition, id));
CREATE INDEX ON floor_message (xid);
CREATE TABLE floor_pk_only (LIKE floor_message INCLUDING DEFAULTS INCLUDING IDENTITY);
ALTER TABLE floor_pk_only ADD PRIMARY KEY (partition, id);
SQL
dir="$(mktemp -d)"
for table in floor_message floor_pk_only; do
  printf 'INSERT INTO %s (partition, topic, entity_key, payload)\n  SELECT i %% 16, %s, %s || (random() * 10000)::int, convert_to(repeat(%s, 300), %s)\n    FROM generate_series(1, 100) i;\n' \
    "$table" "'orders'" "'order-'" "'x'" "'UTF8'" >"$dir/$table.sql"
  tps="$("$BIN/pgbench" -n -M prepared -h 127.0.0.1 -p "$PORT" -U outbox -c 4 -j 2 -T "$SECS" -f "$dir/$table.sql" outbox_test 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p')"
  echo "$table: $tps batches/s = $(awk "BEGIN { printf \"%.0f\", $tps * 100 }") messages/s (4 clients, 100 x 300 B per transaction, ${SECS} s)"
done
"${PSQL[@]}" -c "DROP TABLE floor_message, floor_pk_only"
rm -rf "$dir"
