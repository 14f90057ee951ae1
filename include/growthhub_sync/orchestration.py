"""What the DAG files share: windows from the run context, alert hooks, the report's text.

Kept out of ``dags/`` so DAG files stay schedules and this stays testable; cheap to import (no
GX, no database, no HTTP at import time) because the DAG processor imports it on every parse.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import quote

from growthhub_sync import failures, quota
from growthhub_sync.alerts import format_alert, send_alert
from growthhub_sync.config import SyncConfig, load_config
from growthhub_sync.extract import Window
from growthhub_sync.outcomes import RUN_COUNTS, VERIFY_COUNTS

T = TypeVar("T")

log = logging.getLogger(__name__)

SYNC_DAG_ID = "growthhub_contact_sync"
REPLAY_DAG_ID = "growthhub_quarantine_replay"
CONTACTS_ALIAS = "growthhub_contacts"
"""The AssetAlias the sync's events go through: one ``growthhub://<location id>/contacts`` per location."""

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "data-engineering",
    "retries": 3,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=15),
}


def run_window(context: Mapping[str, Any], lookback_minutes: int) -> dict[str, str | None]:
    """The run's data interval, widened backwards by ``lookback_minutes`` for late-arriving rows.

    A run with no interval (triggered by hand on an un-timetabled logical date) syncs everything
    changed up to now.
    """
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    if start is not None and end is not None and start == end:
        start = None
    return Window.of(start, end, lookback_minutes).as_dict()


def run_ids(context: Mapping[str, Any]) -> tuple[str, str]:
    """``(dag_id, run_id)`` from a task context or from the thinner context of a DAG callback."""
    return context["dag"].dag_id, context.get("run_id") or context["dag_run"].run_id


def run_url(context: Mapping[str, Any]) -> str | None:
    """Link to the run in the Airflow UI, from ``[api] base_url``."""
    from airflow.sdk import conf

    base = conf.get("api", "base_url", fallback="") or ""
    if not base:
        return None
    dag_id, run_id = run_ids(context)
    return f"{base.rstrip('/')}/dags/{dag_id}/runs/{quote(run_id, safe='')}"


@contextmanager
def failing_fast(config: SyncConfig, location: str | None, run_id: str) -> Iterator[None]:
    """Fail the task at once, without Airflow's retries, on what no retry can fix: GrowthHub
    refusing the token (401 after a refresh, 403) or the API version, and config errors.

    ``location`` None: a task of every location (the fleet's plan). The cause is recorded in the
    location's run row first (:mod:`~growthhub_sync.failures`), so the
    run's other batches stop sending and the run's failure alert names it. Transient errors pass
    through untouched and keep their retries.
    """
    try:
        yield
    except Exception as exc:
        where = config.location(location) if location else None
        failure = failures.failure_of(exc, where, config.location_routing.conn_id)
        if failure is None:
            raise
        try:
            from growthhub_sync import state
            from growthhub_sync.warehouse import get_engine

            engine, tables = get_engine(config), state.state_tables(config.state)
            state.ensure_state(engine, tables)  # a config error at plan may come before it
            failures.record_failure(engine, tables, run_id, failure)
        except Exception:  # the warehouse may be what is wrong: the task still fails at once
            log.exception("could not record the failure of run %s", run_id)
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(failure.headline()) from exc


def fails_fast(config: SyncConfig, location: str | None) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a task callable of one location with :func:`failing_fast` (under ``@task``)."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> T:
            from airflow.sdk import get_current_context

            with failing_fast(config, location, get_current_context()["run_id"]):
                return fn(*args, **kwargs)

        return run

    return decorate


def top_errors(summaries: Iterable[Mapping[str, Any]], limit: int) -> list[tuple[str, int]]:
    """Most frequent reason codes across the summaries of a run, with their rows."""
    counter: Counter[str] = Counter()
    for summary in summaries:
        counter.update(summary.get("reasons", {}))
    return counter.most_common(limit)


def alert_threshold_breach(
    config: SyncConfig, context: Mapping[str, Any], results: Sequence[Mapping[str, Any]]
) -> bool:
    """Send one alert naming every location over the reject-rate threshold; False if none was."""
    breached = [r for r in results if r.get("threshold_breached")]
    if not breached:
        return False
    dag_id, run_id = run_ids(context)
    counts = {name: sum(int(r.get(name, 0)) for r in breached) for name in RUN_COUNTS}
    rates = ", ".join(f"{r['location']} {100 * r['reject_rate']:.1f}%" for r in breached)
    text = format_alert(
        headline=(
            f"reject rate over {100 * config.quality.reject_rate_threshold:.1f}% ({rates}); "
            "see the quarantine table"
        ),
        dag_id=dag_id,
        run_id=run_id,
        locations=[r["location"] for r in breached],
        counts=counts,
        top_errors=top_errors(breached, config.alerts.top_errors),
        run_url=run_url(context),
    )
    send_alert(config.alerts, text, context, level=logging.WARNING)
    return True


def alert_verify_breach(
    config: SyncConfig, context: Mapping[str, Any], results: Sequence[Mapping[str, Any]]
) -> bool:
    """Send one alert naming every location whose read-back found more differing contacts than
    ``verify.threshold`` allows, and the fields; False if none did."""
    breached = [r for r in results if r.get("verify_breached")]
    if not breached:
        return False
    dag_id, run_id = run_ids(context)
    fields: Counter[str] = Counter()
    for r in breached:
        fields.update({name: f["count"] for name, f in (r.get("verify") or {}).get("fields", {}).items()})
    found = ", ".join(f"{r['location']} {r['verify_mismatched']} of {r['verify_checked']}" for r in breached)
    text = format_alert(
        headline=(
            f"read-back found contacts GrowthHub did not store as sent ({found} checked); "
            f"fields: {', '.join(f'{name} {n}' for name, n in fields.most_common())}; "
            "see the run row's details.verify"
        ),
        dag_id=dag_id,
        run_id=run_id,
        locations=[r["location"] for r in breached],
        counts={name: sum(int(r.get(name, 0)) for r in breached) for name in VERIFY_COUNTS},
        top_errors=[],
        run_url=run_url(context),
    )
    send_alert(config.alerts, text, context, level=logging.WARNING)
    return True


def alert_quota_backlog(
    config: SyncConfig, context: Mapping[str, Any], results: Sequence[Mapping[str, Any]]
) -> bool:
    """One alert when rows wait for tomorrow's quota and their ETA is new or later than the last
    week's runs said (a draining backlog alerts once, not every run); False if none. A backlog
    never fails a run: the alert is a WARNING."""
    named = quota.slipped(results)
    if not named:
        return False
    dag_id, run_id = run_ids(context)
    deferred = sum(int(r["quota"]["deferred"]) for r in named)
    text = format_alert(
        headline="\n".join([f"daily quota: {deferred} row(s) wait for the next days", *quota.lines(named)]),
        dag_id=dag_id,
        run_id=run_id,
        locations=[r["location"] for r in named],
        counts={"to_send": sum(int(r["quota"]["to_send"]) for r in named), "deferred_to_tomorrow": deferred},
        top_errors=[],
        run_url=run_url(context),
    )
    send_alert(config.alerts, text, context, level=logging.WARNING)
    return True


def on_run_failure(context: Mapping[str, Any]) -> None:
    """DAG-level failure callback: exactly one alert per failed run, whichever tasks failed.

    Runs in the DAG processor with a thin context: the DAG, the run id, the reason and, when the
    scheduler knows it, the last task instance that failed. Counts and errors come from what the
    run recorded in the warehouse before it failed.
    """
    config = load_config()
    dag_id, run_id = run_ids(context)
    ti = context.get("ti")
    failed_task = f" in task {ti.task_id}" if ti is not None else ""
    params = context.get("params") or {}
    progress = _run_progress(config, run_id)
    causes = progress.pop("failures", [])
    failed = [f.location for f in causes]  # an agency run has hundreds of locations: name the failed
    top = config.alerts.top_errors
    headline = f"run failed{failed_task} ({context.get('reason') or 'task failure'}); see the task log"
    text = format_alert(
        headline="; ".join(f.headline() for f in causes) or headline,
        dag_id=dag_id,
        run_id=run_id,
        locations=failed or params.get("locations") or [loc.name for loc in config.locations],
        counts={k: progress[k] for k in ("synced", "quarantined", "deferred") if k in progress},
        # a known cause is the story: the data-quality reasons of the rows would only distract
        top_errors=[] if causes else Counter(progress.get("reasons", {})).most_common(top),
        run_url=run_url(context),
    )
    send_alert(config.alerts, text, context)


def _run_progress(config: SyncConfig, run_id: str) -> dict[str, Any]:
    """The run's recorded progress and ``failures`` (:class:`~growthhub_sync.failures.RunFailure`),
    or nothing if the warehouse cannot tell (the alert goes out anyway)."""
    from growthhub_sync import state
    from growthhub_sync.warehouse import get_engine

    try:
        tables = state.state_tables(config.state)
        with get_engine(config).connect() as conn:
            progress = state.run_progress(conn, tables, run_id)
            return {**progress, "failures": failures.recorded_failures(conn, tables, run_id)}
    except Exception:
        log.exception("could not read the progress of run %s for its alert", run_id)
        return {}


def summary_table(results: Sequence[Mapping[str, Any]], reasons: int = 3) -> str:
    """A fixed-width table of a run's counts per location and its ``reasons`` top reason codes,
    for the task log."""
    header = ("location", *RUN_COUNTS, "displaced", "reject %", "top reasons")
    rows = [
        (
            str(r["location"]),
            *(str(r.get(name, 0)) for name in (*RUN_COUNTS, "displaced")),
            f"{100 * r.get('reject_rate', 0):.2f}",
            ", ".join(f"{code} {n}" for code, n in top_errors([r], reasons)) or "-",
        )
        for r in results
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in (header, *rows)
    )


def changed_assets(results: Iterable[Mapping[str, Any]]) -> list[str]:
    """The Asset URI of every location whose contacts the run created or updated."""
    return [
        f"growthhub://{r['location_id']}/contacts" for r in results if r.get("created") or r.get("updated")
    ]


def fleet_report(finalized: Mapping[str, Any]) -> str:
    """The report task's log: the table per location, a total line, the quiet and failed locations."""
    total = {"location": "TOTAL", **finalized["total"]}
    lines = [
        summary_table([*finalized["results"], total]),
        f"{len(finalized['results'])} location(s) with work, {finalized['quiet']} quiet",
    ]
    if finalized["failed"]:
        lines.append(f"failed: {', '.join(finalized['failed'])}")
    lines += [_read_back_line(r) for r in finalized["results"] if r.get("verify_mismatched")]
    lines.extend(f"quota {line}" for line in quota.lines(finalized["results"]))
    return "\n".join(lines)


def _read_back_line(result: Mapping[str, Any]) -> str:
    """``read back default: 2 of 5 contacts differ: gender 2 (e.g. C0042 sent 'female', found 'male')``."""
    fields = (result.get("verify") or {}).get("fields", {})
    shown = []
    for name, entry in fields.items():
        example = next(iter(entry["examples"]), None)
        seen = (
            f" (e.g. {example['key']} sent {example['sent']!r}, found {example['found']!r})"
            if example
            else ""
        )
        shown.append(f"{name} {entry['count']}{seen}")
    return (
        f"read back {result['location']}: {result['verify_mismatched']} of {result['verify_checked']} "
        f"contacts differ: {'; '.join(shown)}"
    )
