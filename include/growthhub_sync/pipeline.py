"""The run-level API: plan a run, sync its batches, finalise it; replay quarantined rows.

The DAGs call :func:`plan_sync` → :func:`sync_batch` (one per key range, mapped) →
:func:`finalize_run`; :func:`sync` does all three in one call (CLI, demo, tests);
:func:`replay_quarantine` re-sends fixed rows. The flow of one batch is :mod:`growthhub_sync.batch`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from growthhub_sync import failures, quota, state, verify, winners
from growthhub_sync.batch import BatchRunner, SyncOptions, describe_gx_run, gx_run_name
from growthhub_sync.checks import check_columns, checker_for
from growthhub_sync.config import SyncConfig, validate_source_columns
from growthhub_sync.extract import KeyRange, Source, Window, plan_key_ranges
from growthhub_sync.outcomes import LEFTOVERS, OUTCOMES, Summary, SyncInvariantError, duplicate_winner
from growthhub_sync.upsert import UpserterSource, check_access, require_connection
from growthhub_sync.warehouse import get_engine

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from growthhub_sync.config import LocationConfig

log = logging.getLogger(__name__)

_SETTLE_ROUNDS = 10

__all__ = [
    "OUTCOMES",
    "SyncInvariantError",
    "SyncOptions",
    "data_docs",
    "finalize_run",
    "plan_sync",
    "prepare",
    "replay_quarantine",
    "start_run",
    "sync",
    "sync_batch",
    "sync_window",
]


def prepare(config: SyncConfig, engine: Engine) -> state.StateTables:
    """Check the config against the table and create the state tables: a run starts on a checked setup."""
    validate_source_columns(config, engine)
    tables = state.state_tables(config.state)
    state.ensure_state(engine, tables)
    return tables


def sync_window(window: Window | Mapping[str, Any] | None, full_refresh: bool) -> Window:
    """The run's window; a full refresh has none."""
    if full_refresh or window is None:
        return Window()
    return window if isinstance(window, Window) else Window.from_dict(window)


def plan_sync(
    config: SyncConfig,
    location: str,
    window: Window | Mapping[str, Any] | None,
    *,
    engine: Engine | None = None,
    batch_rows: int | None = None,
    options: SyncOptions | None = None,
    check_connection: bool = True,
) -> dict[str, Any]:
    """Count the run's rows (window + pending) and cut them into key ranges for mapped tasks.

    ``batch_rows``: rows per key range (one mapped sync task each); default the config's
    ``batch_size``. Validates the config against the table, checks that the location's GrowthHub
    connection exists and agrees with the config (unless ``check_connection`` is off: a caller
    bringing its own upserter) and creates the state tables, so mapped tasks start on a checked
    setup. Returns ``{"location", "window", "total", "batches": [{"lo", "hi"}]}`` (JSON-safe, for
    XCom); there is always at least one batch.
    """
    o = options or SyncOptions()
    loc = config.location(location)
    eng = get_engine(config, engine)
    tables = prepare(config, eng)
    if check_connection and not o.dry_run:
        require_connection(loc)
        check_access(loc)
    win = sync_window(window, o.full_refresh)
    source = Source(config, loc, tables, eng.dialect.name)
    with eng.connect() as conn:
        total, ranges = plan_key_ranges(conn, source, win, batch_rows or config.batch_size)
    if not o.dry_run:
        start_run(eng, tables, loc, win, o)
        winners.plan_winners(config, loc, eng, win, run_id=o.run_id, full_refresh=o.full_refresh)
    log.info("plan %s: %d rows in %d batches for window %s", loc.name, total, len(ranges), win.as_dict())
    return {
        "location": loc.name,
        "window": win.as_dict(),
        "total": total,
        "batches": [r.as_dict() for r in ranges],
    }


def start_run(
    eng: Engine, tables: state.StateTables, loc: LocationConfig, win: Window, o: SyncOptions
) -> None:
    """The run row, ``running`` until finalize writes its counts (a retried plan keeps the first,
    and forgets the failure it recorded: config and connection passed the checks this time)."""
    with eng.begin() as conn:
        failures.forget_failure(conn, tables, o.run_id, loc.name)
        if state.get_run(conn, tables, o.run_id, loc.name) is None:
            state.write_run(
                conn,
                tables,
                {
                    "run_id": o.run_id,
                    "location": loc.name,
                    "dag_id": o.dag_id,
                    "status": "running",
                    "window_start": win.start,
                    "window_end": win.end,
                    "dry_run": o.dry_run,
                    "full_refresh": o.full_refresh,
                    "started_at": state.utcnow(),
                },
            )


def sync_batch(
    config: SyncConfig,
    location: str,
    window: Window | Mapping[str, Any] | None,
    key_range: KeyRange | Mapping[str, Any] | None = None,
    options: SyncOptions | None = None,
    *,
    engine: Engine | None = None,
    upserter: UpserterSource = None,
) -> dict[str, Any]:
    """Sync the rows of one key range (window + pending); returns the batch's counts.

    Safe to retry: rows already recorded come out ``unchanged`` the second time.
    Raises the hook's ``GrowthHubAuthError`` (the task must fail), also before each chunk when
    another batch of the run recorded one with the same credentials (:mod:`~growthhub_sync.failures`),
    and :class:`SyncInvariantError`.
    """
    o = options or SyncOptions()
    loc = config.location(location)
    eng = get_engine(config, engine)
    kr = key_range if isinstance(key_range, KeyRange) else KeyRange.from_dict(key_range)
    runner = BatchRunner(config, loc, eng, o, upserter)
    fingerprint = None
    if upserter is None and not o.dry_run:
        fingerprint = failures.credentials_fingerprint(loc.conn_id, loc.location_id)
    if fingerprint is not None:
        guard = failures.CredentialsGuard(eng, runner.tables, o.run_id, loc.name, fingerprint)
        runner.before_chunk = guard.check
    runner.hold_back = winners.PlannedLosers(runner.tables, o.run_id, loc.name).hold_back
    summary = runner.run_range(sync_window(window, o.full_refresh), kr)
    log.info("batch %s %s: %s", loc.name, kr.as_dict(), summary.counts_line())
    return summary.as_dict()


def finalize_run(
    config: SyncConfig,
    location: str,
    window: Window | Mapping[str, Any] | None,
    batches: Iterable[Mapping[str, Any]],
    options: SyncOptions | None = None,
    *,
    engine: Engine | None = None,
    upserter: UpserterSource = None,
    error: str | None = None,
    build_docs: bool = True,
) -> dict[str, Any]:
    """Settle the run's leftovers, add up the batches, check the invariant, write the run row,
    render Data Docs.

    Leftovers are rows the batches left pending for identity reasons (:data:`LEFTOVERS`): a
    contact two mapped tasks raced for, or a row whose winner gave its identity up. They were
    counted by their batch; what settling them did is reported under ``leftovers``.

    Then reads a sample of the contacts the run sent back (:mod:`~growthhub_sync.verify`).
    Returns the run summary with ``reject_rate``, ``threshold_breached`` and ``verify_breached``
    for alerting.
    Writing twice for the same run keeps one row. Raises :class:`SyncInvariantError` after
    recording a run whose counts do not add up.
    """
    o = options or SyncOptions()
    loc = config.location(location)
    eng = get_engine(config, engine)
    tables = state.state_tables(config.state)
    state.ensure_state(eng, tables)
    win = sync_window(window, o.full_refresh)
    if not (o.dry_run or error):
        winners.release_stranded(eng, tables, loc.name, o.run_id)
    leftovers = None if o.dry_run or error else _settle_leftovers(config, loc, eng, o, upserter)
    winners.finish_run(eng, tables, loc.name, o.run_id)
    verified = None if o.dry_run or error else verify.verify_run(config, loc, eng, o.run_id, upserter)
    total, n = Summary(max_samples=o.samples), 0
    for b in batches:
        total.add(b)
        n += 1
    if verified is not None:  # the reads spent quota after the batches' last figure
        total.add({"daily_remaining": verified.daily_remaining})
    status = "failed" if error or not total.invariant_ok else "success"
    docs = data_docs(config, o, loc.name) if build_docs and o.keep_results and total.checked else None
    details = {**total.as_dict(), "reject_rate": total.reject_rate, "data_docs": docs, "error": error}
    if leftovers is not None and leftovers.extracted:
        details["leftovers"] = {**leftovers.outcome_counts(), "displaced": leftovers.displaced}
    if verified is not None:
        details["verify"] = verified.as_dict()
    with eng.begin() as conn:
        started = (state.get_run(conn, tables, o.run_id, loc.name) or {}).get("started_at")
        end = quota.run_end(conn, tables, loc.name, total.daily_remaining)
        row = {**_run_row(o, loc, win, total, n, status, details), **verify.run_counts(verified), **end}
        state.write_run(conn, tables, row)
    if not o.dry_run and total.accounted > total.unchanged:
        state.analyze(eng, tables)
    log.info(
        "run %s %s: %s; reject rate %.2f%%", o.run_id, loc.name, total.counts_line(), 100 * total.reject_rate
    )
    if not total.invariant_ok:
        raise SyncInvariantError(
            f"run {o.run_id} {loc.name}: extracted {total.extracted} != {total.accounted}"
        )
    return {
        **details,
        **end,
        "run_id": o.run_id,
        "location": loc.name,
        "window": win.as_dict(),
        "batches": n,
        "status": status,
        "invariant_ok": total.invariant_ok,
        "dry_run": o.dry_run,
        "threshold_breached": total.reject_rate > config.quality.reject_rate_threshold,
        **verify.run_counts(verified),
        "verify_breached": verify.breached(verified, config.verify),
        "duration_s": _seconds_since(started),
    }


def _seconds_since(started: datetime | None) -> float | None:
    """Seconds from the run row's start (plan) to now; SQLite hands back naive UTC times."""
    if started is None:
        return None
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    return max((state.utcnow() - started).total_seconds(), 0.0)


def _run_row(
    o: SyncOptions,
    loc: LocationConfig,
    win: Window,
    total: Summary,
    batches: int,
    status: str,
    details: dict[str, Any],
) -> dict[str, Any]:
    now = state.utcnow()
    return {
        "run_id": o.run_id,
        "location": loc.name,
        "dag_id": o.dag_id,
        "window_start": win.start,
        "window_end": win.end,
        "dry_run": o.dry_run,
        "full_refresh": o.full_refresh,
        "batches": batches,
        **total.outcome_counts(),
        "warnings": total.warnings,
        "invariant_ok": total.invariant_ok,
        "status": status,
        "details": details,
        "started_at": now,  # kept from plan's row when there is one (write_run never updates it)
        "finished_at": now,
    }


def data_docs(config: SyncConfig, o: SyncOptions, *locations: str) -> str | None:
    """Render the validation results of this run's ``locations`` (or all its locations) in one go;
    Data Docs are a report: never fail a sync over them."""
    try:
        checker = checker_for(config, tuple(check_columns(config)), True)
        named = [*locations, *(x.name for x in config.locations)]
        prefix = gx_run_name(o.run_id, *locations) + "__"
        return checker.build_data_docs(prefix, lambda name: describe_gx_run(name, named))
    except Exception as exc:
        log.warning("Data Docs not rendered: %s", exc)
        return None


def _settle_leftovers(
    config: SyncConfig, loc: LocationConfig, engine: Engine, o: SyncOptions, upserter: UpserterSource
) -> Summary:
    runner = BatchRunner(config, loc, engine, o, upserter)
    runner.settling = True
    settled = 0
    for _ in range(_SETTLE_ROUNDS):  # deciding a leftover can leave another (a chain of duplicates)
        with engine.connect() as conn:
            keys = runner.store(conn).pending_keys(LEFTOVERS)
        if not keys:
            break
        settled += len(keys)
        runner.run_keys(keys, from_pending=True)
    if settled:
        log.info("settled %d leftovers of run %s: %s", settled, o.run_id, runner.summary.counts_line())
    return runner.summary


def sync(
    config: SyncConfig,
    location: str,
    window: Window | Mapping[str, Any] | None = None,
    options: SyncOptions | None = None,
    *,
    engine: Engine | None = None,
    upserter: UpserterSource = None,
) -> dict[str, Any]:
    """Plan, sync every batch in this process and finalise: one call for the CLI, demo and tests."""
    o = options or SyncOptions()
    eng = get_engine(config, engine)
    plan = plan_sync(
        config, location, window, engine=eng, options=o, batch_rows=10**12, check_connection=upserter is None
    )
    summaries = [
        sync_batch(config, location, plan["window"], b, o, engine=eng, upserter=upserter)
        for b in plan["batches"]
    ]
    return finalize_run(config, location, plan["window"], summaries, o, engine=eng, upserter=upserter)


def replay_quarantine(
    config: SyncConfig,
    location: str,
    options: SyncOptions | None = None,
    *,
    stage: str | None = None,
    reason: Sequence[str] = (),
    keys: Sequence[str] = (),
    max_rows: int | None = None,
    engine: Engine | None = None,
    upserter: UpserterSource = None,
) -> dict[str, Any]:
    """Take the current source row of open quarantine rows, check and send it again.

    Selects the location's open rows of ``stage``, with any of the reason codes ``reason``, among
    the source ``keys`` (each filter only when given), at most ``max_rows``, oldest first.
    What now syncs (or is found already in step) is resolved, what still fails is updated
    (attempts + 1); rows gone from the source are marked ``ignored``. Returns the run summary.
    """
    started = state.utcnow()
    o = options or SyncOptions(run_id=f"replay__{started.isoformat()}")
    loc = config.location(location)
    eng = get_engine(config, engine)
    prepare(config, eng)
    runner = BatchRunner(config, loc, eng, o, upserter)
    runner.recheck = True
    with eng.connect() as conn:
        store = runner.store(conn)
        selected = store.open_quarantine(stage=stage, codes=reason, keys=keys, limit=max_rows)
        chosen = [r["source_key"] for r in selected]
        # a replayed duplicate must still lose to the row it lost to, unless that row changed since
        winners = {w for r in selected for e in r["errors"] if (w := duplicate_winner(str(e)))} - set(chosen)
        context = list(conn.execute(runner.source.by_keys(sorted(winners)))) if winners else []
    found = runner.run_keys(chosen, from_pending=False, context=context)
    gone = [k for k in chosen if k not in found]
    if gone and not o.dry_run:
        with eng.begin() as conn:
            runner.store(conn).resolve_quarantine(gone, status="ignored")
    out = finalize_run(config, loc.name, None, [runner.summary.as_dict()], o, engine=eng, upserter=upserter)
    return {
        **out,
        "selected": len(chosen),
        "gone_from_source": len(gone),
        "duration_s": _seconds_since(started),
    }
