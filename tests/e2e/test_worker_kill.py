"""A sync worker SIGKILLed mid-batch under the real scheduler, retried by Airflow, ends where an
undisturbed run ends.

``tests/reliability/test_crash.py`` kills the CLI; this kills the process running a mapped
``sync`` task instance of ``growthhub_contact_sync`` (scheduler + LocalExecutor
+ PostgreSQL metadata DB, ``airflow_stack``) and lets Airflow's own retry (the DAG's
``DEFAULT_ARGS``: retries 3, 1 min exponential) finish the batch.

Which process is killed. The LocalExecutor runs each task in two processes: a long-lived
executor worker (``airflow worker -- LocalExecutor: <task>``), which is the task's *supervisor*
(it heartbeats to the API server and relays the task's calls), and a forked task process titled
``airflow worker -- <task instance id>`` that runs ``sync_batch``: it holds the batch, the HTTP
requests in flight and the outcomes not yet flushed to the ledger. The test kills the *task
process*: that is where a crash loses work (the OOM killer picks the process holding the batch;
a segfault in a driver kills it), and it is the path Airflow recovers through its retry: the
supervisor sees exit -9 and reports the try failed, so the task goes ``up_for_retry`` and the
scheduler starts try 2 after the retry delay. Killing the supervisor alone would not stop the
batch (the orphaned task process keeps sending, then cannot report); killing both (a worker
node lost) leaves the task instance ``running`` until the scheduler's task heartbeat timeout
(``[scheduler] task_instance_heartbeat_timeout``, 300 s by default) and then goes through the
same retry, i.e. the same end state, minutes later. The test asserts the supervisor survived.

Reference: the same rows in a fresh schema synced undisturbed by the CLI into the reset sandbox
(``test_crash.py``'s approach), with the same ``batch_size``, so the chunks are the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from retry_timing import SYNC_TASK, quick_retry_logical_date
from sqlalchemy import create_engine, func, inspect, select, text

from growthhub_sync import state
from growthhub_sync.config import SyncConfig, parse_config
from growthhub_sync.demo import COLUMNS, create_demo_table, generate, insert_rows
from growthhub_sync.mapping import Mapper
from growthhub_sync.orchestration import SYNC_DAG_ID

if TYPE_CHECKING:
    from conftest import AirflowStack, E2EWarehouse

    from growthhub_sandbox.testing import SandboxAdmin

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOCATION_ID = "demo-location"  # conftest: the sandbox's startup location, the config's only one
ROWS = 3000
BATCH_SIZE = 2000
"""Two mapped sync tasks: keys 1-2000 (map index 0, the one killed) and 2001-3000 (map index 1)."""
KILLED_MAP_INDEX = 0
LATENCY_MS = 400
"""Sandbox latency per request while the batch runs: with the hook's 64 workers ~150 rows/s per task."""
AFTER_FLUSH = 150
"""Kill once this many more contacts exist after the killed batch's first ledger flush: sent, unrecorded."""
SEED = 11
_VOLATILE = {"id", "dateAdded", "dateUpdated"}


# -- helpers ----------------------------------------------------------------------------------------


def demo_rows(now: datetime) -> list[tuple[Any, ...]]:
    """``ROWS`` demo rows (~3 % bad on purpose, some sharing an email/phone), updated 30 h to 6 h ago."""
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=30)
    return list(generate(ROWS, seed=SEED, start=start, span=timedelta(hours=24)))


def proc_stat(pid: int) -> tuple[str, int, int]:
    """``(state, ppid, pgrp)`` of a live process, from ``/proc/PID/stat``."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def proc_title(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return ""


def pids_titled(marker: str) -> list[int]:
    """Live processes whose command line (setproctitle) contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and marker in proc_title(int(entry.name)):
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return proc_stat(pid)[0] not in ("Z", "X")
    except OSError:
        return False


def sync_tis(stack: AirflowStack, run_id: str) -> dict[int, dict[str, Any]]:
    """The run's mapped sync task instances by map index."""
    return {t["map_index"]: t for t in stack.task_instances(run_id) if t["task_id"] == SYNC_TASK}


def upserts_answered(sandbox: SandboxAdmin) -> int:
    return sum(int(n) for n in sandbox.stats()["requests"].get("POST /contacts/upsert", {}).values())


def created_in_sandbox(sandbox: SandboxAdmin) -> int:
    return int(sandbox.stats()["locations"].get(LOCATION_ID, {}).get("created", 0))


def by_identity(contacts: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        f"{(c.get('email') or '').lower()}|{c.get('phone') or ''}": {
            k: v for k, v in c.items() if k not in _VOLATILE
        }
        for c in contacts
    }


def identity_duplicates(contacts: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Identities (lower-cased email, phone) held by more than one contact."""
    seen: dict[str, int] = defaultdict(int)
    for c in contacts:
        for ident in {f"email:{(c.get('email') or '').lower()}", f"phone:{c.get('phone') or ''}"}:
            if not ident.endswith(":"):
                seen[ident] += 1
    return {k: n for k, n in seen.items() if n > 1}


def source_rows(engine: Any, cfg: SyncConfig) -> tuple[list[str], list[tuple[Any, ...]]]:
    cols = cfg.source_columns()
    tbl = f'"{cfg.source.schema_}"."{cfg.source.table}"'
    with engine.connect() as conn:
        return cols, [tuple(r) for r in conn.exec_driver_sql(f"SELECT {', '.join(cols)} FROM {tbl}")]


def state_rows(engine: Any, cfg: SyncConfig, name: str) -> list[dict[str, Any]]:
    table = getattr(state.state_tables(cfg.state), name)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table))]


def ledger_count(engine: Any, cfg: SyncConfig, hi: str | None = None) -> int:
    """Ledger rows (of keys up to ``hi``); 0 before the plan task created the state tables."""
    t = state.state_tables(cfg.state).ledger
    if not inspect(engine).has_table(t.name, schema=t.schema):
        return 0
    stmt = select(func.count()).select_from(t)
    if hi is not None:
        stmt = stmt.where(t.c.source_key <= hi)
    with engine.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


def shared_identity_keys(
    cols: list[str], rows: Sequence[tuple[Any, ...]], cfg: SyncConfig
) -> dict[str, set[str]]:
    """Normalised identity (``email:x`` / ``phone:y``) → source keys, for identities of several rows."""
    mapper = Mapper(cfg, cols)
    key_i = cols.index(cfg.source.key_column)
    owners: dict[str, set[str]] = defaultdict(set)
    for row, ids in zip(rows, mapper.identities([mapper.contact(r) for r in rows]), strict=True):
        for kind, value in ids:
            owners[f"{kind}:{value}"].add(str(row[key_i]))
    return {k: v for k, v in owners.items() if len(v) > 1}


def wait_for(what: str, check: Any, stack: AirflowStack, timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        if result := check():
            return result
        time.sleep(every)
    raise AssertionError(f"{what}: not after {timeout}s\n{stack.diagnostics()}")


# -- the test ---------------------------------------------------------------------------------------


def test_sync_task_process_sigkilled_mid_batch_is_retried_by_airflow_and_converges(
    airflow_stack: AirflowStack,
    e2e_warehouse: E2EWarehouse,
    sandbox: SandboxAdmin,
    warehouse_db: str,
    tmp_path: Path,
) -> None:
    began = time.monotonic()
    now = datetime.now(UTC)
    engine = e2e_warehouse.engine
    # the shared config file, on this test's schema, with two mapped batches instead of 300
    data = e2e_warehouse.config.model_dump(by_alias=True, exclude_none=True, mode="json")
    data["batch_size"] = BATCH_SIZE
    airflow_stack.config_path.write_text(yaml.safe_dump(data))
    cfg = parse_config(data, "e2e-worker-kill")
    rows = demo_rows(now)
    e2e_warehouse.insert(rows)
    keys = sorted(str(r[COLUMNS.index("id")]) for r in rows)
    killed_hi = keys[BATCH_SIZE - 1]  # map index 0 syncs keys <= this one (KeyRange: lo < key <= hi)

    # -- disturbed: a manual run; its task process is SIGKILLed mid-batch ---------------------
    sandbox.set_faults(latency_ms=LATENCY_MS)
    run_id = f"worker_kill_{secrets.token_hex(4)}"
    logical_date = quick_retry_logical_date(datetime(2026, 1, 2, tzinfo=UTC))
    # a manual run's data interval is the last complete hour before now: widen it back over the rows
    lookback = 48 * 60  # rows are 6-30 h old; 48 h covers them whichever hour the run gets
    airflow_stack.cli(
        "dags",
        "trigger",
        SYNC_DAG_ID,
        "--run-id",
        run_id,
        "--logical-date",
        logical_date.isoformat(),
        "--conf",
        json.dumps({"lookback_minutes": lookback}),
    )
    airflow_stack.unpause()  # its scheduled run of the latest hour (no rows of ours) may go first

    def first_flush_of_killed_batch() -> int:
        ti = sync_tis(airflow_stack, run_id).get(KILLED_MAP_INDEX)
        if ti is not None and ti["state"] not in (None, "scheduled", "queued", "running"):
            raise AssertionError(f"map index {KILLED_MAP_INDEX} ended before the kill: {ti['state']}")
        return created_in_sandbox(sandbox) if ledger_count(engine, cfg, killed_hi) > 0 else 0

    after_flush = wait_for(
        "the killed batch's first ledger flush", first_flush_of_killed_batch, airflow_stack, 180
    )
    wait_for(
        f"{AFTER_FLUSH} more contacts",
        lambda: created_in_sandbox(sandbox) >= after_flush + AFTER_FLUSH,
        airflow_stack,
        60,
    )
    ti = sync_tis(airflow_stack, run_id)[KILLED_MAP_INDEX]
    assert (ti["state"], ti["try_number"]) == ("running", 1), ti
    (task_pid,) = pids_titled(f"airflow worker -- {ti['id']}")  # the task process (setproctitle)
    supervisor_pid = proc_stat(task_pid)[1]
    supervisor_title = proc_title(supervisor_pid)
    assert ti["pid"] in (None, task_pid), (ti["pid"], task_pid)
    # the supervisor is a LocalExecutor worker of this session's scheduler (its process group)
    assert proc_stat(supervisor_pid)[2] == airflow_stack.processes["scheduler"].pid
    assert supervisor_title.startswith("airflow worker -- LocalExecutor"), supervisor_title
    os.kill(task_pid, signal.SIGKILL)
    killed_at_s = time.monotonic() - began
    wait_for("the task process to go", lambda: not alive(task_pid), airflow_stack, 10, every=0.05)
    ledger_at_kill = ledger_count(engine, cfg)
    ledger_of_batch_at_kill = ledger_count(engine, cfg, killed_hi)
    time.sleep(2 * LATENCY_MS / 1000)  # requests already in the sandbox finish
    contacts_at_kill = len(sandbox.contacts(LOCATION_ID))
    sandbox.set_faults()  # the retry and the rest of the run at full speed

    assert alive(supervisor_pid), "the supervisor (LocalExecutor worker) must survive its task process"
    wait_for(
        "the killed try to be marked up_for_retry",
        lambda: sync_tis(airflow_stack, run_id)[KILLED_MAP_INDEX]["state"] in ("up_for_retry", "failed"),
        airflow_stack,
        60,
    )
    assert sync_tis(airflow_stack, run_id)[KILLED_MAP_INDEX]["state"] == "up_for_retry"
    (run,) = airflow_stack.wait_for_runs("run_id = :r", 1, timeout=300, r=run_id)
    finished_s = time.monotonic() - began

    tis = sync_tis(airflow_stack, run_id)
    assert run["state"] == "success", airflow_stack.diagnostics()
    assert sorted(tis) == [0, 1], tis.keys()  # 3000 rows cut every 2000 keys
    try_numbers = {i: t["try_number"] for i, t in sorted(tis.items())}
    assert all(t["state"] == "success" for t in tis.values()), tis
    assert try_numbers[KILLED_MAP_INDEX] > 1, try_numbers  # retried by Airflow
    assert try_numbers == {KILLED_MAP_INDEX: 2, 1 - KILLED_MAP_INDEX: 1}, try_numbers
    others = {
        t["task_id"]: (t["state"], t["try_number"])
        for t in airflow_stack.task_instances(run_id)
        if t["task_id"] != SYNC_TASK
    }
    assert others == {
        "plan": ("success", 1),
        "finalize": ("success", 1),
        "publish": ("success", 1),
        "report": ("success", 1),
    }
    history = airflow_stack.query(
        "SELECT try_number, state, pid FROM task_instance_history WHERE dag_id = :d AND run_id = :r "
        "AND task_id = :t AND map_index = :m ORDER BY try_number",
        d=SYNC_DAG_ID,
        r=run_id,
        t=SYNC_TASK,
        m=KILLED_MAP_INDEX,
    )
    # try 1 is archived with the pid that was killed (its state there is recorded as failed)
    assert [(h["try_number"], h["pid"]) for h in history] == [(1, task_pid)], history

    disturbed = sandbox.contacts(LOCATION_ID)
    upserts_disturbed = upserts_answered(sandbox)
    cols, source = source_rows(engine, cfg)
    ledger = state_rows(engine, cfg, "ledger")
    run_row = e2e_warehouse.runs()[run_id]
    disturbed_quarantine = {q["source_key"] for q in e2e_warehouse.open_quarantine()}
    pending = state_rows(engine, cfg, "pending")

    # -- undisturbed reference: the same rows, a fresh schema, the reset sandbox, the CLI ------
    sandbox.reset()
    ref_schema = f"e2e_ref_{secrets.token_hex(4)}"
    ref_engine = create_engine(warehouse_db)
    try:
        insert_rows(ref_engine, create_demo_table(ref_engine, schema=ref_schema), iter(rows))
        ref_data = {
            **data,
            "source": {**data["source"], "schema": ref_schema},
            "state": {**data["state"], "schema": ref_schema},
        }
        ref_cfg = parse_config(ref_data, "e2e-worker-kill-reference")
        (tmp_path / "ref.yaml").write_text(yaml.safe_dump(ref_data))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "GROWTHHUB_SYNC"))},
            "AIRFLOW_HOME": str(tmp_path / "airflow"),
            "GROWTHHUB_SYNC_CONFIG": str(tmp_path / "ref.yaml"),
            "AIRFLOW_CONN_GROWTHHUB_DEFAULT": airflow_stack.env["AIRFLOW_CONN_GROWTHHUB_DEFAULT"],
        }
        cmd = [sys.executable, "-m", "growthhub_sync", "--url", warehouse_db, "sync", "--run-id", "reference"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, f"reference sync failed\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        reference = sandbox.contacts(LOCATION_ID)
        upserts_undisturbed = upserts_answered(sandbox)
        ref_ledger = state_rows(ref_engine, ref_cfg, "ledger")
        ref_quarantine = {
            q["source_key"] for q in state_rows(ref_engine, ref_cfg, "quarantine") if q["resolved_at"] is None
        }
        ref_run = {r["run_id"]: r for r in state_rows(ref_engine, ref_cfg, "runs")}["reference"]
    finally:
        with ref_engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{ref_schema}" CASCADE'))
        ref_engine.dispose()

    # -- figures first, so a failing run still reports them -----------------------------------
    duplicates = identity_duplicates(disturbed)
    expected = Mapper(cfg, cols).map(
        [r for r in source if str(r[cols.index(cfg.source.key_column)]) in {x["source_key"] for x in ledger}],
        LOCATION_ID,
    )
    payload_of = dict(zip(expected.keys, expected.payloads, strict=True))
    sent_fields = {r["contact_id"]: payload_of[r["source_key"]].keys() for r in ledger}
    a, b = by_identity(disturbed), by_identity(reference)
    # Upserts never clear a field they do not send (null policy "omit"): when a newer row takes
    # over a contact an older row with the same identity wrote first, the fields the newer row
    # leaves empty keep the older row's values. Whether the older row was written first depends
    # on which batch got there first, so those fields may differ; fields the owner sends may not.
    owner_fields = {
        f"{(c.get('email') or '').lower()}|{c.get('phone') or ''}": set(sent_fields.get(c["id"], ()))
        for c in disturbed
    }
    differing = sorted(
        k
        for k in a.keys() | b.keys()
        if k not in a
        or k not in b
        or {f for f in a[k].keys() | b[k].keys() if a[k].get(f) != b[k].get(f)}
        & (owner_fields[k] | {"email", "phone"})
    )
    shared = shared_identity_keys(cols, source, cfg)
    batch_of = {k: 0 if k <= killed_hi else 1 for k in keys}
    cross_batch = {i for i, ks in shared.items() if len({batch_of[k] for k in ks}) > 1}

    def is_shared(ident: str) -> bool:
        email, _, phone = ident.partition("|")
        return any(f"{kind}:{v}" in cross_batch for kind, v in (("email", email), ("phone", phone)) if v)

    print(
        f"RELIABILITY_FIGURES crash-dag: rows={ROWS} batches={len(tis)} batch_size={BATCH_SIZE} "
        f"killed_map_index={KILLED_MAP_INDEX} killed_pid={task_pid} supervisor_pid={supervisor_pid} "
        f"killed_at_s={killed_at_s:.0f} contacts_at_kill={contacts_at_kill} ledger_at_kill={ledger_at_kill} "
        f"ledger_of_killed_batch_at_kill={ledger_of_batch_at_kill} try_numbers={try_numbers} "
        f"contacts={len(disturbed)} reference_contacts={len(reference)} "
        f"upserts_disturbed={upserts_disturbed} upserts_undisturbed={upserts_undisturbed} "
        f"duplicates={len(duplicates)} pending_left={len(pending)} differing_contacts={len(differing)} "
        f"differing_on_cross_batch_shared_identity={sum(map(is_shared, differing))} "
        f"cross_batch_shared_identities={len(cross_batch)} run_done_s={finished_s:.0f} "
        f"wall_s={time.monotonic() - began:.0f}"
    )

    # -- the disturbed run on its own -----------------------------------------------------------
    assert (run_row["status"], run_row["invariant_ok"]) == ("success", True), run_row
    outcomes = ("unchanged", "created", "updated", "quarantined", "rejected", "deferred")
    assert run_row["extracted"] == sum(run_row[o] for o in outcomes), run_row  # the invariant
    assert run_row["batches"] == len(tis)
    assert run_row["deferred"] == 0
    assert pending == []
    assert duplicates == {}, "one contact per identity"
    assert len(a) == len(disturbed)
    email_of = {
        k: (p.get("email") or "").lower() for k, p in zip(expected.keys, expected.payloads, strict=True)
    }
    contact = {c["id"]: c for c in disturbed}
    wrong = [
        r["source_key"]
        for r in ledger
        if r["contact_id"] not in contact
        or (contact[r["contact_id"]].get("email") or "").lower() != email_of[r["source_key"]]
    ]
    assert wrong == [], f"ledger rows whose contact is missing or carries another email: {wrong[:10]}"
    assert contacts_at_kill > ledger_of_batch_at_kill > 0, "killed after a flush, with sent rows unrecorded"

    # -- the same end state as the undisturbed run ---------------------------------------------
    assert (ref_run["status"], ref_run["invariant_ok"]) == ("success", True)
    assert {r["source_key"] for r in ledger} == {r["source_key"] for r in ref_ledger}
    assert disturbed_quarantine == ref_quarantine
    assert len(disturbed) == len(reference)
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:10]
    assert differing == [], (
        f"{len(differing)} contacts differ from the undisturbed run, "
        f"{sum(map(is_shared, differing))} of them on an identity shared by rows of both batches; "
        f"first: {[(a.get(k), b.get(k)) for k in differing[:2]]}"
    )
    # each row extracted once: the retry must not count a row it finds pending a second time
    counts = {k: run_row[k] for k in ("extracted", *outcomes)}
    assert (run_row["extracted"], ref_run["extracted"]) == (ROWS, ROWS), counts
