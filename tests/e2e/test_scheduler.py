"""growthhub_contact_sync under the real scheduler: LocalExecutor, PostgreSQL metadata DB, sandbox CRM.

Not ``dag.test()``: the scheduler queues the mapped sync tasks through the location's pool and
the executor runs them in separate processes, so what is checked here (parallel batches, the
pool cap, one sync per interval in a backfill) is what production does.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from growthhub_sync.config import ShardsConfig
from growthhub_sync.demo import COLUMNS, generate
from growthhub_sync.orchestration import SYNC_DAG_ID

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import AirflowStack, E2EWarehouse

    from growthhub_sandbox.testing import SandboxAdmin

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOCATION_ID = "demo-location"  # conftest: the sandbox's startup location, the config's only one
POOL = ShardsConfig().pool  # conftest gives it 2 slots; the executor has 4 (core.parallelism)
SYNC_TASK = "sync"
HOUR = timedelta(hours=1)


def contact_rows(
    prefix: str, n: int, start: datetime, span: timedelta, seed: int = 1
) -> list[tuple[Any, ...]]:
    """``n`` clean generated contacts with unique keys (``prefix`` + number) and unique emails.

    ``updated_at`` is spread over ``[start, start + span)``. Phones are left out so that no row
    fails a check or shares an identity with another: every row must become exactly one contact.
    """
    key, email, phone = COLUMNS.index("id"), COLUMNS.index("email"), COLUMNS.index("phone")
    rows = []
    for i, row in enumerate(generate(n, seed=seed, start=start, span=span, bad_share=0)):
        values = list(row)
        values[key] = f"{prefix}{i:05d}"
        values[email] = f"{prefix.lower()}.{i}@example.com"
        values[phone] = None
        rows.append(tuple(values))
    return rows


def keys_of(rows: Sequence[Sequence[Any]]) -> set[str]:
    return {str(r[COLUMNS.index("id")]) for r in rows}


def max_overlap(intervals: Sequence[tuple[datetime, datetime]]) -> int:
    """Most intervals open at one instant (an end and a start at the same instant do not overlap)."""
    events = sorted(
        [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1])
    )
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def upserts(sandbox: SandboxAdmin) -> dict[str, int]:
    """Status code → count of ``POST /contacts/upsert`` answered by the sandbox."""
    return sandbox.stats()["requests"].get("POST /contacts/upsert", {})


def assert_one_contact_per_row(
    sandbox: SandboxAdmin, warehouse: E2EWarehouse, expected_keys: set[str]
) -> None:
    """The ledger holds exactly ``expected_keys``, the sandbox exactly their contacts, each sent once."""
    ledger = warehouse.ledger()
    assert set(ledger) == expected_keys
    contacts = sandbox.contacts(LOCATION_ID)
    assert len(contacts) == len(expected_keys)
    assert {c["id"] for c in contacts} == set(ledger.values())
    assert {c["email"] for c in contacts} == {
        f"{k[:-5].lower()}.{int(k[-5:])}@example.com" for k in expected_keys
    }
    answered = upserts(sandbox)
    assert sum(answered.values()) == len(expected_keys), answered  # no retry, no second send
    assert all(status.startswith("2") for status in answered), answered
    totals = sandbox.stats()["locations"][LOCATION_ID]
    assert (totals["created"], totals["updated"]) == (len(expected_keys), 0)
    assert warehouse.open_quarantine() == []


def test_scheduled_run_syncs_its_interval_in_pooled_batches_running_in_parallel_processes(
    airflow_stack: AirflowStack, e2e_warehouse: E2EWarehouse, sandbox: SandboxAdmin
) -> None:
    assert airflow_stack.is_paused(), "runs first: the DAG must still be paused (see conftest)"
    batch = e2e_warehouse.config.batch_size  # rows per mapped sync task
    # rows in the latest complete hour, the one before it and the current one; the scheduler's
    # run is for the latest complete hour (catchup=False), or the next one if the hour turns now
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    seeded = {
        start: contact_rows(f"S{i}", 4 * batch, start, HOUR, seed=i)
        for i, start in enumerate((hour - 2 * HOUR, hour - HOUR, hour))
    }
    e2e_warehouse.insert([r for rows in seeded.values() for r in rows])
    started = datetime.now(UTC)

    airflow_stack.unpause()
    (run,) = airflow_stack.wait_for_runs("run_type = 'scheduled' AND queued_at >= :t", 1, t=started)

    assert run["state"] == "success"
    interval = (run["data_interval_start"], run["data_interval_end"])
    assert interval in {(hour - HOUR, hour), (hour, hour + HOUR)}
    inside = seeded[interval[0]]
    tis = airflow_stack.task_instances(run["run_id"])
    assert {t["task_id"]: t["state"] for t in tis if t["task_id"] != SYNC_TASK} == {
        "plan": "success",
        "finalize": "success",
        "publish": "success",
        "report": "success",
    }
    syncs = [t for t in tis if t["task_id"] == SYNC_TASK]
    # 40 rows cut every 10 keys (batch_size): 4 closed key ranges and the open-ended last one,
    # packed into shards of about batch_size rows: 4 sync tasks (the empty range shares one)
    assert len(syncs) == len(inside) // batch
    assert all(t["state"] == "success" and t["try_number"] == 1 for t in syncs)
    assert {t["pool"] for t in syncs} == {POOL}
    assert len({(t["hostname"], t["pid"]) for t in syncs}) == len(syncs)
    # batches ran side by side in separate processes, never more at once than the pool's slots
    assert max_overlap([(t["start_date"], t["end_date"]) for t in syncs]) == airflow_stack.pool_slots(POOL)

    row = e2e_warehouse.runs()[run["run_id"]]
    assert row["invariant_ok"] is True
    assert row["status"] == "success"
    assert (row["window_start"], row["window_end"]) == interval
    assert row["batches"] == len(inside) // batch + 1  # the key ranges
    assert (row["extracted"], row["created"], row["updated"]) == (len(inside), len(inside), 0)
    assert row["unchanged"] == row["quarantined"] == row["rejected"] == row["deferred"] == 0
    assert_one_contact_per_row(sandbox, e2e_warehouse, keys_of(inside))


def test_backfill_over_three_hourly_intervals_syncs_each_once_and_reprocessing_it_sends_nothing(
    airflow_stack: AirflowStack, e2e_warehouse: E2EWarehouse, sandbox: SandboxAdmin
) -> None:
    batch = e2e_warehouse.config.batch_size  # rows per mapped sync task
    slots = airflow_stack.pool_slots(POOL)
    first = datetime(2026, 3, 3, 0, tzinfo=UTC)
    intervals = [first + i * HOUR for i in range(3)]
    per_interval = {
        start: contact_rows(f"H{i}", batch + 2, start, HOUR, seed=10 + i) for i, start in enumerate(intervals)
    }
    before, after = (
        contact_rows("X", 4, first - HOUR, HOUR, seed=20),
        contact_rows("Y", 4, first + 3 * HOUR, HOUR, seed=21),
    )
    e2e_warehouse.insert([r for rows in per_interval.values() for r in rows] + before + after)
    expected_keys = {k for rows in per_interval.values() for k in keys_of(rows)}
    dates = ["--from-date", intervals[0].isoformat(), "--to-date", intervals[-1].isoformat()]

    # --from-date / --to-date bound the runs' logical dates, both inclusive; an hourly run's
    # logical date is the start of its interval, so 00:00 .. 02:00 are three intervals
    backfill = airflow_stack.backfill(*dates, "--reprocess-behavior", "none")
    airflow_stack.unpause()  # the scheduler starts no run of a paused DAG, backfills included
    runs = airflow_stack.wait_for_runs("backfill_id = :b", 3, b=backfill)

    assert [(r["state"], r["run_type"]) for r in runs] == [("success", "backfill")] * 3
    assert [(r["data_interval_start"], r["data_interval_end"]) for r in runs] == [
        (s, s + HOUR) for s in intervals
    ]
    rows = e2e_warehouse.runs()
    backfilled = [rows[r["run_id"]] for r in runs]
    # a scheduled run of a recent hour may have come in meanwhile: it found none of these rows
    others = [row for run_id, row in rows.items() if run_id not in {r["run_id"] for r in runs}]
    assert [row["extracted"] for row in others] == [0] * len(others)
    syncs = []
    for run, row, start in zip(runs, backfilled, intervals, strict=True):
        n = len(per_interval[start])
        assert (row["status"], row["invariant_ok"]) == ("success", True)
        assert (row["window_start"], row["window_end"]) == (start, start + HOUR)
        assert (row["extracted"], row["created"], row["updated"], row["unchanged"]) == (n, n, 0, 0)
        mine = [t for t in airflow_stack.task_instances(run["run_id"]) if t["task_id"] == SYNC_TASK]
        assert len(mine) == row["batches"] == n // batch + 1
        assert all(t["state"] == "success" and t["try_number"] == 1 for t in mine)
        syncs += mine
    # the backfill's runs ran side by side, and the pool capped their sync tasks all together
    assert max_overlap([(t["start_date"], t["end_date"]) for t in syncs]) <= slots
    assert_one_contact_per_row(sandbox, e2e_warehouse, expected_keys)

    # the same range again, re-running the completed runs: every row is unchanged, nothing is sent
    again = airflow_stack.backfill(*dates, "--reprocess-behavior", "completed")
    reruns = airflow_stack.wait_for_runs("backfill_id = :b", 3, b=again)
    assert [r["run_id"] for r in reruns] == [r["run_id"] for r in runs]  # cleared and run again
    assert [r["state"] for r in reruns] == ["success"] * 3
    rows = e2e_warehouse.runs()
    for run, start in zip(reruns, intervals, strict=True):
        row = rows[run["run_id"]]
        n = len(per_interval[start])
        assert (row["status"], row["invariant_ok"]) == ("success", True)
        assert (row["extracted"], row["unchanged"], row["created"], row["updated"]) == (n, n, 0, 0)
    assert_one_contact_per_row(sandbox, e2e_warehouse, expected_keys)


def test_wrong_token_fails_the_run_fast_with_one_alert_naming_the_401(
    airflow_stack: AirflowStack, e2e_warehouse: E2EWarehouse, sandbox: SandboxAdmin, tmp_path: Path
) -> None:
    alerts = tmp_path / "alerts.jsonl"
    data = yaml.safe_load(airflow_stack.config_path.read_text())
    data["locations"] = [{**data["locations"][0], "conn_id": "growthhub_bad_token"}]  # conftest
    channel = {"type": "custom", "class_path": "notifier.FileNotifier", "kwargs": {"path": str(alerts)}}
    data["alerts"] = {"channels": [channel]}
    airflow_stack.config_path.write_text(yaml.safe_dump(data))
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    e2e_warehouse.insert(contact_rows("W", 300, hour - HOUR, HOUR))

    run_id = f"wrong_token_{secrets.token_hex(4)}"
    airflow_stack.cli("dags", "trigger", SYNC_DAG_ID, "--run-id", run_id)  # no interval: every row
    airflow_stack.unpause()  # its scheduled run of the latest hour fails alike, with its own alert
    (run,) = airflow_stack.wait_for_runs("run_id = :r", 1, r=run_id)

    assert run["state"] == "failed"
    took_s = (run["end_date"] - run["start_date"]).total_seconds()
    assert took_s < 90, took_s
    tis = airflow_stack.task_instances(run_id)
    # the shard's access check records the refused location (others would go on), nothing is
    # retried, and the report fails the run once everything is written
    report = {t["task_id"]: t for t in tis}["report"]
    assert (report["state"], report["try_number"]) == ("failed", 1), "failed at once, not retried"
    assert {(t["task_id"], t["state"], t["try_number"]) for t in tis if t["task_id"] == "sync"} == {
        ("sync", "success", 1)
    }
    assert upserts(sandbox).get("401", 0) <= 3, "bad-token upserts of every run of this test"
    mine = _alerts_of(alerts, run_id, wait_s=60)
    time.sleep(5)  # and no second one
    assert _alerts_of(alerts, run_id) == mine
    (alert,) = mine
    assert alert.splitlines()[0] == (
        "GrowthHub sync: GrowthHub rejected the token (401) for location default: "
        "fix connection growthhub_bad_token, then clear the run"
    )


def _alerts_of(path: Path, run_id: str, wait_s: float = 0) -> list[str]:
    """Texts of the alerts the test notifier wrote for ``run_id``, waiting up to ``wait_s`` for one
    (the DAG processor runs a run's failure callback a little after the run failed)."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        found = [n["text"] for n in map(json.loads, lines) if n["run_id"] == run_id]
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(1)
