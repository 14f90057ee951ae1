"""The warehouse going away and the sandbox restarting mid-run: a clear failure, then repair.

PostgreSQL: the sync's backend is killed with ``pg_terminate_backend`` from another connection
while a slow sync (sandbox latency) is running. The sandbox: restarted on the same port with a
``--state`` file while a sync is running. In both cases the next run converges: every row synced
or quarantined, no pending row, no duplicate contact, the ledger agrees with the sandbox.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from reliability_support import (
    LOCATION_ID,
    PG_URL,
    Warehouse,
    expected_payloads,
    growthhub_conn,
    identity_duplicates,
    ledger,
    make_config,
    pending,
    quarantine,
    setup_sandbox_location,
    sqlite_warehouse,
)
from sqlalchemy import create_engine, exc, text

from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess, free_port
from growthhub_sync.config import SyncConfig
from growthhub_sync.demo import seed_demo
from growthhub_sync.pipeline import SyncOptions, sync

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROWS = 1500


def _converged(wh: Warehouse, cfg: SyncConfig, admin: SandboxAdmin) -> None:
    contacts = admin.contacts(LOCATION_ID)
    led = ledger(wh, cfg)
    open_q = [q for q in quarantine(wh, cfg) if q["status"] == "open"]
    assert pending(wh, cfg) == []
    assert len(led) + len(open_q) == ROWS
    assert identity_duplicates(contacts) == {}
    by_id = {c["id"]: c for c in contacts}
    assert {r["contact_id"] for r in led} == set(by_id)
    expected = expected_payloads(wh, cfg, [r["source_key"] for r in led])
    wrong = [
        r["source_key"]
        for r in led
        if (by_id[r["contact_id"]].get("email") or "").lower()
        != (expected[r["source_key"]].get("email") or "").lower()
    ]
    ids = [c["id"] for c in contacts]
    assert len(ids) == len(set(ids)), "the sandbox handed out one contact id twice"
    assert wrong == [], [
        (
            k,
            by_id[next(r["contact_id"] for r in led if r["source_key"] == k)].get("email"),
            expected[k].get("email"),
        )
        for k in wrong[:3]
    ]


def _run_until_settled(cfg: SyncConfig, wh: Warehouse, run: str) -> list[dict[str, Any]]:
    outs = []
    for i in range(5):
        out = sync(
            cfg, "default", None, SyncOptions(run_id=f"{run}-{i}", keep_results=False), engine=wh.engine
        )
        assert out["invariant_ok"]
        outs.append(out)
        if out["deferred"] == 0:
            break
    return outs


def _wait_for_contacts(admin: SandboxAdmin, n: int, worker: threading.Thread, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and worker.is_alive():
        if len(admin.contacts(LOCATION_ID)) >= n:
            return
        time.sleep(0.1)
    raise AssertionError("the sync did not get far enough to be disturbed")


def test_warehouse_connection_killed_mid_run_fails_clearly_and_the_next_run_repairs(
    rel_pg_engine: Any,
    tmp_path: Path,
    sandbox: SandboxAdmin,
    sandbox_server: SandboxProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = f"ghrel-victim-{uuid.uuid4().hex[:6]}"
    victim = create_engine(PG_URL, connect_args={"application_name": app})
    wh = Warehouse(
        "postgresql", PG_URL, victim, f"{rel_pg_engine.url.database and ''}ghrel_out_{uuid.uuid4().hex[:6]}"
    )
    wh.schema = f"{__import__('reliability_support').SESSION}_{uuid.uuid4().hex[:6]}"
    seed_demo(rel_pg_engine, ROWS, schema=wh.schema, seed=9)
    cfg = make_config(wh, tmp_path, batch_size=300)
    setup_sandbox_location(sandbox)
    monkeypatch.setenv(
        "AIRFLOW_CONN_GROWTHHUB_DEFAULT", growthhub_conn(sandbox_server.base_url, tmp_path, max_workers=4)
    )
    sandbox.set_faults(latency_ms=20)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            sync(cfg, "default", None, SyncOptions(run_id="outage-1", keep_results=False), engine=victim)
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    _wait_for_contacts(sandbox, 300, worker)
    with rel_pg_engine.begin() as conn:
        killed = conn.execute(
            text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :a"),
            {"a": app},
        ).scalar_one()
    worker.join(timeout=180)
    assert not worker.is_alive()
    assert killed >= 1
    assert len(errors) == 1, "the sync must fail, not carry on half-written"
    assert isinstance(errors[0], exc.DBAPIError), repr(errors[0])
    assert "terminat" in str(errors[0]).lower()
    assert "@" not in str(errors[0]), "hide_parameters: no contact data in the error"

    sandbox.set_faults()
    victim.dispose()
    repaired = Warehouse("postgresql", PG_URL, rel_pg_engine, wh.schema)
    outs = _run_until_settled(cfg, repaired, "outage-2")
    _converged(repaired, cfg, sandbox)
    print(
        f"RELIABILITY_FIGURES warehouse-outage: backends_killed={killed} error={type(errors[0]).__name__} "
        f"rerun={[{k: o[k] for k in ('unchanged', 'created', 'updated', 'deferred')} for o in outs]}"
    )


class _SandboxOnPort:
    """The sandbox on a fixed port with a ``--state`` file, so it can be restarted in place."""

    def __init__(self, state: Path) -> None:
        self.port = free_port()
        self.state = state
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "growthhub_sandbox",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--state",
            str(self.state),
            "--burst",
            "1000000000",
            "--daily",
            "1000000000",
            "--log-level",
            "warning",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.base_url}/_sandbox/health", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("sandbox did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[_SandboxOnPort]:
    server = _SandboxOnPort(tmp_path / "sandbox-state.db")
    server.start()
    yield server
    server.stop()


def test_sandbox_restart_mid_run_is_retried_or_deferred_and_the_next_run_repairs(
    restartable: _SandboxOnPort, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = SandboxAdmin(restartable.base_url)
    setup_sandbox_location(admin)
    wh = sqlite_warehouse(tmp_path / "w.db")
    seed_demo(wh.engine, ROWS, seed=10)
    cfg = make_config(wh, tmp_path, batch_size=300)
    monkeypatch.setenv(
        "AIRFLOW_CONN_GROWTHHUB_DEFAULT",
        growthhub_conn(restartable.base_url, tmp_path, max_workers=4, timeout=2),
    )
    admin.set_faults(latency_ms=20)
    results: list[Any] = []

    def work() -> None:
        try:
            results.append(
                sync(
                    cfg,
                    "default",
                    None,
                    SyncOptions(run_id="restart-1", keep_results=False),
                    engine=wh.engine,
                )
            )
        except BaseException as e:
            results.append(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    _wait_for_contacts(admin, 300, worker)
    before = len(admin.contacts(LOCATION_ID))
    restartable.stop()
    time.sleep(3)
    restartable.start()
    worker.join(timeout=300)
    assert not worker.is_alive()
    (first,) = results
    assert len(admin.contacts(LOCATION_ID)) >= before, "contacts survived the restart (--state)"
    if isinstance(first, BaseException):
        assert "GrowthHub" in type(first).__name__ or "Connection" in repr(first), repr(first)
    else:
        assert first["invariant_ok"]
    admin.set_faults()
    outs = _run_until_settled(cfg, wh, "restart-2")
    _converged(wh, cfg, admin)
    first_desc = (
        type(first).__name__
        if isinstance(first, BaseException)
        else {k: first[k] for k in ("created", "updated", "deferred")}
    )
    print(f"RELIABILITY_FIGURES sandbox-restart: first={first_desc} reruns={[o['deferred'] for o in outs]}")
    admin.close()
    assert os.path.exists(restartable.state)
