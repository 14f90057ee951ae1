"""One run over many locations: plan once, sync shards of work items, finalise every location.

An agency runs dozens to hundreds of GrowthHub sub-accounts. Instead of a task group per
location, a run is :func:`plan_fleet` (one grouped count of the window's and the pending rows per
location: a quiet location costs nothing more) → :func:`sync_shard` (mapped: each shard runs its
work items, several locations at once, each with its own upserter, limiter and token) →
:func:`finalize_fleet` (one run row per location with work, as :func:`~growthhub_sync.pipeline.finalize_run`
writes it). :func:`sync_all` does all three in one process (tests, benchmarks).

With ``locations.from_column`` a row's location is that column's value, and the locations are
those the agency connection has installed (a :data:`Directory`); rows naming no installed
location are never sent: they are quarantined under their value (:data:`~growthhub_sync.config.UNROUTED`
when NULL or blank) with a ``location_*`` reason code (:mod:`~growthhub_sync.routing`). Without it,
the configured list is the directory and every location is counted on its own, as before.

One location's failure never stops the others: a refused token or a config error of location X is
recorded for X (:mod:`~growthhub_sync.failures`), X's remaining work is skipped, X's run row is
failed and the rest finish.
"""

from __future__ import annotations

import heapq
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import String, cast, func, select, union_all

from growthhub_sync import deletes, failures, quota, routing, state, winners
from growthhub_sync.config import UNROUTED, ConfigError
from growthhub_sync.extract import KeyRange, Source, Window, plan_key_ranges
from growthhub_sync.outcomes import Summary, SyncInvariantError
from growthhub_sync.pipeline import (
    SyncOptions,
    data_docs,
    finalize_run,
    prepare,
    replay_quarantine,
    start_run,
    sync_batch,
    sync_window,
)
from growthhub_sync.upsert import UpserterSource, check_access, require_connection
from growthhub_sync.warehouse import get_engine

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from growthhub_sync.config import SyncConfig

log = logging.getLogger(__name__)


class InstalledLocation(Protocol):
    """What the agency's directory says of one location (the hook's ``InstalledLocation``)."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def installed(self) -> bool: ...


Directory = Callable[[str], Sequence[InstalledLocation]]
"""Agency connection id → the locations it sees; the default asks GrowthHub (:func:`hook_directory`)."""


@dataclass(frozen=True)
class KnownLocation:
    """A directory entry built by hand (tests, benchmarks, a fixed directory)."""

    id: str
    name: str = ""
    installed: bool = True


def hook_directory(conn_id: str) -> Sequence[InstalledLocation]:
    """The agency connection's locations from GrowthHub, the uninstalled ones flagged (their rows
    are quarantined as ``location_not_installed``, not ``location_unknown``)."""
    from growthhub_provider.hooks.growthhub import GrowthHubHook

    hook = GrowthHubHook(growthhub_conn_id=conn_id)
    return hook.installed_locations(installed_only=False)  # type: ignore[no-any-return]


@dataclass
class _Work:
    """A location's rows in this run; ``reason``: they are quarantined with it, not sent."""

    rows: int = 0
    reason: str | None = None


# -- plan ----------------------------------------------------------------------------------------


def plan_fleet(
    config: SyncConfig,
    window: Window | Mapping[str, Any] | None,
    options: SyncOptions | None = None,
    *,
    engine: Engine | None = None,
    directory: Directory | None = None,
    requested: Sequence[str] = (),
    max_shards: int | None = None,
    batch_rows: int | None = None,
) -> dict[str, Any]:
    """Count every location's rows, cut them into work items, pack the items into shards.

    ``requested``: location names or ids to sync (empty: all). ``max_shards`` caps the shards
    (default ``shards.max``); ``batch_rows`` is the size of a work item (default ``batch_size``).
    Starts a run row for each location with work only. Returns (JSON-safe, for XCom)
    ``{"window", "shards": [[{"location", "lo", "hi", "rows", "reason"}]], "locations": {name: rows},
    "quiet", "total"}``.
    """
    o = options or SyncOptions()
    eng = get_engine(config, engine)
    tables = prepare(config, eng)
    win = sync_window(window, o.full_refresh)
    if config.location_routing.from_column:
        work, known = _routed_work(config, eng, tables, win, directory or hook_directory)
    else:
        work, known = _listed_work(config, eng, tables, win)
    held_back = _plan_deletes(config, eng, work, known, win, o)
    work = {name: work[name] for name in _selected(config, work, known, requested)}
    quiet = len(known - set(work)) if not requested else 0
    size = batch_rows or config.batch_size
    sending = {name: (config.location(name), w.rows) for name, w in work.items() if not w.reason}
    forecasts = quota.plan_quota(eng, tables, sending, run_id=o.run_id, reserve=config.quota.daily_reserve)
    item_rows = {name: quota.item_rows(forecasts.get(name), size, w.rows) for name, w in work.items()}
    with eng.connect() as conn:
        items = [
            i
            for name, w in work.items()
            if name not in held_back
            for i in _items(conn, config, tables, name, w, win, item_rows[name])
        ]
    if not o.dry_run:
        for name in work:
            start_run(eng, tables, config.location(name), win, o)
        for name in (n for n, w in work.items() if w.rows and not w.reason and n not in held_back):
            winners.plan_winners(
                config, config.location(name), eng, win, run_id=o.run_id, full_refresh=o.full_refresh
            )
        quota.record_forecasts(eng, tables, o.run_id, forecasts)
    for line in quota.lines([{"location": n, "quota": f.as_dict()} for n, f in forecasts.items()]):
        log.info("plan quota: %s", line)
    for name in held_back.keys() & work.keys():  # the run row names it; nothing of it is sent
        log.warning("location %s: %s", name, held_back[name])
        failure = failures.failure_of(deletes.MassDeleteError(held_back[name]), config.location(name))
        failures.record_failure(eng, tables, o.run_id, failure)  # type: ignore[arg-type]
    shards = pack_shards(items, max_shards or config.shards.max, size)
    log.info(
        "plan: %d rows of %d location(s) in %d shard(s); %d quiet location(s)",
        sum(w.rows for w in work.values()), len(work), len(shards), quiet,
    )  # fmt: skip
    return {
        "window": win.as_dict(),
        "shards": shards,
        "locations": {name: w.rows for name, w in work.items()},
        "quiet": quiet,
        "total": sum(w.rows for w in work.values()),
        "quota": {name: f.as_dict() for name, f in forecasts.items()},
    }


def _routed_work(
    config: SyncConfig, eng: Engine, tables: state.StateTables, win: Window, directory: Directory
) -> tuple[dict[str, _Work], set[str]]:
    """Rows per location value, window and pending rows in ONE grouped query; the known names."""
    column = config.location_routing.from_column
    installed = {d.id: bool(d.installed) for d in directory(config.location_routing.conn_id)}
    overrides = {loc.location_id: loc for loc in config.locations}
    names = {loc.name: loc for loc in config.locations}
    src = Source(config, config.location(UNROUTED), tables, eng.dialect.name)
    value, pending = cast(src.table.c[column], String), tables.pending
    in_window = select(value, func.count()).where(src.in_window(win)).group_by(value)
    held = (
        select(pending.c.location, func.count())
        .select_from(pending.join(src.table, pending.c.source_key == cast(src.key, String)))
        .where(~src.in_window(win))
        .group_by(pending.c.location)
    )
    work: dict[str, _Work] = {}
    with eng.connect() as conn:
        for found, n in conn.execute(union_all(in_window, held)):
            loc = names.get(found) or overrides.get(found)
            name, reason = routing.route(found, loc.location_id if loc else found, installed)
            work.setdefault(loc.name if loc else name, _Work(reason=reason)).rows += n
    known = {overrides[i].name if i in overrides else i for i, ok in installed.items() if ok}
    return work, known


def _listed_work(
    config: SyncConfig, eng: Engine, tables: state.StateTables, win: Window
) -> tuple[dict[str, _Work], set[str]]:
    """The configured locations' rows, counted one location at a time (their filters differ)."""
    work: dict[str, _Work] = {}
    with eng.connect() as conn:
        for loc in config.locations:
            source = Source(config.for_location(loc), loc, tables, eng.dialect.name)
            counted = select(func.count()).select_from(source.table).where(source.scope(win))
            n = conn.execute(counted).scalar_one()
            if n:
                work[loc.name] = _Work(n)
    return work, {loc.name for loc in config.locations}


def _plan_deletes(
    config: SyncConfig, eng: Engine, work: dict[str, _Work], known: set[str], win: Window, o: SyncOptions
) -> dict[str, str]:
    """Give the locations without rows in the run but with contacts to delete or tag a work item
    (its first item runs :func:`~growthhub_sync.deletes.apply_deletes`), and return the locations
    the mass-delete guard holds back (name → why): checked here, before any shard sends, so no
    shard of a big location is already upserting when another finds its deletes over the limit."""
    if config.deletes.mode == "ignore":
        return {}
    held_back: dict[str, str] = {}
    with eng.connect() as conn:
        for name in sorted(known | {n for n, w in work.items() if not w.reason}):
            loc = config.location(name)
            doomed = deletes.doomed(conn, config, loc, win, o.full_refresh)
            try:
                if doomed:
                    deletes.check_fraction(conn, config, loc, len(doomed), o.allow_mass_delete)
            except deletes.MassDeleteError as exc:
                held_back[name] = str(exc)
            if name not in work and (doomed or deletes.held(conn, config, loc, win)):
                work[name] = _Work()
    return held_back


def _selected(
    config: SyncConfig, names: Iterable[str], known: set[str], requested: Sequence[str]
) -> list[str]:
    """The ``requested`` ones of ``names`` (by name or id; empty: all); a request no known location
    answers to is an error."""
    names = list(names)
    if not requested:
        return names
    ids = {name: config.location(name).location_id for name in {*known, *names}}
    unknown = sorted(set(requested) - set(ids) - set(ids.values()))
    if unknown:
        raise ConfigError(f"params.locations: unknown location(s) {unknown}; known: {sorted(ids)}")
    return [name for name in names if name in requested or ids[name] in requested]


def _items(
    conn: Connection,
    config: SyncConfig,
    tables: state.StateTables,
    name: str,
    work: _Work,
    win: Window,
    batch_rows: int,
) -> list[dict[str, Any]]:
    """A location's work items: key ranges of about ``batch_rows`` rows (one for rows not sent)."""
    item = {"location": name, "reason": work.reason}
    if work.reason or work.rows <= batch_rows:
        return [{**item, **KeyRange().as_dict(), "rows": work.rows}]
    loc = config.location(name)
    source = Source(config.for_location(loc), loc, tables, conn.dialect.name)
    _, ranges = plan_key_ranges(conn, source, win, batch_rows)
    sizes = [batch_rows] * (len(ranges) - 1)
    sizes.append(max(work.rows - sum(sizes), 0))
    return [{**item, **r.as_dict(), "rows": n} for r, n in zip(ranges, sizes, strict=True)]


def pack_shards(
    items: Iterable[Mapping[str, Any]], max_shards: int, shard_rows: int
) -> list[list[dict[str, Any]]]:
    """Shards of about ``shard_rows`` rows, at most ``max_shards``, balanced by rows: biggest item
    first into the lightest shard. Each shard is a task (a process start-up), so a run of a few
    thousand rows over many locations is one shard, not one per location."""
    ordered = sorted(items, key=lambda i: (-int(i["rows"]), str(i["location"]), str(i["lo"])))
    needed = -(-sum(int(i["rows"]) for i in ordered) // shard_rows)
    count = min(max_shards, len(ordered), max(needed, 1))
    shards: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    loads = [(0, i) for i in range(count)]
    for item in ordered:
        rows, i = heapq.heappop(loads)
        shards[i].append(dict(item))
        heapq.heappush(loads, (rows + int(item["rows"]), i))
    return shards


# -- sync ----------------------------------------------------------------------------------------


def sync_shard(
    config: SyncConfig,
    window: Window | Mapping[str, Any] | None,
    items: Sequence[Mapping[str, Any]],
    options: SyncOptions | None = None,
    *,
    engine: Engine | None = None,
    upserter: UpserterSource = None,
) -> dict[str, Any]:
    """Run a shard's work items, ``shards.location_concurrency`` locations at once.

    Returns ``{"locations": [{"location", "batches": [summary], "failure": headline | None}]}``.
    A location refused for good is recorded and its other items skipped; an error a retry may fix
    is raised once every other location finished (a retried shard finds their rows unchanged).
    """
    o = options or SyncOptions()
    eng = get_engine(config, engine)
    by_location: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for item in items:
        by_location[str(item["location"])].append(item)
    workers = max(1, min(config.shards.location_concurrency, len(by_location)))
    with ThreadPoolExecutor(workers, thread_name_prefix="growthhub-location") as pool:
        futures = {
            name: pool.submit(_sync_location, config, name, its, window, o, eng, upserter)
            for name, its in by_location.items()
        }
    done, errors = [], []
    for name, future in futures.items():
        try:
            done.append(future.result())
        except Exception as exc:
            log.warning("location %s: %s: %s (the shard will be retried)", name, type(exc).__name__, exc)
            errors.append(exc)
    if errors:
        raise errors[0]
    return {"locations": done}


def _sync_location(
    config: SyncConfig,
    name: str,
    items: Sequence[Mapping[str, Any]],
    window: Window | Mapping[str, Any] | None,
    o: SyncOptions,
    eng: Engine,
    upserter: UpserterSource,
) -> dict[str, Any]:
    loc = config.location(name)
    batches: list[dict[str, Any]] = []
    try:
        if reason := items[0].get("reason"):
            win = sync_window(window, o.full_refresh)
            batches.append(routing.quarantine_unroutable(config, loc, win, reason, o, eng))
            return {"location": name, "batches": batches, "failure": None}
        if upserter is None and not o.dry_run:  # a bad token fails before anything is sent
            require_connection(loc)
            check_access(loc)
        if any(item["lo"] is None for item in items):  # the location's first item: once a run
            win = sync_window(window, o.full_refresh)
            if erased := deletes.apply_deletes(config, loc, win, o, eng, upserter):
                batches.append(erased)
        for item in items:
            key_range = KeyRange.from_dict(dict(item))
            batches.append(sync_batch(config, name, window, key_range, o, engine=eng, upserter=upserter))
    except Exception as exc:
        failure = failures.failure_of(exc, loc)
        if failure is None:
            raise
        log.warning("%s; its other work is skipped", failure.headline())
        failures.record_failure(eng, state.state_tables(config.state), o.run_id, failure)
        return {"location": name, "batches": batches, "failure": failure.headline()}
    return {"location": name, "batches": batches, "failure": None}


# -- finalize ------------------------------------------------------------------------------------


def finalize_fleet(
    config: SyncConfig,
    plan: Mapping[str, Any],
    shards: Iterable[Mapping[str, Any]],
    options: SyncOptions | None = None,
    *,
    engine: Engine | None = None,
    upserter: UpserterSource = None,
) -> dict[str, Any]:
    """Write the run row of every location with work (failed ones name their cause), render the
    run's Data Docs once. Returns ``{"results": [run summary + location_id], "total", "quiet",
    "failed": [location]}``; raises :class:`SyncInvariantError` after writing every row."""
    o = options or SyncOptions()
    eng = get_engine(config, engine)
    tables = state.state_tables(config.state)
    state.ensure_state(eng, tables)
    batches: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for shard in shards:
        for done in shard["locations"]:
            batches[done["location"]].extend(done["batches"])
    with eng.connect() as conn:  # what every shard (and every retry) recorded
        recorded = {f.location: f for f in failures.recorded_failures(conn, tables, o.run_id)}
    if config.location_routing.from_column and not o.dry_run:  # before the run rows count backlogs
        routing.resolve_moved(config, eng, sync_window(plan["window"], o.full_refresh), o.run_id)
    results, broken = [], []
    for name in plan["locations"]:
        failure = recorded.get(name)
        error = failure.headline() if failure else None
        try:
            out = finalize_run(
                config, name, plan["window"], batches[name], o,
                engine=eng, upserter=upserter, error=error, build_docs=False,
            )  # fmt: skip
        except SyncInvariantError as exc:
            broken.append(str(exc))
            continue
        if failure is not None:  # the run row keeps its cause for the run's failure alert
            failures.record_failure(eng, tables, o.run_id, failure)
        forecast = plan.get("quota", {}).get(name)
        results.append({**out, "location_id": config.location(name).location_id, "quota": forecast})
    docs = data_docs(config, o) if o.keep_results and any(r.get("checked") for r in results) else None
    if broken:
        raise SyncInvariantError("; ".join(broken))
    total = Summary(max_samples=0)
    for r in results:
        total.add(r)
    return {
        "results": results,
        "total": {**total.outcome_counts(), "reasons": dict(total.reasons), "reject_rate": total.reject_rate},
        "quiet": plan["quiet"],
        "failed": sorted(name for name in recorded if name in plan["locations"]),
        "data_docs": docs,
    }


def sync_all(
    config: SyncConfig,
    window: Window | Mapping[str, Any] | None = None,
    options: SyncOptions | None = None,
    *,
    engine: Engine | None = None,
    upserter: UpserterSource = None,
    directory: Directory | None = None,
    requested: Sequence[str] = (),
) -> dict[str, Any]:
    """Plan, sync every shard in this process and finalise: the fleet in one call."""
    o = options or SyncOptions()
    eng = get_engine(config, engine)
    plan = plan_fleet(config, window, o, engine=eng, directory=directory, requested=requested)
    shards = [sync_shard(config, plan["window"], s, o, engine=eng, upserter=upserter) for s in plan["shards"]]
    return finalize_fleet(config, plan, shards, o, engine=eng, upserter=upserter)


# -- replay --------------------------------------------------------------------------------------


def replay_fleet(
    config: SyncConfig,
    options: SyncOptions,
    *,
    requested: Sequence[str] = (),
    keys: Mapping[str, Sequence[str]] | None = None,
    engine: Engine | None = None,
    upserter: UpserterSource = None,
    directory: Directory | None = None,
    **selection: Any,
) -> dict[str, Any]:
    """Replay the open quarantine rows of every location (the listed ones; with
    ``locations.from_column``, every installed location holding some), one after the other.

    ``keys``: location name → source keys; ``selection``: ``stage``, ``reason``, ``max_rows`` of
    :func:`~growthhub_sync.pipeline.replay_quarantine`. Rows held under a location that is still
    not installed (or under :data:`~growthhub_sync.config.UNROUTED`) wait: replaying them would
    send to a location the agency cannot reach. A location refused for good is recorded and the
    others replayed. Returns ``{"results", "failed", "waiting"}``.
    """
    eng = get_engine(config, engine)
    tables = prepare(config, eng)
    names = [loc.name for loc in config.locations]
    waiting: list[str] = []
    if config.location_routing.from_column:
        q = tables.quarantine
        with eng.connect() as conn:
            held = conn.execute(select(q.c.location).where(q.c.status == "open").distinct()).scalars()
            names = sorted({*held, *names})
        listed = (directory or hook_directory)(config.location_routing.conn_id)
        installed = {d.id for d in listed if d.installed}
        waiting = [n for n in names if n == UNROUTED or config.location(n).location_id not in installed]
        names = [n for n in names if n not in waiting]
    results, failed = [], []
    # a requested location still waiting is no error: its rows stay open and the result says so
    for name in _selected(config, names, {*names, *waiting}, requested):
        try:
            picked = (keys or {}).get(name, ())
            out = replay_quarantine(
                config, name, options, keys=picked, engine=eng, upserter=upserter, **selection
            )
            results.append(out)
        except Exception as exc:
            failure = failures.failure_of(exc, config.location(name))
            if failure is None:
                raise
            log.warning("%s; the other locations are replayed", failure.headline())
            failures.record_failure(eng, tables, options.run_id, failure)
            failed.append(name)
    if waiting:
        log.info("not replayed, their location is not installed: %s", ", ".join(waiting))
    return {"results": results, "failed": failed, "waiting": waiting}
