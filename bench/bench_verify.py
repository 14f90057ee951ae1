"""
Benchmark read-back verification: the extra requests and the time it adds to a run's finalize.

A SQLite warehouse of demo contacts synced to the sandbox (20 ms latency per request) with
verification off; then :func:`growthhub_sync.verify.verify_run` reads that run's contacts back,
timed on its own, for the default sample (0.5 % of the sent contacts) and for the cap (200), under
GrowthHub's default limit (100 requests per 10 s, the window empty when the reads start) and an
unlimited one. Printed per case: contacts sent, reads (``GET /contacts/{id}`` the sandbox
answered), wall time of the verification, differences found.

Usage::

    python bench/bench_verify.py                  # 10,000 rows
    python bench/bench_verify.py --rows 2000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine

from growthhub_provider.client.coordination import forget_local_limiters
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess
from growthhub_sync.config import SyncConfig
from growthhub_sync.demo import seed_demo
from growthhub_sync.pipeline import SyncOptions, sync
from growthhub_sync.testing import config_for
from growthhub_sync.verify import verify_run

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = {"start": T0.isoformat(), "end": (T0 + timedelta(days=1)).isoformat()}
GET = "GET /contacts/{contactId}"
UNLIMITED = {"burst": 1_000_000, "intervalMs": 10_000, "daily": 10_000_000}
GROWTHHUB = {"burst": 100, "intervalMs": 10_000, "daily": 200_000}


def _connect(server: SandboxProcess, work: Path, limit: dict[str, int]) -> None:
    """The connection ``growthhub_default`` to location loc1 with ``limit`` (the client's and the
    sandbox's), and a limiter that starts with an empty window."""
    admin = SandboxAdmin(server.base_url)
    admin.put_location(
        "loc1",
        duplicateCheckFields=["email", "phone"],
        customFields=[{"id": "cf-ltv", "key": "lifetime_value", "dataType": "MONETORY"}],
        rateLimit=limit,
    )
    extra = {
        "location_id": "loc1",
        "rate_limit_burst": limit["burst"],
        "rate_limit_interval_ms": limit["intervalMs"],
        "rate_limit_daily": limit["daily"],
        "refresh_token_file": str(work / "tokens.json"),
    }
    conn = {"conn_type": "growthhub", "host": server.base_url, "password": "tok", "extra": extra}
    os.environ["AIRFLOW_CONN_GROWTHHUB_DEFAULT"] = json.dumps(conn)
    forget_local_limiters()


def _reads(admin: SandboxAdmin) -> int:
    return sum(admin.stats()["requests"].get(GET, {}).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_verify_"))
    url = f"sqlite:///{work / 'warehouse.db'}"
    engine = create_engine(url)
    seed_demo(engine, args.rows, start=T0)
    off = config_for(url, None, work, verify={"sample": 0})
    with SandboxProcess(args=["--log-level", "warning"]) as server:
        admin = SandboxAdmin(server.base_url)
        admin.reset()
        _connect(server, work, UNLIMITED)
        admin.add_token(token="tok", locationId="loc1", scopes=["contacts.write", "contacts.readonly"])
        admin.set_faults(latency_ms=20)
        started = time.perf_counter()
        out = sync(off, "default", WINDOW, SyncOptions(run_id="r1"), engine=engine)
        print(f"first sync, verification off: {out['created'] + out['updated']} contacts sent in "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        print("| sample | limit | sent | reads | wall | mismatched |")
        print("|---|---|---|---|---|---|")
        for label, verify in (("default 0.5 %", {}), ("cap 200", {"sample": 1.0})):
            for limit_name, limit in (("unlimited", UNLIMITED), ("100 per 10 s", GROWTHHUB)):
                _connect(server, work, limit)
                time.sleep(limit["intervalMs"] / 1000 if limit is GROWTHHUB else 0)  # the window empties
                data = off.model_dump(by_alias=True, exclude_none=True)
                cfg = SyncConfig.model_validate({**data, "verify": verify})
                before, started = _reads(admin), time.perf_counter()
                found = verify_run(cfg, cfg.location("default"), engine, "r1")
                wall = time.perf_counter() - started
                assert found is not None
                print(f"| {label} | {limit_name} | {found.sent} | {_reads(admin) - before} | "
                      f"{wall:.2f} s | {found.mismatched} |")  # fmt: skip


if __name__ == "__main__":
    main()
