#!/usr/bin/env python3
"""The chaos harness's writer in another language: a service that calls the outbox's SQL
API directly, as a non-Rust application would: `outbox.save_message(...)` per message and,
for some transactions, `outbox.enqueue_batch(...)` with all messages at once; some
transactions are rolled back. It follows the harness's protocol (crates/chaos/src/model.rs):
for each entity, in key order, it bumps chaos.entity_seq and records the range in
chaos.ledger inside the same transaction, and every payload carries entity, seq, tx,
writer and the rb flag. It keeps writing through every fault, reconnecting on error, until
SIGTERM; then it prints its statistics as one JSON line on stdout.
"""

import argparse
import json
import os
import random
import signal
import sys
import threading
import time

import psycopg

TAKE_SEQ = """
WITH s AS (UPDATE chaos.entity_seq SET seq = seq + %(k)s WHERE entity = %(e)s RETURNING seq)
INSERT INTO chaos.ledger (entity, seq_lo, seq_hi, tx)
SELECT %(e)s, s.seq - %(k)s + 1, s.seq, %(tx)s FROM s
RETURNING seq_hi
"""

SAVE_MESSAGE = "SELECT outbox.save_message(%s, %s, %s, NULL, 'chaos')"

ENQUEUE_BATCH = """
SELECT * FROM outbox.enqueue_batch(
    %s::text[], %s::text[], %s::bytea[], %s::bytea[], %s::int4[], %s::text[],
    %s::int4[], %s::int4[], %s::text[], %s::bytea[])
"""


def log(message):
    print(f"[py-writer] {message}", file=sys.stderr, flush=True)


class Writer(threading.Thread):
    """One connection, one transaction at a time, until told to stop."""

    def __init__(self, name, args, seed, stop):
        super().__init__(name=name, daemon=True)
        self.args = args
        self.rng = random.Random(seed)
        self.stop = stop
        self.stats = {
            "committed_tx": 0,
            "committed_messages": 0,
            "rolled_back_tx": 0,
            "batch_calls": 0,
            "failed_tx": 0,
            "unknown_commits": 0,
            # enqueue_batch returned fewer ids than messages given: a caller that trusts
            # it would commit without the missing messages.
            "short_batches": 0,
            "short_batch_missing": 0,
            "connects": 0,
            "async_commits": 0,
            "unexpected_errors": 0,
        }

    def run(self):
        conn = None
        backoff = 0.05
        counter = 0
        deadline = time.monotonic() + self.args.max_seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            if conn is None or conn.closed:
                try:
                    conn = psycopg.connect(self.args.dsn, connect_timeout=5)
                    self.stats["connects"] += 1
                    backoff = 0.05
                except psycopg.Error:
                    conn = None
                    self.stop.wait(backoff)
                    # Back faster than the relays after a crash (see writers.rs).
                    backoff = min(backoff * 2, 0.25)
                    continue
            counter += 1
            try:
                self.transaction(conn, f"{self.name}-{counter}")
            except psycopg.Error as e:
                # Connection lost, server shutting down, ...: the database decides what
                # committed; get a fresh connection if this one is gone.
                if conn.closed or conn.broken:
                    conn = None
                else:
                    try:
                        conn.rollback()
                    except psycopg.Error:
                        conn = None
                if not isinstance(e, psycopg.OperationalError):
                    self.stats["unexpected_errors"] += 1
                    log(f"{self.name}: {type(e).__name__}: {e}")
            if self.args.pause_ms > 0:
                self.stop.wait(self.rng.uniform(0, self.args.pause_ms) / 1000)
        if conn is not None and not conn.closed:
            conn.close()

    def transaction(self, conn, token):
        rng = self.rng
        rollback = rng.random() < 0.12
        # Mostly enqueue_batch: the call whose result a naive caller trusts.
        batch = rng.random() < 0.7
        count = min(self.args.entities, rng.randint(1, 6))
        picked = sorted(rng.sample(range(self.args.entities), count))
        messages = []  # (topic, entity, payload bytes)
        # The harness asks for asynchronous commits for a few seconds before a crash.
        asynchronous = bool(self.args.async_flag) and os.path.exists(self.args.async_flag)
        with conn.cursor() as cur:
            if asynchronous:
                cur.execute("SET LOCAL synchronous_commit = off")
            # Key order: the lock order every writer uses, so writers do not deadlock.
            for i in picked:
                entity = f"e{i:03d}"
                k = rng.randint(1, 3)
                cur.execute(TAKE_SEQ, {"k": k, "e": entity, "tx": token})
                (hi,) = cur.fetchone()
                for seq in range(hi - k + 1, hi + 1):
                    payload = {"entity": entity, "seq": seq, "tx": token,
                               "writer": self.name, "rb": rollback, "async": asynchronous}
                    messages.append((rng.choice(self.args.topics), entity,
                                     json.dumps(payload, separators=(",", ":")).encode()))
            if batch:
                n = len(messages)
                cur.execute(ENQUEUE_BATCH, (
                    [m[0] for m in messages], [m[1] for m in messages],
                    [m[2] for m in messages], [None] * n, [None] * n, ["chaos"] * n,
                    [0] * n, [0] * n, [], []))
                ids = cur.fetchall()
                self.stats["batch_calls"] += 1
                if len(ids) != n:
                    self.stats["short_batches"] += 1
                    self.stats["short_batch_missing"] += n - len(ids)
                    log(f"{self.name} {token}: enqueue_batch returned {len(ids)} ids for {n} messages")
            else:
                for topic, entity, payload in messages:
                    cur.execute(SAVE_MESSAGE, (topic, entity, payload))
        if rollback:
            conn.rollback()
            self.stats["rolled_back_tx"] += 1
            return
        try:
            conn.commit()
        except psycopg.Error:
            self.stats["unknown_commits"] += 1
            raise
        self.stats["committed_tx"] += 1
        self.stats["committed_messages"] += len(messages)
        if asynchronous:
            self.stats["async_commits"] += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--topics", required=True, help="comma-separated")
    parser.add_argument("--entities", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--pause-ms", type=float, default=20)
    parser.add_argument("--max-seconds", type=float, required=True,
                        help="stop by itself after this long, even without SIGTERM")
    parser.add_argument("--name", default="py")
    parser.add_argument("--async-flag", default="",
                        help="commit with synchronous_commit = off while this file exists")
    args = parser.parse_args()
    args.topics = args.topics.split(",")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    writers = [Writer(f"{args.name}-{i}", args, args.seed * 1000 + i, stop)
               for i in range(args.threads)]
    for w in writers:
        w.start()
    # Short joins, so the main thread keeps handling signals.
    while any(w.is_alive() for w in writers):
        for w in writers:
            w.join(0.2)
    total = {}
    for w in writers:
        for k, v in w.stats.items():
            total[k] = total.get(k, 0) + v
    print(json.dumps(total), flush=True)


if __name__ == "__main__":
    main()
