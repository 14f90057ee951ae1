"""End to end: the DAGs run by ``airflow dags test`` against PostgreSQL and the GrowthHub sandbox.

Each run is a subprocess with its own Airflow home (SQLite metadata DB, migrated once per session),
the warehouse and the state tables in a PostgreSQL schema of the test's own, the sandbox as the
API, and a test notifier (``notifier.FileNotifier``) as the only alert channel.

Task retries: ``default_args`` retry 3 times with a 1-minute exponential backoff, and
``airflow dags test`` honours the delay (it polls "No tasks to run" until the retry is due: a
401 run took over 10 minutes). A cluster policy in the session's ``airflow_local_settings.py``
therefore cuts retries to one, immediately, so a failing run still goes through a retry.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from sqlalchemy import Engine, create_engine, func, select, text

from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess, free_port
from growthhub_sync import state
from growthhub_sync.config import load_config
from growthhub_sync.demo import contacts_table, modify_contacts, seed_demo
from growthhub_sync.orchestration import REPLAY_DAG_ID, SYNC_DAG_ID
from growthhub_sync.outcomes import RUN_COUNTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
PG_URL = os.environ.get("GROWTHHUB_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
LOCATION_ID = "demo-location"  # the sandbox's startup location
TOKEN = "sandbox-demo-token"
T0 = datetime(2026, 3, 1, tzinfo=UTC)
RUN_TIMEOUT_S = 240
UPSERT = "POST /contacts/upsert"
ERROR_LINE = re.compile(r"\[(error|critical)\s*\]|\b(ERROR|CRITICAL)\b")

LOCAL_SETTINGS = '''
from datetime import timedelta


def task_policy(task):
    """Tests only: one immediate retry instead of 3 with a 1-minute exponential backoff."""
    if task.retries:
        task.retries = 1
        task.retry_delay = timedelta(0)
        task.retry_exponential_backoff = False
'''


def _airflow_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    )
    return env


def _airflow(args: list[str], env: dict[str, str], log: Path) -> int:
    with log.open("w") as out:
        return subprocess.run(
            [AIRFLOW, *args],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=RUN_TIMEOUT_S,
            check=False,
        ).returncode


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Airflow home with a migrated SQLite metadata DB, the API host's pool and the retry policy."""
    home = tmp_path_factory.mktemp("airflow_home")
    (home / "config").mkdir()
    (home / "config" / "airflow_local_settings.py").write_text(LOCAL_SETTINGS)
    env = _airflow_env(home)
    for args in (
        ["db", "migrate"],
        ["pools", "set", "growthhub_api", "4", "GrowthHub API host"],
    ):
        log = home / f"{args[0]}-{args[1]}.log"
        assert _airflow(args, env, log) == 0, log.read_text()[-3000:]
    return home


@dataclass
class Run:
    dag_id: str
    returncode: int
    log: str
    run_id: str | None = None
    state: str | None = None

    def tail(self, n: int = 4000) -> str:
        return self.log[-n:]

    def error_lines(self) -> list[str]:
        """Log lines at level ERROR or above (Airflow's structlog ``[error ]`` and stdlib ``ERROR``)."""
        return [line for line in self.log.splitlines() if ERROR_LINE.search(line)]


@dataclass
class Harness:
    """One test's deployment: warehouse schema, config, sandbox, notifier file, Airflow home."""

    home: Path
    tmp: Path
    engine: Engine
    schema: str
    sandbox: SandboxAdmin
    base_url: str
    runs: int = 0

    @property
    def notifications_path(self) -> Path:
        return self.tmp / "notifications.jsonl"

    @property
    def config_path(self) -> Path:
        return self.tmp / "sync_config.yaml"

    def write_config(self, make_config_data: Callable[..., dict[str, Any]], **changes: Any) -> None:
        base = {
            "source": {"url": PG_URL, "schema": self.schema},
            "state": {"schema": self.schema},
            "locations": [{"name": "default", "location_id": LOCATION_ID, "conn_id": "growthhub_default"}],
            "quality": {
                "results_dir": str(self.tmp / "gx" / "results"),
                "data_docs_dir": str(self.tmp / "gx" / "docs"),
                "reject_rate_threshold": 1.0,
            },
            "batch_size": 50,
            "alerts": {
                "channels": [
                    {
                        "type": "custom",
                        "class_path": "notifier.FileNotifier",
                        "kwargs": {"path": str(self.notifications_path)},
                    }
                ]
            },
        }
        for key, value in changes.items():
            merge = isinstance(value, dict) and isinstance(base.get(key), dict)
            base[key] = {**base[key], **value} if merge else value
        data = make_config_data(**base)
        self.config_path.write_text(yaml.safe_dump(data), encoding="utf-8")

    @property
    def tables(self) -> state.StateTables:
        return state.state_tables(load_config(self.config_path).state)

    def seed(self, n: int, *, span: timedelta, bad_share: float = 0.0, seed: int = 7) -> None:
        seed_demo(self.engine, n, schema=self.schema, start=T0, span=span, bad_share=bad_share, seed=seed)

    def run(
        self,
        dag_id: str,
        logical_date: datetime,
        conf: dict[str, Any] | None = None,
        *,
        token: str = TOKEN,
        env_extra: dict[str, str] | None = None,
    ) -> Run:
        env = {**_airflow_env(self.home), **(env_extra or {})}
        env["GROWTHHUB_SYNC_CONFIG"] = str(self.config_path)
        env["AIRFLOW_CONN_GROWTHHUB_DEFAULT"] = json.dumps(
            {
                "conn_type": "growthhub",
                "host": self.base_url,
                "password": token,
                "extra": {"location_id": LOCATION_ID, "timeout": 10},
            }
        )
        self.runs += 1
        log = self.tmp / f"run{self.runs}-{dag_id}.log"
        args = ["dags", "test", dag_id, logical_date.isoformat(), "-c", json.dumps(conf or {})]
        rc = _airflow(args, env, log)
        out = Run(dag_id, rc, log.read_text(errors="replace"))
        finished = re.search(
            r"DagRun Finished: dag_id=\S+, logical_date=[^,]*, run_id=([^,]+),.*?state=(\w+)", out.log
        )
        if finished:
            out.run_id, out.state = finished.group(1), finished.group(2)
        return out

    # -- what the run left behind ---------------------------------------------------------------
    def upserts(self) -> dict[str, int]:
        return dict(self.sandbox.stats()["requests"].get(UPSERT, {}))

    def rows(self, table_name: str) -> list[dict[str, Any]]:
        table = getattr(self.tables, table_name)
        with self.engine.connect() as conn:
            if not self.engine.dialect.has_table(conn, table.name, schema=self.schema):
                return []
            return [dict(r._mapping) for r in conn.execute(select(table))]

    def keys_updated_in(self, start: datetime, end: datetime) -> set[str]:
        tbl = contacts_table(self.schema)
        stmt = select(tbl.c.id).where(tbl.c.updated_at >= start, tbl.c.updated_at < end)
        with self.engine.connect() as conn:
            return set(conn.execute(stmt).scalars())

    def source_count(self) -> int:
        tbl = contacts_table(self.schema)
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(tbl)).scalar_one()

    def notifications(self) -> list[dict[str, Any]]:
        from notifier import read_notifications

        return read_notifications(self.notifications_path)

    # -- what Airflow recorded of the run (its metadata DB) ----------------------------------------
    def _metadata(self, sql: str, **params: Any) -> list[Any]:
        engine = create_engine(f"sqlite:///{self.home / 'airflow.db'}")
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(sql), params))
        finally:
            engine.dispose()

    def note(self, run: Run) -> str | None:
        rows = self._metadata(
            "SELECT n.content FROM dag_run_note n JOIN dag_run r ON r.id = n.dag_run_id"
            " WHERE r.dag_id = :dag_id AND r.run_id = :run_id",
            dag_id=run.dag_id,
            run_id=run.run_id,
        )
        return rows[0][0] if rows else None

    def task_instances(self, run: Run) -> dict[str, int]:
        rows = self._metadata(
            "SELECT task_id, count(*) FROM task_instance WHERE dag_id = :dag_id AND run_id = :run_id"
            " GROUP BY task_id",
            dag_id=run.dag_id,
            run_id=run.run_id,
        )
        return dict(rows)  # type: ignore[arg-type]

    def asset_events(self, run: Run) -> list[str]:
        rows = self._metadata(
            "SELECT a.uri FROM asset_event e JOIN asset a ON a.id = e.asset_id"
            " WHERE e.source_dag_id = :dag_id AND e.source_run_id = :run_id",
            dag_id=run.dag_id,
            run_id=run.run_id,
        )
        return [uri for (uri,) in rows]


@dataclass
class ApiServer:
    """``airflow api-server`` on the session's Airflow home, with one API user for the run notes."""

    url: str
    user: str = "growthhub-notes"
    password: str = "notes-password"

    @property
    def env(self) -> dict[str, str]:
        """What a run needs to write its note: the connection to this server."""
        conn = {"conn_type": "http", "host": self.url, "login": self.user, "password": self.password}
        return {"AIRFLOW_CONN_AIRFLOW_API_DEFAULT": json.dumps(conn)}


@pytest.fixture(scope="module")
def api_server(airflow_home: Path) -> Iterator[ApiServer]:
    server = ApiServer(f"http://127.0.0.1:{free_port()}")
    passwords = airflow_home / "api_passwords.json"
    passwords.write_text(json.dumps({server.user: server.password}))
    env = _airflow_env(airflow_home) | {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{server.user}:user",  # may edit DAG runs
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
    }
    port = server.url.rsplit(":", 1)[1]
    args = [AIRFLOW, "api-server", "--apps", "core", "--host", "127.0.0.1", "--port", port]
    with (airflow_home / f"api-server-{port}.log").open("w") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _answers(f"{server.url}/api/v2/monitor/health"):
            assert proc.poll() is None, "api-server exited"
            assert time.monotonic() < deadline, "api-server did not answer"
            time.sleep(0.5)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


@pytest.fixture(scope="session")
def pg_engine() -> Iterator[Engine]:
    engine = create_engine(PG_URL)
    yield engine
    engine.dispose()


def _harness(
    home: Path, tmp: Path, engine: Engine, server: SandboxProcess, make_config_data: Callable[..., Any]
) -> Harness:
    admin = SandboxAdmin(server.base_url)
    admin.reset()
    h = Harness(home, tmp, engine, f"ghdag_{uuid.uuid4().hex[:10]}", admin, server.base_url)
    h.write_config(make_config_data)
    return h


def _drop(h: Harness) -> None:
    h.sandbox.close()
    with h.engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{h.schema}" CASCADE'))


@pytest.fixture
def harness(
    airflow_home: Path,
    tmp_path: Path,
    pg_engine: Engine,
    sandbox_server: SandboxProcess,
    make_config_data: Callable[..., dict[str, Any]],
) -> Iterator[Harness]:
    h = _harness(airflow_home, tmp_path, pg_engine, sandbox_server, make_config_data)
    yield h
    _drop(h)


# --- (1) and (2): a scheduled interval --------------------------------------------------------

INTERVAL_END = T0 + timedelta(hours=2)  # logical date of a manual run: the interval ending there
INTERVAL = (T0 + timedelta(hours=1), INTERVAL_END)


def test_scheduled_interval_syncs_exactly_its_rows(harness: Harness) -> None:
    harness.seed(160, span=timedelta(hours=4))
    expected = harness.keys_updated_in(*INTERVAL)
    assert 0 < len(expected) < harness.source_count()

    run = harness.run(SYNC_DAG_ID, INTERVAL_END)

    assert run.state == "success", run.tail()
    ledger = harness.rows("ledger")
    assert {r["source_key"] for r in ledger} == expected
    contacts = harness.sandbox.contacts(LOCATION_ID)
    assert {c["id"] for c in contacts} == {r["contact_id"] for r in ledger}
    assert harness.upserts() == {"200": len(expected)}
    assert harness.rows("quarantine") == []
    (run_row,) = harness.rows("runs")
    assert (run_row["window_start"], run_row["window_end"]) == INTERVAL
    assert (run_row["extracted"], run_row["created"], run_row["status"]) == (
        len(expected),
        len(expected),
        "success",
    )


def test_second_run_of_the_same_interval_sends_nothing(harness: Harness) -> None:
    harness.seed(160, span=timedelta(hours=4))
    first = harness.run(SYNC_DAG_ID, INTERVAL_END)
    assert first.state == "success", first.tail()
    upserts, contacts = harness.upserts(), harness.sandbox.contacts(LOCATION_ID)
    ledger = harness.rows("ledger")

    second = harness.run(SYNC_DAG_ID, INTERVAL_END)

    assert second.state == "success", second.tail()
    assert second.run_id != first.run_id
    assert harness.upserts() == upserts
    assert harness.sandbox.contacts(LOCATION_ID) == contacts
    assert harness.rows("ledger") == ledger
    runs = {r["run_id"]: r for r in harness.rows("runs")}
    again = runs[second.run_id]
    assert again["extracted"] == again["unchanged"] == len(ledger)
    assert (again["created"], again["updated"], again["rejected"], again["deferred"]) == (0, 0, 0, 0)


def test_consecutive_intervals_sync_each_row_once(harness: Harness) -> None:
    # what `airflow backfill create` does run by run (a backfill itself needs a running scheduler)
    harness.seed(150, span=timedelta(hours=3))
    ends = [T0 + timedelta(hours=h) for h in (1, 2, 3)]

    runs = [harness.run(SYNC_DAG_ID, end) for end in ends]

    assert [r.state for r in runs] == ["success"] * 3, runs[-1].tail()
    assert harness.upserts() == {"200": 150}
    assert len(harness.sandbox.contacts(LOCATION_ID)) == 150
    rows = {r["run_id"]: r for r in harness.rows("runs")}
    for run, end in zip(runs, ends, strict=True):
        expected = harness.keys_updated_in(end - timedelta(hours=1), end)
        assert (rows[run.run_id]["extracted"], rows[run.run_id]["created"]) == (len(expected), len(expected))
    assert {r["source_key"] for r in harness.rows("ledger")} == harness.keys_updated_in(T0, ends[-1])


# --- (3) the replay ------------------------------------------------------------------------------


def test_quarantined_rows_fixed_at_the_source_are_resolved_by_the_replay(
    harness: Harness, api_server: ApiServer
) -> None:
    harness.seed(150, span=timedelta(minutes=50), bad_share=0.08)
    sync = harness.run(SYNC_DAG_ID, T0 + timedelta(hours=1))
    assert sync.state == "success", sync.tail()
    quarantined = {r["source_key"]: r for r in harness.rows("quarantine") if r["status"] == "open"}
    assert quarantined, "the seed should have produced quarantined rows"
    for key in quarantined:  # fix every reason at once: a unique valid email, no bad phone or birth date
        modify_contacts(
            harness.engine,
            [key],
            T0 + timedelta(hours=3),
            schema=harness.schema,
            email=f"fixed.{key.lower()}@example.com",
            phone=None,
            date_of_birth=None,
        )
    before = harness.upserts().get("200", 0)

    replay = harness.run(REPLAY_DAG_ID, T0 + timedelta(hours=4), env_extra=api_server.env)

    assert replay.state == "success", replay.tail()
    n = len(quarantined)
    assert f"| default | {n} | 0 | {n} | 0 | 0 | 0 | 0 | 0 |" in (harness.note(replay) or "").splitlines()
    after = {r["source_key"]: r for r in harness.rows("quarantine")}
    assert {k: after[k]["status"] for k in quarantined} == dict.fromkeys(quarantined, "resolved")
    emails = {(c.get("email") or "").lower() for c in harness.sandbox.contacts(LOCATION_ID)}
    assert {f"fixed.{k.lower()}@example.com" for k in quarantined} <= emails
    assert set(quarantined) <= {r["source_key"] for r in harness.rows("ledger")}
    assert harness.upserts()["200"] == before + len(quarantined)


# --- (4) alerting ---------------------------------------------------------------------------------


def test_failed_run_sends_exactly_one_notification_naming_the_cause(harness: Harness) -> None:
    harness.seed(40, span=timedelta(minutes=50))

    run = harness.run(SYNC_DAG_ID, T0 + timedelta(hours=1), token="not-a-valid-token")

    assert run.state == "failed", run.tail()
    # the plan's one live check found the token bad: no retry, no batch, no upsert
    assert harness.sandbox.stats()["requests"].get("GET /contacts/{contactId}") == {"401": 1}
    assert harness.upserts() == {}
    (note,) = harness.notifications()
    assert note["dag_id"] == SYNC_DAG_ID
    assert note["run_id"] == run.run_id
    assert note["text"].splitlines()[0] == (
        "GrowthHub sync: GrowthHub rejected the token (401) for location default: "
        "fix connection growthhub_default, then clear the run"
    )
    assert harness.sandbox.contacts(LOCATION_ID) == []


def test_threshold_breach_sends_exactly_one_notification(
    harness: Harness, make_config_data: Callable[..., Any]
) -> None:
    harness.write_config(make_config_data, quality={"reject_rate_threshold": 0.05})
    harness.seed(80, span=timedelta(minutes=50), bad_share=0.2)

    run = harness.run(SYNC_DAG_ID, T0 + timedelta(hours=1))

    assert run.state == "success", run.tail()
    (note,) = harness.notifications()
    assert note["dag_id"] == SYNC_DAG_ID
    assert note["run_id"] == run.run_id
    assert "reject rate over 5.0%" in note["text"]
    assert "top errors:" in note["text"]
    assert "quarantined=" in note["text"]


def test_successful_run_under_the_threshold_sends_no_notification(harness: Harness) -> None:
    harness.seed(40, span=timedelta(minutes=50))

    run = harness.run(SYNC_DAG_ID, T0 + timedelta(hours=1))

    assert run.state == "success", run.tail()
    assert harness.notifications() == []
    # the task logs of a successful run (in the output of `airflow dags test`) hold no ERROR line
    assert run.error_lines() == []


def test_read_back_differences_send_exactly_one_notification(harness: Harness) -> None:
    harness.seed(40, span=timedelta(minutes=50), bad_share=0.0)
    first = harness.run(SYNC_DAG_ID, T0 + timedelta(hours=1))
    assert first.state == "success", first.tail()
    assert harness.notifications() == []
    tbl = contacts_table(harness.schema)
    with harness.engine.connect() as conn:
        keys = list(conn.execute(select(tbl.c.id).where(tbl.c.gender.in_(("male", "female")))).scalars())
    at = T0 + timedelta(hours=1, minutes=10)
    modify_contacts(harness.engine, keys, at, schema=harness.schema, gender="other")
    harness.sandbox.set_faults(ignore_fields={"update": ["gender"], "create": []})  # 200, gender kept

    run = harness.run(SYNC_DAG_ID, T0 + timedelta(hours=2))

    assert run.state == "success", run.tail()  # the rows are synced; the difference is alerted
    row = next(r for r in harness.rows("runs") if r["run_id"] == run.run_id)
    assert row["updated"] == len(keys)
    assert row["verify_checked"] == row["verify_mismatched"] == 1  # 0.5 % of the sent rows, at least one
    assert list(row["details"]["verify"]["fields"]) == ["gender"]
    (note,) = harness.notifications()
    assert note["run_id"] == run.run_id
    assert note["text"].splitlines()[0] == (
        "GrowthHub sync: read-back found contacts GrowthHub did not store as sent (default 1 of 1 "
        "checked); fields: gender 1; see the run row's details.verify"
    )


# --- (5) dry run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run(
    airflow_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pg_engine: Engine,
    sandbox_server: SandboxProcess,
    make_config_data: Callable[..., dict[str, Any]],
    api_server: ApiServer,
) -> Iterator[tuple[Harness, Run]]:
    h = _harness(
        airflow_home, tmp_path_factory.mktemp("dry_run"), pg_engine, sandbox_server, make_config_data
    )
    h.seed(60, span=timedelta(minutes=50), bad_share=0.1)
    run = h.run(SYNC_DAG_ID, T0 + timedelta(hours=1), {"dry_run": True}, env_extra=api_server.env)
    yield h, run
    _drop(h)


def test_dry_run_succeeds(dry_run: tuple[Harness, Run]) -> None:
    _, run = dry_run
    assert run.state == "success", run.tail()


def test_dry_run_sends_nothing_to_the_sandbox(dry_run: tuple[Harness, Run]) -> None:
    h, _ = dry_run
    assert h.upserts() == {}
    assert h.sandbox.contacts(LOCATION_ID) == []


@pytest.mark.parametrize("table", ["ledger", "quarantine", "pending"])
def test_dry_run_writes_no_state_rows(dry_run: tuple[Harness, Run], table: str) -> None:
    h, _ = dry_run
    assert h.rows(table) == []


def test_dry_run_records_only_a_run_row_flagged_dry_run(dry_run: tuple[Harness, Run]) -> None:
    # the runs table has a dry_run column: finalize_run records dry runs there, flagged
    h, run = dry_run
    assert [(r["run_id"], r["dry_run"]) for r in h.rows("runs")] == [(run.run_id, True)]


def test_dry_run_note_starts_with_dry_run(dry_run: tuple[Harness, Run]) -> None:
    h, run = dry_run
    note = h.note(run)
    assert note is not None, run.tail()
    assert note.startswith("DRY RUN")
    assert "| default | 60 |" in note


def test_dry_run_emits_no_asset_event(dry_run: tuple[Harness, Run]) -> None:
    h, run = dry_run
    assert h.asset_events(run) == []


# --- (6) what the operator sees: the run's note, its Asset event, its metrics -------------------


def test_run_note_asset_event_and_metrics_show_what_the_run_recorded(
    harness: Harness, api_server: ApiServer, statsd_listener: Any
) -> None:
    harness.seed(60, span=timedelta(minutes=50), bad_share=0.1)
    statsd = {
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(statsd_listener.port),
    }

    run = harness.run(SYNC_DAG_ID, T0 + timedelta(hours=1), env_extra=api_server.env | statsd)

    assert run.state == "success", run.tail()
    (row,) = harness.rows("runs")
    note = harness.note(run)
    assert note is not None, run.tail()
    assert "| default | " + " | ".join(str(row[c]) for c in RUN_COUNTS) + " |" in note.splitlines()
    reason, n = next(iter(row["details"]["reasons"].items()))  # the most frequent
    assert f"`{reason}` {n}" in note
    assert "[quarantine](/growthhub/quarantine?location=default)" in note
    assert harness.asset_events(run) == [f"growthhub://{LOCATION_ID}/contacts"]
    lines = statsd_listener.lines()
    assert f"airflow.growthhub.sync.rows.default.created:{row['created']}|c" in lines
    assert f"airflow.growthhub.sync.reasons.default.{reason}:{n}|c" in lines
    assert any(line.startswith("airflow.growthhub.sync.duration.default:") for line in lines)


# --- (7) an agency: 50 locations from a column, one run --------------------------------------

AGENCY_CONN = "growthhub_agency"
UNLIMITED = {"burst": 1_000_000, "intervalMs": 10_000, "daily": 1_000_000}


def _route_rows(h: Harness, values: list[str | None]) -> dict[str, str | None]:
    """Add the ``location_id`` column; row i (by key) names ``values[i % len(values)]``."""
    tbl = contacts_table(h.schema)
    with h.engine.begin() as conn:
        conn.execute(text(f'ALTER TABLE "{h.schema}".crm_contacts ADD COLUMN location_id TEXT'))
        keys = list(conn.execute(select(tbl.c.id).order_by(tbl.c.id)).scalars())
        routed = {k: values[i % len(values)] for i, k in enumerate(keys)}
        for key, value in routed.items():
            conn.execute(
                text(f'UPDATE "{h.schema}".crm_contacts SET location_id = :v WHERE id = :k'),
                {"v": value, "k": key},
            )
    return routed


def test_an_agency_run_syncs_50_locations_from_a_column_in_a_few_tasks(
    harness: Harness, make_config_data: Callable[..., Any]
) -> None:
    agency = harness.sandbox.create_agency("acme", locations=49, uninstalled=[48], rateLimit=UNLIMITED)
    installed, uninstalled = list(agency.location_ids[:48]), agency.location_ids[48]
    values: list[str | None] = [*installed, uninstalled, "loc-unknown", None]
    harness.write_config(make_config_data, locations={"from_column": "location_id", "conn_id": AGENCY_CONN})
    harness.seed(51 * 4, span=timedelta(minutes=50))
    routed = _route_rows(harness, values)
    conn = {
        "conn_type": "growthhub",
        "host": harness.base_url,
        "password": agency.token,
        "extra": {
            "location_id": "",
            "company_id": agency.company_id,
            "app_id": agency.app_id,
            "client_id": agency.client_id,
            "client_secret": agency.client_secret,
            "refresh_token_file": str(harness.tmp / "agency-tokens.json"),
            "timeout": 10,
        },
    }

    run = harness.run(
        SYNC_DAG_ID,
        T0 + timedelta(hours=1),
        env_extra={f"AIRFLOW_CONN_{AGENCY_CONN.upper()}": json.dumps(conn)},
    )

    assert run.state == "success", run.tail()
    instances = harness.task_instances(run)
    assert sum(instances.values()) <= 20, instances
    assert set(instances) == {"plan", "sync", "finalize", "publish", "report"}
    ledger = harness.rows("ledger")
    for location_id in installed:
        synced = {r["source_key"] for r in ledger if r["location"] == location_id}
        assert synced <= {k for k, v in routed.items() if v == location_id}
        assert len(harness.sandbox.contacts(location_id)) == len(synced)
    assert harness.sandbox.contacts(uninstalled) == []
    held = {(r["location"], r["reason_codes"]) for r in harness.rows("quarantine") if r["source_key"]}
    assert {
        (uninstalled, "location_not_installed"),
        ("loc-unknown", "location_unknown"),
        ("_unrouted", "location_missing"),
    } <= held
    runs = {r["location"]: r for r in harness.rows("runs")}
    assert set(runs) == {*installed, uninstalled, "loc-unknown", "_unrouted"}
    assert runs[uninstalled]["quarantined"] == sum(v == uninstalled for v in routed.values())
    assert sorted(harness.asset_events(run)) == sorted(
        f"growthhub://{lid}/contacts" for lid in installed if runs[lid]["created"]
    )
    assert harness.upserts().get("200") == sum(runs[lid]["created"] for lid in installed)


def test_one_location_refused_fails_the_run_with_one_alert_naming_it_while_the_others_sync(
    harness: Harness, make_config_data: Callable[..., Any]
) -> None:
    locations = [
        {"name": "default", "location_id": LOCATION_ID, "conn_id": "growthhub_default"},
        {"name": "east", "location_id": "loc-east", "conn_id": "growthhub_east"},
    ]
    harness.write_config(make_config_data, locations=locations)
    harness.seed(40, span=timedelta(minutes=50))
    east = {
        "conn_type": "growthhub",
        "host": harness.base_url,
        "password": "revoked",
        "extra": {"timeout": 10},
    }

    run = harness.run(
        SYNC_DAG_ID, T0 + timedelta(hours=1), env_extra={"AIRFLOW_CONN_GROWTHHUB_EAST": json.dumps(east)}
    )

    assert run.state == "failed", run.tail()
    assert len(harness.sandbox.contacts(LOCATION_ID)) == 40, "the other location synced"
    runs = {r["location"]: r for r in harness.rows("runs")}
    assert (runs["default"]["status"], runs["default"]["created"]) == ("success", 40)
    assert runs["east"]["status"] == "failed"
    (note,) = harness.notifications()
    assert note["text"].splitlines()[0] == (
        "GrowthHub sync: GrowthHub rejected the token (401) for location east: "
        "fix connection growthhub_east, then clear the run"
    )
    assert "locations: east" in note["text"]
