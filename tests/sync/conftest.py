"""Fixtures of the sync library tests: a real warehouse (PostgreSQL or SQLite) and a fake CRM.

PostgreSQL tests get a schema of their own inside one schema prefix per session, all
dropped at the end; SQLite tests get a file in ``tmp_path``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sync_support import PG_URL, SESSION, T0, FakeCRM, Warehouse, make_sync_config

from growthhub_sync.config import SyncConfig
from growthhub_sync.demo import seed_demo

_schemas = itertools.count()


@pytest.fixture(scope="session")
def pg_engine() -> Iterator[Engine]:
    engine = create_engine(PG_URL)
    yield engine
    with engine.begin() as conn:
        schemas = (
            conn.execute(text("select nspname from pg_namespace where nspname like :p"), {"p": f"{SESSION}%"})
            .scalars()
            .all()
        )
        for s in schemas:
            conn.execute(text(f'DROP SCHEMA "{s}" CASCADE'))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Warehouse]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'warehouse.db'}"
        engine = create_engine(url, connect_args={"timeout": 60})
        yield Warehouse("sqlite", url, engine, None)
        engine.dispose()
    else:
        engine = request.getfixturevalue("pg_engine")
        yield Warehouse("postgresql", PG_URL, engine, f"{SESSION}_{next(_schemas)}")


@pytest.fixture
def make_config(warehouse: Warehouse, tmp_path: Path) -> Callable[..., SyncConfig]:
    """The shipped default config pointed at the test warehouse; ``section__key=value`` overrides."""
    return lambda **overrides: make_sync_config(warehouse, tmp_path, **overrides)


@pytest.fixture
def seeded(warehouse: Warehouse) -> Warehouse:
    seed_demo(warehouse.engine, 1000, schema=warehouse.schema, start=T0)
    return warehouse


@pytest.fixture
def crm() -> FakeCRM:
    return FakeCRM()
