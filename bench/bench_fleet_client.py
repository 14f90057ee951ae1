"""
CPU of the GrowthHub client per upsert when one process drives many locations at once (an agency).

Starts the sandbox in its own process with ``--locations`` locations, each with its own token
and the default limit (100 requests per 10 s), adds ``--latency-ms`` to every answer, then runs
one thread per location calling ``GrowthHubClient.upsert_contacts`` on ``--rows`` rows, as a
multi-location task would. The CPU figure is this process's only (the sandbox is another one):
what the client costs per upsert, and so how many upserts/s one core can drive.

Usage::

    python bench/bench_fleet_client.py                         # 100 locations x 250 rows, ~25 s
    python bench/bench_fleet_client.py --locations 10 --rows 150   # smoke run
    python bench/bench_fleet_client.py --profile 40            # plus the top 40 functions by tottime
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench_hook import _rows

from growthhub_provider.client import ClientConfig, GrowthHubClient, LimitSettings, LocalCoordination
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess

LIMIT = LimitSettings()  # GrowthHub's default: 100 requests per 10 s per location


def _process_cpu_s() -> float:
    """User + system CPU of this process, every thread included (not the sandbox's)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _profile_new_threads() -> list[cProfile.Profile]:
    """A profiler in every thread started from now on (the clients' workers): merged at the end."""
    profiles: list[cProfile.Profile] = []

    def start(*_: object) -> None:
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()  # replaces this hook in the new thread

    threading.setprofile(start)
    return profiles


def _set_up(admin: SandboxAdmin, locations: int, latency_ms: float) -> list[str]:
    """``locations`` fresh locations at the default limit, each with token ``tok-<location>``."""
    admin.reset()
    names = [f"fleet-{i:03d}" for i in range(locations)]
    rate_limit = {"burst": LIMIT.burst, "intervalMs": int(LIMIT.interval_s * 1000), "daily": 200_000}
    for name in names:
        admin.put_location(name, duplicateCheckFields=["email", "phone"], rateLimit=rate_limit)
        admin.add_token(token=f"tok-{name}", locationId=name, scopes=["contacts.write"])
    admin.set_faults(latency_ms=latency_ms)
    return names


def _drive(base_url: str, names: list[str], rows: int, token_dir: Path) -> tuple[Counter[str], int, float]:
    """One thread per location, each upserting ``rows`` rows; ``(outcomes, 429s, wall seconds)``."""
    clients = [
        GrowthHubClient(
            ClientConfig(base_url, name=name, token=f"tok-{name}", location_id=name, limits=LIMIT),
            coordination=LocalCoordination(base_url, name, token_dir / "tokens.json"),
        )
        for name in names
    ]
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def run(client: GrowthHubClient) -> None:
        counted = Counter(o.status for o in client.upsert_contacts(_rows(rows, client.location_id or "")))
        with lock:
            outcomes.update(counted)

    threads = [threading.Thread(target=run, args=(client,)) for client in clients]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    throttled = sum(c.last_batch_stats.throttled for c in clients if c.last_batch_stats)
    return outcomes, throttled, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--locations", type=int, default=100)
    parser.add_argument("--rows", type=int, default=250, help="rows per location")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N functions")
    args = parser.parse_args()
    logging.getLogger("growthhub_provider").setLevel(logging.WARNING)

    with SandboxProcess(args=["--log-level", "warning"]) as server, tempfile.TemporaryDirectory() as tmp:
        admin = SandboxAdmin(server.base_url)
        names = _set_up(admin, args.locations, args.latency_ms)
        profiles = _profile_new_threads() if args.profile else []
        cpu_before = _process_cpu_s()
        outcomes, throttled, elapsed = _drive(server.base_url, names, args.rows, Path(tmp))
        cpu = _process_cpu_s() - cpu_before
        stored = sum(len(admin.contacts(name)) for name in names)

    upserts = outcomes["created"] + outcomes["updated"]
    limit_rate = args.locations * LIMIT.burst / LIMIT.interval_s
    figures = {
        "locations": args.locations,
        "upserts": upserts,
        "outcomes": dict(outcomes),
        "contacts stored": stored,
        "wall s": round(elapsed, 1),
        "upserts/s": round(upserts / elapsed, 1),
        "sum of limits /s": round(limit_rate, 1),
        "share of limits": round(upserts / elapsed / limit_rate, 3),
        "429s": throttled,
        "client CPU s": round(cpu, 2),
        "client CPU ms/upsert": round(1000 * cpu / max(upserts, 1), 3),
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if profiles:
        threading.setprofile(None)
        stats = pstats.Stats(*profiles)
        stats.dump_stats(Path(tempfile.gettempdir()) / "bench_fleet_client.pstats")
        stats.sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
