"""Bad configuration fails before any row moves, with a message naming the problem (issue 6).

Only what ``tests/sync/test_sync_config.py`` does not cover already: errors surfacing through
``plan_sync`` / ``sync`` (what a task runs first), undefined connections, more unsafe names
(quotes, semicolons), presets without intervals, and identifiers that are safe but reserved.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from reliability_support import StrictJsonCRM, Warehouse, ledger, make_config, quarantine
from sqlalchemy import inspect, text

from growthhub_sync.config import ConfigError, parse_config
from growthhub_sync.demo import seed_demo
from growthhub_sync.pipeline import SyncOptions, plan_sync, sync

OPTS = SyncOptions(run_id="cfg", dag_id="tests", keep_results=False)


def _data(wh: Warehouse, tmp_path: Path) -> dict[str, Any]:
    return make_config(wh, tmp_path).model_dump(by_alias=True, exclude_none=True)


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node: Any = data
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    node[last] = value
    return data


@pytest.mark.parametrize(
    "name", ["users; drop table x", 'a"b', "a'b", "crm contacts", "1table", "tablé", "x" * 64, ""]
)
@pytest.mark.parametrize(
    "path",
    [
        "source.table",
        "source.key_column",
        "source.updated_at_column",
        "source.schema",
        "state.schema",
        "mapping.fields.email",
        "mapping.tags.column",
        "mapping.custom_fields.0.column",
        "mapping.inbound_dnd",
    ],
)
def test_unsafe_identifier_fails_at_load_naming_the_key(
    sqlite_wh: Warehouse, tmp_path: Path, path: str, name: str
) -> None:
    data = _set(_data(sqlite_wh, tmp_path), path, name)
    with pytest.raises(ConfigError) as err:
        parse_config(data, "cfg.yaml")
    message = str(err.value)
    key = path.removesuffix(".column") if path.endswith("email") else path
    assert key.split(".")[0] in message
    assert "cfg.yaml" in message


@pytest.mark.parametrize("value", ['a"b', "Call; drop table x"])
def test_unsafe_dnd_column_fails_at_load(sqlite_wh: Warehouse, tmp_path: Path, value: str) -> None:
    data = _set(_data(sqlite_wh, tmp_path), "mapping.dnd_settings", {"Email": value})
    with pytest.raises(ConfigError, match=r"mapping\.dnd_settings"):
        parse_config(data)


@pytest.mark.parametrize("prefix", ['a"', "x;", "a b", "x" * 21])
def test_unsafe_state_prefix_fails_at_load(sqlite_wh: Warehouse, tmp_path: Path, prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"state\.prefix"):
        parse_config(_set(_data(sqlite_wh, tmp_path), "state.prefix", prefix))


@pytest.mark.parametrize("schedule", ["@once", "@continuous", "61 * * * *", "* * *", "0 0 31 2 * * * *", ""])
@pytest.mark.parametrize("key", ["schedule", "replay_schedule"])
def test_invalid_schedule_fails_at_load_naming_the_key(
    sqlite_wh: Warehouse, tmp_path: Path, key: str, schedule: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: invalid schedule"):
        parse_config(_set(_data(sqlite_wh, tmp_path), key, schedule))


@pytest.mark.parametrize(
    "url",
    ["not a url", "postgresql://u@h:notaport/db", "://x", "sqlite//missing-colon.db"],
)
def test_malformed_url_fails_at_load_naming_source_url(
    sqlite_wh: Warehouse, tmp_path: Path, url: str
) -> None:
    with pytest.raises(ConfigError, match=r"source\.url"):
        parse_config(_set(_data(sqlite_wh, tmp_path), "source.url", url))


def test_url_with_unknown_driver_fails_at_plan_naming_the_driver(
    sqlite_wh: Warehouse, tmp_path: Path
) -> None:
    cfg = parse_config(
        _set(_data(sqlite_wh, tmp_path), "source.url", "postgresql+nosuchdriver://u@127.0.0.1/db")
    )
    with pytest.raises(Exception, match="nosuchdriver"):
        plan_sync(cfg, "default", None, options=OPTS)


@pytest.mark.parametrize(
    ("path", "column"),
    [
        ("mapping.fields.email", "e_mail"),
        ("mapping.fields.phone", "mobile"),
        ("source.key_column", "contact_id"),
        ("mapping.custom_fields.0.column", "ltv"),
        ("mapping.inbound_dnd", "inbound"),
    ],
)
def test_unknown_column_fails_at_plan_naming_it_and_writes_nothing(
    rel_warehouse: Warehouse, tmp_path: Path, path: str, column: str
) -> None:
    seed_demo(rel_warehouse.engine, 20, schema=rel_warehouse.schema)
    cfg = parse_config(_set(_data(rel_warehouse, tmp_path), path, column))
    crm = StrictJsonCRM()
    with pytest.raises(ConfigError) as err:
        sync(cfg, "default", None, OPTS, engine=rel_warehouse.engine, upserter=crm)
    assert f"column {column!r} not in crm_contacts" in str(err.value)
    assert path.split(".")[0] in str(err.value)
    assert crm.sent == []
    tables = inspect(rel_warehouse.engine).get_table_names(schema=rel_warehouse.schema)
    assert not [t for t in tables if t.startswith("growthhub_")], (
        "state written before the config was checked"
    )


def test_unknown_location_fails_at_plan_naming_it_and_the_known_ones(
    sqlite_wh: Warehouse, tmp_path: Path
) -> None:
    seed_demo(sqlite_wh.engine, 5)
    cfg = make_config(sqlite_wh, tmp_path)
    with pytest.raises(ConfigError, match=r"unknown location 'emea'; known: \['default'\]"):
        plan_sync(cfg, "emea", None, engine=sqlite_wh.engine, options=OPTS)


@pytest.mark.parametrize("location_id", ["", None])
def test_location_without_an_id_fails_at_load(
    sqlite_wh: Warehouse, tmp_path: Path, location_id: str | None
) -> None:
    with pytest.raises(ConfigError, match=r"locations\.0\.location_id"):
        parse_config(_set(_data(sqlite_wh, tmp_path), "locations.0.location_id", location_id))


def test_undefined_warehouse_connection_fails_at_plan_naming_it(
    sqlite_wh: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_WAREHOUSE_NOPE", raising=False)
    data = _data(sqlite_wh, tmp_path)
    del data["source"]["url"]
    cfg = parse_config(_set(data, "source.conn_id", "warehouse_nope"))
    with pytest.raises(Exception, match="warehouse_nope") as err:
        plan_sync(cfg, "default", None, options=OPTS)
    assert "defined" in str(err.value) or "not found" in str(err.value).lower()


def test_undefined_growthhub_connection_fails_at_plan_naming_it(
    sqlite_wh: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plan is where a DAG run should stop on a missing CRM connection, not inside every mapped batch."""
    monkeypatch.delenv("AIRFLOW_CONN_GROWTHHUB_NOPE", raising=False)
    seed_demo(sqlite_wh.engine, 5)
    cfg = parse_config(_set(_data(sqlite_wh, tmp_path), "locations.0.conn_id", "growthhub_nope"))
    with pytest.raises(Exception, match="growthhub_nope"):
        plan_sync(cfg, "default", None, engine=sqlite_wh.engine, options=OPTS)


@pytest.mark.parametrize(
    ("coordination", "match"),
    [
        ("redis_nope", r"coordination='redis_nope' is neither 'local' nor the id of a connection"),
        ("warehouse_pg", r"coordination='warehouse_pg' names a connection of type 'postgres'"),
    ],
)
def test_coordination_naming_no_redis_connection_fails_at_plan_naming_the_location(
    sqlite_wh: Warehouse,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    coordination: str,
    match: str,
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_REDIS_NOPE", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_PG", json.dumps({"conn_type": "postgres", "host": "db"}))
    monkeypatch.setenv(
        "AIRFLOW_CONN_GROWTHHUB_COORDINATED",
        json.dumps(
            {
                "conn_type": "growthhub",
                "host": "http://127.0.0.1:9",
                "password": "pit-unused",
                "extra": {"location_id": "rel-loc", "coordination": coordination},
            }
        ),
    )
    seed_demo(sqlite_wh.engine, 5)
    cfg = parse_config(_set(_data(sqlite_wh, tmp_path), "locations.0.conn_id", "growthhub_coordinated"))
    with pytest.raises(ConfigError, match=rf"locations\[default\]\.conn_id: .*{match}"):
        plan_sync(cfg, "default", None, engine=sqlite_wh.engine, options=OPTS)


def test_a_connection_naming_another_location_fails_at_plan_naming_both(
    sqlite_wh: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config's location id keys the limiter and fills payloads: another in the connection is an error."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_GROWTHHUB_OTHER",
        json.dumps(
            {
                "conn_type": "growthhub",
                "host": "http://127.0.0.1:9",
                "password": "pit-unused",
                "extra": {"location_id": "someone-else"},
            }
        ),
    )
    seed_demo(sqlite_wh.engine, 5)
    cfg = parse_config(_set(_data(sqlite_wh, tmp_path), "locations.0.conn_id", "growthhub_other"))
    with pytest.raises(ConfigError, match=r"locations\[default\]\.conn_id: .*'someone-else'.*'rel-loc'"):
        plan_sync(cfg, "default", None, engine=sqlite_wh.engine, options=OPTS)
    assert ledger(sqlite_wh, cfg) == []


def test_undefined_growthhub_connection_fails_the_sync_naming_it_before_any_row_is_recorded(
    sqlite_wh: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_GROWTHHUB_NOPE", raising=False)
    seed_demo(sqlite_wh.engine, 30)
    cfg = parse_config(_set(_data(sqlite_wh, tmp_path), "locations.0.conn_id", "growthhub_nope"))
    with pytest.raises(Exception, match="growthhub_nope"):
        sync(cfg, "default", None, OPTS, engine=sqlite_wh.engine)
    assert ledger(sqlite_wh, cfg) == []
    assert [q for q in quarantine(sqlite_wh, cfg) if q["stage"] == "api"] == []


def test_reserved_words_and_mixed_case_names_are_quoted_not_rejected(
    sqlite_wh: Warehouse, tmp_path: Path
) -> None:
    """Validated identifiers reach SQL quoted: a table ``select`` with columns ``order``/``Group`` works."""
    with sqlite_wh.engine.begin() as conn:
        conn.execute(
            text(
                'CREATE TABLE "select" '
                '("order" TEXT PRIMARY KEY, "from" TEXT, "Group" TEXT, "where" TIMESTAMP)'
            )
        )
        conn.execute(
            text("INSERT INTO \"select\" VALUES ('k1', 'a@example.com', 'Town', '2026-01-01 00:00:00')")
        )
    data = _data(sqlite_wh, tmp_path)
    data["source"].update(table="select", key_column="order", updated_at_column="where")
    data["mapping"] = {"fields": {"email": "from", "city": "Group"}}
    cfg = parse_config(data)
    crm = StrictJsonCRM()
    out = sync(cfg, "default", None, OPTS, engine=sqlite_wh.engine, upserter=crm)
    assert out["created"] == 1
    assert crm.sent[0][1]["city"] == "Town"
    assert json.loads(json.dumps(out))["invariant_ok"]
    assert re.match(r"^\w+$", cfg.source.table)
