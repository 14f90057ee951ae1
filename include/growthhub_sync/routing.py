"""Rows and their locations (``locations.from_column``): which location a row's value names, the
rows that name none they may be sent to (quarantined with a ``location_*`` reason code, never
sent), and what a row leaves behind when its value is changed to another location."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, cast, select, tuple_

from growthhub_sync import state
from growthhub_sync.config import UNROUTED
from growthhub_sync.extract import Source, Window
from growthhub_sync.outcomes import QuarantineRow, Summary
from growthhub_sync.reasons import LOCATION_MISSING, LOCATION_NOT_INSTALLED, LOCATION_UNKNOWN, REASONS

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement, Select, Table
    from sqlalchemy.engine import Engine

    from growthhub_sync.batch import SyncOptions
    from growthhub_sync.config import LocationConfig, SyncConfig

log = logging.getLogger(__name__)

_QUARANTINE_ROWS = 2000  # keys per transaction when quarantining rows that name no location


def route(
    value: str | None, location_id: str | None, installed: Mapping[str, bool]
) -> tuple[str, str | None]:
    """(location name, quarantine reason or ``None``) of a row whose location column is ``value``."""
    if value is None or not value.strip() or value == UNROUTED:
        return UNROUTED, LOCATION_MISSING
    if location_id not in installed:
        return value, LOCATION_UNKNOWN
    return value, None if installed[location_id] else LOCATION_NOT_INSTALLED


def quarantine_unroutable(
    config: SyncConfig, location: LocationConfig, win: Window, reason: str, o: SyncOptions, eng: Engine
) -> dict[str, Any]:
    """Quarantine the run's rows of a location they may not be sent to, with ``reason``.

    One open quarantine row per key whatever the runs (a later run counts another attempt);
    their pending rows are cleared. Returns the batch summary (extracted = quarantined).
    """
    tables = state.state_tables(config.state)
    source = Source(config, location, tables, eng.dialect.name)
    with eng.connect() as conn:
        keys = [str(k) for k in conn.execute(select(source.key).where(source.scope(win))).scalars()]
    summary = Summary(extracted=len(keys), quarantined=len(keys), max_samples=0)
    summary.reasons[reason] = len(keys)
    message = f"location {location.location_id!r}: {REASONS[reason]}"
    for i in range(0, 0 if o.dry_run else len(keys), _QUARANTINE_ROWS):
        part = keys[i : i + _QUARANTINE_ROWS]
        with eng.begin() as conn:
            store = state.StateStore(conn, tables, location.name, run_id=o.run_id, dag_id=o.dag_id)
            store.quarantine([QuarantineRow(k, "quality", [message], (reason,), None, None) for k in part])
            store.clear_pending(part)
    log.info("location %s: %d row(s) quarantined (%s)", location.name, len(keys), reason)
    return summary.as_dict()


def resolve_moved(config: SyncConfig, eng: Engine, win: Window, run_id: str) -> int:
    """Settle what a row left at its old location when its location column names another one now.

    A row quarantined at ``_unrouted`` (or an unknown location), or deferred at location A, and
    then moved at the source is a changed row: this run synced, quarantined or deferred it at its
    new location. Its open quarantine row at the old one is resolved and its pending row there
    cleared (else A would hold a backlog no run of A can send). Only keys in the window, and only
    once the new location holds an outcome for the key (ledger, open quarantine or pending row): a
    row no run handled keeps what it had. Returns the rows settled.
    """
    tables = state.state_tables(config.state)
    q, p = tables.quarantine, tables.pending
    src = Source(config, config.location(UNROUTED), tables, eng.dialect.name)
    by_value = {loc.location_id: loc.name for loc in config.locations}
    by_value.update((loc.name, loc.name) for loc in config.locations)  # a name wins, as in the plan
    column = cast(src.table.c[config.location_routing.from_column], String)

    def left_at(table: Table, *where: ColumnElement[bool]) -> Select[Any]:
        joined = table.join(src.table, table.c.source_key == cast(src.key, String))
        return select(table.c.location, table.c.source_key, column).select_from(joined).where(*where)

    moved: dict[tuple[str, str], list[tuple[Table, str]]] = defaultdict(list)
    with eng.connect() as conn:
        for table, stmt in (
            (q, left_at(q, q.c.status == "open", src.in_window(win))),
            (p, left_at(p, src.in_window(win))),
        ):
            for old, key, found in conn.execute(stmt):
                now_at = UNROUTED if found is None or not found.strip() else by_value.get(found, found)
                if now_at != old:
                    moved[(now_at, key)].append((table, old))
        handled: set[tuple[str, str]] = set()
        pairs = list(moved)
        for i in range(0, len(pairs), 500):
            for table in (tables.ledger, p, q):
                which = tuple_(table.c.location, table.c.source_key).in_(pairs[i : i + 500])
                stmt = select(table.c.location, table.c.source_key).where(which)
                stmt = stmt.where(q.c.status == "open") if table is q else stmt
                handled.update((loc, key) for loc, key in conn.execute(stmt))
    stale: dict[tuple[Table, str], list[str]] = defaultdict(list)
    for now_at, key in handled:
        for table, old in moved[(now_at, key)]:
            stale[(table, old)].append(key)
    with eng.begin() as conn:
        for (table, old), keys in stale.items():
            store = state.StateStore(conn, tables, old, run_id=run_id)
            if table is q:
                store.resolve_quarantine(keys)
            else:
                store.clear_pending(keys)
    if settled := sum(map(len, stale.values())):
        log.info(
            "run %s: %d quarantine or pending row(s) settled: their rows moved location", run_id, settled
        )
    return settled
