"""A real Airflow for end-to-end tests: PostgreSQL metadata DB, LocalExecutor, real processes.

One Airflow per session (``airflow_stack``): ``airflow db migrate`` into a fresh PostgreSQL
database, then ``api-server``, ``scheduler`` and ``dag-processor`` as subprocesses (own process
groups, logs in a tmp dir, printed when a test fails), all with the same environment: the
connections as ``AIRFLOW_CONN_*`` and ``GROWTHHUB_SYNC_CONFIG`` pointing at one YAML file.

The sync config is read at parse time (DAG processor) *and* at task run time (every task
process parses the DAG file again), so the path is fixed for the session and each test
rewrites the file's content (``e2e_warehouse``) to point at a PostgreSQL schema of its own.
Location names and ids never change, so the serialized DAG stays the same between tests.

DAGs start paused: an unpaused hourly DAG gets a scheduled run for its latest interval at once
(``catchup=False``), so a test seeds its rows first and then unpauses (``AirflowStack.unpause``).
Runs of a paused DAG, backfills included, stay queued: the scheduler starts none of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Engine

from growthhub_sandbox.testing import SandboxProcess, free_port
from growthhub_sync import state
from growthhub_sync.config import ShardsConfig, SyncConfig, load_config, parse_config
from growthhub_sync.demo import create_demo_table, insert_rows
from growthhub_sync.orchestration import SYNC_DAG_ID

PG_SERVER = os.environ.get("GROWTHHUB_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
ROOT = Path(__file__).resolve().parents[2]
LOCATION_ID = "demo-location"  # the sandbox's startup location, reachable with its demo token
TOKEN = "sandbox-demo-token"  # the sandbox's documented fake token
POOL_SLOTS = 2
BATCH_SIZE = 10
"""Rows per mapped sync task (the plan cuts key ranges of ``batch_size`` rows)."""
TERMINAL = {"success", "failed"}
NOTIFIER_DIR = ROOT / "tests" / "dags"
"""Holds ``notifier.FileNotifier``, an alert channel a test may configure (``alerts.channels``)."""
STACK = pytest.StashKey["AirflowStack | None"]()


# -- reporting: print the Airflow logs of a failed test ---------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(autouse=True)
def _airflow_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    failed = any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )
    stack = request.config.stash.get(STACK, None)
    if failed and stack is not None:
        print(stack.diagnostics())


# -- PostgreSQL databases ---------------------------------------------------------------------------


def _server_url(database: str) -> str:
    return PG_SERVER.rsplit("/", 1)[0] + f"/{database}"


def _admin_engine() -> Engine:
    return create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")


def _create_database(name: str) -> str:
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return _server_url(name)


def _drop_database(name: str) -> None:
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


# -- the Airflow processes --------------------------------------------------------------------------


@dataclass
class AirflowStack:
    """A running Airflow: its environment, metadata DB and processes, and a few CLI helpers."""

    home: Path
    env: dict[str, str]
    meta: Engine
    config_path: Path
    sandbox_url: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.home / "process-logs"

    # processes
    def start(self, name: str, *args: str) -> None:
        log = (self.log_dir / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            [AIRFLOW, *args],
            env=self.env,
            cwd=self.home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown kills executor workers too
        )
        log.close()

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"Airflow processes exited: {dead}\n{self.diagnostics()}")

    def stop(self) -> None:
        for proc in self.processes.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.processes.values():  # the group, even when its leader already exited
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    # CLI
    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [AIRFLOW, *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"`airflow {' '.join(args)}` exited {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def pool_slots(self, pool: str) -> int:
        (row,) = self.query("SELECT slots FROM slot_pool WHERE pool = :p", p=pool)
        return int(row["slots"])

    def is_paused(self) -> bool:
        (row,) = self.query("SELECT is_paused FROM dag WHERE dag_id = :d", d=SYNC_DAG_ID)
        return bool(row["is_paused"])

    def unpause(self) -> None:
        """Let the scheduler run the sync DAG: its latest interval at once, then every hour."""
        if self.is_paused():
            self.cli("dags", "unpause", SYNC_DAG_ID, "--yes")

    # metadata DB
    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with self.meta.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]

    def wait_for_runs(
        self, where: str, count: int, timeout: float = 150, **params: Any
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` runs of the sync DAG match ``where`` and all are finished."""
        deadline = time.monotonic() + timeout
        runs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            self.check_alive()
            runs = self.query(
                f"SELECT * FROM dag_run WHERE dag_id = :dag_id AND ({where}) ORDER BY logical_date",
                dag_id=SYNC_DAG_ID,
                **params,
            )
            if len(runs) == count and all(r["state"] in TERMINAL for r in runs):
                return runs
            time.sleep(1)
        states = [(r["run_id"], r["state"]) for r in runs]
        raise AssertionError(f"runs not finished after {timeout}s: {states}\n{self.diagnostics()}")

    def backfill(self, *args: str) -> int:
        """``airflow backfill create --dag-id <sync DAG> ARGS``; returns the new backfill's id.

        One backfill per DAG at a time: waits for the scheduler to mark earlier ones completed
        (it checks every 30 s) before creating another.
        """
        deadline = time.monotonic() + 90
        while self.query("SELECT id FROM backfill WHERE dag_id = :d AND completed_at IS NULL", d=SYNC_DAG_ID):
            if time.monotonic() > deadline:
                raise AssertionError(f"an earlier backfill is still not completed\n{self.diagnostics()}")
            self.check_alive()
            time.sleep(1)
        self.cli("backfill", "create", "--dag-id", SYNC_DAG_ID, *args)
        (row,) = self.query("SELECT max(id) AS id FROM backfill WHERE dag_id = :d", d=SYNC_DAG_ID)
        return int(row["id"])

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM task_instance WHERE dag_id = :dag_id AND run_id = :run_id "
            "ORDER BY task_id, map_index",
            dag_id=SYNC_DAG_ID,
            run_id=run_id,
        )

    # reporting
    def diagnostics(self, lines: int = 60) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"===== {path.name} (last {lines} lines)\n" + "\n".join(tail))
        for path in sorted((self.home / "logs").rglob("*.log")):
            text_ = path.read_text(errors="replace")
            if "ERROR" in text_ or "Traceback" in text_ or '"level":"error"' in text_:
                parts.append(
                    f"===== task log {path.relative_to(self.home)}\n" + "\n".join(text_.splitlines()[-lines:])
                )
        return "\n".join(parts)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the leader's pid


def _wait_until(what: str, check: Callable[[], bool], stack: AirflowStack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} not ready after {timeout}s\n{stack.diagnostics()}")


def _connections(sandbox_url: str, warehouse_url: str) -> dict[str, str]:
    from sqlalchemy.engine import make_url

    wh = make_url(warehouse_url)
    growthhub = {
        "conn_type": "growthhub",
        "host": sandbox_url,
        "password": TOKEN,
        "extra": {
            "location_id": LOCATION_ID,
            "rate_limit_burst": 1_000_000,
            "rate_limit_interval_ms": 1000,
            "rate_limit_daily": 100_000_000,
            "timeout": 10,
        },
    }
    warehouse = {
        "conn_type": "postgres",
        "host": wh.host,
        "port": wh.port or 5432,
        "login": wh.username,
        "password": wh.password,
        "schema": wh.database,  # the database, in Airflow's postgres connection
    }
    return {
        "AIRFLOW_CONN_GROWTHHUB_DEFAULT": json.dumps(growthhub),
        "AIRFLOW_CONN_WAREHOUSE_DEFAULT": json.dumps({k: v for k, v in warehouse.items() if v is not None}),
        # test_faults_dag.py: a short client timeout (the sandbox hangs just longer) and more workers
        "AIRFLOW_CONN_GROWTHHUB_FAULTS": json.dumps(_growthhub_faults_conn(growthhub)),
        # test_scheduler.py: a token the sandbox does not know
        "AIRFLOW_CONN_GROWTHHUB_BAD_TOKEN": json.dumps({**growthhub, "password": "not-a-valid-token"}),
    }


FAULTS_CONN_ID = "growthhub_faults"
FAULTS_CLIENT_TIMEOUT_S = 1.5
"""The ``timeout`` extra of ``growthhub_faults``; test_faults_dag.py hangs the sandbox just longer."""


def _growthhub_faults_conn(growthhub: dict[str, Any]) -> dict[str, Any]:
    """``growthhub_faults``: ``growthhub_default`` tuned for test_faults_dag.py (see its docstring)."""
    extra = {
        **growthhub["extra"],
        "timeout": FAULTS_CLIENT_TIMEOUT_S,
        "max_workers": int(os.environ.get("FAULTS_DAG_WORKERS", "128")),
        # a cap well above the run's rate: a 429 storm answers X-RateLimit-Remaining 0 and the
        # limiter books up to `burst` requests as used, one list entry each
        "rate_limit_burst": 10_000,
    }
    return {**growthhub, "extra": extra}


@pytest.fixture(scope="session")
def warehouse_db() -> Iterator[str]:
    """A PostgreSQL database for the tests' warehouse schemas (the ``warehouse_default`` connection)."""
    name = f"ghs_e2e_wh_{secrets.token_hex(4)}"
    url = _create_database(name)
    try:
        yield url
    finally:
        _drop_database(name)


@pytest.fixture(scope="session")
def airflow_stack(
    request: pytest.FixtureRequest,
    sandbox_server: SandboxProcess,
    warehouse_db: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AirflowStack]:
    """Airflow 3 with the LocalExecutor and a PostgreSQL metadata DB, running the project's DAGs."""
    home = tmp_path_factory.mktemp("airflow_home")
    meta_name = f"airflow_meta_{secrets.token_hex(4)}"
    meta_url = _create_database(meta_name)
    try:
        yield from _run_airflow(request, home, meta_url, sandbox_server, warehouse_db)
    finally:
        _drop_database(meta_name)


def _run_airflow(
    request: pytest.FixtureRequest, home: Path, meta_url: str, sandbox: SandboxProcess, warehouse_db: str
) -> Iterator[AirflowStack]:
    config_path = home / "growthhub_sync.yaml"
    config_path.write_text(yaml.safe_dump(_config_data("e2e_idle", home)))
    api_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "GROWTHHUB_SYNC"))},
        "PATH": f"{Path(AIRFLOW).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",  # a test unpauses when its data is in
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta_url,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "GROWTHHUB_SYNC_CONFIG": str(config_path),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(NOTIFIER_DIR), os.environ.get("PYTHONPATH")])),
        **_connections(sandbox.base_url, warehouse_db),
    }
    stack = AirflowStack(home, env, create_engine(meta_url), config_path, sandbox.base_url)
    stack.log_dir.mkdir()
    request.config.stash[STACK] = stack
    try:
        stack.cli("db", "migrate", timeout=180)
        stack.cli("pools", "set", ShardsConfig().pool, str(POOL_SLOTS), "GrowthHub e2e API host")
        stack.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(api_port))
        stack.start("scheduler", "scheduler")
        stack.start("dag-processor", "dag-processor")
        _wait_until(
            "api-server",
            lambda: requests.get(f"http://127.0.0.1:{api_port}/api/v2/monitor/health", timeout=2).ok,
            stack,
            90,
        )
        _wait_until(
            f"DAG {SYNC_DAG_ID} parsed",
            lambda: bool(
                stack.query(
                    "SELECT 1 FROM dag d JOIN serialized_dag s ON s.dag_id = d.dag_id WHERE d.dag_id = :d",
                    d=SYNC_DAG_ID,
                )
            ),
            stack,
            90,
        )
        yield stack
    finally:
        stack.stop()
        request.config.stash[STACK] = None
        stack.meta.dispose()


# -- a warehouse and sync config per test -----------------------------------------------------------


def _config_data(schema: str, home: Path) -> dict[str, Any]:
    """The shipped default config on the ``warehouse_default`` connection, in ``schema``."""
    data = load_config().model_dump(by_alias=True, exclude_none=True)
    data["source"] = {**data["source"], "conn_id": "warehouse_default", "schema": schema}
    data["source"].pop("url", None)
    data["state"] = {"schema": schema, "prefix": ""}
    data["locations"] = [{"name": "default", "location_id": LOCATION_ID, "conn_id": "growthhub_default"}]
    data["quality"] = {
        **data["quality"],
        "results_dir": str(home / "gx" / "results"),
        "data_docs_dir": str(home / "gx" / "docs"),
    }
    data["batch_size"] = BATCH_SIZE
    return data


@dataclass
class E2EWarehouse:
    """One test's warehouse: a schema with ``crm_contacts`` and the sync's state tables."""

    engine: Engine
    schema: str
    config: SyncConfig

    def insert(self, rows: Sequence[Sequence[Any]]) -> None:
        insert_rows(self.engine, create_demo_table(self.engine, schema=self.schema), iter(rows))

    def runs(self) -> dict[str, dict[str, Any]]:
        """Run rows of ``growthhub_sync_runs`` by run id."""
        t = state.state_tables(self.config.state).runs
        with self.engine.connect() as conn:
            return {r.run_id: dict(r._mapping) for r in conn.execute(select(t))}

    def ledger(self) -> dict[str, str]:
        """Source key → GrowthHub contact id."""
        t = state.state_tables(self.config.state).ledger
        with self.engine.connect() as conn:
            return {r.source_key: r.contact_id for r in conn.execute(select(t.c.source_key, t.c.contact_id))}

    def open_quarantine(self) -> list[dict[str, Any]]:
        t = state.state_tables(self.config.state).quarantine
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(t).where(t.c.resolved_at.is_(None)))]


@pytest.fixture
def e2e_warehouse(airflow_stack: AirflowStack, warehouse_db: str) -> Iterator[E2EWarehouse]:
    """A fresh schema with an empty ``crm_contacts``; the shared config file now points at it."""
    schema = f"e2e_{secrets.token_hex(4)}"
    engine = create_engine(warehouse_db)
    create_demo_table(engine, schema=schema)
    data = _config_data(schema, airflow_stack.home)
    airflow_stack.config_path.write_text(yaml.safe_dump(data))
    try:
        yield E2EWarehouse(engine, schema, parse_config(data, "e2e"))
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()
