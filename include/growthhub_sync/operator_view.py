"""What an operator sees of a run inside Airflow: its counts as the DAG run's note, and metrics.

The note: Airflow 3.3 gives a task no call to write its own DAG run's note (the Task SDK has
none, apache/airflow#64890, and tasks do not reach the metadata DB), so it goes through the
public REST API, ``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}?update_mask=note``, as the API
user of the connection :data:`NOTE_CONN_ID`. A run without that connection keeps its note in the
task log only. Notes are markdown, at most :data:`NOTE_MAX_CHARS` characters.

Metrics go through Airflow's own ``stats`` to whatever ``[metrics]`` configures (StatsD,
Datadog, OpenTelemetry): tags where the backend carries them, else the tag values in the name.

Imports Airflow only when called: the library stays importable without it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from growthhub_sync import quota
from growthhub_sync.outcomes import RUN_COUNTS, VERIFY_COUNTS

log = logging.getLogger(__name__)

NOTE_CONN_ID = "airflow_api_default"
"""HTTP connection to Airflow's API server: host (URL), login and password of a user who may
edit this DAG's runs. Without a host, ``[api] base_url`` is used."""
NOTE_MAX_CHARS = 1000
"""The length of ``dag_run_note.content``; the API refuses longer notes."""
QUARANTINE_PAGE = "/growthhub/quarantine"
DRY_RUN_LINE = "DRY RUN: nothing was sent or written; the counts are what a real run would do."
TOP_REASONS = 3
CLIENT_COUNTERS = ("upserts", "throttled", "retried")
"""Per-run counters of the GrowthHub client, beside the outcomes (``outcomes.Summary``)."""
_TIMEOUT_S = 10


# -- the note ----------------------------------------------------------------------------------


def quarantine_url(base_url: str, location: str) -> str:
    """The GrowthHub quarantine page filtered on one location (relative when no base URL is set)."""
    return f"{base_url.rstrip('/')}{QUARANTINE_PAGE}?{urlencode({'location': location})}"


def run_note(results: Sequence[Mapping[str, Any]], *, dry_run: bool, base_url: str = "") -> str:
    """The markdown note of a run: its outcomes per location, top reasons and quarantine link each.

    Cut to :data:`NOTE_MAX_CHARS`: reason lines go first, then table rows (the task log keeps
    the whole table).
    """
    head = [DRY_RUN_LINE, ""] if dry_run else []
    if not results:
        return "\n".join([*head, "No location was synced in this run."])
    rows = [
        f"| {r['location']} | " + " | ".join(str(r.get(c, 0)) for c in RUN_COUNTS) + " |" for r in results
    ]
    # the quota lines first: the cut drops lines from the end
    reasons = [
        *(f"- quota {line}" for line in quota.lines(results)),
        *(_reasons_line(r, base_url) for r in results),
    ]
    shown, kept = len(rows), len(reasons)
    while True:
        note = _compose(head, rows[:shown], len(rows) - shown, reasons[:kept])
        if len(note) <= NOTE_MAX_CHARS:
            return note
        if kept:
            kept -= 1
        elif shown > 1:
            shown -= 1
        else:
            return note[:NOTE_MAX_CHARS]


def _compose(head: list[str], rows: list[str], cut: int, reasons: list[str]) -> str:
    table = ["| location | " + " | ".join(RUN_COUNTS) + " |", "|:--|" + "--:|" * len(RUN_COUNTS), *rows]
    more = [f"*{cut} more location(s): see the report task's log.*"] if cut else []
    return "\n".join([*head, *table, *more, *(["", *reasons] if reasons else [])])


def _reasons_line(result: Mapping[str, Any], base_url: str) -> str:
    """``- **location**: `reason` n, ... · [quarantine](url)``: the top reasons rows were held back."""
    reasons = sorted(((k, n) for k, n in (result.get("reasons") or {}).items() if n), key=lambda kv: -kv[1])
    top = ", ".join(f"`{str(code).replace('`', '')}` {n}" for code, n in reasons[:TOP_REASONS])
    link = quarantine_url(base_url, str(result["location"]))
    return (
        f"- **{result['location']}**: {top or 'no row held back'} · [quarantine]({link}){_read_back(result)}"
    )


def _read_back(result: Mapping[str, Any]) -> str:
    """`` · read back 5, 2 differ (`gender` 2)``: what the run's verification found, if it checked."""
    checked = int(result.get("verify_checked") or 0)
    if not checked:
        return ""
    fields = (result.get("verify") or {}).get("fields", {})
    top = ", ".join(f"`{name}` {f['count']}" for name, f in list(fields.items())[:TOP_REASONS])
    return f" · read back {checked}, {result.get('verify_mismatched', 0)} differ" + (
        f" ({top})" if top else ""
    )


def set_run_note(dag_id: str, run_id: str, note: str, conn_id: str = NOTE_CONN_ID) -> bool:
    """Write ``note`` on the DAG run through Airflow's public API; ``False`` (logged) if it could not.

    A note is a report: failing to write it never fails the task.
    """
    import requests
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        log.info("Run note not set (no Airflow connection %r to the API server):\n%s", conn_id, note)
        return False
    root = _api_root(conn.host, conn.schema, conn.port)
    url = f"{root}/api/v2/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}"
    try:
        with requests.Session() as http:
            auth = http.post(
                f"{root}/auth/token",
                json={"username": conn.login, "password": conn.password},
                timeout=_TIMEOUT_S,
            )
            auth.raise_for_status()
            http.headers["Authorization"] = f"Bearer {auth.json()['access_token']}"
            http.patch(
                url, params={"update_mask": "note"}, json={"note": note}, timeout=_TIMEOUT_S
            ).raise_for_status()
    except (requests.RequestException, KeyError, ValueError) as exc:
        log.warning("Run note not set on %s %s (%s):\n%s", dag_id, run_id, _short(exc), note)
        return False
    log.info("Run note set on %s %s:\n%s", dag_id, run_id, note)
    return True


def _api_root(host: str | None, schema: str | None, port: int | None) -> str:
    """The API server's URL from the connection: a URL in ``host``, or its parts, or ``[api] base_url``."""
    if not host:
        from airflow.sdk import conf

        return (conf.get("api", "base_url", fallback="") or "http://localhost:8080").rstrip("/")
    url = urlsplit(host if "://" in host else f"{schema or 'http'}://{host}")
    if port and url.port is None:
        url = url._replace(netloc=f"{url.netloc}:{port}")
    return urlunsplit(url).rstrip("/")


def _short(exc: Exception) -> str:
    """An error in one line, without the response body (it may echo what was sent)."""
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} from {response.request.method} {response.url}"
    return f"{type(exc).__name__}: {exc}"


# -- metrics -----------------------------------------------------------------------------------


def emit_metrics(results: Sequence[Mapping[str, Any]], *, prefix: str) -> None:
    """Rows per outcome and reason, client counters, contacts read back (and differing), daily
    quota left and duration, per location.

    With tags (Datadog, OpenTelemetry, StatsD with ``statsd_influxdb_enabled``):
    ``<prefix>.rows{location,outcome}``; without (plain StatsD): ``<prefix>.rows.<location>.<outcome>``.
    """
    from airflow.sdk.observability import stats

    tagged = _backend_has_tags()
    for r in results:
        where = {"location": str(r["location"])}
        for outcome in RUN_COUNTS:
            tags = {**where, "outcome": outcome}
            stats.incr(_stat(prefix, "rows", tags, tagged), int(r.get(outcome, 0)), tags=tags)
        for reason, n in (r.get("reasons") or {}).items():
            tags = {**where, "reason": str(reason)}
            stats.incr(_stat(prefix, "reasons", tags, tagged), int(n), tags=tags)
        for counter in (*CLIENT_COUNTERS, *VERIFY_COUNTS):  # the read-back's: contacts checked, differing
            stats.incr(_stat(prefix, counter, where, tagged), int(r.get(counter, 0)), tags=where)
        if r.get("daily_remaining") is not None:
            stats.gauge(
                _stat(prefix, "daily_remaining", where, tagged), int(r["daily_remaining"]), tags=where
            )
        if r.get("duration_s") is not None:
            duration = timedelta(seconds=float(r["duration_s"]))
            stats.timing(_stat(prefix, "duration", where, tagged), duration, tags=where)


def _stat(prefix: str, metric: str, tags: Mapping[str, str], tagged: bool) -> str:
    """The metric's name: ``<prefix>.<metric>``, followed by the tag values when tags are dropped
    (each one segment: dots become ``__`` as in Airflow's own names)."""
    from airflow.sdk.observability.stats import normalize_name_for_stats

    if tagged:
        return f"{prefix}.{metric}"
    parts = (normalize_name_for_stats(v.replace(".", "__"), log_warning=False) for v in tags.values())
    return ".".join([prefix, metric, *parts])


def _backend_has_tags() -> bool:
    """Whether the backend Airflow picks (``stats_utils.get_stats_factory``: Datadog, StatsD, OTel)
    carries tags; plain StatsD drops them."""
    from airflow.sdk import conf

    if conf.getboolean("metrics", "statsd_datadog_enabled", fallback=False):
        return True
    if conf.getboolean("metrics", "statsd_on", fallback=False):
        return conf.getboolean("metrics", "statsd_influxdb_enabled", fallback=False)
    return conf.getboolean("metrics", "otel_on", fallback=False)


# -- the report task ---------------------------------------------------------------------------


def report_run(context: Mapping[str, Any], results: Sequence[Mapping[str, Any]], *, prefix: str) -> str:
    """The report task's operator view: the run's note, and its metrics unless it is a dry run
    (a dry run's counts are hypothetical). Returns the note."""
    from airflow.sdk import conf

    dry_run = bool(context["params"].get("dry_run"))
    note = run_note(results, dry_run=dry_run, base_url=conf.get("api", "base_url", fallback="") or "")
    set_run_note(context["dag"].dag_id, context["run_id"], note)
    if not dry_run:
        emit_metrics(results, prefix=prefix)
    return note
