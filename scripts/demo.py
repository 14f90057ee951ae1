"""``make demo``: the whole product on an embedded default, run by Airflow's scheduler; ``make ui``.

``make demo``: a local Airflow home (SQLite metadata DB) under ``.airflow/``, a SQLite warehouse
seeded with 10,000 generated contacts under ``var/demo/``, the GrowthHub sandbox on a free loopback
port, Airflow's API server, scheduler and DAG processor (LocalExecutor), and two runs of
``growthhub_contact_sync`` triggered through Airflow's REST API: the initial load, then the hourly
run of the last complete hour after a few source rows changed in it and more were merely touched.
Prints what each run did. The runs, their task logs and notes stay in the home for ``make ui``.

``make demo LOCATIONS=N`` (``--locations N``): the same as an agency of N locations, the table
routed to them by a ``location_id`` column (scripts/demo_agency.py); each run is printed per location.

``make ui`` (``demo.py ui``): the same processes and the sandbox (its contacts kept from the
demo) on the demo's home until Ctrl-C; prints the URL and the login.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from demo_agency import AgencyDemo, print_locations, write_config
from demo_airflow import AirflowApi, AirflowProcesses, DemoHome, local_url, port_is_free, run_cli, running
from sqlalchemy import ColumnElement, Engine, create_engine, select, true

from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess
from growthhub_sync import state
from growthhub_sync.config import SyncConfig, load_config
from growthhub_sync.demo import contacts_table, modify_contacts, seed_demo, touch_contacts
from growthhub_sync.orchestration import SYNC_DAG_ID

ROOT = Path(__file__).resolve().parent.parent
ROWS = 10_000
CHANGED, TOUCHED = 25, 100
# The demo sandbox and connection allow far more than GrowthHub's 100 requests per 10 s, so
# 10,000 contacts load in seconds; a real location would take about 17 minutes.
DEMO_LIMIT = ["--burst", "100000", "--interval-ms", "1000", "--daily", "10000000"]
TOKEN = "sandbox-demo-token"  # noqa: S105 - the sandbox's documented fake token
RUN_TIMEOUT_S = 600


class Demo:
    """Where the demo keeps things: ``.airflow/`` (the Airflow home) and ``var/demo/`` under ``workdir``.

    Airflow's processes run in ``workdir`` too: the sync config's relative paths (``var/gx``) land there.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.home = DemoHome(workdir / ".airflow", ROOT)
        self.var = workdir / "var" / "demo"
        self.warehouse = self.var / "warehouse.db"
        self.sandbox_state = self.var / "sandbox.db"
        # written by an agency demo only: `make ui` serves what the last demo made
        self.agency_file = self.var / "agency.json"
        self.sync_config = self.var / "sync-config.yaml"

    def sandbox(self) -> SandboxProcess:
        """The sandbox, its contacts kept in ``var/demo/sandbox.db`` for ``make ui``."""
        return SandboxProcess(args=[*DEMO_LIMIT, "--state", str(self.sandbox_state)])

    def agency(self) -> AgencyDemo | None:
        """The agency the last demo made, if it ran as one."""
        return AgencyDemo.load(self.agency_file) if self.agency_file.exists() else None

    def env(self, sandbox_url: str, agency: AgencyDemo | None) -> dict[str, str]:
        """The connections of Airflow's processes; an agency's, and the config routing to it."""
        limits = {"rate_limit_burst": 100_000, "rate_limit_interval_ms": 1000, "rate_limit_daily": 10_000_000}
        growthhub = {"conn_type": "growthhub", "host": sandbox_url, "password": TOKEN, "extra": limits}
        location = {**growthhub, "extra": {"location_id": load_config().locations[0].location_id, **limits}}
        warehouse = {"conn_type": "sqlite", "host": str(self.warehouse)}
        return {
            "AIRFLOW_CONN_GROWTHHUB_DEFAULT": json.dumps(location),
            "AIRFLOW_CONN_WAREHOUSE_DEFAULT": json.dumps(warehouse),
            **(agency.env(growthhub, self.sync_config) if agency else {}),
        }

    def print_login(self, port: int) -> None:
        print(f"  Airflow UI: {local_url(port)}  (login admin / {self.home.password()};", end=" ")
        print(f"the password is in {_shown(self.home.password_file, self.workdir)})")
        print(f"  GrowthHub page: {local_url(port)}/growthhub/")


def main(workdir: Path, port: int, rows: int, locations: int | None) -> None:
    started = time.monotonic()
    demo = Demo(workdir)
    _require_free(port)
    demo.var.mkdir(parents=True, exist_ok=True)
    demo.agency_file.unlink(missing_ok=True)
    demo.sync_config.unlink(missing_ok=True)

    _step(f"Airflow home {_shown(demo.home.path, workdir)}: a fresh SQLite metadata DB")
    demo.home.reset(port)
    run_cli(demo.home.env(port, {}), ["db", "migrate"], demo.var / "airflow-db-migrate.log")

    _step(f"Warehouse {_shown(demo.warehouse, workdir)}: seeding {rows:,} generated contacts")
    demo.warehouse.unlink(missing_ok=True)
    engine = create_engine(f"sqlite:///{demo.warehouse}")
    seed_demo(engine, rows)

    demo.sandbox_state.unlink(missing_ok=True)
    with demo.sandbox() as sandbox:
        _step(f"GrowthHub sandbox on {sandbox.base_url}")
        admin = SandboxAdmin(sandbox.base_url)
        agency = _agency(demo, admin, engine, locations) if locations else None
        config = load_config(demo.sync_config if agency else None)
        _step("Airflow: API server, scheduler and DAG processor (LocalExecutor)")
        with running(demo.home, port, demo.env(sandbox.base_url, agency), workdir, demo.var) as airflow:
            api = AirflowApi(demo.home, port)
            airflow.wait_until(f"DAG {SYNC_DAG_ID}", lambda: api.has_dag(SYNC_DAG_ID))
            api.call("POST", "/pools", {"name": config.shards.pool, "slots": 4})

            details = _two_runs(api, airflow, engine, config, agency)

        if agency:
            agency.print_contacts(admin)
        else:
            location_id = config.locations[0].location_id
            print(f"\nThe sandbox now holds {len(admin.contacts(location_id)):,} contacts for {location_id}.")
    docs = details.get("data_docs")
    if docs:
        print(f"Great Expectations Data Docs: {docs}")
    logs = _shown(demo.home.log_folder, workdir)
    print(f"Task logs: {logs}/; the demo's own steps: {_shown(demo.var, workdir)}/*.log.")
    print(f"Done in {time.monotonic() - started:.0f} s. To look at the runs, their logs and notes: make ui")
    demo.print_login(port)


def ui(workdir: Path, port: int) -> None:
    """Serve the demo's home until Ctrl-C: API server (the UI), scheduler, DAG processor, sandbox."""
    demo = Demo(workdir)
    if not demo.home.db.exists():
        sys.exit("No demo home yet: run `make demo` first.")
    _require_free(port)
    agency = demo.agency()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop like Ctrl-C: the processes with us
    with (
        demo.sandbox() as sandbox,
        running(demo.home, port, demo.env(sandbox.base_url, agency), workdir, demo.var) as airflow,
    ):
        print("The demo's Airflow is up; Ctrl-C stops it.")
        demo.print_login(port)
        print(f"  Logs of Airflow's processes: {_shown(demo.var, workdir)}/<process>.log")
        try:
            while True:
                airflow.check_alive()
                time.sleep(1)
        except KeyboardInterrupt:
            print("\nStopping.")


def _agency(demo: Demo, admin: SandboxAdmin, engine: Engine, locations: int) -> AgencyDemo:
    """The sandbox's agency, the warehouse rows spread over its locations, the config routing them."""
    agency = AgencyDemo.create(admin, locations)
    agency.save(demo.agency_file)
    unknown = agency.spread(engine)
    write_config(demo.sync_config)
    _step(
        f"Agency {agency.agency.company_id}: {locations} locations with the app installed, 1 without "
        f"({agency.uninstalled}); rows spread over all {locations + 1} in column location_id, "
        f"{len(unknown)} naming an unknown one; sync config {_shown(demo.sync_config, demo.workdir)}"
    )
    return agency


def _two_runs(
    api: AirflowApi, airflow: AirflowProcesses, engine: Engine, config: SyncConfig, agency: AgencyDemo | None
) -> dict[str, Any]:
    """The initial load, a few edits, the hourly run of the last complete hour; its details."""
    _step("Run 1: initial load (full_refresh)")
    _run_dag(api, airflow, "demo_initial_load", datetime.now(UTC), {"full_refresh": True})
    _report(engine, config, "demo_initial_load", agency)

    # the hourly run of the last complete hour (a logical date in the past, as the scheduler's
    # own runs have), so the edits are stamped inside that hour
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    edited = hour - timedelta(minutes=30)
    keys = _keys(engine, CHANGED + TOUCHED, agency.edited_rows() if agency else true())
    modify_contacts(engine, keys[:CHANGED], edited, city="Springfield")
    touch_contacts(engine, edited, keys=keys[CHANGED:])
    _step(f"Changed {CHANGED} rows for real, touched {TOUCHED} more (updated_at only), at {edited:%H:%M}")

    _step(f"Run 2: the hourly run of {hour - timedelta(hours=1):%H:%M}-{hour:%H:%M}, which holds the edits")
    _run_dag(api, airflow, "demo_hourly", hour, {})
    return _report(engine, config, "demo_hourly", agency)


def _report(engine: Engine, config: SyncConfig, run_id: str, agency: AgencyDemo | None) -> dict[str, Any]:
    """Print what the run did (per location for an agency); its details."""
    if agency:
        return print_locations(engine, config, run_id, agency)
    row = _print_run(engine, config, run_id, config.locations[0].name)
    return (row or {}).get("details") or {}


def _require_free(port: int) -> None:
    if not port_is_free(port):
        sys.exit(f"Port {port} on 127.0.0.1 is in use (another Airflow?): pass UI_PORT=<free port> to make.")


def _run_dag(
    api: AirflowApi, airflow: AirflowProcesses, run_id: str, logical_date: datetime, conf: dict[str, Any]
) -> None:
    """Trigger a run of the sync DAG and wait for the scheduler to finish it; stop the demo if it failed."""
    api.trigger(SYNC_DAG_ID, run_id, logical_date.isoformat(), conf)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (run_state := api.run_state(SYNC_DAG_ID, run_id)) not in {"success", "failed"}:
        if time.monotonic() > deadline:
            sys.exit(f"{SYNC_DAG_ID} run {run_id} still {run_state} after {RUN_TIMEOUT_S} s")
        airflow.check_alive()
        time.sleep(1)
    if run_state != "success":
        sys.exit(f"{SYNC_DAG_ID} run {run_id} {run_state}; its task logs are under {airflow.home.log_folder}")


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


def _keys(engine: Engine, n: int, where: ColumnElement[bool]) -> list[str]:
    table = contacts_table()
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(select(table.c.id).where(where).order_by(table.c.id).limit(n))]


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _shown(path: Path, workdir: Path) -> Path:
    return path.relative_to(workdir) if path.is_relative_to(workdir) else path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("command", nargs="?", choices=["demo", "ui"], default="demo")
    parser.add_argument("--port", type=int, default=8080, help="the Airflow UI's loopback port (%(default)s)")
    parser.add_argument("--rows", type=int, default=ROWS, help="contacts to seed (%(default)s)")
    parser.add_argument(
        "--locations", type=int, help="run as an agency of this many locations (default: one location)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=ROOT, help="where .airflow/ and var/ go (the repository)"
    )
    args = parser.parse_args()
    if args.command == "ui":
        ui(args.workdir.resolve(), args.port)
    else:
        main(args.workdir.resolve(), args.port, args.rows, args.locations)
