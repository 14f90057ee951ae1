"""Extract: stream the source rows of a window (and rows left pending) in chunks.

Server-side cursor on PostgreSQL (``stream_results`` + ``yield_per``), bounded memory on
every backend. Identifiers come from a validated config and are quoted by SQLAlchemy.
Windows are half-open, ``start <= updated_at < end``; key ranges are ``lo < key <= hi`` so a
plan's ranges tile the key space without gaps or overlaps, whatever the key's type.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import (
    DateTime,
    String,
    Text,
    and_,
    cast,
    column,
    exists,
    false,
    func,
    null,
    or_,
    select,
    table,
    true,
)

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement, Select
    from sqlalchemy.engine import Connection, Row
    from sqlalchemy.sql.expression import TableClause

    from growthhub_sync.config import LocationConfig, SyncConfig
    from growthhub_sync.state import StateTables


def _utc(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


@dataclass(frozen=True)
class Window:
    """The half-open interval of ``updated_at`` to sync; ``None`` ends are open."""

    start: datetime | None = None
    end: datetime | None = None

    @classmethod
    def of(
        cls, start: datetime | str | None, end: datetime | str | None, lookback_minutes: int = 0
    ) -> Window:
        """Window from a data interval; ``lookback_minutes`` widens the start for late-arriving rows."""
        s = _utc(start)
        if s is not None and lookback_minutes:
            s -= timedelta(minutes=lookback_minutes)
        return cls(s, _utc(end))

    def as_dict(self) -> dict[str, str | None]:
        return {
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, str | None] | None) -> Window:
        return cls.of((data or {}).get("start"), (data or {}).get("end"))


@dataclass(frozen=True)
class KeyRange:
    """``lo < key <= hi``; ``None`` is unbounded. Values are the key's native type (JSON-safe)."""

    lo: Any = None
    hi: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> KeyRange:
        return cls((data or {}).get("lo"), (data or {}).get("hi"))


class NarrowRow(NamedTuple):
    """What the diff reads of a source row (:attr:`Source.narrow_columns` select these labels).

    Rows from the database are SQLAlchemy rows with these names as attributes; hot loops unpack
    them in this order instead (attribute access on a SQLAlchemy row costs ten times more).
    """

    source_key: Any
    updated_at: Any
    email: Any
    phone: Any
    digest: Any
    """The database's serialisation of the row's values (all but updated-at): the source hash's input."""
    ledger_source_hash: str | None
    ledger_payload_hash: str | None
    """``None``: no ledger row."""
    held_source_hash: str | None
    """Source hash of the row's open quarantine entry."""
    held_duplicate_of: str | None


class Source:
    """The configured source table for one location, as SQLAlchemy Core expressions."""

    def __init__(
        self, config: SyncConfig, location: LocationConfig, tables: StateTables, dialect: str = "postgresql"
    ) -> None:
        src = config.source
        self.columns = config.source_columns()
        cols = [
            column(c, DateTime(timezone=True)) if c == src.updated_at_column else column(c)
            for c in self.columns
        ]
        flag = config.deletes.flag_column
        if flag and flag not in self.columns:  # read to skip deleted rows, not hashed
            cols.append(column(flag))
        self.table: TableClause = table(src.table, *cols, schema=src.schema_)
        self.key = self.table.c[src.key_column]
        self.updated_at = self.table.c[src.updated_at_column]
        self.location = location
        self.pending = tables.pending
        self.routing: list[ColumnElement[bool]] = [
            _route(self.table.c[c], v) for c, v in location.filter.items()
        ]
        """The location's rows; with ``deletes.column``, only those not flagged deleted."""
        self.deleted: ColumnElement[bool] | None = _flagged(self.table.c[flag]) if flag else None
        """Rows flagged deleted: never sent, :mod:`~growthhub_sync.deletes` handles them."""
        self.located = list(self.routing)
        """The location's rows, deleted or not."""
        if self.deleted is not None:
            self.routing.append(~self.deleted)
        # each row arrives with its ledger and open-quarantine hashes: the diff needs no lookups
        led, q = tables.ledger, tables.quarantine
        skey = cast(self.key, String)
        self.joined = self.table.outerjoin(
            led, and_(led.c.location == location.name, led.c.source_key == skey)
        ).outerjoin(q, and_(q.c.location == location.name, q.c.source_key == skey, q.c.status == "open"))
        fields = config.mapping.fields
        contact = [self.table.c[f.column] if f else null() for f in (fields.email, fields.phone)]
        hashed = [self.table.c[c] for c in self.columns if c != src.updated_at_column]
        # the database serialises the row's values: an unchanged row never crosses the wire whole
        digest = cast(func.row(*hashed), Text) if dialect == "postgresql" else func.json_array(*hashed)
        selected = [
            self.key, self.updated_at, *contact, digest,
            led.c.source_hash, led.c.payload_hash, q.c.source_hash, q.c.duplicate_of,
        ]  # fmt: skip
        self.narrow_columns = [c.label(name) for c, name in zip(selected, NarrowRow._fields, strict=True)]
        """What the diff reads per row (:class:`NarrowRow`); full rows are fetched only when needed."""

    def _is_pending(self) -> ColumnElement[bool]:
        p = self.pending
        return exists().where(p.c.location == self.location.name, p.c.source_key == cast(self.key, String))

    def in_window(self, window: Window) -> ColumnElement[bool]:
        conds = []
        if window.start is not None:
            conds.append(self.updated_at >= window.start)
        if window.end is not None:
            conds.append(self.updated_at < window.end)
        return and_(true(), *conds)

    def _in_range(self, key_range: KeyRange) -> list[ColumnElement[bool]]:
        conds = []
        if key_range.lo is not None:
            conds.append(self.key > key_range.lo)
        if key_range.hi is not None:
            conds.append(self.key <= key_range.hi)
        return conds

    def selection(self, window: Window, key_range: KeyRange, *, pending: bool) -> Select[Any]:
        """Pending rows of the range (any time), longest waiting first: rows deferred for want of
        quota go out oldest first, none starves; or window rows of the range that are not pending."""
        where = [*self.routing, *self._in_range(key_range)]
        if pending:
            p = self.pending
            waiting = and_(p.c.location == self.location.name, p.c.source_key == cast(self.key, String))
            stmt = select(*self.narrow_columns).select_from(self.joined.join(p, waiting))
            return stmt.where(*where).order_by(p.c.since, self.key)
        which = and_(self.in_window(window), ~self._is_pending())
        return self._select().where(which, *where).order_by(self.key)

    def by_keys(self, keys: Sequence[str], *, full: bool = False) -> Select[Any]:
        """Narrow rows (or full rows, in :attr:`columns` order) of the given keys."""
        stmt = select(*(self.table.c[c] for c in self.columns)) if full else self._select()
        return stmt.where(cast(self.key, String).in_(list(keys)) if keys else false(), *self.routing)

    def _select(self) -> Select[Any]:
        return select(*self.narrow_columns).select_from(self.joined)

    def scope(self, window: Window) -> ColumnElement[bool]:
        """Rows a run over ``window`` must account for: in the window or pending."""
        return and_(or_(self.in_window(window), self._is_pending()), *self.routing)


def _flagged(col: ColumnElement[Any]) -> ColumnElement[bool]:
    """A flag that is true or a timestamp that is set: not NULL, not false (``false``/``f``/``0``)."""
    return and_(col.is_not(None), func.lower(cast(col, String)).not_in(("false", "f", "0")))


def _route(col: ColumnElement[Any], value: str | int | bool | None) -> ColumnElement[bool]:
    """``col = value``; a null value routes the rows whose column is NULL or blank."""
    if value is None:
        return or_(col.is_(None), func.trim(cast(col, String)) == "")
    return col == value


def stream(conn: Connection, stmt: Select[Any], chunk_rows: int) -> Iterator[Sequence[Row[Any]]]:
    """Yield lists of rows from a server-side cursor, ``chunk_rows`` at a time."""
    if conn.dialect.name == "postgresql":
        # the whole result is read: plan for total time, not for the first rows (a fast-start
        # nested loop over a grown ledger is quadratic)
        conn.exec_driver_sql("SET LOCAL cursor_tuple_fraction = 1.0")
        conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")  # sort the window in memory, not on disk
    result = conn.execute(stmt.execution_options(stream_results=True, yield_per=chunk_rows))
    if conn.dialect.name == "postgresql":
        # the server computes the next chunk while this one is diffed (a FETCH waits for it
        # without holding the GIL): the two cores overlap instead of taking turns
        yield from _prefetched(result.partitions(chunk_rows))
    else:
        yield from result.partitions(chunk_rows)


_END = object()


def _prefetched(chunks: Iterator[Sequence[Row[Any]]]) -> Iterator[Sequence[Row[Any]]]:
    """Iterate ``chunks`` one chunk ahead in a helper thread; only that thread touches the cursor.

    The thread has finished (and released the cursor) when this generator returns, raises or is
    closed, so the caller may close the connection right after.
    """
    ready: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def fetch() -> None:
        try:
            while not stop.is_set():
                chunk = next(chunks, _END)
                ready.put(chunk)
                if chunk is _END:
                    return
        except BaseException as e:  # re-raised in the consumer
            ready.put(e)

    worker = threading.Thread(target=fetch, name="growthhub-extract-prefetch", daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a pending put(), wait out a FETCH in flight
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.05)
        worker.join()


def plan_key_ranges(
    conn: Connection, source: Source, window: Window, batch_rows: int
) -> tuple[int, list[KeyRange]]:
    """Count the run's rows and cut them into key ranges of about ``batch_rows`` rows.

    The database orders the keys, so the bounds agree with its own comparisons (collation).
    The last range is open-ended: rows inserted after planning are still covered.
    """
    scope = source.scope(window)
    total = conn.execute(select(func.count()).select_from(source.table).where(scope)).scalar_one()
    if total <= batch_rows:
        return total, [KeyRange()]
    numbered = (
        select(source.key.label("k"), func.row_number().over(order_by=source.key).label("rn"))
        .where(scope)
        .subquery()
    )
    bounds = [
        r[0]
        for r in conn.execute(
            select(numbered.c.k).where(numbered.c.rn % batch_rows == 0).order_by(numbered.c.k)
        )
    ]
    ranges, lo = [], None
    for hi in bounds:
        ranges.append(KeyRange(lo, hi))
        lo = hi
    ranges.append(KeyRange(lo, None))
    return total, ranges
