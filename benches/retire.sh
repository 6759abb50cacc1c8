#!/usr/bin/env bash
# Retirement strategies for published messages (issue 4), measured with pgbench against the
# project-local PostgreSQL, on a message-shaped table of 1,000,000 rows (300-byte payloads,
# primary key (partition, id), (xid) index), 200 batches of 1,000 rows each, one client,
# `synchronous_commit = off` as in the relay's sessions:
#   delete  - what the relay does: delete each published batch (full-key lookups);
#   mark    - flag each batch published, then purge all flagged rows in one DELETE later;
#   cursor  - keep the table, advance a per-partition cursor row per batch; the rows go
#             when their time/range partition is truncated (timed: TRUNCATE of the table).
#
#   scripts/services up && benches/retire.sh
set -euo pipefail
PORT="${OUTBOX_PG_PORT:-55432}"
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
PSQL=("$BIN/psql" -q -X -h 127.0.0.1 -p "$PORT" -U outbox -d outbox_test)
BATCHES=200
export PGOPTIONS="-c synchronous_commit=off"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"; "${PSQL[@]}" -c "SET client_min_messages = warning; DROP SCHEMA IF EXISTS retire_bench CASCADE"' EXIT

fill() {
  "${PSQL[@]}" <<'SQL'
SET client_min_messages = warning;
DROP SCHEMA IF EXISTS retire_bench CASCADE;
CREATE SCHEMA retire_bench;
CREATE TABLE retire_bench.message (
    partition integer NOT NULL, id bigint NOT NULL, xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    topic text NOT NULL, entity_key text NOT NULL, payload bytea,
    published boolean NOT NULL DEFAULT false, PRIMARY KEY (partition, id));
CREATE INDEX ON retire_bench.message (xid);
INSERT INTO retire_bench.message (partition, id, topic, entity_key, payload)
SELECT 0, i, 'orders', 'order-' || (i % 10000), convert_to(repeat('x', 300), 'UTF8')
  FROM generate_series(1, 1000000) i;
CREATE TABLE retire_bench.cursor (partition integer PRIMARY KEY, last_id bigint NOT NULL);
INSERT INTO retire_bench.cursor VALUES (0, 0);
CREATE SEQUENCE retire_bench.batch;
VACUUM ANALYZE retire_bench.message;
SQL
}

# The ids of the next batch, as the relay passes them: an int8[] of 1,000 ids.
IDS="ARRAY(SELECT generate_series(b * 1000 + 1, b * 1000 + 1000)::int8 FROM (SELECT nextval('retire_bench.batch') - 1 AS b) s)"
LOOKUP="ARRAY(SELECT (SELECT m.ctid FROM retire_bench.message m WHERE m.partition = 0 AND m.id = d.id) FROM unnest($IDS) AS d(id))"
echo "DELETE FROM retire_bench.message WHERE ctid = ANY ($LOOKUP);" >"$dir/delete.sql"
echo "UPDATE retire_bench.message SET published = true WHERE ctid = ANY ($LOOKUP);" >"$dir/mark.sql"
echo "UPDATE retire_bench.cursor SET last_id = nextval('retire_bench.batch') * 1000 WHERE partition = 0;" >"$dir/cursor.sql"

per_batch() {
  "$BIN/pgbench" -n -M prepared -h 127.0.0.1 -p "$PORT" -U outbox -c 1 -t "$BATCHES" -f "$dir/$1.sql" outbox_test 2>/dev/null \
    | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p'
}
timed() {
  local start end
  start=$(date +%s%N)
  "${PSQL[@]}" -c "$1"
  end=$(date +%s%N)
  awk "BEGIN { printf \"%.1f\", ($end - $start) / 1e6 }"
}

fill; d="$(per_batch delete)"
echo "delete: ${d} ms per 1,000-row batch"
fill; m="$(per_batch mark)"; p="$(timed "DELETE FROM retire_bench.message WHERE published")"
echo "mark:   ${m} ms per batch, then purge of $((BATCHES * 1000)) rows ${p} ms = $(awk "BEGIN { printf \"%.2f\", $m + $p / $BATCHES }") ms per batch"
fill; c="$(per_batch cursor)"; t="$(timed "TRUNCATE retire_bench.message")"
echo "cursor: ${c} ms per batch, then TRUNCATE of 1,000,000 rows ${t} ms"
