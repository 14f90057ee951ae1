"""Benchmark of the GrowthHub page for an agency (``locations.from_column``): 300 discovered locations.

Fills a fresh PostgreSQL schema with ``--rows`` open quarantine rows (plus a sixth as many
resolved ones) spread over ``--locations`` locations, API rejections in a third of them only,
and ``--runs`` hourly runs per location. Then times, the median of 7 after a warm-up:

- finding the locations: the loose index scans the page runs (:func:`open_pairs`,
  :func:`run_locations`) against the plain DISTINCT they replace;
- ``quarantine_page`` reading only the ranges of (location, stage) pairs holding open rows
  against all 2 x 300 ranges;
- the two pages through the app (HTML rendered), with their size.

    python bench/bench_page_locations.py                       # 1M open rows, 300 locations, 720 runs each
    python bench/bench_page_locations.py --rows 100000 --runs 48

The schema is dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from bench_quarantine_page import PG_URL, median_ms
from sqlalchemy import create_engine, text

from growthhub_operator.queries import QuarantineFilter, open_pairs, quarantine_page, run_locations
from growthhub_sync.config import CONFIG_ENV, load_config
from growthhub_sync.outcomes import RUN_COUNTS
from growthhub_sync.state import ensure_state, state_tables

FILL_QUARANTINE = """
INSERT INTO {table} (location, source_key, stage, http_status, errors, reason_codes, payload,
                     first_seen_at, last_seen_at, attempts, status)
SELECT 'loc-' || lpad((g % :locations)::text, 3, '0'),
       'k' || g,
       CASE WHEN g % 33 = 0 AND g % :locations < :locations / 3 THEN 'api' ELSE 'quality' END,
       CASE WHEN g % 33 = 0 AND g % :locations < :locations / 3 THEN 422 END,
       json_build_array('email: not a valid address'),
       CASE WHEN g % 33 = 0 AND g % :locations < :locations / 3 THEN 'api_422' ELSE 'email_invalid' END,
       json_build_object('firstName', 'Name' || g, 'email', 'user' || g || '@example.com'),
       now() - (:n - g) * interval '1 second',
       now() - (:n - g) * interval '1 second',
       1,
       CASE WHEN g % 7 = 0 THEN 'resolved' ELSE 'open' END
FROM generate_series(1, :n) AS g
"""
FILL_RUNS = """
INSERT INTO {table} (run_id, location, dag_id, status, dry_run, full_refresh, {counts}, warnings,
                     batches, started_at, finished_at)
SELECT 'scheduled__' || r, 'loc-' || lpad(l::text, 3, '0'), 'growthhub_contact_sync', 'success',
       false, false, {values}, 0, 1,
       now() - r * interval '1 hour', now() - r * interval '1 hour' + interval '2 minutes'
FROM generate_series(1, :runs) AS r, generate_series(0, :locations - 1) AS l
"""
RUN_ROW = {"extracted": 100, "unchanged": 95, "quarantined": 5}
"""A run's counts; the other outcomes are 0."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="open quarantine rows (default 1M)")
    parser.add_argument("--locations", type=int, default=300)
    parser.add_argument("--runs", type=int, default=720, help="runs per location (default 30 days hourly)")
    args = parser.parse_args()
    total = args.rows * 7 // 6  # every 7th row is resolved
    schema = f"bench_locs_{uuid.uuid4().hex[:8]}"
    engine = create_engine(PG_URL)
    tables = state_tables(load_config().state.model_copy(update={"schema_": schema}))
    ensure_state(engine, tables)
    try:
        started = time.perf_counter()
        with engine.begin() as conn:
            fill = {"n": total, "locations": args.locations, "runs": args.runs}
            conn.execute(text(FILL_QUARANTINE.format(table=f'"{schema}".growthhub_quarantine')), fill)
            counts = {name: RUN_ROW.get(name, 0) for name in RUN_COUNTS}
            runs_sql = FILL_RUNS.format(
                table=f'"{schema}".growthhub_sync_runs',
                counts=", ".join(counts),
                values=", ".join(map(str, counts.values())),
            )
            conn.execute(text(runs_sql), fill)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            both = f'"{schema}".growthhub_quarantine, "{schema}".growthhub_sync_runs'
            conn.execute(text(f"VACUUM ANALYZE {both}"))
        print(
            f"{args.rows:,} open quarantine rows, {args.locations * args.runs:,} run rows, "
            f"{args.locations} locations, written in {time.perf_counter() - started:.0f} s\n"
        )

        def query(fn: Callable[[Any], Any]) -> Callable[[], Any]:
            def run() -> Any:
                with engine.connect() as conn:
                    return fn(conn)

            return run

        distinct_open = text(
            f"SELECT DISTINCT location, stage FROM \"{schema}\".growthhub_quarantine WHERE status = 'open'"
        )
        distinct_runs = text(f'SELECT DISTINCT location FROM "{schema}".growthhub_sync_runs')
        with engine.connect() as conn:
            held = set(open_pairs(conn, tables))
        locations = sorted({loc for loc, _ in held})
        print(f"{'finding the locations':<52}{'median ms':>10}")
        for name, fn in [
            (f"open_pairs: loose index scan ({len(held)} pairs)", query(lambda c: open_pairs(c, tables))),
            ("  plain DISTINCT of open (location, stage)", query(lambda c: c.execute(distinct_open).all())),
            ("run_locations: loose index scan", query(lambda c: run_locations(c, tables))),
            ("  plain DISTINCT location of runs", query(lambda c: c.execute(distinct_runs).all())),
        ]:
            print(f"{name:<52}{median_ms(fn):>10.1f}")

        print(f"\n{'quarantine_page, one page of 50 rows':<52}{'median ms':>10}")
        for label, where in [
            ("no filter", QuarantineFilter()),
            ("stage=api (in a third of the locations)", QuarantineFilter(stage="api")),
            ("code=api_422", QuarantineFilter(code="api_422")),
        ]:
            for ranges, pairs in [("held pairs only", held), ("all 2 x locations", None)]:
                fn = query(lambda c, w=where, p=pairs: quarantine_page(c, tables, locations, w, held=p))
                print(f"{label + ', ' + ranges:<52}{median_ms(fn):>10.1f}")

        _pages(schema, args.locations)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def _pages(schema: str, locations: int) -> None:
    """The two pages through the app, as a logged-in user, config from ``$GROWTHHUB_SYNC_CONFIG``."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.testclient import TestClient

    from growthhub_operator import access
    from growthhub_operator.app import create_app, replay_allowed

    data = load_config().model_dump(by_alias=True, exclude_none=True)
    data.pop("location_routing", None)
    data["source"] = {**data["source"], "url": PG_URL}
    data["locations"] = {"from_column": "location_id", "conn_id": "growthhub_agency"}
    data["state"] = {"schema": schema, "prefix": ""}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sync.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        os.environ[CONFIG_ENV] = str(path)
        app = create_app()
        app.dependency_overrides[access.can_read_runs] = lambda: None
        app.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username="ops", role="user")
        app.dependency_overrides[replay_allowed] = lambda: True
        with TestClient(app) as client:
            print(f"\n{f'pages through the app ({locations} locations)':<52}{'median ms':>10}{'KB':>8}")
            for url in ("/quarantine", "/quarantine?stage=api", "/", "/api/runs?limit=5"):
                size = len(client.get(url).content) // 1024
                print(f"GET {url:<48}{median_ms(lambda u=url: client.get(u), repeat=3):>10.1f}{size:>8,}")


if __name__ == "__main__":
    main()
