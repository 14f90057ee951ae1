"""growthhub_contact_sync under the real scheduler while the sandbox misbehaves (issue 6 at 100k rows).

``RELIABILITY_DAG_ROWS`` demo rows (default 100,000; ~12 % deliberately bad or duplicate) are
synced THROUGH THE DAG (scheduler + LocalExecutor of ``airflow_stack``, mapped batches in the
location's pool, task processes calling the real hook) while the sandbox injects seeded faults in
phase ``after`` (the write happens, then the request fails): 10 % 5xx, 5 % timeouts, 2 % dropped
connections and short 429 storms. Rows left deferred are picked up by further runs (bounded), as
the next scheduled run would. Then, with faults off, the sandbox must hold one contact per identity
and every ledger row's contact must equal its warehouse row field for field.

Where the time goes, and the test settings that make 100k rows fit in CI (measured on 2 cores):

- A row's retries sleep (hook backoff 0.5 s doubling plus jitter; a 429 waits out the location's
  1 s rate-limit interval) and a timeout fault holds its worker for the client ``timeout``. With
  17 % of requests failing that is ~0.25 s of waiting per row: 16 workers (the library fault test)
  cap a process near 50 rows/s whatever the CPU. Sleeping workers cost no CPU, so the
  ``growthhub_faults`` connection (conftest) has 128 workers per task process; 192 were slower
  (client latency past the timeout: spurious timeouts, retries, deferred rows).
- ``timeout`` 1.5 s on that connection and the sandbox hangs 0.3 s longer: a timeout fault costs
  1.5 s, not the default 10; below ~1 s real answers start timing out under full CPU.
- Every 429 blocks the task process's sends for the whole interval (1 s), and a storm reaches
  every process: storms come every 10,000 requests, 10 long (the library test: 20 every 1,000).
- Two batches of ROWS / 2 rows (``batch_size``), both running at once (pool slots = batches):
  each task process pays ~10 s of CPU to start (imports, GX context) and the identity work of its
  chunk, and once enough rows are in flight the run is CPU-bound (~1 ms of client CPU per
  request, ~0.3 ms in the sandbox): 2 x 128 workers synced ~700 rows/s, 4 x 64 ~530.

Knobs for other machines: ``FAULTS_DAG_BATCHES`` (2), ``FAULTS_DAG_WORKERS`` (128, conftest).

Run: ``RELIABILITY_DAG_ROWS=100000 RELIABILITY_REPORT=var/reliability.jsonl
.venv/bin/python -m pytest tests/e2e/test_faults_dag.py -s``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from sqlalchemy import create_engine, func, select, text

from growthhub_sandbox.testing import SandboxAdmin
from growthhub_sync import state
from growthhub_sync.config import ShardsConfig, SyncConfig, parse_config
from growthhub_sync.demo import seed_demo
from growthhub_sync.orchestration import SYNC_DAG_ID
from growthhub_sync.outcomes import OUTCOMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from reliability_support import (
    Warehouse,
    expected_payloads,
    identity_duplicates,
    payload_mismatches,
    setup_sandbox_location,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import AirflowStack

    from growthhub_sandbox.testing import SandboxProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = int(os.environ.get("RELIABILITY_DAG_ROWS", "100000"))
LOCATION_ID = "demo-location"  # conftest: the config's only location; its pool and Asset stay the same
TOKEN = "sandbox-demo-token"  # conftest: the token of the growthhub_* connections
POOL = ShardsConfig().pool
CONN_ID = "growthhub_faults"  # conftest._growthhub_faults_conn: timeout 1.5 s, 128 workers
BATCHES = int(os.environ.get("FAULTS_DAG_BATCHES", "2"))
"""Mapped sync tasks of the first run: ``batch_size`` is ROWS / BATCHES (+1: no empty last range)."""
MAX_RUNS = 5
"""The first run and at most 4 more while rows are left deferred."""
RUN_TIMEOUT_S = 900
SYNC_TASK = "sync"
FAULTS: dict[str, Any] = {
    "seed": 20261126,
    "error_rate": 0.10,
    "error_statuses": [500, 502, 503],
    "timeout_rate": 0.05,
    "drop_rate": 0.02,
    "storm_every_n": 10_000,
    "storm_length": 10,
    "phase": "after",
}
HANG_OVER_TIMEOUT_S = 0.3
"""A timeout fault holds the request this much longer than the client waits."""
RETRIED = re.compile(r"GrowthHub batch: .*?\bretried=(\d+)")


def _conn_extra(stack: AirflowStack) -> dict[str, Any]:
    return dict(json.loads(stack.env[f"AIRFLOW_CONN_{CONN_ID.upper()}"])["extra"])


def _client_timeout(stack: AirflowStack) -> float:
    return float(_conn_extra(stack)["timeout"])


def _seconds(ti: dict[str, Any]) -> float | None:
    if ti["start_date"] is None or ti["end_date"] is None:
        return None
    return round((ti["end_date"] - ti["start_date"]).total_seconds(), 1)


def _retried_in_logs(stack: AirflowStack, run_ids: list[str]) -> int:
    """Sum of the hook's ``retried=`` over the task logs of ``run_ids`` (every try of every task)."""
    total = 0
    for run_id in run_ids:
        for path in (stack.home / "logs").rglob(f"run_id={run_id}/**/*.log"):
            total += sum(int(m) for m in RETRIED.findall(path.read_text(errors="replace")))
    return total


@dataclass
class FaultsWarehouse:
    wh: Warehouse
    config: SyncConfig
    runs_before: set[int]
    """``dag_run.id`` of the sync DAG's runs before this test."""
    seed_s: float


@pytest.fixture
def faults_warehouse(airflow_stack: AirflowStack, warehouse_db: str) -> Iterator[FaultsWarehouse]:
    """ROWS demo rows in a schema of their own; the shared config points at it with big batches.

    The config file is rewritten as ``e2e_warehouse`` does (same location name and id, so the
    serialized DAG does not change); the location's ``conn_id`` is the tuned ``growthhub_faults``.
    Afterwards the pool gets its slots back and, if the DAG was paused before, it is paused
    again and the runs this test caused are deleted, so that the next test's unpause gets a
    scheduled run for the latest interval as on a fresh stack (test_scheduler.py relies on it).
    """
    stack = airflow_stack
    schema = f"e2e_faults_{secrets.token_hex(4)}"
    engine = create_engine(warehouse_db)
    runs_before = {r["id"] for r in stack.query("SELECT id FROM dag_run WHERE dag_id = :d", d=SYNC_DAG_ID)}
    was_paused = stack.is_paused()
    slots = stack.pool_slots(POOL)
    try:
        started = time.monotonic()
        assert seed_demo(engine, ROWS, schema=schema, seed=5) == ROWS
        seed_s = time.monotonic() - started
        data = yaml.safe_load(stack.config_path.read_text())
        data["source"] = {**data["source"], "schema": schema}
        data["state"] = {**data["state"], "schema": schema}
        (location,) = data["locations"]
        assert location["location_id"] == LOCATION_ID
        data["locations"] = [{**location, "conn_id": CONN_ID}]
        data["batch_size"] = ROWS // BATCHES + 1  # BATCHES key ranges, none of them empty
        stack.config_path.write_text(yaml.safe_dump(data))
        stack.cli("pools", "set", POOL, str(BATCHES), "GrowthHub e2e location (faults test)")
        wh = Warehouse("postgresql", warehouse_db, engine, schema)
        yield FaultsWarehouse(wh, parse_config(data, "e2e-faults"), runs_before, seed_s)
    finally:
        try:
            _restore_stack(stack, runs_before, was_paused, slots)
        finally:
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            engine.dispose()


def _restore_stack(stack: AirflowStack, runs_before: set[int], was_paused: bool, slots: int) -> None:
    stack.cli("pools", "set", POOL, str(slots), "GrowthHub e2e location")
    if not was_paused:
        return
    stack.cli("dags", "pause", SYNC_DAG_ID)
    deadline = time.monotonic() + 120  # a run still going (the test failed): let it finish
    while time.monotonic() < deadline and stack.query(
        "SELECT 1 FROM dag_run WHERE dag_id = :d AND state = 'running'", d=SYNC_DAG_ID
    ):
        time.sleep(1)
    # without this test's scheduled run the DAG processor computes the next one from the latest
    # remaining run again: the latest complete interval, due at once when the DAG is unpaused
    new = [
        r["id"]
        for r in stack.query("SELECT id FROM dag_run WHERE dag_id = :d", d=SYNC_DAG_ID)
        if r["id"] not in runs_before
    ]
    with stack.meta.begin() as conn:
        for run in new:  # task instances, XComs etc. go with the run (ON DELETE CASCADE)
            conn.execute(text("DELETE FROM dag_run WHERE id = :i"), {"i": run})
    deadline = time.monotonic() + 90
    due = None
    while time.monotonic() < deadline:
        (row,) = stack.query("SELECT next_dagrun_create_after AS t FROM dag WHERE dag_id = :d", d=SYNC_DAG_ID)
        due = row["t"]
        if due is not None and due <= datetime.now(UTC):
            return
        time.sleep(1)
    raise AssertionError(f"the DAG's next scheduled run was not reset (next_dagrun_create_after {due})")


def _sharing_details(
    wh: Warehouse, tables: state.StateTables, led: list[dict[str, Any]], keys: list[str]
) -> list[list[dict[str, Any]]]:
    """For a failure message: the ledger rows sharing the contact of each of ``keys`` (mismatched)."""
    by_contact: dict[str, list[dict[str, Any]]] = {}
    for r in led:
        by_contact.setdefault(r["contact_id"], []).append(r)
    contact_of = {r["source_key"]: r["contact_id"] for r in led}
    groups = [by_contact[contact_of[k]] for k in keys[:5]]
    wanted = sorted({r["source_key"] for g in groups for r in g})
    q = tables.quarantine
    with wh.engine.connect() as conn:
        source = {
            r.id: r
            for r in conn.execute(
                text(
                    f'SELECT id, email, phone, updated_at FROM "{wh.schema}".crm_contacts WHERE id = ANY(:k)'
                ),
                {"k": wanted},
            )
        }
        held = {
            r.source_key: (
                r.status,
                r.errors,
                f"seen {r.first_seen_at:%H:%M:%S.%f}",
                f"closed {r.resolved_at}",
            )
            for r in conn.execute(
                select(q.c.source_key, q.c.status, q.c.errors, q.c.first_seen_at, q.c.resolved_at).where(
                    q.c.source_key.in_(wanted)
                )
            )
        }
    return [
        [
            {
                "key": r["source_key"],
                "ledger_run": r["last_run_id"],
                "synced_at": f"{r['last_synced_at']:%H:%M:%S.%f}",
                "email": source[r["source_key"]].email,
                "phone": source[r["source_key"]].phone,
                "updated_at": str(source[r["source_key"]].updated_at),
                "quarantine": held.get(r["source_key"]),
                "contact_equals_row": r["source_key"] not in keys,
            }
            for r in group
        ]
        for group in groups
    ]


def _trigger(stack: AirflowStack, run_id: str, logical_date: datetime | None) -> None:
    args = ["dags", "trigger", SYNC_DAG_ID, "--run-id", run_id]
    if logical_date is not None:
        args += ["--logical-date", logical_date.isoformat()]
    stack.cli(*args)


def test_dag_syncs_100k_rows_under_faults_without_loss_or_duplicates(
    airflow_stack: AirflowStack,
    faults_warehouse: FaultsWarehouse,
    sandbox: SandboxAdmin,
    sandbox_server: SandboxProcess,
) -> None:
    stack, wh, cfg = airflow_stack, faults_warehouse.wh, faults_warehouse.config
    tables = state.state_tables(cfg.state)
    setup_sandbox_location(sandbox, LOCATION_ID, TOKEN)  # the cf-ltv custom field; rate limit raised
    faults = {**FAULTS, "hang_seconds": _client_timeout(stack) + HANG_OVER_TIMEOUT_S}
    sandbox.set_faults(**faults)
    tag = secrets.token_hex(3)

    started = time.monotonic()
    # the first run has no data interval (triggered without a logical date): every row; later
    # ones get an interval holding none of the demo rows (2026-01-01), so they sync only the
    # pending rows, as the next scheduled run would
    run_ids: list[str] = []
    per_run: list[dict[str, Any]] = []
    for attempt in range(MAX_RUNS):
        run_id = f"faults_{tag}_{attempt}"
        logical = None if attempt == 0 else datetime(2026, 6, 1, tzinfo=UTC) + timedelta(hours=attempt)
        _trigger(stack, run_id, logical)
        stack.unpause()  # the scheduler starts no run of a paused DAG
        (run,) = stack.wait_for_runs("run_id = :r", 1, timeout=RUN_TIMEOUT_S, r=run_id)
        run_ids.append(run_id)
        tis = stack.task_instances(run_id)
        assert run["state"] == "success", [(t["task_id"], t["map_index"], t["state"]) for t in tis]
        with wh.engine.connect() as conn:
            row = state.get_run(conn, tables, run_id, "default")
            pending = Counter(reason[:60] for (reason,) in conn.execute(select(tables.pending.c.reason)))
        assert row is not None, f"no run row for {run_id}"
        per_run.append(
            {k: row[k] for k in ("extracted", *OUTCOMES, "batches")}
            | {
                "seconds": round((run["end_date"] - run["start_date"]).total_seconds(), 1),
                "sync_task_seconds": [_seconds(t) for t in tis if t["task_id"] == SYNC_TASK],
                "sync_task_tries": max(t["try_number"] for t in tis if t["task_id"] == SYNC_TASK),
                "pending_after": dict(pending.most_common(5)),
            }
        )
        assert (row["status"], row["invariant_ok"]) == ("success", True), row
        assert row["extracted"] == sum(row[o] for o in OUTCOMES), row
        if row["deferred"] == 0 and not pending:
            break
    elapsed = time.monotonic() - started
    assert per_run[0]["extracted"] == ROWS
    assert per_run[-1]["deferred"] == 0, f"still deferred after {len(per_run)} runs: {per_run}"

    # a scheduled run (the unpause, or the hour turning) may have synced pending rows meanwhile
    other_runs = [
        r["run_id"]
        for r in stack.query("SELECT id, run_id FROM dag_run WHERE dag_id = :d", d=SYNC_DAG_ID)
        if r["id"] not in faults_warehouse.runs_before and r["run_id"] not in run_ids
    ]
    stats = sandbox.stats()
    upserts = {k: int(v) for k, v in stats["requests"].get("POST /contacts/upsert", {}).items()}
    sandbox.set_faults()  # read the end state without faults

    checking = time.monotonic()
    reader = SandboxAdmin(sandbox_server.base_url, timeout=300)  # ~100k contacts in one answer
    try:
        contacts = reader.contacts(LOCATION_ID)
    finally:
        reader.close()
    by_id = {c["id"]: c for c in contacts}
    with wh.engine.connect() as conn:
        led = [dict(r._mapping) for r in conn.execute(select(tables.ledger))]
        quarantine = tables.quarantine
        open_q = [
            dict(r._mapping) for r in conn.execute(select(quarantine).where(quarantine.c.status == "open"))
        ]
        pending_rows = conn.execute(select(func.count()).select_from(tables.pending)).scalar_one()
        source_keys = set(conn.execute(text(f'SELECT id FROM "{wh.schema}".crm_contacts')).scalars())
    duplicates = identity_duplicates(contacts)
    expected = expected_payloads(wh, cfg, [r["source_key"] for r in led])
    keys_by_contact: dict[str, list[str]] = {}
    for r in led:
        keys_by_contact.setdefault(r["contact_id"], []).append(r["source_key"])
    sharing = {k for keys in keys_by_contact.values() if len(keys) > 1 for k in keys}
    missing = [r["source_key"] for r in led if r["contact_id"] not in by_id]
    mismatches = {
        key: diffs
        for r in led
        if (key := r["source_key"]) not in missing
        and (diffs := payload_mismatches(expected[key], by_id[r["contact_id"]]))
    }
    checking_s = time.monotonic() - checking
    figures = {
        "rows": ROWS,
        "runs": len(run_ids),
        "other_runs": len(other_runs),
        "elapsed_s": round(elapsed, 1),
        "rows_per_s": round(ROWS / elapsed, 1),
        "seed_s": round(faults_warehouse.seed_s, 1),
        "check_s": round(checking_s, 1),
        "per_run": per_run,
        "upsert_responses": upserts,
        "faults": stats.get("faults"),
        "retried": _retried_in_logs(stack, run_ids + other_runs),
        "contacts": len(contacts),
        "duplicates": len(duplicates),
        "missing_contacts": len(missing),
        "mismatches": len(mismatches),
        "mismatches_on_shared_contacts": len(set(mismatches) & sharing),
        "ledger_rows_sharing_a_contact": len(sharing),
        "quarantined_open": len(open_q),
        "settings": {
            "batch_size": cfg.batch_size,
            "pool_slots": BATCHES,
            "max_workers": _conn_extra(stack)["max_workers"],
            "timeout_s": _client_timeout(stack),
            "hang_s": faults["hang_seconds"],
            "storm_every_n": faults["storm_every_n"],
            "storm_length": faults["storm_length"],
        },
    }
    print("RELIABILITY_FIGURES " + json.dumps(figures))
    if report := os.environ.get("RELIABILITY_REPORT"):
        with open(report, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"scenario": "faults_dag", **figures}) + "\n")

    assert pending_rows == 0
    assert duplicates == {}, dict(list(duplicates.items())[:5])
    synced = {r["source_key"] for r in led}
    open_keys = {q["source_key"] for q in open_q}
    assert len(led) + len(open_q) == ROWS, "every row is synced or quarantined, once"
    assert synced | open_keys == source_keys
    assert missing == [], f"{len(missing)} ledger rows point at no contact: {missing[:5]}"
    assert set(keys_by_contact) == set(by_id), "one contact per ledger contact id and vice versa"
    assert mismatches == {}, (
        f"{len(mismatches)} ledger rows differ from their contact ({len(set(mismatches) & sharing)} "
        f"of them share it with another row): {dict(list(mismatches.items())[:5])}\n"
        f"rows sharing those contacts: {_sharing_details(wh, tables, led, list(mismatches))}"
    )
    assert sum(v for k, v in upserts.items() if k.startswith("5")) > 0, "5xx were injected"
    if sum(upserts.values()) >= FAULTS["storm_every_n"]:
        assert upserts.get("429", 0) > 0, "429 storms were injected"
