"""Bring state tables an older release created up to date: columns added since, filled in.

:func:`growthhub_sync.state.ensure_state` runs this before every plan, finalize and replay. Each
step is idempotent and safe when parallel tasks race: they add the same column and compute the
same values from the same rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, Date, Integer, exc, inspect, select, update

from growthhub_sync.fields import FIELD, reason_codes
from growthhub_sync.outcomes import VERIFY_COUNTS, duplicate_winner
from growthhub_sync.reasons import DUPLICATE_IDENTITY, api_code, join_codes

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.engine import Engine

_BATCH = 5000  # rows back-filled per transaction
QUOTA_COUNTS = ("to_send", "quota_left", "quota_deferred", "backlog", "daily_remaining")
"""The run row's quota columns (:mod:`~growthhub_sync.quota`), NULL in runs recorded before them."""


def quota_columns() -> list[Column[Any]]:
    """The run row's quota forecast: its counts and ``eta``, the UTC day its backlog should be sent."""
    return [*(Column(name, Integer) for name in QUOTA_COUNTS), Column("eta", Date)]


def upgrade_quarantine(engine: Engine, quarantine: Table) -> None:
    """Give a quarantine table its ``reason_codes`` column, and rows without codes theirs."""
    _add_column(engine, quarantine, quarantine.c.reason_codes)
    _backfill_reason_codes(engine, quarantine)


def upgrade_runs(engine: Engine, runs: Table) -> None:
    """Give a runs table the counts added since (``deleted``, the read-back's ``verify_*``), 0 for
    the runs recorded before them, and the quota columns (NULL: not forecast)."""
    for name in ("deleted", *VERIFY_COUNTS):
        column = runs.c[name]
        _add_column(engine, runs, column)
        with engine.begin() as conn:
            conn.execute(update(runs).where(column.is_(None)).values({name: 0}))
    present = _column_names(engine, runs)
    for name in (*QUOTA_COUNTS, "eta"):
        if name not in present:
            _add_column(engine, runs, runs.c[name])


def legacy_codes(
    stage: str, http_status: int | None, errors: Sequence[Any], duplicate_of: str | None
) -> list[str]:
    """The reason codes of a row recorded without them, read from what it recorded.

    A quality row's errors start with their check's label (``email: ...``, ``dndSettings.SMS:
    ...``, ``identity: ...``); a row whose email check only warned does not name it, so its
    missing identity reads as ``no_identity``.
    """
    if stage == "api":
        return [api_code(http_status)] if http_status else []
    if duplicate_of or any(duplicate_winner(str(e)) for e in errors):
        return [DUPLICATE_IDENTITY]
    failed = [check for e in errors if (check := _check_of(str(e).split(":", 1)[0]))]
    return reason_codes(failed, failed)


def _check_of(label: str) -> str | None:
    if label == "identity":
        return label
    if label.startswith("dndSettings.") or label == "inboundDndSettings":
        return "dnd"
    return FIELD[label].check if label in FIELD else None


def _column_names(engine: Engine, table: Table) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns(table.name, schema=table.schema)}


def _add_column(engine: Engine, table: Table, column: Column[Any]) -> None:
    if column.name in _column_names(engine, table):
        return
    preparer = engine.dialect.identifier_preparer
    ddl = (
        f"ALTER TABLE {preparer.format_table(table)} "
        f"ADD COLUMN {preparer.quote(column.name)} {column.type.compile(engine.dialect)}"
    )
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(ddl)
    except (exc.OperationalError, exc.ProgrammingError):
        if column.name not in _column_names(engine, table):
            raise  # not a task that added it first


def _backfill_reason_codes(engine: Engine, q: Table) -> None:
    """Codes for rows that have none, a batch per transaction in id order (one scan when all have
    theirs)."""
    last = 0
    while True:
        missing = (  # id, then legacy_codes' arguments
            select(q.c.id, q.c.stage, q.c.http_status, q.c.errors, q.c.duplicate_of)
            .where(q.c.reason_codes.is_(None), q.c.id > last)
            .order_by(q.c.id)
            .limit(_BATCH)
        )
        with engine.begin() as conn:
            rows = conn.execute(missing).all()
            ids_of: dict[str, list[int]] = defaultdict(list)
            for r in rows:
                ids_of[join_codes(legacy_codes(*r[1:]))].append(r.id)
            for codes, ids in ids_of.items():  # few distinct values: one UPDATE each, not one per row
                # a row a new failure gave codes meanwhile keeps them
                fill = update(q).where(q.c.id.in_(ids), q.c.reason_codes.is_(None)).values(reason_codes=codes)
                conn.execute(fill)
        if len(rows) < _BATCH:
            return
        last = rows[-1].id
