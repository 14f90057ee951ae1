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
    python bench/bench_fleet_client.py --workers 8             # 8 worker threads per client
    python bench/bench_fleet_client.py --locations 1 --rows 4000 --burst 100000 --latency-ms 0  # one client
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

DEFAULT_LIMIT = LimitSettings()  # GrowthHub's default: 100 requests per 10 s per location


def _process_cpu_s() -> float:
    """User + system CPU of this process, every thread included (not the sandbox's)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _profile_new_threads() -> list[cProfile.Profile]:
    """A profiler in every thread started from now on (the clients' workers): merged at the end.

    Timed by each thread's own CPU clock: waiting on a lock, a queue or a socket costs nothing,
    so the figures say where the CPU goes rather than where the threads sleep.
    """
    profiles: list[cProfile.Profile] = []

    def start(*_: object) -> None:
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.enable()  # replaces this hook in the new thread

    threading.setprofile(start)
    return profiles


# Where a function's file lies decides its group in the profile summary; first match wins.
PROFILE_GROUPS = (
    ("requests", "/requests/"),
    ("urllib3", "/urllib3/"),
    ("http.client + email", "/http/"),
    ("http.client + email", "/email/"),
    ("tenacity", "/tenacity/"),
    ("threading, queues, futures", "threading.py"),
    ("threading, queues, futures", "/concurrent/"),
    ("threading, queues, futures", "queue.py"),
    ("our code", "growthhub_provider"),
    ("json", "/json/"),
    ("logging", "/logging/"),
    ("socket, ssl, selectors", "socket.py"),
    ("socket, ssl, selectors", "selectors.py"),
)


def print_by_group(stats: pstats.Stats, upserts: int) -> None:
    """Own time and calls per upsert by library, so the cost of each layer reads at a glance."""
    seconds: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for (filename, _, name), (_, ncalls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        group = next(
            (g for g, part in PROFILE_GROUPS if part in filename), "builtins" if filename == "~" else "other"
        )
        if group == "builtins" and ("lock" in name or "acquire" in name or "wait" in name):
            group = "locks (builtin)"
        seconds[group] += tottime
        calls[group] += ncalls
    total = sum(seconds.values())
    print(f"{'group':<28} {'ms/upsert':>9} {'share':>6} {'calls/upsert':>12}  (profiled: slower)")
    for group, spent in seconds.most_common():
        per = max(upserts, 1)
        print(f"{group:<28} {1000 * spent / per:9.3f} {spent / total:6.1%} {calls[group] / per:12.0f}")


def _set_up(admin: SandboxAdmin, locations: int, latency_ms: float, limit: LimitSettings) -> list[str]:
    """``locations`` fresh locations at ``limit``, each with token ``tok-<location>``."""
    admin.reset()
    names = [f"fleet-{i:03d}" for i in range(locations)]
    rate_limit = {"burst": limit.burst, "intervalMs": int(limit.interval_s * 1000), "daily": limit.daily}
    for name in names:
        admin.put_location(name, duplicateCheckFields=["email", "phone"], rateLimit=rate_limit)
        admin.add_token(token=f"tok-{name}", locationId=name, scopes=["contacts.write"])
    admin.set_faults(latency_ms=latency_ms)
    return names


def _drive(
    base_url: str, names: list[str], rows: int, token_dir: Path, limit: LimitSettings, workers: int | None
) -> tuple[Counter[str], int, float]:
    """One thread per location, each upserting ``rows`` rows; ``(outcomes, 429s, wall seconds)``."""
    sizing = {"max_workers": workers} if workers else {}
    clients = [
        GrowthHubClient(
            ClientConfig(base_url, name=name, token=f"tok-{name}", location_id=name, limits=limit, **sizing),
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
    parser.add_argument(
        "--burst", type=int, default=DEFAULT_LIMIT.burst, help="requests per 10 s per location"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="worker threads per client (default: the client's)"
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N functions")
    args = parser.parse_args()
    limit = LimitSettings(burst=args.burst, daily=max(200_000, 2 * args.rows))
    logging.getLogger("growthhub_provider").setLevel(logging.WARNING)

    with SandboxProcess(args=["--log-level", "warning"]) as server, tempfile.TemporaryDirectory() as tmp:
        admin = SandboxAdmin(server.base_url)
        names = _set_up(admin, args.locations, args.latency_ms, limit)
        profiles = _profile_new_threads() if args.profile else []
        cpu_before = _process_cpu_s()
        outcomes, throttled, elapsed = _drive(
            server.base_url, names, args.rows, Path(tmp), limit, args.workers
        )
        cpu = _process_cpu_s() - cpu_before
        stored = sum(len(admin.contacts(name)) for name in names)

    upserts = outcomes["created"] + outcomes["updated"]
    limit_rate = args.locations * limit.burst / limit.interval_s
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
        print_by_group(stats, upserts)
        stats.sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
