"""``make demo``: the whole product on an embedded default, in about a minute.

A local Airflow home (SQLite metadata DB) under ``.airflow/``, a SQLite warehouse seeded with
10,000 generated contacts under ``var/demo/``, the GrowthHub sandbox on a free loopback port,
and two runs of ``growthhub_contact_sync``: the initial load, then a normal hourly run after a
few source rows changed and more were merely touched. Prints what each run did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select

from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess
from growthhub_sync import state
from growthhub_sync.config import load_config
from growthhub_sync.demo import contacts_table, modify_contacts, seed_demo, touch_contacts
from growthhub_sync.orchestration import SYNC_DAG_ID, pool_name

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW_HOME = ROOT / ".airflow"
VAR = ROOT / "var" / "demo"
ROWS = 10_000
CHANGED, TOUCHED = 25, 100
# The demo sandbox and connection allow far more than GrowthHub's 100 requests per 10 s, so
# 10,000 contacts load in seconds; a real location would take about 17 minutes.
DEMO_LIMIT = ["--burst", "100000", "--interval-ms", "1000", "--daily", "10000000"]
TOKEN = "sandbox-demo-token"  # noqa: S105 - the sandbox's documented fake token


def main() -> None:
    started = time.monotonic()
    VAR.mkdir(parents=True, exist_ok=True)
    warehouse = VAR / "warehouse.db"
    env = _airflow_env(warehouse)
    os.environ.update(env)
    config = load_config()
    location = config.locations[0]

    _step(f"Airflow home {AIRFLOW_HOME.relative_to(ROOT)}: migrating the SQLite metadata DB")
    _airflow(["db", "migrate"], "airflow-db-migrate.log")
    _airflow(["pools", "set", pool_name(location.location_id), "4", "GrowthHub demo"], "airflow-pools.log")

    _step(f"Warehouse {warehouse.relative_to(ROOT)}: seeding {ROWS:,} generated contacts")
    warehouse.unlink(missing_ok=True)
    engine = create_engine(f"sqlite:///{warehouse}")
    seed_demo(engine, ROWS)

    with SandboxProcess(args=DEMO_LIMIT) as sandbox:
        admin = SandboxAdmin(sandbox.base_url)
        os.environ["AIRFLOW_CONN_GROWTHHUB_DEFAULT"] = _growthhub_conn(sandbox.base_url, location.location_id)
        _step(f"GrowthHub sandbox on {sandbox.base_url} (location {location.location_id})")

        _step("Run 1: initial load (full_refresh)")
        first = _run_dag(datetime.now(UTC), {"full_refresh": True}, "run1")
        _print_run(engine, config, first, location.name)

        now = datetime.now(UTC)
        keys = _keys(engine, CHANGED + TOUCHED)
        modify_contacts(engine, keys[:CHANGED], now, city="Springfield")
        touch_contacts(engine, now, keys=keys[CHANGED:])
        _step(f"Changed {CHANGED} rows for real and touched {TOUCHED} more (updated_at only)")

        _step("Run 2: the hourly run whose data interval holds those edits")
        second = _run_dag(now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1), {}, "run2")
        summary = _print_run(engine, config, second, location.name)

        contacts = admin.contacts(location.location_id)
        print(f"\nThe sandbox now holds {len(contacts):,} contacts for {location.location_id}.")
        docs = (summary or {}).get("details", {}).get("data_docs")
        if docs:
            print(f"Great Expectations Data Docs: {docs}")
    print(f"Logs of each step: {VAR.relative_to(ROOT)}/*.log. Done in {time.monotonic() - started:.0f} s.")


def _airflow_env(warehouse: Path) -> dict[str, str]:
    return {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_WAREHOUSE_DEFAULT": json.dumps({"conn_type": "sqlite", "host": str(warehouse)}),
    }


def _growthhub_conn(base_url: str, location_id: str) -> str:
    extra = {
        "location_id": location_id,
        "rate_limit_burst": 100_000,
        "rate_limit_interval_ms": 1000,
        "rate_limit_daily": 10_000_000,
    }
    return json.dumps({"conn_type": "growthhub", "host": base_url, "password": TOKEN, "extra": extra})


def _airflow(args: list[str], log_name: str) -> None:
    """Run an Airflow CLI command, its output to a log file; stop the demo if it fails."""
    log = VAR / log_name
    with log.open("w") as out:
        done = subprocess.run(  # noqa: S603 - our own venv's airflow, fixed arguments
            [str(Path(sys.executable).with_name("airflow")), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            check=False,
        )
    if done.returncode != 0:
        sys.exit(f"`airflow {' '.join(args)}` failed; see {log}")


def _run_dag(logical_date: datetime, conf: dict[str, Any], name: str) -> str:
    """``airflow dags test`` one run of the sync DAG; returns its run id."""
    _airflow(
        ["dags", "test", SYNC_DAG_ID, logical_date.isoformat(), "-c", json.dumps(conf)],
        f"{name}.log",
    )
    text = (VAR / f"{name}.log").read_text()
    marker = "run_id="
    line = next(line for line in text.splitlines() if "DagRun Finished" in line)
    run_id = line.split(marker, 1)[1].split(",", 1)[0]
    if "state=success" not in line:
        sys.exit(f"{SYNC_DAG_ID} run {run_id} did not succeed; see {VAR / f'{name}.log'}")
    return run_id


def _print_run(engine: Any, config: Any, run_id: str, location: str) -> dict[str, Any] | None:
    tables = state.state_tables(config.state)
    with engine.connect() as conn:
        row = state.get_run(conn, tables, run_id, location)
    if row is None:
        print(f"  no run row for {run_id}")
        return None
    counts = "  ".join(f"{name} {row[name]:,}" for name in state.RUN_COUNTS)
    print(f"  {counts}")
    details = row.get("details") or {}
    if details.get("displaced"):
        print(f"  displaced {details['displaced']:,} (synced earlier; a newer row took their email/phone)")
    for reason, n in (details.get("reasons") or {}).items():
        print(f"    quarantined/rejected: {n:>5,} x {reason}")
    for message, n in (details.get("messages") or {}).items():
        print(f"    API said:            {n:>5,} x {message}")
    return row


def _keys(engine: Any, n: int) -> list[str]:
    table = contacts_table()
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(select(table.c.id).order_by(table.c.id).limit(n))]


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


if __name__ == "__main__":
    main()
