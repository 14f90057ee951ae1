"""Property-based bad input: whatever the warehouse holds, no batch crashes and every row ends
synced or quarantined with a reason (issue 6, "Bad input").

Rows are inserted into a real table (SQLite with untyped columns, so wrong types survive; and
PostgreSQL with text columns) and go through the real pipeline: with an in-memory CRM for the
many-examples property, and through the real hook against the sandbox for a smaller one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reliability_support import (
    StrictJsonCRM,
    Warehouse,
    ledger,
    make_config,
    new_pg_schema,
    quarantine,
    sqlite_warehouse,
)
from sqlalchemy import Column, DateTime, MetaData, Table, text
from sqlalchemy.engine import Engine
from sqlalchemy.types import NullType

from growthhub_sandbox.testing import SandboxAdmin
from growthhub_sync import state
from growthhub_sync.config import SyncConfig
from growthhub_sync.demo import COLUMNS
from growthhub_sync.pipeline import SyncOptions, sync
from growthhub_sync.reasons import is_code, split_codes

PROFILE = settings(
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
    max_examples=100,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

# -- what a messy warehouse holds -------------------------------------------------------------

SQL_LOOKING = [
    "'; DROP TABLE crm_contacts; --",
    "Robert'); DROP TABLE students;--",
    '" OR 1=1 --',
    "1; SELECT pg_sleep(10)",
    "%_%",
    "\\' \\\\ \\x00",
    "$$; COPY x TO PROGRAM 'id'; $$",
    "<script>alert(1)</script>",
    "{{ 7*7 }}",
]
CONTROL = st.text(
    alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zl", "Zp"]), min_size=1, max_size=8
)
NON_LATIN = st.sampled_from(
    [
        "Ĳsbrand Ørsted",
        "Jürgen Groß",
        "Σωκράτης",
        "Анна Каренина",
        "李小龍",
        "山田太郎",
        "مُحَمَّد",
        "עִבְרִית",
        "🙂🚀",
    ]
)


def _texts(allow_nul: bool) -> st.SearchStrategy[Any]:
    alphabet = st.characters(codec="utf-8", exclude_characters=None if allow_nul else "\x00")
    return st.one_of(
        st.none(),
        st.just(""),
        st.sampled_from(["   ", "\t", "NULL", "None", "nan", "null"]),
        st.text(alphabet=alphabet, max_size=40),
        NON_LATIN,
        CONTROL.filter(lambda s: allow_nul or "\x00" not in s),
        st.sampled_from(SQL_LOOKING).filter(lambda s: allow_nul or "\x00" not in s),
        st.integers(min_value=1, max_value=12).map(lambda n: "Ω" * (n * 1000)),  # very long
        st.integers(min_value=-(2**63), max_value=2**63 - 1),  # wrong type: numbers where text
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        st.booleans(),
    )


def _emails(allow_nul: bool) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.emails(),
        st.emails().map(str.upper),
        st.sampled_from(
            [
                "a@",
                "@example.com",
                "a@@example.com",
                "a b@example.com",
                "a@example",
                "a@-x.com",
                "a@ex ample.com",
                "a..b@example.com",
                ".a@example.com",
                "a@example.com.",
                "ä@bücher.de",
                "x" * 70 + "@example.com",
                "a@" + "b" * 300 + ".com",
                "mailto:a@example.com",
                "<a@example.com>",
                "a@example.com, b@example.com",
                "a@example.com\n",
            ]
        ),
        _texts(allow_nul),
    )


def _phones(allow_nul: bool) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(
            [
                "(212) 555-0147",
                "+1 415 555 2671",
                "415.555.2671",
                "+44 20 7946 0958",
                "12345",
                "0",
                "555-CALL-NOW",
                "+1 (000) 000-0000",
                "+999 1234",
                "++1 212 555 0147",
                "1" * 40,
                "+1 212 555 0147 ext. 12",
                "٢١٢٥٥٥٠١٤٧",
                "+1-212-555-0147;--",
            ]
        ),
        st.integers(min_value=0, max_value=10**15),
        _texts(allow_nul),
    )


def _dates(allow_nul: bool) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.dates(min_value=date(1800, 1, 1), max_value=date(2200, 1, 1)).map(date.isoformat),
        st.dates(min_value=date(1900, 1, 1), max_value=date(2025, 1, 1)).map(
            lambda d: d.strftime("%m/%d/%Y")
        ),
        st.sampled_from(
            ["31/12/1990", "1990-13-01", "1990-02-30", "12/31/90", "0000-00-00", "1990-1-1", "yesterday"]
        ),
        _texts(allow_nul),
    )


def _row(allow_nul: bool) -> st.SearchStrategy[dict[str, Any]]:
    t = _texts(allow_nul)
    return st.fixed_dictionaries(
        {
            "first_name": t,
            "last_name": t,
            "email": _emails(allow_nul),
            "phone": _phones(allow_nul),
            "date_of_birth": _dates(allow_nul),
            "gender": st.one_of(st.sampled_from(["male", "female", "other", "M", "f", "unknown", "MALE"]), t),
            "address1": t,
            "city": t,
            "state": t,
            "postal_code": t,
            "country": st.one_of(st.sampled_from(["US", "us", "United States", "XX", "GBR", "DE"]), t),
            "website": st.one_of(
                st.sampled_from(["https://example.com", "example.com", "javascript:alert(1)", "http://"]), t
            ),
            "timezone": st.one_of(st.sampled_from(["America/New_York", "Mars/Olympus", "UTC", "+05:00"]), t),
            "company_name": t,
            "tags": st.one_of(st.sampled_from(["a,b", ",,,", "vip, vip ,VIP", "x" * 300, "a;b"]), t),
            "source": t,
            "dnd": st.one_of(
                st.none(),
                st.booleans(),
                st.sampled_from(["yes", "no", "true", "1", "maybe", ""]),
                st.integers(-2, 2),
            ),
            "lifetime_value": st.one_of(
                st.none(),
                st.decimals(
                    min_value=-(10**9), max_value=10**9, places=2, allow_nan=False, allow_infinity=False
                ),
                st.sampled_from(["abc", "1e999", "-0", "12,50", "NaN"]),
                st.integers(min_value=-(2**53), max_value=2**53),
            ),
            "updated_at": st.datetimes(
                min_value=datetime(2000, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
            ),
        }
    )


def _rows(allow_nul: bool, max_size: int) -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(_row(allow_nul), min_size=1, max_size=max_size)


# -- the warehouse table ----------------------------------------------------------------------

_PG_TYPES = {"updated_at": "timestamptz NOT NULL", "id": "text PRIMARY KEY"}


def _messy_table(schema: str | None) -> Table:
    cols = [
        Column("updated_at", DateTime(timezone=True)) if c == "updated_at" else Column(c, NullType())
        for c in COLUMNS
    ]
    return Table("crm_contacts", MetaData(schema=schema), *cols)


def _reset(wh: Warehouse, cfg: SyncConfig, rows: list[dict[str, Any]]) -> list[str]:
    """(Re)create an untyped (SQLite) / all-text (PostgreSQL) table with ``rows``; drop the state tables."""
    tables = state.state_tables(cfg.state)
    tables.metadata.drop_all(wh.engine)
    with wh.engine.begin() as conn:
        if wh.name == "postgresql":
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{wh.schema}"'))
            conn.execute(text(f'DROP TABLE IF EXISTS "{wh.schema}".crm_contacts'))
            cols = ", ".join(f"{c} {_PG_TYPES.get(c, 'text')}" for c in COLUMNS)
            conn.execute(text(f'CREATE TABLE "{wh.schema}".crm_contacts ({cols})'))
        else:
            conn.execute(text("DROP TABLE IF EXISTS crm_contacts"))
            cols = ", ".join(
                "id TEXT PRIMARY KEY" if c == "id" else c for c in COLUMNS
            )  # no type: no affinity
            conn.execute(text(f"CREATE TABLE crm_contacts ({cols})"))
        keys = [f"K{i:04d}" for i in range(len(rows))]
        if wh.name == "sqlite":  # the sqlite3 driver binds no Decimal: a NUMERIC column would hold a float
            rows = [{c: float(v) if isinstance(v, Decimal) else v for c, v in r.items()} for r in rows]
        conn.execute(
            _messy_table(wh.schema).insert(), [{"id": k, **r} for k, r in zip(keys, rows, strict=True)]
        )
    return keys


# -- the property -------------------------------------------------------------------------------


def _assert_every_row_accounted(wh: Warehouse, cfg: SyncConfig, keys: list[str], out: dict[str, Any]) -> None:
    assert out["invariant_ok"], out
    assert out["extracted"] == len(keys)
    assert out["deferred"] == 0, out
    synced = {r["source_key"] for r in ledger(wh, cfg)}
    open_q = {r["source_key"]: r for r in quarantine(wh, cfg) if r["status"] == "open"}
    for k in keys:
        assert (k in synced) != (k in open_q), f"{k}: synced={k in synced} quarantined={k in open_q}"
        if k in open_q:
            errors = open_q[k]["errors"]
            assert errors, open_q[k]
            assert all(isinstance(e, str) and e.strip() for e in errors), open_q[k]
            codes = split_codes(open_q[k]["reason_codes"])
            assert codes, open_q[k]
            assert all(is_code(c) for c in codes), open_q[k]
    assert out["created"] + out["updated"] == len(synced)
    assert out["quarantined"] + out["rejected"] == len(open_q)


def _payloads_are_clean(sent: list[tuple[str, dict[str, Any]]]) -> None:
    for _key, payload in sent:
        for value in payload.values():
            if isinstance(value, float):
                assert math.isfinite(value)
            if isinstance(value, str):
                assert value == value.strip() or value.strip(), "blank string sent instead of omitted"


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("props")


@pytest.fixture(scope="module")
def prop_sqlite(module_tmp: Path) -> Iterator[tuple[Warehouse, SyncConfig]]:
    wh = sqlite_warehouse(module_tmp / "messy.db")
    yield wh, make_config(wh, module_tmp, batch_size=7)
    wh.engine.dispose()


@pytest.fixture(scope="module")
def prop_pg(module_tmp: Path) -> Iterator[tuple[Warehouse, SyncConfig]]:
    from reliability_support import PG_URL, drop_pg_schemas
    from sqlalchemy import create_engine

    engine: Engine = create_engine(PG_URL)
    schema = new_pg_schema()
    wh = Warehouse("postgresql", PG_URL, engine, schema)
    yield wh, make_config(wh, module_tmp, batch_size=7)
    drop_pg_schemas(engine, schema)
    engine.dispose()


_OPTS = SyncOptions(run_id="prop", dag_id="tests", keep_results=False)


@PROFILE
@given(rows=_rows(allow_nul=True, max_size=20))
def test_any_sqlite_rows_sync_or_quarantine_with_a_reason(
    prop_sqlite: tuple[Warehouse, SyncConfig], rows: list[dict[str, Any]]
) -> None:
    wh, cfg = prop_sqlite
    keys = _reset(wh, cfg, rows)
    crm = StrictJsonCRM()
    out = sync(cfg, "default", None, _OPTS, engine=wh.engine, upserter=crm)
    _assert_every_row_accounted(wh, cfg, keys, out)
    _payloads_are_clean(crm.sent)
    # a second run of the same rows changes nothing and still crashes nowhere
    again = sync(
        cfg, "default", None, SyncOptions(run_id="prop2", keep_results=False), engine=wh.engine, upserter=crm
    )
    assert again["invariant_ok"], again
    assert again["created"] == again["updated"] == 0, again


@pytest.mark.integration
@settings(PROFILE, max_examples=40)
@given(rows=_rows(allow_nul=False, max_size=12))
def test_any_postgresql_rows_sync_or_quarantine_with_a_reason(
    prop_pg: tuple[Warehouse, SyncConfig], rows: list[dict[str, Any]]
) -> None:
    wh, cfg = prop_pg
    keys = _reset(wh, cfg, rows)
    crm = StrictJsonCRM()
    out = sync(cfg, "default", None, _OPTS, engine=wh.engine, upserter=crm)
    _assert_every_row_accounted(wh, cfg, keys, out)


@pytest.mark.integration
@settings(PROFILE, max_examples=25)
@given(rows=_rows(allow_nul=True, max_size=8))
def test_any_rows_through_the_real_hook_sync_or_quarantine_with_a_reason(
    prop_sqlite: tuple[Warehouse, SyncConfig], crm: SandboxAdmin, rows: list[dict[str, Any]]
) -> None:
    wh, cfg = prop_sqlite
    crm.reset()
    from reliability_support import setup_sandbox_location

    setup_sandbox_location(crm)
    keys = _reset(wh, cfg, rows)
    out = sync(cfg, "default", None, _OPTS, engine=wh.engine)
    _assert_every_row_accounted(wh, cfg, keys, out)
    assert len(crm.contacts("rel-loc")) <= out["created"]
