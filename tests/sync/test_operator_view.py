"""The operator's view of a run: the DAG run's note (markdown) and metrics through Airflow's Stats.

Metrics go to a real UDP socket (``statsd_listener``) through Airflow's own StatsD backend,
configured by ``AIRFLOW__METRICS__*`` variables as a deployment would; the backend is built
again per test (``stats.initialize``, as a task process does at its start).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from growthhub_sync.operator_view import (
    DRY_RUN_LINE,
    NOTE_MAX_CHARS,
    emit_metrics,
    quarantine_url,
    report_run,
    run_note,
    set_run_note,
)

RESULT = {
    "location": "default",
    "extracted": 60,
    "unchanged": 10,
    "created": 30,
    "updated": 5,
    "quarantined": 12,
    "rejected": 2,
    "deferred": 1,
    "reasons": {"phone_invalid": 4, "email_invalid": 7, "api_422": 2, "dob_invalid": 1},
    "upserts": 38,
    "throttled": 3,
    "retried": 4,
    "daily_remaining": 199_000,
    "duration_s": 2.5,
    "verify_checked": 5,
    "verify_mismatched": 2,
    "verify": {"fields": {"gender": {"count": 2, "examples": []}, "city": {"count": 1, "examples": []}}},
}
OTHER = {"location": "eu.west", "extracted": 5, "created": 5, "reasons": {"duplicate": 0}}


# -- the note ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _airflow_logging() -> None:
    """Airflow sets its logging up at the first connection look-up: before ``caplog`` attaches."""
    from airflow.sdk import BaseHook

    with contextlib.suppress(Exception):
        BaseHook.get_connection("no_such_connection")


def test_note_has_a_table_row_of_outcomes_per_location() -> None:
    note = run_note([RESULT, OTHER], dry_run=False)
    lines = note.splitlines()
    outcomes = "unchanged | created | updated | quarantined | rejected | deferred | deleted"
    header = f"| location | extracted | {outcomes} |"
    assert lines[0] == header
    assert "| default | 60 | 10 | 30 | 5 | 12 | 2 | 1 | 0 |" in lines
    assert "| eu.west | 5 | 0 | 5 | 0 | 0 | 0 | 0 | 0 |" in lines
    assert DRY_RUN_LINE not in note


def test_note_lists_each_locations_top_reasons_and_links_its_quarantine_page() -> None:
    note = run_note([RESULT, OTHER], dry_run=False, base_url="https://airflow.example.com/")
    url = "https://airflow.example.com/growthhub/quarantine?location=default"
    assert f"- **default**: `email_invalid` 7, `phone_invalid` 4, `api_422` 2 · [quarantine]({url})" in note
    assert "dob_invalid" not in note, "three reasons at most"
    assert "- **eu.west**: no row held back · [quarantine](" in note


def test_note_says_what_the_read_back_found_where_it_checked() -> None:
    note = run_note([RESULT, OTHER], dry_run=False)
    assert note.splitlines()[-2].endswith(" · read back 5, 2 differ (`gender` 2, `city` 1)")
    assert "read back" not in note.splitlines()[-1]  # eu.west: nothing read back


def test_quarantine_link_is_relative_without_a_base_url_and_quotes_the_location() -> None:
    assert quarantine_url("", "eu west&x") == "/growthhub/quarantine?location=eu+west%26x"


def test_dry_run_note_starts_with_dry_run() -> None:
    note = run_note([RESULT], dry_run=True)
    assert note.startswith("DRY RUN")
    assert "| default | 60 |" in note


def test_note_of_many_locations_fits_the_note_column() -> None:
    many = [{**RESULT, "location": f"location_{i:02d}"} for i in range(40)]

    note = run_note(many, dry_run=True, base_url="https://airflow.example.com")

    assert len(note) <= NOTE_MAX_CHARS
    assert note.startswith("DRY RUN")
    assert "| location_00 | 60 |" in note
    shown = len(re.findall(r"^\| location_\d\d \|", note, re.MULTILINE))
    assert f"*{40 - shown} more location(s): see the report task's log.*" in note


def test_note_without_the_api_connection_is_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="growthhub_sync.operator_view"):
        assert set_run_note("dag", "run", "the note", conn_id="no_such_connection") is False
    assert "the note" in caplog.text


def test_note_the_api_refuses_does_not_fail_the_task(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from growthhub_sandbox.testing import free_port

    conn = f'{{"conn_type": "http", "host": "http://127.0.0.1:{free_port()}", "login": "u", "password": "p"}}'
    monkeypatch.setenv("AIRFLOW_CONN_AIRFLOW_API_DEFAULT", conn)

    assert set_run_note("dag", "run", "the note") is False
    assert "Run note not set on dag run (ConnectionError" in caplog.text
    assert '"password"' not in caplog.text


# -- metrics -----------------------------------------------------------------------------------


@pytest.fixture
def statsd(statsd_listener: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Point Airflow's Stats at the listener with ``[metrics]`` options; returns the listener."""
    from airflow.sdk.observability import stats
    from airflow.sdk.observability.metrics import stats_utils

    def configure(**options: str) -> Any:
        settings = {"statsd_on": "True", "statsd_host": "127.0.0.1", "statsd_port": str(statsd_listener.port)}
        for key, value in {**settings, "statsd_prefix": "airflow", **options}.items():
            monkeypatch.setenv(f"AIRFLOW__METRICS__{key.upper()}", value)
        stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)
        return statsd_listener

    yield configure
    monkeypatch.undo()
    stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)


def test_plain_statsd_gets_the_location_and_outcome_in_the_metric_name(statsd: Callable[..., Any]) -> None:
    listener = statsd()

    emit_metrics([RESULT, OTHER], prefix="growthhub.sync")

    lines = set(listener.lines())
    name = "airflow.growthhub.sync"
    assert {
        f"{name}.rows.default.extracted:60|c",
        f"{name}.rows.default.created:30|c",
        f"{name}.rows.default.rejected:2|c",
        f"{name}.reasons.default.email_invalid:7|c",
        f"{name}.reasons.default.api_422:2|c",
        f"{name}.upserts.default:38|c",
        f"{name}.throttled.default:3|c",
        f"{name}.retried.default:4|c",
        f"{name}.verify_checked.default:5|c",
        f"{name}.verify_mismatched.default:2|c",
        f"{name}.daily_remaining.default:199000|g",
        f"{name}.duration.default:2500.000000|ms",
        f"{name}.rows.eu__west.created:5|c",  # a dot in a value would add a segment
    } <= lines
    assert not any(".daily_remaining.eu__west" in line or ".duration.eu__west" in line for line in lines)


def test_statsd_with_influxdb_tags_gets_tags(statsd: Callable[..., Any]) -> None:
    listener = statsd(statsd_influxdb_enabled="True")

    emit_metrics([RESULT], prefix="growthhub.replay")

    lines = set(listener.lines())
    name = "airflow.growthhub.replay"
    assert {
        f"{name}.rows,location=default,outcome=quarantined:12|c",
        f"{name}.reasons,location=default,reason=phone_invalid:4|c",
        f"{name}.throttled,location=default:3|c",
        f"{name}.daily_remaining,location=default:199000|g",
    } <= lines


@pytest.mark.parametrize("dry_run", [False, True])
def test_report_sends_metrics_unless_it_is_a_dry_run(statsd: Callable[..., Any], dry_run: bool) -> None:
    listener = statsd()
    context = {"params": {"dry_run": dry_run}, "dag": SimpleNamespace(dag_id="dag"), "run_id": "run"}

    note = report_run(context, [RESULT], prefix="growthhub.sync")

    assert note.startswith("DRY RUN") is dry_run
    sent = [line for line in listener.lines() if line.startswith("airflow.growthhub.")]
    assert bool(sent) is not dry_run
