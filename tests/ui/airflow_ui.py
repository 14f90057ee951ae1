"""A real ``airflow api-server`` with the GrowthHub page, for the server and browser tests.

A temporary ``AIRFLOW_HOME`` with a SQLite metadata DB, the project's DAGs serialized into it (no
scheduler: a triggered run stays queued, which is all a replay test looks at), the simple auth
manager with three users (``admin``, ``operator`` with role *user*, ``viewer``), and a SQLite
warehouse reached through the ``warehouse_default`` connection, as a deployment would.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, text
from ui_support import StateDB, write_config

from growthhub_sandbox.testing import free_port

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
ROOT = Path(__file__).resolve().parents[2]
ROLES = {"admin": "admin", "operator": "user", "viewer": "viewer"}


@dataclass
class AirflowUI:
    """The running api-server: its URL, users' passwords, warehouse and metadata DB."""

    home: Path
    base_url: str
    passwords: dict[str, str]
    state: StateDB
    process: subprocess.Popen[bytes] | None = None
    _tokens: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.home / "api-server.log"

    def token(self, user: str) -> str:
        """A JWT of ``user`` from the auth manager's ``POST /auth/token``."""
        if user not in self._tokens:
            response = requests.post(
                f"{self.base_url}/auth/token",
                json={"username": user, "password": self.passwords[user]},
                timeout=10,
            )
            response.raise_for_status()
            self._tokens[user] = response.json()["access_token"]
        return self._tokens[user]

    def get(self, path: str, user: str | None = None, **kwargs: Any) -> requests.Response:
        return requests.get(f"{self.base_url}{path}", headers=self._auth(user), timeout=20, **kwargs)

    def post(self, path: str, user: str | None = None, **kwargs: Any) -> requests.Response:
        return requests.post(f"{self.base_url}{path}", headers=self._auth(user), timeout=20, **kwargs)

    def replay_runs(self) -> list[dict[str, Any]]:
        """Runs of the replay DAG in the metadata DB: run id, conf, who triggered it."""
        engine = create_engine(f"sqlite:///{self.home / 'airflow.db'}")
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT run_id, conf, triggering_user_name, state FROM dag_run "
                        "WHERE dag_id = 'growthhub_quarantine_replay' ORDER BY id"
                    )
                )
                return [dict(r._mapping) for r in rows]
        finally:
            engine.dispose()

    def _auth(self, user: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user)}"} if user else {}


def start_airflow_ui(home: Path) -> AirflowUI:
    """Migrate, serialize the DAGs and start the api-server; stop it with :func:`stop_airflow_ui`."""
    port = free_port()
    warehouse = home / "warehouse.db"
    config = write_config(home / "growthhub_sync.yaml")  # source: the warehouse_default connection
    passwords = {user: secrets.token_urlsafe(8) for user in ROLES}
    (home / "passwords.json").write_text(json.dumps(passwords))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "GROWTHHUB_SYNC"))},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager."
        "SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in ROLES.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW_CONN_WAREHOUSE_DEFAULT": json.dumps({"conn_type": "sqlite", "host": str(warehouse)}),
        "GROWTHHUB_SYNC_CONFIG": str(config),
    }
    state = StateDB(f"sqlite:///{warehouse}", create_engine(f"sqlite:///{warehouse}"), None, config)
    ui = AirflowUI(home, f"http://127.0.0.1:{port}", passwords, state)
    _cli(env, ui.log, "db", "migrate")
    with ui.log.open("ab") as log:  # the server starts while the DAGs are serialized: both take seconds
        ui.process = subprocess.Popen(
            [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(port), "--apps", "core"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _cli(env, home / "reserialize.log", "dags", "reserialize")
        _wait_for_health(ui)
    except BaseException:
        stop_airflow_ui(ui)
        raise
    return ui


def stop_airflow_ui(ui: AirflowUI) -> None:
    if ui.process is not None and ui.process.poll() is None:
        os.killpg(ui.process.pid, signal.SIGTERM)
        try:
            ui.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(ui.process.pid, signal.SIGKILL)
            ui.process.wait()
    ui.state.engine.dispose()


def _cli(env: dict[str, str], log: Path, *args: str) -> None:
    with log.open("ab") as out:
        done = subprocess.run([AIRFLOW, *args], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=180)
    if done.returncode:
        raise RuntimeError(f"airflow {' '.join(args)} failed:\n{log.read_text()[-4000:]}")


def _wait_for_health(ui: AirflowUI, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ui.process is not None and ui.process.poll() is not None:
            break
        try:
            if requests.get(f"{ui.base_url}/api/v2/monitor/health", timeout=2).ok:
                return
        except requests.RequestException:  # not listening yet, or still starting up
            pass
        time.sleep(0.5)
    raise RuntimeError(f"api-server did not answer:\n{ui.log.read_text()[-4000:]}")
