"""The plan-time identity pass (:func:`growthhub_sync.winners.plan_winners`) on a first load.

Each size seeds a fresh PostgreSQL schema with the demo's generator (5 % bad rows, so about
2.5 % are the same person again under another key, older or newer), creates the state tables
and runs the pass as the plan does, in a process of its own (its peak memory is the pass's).
Printed per size: wall time, the PostgreSQL backends' CPU per row (``/proc/<pid>/stat`` of the
pass's connections: the server runs on this machine), the client's CPU per row, its peak RSS, the
identities and losers found, and what a batch pays to read its losers (one primary-key probe per
key, a chunk of 5,000 keys at a time).

    python bench/bench_identity_pass.py                    # 100k rows
    python bench/bench_identity_pass.py --rows 10000,200000,1000000
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
from typing import Any

from bench_first_sync import Probe
from bench_sync import DAY, PG_URL, T0, _config, _peak_rss_mb
from sqlalchemy import create_engine, text

from growthhub_sync.demo import seed_demo

CHUNK = 5000


def child(args: argparse.Namespace) -> None:
    """The pass over the seeded schema, measured; then the batches' probes of its losers."""
    from growthhub_sync import state, winners
    from growthhub_sync.extract import Window

    cfg = _config(args.url, args.schema, Path(args.work), CHUNK)
    engine = create_engine(args.url)
    probe = Probe(engine)  # before the first connection: it records each backend's pid on connect
    state.ensure_state(engine, state.state_tables(cfg.state))
    cpu, started = os.times(), time.perf_counter()
    found = winners.plan_winners(
        cfg, cfg.location("default"), engine, Window.from_dict(DAY), run_id="bench", full_refresh=False
    )
    wall, client = time.perf_counter() - started, os.times()
    tables = state.state_tables(cfg.state)
    planned = winners.PlannedLosers(tables, "bench", "default")
    with engine.connect() as conn:
        keys = list(conn.execute(text(f'SELECT id FROM "{args.schema}".crm_contacts ORDER BY id')).scalars())
        probe_started = time.perf_counter()
        held = sum(len(planned.winners_of(conn, keys[i : i + CHUNK])) for i in range(0, len(keys), CHUNK))
        probe_s = time.perf_counter() - probe_started
        assert held == found.losers, (held, found.losers)
    rows = found.rows
    print(
        json.dumps(
            {
                "rows": rows,
                "identities": found.identities,
                "losers": found.losers,
                "left_to_batches": found.left_to_batches,
                "wall_s": round(wall, 2),
                "wall_us_per_row": round(1e6 * wall / rows, 1),
                "db_cpu_us_per_row": round(1e6 * probe.backend_cpu() / rows, 1),
                "client_cpu_us_per_row": round(
                    1e6 * (client.user + client.system - cpu.user - cpu.system) / rows, 1
                ),
                "peak_rss_mb": round(_peak_rss_mb()),
                "batch_probe_ms_per_chunk": round(1e3 * probe_s / max(1, -(-len(keys) // CHUNK)), 2),
            }
        )
    )


def run_size(rows: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Seed a fresh schema with ``rows``, measure the pass in a child process, drop the schema."""
    schema = f"bench_winners_{uuid.uuid4().hex[:8]}"
    engine = create_engine(args.url)
    try:
        seed_demo(engine, rows, schema=schema, start=T0, bad_share=0.05)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--url",
            args.url,
            "--schema",
            schema,
            "--work",
            str(work),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="100000", help="comma-separated sizes (default 100000)")
    parser.add_argument("--url", default=PG_URL)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.rows.split(",")):
            print(json.dumps(run_size(n, args, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
