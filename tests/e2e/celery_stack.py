"""Airflow with the CeleryExecutor for test_celery.py: two workers that share only code and config.

The stack is ``conftest.AirflowStack`` (its process handling, CLI and metadata helpers) started
with another environment: ``CeleryExecutor``, a Redis broker (a database of its own, every key
under a prefix of this stack), the result backend in the stack's PostgreSQL metadata database,
and ``api-server``, ``scheduler`` and ``dag-processor`` as in conftest. Then two
``airflow celery worker`` processes, each with its own working directory, ``TMPDIR``, ``HOME``,
``AIRFLOW_HOME`` (so the default token file ``$AIRFLOW_HOME/growthhub-tokens.json`` differs), task
log folder, log-server port and Celery hostname. The sync config keeps Great Expectations results
and Data Docs in folders relative to the task's working directory, so no file one worker writes
is read by the other: what they must agree on (rate-limit window, daily quota, OAuth tokens) can
only go through the ``coordination`` Redis connection of the GrowthHub connection.

The scheduler creates no scheduled runs (``use_job_schedule = False``) and the DAG starts
unpaused: a test triggers exactly the runs it measures.

Each worker runs in a session of its own (``start_new_session``): the Celery main process and its
pool children (Airflow's task supervisors) in the worker's process group, and the task processes
the supervisors fork, each in a process group of its own (Airflow 3.3's supervisor calls
``setpgid``). ``CeleryStack.kill_worker`` SIGKILLs every group of the session, as a lost node
would lose them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
import redis
import requests
import yaml
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess, free_port
from growthhub_sync.config import ShardsConfig
from growthhub_sync.demo import create_demo_table
from growthhub_sync.orchestration import SYNC_DAG_ID

if TYPE_CHECKING:
    from conftest import AirflowStack

_REDIS = urlsplit(os.environ.get("GROWTHHUB_TEST_REDIS_URL", "redis://127.0.0.1:6379/9"))
REDIS_HOST = _REDIS.hostname or "127.0.0.1"
REDIS_PORT = _REDIS.port or 6379
"""The Redis of the other suites' tests (``GROWTHHUB_TEST_REDIS_URL``); its databases below, not its own."""
BROKER_DB = 5
"""Redis database of the Celery broker (keys under a per-stack prefix, removed at the end)."""
COORDINATION_DB = 6
"""Redis database of the ``growthhub_coordination`` connection (keys carry the sandbox's URL)."""
COORDINATION_CONN_ID = "growthhub_coordination"
QUEUE = "default"
HERE = Path(__file__).resolve().parent


def e2e_conftest(config: pytest.Config) -> ModuleType:
    """The loaded ``tests/e2e/conftest.py`` (pytest imports every conftest as ``conftest``)."""
    wanted = HERE / "conftest.py"
    for plugin in config.pluginmanager.get_plugins():
        path = getattr(plugin, "__file__", None)
        if path and Path(path).resolve() == wanted:
            return plugin  # type: ignore[no-any-return]
    raise RuntimeError(f"{wanted} is not loaded as a pytest plugin")


# -- processes -------------------------------------------------------------------------------------


def proc_cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return ""


def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """``(state, ppid, process group, session)`` of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def proc_alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(leader: int, *, leader_alive: bool = True) -> list[int]:
    """Live processes in ``leader``'s session or process group, or below it in the process tree.

    Not by environment: ``setproctitle`` (Celery, Airflow's task runner) may overwrite the memory
    ``/proc/PID/environ`` shows. Once the leader is reaped (``leader_alive`` false) its pid may
    be another process's: then only its session's members count, not that pid's own tree.
    """
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) and stat[0] not in ("Z", "X"):
            stats[int(entry.name)] = stat
    found = {pid for pid, (_, _, pgrp, sid) in stats.items() if leader in (pgrp, sid) and pid != leader}
    if leader_alive and leader in stats:
        found.add(leader)
    grew = True
    while grew:
        grew = False
        for pid, (_, ppid, _, _) in stats.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return sorted(found)


def pids_titled(marker: str) -> list[int]:
    """Live processes whose command line (``setproctitle``) contains ``marker``."""
    return [
        int(e.name)
        for e in Path("/proc").iterdir()
        if e.name.isdigit() and marker in proc_cmdline(int(e.name))
    ]


@dataclass
class Worker:
    """One ``airflow celery worker``: its own directories, environment, hostname and process group."""

    name: str
    hostname: str
    root: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def home(self) -> Path:
        return self.root / "airflow_home"

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def log_path(self) -> Path:
        return self.root / "worker.log"

    @property
    def task_log_dir(self) -> Path:
        return self.root / "task_logs"

    def pids(self) -> list[int]:
        """Live processes of this worker: its process group and session, and their descendants."""
        if self.process is None:
            return []
        return descendants(self.process.pid, leader_alive=self.process.poll() is None)

    def task_pids(self, ti_ids: set[str]) -> dict[str, int]:
        """Task instance id → pid of this worker's task process running it (``airflow worker -- <id>``)."""
        found = {}
        for pid in self.pids():
            title = proc_cmdline(pid)
            for ti_id in ti_ids:
                if title.startswith("airflow worker --") and ti_id in title:
                    found[ti_id] = pid
        return found


@dataclass
class CeleryStack:
    """The Celery Airflow, its sandbox and Redis; ``airflow`` holds the shared processes."""

    airflow: AirflowStack
    workers: dict[str, Worker]
    sandbox: SandboxProcess
    admin: SandboxAdmin
    location_id: str
    broker_prefix: str
    api_port: int
    killed: dict[str, list[int]] = field(default_factory=dict)
    killed_groups: dict[str, list[int]] = field(default_factory=dict)

    @property
    def pool(self) -> str:
        return ShardsConfig().pool

    def write_config(self, data: dict[str, Any]) -> None:
        self.airflow.config_path.write_text(yaml.safe_dump(data))

    def start_worker(self, worker: Worker) -> None:
        for path in (worker.home, worker.cwd, worker.task_log_dir, worker.root / "tmp", worker.root / "user"):
            path.mkdir(parents=True, exist_ok=True)
        with worker.log_path.open("ab") as log:
            worker.process = subprocess.Popen(
                [
                    self.airflow_cli,
                    "celery",
                    "worker",
                    "--concurrency",
                    worker.env["AIRFLOW__CELERY__WORKER_CONCURRENCY"],
                    "--celery-hostname",
                    worker.hostname,
                    "--queues",
                    QUEUE,
                    "--without-mingle",
                    "--without-gossip",
                ],
                env=worker.env,
                cwd=worker.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: its process group and its tasks' groups
            )
        self.airflow.processes[worker.name] = worker.process

    @property
    def airflow_cli(self) -> str:
        return str(Path(self.airflow.env["PATH"].split(os.pathsep)[0]) / "airflow")

    def wait_workers_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(self.workers)
        while waiting and time.monotonic() < deadline:
            self.airflow.check_alive()
            for name in list(waiting):
                log = self.workers[name].log_path.read_text(errors="replace")
                if f"{self.workers[name].hostname} ready" in log:
                    waiting.discard(name)
            time.sleep(0.5)
        if waiting:
            raise AssertionError(
                f"Celery workers not ready after {timeout}s: {waiting}\n{self.diagnostics()}"
            )

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL every process of the worker, as a lost node loses them; returns their pids.

        That is more than the worker's process group: Airflow's task supervisor (a Celery pool
        child) puts each task process into a process group of its own, so ``kill -9 -<worker
        pgid>`` would leave the tasks running, orphaned. Every group of the worker's session is
        killed (the session is the worker's: ``start_new_session``).
        """
        worker = self.workers[name]
        assert worker.process is not None
        pids = worker.pids()
        groups = {stat[2] for pid in pids if (stat := proc_stat(pid)) is not None}
        assert os.getpgrp() not in groups
        self.airflow.processes.pop(name)  # check_alive must not count this death as a failure
        for group in sorted(groups, key=lambda g: g != worker.process.pid):  # the worker's first
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        worker.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(proc_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.killed[name] = pids
        self.killed_groups[name] = sorted(groups)
        return pids

    def kill_task_processes(self) -> None:
        """SIGKILL the task processes of the live workers: stopping a worker's group misses them."""
        for worker in self.workers.values():
            if worker.process is None or worker.process.poll() is not None:
                continue
            for pid in worker.pids():
                stat = proc_stat(pid)
                if stat is not None and stat[2] != worker.process.pid:  # not in the worker's own group
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)

    def diagnostics(self, lines: int = 60) -> str:
        parts = [self.airflow.diagnostics(lines)]
        for worker in self.workers.values():
            if worker.log_path.exists():
                tail = worker.log_path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"===== {worker.name} worker log (last {lines} lines)\n" + "\n".join(tail))
            for path in sorted(worker.task_log_dir.rglob("*.log")):
                text_ = path.read_text(errors="replace")
                if "Traceback" in text_ or '"level":"error"' in text_ or "ERROR" in text_:
                    tail = "\n".join(text_.splitlines()[-lines:])
                    parts.append(
                        f"===== {worker.name} task log {path.relative_to(worker.task_log_dir)}\n{tail}"
                    )
        parts.append(f"===== sandbox log\n{self.sandbox.log_tail(lines)}")
        return "\n".join(parts)


def _redis() -> redis.Redis:
    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_DB, socket_timeout=5)


def _coordination_conn() -> str:
    return json.dumps(
        {"conn_type": "redis", "host": REDIS_HOST, "port": REDIS_PORT, "extra": {"db": COORDINATION_DB}}
    )


@contextlib.contextmanager
def celery_stack(
    config: pytest.Config,
    root: Path,
    warehouse_db: str,
    *,
    schema: str,
    location_id: str,
    growthhub_conn: dict[str, Any],
    sandbox_args: list[str],
    pool_slots: int,
    worker_concurrency: int = 2,
    heartbeat_timeout_s: int = 20,
) -> Iterator[CeleryStack]:
    """Start the sandbox and the Celery Airflow; the config file points at ``schema`` (created empty).

    :param growthhub_conn: the ``growthhub_default`` connection (``host`` is set to the sandbox).
    :param sandbox_args: options of the sandbox process (``--burst`` ...).
    """
    cf = e2e_conftest(config)
    try:
        _redis().ping()
    except redis.RedisError as exc:
        pytest.fail(f"no Redis at {REDIS_HOST}:{REDIS_PORT} (run scripts/ensure-redis): {exc}")
    with contextlib.ExitStack() as cleanup:  # undone in reverse, whatever fails on the way
        engine = create_engine(warehouse_db)
        cleanup.callback(engine.dispose)
        create_demo_table(engine, schema=schema)
        cleanup.callback(_drop_schema, engine, schema)
        meta_name = f"airflow_celery_{secrets.token_hex(4)}"
        meta_url = cf._create_database(meta_name)
        cleanup.callback(cf._drop_database, meta_name)
        prefix = f"ghs-e2e-{secrets.token_hex(4)}:"
        cleanup.callback(_drop_broker_keys, prefix)
        sandbox = SandboxProcess(args=sandbox_args).start()
        cleanup.callback(sandbox.stop)
        sandbox_url = sandbox.base_url
        _drop_coordination_keys(sandbox_url)
        cleanup.callback(_drop_coordination_keys, sandbox_url)
        admin = SandboxAdmin(sandbox_url)
        cleanup.callback(admin.close)
        stack = _stack(
            cf,
            root,
            warehouse_db,
            meta_url,
            sandbox,
            admin,
            prefix,
            schema=schema,
            location_id=location_id,
            growthhub_conn=growthhub_conn,
            worker_concurrency=worker_concurrency,
            heartbeat_timeout_s=heartbeat_timeout_s,
        )
        cleanup.callback(stack.airflow.meta.dispose)
        previous = config.stash.get(cf.STACK, None)
        config.stash[cf.STACK] = stack  # conftest prints its diagnostics() when a test fails
        cleanup.callback(config.stash.__setitem__, cf.STACK, previous)
        cleanup.callback(stack.airflow.stop)
        cleanup.callback(stack.kill_task_processes)
        _start(cf, stack, pool_slots)
        yield stack


def _stack(
    cf: ModuleType,
    root: Path,
    warehouse_db: str,
    meta_url: str,
    sandbox: SandboxProcess,
    admin: SandboxAdmin,
    prefix: str,
    *,
    schema: str,
    location_id: str,
    growthhub_conn: dict[str, Any],
    worker_concurrency: int,
    heartbeat_timeout_s: int,
) -> CeleryStack:
    """The stack's environments, sync config and directories; nothing started yet."""
    home = root / "scheduler_home"
    home.mkdir(parents=True)
    config_path = home / "growthhub_sync.yaml"
    api_port = free_port()
    connections = cf._connections(sandbox.base_url, warehouse_db)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "GROWTHHUB_SYNC"))},
        "PATH": f"{Path(cf.AIRFLOW).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(cf.ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__PARALLELISM": "16",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta_url,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),  # signs log requests to the workers
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # no scheduled runs: the test triggers the runs it measures
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        # a killed worker's task instances are failed (and retried) after this, not after 300 s
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(heartbeat_timeout_s),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{BROKER_DB}",
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + meta_url,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(worker_concurrency),
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": prefix,
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "3600",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": QUEUE,
        "GROWTHHUB_SYNC_CONFIG": str(config_path),
        "AIRFLOW_CONN_WAREHOUSE_DEFAULT": connections["AIRFLOW_CONN_WAREHOUSE_DEFAULT"],
        "AIRFLOW_CONN_GROWTHHUB_DEFAULT": json.dumps({**growthhub_conn, "host": sandbox.base_url}),
        f"AIRFLOW_CONN_{COORDINATION_CONN_ID.upper()}": _coordination_conn(),
    }
    data = cf._config_data(schema, home)
    data["locations"] = [{"name": "default", "location_id": location_id, "conn_id": "growthhub_default"}]
    # relative: each worker keeps its GX results and Data Docs under its own working directory
    data["quality"] = {**data["quality"], "results_dir": "gx/validations", "data_docs_dir": "gx/data_docs"}
    config_path.write_text(yaml.safe_dump(data))

    airflow = cf.AirflowStack(home, env, create_engine(meta_url), config_path, sandbox.base_url)
    airflow.log_dir.mkdir()
    token = secrets.token_hex(3)
    workers = {}
    for name in ("worker-a", "worker-b"):
        wroot = root / name
        workers[name] = Worker(name, f"{name}-{token}", wroot, {})
        workers[name].env = {
            **env,
            "AIRFLOW_HOME": str(workers[name].home),
            "TMPDIR": str(wroot / "tmp"),
            "HOME": str(wroot / "user"),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(workers[name].task_log_dir),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        }
    return CeleryStack(airflow, workers, sandbox, admin, location_id, prefix, api_port)


def _start(cf: ModuleType, stack: CeleryStack, pool_slots: int) -> None:
    """Migrate the metadata DB, create the pool, start every process and wait until all are up."""
    airflow = stack.airflow
    airflow.cli("db", "migrate", timeout=180)
    airflow.cli("pools", "set", stack.pool, str(pool_slots), "GrowthHub e2e location (Celery)")
    airflow.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(stack.api_port))
    airflow.start("scheduler", "scheduler")
    airflow.start("dag-processor", "dag-processor")
    for worker in stack.workers.values():
        stack.start_worker(worker)
    cf._wait_until(
        "api-server",
        lambda: requests.get(f"http://127.0.0.1:{stack.api_port}/api/v2/monitor/health", timeout=2).ok,
        airflow,
        90,
    )
    cf._wait_until(
        f"DAG {SYNC_DAG_ID} parsed",
        lambda: bool(
            airflow.query(
                "SELECT 1 FROM dag d JOIN serialized_dag s ON s.dag_id = d.dag_id "
                "WHERE d.dag_id = :d AND NOT d.is_paused",
                d=SYNC_DAG_ID,
            )
        ),
        airflow,
        90,
    )
    stack.wait_workers_ready()


def _drop_schema(engine: Any, schema: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def _drop_coordination_keys(base_url: str) -> None:
    """The coordination state of this sandbox's locations: a later sandbox may get the same port."""
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=COORDINATION_DB, socket_timeout=5)
        keys = list(client.scan_iter(match=f"*{{{base_url}|*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def _drop_broker_keys(prefix: str) -> None:
    with contextlib.suppress(redis.RedisError):
        client = _redis()
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
