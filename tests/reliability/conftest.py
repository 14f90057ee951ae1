"""Fixtures of the reliability suite: real warehouses (SQLite, PostgreSQL) and a sandbox location."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).parent))

from reliability_support import (
    PG_URL,
    Warehouse,
    drop_pg_schemas,
    growthhub_conn,
    new_pg_schema,
    setup_sandbox_location,
    sqlite_warehouse,
)

from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess


@pytest.fixture(scope="session")
def rel_pg_engine() -> Iterator[Engine]:
    """One engine on the test database; every schema this session made is dropped at the end."""
    engine = create_engine(PG_URL, pool_pre_ping=True)
    yield engine
    drop_pg_schemas(engine)
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def rel_warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Warehouse]:
    if request.param == "sqlite":
        wh = sqlite_warehouse(tmp_path / "warehouse.db")
        yield wh
        wh.engine.dispose()
    else:
        yield Warehouse("postgresql", PG_URL, request.getfixturevalue("rel_pg_engine"), new_pg_schema())


@pytest.fixture
def sqlite_wh(tmp_path: Path) -> Iterator[Warehouse]:
    wh = sqlite_warehouse(tmp_path / "warehouse.db")
    yield wh
    wh.engine.dispose()


@pytest.fixture
def crm(
    sandbox: SandboxAdmin, sandbox_server: SandboxProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> SandboxAdmin:
    """The session sandbox with location ``rel-loc`` and ``growthhub_default`` pointing at it."""
    setup_sandbox_location(sandbox)
    monkeypatch.setenv("AIRFLOW_CONN_GROWTHHUB_DEFAULT", growthhub_conn(sandbox_server.base_url, tmp_path))
    return sandbox


@pytest.fixture
def rel_pg_warehouse(rel_pg_engine: Engine) -> Warehouse:
    """A PostgreSQL schema of its own (dropped at the end of the session)."""
    return Warehouse("postgresql", PG_URL, rel_pg_engine, new_pg_schema())
