"""Quota planning: what a run must send, what today's quota lets it send, when its backlog is done.

GrowthHub allows each location a number of requests per UTC day (200,000), so a first load of a
million rows takes five days. The plan forecasts it for every location with work (:func:`plan_quota`):

- **to send**: the run's rows, window and backlog (rows deferred by earlier runs), as the plan
  counts them. Rows found unchanged cost no request, so it is an upper bound;
- **quota left today**: the lowest figure known for today: the location's limiter (the shared
  Redis state, or this process's) and the last figure a run of today recorded from GrowthHub's
  ``X-RateLimit-Daily-Remaining`` (the run row's ``daily_remaining``); nothing known: the daily
  limit. ``quota.daily_reserve`` of it (config) is kept for other traffic;
- **deferred to tomorrow**: what does not fit, and the **ETA**: the UTC day the backlog is sent
  at ``daily limit - reserve`` rows a day, one run (the first of each day) draining a day's worth.

A location that defers rows runs as one work item, backlog first and oldest first
(:meth:`~growthhub_sync.extract.Source.selection`), so the rows that waited longest take today's
quota and no row starves behind newer changes. The forecast is recorded in the run row (``to_send``,
``quota_left``, ``quota_deferred``, ``eta``), finalize adds ``backlog`` (rows still waiting) and
``daily_remaining`` (quota left after the run): an operator sees the backlog shrink run by run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, select, update

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from growthhub_sync.config import LocationConfig
    from growthhub_sync.state import StateTables

log = logging.getLogger(__name__)

_EPOCH = date(1970, 1, 1)
_ETA_MEMORY = timedelta(days=7)
"""How far back a location's earlier ETAs are compared: a backlog alerts when it appears or slips."""


def today() -> date:
    """The UTC day the daily quota counts in (the client limiter's, so tests move both together)."""
    from growthhub_provider.client import limiter  # the DAG processor imports this module: no client

    return _EPOCH + timedelta(days=limiter.quota_day())


@dataclass(frozen=True)
class Forecast:
    """One location's quota forecast for one run."""

    to_send: int
    quota_left: int | None
    """Requests left today; ``None``: unknown (no connection to ask, no run recorded one)."""
    daily_limit: int | None
    reserve: int
    day: date
    source: str
    """Where ``quota_left`` comes from: ``limiter``, ``last run`` or ``daily limit``."""
    slipped: bool = False
    """Rows are deferred and no run of the last week forecast this ETA or a later one (alert)."""

    @property
    def sendable(self) -> int:
        """Rows today's quota lets the run send (all of them when the quota is unknown)."""
        if self.quota_left is None:
            return self.to_send
        return min(self.to_send, max(self.quota_left - self.reserve, 0))

    @property
    def deferred(self) -> int:
        """Rows left for the next quota days."""
        return self.to_send - self.sendable

    @property
    def eta_days(self) -> int | None:
        """Quota days after today until the last of these rows is sent; ``None``: never at this limit."""
        if not self.deferred:
            return 0
        per_day = (self.daily_limit or 0) - self.reserve
        return math.ceil(self.deferred / per_day) if per_day > 0 else None

    @property
    def eta(self) -> date | None:
        days = self.eta_days
        return None if days is None else self.day + timedelta(days=days)

    def columns(self) -> dict[str, Any]:
        """The run row's forecast columns."""
        return {
            "to_send": self.to_send,
            "quota_left": self.quota_left,
            "quota_deferred": self.deferred,
            "eta": self.eta,
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe (XCom), with the derived figures the report prints."""
        eta = self.eta
        return {
            **asdict(self),
            "day": self.day.isoformat(),
            "sendable": self.sendable,
            "deferred": self.deferred,
            "eta_days": self.eta_days,
            "eta": eta.isoformat() if eta else None,
        }


def limiter_reading(location: LocationConfig) -> tuple[int | None, int | None]:
    """``(quota left as the location's limiter knows it, the connection's daily limit)``.

    Reads the coordination state the sync tasks share (Redis: every worker's sends of today; local:
    this process's), sending nothing. ``(None, None)`` when the connection cannot be read: the
    forecast is a report, the sync task names a broken connection.
    """
    try:
        from growthhub_provider.hooks.growthhub import GrowthHubHook

        hook = GrowthHubHook(growthhub_conn_id=location.conn_id, location_id=location.location_id)
        limits = hook.config.limits
        return hook.coordination.limiter(limits).daily_remaining, limits.daily
    except Exception as exc:  # no connection (fake upserters), Redis down: the run row still tells
        log.debug("quota of %s not read from its limiter: %s: %s", location.name, type(exc).__name__, exc)
        return None, None


def plan_quota(
    engine: Engine,
    tables: StateTables,
    work: Mapping[str, tuple[LocationConfig, int]],
    *,
    run_id: str,
    reserve: int = 0,
) -> dict[str, Forecast]:
    """The forecast of each location of ``work`` (name → (location, rows to send)).

    Two grouped queries over the run rows of every location at once (today's lowest recorded
    quota figure; the latest ETA of the last week), then one limiter read per location.
    """
    day = today()
    midnight = datetime.combine(day, time(0), tzinfo=UTC)
    with engine.connect() as conn:
        recorded = _grouped(conn, tables, work, run_id, func.min(tables.runs.c.daily_remaining), midnight)
        earlier = _grouped(conn, tables, work, run_id, func.max(tables.runs.c.eta), midnight - _ETA_MEMORY)
    out = {}
    for name, (location, rows) in work.items():
        live, limit = limiter_reading(location)
        known = {"limiter": live, "last run": recorded.get(name)}
        figures = {k: v for k, v in known.items() if v is not None}
        if figures:
            source = min(figures, key=lambda k: (figures[k], k != "last run"))
            left: int | None = figures[source]
            if source == "limiter" and live == limit:
                source = "daily limit"  # nothing spent today as far as anyone here knows
        else:
            left, source = limit, "daily limit"
        forecast = Forecast(rows, left, limit, reserve, day, source)
        previous = earlier.get(name)
        if forecast.deferred and (previous is None or (forecast.eta or date.max) > _as_date(previous)):
            forecast = Forecast(rows, left, limit, reserve, day, source, slipped=True)
        out[name] = forecast
    return out


def _grouped(
    conn: Connection,
    tables: StateTables,
    work: Mapping[str, Any],
    run_id: str,
    aggregate: Any,
    since: datetime,
) -> dict[str, Any]:
    """``aggregate`` over each location's earlier runs started since ``since`` (the runs index)."""
    runs = tables.runs
    stmt = (
        select(runs.c.location, aggregate)
        .where(runs.c.location.in_(list(work)), runs.c.started_at >= since, runs.c.run_id != run_id)
        .group_by(runs.c.location)
    )
    return {name: value for name, value in conn.execute(stmt) if value is not None}


def _as_date(value: date | str) -> date:
    """A ``Date`` column's value (SQLite hands back ISO text through some drivers)."""
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def record_forecasts(
    engine: Engine, tables: StateTables, run_id: str, forecasts: Mapping[str, Forecast]
) -> None:
    """Write each location's forecast into its run row (started by the plan)."""
    if not forecasts:
        return
    runs = tables.runs
    stmt = (
        update(runs)
        .where(runs.c.run_id == bindparam("rid"), runs.c.location == bindparam("loc"))
        .values({c: bindparam(c) for c in ("to_send", "quota_left", "quota_deferred", "eta")})
    )
    with engine.begin() as conn:
        conn.execute(stmt, [{"rid": run_id, "loc": n, **f.columns()} for n, f in forecasts.items()])


def item_rows(forecast: Forecast | None, batch_rows: int, rows: int) -> int:
    """Rows per work item of a location: one item when rows wait for tomorrow, so the location's
    backlog is sent oldest first before any newer row takes today's quota (key ranges run apart)."""
    return max(batch_rows, rows) if forecast is not None and forecast.deferred else batch_rows


def run_end(
    conn: Connection, tables: StateTables, location: str, daily_remaining: int | None
) -> dict[str, Any]:
    """What finalize adds to the run row: the rows still waiting and the quota left after the run."""
    p = tables.pending
    backlog = conn.execute(select(func.count()).where(p.c.location == location)).scalar_one()
    return {"backlog": backlog, "daily_remaining": daily_remaining}


# -- what the report, the note and the alert say ----------------------------------------------------


def describe(result: Mapping[str, Any]) -> str | None:
    """One line of a location's run: rows to send, quota left, deferred, backlog and ETA; ``None``
    for a run without a forecast."""
    f = result.get("quota")
    if not f:
        return None
    left = "unknown" if f["quota_left"] is None else f"{f['quota_left']:,} ({f['source']})"
    text = f"{result['location']}: to send {f['to_send']:,}, quota left today {left}"
    if f["reserve"]:
        text += f", {f['reserve']:,} kept in reserve"
    text += f", {f['deferred']:,} deferred to tomorrow"
    if result.get("backlog") is not None:
        text += f"; backlog after the run {int(result['backlog']):,}"
    if f["eta_days"] is None:
        return text + "; no ETA: the daily limit minus the reserve sends nothing"
    if f["deferred"]:
        return text + f"; ETA {f['eta_days']} more day(s) (one run a day), on {f['eta']} (UTC)"
    return text + "; all of it today"


def lines(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The quota lines of the locations deferring rows or still holding a backlog (with hundreds of
    locations, the others say nothing new)."""
    waiting = [r for r in results if (r.get("quota") or {}).get("deferred") or r.get("backlog")]
    return [line for r in waiting if (line := describe(r))]


def slipped(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Results whose backlog appeared or whose ETA moved later this run: what the quota alert names."""
    return [r for r in results if (r.get("quota") or {}).get("slipped")]
