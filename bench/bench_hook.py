"""
Benchmark the GrowthHub hook against the sandbox, side by side with a naive ``HttpHook`` loop.

Scenarios (one process run, one sandbox started on a free loopback port):

A. 50 ms of added latency per request, no rate limit: upserts/s of the naive loop (one
   ``HttpHook.run`` per row, serially) and of ``GrowthHubHook.upsert_contacts``; their ratio.
B. The default limit of 100 requests per 10 s (plus the same 50 ms latency) for at least 60 s:
   the hook's steady rate over the configured limit, lost rows and the share of requests
   answered 429; the naive loop for comparison.

Steady rate: rows completed after the first burst divided by the time from the end of the first
burst to the last completion, i.e. ``(n - burst) / (t[n] - t[burst])``. A full window is free at
the start of any fixed- or sliding-window limit, so ``n / elapsed`` would overstate the rate.

Usage::

    python bench/bench_hook.py            # full run, about 2.5 minutes
    python bench/bench_hook.py --quick    # smoke run, about 20 seconds
    python bench/bench_hook.py --workers 16,32,64,96   # tune the default worker count
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess

if TYPE_CHECKING:
    from collections.abc import Iterator

TOKEN = "pit-bench-token-0001"
LOCATION = "bench"  # a fresh location per run: a process keeps one limiter per location
UNLIMITED = {"burst": 1_000_000_000, "intervalMs": 10_000, "daily": 1_000_000_000}


@dataclass
class Result:
    scenario: str
    client: str
    rows: int
    ok: int
    elapsed_s: float
    rate: float
    note: str = ""


def _define_connections(base_url: str, location: str, workers: int | None, limit: dict[str, int]) -> None:
    extra: dict[str, Any] = {"location_id": location}
    if workers:
        extra["max_workers"] = workers
    if limit["burst"] != 100 or limit["intervalMs"] != 10_000:
        # Not the connection's default limit: say so, as for a location with other limits.
        extra |= {"rate_limit_burst": limit["burst"], "rate_limit_interval_ms": limit["intervalMs"]}
    os.environ["AIRFLOW_CONN_GROWTHHUB_BENCH"] = json.dumps(
        {"conn_type": "growthhub", "host": base_url, "password": TOKEN, "extra": extra}
    )
    # What a team writes first: an http connection whose extras become the request headers.
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Version": "2023-02-21",
        "Content-Type": "application/json",
    }
    os.environ["AIRFLOW_CONN_GROWTHHUB_NAIVE"] = json.dumps(
        {"conn_type": "http", "host": base_url, "extra": headers}
    )


def _rows(n: int, location: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for i in range(n):
        yield str(i), {"locationId": location, "email": f"{i}@{location}.example.com", "firstName": f"N{i}"}


def _fresh(
    admin: SandboxAdmin, rate_limit: dict[str, int], latency_ms: float, workers: int | None = None
) -> str:
    """Reset the sandbox, create a new location with its token, point both connections at it."""
    location = f"{LOCATION}-{uuid.uuid4().hex[:8]}"
    admin.reset()
    admin.put_location(location, duplicateCheckFields=["email", "phone"], rateLimit=rate_limit)
    admin.add_token(token=TOKEN, locationId=location, scopes=["contacts.write", "contacts.readonly"])
    admin.set_faults(latency_ms=latency_ms)
    _define_connections(admin.base_url, location, workers, rate_limit)
    return location


def run_naive(n: int, location: str, max_seconds: float) -> tuple[int, int, int, float]:
    """One ``HttpHook.run`` per row, serially; ``(sent, ok, answered_429, elapsed)``."""
    from airflow.providers.common.compat.sdk import AirflowException
    from airflow.providers.http.hooks.http import HttpHook

    hook = HttpHook(method="POST", http_conn_id="growthhub_naive")
    sent = ok = throttled = 0
    started = time.monotonic()
    for _, payload in _rows(n, location):
        if time.monotonic() - started > max_seconds:
            break
        sent += 1
        try:
            hook.run("/contacts/upsert", json=payload)
            ok += 1
        except AirflowException as e:
            throttled += str(e).startswith("429")
    return sent, ok, throttled, time.monotonic() - started


def run_hook(n: int, location: str) -> tuple[Any, list[float], dict[str, int]]:
    """``GrowthHubHook.upsert_contacts``; ``(stats, completion times, statuses)``."""
    from growthhub_provider.hooks.growthhub import GrowthHubHook

    hook = GrowthHubHook("growthhub_bench")
    started = time.monotonic()
    done: list[float] = []
    statuses: dict[str, int] = {}
    for outcome in hook.upsert_contacts(_rows(n, location)):
        done.append(time.monotonic() - started)
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    return hook.last_batch_stats, done, statuses


def scenario_latency(admin: SandboxAdmin, quick: bool, workers: list[int | None]) -> list[Result]:
    results = []
    location = _fresh(admin, UNLIMITED, latency_ms=50)
    naive_rows = 40 if quick else 300
    sent, ok, _, elapsed = run_naive(naive_rows, location, max_seconds=60)
    naive_rate = ok / elapsed
    results.append(Result("A: 50 ms latency", "naive HttpHook.run loop", sent, ok, elapsed, naive_rate))
    for w in workers:
        location = _fresh(admin, UNLIMITED, latency_ms=50, workers=w)
        n = 600 if quick else 4000
        stats, _done, statuses = run_hook(n, location)
        rate = statuses.get("created", 0) / stats.elapsed_s
        label = f"GrowthHubHook ({w or 'default'} workers)"
        note = f"{rate / naive_rate:.0f}x naive"
        results.append(
            Result("A: 50 ms latency", label, n, statuses.get("created", 0), stats.elapsed_s, rate, note)
        )
        lost = n - len(admin.contacts(location))
        if lost:
            results[-1].note += f", {lost} LOST"
    return results


def scenario_rate_limit(admin: SandboxAdmin, quick: bool) -> list[Result]:
    burst, interval_ms = (20, 2_000) if quick else (100, 10_000)
    windows = 3 if quick else 7  # n = windows * burst rows span (windows - 1) intervals: >= 60 s in full
    limit = {"burst": burst, "intervalMs": interval_ms, "daily": 200_000}
    configured = burst / (interval_ms / 1000)
    results = []

    location = _fresh(admin, limit, latency_ms=50)
    sent, ok, throttled, elapsed = run_naive(10**6, location, max_seconds=(interval_ms / 1000) * 2)
    results.append(
        Result(
            "B: 100 per 10 s" if not quick else f"B: {burst} per {interval_ms / 1000:.0f} s",
            "naive HttpHook.run loop",
            sent,
            ok,
            elapsed,
            ok / elapsed,
            f"{ok / elapsed / configured:.2f} of limit, {sent - ok} rows lost, {throttled / sent:.0%} 429",
        )
    )

    location = _fresh(admin, limit, latency_ms=50)
    n = windows * burst
    stats, done, statuses = run_hook(n, location)
    steady = (n - burst) / (done[-1] - done[burst - 1])
    requests_sent = stats.sent + stats.retried
    stored = len(admin.contacts(location))
    results.append(
        Result(
            results[0].scenario,
            "GrowthHubHook",
            n,
            statuses.get("created", 0),
            stats.elapsed_s,
            steady,
            f"{steady / configured:.3f} of limit, {n - stored} rows lost, "
            f"{stats.throttled}/{requests_sent} = {stats.throttled / requests_sent:.1%} 429",
        )
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--workers", default="", help="comma-separated worker counts for scenario A")
    parser.add_argument("--skip-rate-limit", action="store_true", help="only scenario A")
    args = parser.parse_args()
    workers: list[int | None] = [int(w) for w in args.workers.split(",") if w] or [None]
    logging.getLogger("airflow.task.hooks").setLevel(logging.WARNING)

    with SandboxProcess(args=["--log-level", "warning"]) as server:
        admin = SandboxAdmin(server.base_url)
        results = scenario_latency(admin, args.quick, workers)
        if not args.skip_rate_limit:
            results += scenario_rate_limit(admin, args.quick)

    print(f"\n{'scenario':<18} {'client':<32} {'rows':>6} {'ok':>6} {'seconds':>8} {'rows/s':>8}  note")
    for r in results:
        figures = f"{r.rows:>6} {r.ok:>6} {r.elapsed_s:>8.1f} {r.rate:>8.1f}"
        print(f"{r.scenario:<18} {r.client:<32} {figures}  {r.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
