"""``make demo`` and ``make ui`` (scripts/demo.py): runs go through the scheduler and stay to be looked at.

The demo runs once per module, small (``--rows``), in a temporary work dir; the tests read what it
left: the home's ``airflow.cfg`` as Airflow resolves it, the metadata DB, the task logs; then ``ui``
serves that home. The agency demo's setup (``--locations``) is tested on its own, against the sandbox.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import column, create_engine, select

from growthhub_provider.hooks.growthhub import GrowthHubHook
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess, free_port
from growthhub_sync.config import load_config
from growthhub_sync.demo import contacts_table, seed_demo
from growthhub_sync.orchestration import SYNC_DAG_ID

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo.py"
RUNS = ["demo_hourly", "demo_initial_load"]


def _script(name: str) -> types.ModuleType:
    """scripts/<name>.py, imported from its file (scripts/ is not a package)."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))  # for the scripts' imports of each other
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    """No AIRFLOW_* setting of the caller's: only the demo's home may decide."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}


@dataclass
class DemoResult:
    workdir: Path
    port: int
    output: str

    @property
    def home(self) -> Path:
        return self.workdir / ".airflow"

    def query(self, sql: str) -> list[dict[str, Any]]:
        with sqlite3.connect(self.home / "airflow.db") as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(sql)]

    def task_logs(self) -> list[Path]:
        return sorted((self.home / "logs").glob(f"dag_id={SYNC_DAG_ID}/**/*.log"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    workdir = tmp_path_factory.mktemp("demo")
    port = free_port()
    done = subprocess.run(
        [sys.executable, str(DEMO), "--workdir", str(workdir), "--port", str(port), "--rows", "300"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    logs = "\n".join(
        f"== {p.name}\n{p.read_text()[-3000:]}" for p in (workdir / "var" / "demo").glob("*.log")
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{logs}"
    return DemoResult(workdir, port, done.stdout)


class TestDemoHome:
    def test_reset_writes_a_fresh_config_and_keeps_the_login_private_and_stable(self, tmp_path: Path) -> None:
        demo_airflow = _script("demo_airflow")
        home = demo_airflow.DemoHome(tmp_path / ".airflow", ROOT)
        home.reset(8123)
        password = home.password()
        (home.log_folder / "old.log").parent.mkdir(parents=True)
        (home.log_folder / "old.log").write_text("from an earlier demo")
        home.db.write_text("an earlier demo's runs")

        home.reset(8124)

        assert home.password() == password
        assert home.path.stat().st_mode & 0o077 == 0  # airflow.cfg holds the JWT secret
        assert home.password_file.stat().st_mode & 0o077 == 0
        assert not home.db.exists()
        assert not home.log_folder.exists()
        assert (home.setting("api", "port"), home.setting("api", "base_url")) == (
            "8124",
            "http://127.0.0.1:8124",
        )
        assert home.setting("api", "host") == "127.0.0.1"


class TestMakeTargets:
    def test_demo_and_ui_share_one_port_that_make_passes_on(self) -> None:
        done = subprocess.run(
            ["make", "-n", "demo", "ui", "UI_PORT=8123"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        commands = [line for line in done.stdout.splitlines() if "scripts/demo.py" in line]
        assert [c.split("scripts/demo.py", 1)[1] for c in commands] == [" --port 8123", " ui --port 8123"]

    def test_locations_make_the_demo_an_agency(self) -> None:
        done = subprocess.run(
            ["make", "-n", "demo", "UI_PORT=8123", "LOCATIONS=20"], cwd=ROOT, capture_output=True, text=True
        )
        commands = [line for line in done.stdout.splitlines() if "scripts/demo.py" in line]
        assert [c.split("scripts/demo.py", 1)[1] for c in commands] == [" --port 8123 --locations 20"]

    def test_ui_without_a_demo_home_says_to_run_the_demo_first(self, tmp_path: Path) -> None:
        done = subprocess.run(
            [sys.executable, str(DEMO), "ui", "--workdir", str(tmp_path), "--port", str(free_port())],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (done.returncode, done.stderr.strip()) == (1, "No demo home yet: run `make demo` first.")


class TestAgencySetup:
    """What ``--locations`` sets up before Airflow starts: the sandbox's agency, the table, the config."""

    def test_rows_spread_over_the_agency_and_airflow_reaches_it_through_the_demos_config(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        demo_agency, demo_script = _script("demo_agency"), _script("demo")
        demo = demo_script.Demo(tmp_path)
        demo.var.mkdir(parents=True)
        engine = create_engine(f"sqlite:///{demo.warehouse}")
        seed_demo(engine, 300)
        monkeypatch.setenv("AIRFLOW_HOME", str(demo.home.path))  # the agency's token state goes there
        with SandboxProcess() as sandbox:
            agency = demo_script._agency(demo, SandboxAdmin(sandbox.base_url), engine, 3)
            for name, value in demo.env(sandbox.base_url, demo.agency()).items():
                monkeypatch.setenv(name, value)
            installed = [loc.id for loc in GrowthHubHook(demo_agency.CONN_ID).installed_locations()]
            # a location's token is minted, and the location knows the config's custom field
            location = GrowthHubHook(demo_agency.CONN_ID, location_id=installed[-1])
            lifetime_value = {"key": "lifetime_value", "field_value": 12}
            contact = {"email": "ada@example.com", "customFields": [lifetime_value]}
            assert location.upsert_contact(contact).contact_id

        assert len(agency.agency.location_ids) == 4
        assert installed == list(agency.installed) == list(agency.agency.location_ids[:3])
        assert demo.agency() == agency  # what `make ui` serves again
        table = contacts_table()
        location = column(demo_agency.LOCATION_COLUMN)
        with engine.connect() as conn:
            located = dict(conn.execute(select(table.c.id, location).select_from(table)).all())
            edited_rows = select(location).select_from(table).where(agency.edited_rows())
            edited = set(conn.execute(edited_rows).scalars())
        assert len(located) == 300
        assert set(located.values()) == {*agency.agency.location_ids, demo_agency.UNKNOWN_LOCATION}
        unknown = sorted(key for key, loc in located.items() if loc == demo_agency.UNKNOWN_LOCATION)
        assert unknown == [f"C{i:08d}" for i in range(295, 300)]
        assert edited == {agency.installed[0]}  # the hourly edits leave the other locations quiet

        config = load_config()  # GROWTHHUB_SYNC_CONFIG: the demo's own
        shipped = load_config(demo_agency.DEFAULT_CONFIG_PATH)
        assert os.environ["GROWTHHUB_SYNC_CONFIG"] == str(demo.sync_config)
        assert (config.location_routing.from_column, config.location_routing.conn_id) == (
            "location_id",
            "growthhub_agency",
        )
        assert config.mapping == shipped.mapping
        assert config.quality == shipped.quality


@pytest.mark.integration
@pytest.mark.slow
class TestMakeDemo:
    def test_airflow_reads_the_repos_dags_and_plugins_and_no_examples(self, demo: DemoResult) -> None:
        script = (
            "import json; from airflow.configuration import conf; print(json.dumps({k: conf.get('core', k) "
            "for k in ('dags_folder', 'plugins_folder', 'load_examples', 'executor')}))"
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            env={**_env(), "AIRFLOW_HOME": str(demo.home)},
            capture_output=True,
            text=True,
            check=True,
        )
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen == {
            "dags_folder": str(ROOT / "dags"),
            "plugins_folder": str(ROOT / "plugins"),
            "load_examples": "False",
            "executor": "LocalExecutor",
        }

    def test_runs_are_the_schedulers_with_past_logical_dates_and_no_negative_duration(
        self, demo: DemoResult
    ) -> None:
        runs = demo.query(f"SELECT * FROM dag_run WHERE dag_id = '{SYNC_DAG_ID}' ORDER BY run_id")
        assert [(r["run_id"], r["state"], r["run_type"]) for r in runs] == [
            (run_id, "success", "manual") for run_id in RUNS
        ]
        for run in runs:
            logical, start, end = (
                datetime.fromisoformat(run[k]) for k in ("logical_date", "start_date", "end_date")
            )
            assert logical <= start <= end, run
        tis = demo.query(f"SELECT * FROM task_instance WHERE dag_id = '{SYNC_DAG_ID}'")
        assert {t["run_id"] for t in tis} == set(RUNS)
        # a run triggered in the UI (a replay from the GrowthHub page) runs, and none starts by itself
        assert demo.query("SELECT dag_id, is_paused FROM dag ORDER BY dag_id") == [
            {"dag_id": "growthhub_contact_sync", "is_paused": 0},
            {"dag_id": "growthhub_quarantine_replay", "is_paused": 0},
        ]
        assert all(t["state"] == "success" and t["duration"] >= 0 for t in tis), tis

    def test_every_task_has_its_log_in_the_homes_log_folder_and_no_error_line(self, demo: DemoResult) -> None:
        tis = demo.query(f"SELECT * FROM task_instance WHERE dag_id = '{SYNC_DAG_ID}'")
        expected = set()
        for t in tis:
            mapped = f"map_index={t['map_index']}/" if t["map_index"] >= 0 else ""
            expected.add(
                demo.home
                / "logs"
                / f"dag_id={SYNC_DAG_ID}"
                / f"run_id={t['run_id']}"
                / f"task_id={t['task_id']}"
                / f"{mapped}attempt={t['try_number']}.log"
            )
        assert set(demo.task_logs()) == expected
        events = [json.loads(line) for path in expected for line in path.read_text().splitlines() if line]
        errors = [e for e in events if e.get("level") in {"error", "critical"}]
        assert errors == []
        # the demo's data is 12 % bad on purpose: run 1 goes over the 5 % reject-rate threshold and
        # alerts, a WARNING in a run that succeeded
        alerts = [(e["run_id"], e["level"]) for e in events if e.get("logger") == "growthhub_sync.alerts"]
        assert alerts == [("demo_initial_load", "warning")]

    def test_each_run_carries_its_counts_as_its_note(self, demo: DemoResult) -> None:
        notes = demo.query(
            "SELECT r.run_id, n.content FROM dag_run r JOIN dag_run_note n ON n.dag_run_id = r.id "
            f"WHERE r.dag_id = '{SYNC_DAG_ID}' ORDER BY r.run_id"
        )
        assert [n["run_id"] for n in notes] == ["demo_hourly", "demo_initial_load"]
        for note in notes:
            assert note["content"].startswith("| location | extracted | unchanged |"), note
            assert "/growthhub/quarantine?location=default" in note["content"]

    def test_output_says_how_to_open_the_ui_and_log_in(self, demo: DemoResult) -> None:
        password = json.loads((demo.home / "simple_auth_manager_passwords.json").read_text())["admin"]
        assert "make ui" in demo.output
        assert f"http://127.0.0.1:{demo.port}  (login admin / {password};" in demo.output


@pytest.mark.integration
@pytest.mark.slow
def test_agency_demo_prints_each_run_per_location(tmp_path: Path) -> None:
    args = ["--workdir", str(tmp_path), "--port", str(free_port()), "--rows", "300", "--locations", "3"]
    done = subprocess.run(
        [sys.executable, str(DEMO), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    agency = json.loads((tmp_path / "var" / "demo" / "agency.json").read_text())
    *installed, uninstalled = agency["location_ids"]
    with sqlite3.connect(tmp_path / "var" / "demo" / "warehouse.db") as conn:
        query = "SELECT run_id, location, extracted, quarantined FROM growthhub_sync_runs"
        runs = conn.execute(query).fetchall()
    initial_load = [row for row in runs if row[0] == "demo_initial_load"]
    first = {location: (extracted, quarantined) for _, location, extracted, quarantined in initial_load}
    # row n goes to location n % 4; the last 5 rows name an unknown id
    assert first.keys() == {*installed, uninstalled, "demo-agency-loc-unknown"}
    assert (first[uninstalled], first["demo-agency-loc-unknown"]) == ((73, 73), (5, 5))
    assert sum(extracted for extracted, _ in first.values()) == 300
    # the hourly edits are all in the first location: the other two are quiet and have no run row
    assert [location for run, location, *_ in runs if run == "demo_hourly"] == installed[:1]
    assert "quiet (installed, no rows in the run's window): 0 of 3" in done.stdout
    assert "quiet (installed, no rows in the run's window): 2 of 3" in done.stdout
    assert f"quarantined for their location: 73 rows of the uninstalled {uninstalled}" in done.stdout
    assert "contacts in the agency's 3 installed locations" in done.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_make_ui_serves_the_demos_runs_and_logs_until_stopped(demo: DemoResult) -> None:
    port = free_port()  # not the demo's: the UI can move to another port
    base = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen(
        [sys.executable, str(DEMO), "ui", "--workdir", str(demo.workdir), "--port", str(port)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_healthy(ui, f"{base}/api/v2/monitor/health")
        password = json.loads((demo.home / "simple_auth_manager_passwords.json").read_text())["admin"]
        session = requests.Session()
        assert (
            session.post(f"{base}/auth/token", json={"username": "admin", "password": "wrong"}).status_code
            == 401
        )
        token = session.post(f"{base}/auth/token", json={"username": "admin", "password": password}).json()
        session.headers["Authorization"] = f"Bearer {token['access_token']}"

        runs = session.get(f"{base}/api/v2/dags/{SYNC_DAG_ID}/dagRuns").json()["dag_runs"]
        assert sorted((r["dag_run_id"], r["state"]) for r in runs) == [(r, "success") for r in RUNS]
        log = session.get(f"{base}/api/v2/dags/{SYNC_DAG_ID}/dagRuns/demo_hourly/taskInstances/report/logs/1")
        assert log.ok
        sources = [str(e["event"]) for e in log.json()["content"] if str(e.get("event")).endswith(".log")]
        assert sources == [
            str(demo.home / "logs" / f"dag_id={SYNC_DAG_ID}/run_id=demo_hourly/task_id=report/attempt=1.log")
        ]
    finally:
        ui.send_signal(signal.SIGTERM)
        output, _ = ui.communicate(timeout=60)
    assert ui.returncode == 0, output
    assert f"Airflow UI: {base}" in output
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/api/v2/monitor/health", timeout=2)


def _wait_healthy(process: subprocess.Popen[str], url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"`demo.py ui` exited {process.returncode}: {process.stdout.read() if process.stdout else ''}"
            )
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:  # not listening yet, or too busy starting to answer
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {timeout} s")
