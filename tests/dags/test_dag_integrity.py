"""DAG integrity: every file in ``dags/`` parses cheaply and declares what operators rely on.

Parsing happens on every DAG processor loop, so a DAG file must not touch the warehouse or the
GrowthHub API when it is imported: these tests parse with both unreachable. Closed loopback ports
catch any client (libpq included, which bypasses Python sockets: a connection attempt becomes an
import error); a refusing ``socket.connect`` catches and counts Python-level clients (HTTP). A broken
config must show up as an import error naming the key.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from copy import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from growthhub_sync.orchestration import REPLAY_DAG_ID, SYNC_DAG_ID

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(p.name for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))
DAG_IDS = [SYNC_DAG_ID, REPLAY_DAG_ID]
PARSE_BUDGET_S = 10.0

# Closed loopback ports: whatever tries to reach these at parse time fails (or hangs).
UNREACHABLE_PG = "postgresql+psycopg2://nobody@127.0.0.1:9/no_such_db"
UNREACHABLE_CONNS = {
    "AIRFLOW_CONN_WAREHOUSE_DEFAULT": "postgresql://nobody:secret@127.0.0.1:9/no_such_db",
    "AIRFLOW_CONN_GROWTHHUB_DEFAULT": (
        '{"conn_type": "growthhub", "host": "http://127.0.0.1:9", "password": "nope",'
        ' "extra": {"location_id": "loc-east"}}'
    ),
}
TWO_LOCATIONS: list[dict[str, Any]] = [
    {"name": "east", "location_id": "loc-east"},
    {"name": "west", "location_id": "loc-west", "filter": {"state": "CA"}},
]
Parsed = Any  # conftest.Parsed: a DagBag and the seconds parsing took
ParseDags = Callable[..., Any]


@pytest.fixture(scope="module")
def parsed(
    make_config_data: Callable[..., dict[str, Any]],
    dag_parser: ParseDags,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Parsed]:
    """``dags/`` parsed once: two locations, a custom schedule, warehouse and API unreachable."""
    path = tmp_path_factory.mktemp("config") / "sync_config.yaml"
    data = make_config_data(locations=TWO_LOCATIONS, source={"url": UNREACHABLE_PG}, schedule="15 */2 * * *")
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        yield dag_parser(mp, path, UNREACHABLE_CONNS)


def _dag(parsed: Parsed, dag_id: str) -> Any:
    dag = parsed.bag.dags.get(dag_id)
    assert dag is not None, f"{dag_id} not in DagBag; import errors: {parsed.import_errors}"
    return dag


def test_dag_folder_has_the_expected_files() -> None:
    assert DAG_FILES == ["growthhub_contact_sync.py", "growthhub_quarantine_replay.py"]


def test_every_dag_file_imports_without_errors(parsed: Parsed) -> None:
    assert parsed.import_errors == {}
    assert sorted(parsed.bag.dag_ids) == sorted(DAG_IDS)


@pytest.mark.parametrize("file_name", DAG_FILES)
def test_every_dag_file_defines_a_dag(parsed: Parsed, file_name: str) -> None:
    files = {Path(dag.fileloc).name for dag in parsed.bag.dags.values()}
    assert file_name in files


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_dag_has_tags(parsed: Parsed, dag_id: str) -> None:
    assert "growthhub" in _dag(parsed, dag_id).tags


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_dag_has_doc_md(parsed: Parsed, dag_id: str) -> None:
    doc = _dag(parsed, dag_id).doc_md
    assert doc
    assert len(doc.strip()) > 200


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_dag_has_an_owner(parsed: Parsed, dag_id: str) -> None:
    dag = _dag(parsed, dag_id)
    assert dag.default_args.get("owner") not in (None, "", "airflow")
    assert all(task.owner == dag.default_args["owner"] for task in dag.tasks)


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_dag_default_args_retry_with_backoff(parsed: Parsed, dag_id: str) -> None:
    args = _dag(parsed, dag_id).default_args
    assert args.get("retries", 0) >= 1
    assert args.get("retry_exponential_backoff") is True


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_dag_has_a_failure_callback(parsed: Parsed, dag_id: str) -> None:
    assert _dag(parsed, dag_id).on_failure_callback


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_dag_allows_one_active_run(parsed: Parsed, dag_id: str) -> None:
    assert _dag(parsed, dag_id).max_active_runs == 1


def test_report_task_of_the_sync_dag_never_retries(parsed: Parsed) -> None:
    # it sends the threshold alert: a retry would send it twice
    assert _dag(parsed, SYNC_DAG_ID).get_task("report").retries == 0


def test_sync_dag_schedule_is_a_cron_data_interval_timetable_from_the_config(parsed: Parsed) -> None:
    from airflow.sdk import CronDataIntervalTimetable

    timetable = _dag(parsed, SYNC_DAG_ID).timetable
    assert isinstance(timetable, CronDataIntervalTimetable)
    assert timetable.expression == "15 */2 * * *"


def test_sync_dag_does_not_catch_up(parsed: Parsed) -> None:
    assert _dag(parsed, SYNC_DAG_ID).catchup is False


def test_sync_dag_params(parsed: Parsed) -> None:
    params = _dag(parsed, SYNC_DAG_ID).params
    expected = {"full_refresh", "dry_run", "allow_mass_delete", "locations", "lookback_minutes"}
    assert set(params.keys()) == expected
    assert params["full_refresh"] is False
    assert params["dry_run"] is False
    assert params["allow_mass_delete"] is False
    assert params["locations"] == []
    assert params["lookback_minutes"] == 0


def test_sync_dag_locations_param_is_free_form(parsed: Parsed) -> None:
    # names or ids of discovered locations too: the plan checks them, parsing knows none
    spec = _dag(parsed, SYNC_DAG_ID).params.get_param("locations").schema
    assert spec["items"] == {"type": "string"}


def test_sync_dag_is_plan_sync_finalize_publish_report(parsed: Parsed) -> None:
    dag = _dag(parsed, SYNC_DAG_ID)
    assert set(dag.task_ids) == {"plan", "sync", "finalize", "publish", "report"}
    assert dag.get_task("plan").downstream_task_ids == {"sync", "finalize"}
    assert dag.get_task("sync").downstream_task_ids == {"finalize"}
    assert dag.get_task("finalize").downstream_task_ids == {"publish", "report"}


def test_sync_tasks_are_mapped_over_shards_in_the_api_pool(parsed: Parsed) -> None:
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    task = _dag(parsed, SYNC_DAG_ID).get_task("sync")
    assert isinstance(task, MappedOperator)
    assert task.pool == "growthhub_api"


def test_only_publish_emits_assets_through_the_alias(parsed: Parsed) -> None:
    # publish is skipped on a dry run; the alias resolves to one Asset per location that changed
    from airflow.sdk import AssetAlias

    dag = _dag(parsed, SYNC_DAG_ID)
    emitting = {t.task_id: t.outlets for t in dag.tasks if t.outlets}
    assert emitting == {"publish": [AssetAlias("growthhub_contacts")]}


def test_sync_dag_tasks_do_not_grow_with_locations(
    monkeypatch: pytest.MonkeyPatch, write_config: Callable[..., Path], dag_parser: ParseDags
) -> None:
    many = [{"name": f"loc{i}", "location_id": f"id{i}"} for i in range(300)]
    parsed = dag_parser(monkeypatch, write_config(locations=many), UNREACHABLE_CONNS)
    assert len(_dag(parsed, SYNC_DAG_ID).tasks) == 5


def test_a_config_routing_locations_by_column_parses(
    monkeypatch: pytest.MonkeyPatch, write_config: Callable[..., Path], dag_parser: ParseDags
) -> None:
    config = write_config(locations={"from_column": "state", "conn_id": "growthhub_agency"})
    parsed = dag_parser(monkeypatch, config, UNREACHABLE_CONNS)
    assert parsed.import_errors == {}
    assert len(_dag(parsed, SYNC_DAG_ID).tasks) == 5


def test_replay_dag_is_one_task_in_the_api_pool_then_report(parsed: Parsed) -> None:
    dag = _dag(parsed, REPLAY_DAG_ID)
    assert set(dag.task_ids) == {"replay", "report"}
    assert dag.get_task("replay").pool == "growthhub_api"
    assert dag.get_task("replay").downstream_task_ids == {"report"}


def test_replay_dag_params(parsed: Parsed) -> None:
    params = _dag(parsed, REPLAY_DAG_ID).params
    assert set(params.keys()) == {"locations", "stage", "reason", "keys", "max_rows", "dry_run"}


def test_replay_dag_takes_the_conf_the_quarantine_page_sends(parsed: Parsed) -> None:
    params = _dag(parsed, REPLAY_DAG_ID).params
    assert (params["keys"], params["reason"]) == ({}, [])  # by default: every row
    conf = {"locations": ["east"], "keys": {"east": ["C1", "C2"]}, "reason": ["email_invalid", "api_422"]}
    assert {name: copy(params.get_param(name)).resolve(value) for name, value in conf.items()} == conf


@pytest.mark.parametrize(
    ("name", "value"), [("reason", ["email"]), ("keys", {"east": "C1"}), ("keys", ["C1"])]
)
def test_replay_dag_refuses_an_unknown_code_or_keys_of_another_shape(
    parsed: Parsed, name: str, value: Any
) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        copy(_dag(parsed, REPLAY_DAG_ID).params.get_param(name)).resolve(value)


def test_replay_dag_is_manual_without_a_replay_schedule(parsed: Parsed) -> None:
    assert type(_dag(parsed, REPLAY_DAG_ID).timetable).__name__ == "NullTimetable"


def test_parse_is_quick_with_warehouse_and_api_unreachable(parsed: Parsed) -> None:
    assert parsed.import_errors == {}
    assert parsed.seconds < PARSE_BUDGET_S


@pytest.mark.parametrize(
    "source",
    [{"url": UNREACHABLE_PG}, {"conn_id": "warehouse_default"}],
    ids=["source-url", "source-connection"],
)
def test_parse_opens_no_network_connection(
    monkeypatch: pytest.MonkeyPatch,
    write_config: Callable[..., Path],
    dag_parser: ParseDags,
    source: dict[str, Any],
) -> None:
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise ConnectionRefusedError(f"no network at parse time: {address}")

    config = write_config(source=source, locations=TWO_LOCATIONS)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    parsed = dag_parser(monkeypatch, config, UNREACHABLE_CONNS)
    assert parsed.import_errors == {}
    assert attempts == []


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"schedule": "every hour please"}, "schedule"),
        ({"replay_schedule": "61 * * * *"}, "replay_schedule"),
        ({"lookback_minutes": -5}, "lookback_minutes"),
        ({"locations": []}, "locations"),
        ({"source": {"table": "contacts; drop table x"}}, "source.table"),
        ({"alerts": {"channels": [{"type": "pager"}]}}, "alerts.channels"),
    ],
    ids=["schedule", "replay_schedule", "lookback", "no-locations", "unsafe-table", "alert-channel"],
)
def test_bad_config_is_an_import_error_naming_the_key(
    monkeypatch: pytest.MonkeyPatch,
    write_config: Callable[..., Path],
    dag_parser: ParseDags,
    changes: dict[str, Any],
    key: str,
) -> None:
    parsed = dag_parser(monkeypatch, write_config(**changes), UNREACHABLE_CONNS)
    assert sorted(Path(f).name for f in parsed.import_errors) == DAG_FILES
    for error in parsed.import_errors.values():
        assert "invalid sync config" in error
        assert key in error


def test_missing_config_file_is_an_import_error_naming_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dag_parser: ParseDags
) -> None:
    missing = tmp_path / "nope.yaml"
    parsed = dag_parser(monkeypatch, missing, UNREACHABLE_CONNS)
    assert sorted(Path(f).name for f in parsed.import_errors) == DAG_FILES
    assert all(str(missing) in error for error in parsed.import_errors.values())
