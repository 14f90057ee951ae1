"""The per-chunk lookups of a first sync read the primary key even on stale statistics.

The real case: the state tables are analysed while small (a pilot run's finalize), then a first
sync fills them. Planned on those statistics, a plain ``IN`` list scans the location's rows, a
cost that grows with every chunk; the store's lookups must stay primary-key probes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.engine import Connection, Engine
from sync_support import SESSION

from growthhub_sync import state
from growthhub_sync.config import StateConfig

pytestmark = pytest.mark.integration

LOCATION = "loc"
ANALYSED_ROWS, GROWN_ROWS = 2_000, 150_000
NEWEST = range(GROWN_ROWS - 1_999, GROWN_ROWS + 1)  # the last chunk's rows


def _fill(conn: Connection, t: state.StateTables, first: int, last: int) -> None:
    """Rows ``first..last`` of a first sync: a ledger row, an email and a phone identity each."""
    bounds = {"loc": LOCATION, "first": first, "last": last}
    conn.execute(
        text(
            f'INSERT INTO "{t.identities.schema}"."{t.identities.name}" '
            "(location, identity, source_key, claimed_at, last_run_id) "
            "SELECT :loc, kind || md5(i::text), 'k' || i, now(), 'first-sync' "
            "FROM generate_series(:first, :last) i, unnest(array['email:', 'phone:']) kind"
        ),
        bounds,
    )
    conn.execute(
        text(
            f'INSERT INTO "{t.ledger.schema}"."{t.ledger.name}" (location, source_key, payload_hash, '
            "first_synced_at, last_synced_at, last_run_id) "
            "SELECT :loc, 'k' || i, 'h', now(), now(), 'first-sync' FROM generate_series(:first, :last) i"
        ),
        bounds,
    )


@pytest.fixture(scope="module")
def grown(pg_engine: Engine) -> Iterator[state.StateTables]:
    """State tables analysed at 2,000 rows, then grown to 150,000 without another ANALYZE."""
    tables = state.state_tables(StateConfig.model_validate({"schema": f"{SESSION}_plans", "prefix": ""}))
    state.ensure_state(pg_engine, tables)
    with pg_engine.begin() as conn:
        _fill(conn, tables, 1, ANALYSED_ROWS)
    state.analyze(pg_engine, tables)
    with pg_engine.begin() as conn:
        _fill(conn, tables, ANALYSED_ROWS + 1, GROWN_ROWS)
    yield tables
    with pg_engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{tables.metadata.schema}" CASCADE'))


def _plans(
    engine: Engine, tables: state.StateTables, lookup: Callable[[state.StateStore], object], table: str
) -> list[str]:
    """The plans of the statements reading ``table`` that ``lookup`` sends."""
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.startswith("SELECT") and table in statement:
            sent.append((statement, params))

    with engine.begin() as conn:
        event.listen(conn, "before_cursor_execute", record)
        lookup(state.StateStore(conn, tables, LOCATION, run_id="first-sync"))
        event.remove(conn, "before_cursor_execute", record)
        return ["\n".join(conn.exec_driver_sql(f"EXPLAIN {s}", p).scalars()) for s, p in sent]


def _identities() -> list[str]:
    return [
        f"{kind}{hashlib.md5(str(i).encode()).hexdigest()}" for i in NEWEST for kind in ("email:", "phone:")
    ]


def test_the_statistics_are_stale_so_a_plain_in_list_scans_the_table(
    pg_engine: Engine, grown: state.StateTables
) -> None:
    ids = grown.identities
    plain = select(ids.c.source_key).where(
        ids.c.location == LOCATION, ids.c.identity.in_(_identities()[:2000])
    )
    sql = str(plain.compile(pg_engine, compile_kwargs={"literal_binds": True}))
    with pg_engine.connect() as conn:
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {sql}").scalars())
    assert "Seq Scan on growthhub_identities" in plan


def test_the_identity_lookup_probes_the_primary_key(pg_engine: Engine, grown: state.StateTables) -> None:
    plans = _plans(
        pg_engine,
        grown,
        lambda store: store.claim_free_identities(dict.fromkeys(_identities(), "k")),
        "growthhub_identities",
    )
    assert len(plans) == 2  # two slices of 2,000 identities; all taken, nothing claimed
    for plan in plans:
        assert "Index Scan using growthhub_identities_pkey" in plan
        assert "Seq Scan on growthhub_identities" not in plan


def test_the_ledger_lookup_probes_the_primary_key(pg_engine: Engine, grown: state.StateTables) -> None:
    keys = [f"k{i}" for i in NEWEST]
    [plan] = _plans(pg_engine, grown, lambda store: store.synced_in_run(keys), "growthhub_sync_ledger")
    assert "Index Scan using growthhub_sync_ledger_pkey" in plan
    assert "Seq Scan on growthhub_sync_ledger" not in plan
