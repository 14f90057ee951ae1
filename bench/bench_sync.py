"""Benchmarks of the sync library (issue 4).

(a) extract + diff: a table whose rows were all touched (updated_at bumped) but not changed.
(b) map + normalise + GX checks of changed rows on one core, with the GX share of the time.
(c) peak RSS of a whole sync (plan → batch → finalize) over the table; the upsert stage is
    an in-process fake that answers ``created`` (no HTTP), so the figure is the library's.

    python bench/bench_sync.py                   # 1M rows on PostgreSQL (127.0.0.1, db test)
    python bench/bench_sync.py --rows 50000      # a quick run
    python bench/bench_sync.py --db sqlite --only b

(a) and (c) each run in a fresh subprocess so their RSS is their own; (a) is also run as two
key-range batches in parallel processes, the shape of the DAG's mapped tasks. The PostgreSQL
schema (or SQLite file) is dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from growthhub_sync.config import SyncConfig, load_config, parse_config
from growthhub_sync.demo import COLUMNS, generate, seed_demo, touch_contacts

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = {"start": T0.isoformat(), "end": (T0 + timedelta(days=1)).isoformat()}
DAY2 = {"start": DAY["end"], "end": (T0 + timedelta(days=2)).isoformat()}
DAY3 = {"start": DAY2["end"], "end": (T0 + timedelta(days=3)).isoformat()}


class FakeUpserter:
    """Answers ``created`` for every row without any I/O."""

    def upsert_contacts(self, rows: Any, *, daily_reserve: int = 0) -> Iterator[Any]:
        from types import SimpleNamespace

        for n, (key, _payload) in enumerate(rows):
            yield SimpleNamespace(
                key=key,
                status="created",
                contact_id=f"c{key}-{n}",
                http_status=200,
                messages=[],
                trace_id=None,
                attempts=1,
            )


def _config(url: str, schema: str | None, work: Path, batch_size: int) -> SyncConfig:
    data = load_config().model_dump(by_alias=True, exclude_none=True)
    data["source"].update(url=url, schema=schema)
    data["state"] = {"schema": schema, "prefix": ""}
    data["locations"] = [{"name": "default", "location_id": "bench-location"}]
    data["quality"].update(results_dir=str(work / "gx" / "results"), data_docs_dir=str(work / "gx" / "docs"))
    data["batch_size"] = batch_size
    return parse_config(data, "bench")


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). ``ru_maxrss`` would also count the parent's memory at fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(args: argparse.Namespace, window: dict[str, Any], key_range: dict[str, Any]) -> dict[str, Any]:
    """One mapped-task's worth of work in its own process (stage a2)."""
    from growthhub_sync.pipeline import SyncOptions, sync_batch

    cfg = _config(args.url, args.schema, Path(args.work), args.batch_size)
    opts = SyncOptions(run_id=f"bench-{args.child}")
    out = sync_batch(
        cfg, "default", window, key_range, opts, engine=create_engine(args.url), upserter=FakeUpserter()
    )
    return {**out, "peak_rss_mb": _peak_rss_mb()}


def child(args: argparse.Namespace) -> None:
    """Run one sync (c: first sync of every row; a: rerun over touched rows; a2: a, as 2 parallel
    key-range batches the way the DAG's mapped tasks run it)."""
    from concurrent.futures import ProcessPoolExecutor

    from growthhub_sync.pipeline import SyncOptions, finalize_run, plan_sync, sync_batch

    cfg = _config(args.url, args.schema, Path(args.work), args.batch_size)
    engine = create_engine(args.url)
    window = {"c": DAY, "a": DAY2, "a2": DAY3}[args.child]
    opts = SyncOptions(run_id=f"bench-{args.child}")
    started = time.perf_counter()
    parallel = 2 if args.child == "a2" else 1
    # the bench brings its own upserter: no GrowthHub connection to check
    plan = plan_sync(
        cfg, "default", window, engine=engine, options=opts, batch_rows=10**12, check_connection=False
    )
    if parallel > 1:
        plan = plan_sync(
            cfg,
            "default",
            window,
            engine=engine,
            options=opts,
            batch_rows=-(-plan["total"] // parallel),
            check_connection=False,
        )
        engine.dispose()
        with ProcessPoolExecutor(parallel) as pool:
            futures = [pool.submit(_batch, args, plan["window"], b) for b in plan["batches"]]
            summaries = [f.result() for f in futures]
    else:
        summaries = [
            sync_batch(cfg, "default", plan["window"], b, opts, engine=engine, upserter=FakeUpserter())
            for b in plan["batches"]
        ]
    synced = time.perf_counter()
    rss_batches = _peak_rss_mb()
    out = finalize_run(
        cfg, "default", plan["window"], summaries, opts, engine=engine, upserter=FakeUpserter()
    )
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "rows": out["extracted"],
                "seconds": synced - started,
                "finalize_seconds": done - synced,
                "rows_per_s": out["extracted"] / (synced - started),
                "peak_rss_mb": max([_peak_rss_mb()] + [b.get("peak_rss_mb", 0) for b in summaries]),
                "peak_rss_mb_before_finalize": rss_batches,
                "batches": len(summaries),
                "counts": {
                    k: out[k]
                    for k in ("unchanged", "created", "updated", "quarantined", "rejected", "deferred")
                },
            }
        )
    )


def bench_b(rows: int, batch_size: int, work: Path) -> dict[str, Any]:
    """Map + normalise + GX checks on changed rows, single thread, in this process."""
    from growthhub_sync.checks import QualityChecker
    from growthhub_sync.mapping import Mapper

    cfg = _config("sqlite://", None, work, batch_size)
    cols = cfg.source_columns()
    order = [COLUMNS.index(c) for c in cols]
    data = [tuple(r[i] for i in order) for r in generate(rows, seed=7)]
    mapper = Mapper(cfg, cols)
    checker = QualityChecker(cfg, list(mapper.map(data[:1], "x").frame.columns))
    checker.validate(mapper.map(data[:10], "x").frame, [{}] * 10, "warmup")
    t_map = t_gx = 0.0
    failed = 0
    for i in range(0, rows, batch_size):
        t = time.perf_counter()
        batch = mapper.map(data[i : i + batch_size], "bench-location")
        t_map += time.perf_counter() - t
        t = time.perf_counter()
        failed += len(checker.validate(batch.frame, batch.reasons, f"bench-b__{i}").failures)
        t_gx += time.perf_counter() - t
    total = t_map + t_gx
    return {
        "rows": rows,
        "seconds": total,
        "rows_per_s": rows / total,
        "map_normalise_seconds": t_map,
        "gx_seconds": t_gx,
        "gx_share": t_gx / total,
        "rows_failing_checks": failed,
    }


def _spawn(stage: str, args: argparse.Namespace, schema: str | None, url: str, work: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        stage,
        "--url",
        url,
        "--work",
        str(work),
        "--batch-size",
        str(args.batch_size),
    ]
    if schema:
        cmd += ["--schema", schema]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"stage {stage} failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    p.add_argument("--only", choices=["a", "b", "c"], action="append", help="stages to run (default: all)")
    p.add_argument("--batch-size", type=int, default=5000)
    p.add_argument("--b-rows", type=int, default=100_000, help="rows for stage b (in memory)")
    p.add_argument("--child", choices=["a", "a2", "c"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--schema", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    if args.child:
        child(args)
        return
    stages = args.only or ["a", "b", "c"]
    results: dict[str, Any] = {
        "rows": args.rows,
        "db": args.db,
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="bench_sync_") as tmp:
        work = Path(tmp)
        if "b" in stages:
            results["b_map_normalise_checks"] = bench_b(min(args.b_rows, args.rows), args.batch_size, work)
            print(json.dumps({"b": results["b_map_normalise_checks"]}), flush=True)
        if {"a", "c"} & set(stages):
            schema = f"bench_{uuid.uuid4().hex[:8]}" if args.db == "postgresql" else None
            url = PG_URL if args.db == "postgresql" else f"sqlite:///{work / 'warehouse.db'}"
            engine = create_engine(url)
            try:
                t = time.perf_counter()
                seed_demo(engine, args.rows, schema=schema, start=T0)
                results["seed_seconds"] = time.perf_counter() - t
                print(json.dumps({"seeded": args.rows, "seconds": results["seed_seconds"]}), flush=True)
                # (c) the first sync of every row: the whole pipeline, fake upserter
                results["c_full_sync"] = _spawn("c", args, schema, url, work)
                print(json.dumps({"c": results["c_full_sync"]}), flush=True)
                touch_contacts(engine, T0 + timedelta(days=1, hours=1), schema=schema)
                if schema:  # what autovacuum does soon after a whole-table update: fresh planner stats
                    with engine.begin() as conn:
                        conn.execute(text(f'ANALYZE "{schema}".crm_contacts'))
                # (a) every row touched, none changed: extract + diff only
                results["a_touched_unchanged"] = _spawn("a", args, schema, url, work)
                print(json.dumps({"a": results["a_touched_unchanged"]}), flush=True)
                # (a) again, as two key-range batches in parallel processes (the DAG's mapped tasks)
                touch_contacts(engine, T0 + timedelta(days=2, hours=1), schema=schema)
                if schema:
                    with engine.begin() as conn:
                        conn.execute(text(f'ANALYZE "{schema}".crm_contacts'))
                results["a_touched_unchanged_2_batches"] = _spawn("a2", args, schema, url, work)
                print(json.dumps({"a2": results["a_touched_unchanged_2_batches"]}), flush=True)
            finally:
                if schema:
                    with engine.begin() as conn:
                        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                engine.dispose()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
