"""Quarantine retention: purge old quarantine rows, which hold contacts' personal data.

Quarantine rows keep the rejected payload (names, email, phone, birth date, address) and the
API's error messages (which may quote them). Resolved and ignored rows are history only; open
rows are work still to do and are kept unless ``include_open`` says otherwise.

::

    python -m growthhub_sync.retention --older-than-days 30 [--location NAME] [--include-open] [--dry-run]

Age is measured on ``resolved_at`` for closed rows and on ``last_seen_at`` for open ones.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import and_, delete, func, or_, select

from growthhub_sync import state

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

DEFAULT_STATUSES = ("resolved", "ignored")


def purge_quarantine(
    engine: Engine,
    tables: state.StateTables,
    *,
    older_than: timedelta | None,
    location: str | None = None,
    statuses: Sequence[str] = DEFAULT_STATUSES,
    include_open: bool = False,
    dry_run: bool = False,
) -> int:
    """Delete (or with ``dry_run`` count) quarantine rows; returns how many match.

    :param older_than: only rows closed (open rows: last seen) longer ago than this; ``None``: any age.
    :param location: only this location's rows (the config's location *name*); ``None``: all.
    :param statuses: closed statuses to purge; ``open`` here is ignored unless ``include_open``.
    :param include_open: purge open rows too (they are then never replayed).
    """
    if older_than is not None and older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    q = tables.quarantine
    wanted = {s for s in statuses if s != "open"}
    if include_open:
        wanted.add("open")
    if not wanted:
        return 0
    conds = [q.c.status.in_(sorted(wanted))]
    if location is not None:
        conds.append(q.c.location == location)
    if older_than is not None:
        cutoff = state.utcnow() - older_than
        conds.append(
            or_(
                and_(q.c.status == "open", q.c.last_seen_at < cutoff),
                and_(q.c.status != "open", func.coalesce(q.c.resolved_at, q.c.last_seen_at) < cutoff),
            )
        )
    where = and_(*conds)
    with engine.begin() as conn:
        if dry_run:
            n = conn.execute(select(func.count()).select_from(q).where(where)).scalar_one()
        else:
            n = conn.execute(delete(q).where(where)).rowcount or 0
    log.info(
        "quarantine purge%s: %d rows (statuses %s, location %s, older than %s)",
        " (dry run)" if dry_run else "",
        n,
        sorted(wanted),
        location or "any",
        older_than,
    )
    return n


def main(argv: list[str] | None = None) -> int:
    from growthhub_sync.config import load_config
    from growthhub_sync.warehouse import get_engine

    p = argparse.ArgumentParser(
        prog="python -m growthhub_sync.retention", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--config", help="sync config YAML (default: $GROWTHHUB_SYNC_CONFIG or the shipped one)")
    p.add_argument("--url", help="warehouse SQLAlchemy URL (default: from the config / Airflow connection)")
    p.add_argument(
        "--older-than-days", type=float, required=True, help="purge rows closed longer ago than this"
    )
    p.add_argument("--location", help="only this location name (default: every location)")
    p.add_argument(
        "--status", action="append", choices=["resolved", "ignored"], help="repeatable; default both"
    )
    p.add_argument(
        "--include-open", action="store_true", help="purge open rows too (they will not be replayed)"
    )
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    args = p.parse_args(argv)
    if args.older_than_days < 0:
        p.error("--older-than-days must not be negative")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    if args.location is not None:
        config.location(args.location)  # an unknown name fails here, naming the known ones
    from sqlalchemy import create_engine

    engine = create_engine(args.url) if args.url else get_engine(config)
    tables = state.state_tables(config.state)
    state.ensure_state(engine, tables)
    n = purge_quarantine(
        engine,
        tables,
        older_than=timedelta(days=args.older_than_days),
        location=args.location,
        statuses=tuple(args.status or DEFAULT_STATUSES),
        include_open=args.include_open,
        dry_run=args.dry_run,
    )
    print(json.dumps({"purged" if not args.dry_run else "would_purge": n}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
