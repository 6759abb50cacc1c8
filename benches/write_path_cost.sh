#!/usr/bin/env bash
# What the checks added to the SQL write path cost: the same writes through the functions of
# two schema versions, side by side on the same server, in alternating rounds (so load from
# anything else hits both alike). "before" is a schema at migration 0002 (the functions before
# issue 8 and 13), "after" at the newest migration (entity-key and header checks, the mapping's
# last-use refresh, the settings row read once per call, the record size check).
#
# Workloads (8 clients for single saves, 4 for batches; durable commits; entities from 10,000):
#   single: BEGIN; SELECT enqueue(300-byte message); COMMIT
#   batch:  BEGIN; SELECT enqueue_batch(100 x 300-byte messages); COMMIT
#
#   scripts/services up && benches/write_path_cost.sh [SECONDS_PER_ROUND] [ROUNDS]
# WP_BEFORE=N compares migration N instead of 0002 with the newest (e.g. WP_BEFORE=4: what
# migration 0005's SECURITY DEFINER functions cost).
set -euo pipefail
SECS="${1:-10}"
ROUNDS="${2:-3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${OUTBOX_PG_PORT:-55432}"
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
PSQL=("$BIN/psql" -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U outbox -d outbox_test)

make_schema() { # make_schema NAME LAST_MIGRATION_NUMBER
  "${PSQL[@]}" -c "SET client_min_messages = warning; DROP SCHEMA IF EXISTS $1 CASCADE; CREATE SCHEMA $1;"
  for f in "$ROOT"/migrations/*.sql; do
    n="$(basename "$f" | cut -c1-4)"
    if [ "$((10#$n))" -le "$2" ]; then
      sed "s/@schema@/$1/g" "$f" | "${PSQL[@]}" >/dev/null
    fi
  done
}
last="$(ls "$ROOT"/migrations/*.sql | tail -n 1 | xargs basename | cut -c1-4)"
make_schema bench_wp_before "${WP_BEFORE:-2}"
make_schema bench_wp_after "$((10#$last))"

dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
cat >"$dir/single.sql" <<'SQL'
\set e random(0, 9999)
BEGIN;
SELECT :schema.enqueue('orders', 'order-' || :e, convert_to(repeat('x', 300), 'UTF8'), NULL, NULL, NULL, NULL, NULL);
COMMIT;
SQL
cat >"$dir/batch.sql" <<'SQL'
BEGIN;
SELECT count(*) FROM :schema.enqueue_batch(
  array_fill('orders'::text, ARRAY[100]),
  ARRAY(SELECT 'order-' || (random() * 9999)::int FROM generate_series(1, 100)),
  array_fill(convert_to(repeat('x', 300), 'UTF8'), ARRAY[100]),
  array_fill(NULL::bytea, ARRAY[100]), array_fill(NULL::int, ARRAY[100]),
  array_fill(NULL::text, ARRAY[100]), array_fill(0, ARRAY[100]), array_fill(0, ARRAY[100]),
  '{}'::text[], '{}'::bytea[]);
COMMIT;
SQL
run() { # run WORKLOAD SCHEMA CLIENTS -> transactions/s
  # The schema is an identifier, not a parameter: one script per schema keeps -M prepared.
  sed "s/:schema/$2/g" "$dir/$1.sql" >"$dir/$1-$2.sql"
  "$BIN/pgbench" -n -M prepared -h 127.0.0.1 -p "$PORT" -U outbox -c "$3" -j 2 -T "$SECS" \
    -f "$dir/$1-$2.sql" outbox_test 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
for workload in single batch; do
  clients=8; per_tx=1
  if [ "$workload" = batch ]; then clients=4; per_tx=100; fi
  for round in $(seq 1 "$ROUNDS"); do
    for schema in bench_wp_before bench_wp_after; do
      tps="$(run "$workload" "$schema" "$clients")"
      printf '%s round %s %-16s %8.0f tx/s %9.0f messages/s\n' "$workload" "$round" "${schema#bench_wp_}" \
        "$tps" "$(awk "BEGIN { print $tps * $per_tx }")"
    done
  done
done
"${PSQL[@]}" -c "SET client_min_messages = warning; DROP SCHEMA bench_wp_before CASCADE; DROP SCHEMA bench_wp_after CASCADE;"
