"""
Benchmark several worker processes sending to one GrowthHub location: ``local`` vs ``redis`` coordination.

One sandbox (the default limit of 100 requests per 10 s per location, 50 ms added latency per
request), one configuration after the other: 1, 2, 4 and 8 OS processes (``spawn``, as separate
Celery workers would be) upsert distinct contacts into one location, each through its own
``GrowthHubHook`` built from the same ``AIRFLOW_CONN_*`` connection, with the connection extra
``coordination`` set to ``local`` (each process limits itself, unaware of the others) or to the id
of a ``redis`` connection (one window shared by every process, through Redis).

Every configuration gets a fresh location (so a fresh window at the sandbox, and fresh Redis keys:
they are namespaced by API host and location). It sends ``(ceil(seconds / 10 s) + 1) * 100`` rows
(700 for 60 s: the first burst plus six windows at the limit), each process its share (every
N-th row, fed lazily to its ``upsert_contacts``), as each mapped task of a sync has its own chunk.
A whole number of windows, because the limiter lets one burst through per interval: completions
climb in steps, and a run cut mid-step (say at a deadline) would misread the steady rate by up to
a window.

Per configuration: rows ok, aggregate steady rate over the limit (all processes' completions
merged; steady = ``(n - burst) / (t[n] - t[burst])`` as in ``bench_hook.py``), the share of the
location's requests the sandbox answered 429 (its per-location timeline), the hook's retries and
the rows failed. Targets with Redis: >= 0.97 of the limit, <= 1 % 429, 0 failed at every process
count. Also the client CPU per row, Redis commands per row and their round trip, and the mean
time of the limiter's ``release`` (for Redis: one script call).

Usage::

    python bench/bench_coordination.py                  # full run: 8 configurations x 700 rows, ~9 minutes
    python bench/bench_coordination.py --quick          # smoke run: 300 rows (>= 20 s) per configuration
    python bench/bench_coordination.py --processes 1,8 --backends redis --seconds 30
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from bench_hook import _fresh

from growthhub_provider.client.settings import DEFAULT_MAX_WORKERS
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess

if TYPE_CHECKING:
    from collections.abc import Iterator
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event

CONN_ID = "growthhub_bench"  # what bench_hook._fresh defines as AIRFLOW_CONN_GROWTHHUB_BENCH
REDIS_CONN_ID = "growthhub_bench_redis"
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 11
LIMIT = {"burst": 100, "intervalMs": 10_000, "daily": 200_000}
LIMIT_RPS = LIMIT["burst"] / (LIMIT["intervalMs"] / 1000)
LATENCY_MS = 50
UPSERT = "POST /contacts/upsert"
OK = ("created", "updated")


@dataclass
class Config:
    backend: str
    processes: int
    location: str
    rows_ok: int = 0
    rows_failed: int = 0
    other: Counter[str] = field(default_factory=Counter)  # rejected / skipped
    steady: float = 0.0
    requests: int = 0
    answered_429: int = 0
    retried: int = 0
    throttled: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    counters: Counter[str] = field(default_factory=Counter)  # limiter and Redis calls, summed
    errors: list[str] = field(default_factory=list)

    @property
    def share_429(self) -> float:
        return self.answered_429 / self.requests if self.requests else 0.0

    @property
    def of_limit(self) -> float:
        return self.steady / LIMIT_RPS

    @property
    def verdict(self) -> str:
        ok = self.of_limit >= 0.97 and self.share_429 <= 0.01 and self.rows_failed == 0 and not self.errors
        word = "PASS" if ok else "MISS"
        return word if self.backend == "redis" else f"({word})"  # the targets are Redis's


# -- one worker process ---------------------------------------------------------------------------


def _rows(proc: int, processes: int, location: str, total: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """This process's share of the rows (every ``processes``-th), built as the client pulls them."""
    for i in range(proc, total, processes):
        yield str(i), {"locationId": location, "email": f"{i}@{location}.example.com", "firstName": f"N{i}"}


def _instrument(hook: Any, counters: Counter[str]) -> None:
    """Count the limiter's calls and their time, and the Redis commands this process sends."""
    import redis

    limiter = hook.limiter  # connection, coordination (Redis connection) and limiter built now
    for name in ("acquire", "release"):
        original = getattr(limiter, name)

        def timed(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                counters[f"{_name}_calls"] += 1
                counters[f"{_name}_s"] += time.perf_counter() - started

        setattr(limiter, name, timed)

    execute = redis.Redis.execute_command

    def counted(self: Any, *args: Any, **options: Any) -> Any:
        started = time.perf_counter()
        try:
            return execute(self, *args, **options)
        finally:
            counters["redis_calls"] += 1
            counters["redis_s"] += time.perf_counter() - started

    redis.Redis.execute_command = counted  # type: ignore[method-assign]


def _worker(
    proc: int,
    processes: int,
    location: str,
    total: int,
    start_at: Any,
    ready: Queue,
    go: Event,
    results: Queue,
) -> None:
    """Build a hook as a Celery worker would, wait for the start, upsert its share of the rows, report."""
    report: dict[str, Any] = {"proc": proc, "done": [], "statuses": {}, "stats": None, "error": None}
    signalled = False
    try:
        from growthhub_provider.hooks.growthhub import GrowthHubHook

        hook = GrowthHubHook(CONN_ID)
        counters: Counter[str] = Counter()
        _instrument(hook, counters)
        ready.put(proc)
        signalled = True
        go.wait()
        time.sleep(max(start_at.value - time.time(), 0))
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        counters.clear()
        statuses: Counter[str] = Counter()
        try:
            for outcome in hook.upsert_contacts(_rows(proc, processes, location, total)):
                statuses[outcome.status] += 1
                if outcome.status in OK:
                    report["done"].append(time.time())
        finally:
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            report["cpu_s"] = cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
            report["counters"] = dict(counters)
            report["statuses"] = dict(statuses)
            stats = hook.last_batch_stats
            report["stats"] = asdict(stats) if stats else None
    except BaseException as e:  # reported, not raised: the parent prints every process's fate
        report["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        if not signalled:  # never leave the parent waiting for a process that failed to start
            ready.put(proc)
    results.put(report)


# -- the parent -----------------------------------------------------------------------------------


def _redis() -> Any:
    import redis

    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=5)


def _clean_redis(base_url: str, locations: list[str]) -> int:
    """Delete the coordination keys of this run's locations (``growthhub:{<host>|<location>}:*``)."""
    client = _redis()
    deleted = 0
    for location in locations:
        keys = list(client.scan_iter(match=f"growthhub:{{{base_url}|{location}}}:*", count=1000))
        if keys:
            deleted += client.delete(*keys)
    return deleted


def _use_backend(backend: str) -> None:
    """Point the hook's connection (defined by ``_fresh``) at the backend."""
    conn = json.loads(os.environ["AIRFLOW_CONN_GROWTHHUB_BENCH"])
    conn["extra"]["coordination"] = REDIS_CONN_ID if backend == "redis" else "local"
    os.environ["AIRFLOW_CONN_GROWTHHUB_BENCH"] = json.dumps(conn)


def run_config(admin: SandboxAdmin, backend: str, processes: int, total: int, workers: int | None) -> Config:
    location = _fresh(admin, LIMIT, latency_ms=LATENCY_MS, workers=workers)
    _use_backend(backend)
    result = Config(backend, processes, location)
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=_worker, args=(p, processes, location, total, start_at, ready, go, results))
        for p in range(processes)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)  # importing Airflow takes a few CPU seconds per process
    start_at.value = time.time() + 0.5
    go.set()
    # before join: a full queue would block the child's exit; a process killed outright never reports
    reports = [results.get(timeout=30 * total / LIMIT_RPS + 300) for _ in procs]
    for p in procs:
        p.join()
    result.seconds = time.time() - start_at.value

    done: list[float] = []
    for report in reports:
        done += report["done"]
        statuses = Counter(report["statuses"])
        result.rows_ok += sum(statuses[s] for s in OK)
        result.rows_failed += statuses["failed"]
        result.other += Counter({s: n for s, n in statuses.items() if s not in (*OK, "failed")})
        result.cpu_s += report.get("cpu_s", 0.0)
        result.counters.update(report.get("counters", {}))
        if report["stats"]:
            result.retried += report["stats"]["retried"]
            result.throttled += report["stats"]["throttled"]
        if report["error"]:
            result.errors.append(f"process {report['proc']}: {report['error']}")
    done.sort()
    burst = LIMIT["burst"]
    if len(done) > burst:
        result.steady = (len(done) - burst) / (done[-1] - done[burst - 1])
    answers: Counter[str] = Counter()
    for bucket in admin.timeline(location, endpoint=UPSERT):
        answers.update(bucket["answers"])
    result.requests = sum(answers.values())
    result.answered_429 = answers["429"]
    stored = len(admin.contacts(location))
    if stored != result.rows_ok:
        result.errors.append(f"{stored} contacts stored for {result.rows_ok} rows ok")
    return result


def _print_row(r: Config) -> None:
    c, rows = r.counters, max(r.rows_ok, 1)
    extra = f"  {r.cpu_s * 1000 / rows:.2f} ms CPU/row"
    if c["redis_calls"]:
        per_call = c["redis_s"] * 1000 / c["redis_calls"]
        extra += f", {c['redis_calls'] / rows:.1f} Redis calls/row of {per_call:.2f} ms"
    if c["release_calls"]:
        extra += f", release {c['release_s'] * 1000 / c['release_calls']:.2f} ms"
    if r.throttled:
        extra += f", hooks saw {r.throttled} x 429"
    if r.other:
        extra += f", {dict(r.other)}"
    print(
        f"{r.backend:<7} {r.processes:>5} {r.rows_ok:>7} {r.steady:>8.2f} {r.of_limit:>8.3f} "
        f"{r.answered_429:>5}/{r.requests:<6} {r.share_429:>6.1%} {r.retried:>7} {r.rows_failed:>6} "
        f"{r.seconds:>6.1f}  {r.verdict:<6}{extra}",
        flush=True,
    )
    for error in r.errors:
        print(f"        ! {error}", flush=True)


HEADER = (
    f"{'backend':<7} {'procs':>5} {'rows ok':>7} {'rows/s':>8} {'of limit':>8} "
    f"{'429/requests':>12} {'429 %':>6} {'retried':>7} {'failed':>6} {'s':>6}  target"
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: --seconds 15")
    parser.add_argument("--seconds", type=float, default=None, help="seconds at the limit per config (60)")
    parser.add_argument("--processes", default="1,2,4,8", help="comma-separated process counts")
    parser.add_argument("--backends", default="local,redis", help="comma-separated: local, redis")
    parser.add_argument(
        "--workers", type=int, default=None, help="max_workers of each process's hook (connection default)"
    )
    args = parser.parse_args()
    seconds = args.seconds or (15.0 if args.quick else 60.0)
    # Whole windows: the limiter lets a burst through per interval, so completions climb in steps
    # and a run cut mid-step would misread the steady rate. One more window for the first burst.
    windows = math.ceil(seconds / (LIMIT["intervalMs"] / 1000)) + 1
    total = windows * LIMIT["burst"]
    processes = [int(p) for p in args.processes.split(",") if p]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := set(backends) - {"local", "redis"}:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")

    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"  # no batch summary line per process
    os.environ[f"AIRFLOW_CONN_{REDIS_CONN_ID.upper()}"] = json.dumps(
        {"conn_type": "redis", "host": REDIS_HOST, "port": REDIS_PORT, "extra": {"db": REDIS_DB}}
    )
    if "redis" in backends:
        _redis().ping()  # fail early and clearly when Redis is not there
    load = os.getloadavg()[0]
    print(
        f"{len(backends) * len(processes)} configurations x {total} rows (>= {seconds:g} s at the limit); "
        f"limit {LIMIT['burst']} per "
        f"{LIMIT['intervalMs'] / 1000:g} s ({LIMIT_RPS:g} rows/s), {LATENCY_MS} ms latency, "
        f"{args.workers or DEFAULT_MAX_WORKERS} workers per process; Redis db {REDIS_DB}; "
        f"load average {load:.2f}",
        flush=True,
    )
    print(HEADER, flush=True)
    results: list[Config] = []
    with SandboxProcess(args=["--log-level", "warning"]) as server:
        admin = SandboxAdmin(server.base_url)
        try:
            for backend in backends:
                for n in processes:
                    results.append(run_config(admin, backend, n, total, args.workers))
                    _print_row(results[-1])
        finally:
            if "redis" in backends:
                # every location this run defined (an interrupted configuration's too)
                locations = [r.location for r in results]
                if conn := os.environ.get("AIRFLOW_CONN_GROWTHHUB_BENCH"):
                    locations.append(json.loads(conn)["extra"]["location_id"])
                deleted = _clean_redis(server.base_url, sorted(set(locations)))
                print(f"\nRedis db {REDIS_DB}: deleted the run's {deleted} coordination keys")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    redis_results = [r for r in results if r.backend == "redis"]
    return 0 if all(r.verdict == "PASS" for r in redis_results) else 1


if __name__ == "__main__":
    sys.exit(main())
