"""
Benchmark the fleet's plan: what a quiet location costs (the target is at most 50 ms of CPU each).

A SQLite warehouse of demo contacts whose ``location_id`` column names a few active locations; the
directory adds N quiet installed locations (no row in the window). For N in 0, 100, 1,000 and
10,000 it times :func:`growthhub_sync.fleet.plan_fleet` (a dry run: no run rows) and counts its SQL
statements, then prints the CPU per quiet location over the N = 0 baseline.

Usage::

    python bench/bench_fleet_plan.py                # 2,000 rows, 5 active locations
    python bench/bench_fleet_plan.py --rows 20000 --active 50
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, event, text

from growthhub_sync.config import SyncConfig
from growthhub_sync.demo import seed_demo
from growthhub_sync.fleet import KnownLocation, plan_fleet
from growthhub_sync.pipeline import SyncOptions
from growthhub_sync.testing import config_for

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = {"start": T0.isoformat(), "end": (T0 + timedelta(days=1)).isoformat()}


def _config(url: str, work: Path) -> SyncConfig:
    data = config_for(url, None, work).model_dump(by_alias=True, exclude_none=True)
    data.pop("location_routing")
    data["locations"] = {"from_column": "location_id", "conn_id": "growthhub_agency"}
    return SyncConfig.model_validate(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--active", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_fleet_"))
    url = f"sqlite:///{work / 'warehouse.db'}"
    engine = create_engine(url)
    seed_demo(engine, args.rows, start=T0, bad_share=0.0)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE crm_contacts ADD COLUMN location_id TEXT"))
        conn.execute(text(f"UPDATE crm_contacts SET location_id = 'active_' || (rowid % {args.active})"))
    config = _config(url, work)
    active = [KnownLocation(f"active_{i}") for i in range(args.active)]
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    dry = SyncOptions(dry_run=True)
    plan_fleet(config, WINDOW, dry, engine=engine, directory=lambda _: active)  # warm-up: state tables
    baseline = None
    print(f"{'quiet':>7} {'cpu ms':>9} {'wall ms':>9} {'queries':>8} {'cpu ms / quiet':>15}")
    for quiet in (0, 100, 1000, 10000):
        directory = [*active, *(KnownLocation(f"quiet_{i}") for i in range(quiet))]
        statements.clear()
        cpu, wall = time.process_time(), time.perf_counter()
        plan_fleet(config, WINDOW, dry, engine=engine, directory=lambda _, d=directory: d)
        cpu_ms, wall_ms = 1000 * (time.process_time() - cpu), 1000 * (time.perf_counter() - wall)
        baseline = cpu_ms if baseline is None else baseline
        per = (cpu_ms - baseline) / quiet if quiet else 0.0
        print(f"{quiet:>7} {cpu_ms:>9.1f} {wall_ms:>9.1f} {len(statements):>8} {per:>15.4f}")


if __name__ == "__main__":
    main()
