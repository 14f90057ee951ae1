"""Benchmark an agency: hundreds of locations from one agency connection, in one DAG run (issue 13).

One warehouse table holds every location's contacts in a ``location_id`` column; the sandbox runs
an agency with ``--locations`` installed locations at GrowthHub's default limits (100 requests
per 10 s and 200,000 a day each) and ``--latency-ms`` per request. Each run is
``airflow dags test growthhub_contact_sync`` in a process of its own (SQLite metadata DB).

1. **first load**: ``--locations`` x ``--first-rows`` rows, ``full_refresh``;
2. **hourly**: ``--active`` of the locations have ``--changed`` rows changed in the hour, the
   rest none;
3. **quiet**: the next hour, nothing changed anywhere.

Printed per run: wall time, task instances created, CPU seconds of the run's process, upserts,
429 answers, aggregate upserts/s against the sum of the limits of the locations sent to, the
busiest 10 s of any location (its limit is 100), and CPU per location for the quiet run.

    python bench/bench_agencies.py                      # 300 locations, the issue's figures
    python bench/bench_agencies.py --locations 30 --first-rows 50   # a quick run
    python bench/bench_agencies.py --runs hourly,quiet              # without the 20-minute first load

The PostgreSQL schema and the Airflow home are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine, create_engine, text

from growthhub_sandbox.models import DEMO_LOCATION_ID, demo_config
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess
from growthhub_sync.config import DEFAULT_CONFIG_PATH
from growthhub_sync.demo import modify_contacts, seed_demo, spread_over_locations
from growthhub_sync.orchestration import SYNC_DAG_ID

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = T0 + timedelta(days=2)  # the hourly run's interval: [HOUR, HOUR + 1 h), its logical date the end
LIMIT_PER_S = 10  # GrowthHub's default: 100 requests per 10 s per location
UPSERT = "POST /contacts/upsert"


@dataclass
class RunFigures:
    name: str
    state: str
    wall_s: float
    cpu_s: float
    task_instances: int
    upserts: int
    throttled: int
    locations_sent_to: int
    busiest_10s: int

    def print(self, locations: int) -> None:
        limit = self.locations_sent_to * LIMIT_PER_S
        rate = self.upserts / self.wall_s if self.wall_s else 0.0
        share_429 = 100 * self.throttled / max(self.upserts + self.throttled, 1)
        print(f"\n{self.name}: run {self.state}")
        print(f"  wall time            {self.wall_s:8.1f} s")
        print(f"  task instances       {self.task_instances:8d}")
        print(f"  CPU (run's process)  {self.cpu_s:8.1f} s")
        print(f"  upserts              {self.upserts:8d}  to {self.locations_sent_to} locations")
        print(f"  429 answers          {self.throttled:8d}  ({share_429:.2f} % of upsert answers)")
        print(f"  upserts/s            {rate:8.1f}  (sum of the limits of those locations: {limit}/s)")
        print(f"  busiest 10 s of one location: {self.busiest_10s} requests (limit 100)")
        if self.upserts:
            print(
                f"  CPU per upsert (all stages, Airflow included): {1000 * self.cpu_s / self.upserts:.2f} ms"
            )
        else:
            print(
                f"  CPU per location (nothing to send): {1000 * self.cpu_s / locations:.1f} ms, the whole"
                " run's CPU (Airflow's start-up included) over the locations: an upper bound"
            )


class Bench:
    """The warehouse schema, the sandbox agency, the Airflow home and the runs against them."""

    def __init__(self, args: argparse.Namespace, workdir: Path, base_url: str) -> None:
        self.args, self.workdir, self.base_url = args, workdir, base_url
        self.admin = SandboxAdmin(base_url)
        self.schema = f"bench_agencies_{uuid.uuid4().hex[:8]}"
        self.engine: Engine = create_engine(PG_URL)
        self.home = workdir / "airflow"
        self.config_path = workdir / "sync_config.yaml"

    def set_up(self) -> list[str]:
        """The agency and its locations, the seeded table, the config, a migrated Airflow home."""
        args = self.args
        # each location like the sandbox's demo location (its custom fields), at GrowthHub's limits
        like_demo = demo_config().locations[DEMO_LOCATION_ID].model_dump(mode="json", exclude_unset=True)
        like_demo["rateLimit"] = {"burst": 100, "intervalMs": 10_000, "daily": 200_000}
        agency = self.admin.create_agency("bench", locations=args.locations, **like_demo)
        self.admin.set_faults(latency_ms=args.latency_ms)
        seed_demo(self.engine, args.locations * args.first_rows, schema=self.schema, start=T0, bad_share=0.0)
        spread_over_locations(self.engine, agency.location_ids, schema=self.schema)
        config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
        config.update(
            source={**config.get("source", {}), "url": PG_URL, "schema": self.schema},
            state={"schema": self.schema},
            locations={"from_column": "location_id", "conn_id": "growthhub_agency"},
        )
        config["quality"] = {
            **config.get("quality", {}),
            "results_dir": str(self.workdir / "gx" / "results"),
            "data_docs_dir": str(self.workdir / "gx" / "docs"),
            "reject_rate_threshold": 1.0,
        }
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.connection = {
            "conn_type": "growthhub",
            "host": self.base_url,
            "password": agency.token,
            "extra": {"company_id": agency.company_id, "app_id": agency.app_id, "timeout": 30},
        }
        self._airflow(["db", "migrate"], "db-migrate")
        return list(agency.location_ids)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))}
        env.update(
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            GROWTHHUB_SYNC_CONFIG=str(self.config_path),
            AIRFLOW_CONN_GROWTHHUB_AGENCY=json.dumps(self.connection),
        )
        return env

    def _airflow(self, argv: list[str], log_name: str) -> tuple[int, float, float]:
        """Run ``airflow <argv>``; its return code, wall seconds and CPU seconds."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        with (self.workdir / f"{log_name}.log").open("w") as log:
            rc = subprocess.run(
                [AIRFLOW, *argv],
                env=self.env(),
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            ).returncode
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return rc, wall, cpu

    def run(self, name: str, logical_date: datetime, conf: dict[str, Any]) -> RunFigures:
        before = self._upsert_answers()
        started = time.time()
        argv = ["dags", "test", SYNC_DAG_ID, logical_date.isoformat(), "-c", json.dumps(conf)]
        rc, wall, cpu = self._airflow(argv, name.replace(" ", "-"))
        answers = self._upsert_answers() - before
        by_location = self._sent_by_location(started)
        return RunFigures(
            name=name,
            state="success"
            if rc == 0
            else f"FAILED (rc {rc}, see {self.workdir}/{name.replace(' ', '-')}.log)",
            wall_s=wall,
            cpu_s=cpu,
            task_instances=self._task_instances(logical_date),
            upserts=sum(n for status, n in answers.items() if status != "429"),
            throttled=answers.get("429", 0),
            locations_sent_to=len(by_location),
            busiest_10s=max(by_location.values(), default=0),
        )

    def _upsert_answers(self) -> Counter[str]:
        return Counter(self.admin.stats()["requests"].get(UPSERT, {}))

    def _sent_by_location(self, since: float) -> dict[str, int]:
        """Each location sent to since ``since``: the most requests it answered in any 10 s."""
        busiest: dict[str, int] = {}
        for location_id in self.admin.stats()["locations"]:
            buckets = [
                b for b in self.admin.timeline(location_id, endpoint=UPSERT) if b["start"] >= since - 1
            ]
            if not buckets:
                continue
            per_second = {int(b["start"]): sum(b["answers"].values()) for b in buckets}
            busiest[location_id] = max(sum(per_second.get(s + i, 0) for i in range(10)) for s in per_second)
        return busiest

    def _task_instances(self, logical_date: datetime) -> int:
        with sqlite3.connect(self.home / "airflow.db") as db:
            (n,) = db.execute(
                "SELECT count(*) FROM task_instance ti JOIN dag_run r"
                " ON r.dag_id = ti.dag_id AND r.run_id = ti.run_id WHERE r.dag_id = ? AND r.logical_date = ?",
                (SYNC_DAG_ID, logical_date.strftime("%Y-%m-%d %H:%M:%S.%f")),
            ).fetchone()
        return int(n)

    def change_hour(self, location_ids: list[str]) -> int:
        """``--changed`` rows of the first ``--active`` share of the locations, changed inside HOUR."""
        active = location_ids[: max(1, round(self.args.active * len(location_ids)))]
        keys: list[str] = []
        with self.engine.connect() as conn:
            for location_id in active:
                keys += conn.scalars(
                    text(
                        f'SELECT id FROM "{self.schema}".crm_contacts'
                        " WHERE location_id = :l ORDER BY id LIMIT :n"
                    ),
                    {"l": location_id, "n": self.args.changed},
                ).all()
        modify_contacts(self.engine, keys, HOUR + timedelta(minutes=30), schema=self.schema, city="Hourly")
        return len(active)

    def tear_down(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
        self.engine.dispose()
        self.admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--locations", type=int, default=300)
    parser.add_argument("--first-rows", type=int, default=200, help="rows per location in the first load")
    parser.add_argument("--active", type=float, default=0.1, help="share of locations changed in the hour")
    parser.add_argument("--changed", type=int, default=50, help="rows changed per active location")
    parser.add_argument("--latency-ms", type=float, default=20)
    parser.add_argument(
        "--runs",
        default="first,hourly,quiet",
        help="which runs, in order (%(default)s); the hourly run alone syncs its window's rows all the same",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, Airflow home)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench_agencies_"))
    with SandboxProcess(args=["--log-level", "warning"]) as sandbox:
        bench = Bench(args, workdir, sandbox.base_url)
        try:
            location_ids = bench.set_up()
            print(
                f"{args.locations} locations x {args.first_rows} rows, {args.latency_ms:g} ms latency, "
                f"100 requests per 10 s per location; work folder {workdir}"
            )
            runs = args.runs.split(",")
            if "first" in runs:
                bench.run("first load", T0 + timedelta(days=1), {"full_refresh": True}).print(args.locations)
            active = bench.change_hour(location_ids)
            print(
                f"\n{active} locations with {args.changed} changed rows each"
                f" in the hour from {HOUR:%Y-%m-%d %H:%M}; the rest none"
            )
            if "hourly" in runs:
                bench.run("hourly", HOUR + timedelta(hours=1), {}).print(args.locations)
            if "quiet" in runs:
                bench.run("quiet hour", HOUR + timedelta(hours=2), {}).print(args.locations)
        finally:
            bench.tear_down()
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
