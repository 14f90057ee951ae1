"""python -m growthhub_sync: seed the demo table, run a sync or a replay without Airflow's scheduler.

The warehouse comes from --url, else from the config (source.url, or the Airflow connection
source.conn_id). GrowthHub comes from the location's Airflow connection (growthhub_default by
default), e.g. defined as AIRFLOW_CONN_GROWTHHUB_DEFAULT, as in a task.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import create_engine

from growthhub_sync.config import ConfigError, MissingConnectionError, load_config
from growthhub_sync.demo import seed_demo
from growthhub_sync.fleet import sync_all
from growthhub_sync.pipeline import SyncOptions, replay_quarantine, sync
from growthhub_sync.reasons import REASONS, is_code
from growthhub_sync.upsert import require_connection
from growthhub_sync.warehouse import get_engine

USAGE_ERROR = 2  # argparse's exit status for a command line it cannot run


def _reason_code(name: str) -> str:
    if not is_code(name):
        raise argparse.ArgumentTypeError(f"unknown reason code {name!r}; known: {', '.join(REASONS)}")
    return name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m growthhub_sync",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="sync config YAML (default: $GROWTHHUB_SYNC_CONFIG or the shipped one)")
    p.add_argument("--url", help="warehouse SQLAlchemy URL (default: from the config / Airflow connection)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    seed = sub.add_parser("seed-demo", help="(re)create crm_contacts with generated contacts")
    seed.add_argument("--rows", type=int, default=10_000, help="contacts to generate (default: %(default)s)")
    seed.add_argument("--seed", type=int, default=42, help="random seed: same seed, same rows")
    seed.add_argument("--schema", help="schema of the table (default: the database's default)")
    run = sub.add_parser("sync", help="sync one location's window")
    replay = sub.add_parser("replay", help="re-check and re-send open quarantine rows")
    for sp in (run, replay):
        sp.add_argument("--location", default=None, help="location name (default: the first)")
        sp.add_argument("--run-id", default=None, help="id of the run row (default: cli__<now>)")
        sp.add_argument(
            "--dry-run",
            action="store_true",
            help="count and check, send nothing, leave ledger and quarantine as they are",
        )
    run.add_argument("--start", help="window start (ISO 8601); default: open")
    run.add_argument("--end", help="window end (ISO 8601); default: open")
    run.add_argument(
        "--full-refresh", action="store_true", help="every row of the window, even those synced unchanged"
    )
    replay.add_argument(
        "--stage", choices=["quality", "api"], help="only rows refused by the checks or by the API"
    )
    replay.add_argument(
        "--reason",
        action="append",
        default=[],
        type=_reason_code,
        help="only rows with this reason code (repeatable: any of them), e.g. email_invalid",
    )
    replay.add_argument(
        "--key", action="append", default=[], help="only the row of this source key (repeatable)"
    )
    replay.add_argument("--max-rows", type=int, help="at most this many rows, oldest first (default: all)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "seed-demo":
        if not args.url:
            p.error("seed-demo needs --url")
        print(
            json.dumps(
                {"rows": seed_demo(create_engine(args.url), args.rows, schema=args.schema, seed=args.seed)}
            )
        )
        return
    try:
        out = _run(args)
    except MissingConnectionError as e:
        define = f"define the Airflow connection {e.conn_id!r} ({e.key}), e.g. as {e.env_var}"
        if e.key == "source.conn_id":
            p.exit(USAGE_ERROR, f"{p.prog}: error: no warehouse: pass --url or {define}\n")
        p.exit(USAGE_ERROR, f"{p.prog}: error: no GrowthHub connection: {define}, or use --dry-run\n")
    except ConfigError as e:
        p.exit(USAGE_ERROR, f"{p.prog}: error: {e}\n")
    print(json.dumps(out, indent=2, default=str))


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``sync`` or ``replay``; connections are checked before anything is read or sent."""
    config = load_config(args.config)
    engine = create_engine(args.url) if args.url else get_engine(config)
    location = args.location or config.locations[0].name
    if not args.dry_run:
        require_connection(config.location(location))
    run_id = args.run_id or f"cli__{datetime.now(UTC).isoformat()}"
    if args.command == "sync":
        opts = SyncOptions(run_id=run_id, dry_run=args.dry_run, full_refresh=args.full_refresh, dag_id="cli")
        window = {"start": args.start, "end": args.end}
        if config.deletes.mode != "ignore":  # deletions (and their guard) are planned as in the DAG
            out = sync_all(config, window, opts, engine=engine, requested=[location])
            return out["results"][0] if out["results"] else {"location": location, "extracted": 0}
        return sync(config, location, window, opts, engine=engine)
    opts = SyncOptions(run_id=run_id, dry_run=args.dry_run, dag_id="cli")
    return replay_quarantine(
        config,
        location,
        opts,
        stage=args.stage,
        reason=args.reason,
        keys=args.key,
        max_rows=args.max_rows,
        engine=engine,
    )


if __name__ == "__main__":
    main()
