"""A sync worker killed with SIGKILL mid-batch, then run again, ends where an undisturbed run ends.

The CLI (``python -m growthhub_sync --url URL sync``) runs as a subprocess against a sandbox with
added latency; once some contacts exist it is SIGKILLed, then re-run to completion. A fresh
warehouse synced undisturbed into the reset sandbox is the reference.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from reliability_support import (
    LOCATION_ID,
    Warehouse,
    expected_payloads,
    growthhub_conn,
    identity_duplicates,
    ledger,
    make_config,
    pending,
    setup_sandbox_location,
    sqlite_warehouse,
)

from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess
from growthhub_sync.config import SyncConfig
from growthhub_sync.demo import seed_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = 2000
_VOLATILE = {"id", "dateAdded", "dateUpdated"}


def _cli(cfg: SyncConfig, wh: Warehouse, tmp_path: Path, conn: str, run_id: str) -> subprocess.Popen[bytes]:
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(by_alias=True, exclude_none=True, mode="json")))
    env = {**os.environ, "GROWTHHUB_SYNC_CONFIG": str(path), "AIRFLOW_CONN_GROWTHHUB_DEFAULT": conn}
    cmd = [sys.executable, "-m", "growthhub_sync", "--url", wh.url, "sync", "--run-id", run_id]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _finish(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _by_identity(contacts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        f"{(c.get('email') or '').lower()}|{c.get('phone') or ''}": {
            k: v for k, v in c.items() if k not in _VOLATILE
        }
        for c in contacts
    }


def test_sigkill_mid_batch_then_rerun_converges_to_the_undisturbed_end_state(
    tmp_path: Path, sandbox: SandboxAdmin, sandbox_server: SandboxProcess
) -> None:
    conn = growthhub_conn(sandbox_server.base_url, tmp_path, max_workers=4)

    # -- disturbed: killed mid-batch, then run again ------------------------------------------
    (tmp_path / "a").mkdir()
    wh = sqlite_warehouse(tmp_path / "a" / "w.db")
    seed_demo(wh.engine, ROWS, seed=7)
    cfg = make_config(wh, tmp_path / "a")
    setup_sandbox_location(sandbox)
    sandbox.set_faults(latency_ms=15)
    proc = _cli(cfg, wh, tmp_path / "a", conn, "crash-1")
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(sandbox.contacts(LOCATION_ID)) >= 600:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sync finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    killed_at = len(sandbox.contacts(LOCATION_ID))
    recorded_at_kill = len(ledger(wh, cfg))
    sandbox.set_faults()
    assert _finish(_cli(cfg, wh, tmp_path / "a", conn, "crash-1")) == 0  # the task retry: same run id
    disturbed = sandbox.contacts(LOCATION_ID)
    led = ledger(wh, cfg)
    upserts_disturbed = sum(int(v) for v in sandbox.stats()["requests"]["POST /contacts/upsert"].values())
    expected = expected_payloads(wh, cfg, [r["source_key"] for r in led])
    by_id = {c["id"]: c for c in disturbed}
    wrong = [
        r["source_key"]
        for r in led
        if r["contact_id"] not in by_id
        or (by_id[r["contact_id"]].get("email") or "").lower()
        != (expected[r["source_key"]].get("email") or "").lower()
    ]
    assert wrong == [], "ledger rows whose contact is missing or has another email"
    assert identity_duplicates(disturbed) == {}
    assert pending(wh, cfg) == []
    assert killed_at > recorded_at_kill or killed_at > 0

    # -- undisturbed reference ---------------------------------------------------------------
    sandbox.reset()
    setup_sandbox_location(sandbox)
    (tmp_path / "b").mkdir()
    ref_wh = sqlite_warehouse(tmp_path / "b" / "w.db")
    seed_demo(ref_wh.engine, ROWS, seed=7)
    ref_cfg = make_config(ref_wh, tmp_path / "b")
    assert _finish(_cli(ref_cfg, ref_wh, tmp_path / "b", conn, "ref-1")) == 0
    reference = sandbox.contacts(LOCATION_ID)

    assert len(disturbed) == len(reference)
    a, b = _by_identity(disturbed), _by_identity(reference)
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k] != b[k]]
    assert differing == [], [(a[k], b[k]) for k in differing[:3]]
    assert {r["source_key"] for r in led} == {r["source_key"] for r in ledger(ref_wh, ref_cfg)}
    print(
        f"RELIABILITY_FIGURES crash: rows={ROWS} contacts_at_kill={killed_at} "
        f"ledger_at_kill={recorded_at_kill} "
        f"contacts={len(disturbed)} upserts_disturbed={upserts_disturbed} duplicates=0"
    )
