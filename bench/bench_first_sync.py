"""First-sync cost per row as the state tables fill (issue: identity lookups on stale statistics).

A first sync writes one ledger row and about two identity rows per source row, while the planner
still has the statistics taken when the tables were empty or small (autovacuum lags, or is off).
A lookup that stops using the primary key then costs more with every chunk. Each size runs the
real case in a fresh PostgreSQL schema: a pilot run of the first ``--pilot`` rows, finalised
(which analyses the state tables while they are small), then the first sync of the other rows in
one batch with the fake upserter of ``bench_sync.py``. Printed per size: wall time, the
PostgreSQL backends' CPU per row (from ``/proc/<pid>/stat`` of the run's connections: the server
runs on this machine) and the client's, and the identity lookups' time per chunk (the
``SELECT ... FOR UPDATE`` of :meth:`StateStore.owners_of`) over the first and the last chunks.

    python bench/bench_first_sync.py                          # 10k, 100k, 500k, 1M rows
    python bench/bench_first_sync.py --rows 10000,100000      # chosen sizes
    python bench/bench_first_sync.py --quick                  # 10k and 50k rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from statistics import mean
from typing import Any

from bench_sync import DAY, PG_URL, T0, FakeUpserter, _config
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

from growthhub_sync.demo import seed_demo

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
EDGE_CHUNKS = 5  # chunks averaged at the start and at the end of the run


def _backend_cpu_seconds(pid: int) -> float:
    """User + system CPU of a PostgreSQL backend process (fields 14 and 15 of ``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Probe:
    """Watches an engine: its backends' CPU, and the identity lookups' time per chunk.

    A chunk ends with its ledger write (one ``INSERT`` per chunk), which closes its bucket.
    """

    def __init__(self, engine: Engine) -> None:
        self.backends: dict[int, float] = {}  # pid → CPU seconds when first seen
        self.chunks: list[float] = []
        self._lookups = 0.0
        self._started: dict[int, float] = {}
        event.listen(engine, "connect", self._connected)
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _connected(self, dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
        self.backends[pid] = _backend_cpu_seconds(pid)

    def _before(self, _conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        self._started[id(cursor)] = time.perf_counter()

    def _after(self, _conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        took = time.perf_counter() - self._started.pop(id(cursor), time.perf_counter())
        if (
            statement.startswith("SELECT")
            and "growthhub_identities" in statement
            and "FOR UPDATE" in statement
        ):
            self._lookups += took
        elif statement.startswith("INSERT INTO") and "growthhub_sync_ledger" in statement:
            self.chunks.append(self._lookups)
            self._lookups = 0.0

    def mark(self) -> None:
        """Start counting CPU from now (connections opened before keep their CPU so far)."""
        self.backends = {pid: _backend_cpu_seconds(pid) for pid in self.backends}
        self.chunks = []

    def backend_cpu(self) -> float:
        return sum(_backend_cpu_seconds(pid) - was for pid, was in self.backends.items())


def child(args: argparse.Namespace) -> None:
    """One size: the pilot run (analysed small), then the first sync of the rest, measured."""
    from growthhub_sync.extract import KeyRange
    from growthhub_sync.pipeline import SyncOptions, finalize_run, plan_sync, sync_batch

    cfg = _config(args.url, args.schema, Path(args.work), args.batch_size)
    engine = create_engine(args.url)
    probe = Probe(engine)
    pilot = SyncOptions(run_id="pilot")
    plan = plan_sync(
        cfg, "default", DAY, engine=engine, options=pilot, batch_rows=args.pilot, check_connection=False
    )
    first = KeyRange.from_dict(plan["batches"][0])
    summary = sync_batch(cfg, "default", DAY, first, pilot, engine=engine, upserter=FakeUpserter())
    finalize_run(
        cfg, "default", DAY, [summary], pilot, engine=engine, upserter=FakeUpserter(), build_docs=False
    )

    opts = SyncOptions(run_id="first-sync")
    plan_sync(cfg, "default", DAY, engine=engine, options=opts, batch_rows=10**12, check_connection=False)
    probe.mark()
    cpu, started = os.times(), time.perf_counter()
    out = sync_batch(cfg, "default", DAY, KeyRange(lo=first.hi), opts, engine=engine, upserter=FakeUpserter())
    wall, client = time.perf_counter() - started, os.times()
    rows = out["extracted"]
    chunks = probe.chunks
    print(
        json.dumps(
            {
                "rows": rows,
                "wall_s": round(wall, 2),
                "rows_per_s": round(rows / wall),
                "db_cpu_us_per_row": round(1e6 * probe.backend_cpu() / rows, 1),
                "client_cpu_us_per_row": round(
                    1e6 * (client.user + client.system - cpu.user - cpu.system) / rows, 1
                ),
                "chunks": len(chunks),
                "lookup_ms_per_chunk_first": round(1e3 * mean(chunks[:EDGE_CHUNKS]), 1),
                "lookup_ms_per_chunk_last": round(1e3 * mean(chunks[-EDGE_CHUNKS:]), 1),
            }
        )
    )


def run_size(rows: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Seed a fresh schema with ``rows`` + the pilot's rows, measure in a child process, drop it."""
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    engine = create_engine(PG_URL)
    try:
        seed_demo(engine, rows + args.pilot, schema=schema, start=T0)
        cmd = [sys.executable, __file__, "--child", "--url", PG_URL, "--schema", schema, "--work", str(work)]
        cmd += ["--batch-size", str(args.batch_size), "--pilot", str(args.pilot)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            sys.stderr.write(res.stderr[-4000:])
            raise SystemExit(f"{rows} rows failed")
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="10000,100000,500000,1000000", help="comma-separated sizes")
    p.add_argument("--quick", action="store_true", help="10k and 50k rows")
    p.add_argument("--batch-size", type=int, default=5000)
    p.add_argument("--pilot", type=int, default=2000, help="rows of the pilot run analysed while small")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--schema", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    if args.child:
        child(args)
        return
    sizes = [10_000, 50_000] if args.quick else [int(n) for n in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_first_sync_") as tmp:
        for rows in sizes:
            print(json.dumps(run_size(rows, args, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
