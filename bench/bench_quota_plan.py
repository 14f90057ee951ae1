"""
Benchmark the plan's quota lookup: what :func:`growthhub_sync.quota.plan_quota` costs per location.

A SQLite warehouse with a day of run rows for N locations (each with a recorded ``daily_remaining``)
and a ``growthhub`` connection in ``AIRFLOW_CONN_GROWTHHUB_DEFAULT`` (local coordination; nothing
is sent). Prints the wall time per location for N in 10, 100 and 1,000.

Usage::

    python bench/bench_quota_plan.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine

from growthhub_sync import quota, state
from growthhub_sync.config import LocationConfig
from growthhub_sync.testing import config_for


def main() -> None:
    conn = {"conn_type": "growthhub", "host": "http://127.0.0.1:9", "password": "bench-token", "extra": {}}
    os.environ["AIRFLOW_CONN_GROWTHHUB_DEFAULT"] = json.dumps(conn)
    work = Path(tempfile.mkdtemp(prefix="bench_quota_"))
    url = f"sqlite:///{work / 'warehouse.db'}"
    engine = create_engine(url)
    tables = state.state_tables(config_for(url, None, work).state)
    state.ensure_state(engine, tables)
    for n in (10, 100, 1000):
        names = [f"loc{i}" for i in range(n)]
        with engine.begin() as c:
            for name in names:
                row = {"run_id": f"old{n}", "location": name, "status": "success", "daily_remaining": 1234}
                state.write_run(c, tables, {**row, "started_at": state.utcnow(), "dry_run": False})
        work_items = {name: (LocationConfig(name=name, location_id=name), 500_000) for name in names}
        started = time.perf_counter()
        forecasts = quota.plan_quota(engine, tables, work_items, run_id="bench")
        elapsed = time.perf_counter() - started
        assert all(f.quota_left == 1234 for f in forecasts.values())
        print(f"{n:>5} locations: {1000 * elapsed:8.1f} ms, {1000 * elapsed / n:.2f} ms per location")


if __name__ == "__main__":
    main()
