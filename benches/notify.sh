#!/usr/bin/env bash
# Why the relay does not NOTIFY per write: measures, with pgbench against the project-local
# PostgreSQL, 8 clients committing `BEGIN; INSERT one 300-byte row; [NOTIFY]; COMMIT`,
# without and with the NOTIFY (which takes a global lock at commit).
#
#   scripts/services up && benches/notify.sh [SECONDS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECS="${1:-15}"
PORT="${OUTBOX_PG_PORT:-55432}"
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
PSQL=("$BIN/psql" -q -h 127.0.0.1 -p "$PORT" -U outbox -d outbox_test)
"${PSQL[@]}" -c "SET client_min_messages = warning; DROP TABLE IF EXISTS notify_bench; CREATE TABLE notify_bench (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text NOT NULL)"
dir="$(mktemp -d)"
printf 'BEGIN;\nINSERT INTO notify_bench (body) VALUES (repeat(%s, 300));\nCOMMIT;\n' "'x'" >"$dir/plain.sql"
printf 'BEGIN;\nINSERT INTO notify_bench (body) VALUES (repeat(%s, 300));\nNOTIFY outbox_bench;\nCOMMIT;\n' "'x'" >"$dir/notify.sql"
for script in plain notify; do
  tps="$("$BIN/pgbench" -n -M prepared -h 127.0.0.1 -p "$PORT" -U outbox -c 8 -j 2 -T "$SECS" -f "$dir/$script.sql" outbox_test 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p')"
  echo "$script: $tps tx/s (8 clients, ${SECS} s)"
done
"${PSQL[@]}" -c "DROP TABLE notify_bench"
rm -rf "$dir"
