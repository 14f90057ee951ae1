"""The demo's Airflow: its home (``airflow.cfg``, the login), its processes and the REST calls it makes.

``make demo`` and ``make ui`` share one home and one port, so the links the runs write (``[api]
base_url``: run notes, alerts) open in the UI ``make ui`` starts. Everything listens on loopback
only; the UI asks for a login (SimpleAuthManager, user ``admin``, a generated password kept in the
home) rather than making every visitor an admin, because other users of the machine can reach
loopback ports too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from base64 import urlsafe_b64encode
from collections.abc import Callable, Iterator
from configparser import ConfigParser
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from growthhub_sync.operator_view import NOTE_CONN_ID

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
USER = "admin"
PROCESSES = {
    "api-server": ["api-server"],
    # no log server (it listens on every interface): the API server reads the task logs from the
    # home's log folder, on this same host
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
}
"""What runs a DAG in Airflow 3: the scheduler's tasks report to the API server's execution API."""


@dataclass(frozen=True)
class DemoHome:
    """An ``AIRFLOW_HOME`` whose ``airflow.cfg`` points at this repository's DAGs and plugins."""

    path: Path
    repo: Path

    @property
    def cfg(self) -> Path:
        return self.path / "airflow.cfg"

    @property
    def password_file(self) -> Path:
        return self.path / "simple_auth_manager_passwords.json"

    @property
    def db(self) -> Path:
        return self.path / "airflow.db"

    @property
    def log_folder(self) -> Path:
        return self.path / "logs"

    def reset(self, port: int) -> None:
        """A fresh metadata DB and task logs, a new ``airflow.cfg``; the login survives.

        The home is private to its owner: ``airflow.cfg`` holds the secret that signs API tokens.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        self.path.chmod(0o700)
        self.db.unlink(missing_ok=True)
        shutil.rmtree(self.log_folder, ignore_errors=True)
        self.cfg.write_text(self._cfg_text(port))
        if not self.password_file.exists():
            self.password_file.touch(mode=0o600)
            self.password_file.write_text(json.dumps({USER: secrets.token_urlsafe(12)}) + "\n")

    def _cfg_text(self, port: int) -> str:
        base_url = local_url(port)
        fernet_key = urlsafe_b64encode(secrets.token_bytes(32)).decode()
        return f"""\
# The demo's Airflow home, written by `make demo` (scripts/demo_airflow.py) at every run.
# Only what differs from Airflow's defaults; `make ui` starts the UI on it.
[core]
dags_folder = {self.repo / "dags"}
plugins_folder = {self.repo / "plugins"}
load_examples = False
executor = LocalExecutor
parallelism = 4
execution_api_server_url = {base_url}/execution/
# unpaused, so a run triggered here or in the UI (a replay) just runs; the scheduler starts none
# by itself (use_job_schedule below)
dags_are_paused_at_creation = False
fernet_key = {fernet_key}
simple_auth_manager_users = {USER}:admin
simple_auth_manager_passwords_file = {self.password_file}

[database]
sql_alchemy_conn = sqlite:///{self.db}

[logging]
base_log_folder = {self.log_folder}

[api]
host = 127.0.0.1
port = {port}
base_url = {base_url}
workers = 1
secret_key = {secrets.token_urlsafe(16)}

[api_auth]
jwt_secret = {secrets.token_urlsafe(32)}

[dag_processor]
# parse the DAG files every 2 minutes, not every 30 s: CPU for the runs on a small machine
min_file_process_interval = 120

[scheduler]
# runs start only when triggered (by the demo, or by you in the UI): no hourly run of its own
use_job_schedule = False
"""

    def setting(self, section: str, key: str) -> str:
        parser = ConfigParser(interpolation=None)
        parser.read(self.cfg)
        return parser.get(section, key)

    def password(self) -> str:
        return json.loads(self.password_file.read_text())[USER]

    def env(self, port: int, extra: dict[str, str]) -> dict[str, str]:
        """The environment of every Airflow process on this home; ``extra``: the connections.

        ``port`` wins over the one in ``airflow.cfg``, so ``make ui`` can move to another port.
        """
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        base_url = local_url(port)
        # the report task writes each run's note through the API, as the demo's user
        api = {"conn_type": "http", "host": base_url, "login": USER, "password": self.password()}
        return {
            **inherited,
            "AIRFLOW_HOME": str(self.path),
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": base_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url}/execution/",
            f"AIRFLOW_CONN_{NOTE_CONN_ID.upper()}": json.dumps(api),
            **extra,
        }


def local_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class AirflowProcesses:
    """The processes of :data:`PROCESSES` on a home, each in its own process group, logs in ``log_dir``.

    They run in ``cwd``: the sync config's relative paths (``var/gx``) land there.
    """

    home: DemoHome
    env: dict[str, str]
    cwd: Path
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self) -> None:
        for name, args in PROCESSES.items():
            with (self.log_dir / f"{name}.log").open("wb") as log:
                self.processes[name] = subprocess.Popen(  # noqa: S603 - our own venv's airflow
                    [AIRFLOW, *args],
                    env=self.env,
                    cwd=self.cwd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # stop() signals the group: executor workers too
                )

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
        if dead:
            logs = ", ".join(str(self.log_dir / f"{name}.log") for name in dead)
            raise RuntimeError(f"Airflow processes exited {dead}; see {logs}")

    def wait_until(self, what: str, ready: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(requests.RequestException):
                if ready():
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{what} not ready after {timeout:.0f} s; see {self.log_dir}/*.log")

    def stop(self) -> None:
        """SIGTERM to every group, SIGKILL to what is left after 20 s."""
        for proc in self.processes.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)
        self.processes.clear()


def run_cli(env: dict[str, str], args: list[str], log: Path) -> None:
    """Run an Airflow CLI command, its output to ``log``; stop the demo if it fails."""
    with log.open("w") as out:
        done = subprocess.run(  # noqa: S603 - our own venv's airflow, fixed arguments
            [AIRFLOW, *args], stdout=out, stderr=subprocess.STDOUT, env=env, check=False
        )
    if done.returncode != 0:
        sys.exit(f"`airflow {' '.join(args)}` failed; see {log}")


@contextlib.contextmanager
def running(
    home: DemoHome, port: int, connections: dict[str, str], cwd: Path, log_dir: Path
) -> Iterator[AirflowProcesses]:
    """Airflow's processes on ``home`` until the block ends, the API server answering on ``port``."""
    stack = AirflowProcesses(home, home.env(port, connections), cwd, log_dir)
    stack.start()
    try:
        stack.wait_until(
            "Airflow API server",
            lambda: requests.get(f"{local_url(port)}/api/v2/monitor/health", timeout=2).ok,
        )
        yield stack
    finally:
        stack.stop()


class AirflowApi:
    """The few calls of Airflow's REST API the demo makes, logged in as the demo user."""

    def __init__(self, home: DemoHome, port: int) -> None:
        self.base_url = local_url(port)
        self.session = requests.Session()
        answer = self.session.post(
            f"{self.base_url}/auth/token", json={"username": USER, "password": home.password()}, timeout=10
        )
        answer.raise_for_status()
        self.session.headers["Authorization"] = f"Bearer {answer.json()['access_token']}"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        answer = self.session.request(method, f"{self.base_url}/api/v2{path}", json=body, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def has_dag(self, dag_id: str) -> bool:
        answer = self.session.get(f"{self.base_url}/api/v2/dags/{dag_id}", timeout=10)
        return answer.ok

    def trigger(self, dag_id: str, run_id: str, logical_date: str, conf: dict[str, Any]) -> None:
        body = {"dag_run_id": run_id, "logical_date": logical_date, "conf": conf}
        self.call("POST", f"/dags/{dag_id}/dagRuns", body)

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")["state"]


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the leader's pid
