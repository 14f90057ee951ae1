"""What the GrowthHub page reads from the state tables: run rows and open quarantine rows.

Read-only and free of Airflow, so the queries are tested against PostgreSQL and SQLite directly.
Personal data leaves this module masked: a quarantine row's email and phone, and its error text.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, inspect, or_, select, text, true, tuple_, union_all

from growthhub_provider.masking import mask_pii
from growthhub_sync.outcomes import OUTCOMES, mask_payload

if TYPE_CHECKING:
    from sqlalchemy import Column, ColumnElement
    from sqlalchemy.engine import Connection, Engine

    from growthhub_sync.state import StateTables

STAGES = ("quality", "api")
"""A quarantine row's stage: failed the quality checks, or rejected by the API (400/422)."""
UNKNOWN_CODE = "unknown"
"""The code shown, and filtered on, for rows quarantined before reason codes existed (NULL)."""
MAX_PAGE = 200
COUNT_CAP = 10_000
"""Open rows counted at most per location: a count of a million rows would cost a second per page view."""
_CODE = re.compile(r"^[a-z0-9_]{1,64}$")
# a literal, not a bound parameter: the planner must see it to use the partial indexes
_OPEN = text("status = 'open'")


class BadFilter(ValueError):
    """A filter value the page cannot query (its message names the parameter)."""


@dataclass(frozen=True)
class QuarantineFilter:
    """Which open quarantine rows a page lists; ``None`` means any."""

    location: str | None = None
    stage: str | None = None
    code: str | None = None

    def __post_init__(self) -> None:
        if self.stage is not None and self.stage not in STAGES:
            raise BadFilter(f"stage must be one of {list(STAGES)}, not {self.stage!r}")
        if self.code is not None and not _CODE.match(self.code):
            raise BadFilter(f"code must be a reason code such as email_invalid, not {self.code!r}")


@dataclass(frozen=True)
class QuarantineItem:
    """One open quarantine row as the page shows it: personal data masked."""

    id: int
    location: str
    source_key: str
    stage: str
    http_status: int | None
    codes: list[str]
    errors: list[str]
    email: str | None
    phone: str | None
    attempts: int
    first_seen_at: datetime
    last_seen_at: datetime
    run_id: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self.__dict__.items() if not isinstance(v, datetime)},
            "first_seen_at": self.first_seen_at.isoformat(),
            "last_seen_at": self.last_seen_at.isoformat(),
        }


@dataclass(frozen=True)
class QuarantinePage:
    items: list[QuarantineItem]
    next_before: int | None
    """The cursor of the next (older) page: rows with a smaller id; ``None`` on the last page."""


@dataclass(frozen=True)
class RunRow:
    """One location's part of a sync or replay run (a ``growthhub_sync_runs`` row)."""

    run_id: str
    location: str
    dag_id: str | None
    status: str
    dry_run: bool
    counts: dict[str, int]
    started_at: datetime | None
    finished_at: datetime | None
    window_start: datetime | None
    window_end: datetime | None
    backlog: int | None = None
    """Rows still deferred after the run (quota planning); ``None`` before the column existed."""
    eta: date | None = None
    """The UTC day the backlog is forecast to be sent."""
    verify_checked: int | None = None
    """Contacts read back and compared (0 or ``None``: none, verification off or a dry run)."""
    verify_mismatched: int | None = None

    @property
    def extracted(self) -> int:
        return self.counts.get("extracted", 0)

    @property
    def reject_rate(self) -> float:
        """(quarantined + rejected) / extracted of this run's rows."""
        failed = self.counts.get("quarantined", 0) + self.counts.get("rejected", 0)
        return failed / self.extracted if self.extracted else 0.0

    def as_dict(self) -> dict[str, Any]:
        dates = ("started_at", "finished_at", "window_start", "window_end", "eta")
        return {
            **{k: v for k, v in self.__dict__.items() if k not in dates},
            **{k: getattr(self, k).isoformat() if getattr(self, k) else None for k in dates},
            "reject_rate": round(self.reject_rate, 4),
        }


def tables_exist(engine: Engine, tables: StateTables) -> bool:
    """Whether a sync has created the state tables yet (the page creates nothing)."""
    found = inspect(engine)
    return all(found.has_table(t.name, schema=t.schema) for t in (tables.runs, tables.quarantine))


def recent_runs(conn: Connection, tables: StateTables, location: str, limit: int = 50) -> list[RunRow]:
    """The latest ``limit`` runs of a location, newest first."""
    runs = tables.runs
    stmt = (
        select(runs)
        .where(runs.c.location == location)
        .order_by(runs.c.started_at.desc(), runs.c.run_id.desc())
        .limit(limit)
    )
    return [
        RunRow(
            run_id=r.run_id,
            location=r.location,
            dag_id=r.dag_id,
            status=r.status,
            dry_run=bool(r.dry_run),
            counts={name: int(getattr(r, name) or 0) for name in ("extracted", *OUTCOMES)},
            started_at=_aware(r.started_at),
            finished_at=_aware(r.finished_at),
            window_start=_aware(r.window_start),
            window_end=_aware(r.window_end),
            backlog=r.backlog,
            eta=r.eta,
            verify_checked=r.verify_checked,
            verify_mismatched=r.verify_mismatched,
        )
        for r in conn.execute(stmt)
    ]


def open_pairs(conn: Connection, tables: StateTables) -> list[tuple[str, str]]:
    """The (location, stage) pairs holding open quarantine rows, sorted: where the page's rows are
    when locations are discovered at run time (``locations.from_column``)."""
    q = tables.quarantine
    return [(loc, stage) for loc, stage in _distinct(conn, (q.c.location, q.c.stage), _OPEN)]


def run_locations(conn: Connection, tables: StateTables) -> list[str]:
    """The locations that have run rows, sorted (the runs page of discovered locations)."""
    return [loc for (loc,) in _distinct(conn, (tables.runs.c.location,))]


def _distinct(conn: Connection, columns: Sequence[Column[Any]], *conditions: Any) -> list[tuple[Any, ...]]:
    """The distinct values of ``columns``, which lead an index, in its order.

    A DISTINCT reads every row (millions of quarantine or run rows for a few hundred locations);
    on PostgreSQL a loose index scan instead jumps from one value to the next, one index probe each
    (a recursive CTE: the first value, then the smallest one greater than the last). SQLite (small
    warehouses) takes the plain DISTINCT.
    """
    if conn.dialect.name != "postgresql":
        stmt = select(*columns).where(*conditions).distinct().order_by(*columns)
    else:
        first = select(*columns).where(*conditions).order_by(*columns).limit(1).cte("found", recursive=True)
        after = tuple_(*columns) > tuple_(*first.c)
        step = select(*columns).where(*conditions, after).order_by(*columns).limit(1).lateral("step")
        found = first.union_all(select(*step.c).select_from(first.join(step, true())))
        stmt = select(*found.c)
    return [tuple(r) for r in conn.execute(stmt)]


def open_counts(conn: Connection, tables: StateTables, locations: Sequence[str]) -> dict[str, int]:
    """Open quarantine rows per location, counted up to :data:`COUNT_CAP` + 1 (``> COUNT_CAP``: "more")."""
    q = tables.quarantine
    counts = {}
    for location in locations:
        capped = select(q.c.id).where(q.c.location == location, _OPEN).limit(COUNT_CAP + 1).subquery()
        counts[location] = conn.execute(select(func.count()).select_from(capped)).scalar_one()
    return counts


def quarantine_page(
    conn: Connection,
    tables: StateTables,
    locations: Sequence[str],
    where: QuarantineFilter,
    *,
    before: int | None = None,
    limit: int = 50,
    held: Collection[tuple[str, str]] | None = None,
) -> QuarantinePage:
    """Open quarantine rows, newest first, ``limit`` per page, after the cursor ``before``.

    Keyset pagination on ``id``: every page costs the same however deep it is. The page's ids are
    the merge of one range per (location, stage) pair, each read in ``id`` order from the partial
    index on (location, stage, id) of open rows and cut at ``limit``, so a rare stage or location
    costs no more than a common one; on PostgreSQL the index includes the reason codes, so a code
    filter reads no table row it rejects. Only then are the page's rows read. ``locations`` are
    those of the config (a location filter names one); ``held``, when given, the (location, stage)
    pairs holding open rows (:func:`open_pairs`): only their ranges are read, so hundreds of
    discovered locations cost the ranges of those with rows of the filtered stage, not all of them.
    """
    limit = max(1, min(limit, MAX_PAGE))
    q = tables.quarantine
    pairs = [
        (loc, stage)
        for loc in ([where.location] if where.location else locations)
        for stage in ([where.stage] if where.stage else STAGES)
        if held is None or (loc, stage) in held
    ]
    if not pairs:
        return QuarantinePage([], None)
    ranges = []
    for loc, stage in pairs:
        conditions = [q.c.location == loc, q.c.stage == stage, _OPEN, *_code_condition(q, where.code)]
        if before is not None:
            conditions.append(q.c.id < before)
        ranges.append(select(q.c.id).where(*conditions).order_by(q.c.id.desc()).limit(limit + 1))
    # ids first (index-only on PostgreSQL), then the rows of the page's ids alone
    merged = union_all(*(select(r.subquery()) for r in ranges)).subquery()
    ids = select(merged.c.id).order_by(merged.c.id.desc()).limit(limit + 1)
    stmt = select(*(q.c[name] for name in _ITEM_COLUMNS)).where(q.c.id.in_(ids)).order_by(q.c.id.desc())
    rows = list(conn.execute(stmt))
    items = [_item(r._mapping) for r in rows[:limit]]
    return QuarantinePage(items, items[-1].id if len(rows) > limit else None)


def open_keys(conn: Connection, tables: StateTables, ids: Iterable[int]) -> dict[str, list[str]]:
    """Location → source keys of those of ``ids`` that are open quarantine rows (what a replay sends)."""
    q = tables.quarantine
    wanted = sorted(set(ids))
    keys: dict[str, list[str]] = {}
    for start in range(0, len(wanted), 500):
        stmt = (
            select(q.c.location, q.c.source_key)
            .where(q.c.id.in_(wanted[start : start + 500]), _OPEN)
            .order_by(q.c.location, q.c.source_key)
        )
        for location, key in conn.execute(stmt):
            keys.setdefault(location, []).append(key)
    return keys


_ITEM_COLUMNS = (
    "id", "location", "source_key", "stage", "http_status", "reason_codes", "errors", "payload",
    "attempts", "first_seen_at", "last_seen_at", "run_id",
)  # fmt: skip


def _code_condition(q: Any, code: str | None) -> list[ColumnElement[bool]]:
    if code is None:
        return []
    codes = q.c.reason_codes
    if code == UNKNOWN_CODE:
        return [or_(codes.is_(None), codes == "")]
    # whole codes of the comma-separated list, on the bare column: its statistics then tell the
    # planner how common the code is (an expression such as ',' || codes || ',' has none, and a
    # wrong guess turns a walk down the index into a sort of every open row)
    return [
        or_(
            codes == code,
            codes.startswith(f"{code},", autoescape=True),
            codes.endswith(f",{code}", autoescape=True),
            codes.contains(f",{code},", autoescape=True),
        )
    ]


def _item(row: Any) -> QuarantineItem:
    masked = mask_payload(row["payload"] or {})
    codes = [c.strip() for c in (row["reason_codes"] or "").split(",") if c.strip()]
    return QuarantineItem(
        id=row["id"],
        location=row["location"],
        source_key=row["source_key"],
        stage=row["stage"],
        http_status=row["http_status"],
        codes=codes or [UNKNOWN_CODE],
        errors=[mask_pii(str(e)) for e in row["errors"] or []],
        email=masked.get("email"),
        phone=masked.get("phone"),
        attempts=row["attempts"],
        first_seen_at=_aware(row["first_seen_at"]),
        last_seen_at=_aware(row["last_seen_at"]),
        run_id=row["run_id"],
    )


def _aware(value: datetime | None) -> Any:
    """SQLite returns naive datetimes for timezone-aware columns; the state tables store UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
