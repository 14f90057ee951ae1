"""Fixtures of the GrowthHub page tests: state tables in a real warehouse and a sync config pointing
at it (the page reads ``$GROWTHHUB_SYNC_CONFIG``).

PostgreSQL tests get a schema of their own, dropped at the end; SQLite tests a file in ``tmp_path``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from airflow_ui import AirflowUI, start_airflow_ui, stop_airflow_ui
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from ui_support import PG_URL, SESSION, StateDB, write_config

from growthhub_sync.config import CONFIG_ENV

_schemas = itertools.count()


@pytest.fixture(scope="session")
def pg_engine() -> Iterator[Engine]:
    engine = create_engine(PG_URL)
    yield engine
    with engine.begin() as conn:
        found = conn.execute(
            text("select nspname from pg_namespace where nspname like :p"), {"p": f"{SESSION}%"}
        )
        for schema in found.scalars().all():
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def state_db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StateDB]:
    """Empty state tables in SQLite or PostgreSQL; ``$GROWTHHUB_SYNC_CONFIG`` names their config."""
    if request.param == "sqlite":
        url, schema = f"sqlite:///{tmp_path / 'warehouse.db'}", None
        engine = create_engine(url)
    else:
        url, schema = PG_URL, f"{SESSION}_{next(_schemas)}"
        engine = request.getfixturevalue("pg_engine")
    config_path = write_config(tmp_path / "sync.yaml", url=url, schema=schema)
    monkeypatch.setenv(CONFIG_ENV, str(config_path))
    yield StateDB(url, engine, schema, config_path)
    if request.param == "sqlite":
        engine.dispose()


@pytest.fixture(scope="session")
def airflow_ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowUI]:
    """One real api-server with the GrowthHub page for the session (it takes tens of seconds)."""
    ui = start_airflow_ui(tmp_path_factory.mktemp("airflow_ui"))
    yield ui
    stop_airflow_ui(ui)


@pytest.fixture
def airflow_ui(airflow_ui_server: AirflowUI) -> AirflowUI:
    """The session's api-server, its warehouse's state tables emptied for this test."""
    with airflow_ui_server.state.engine.begin() as conn:
        for table in (airflow_ui_server.state.tables.quarantine, airflow_ui_server.state.tables.runs):
            conn.execute(table.delete())
    return airflow_ui_server
