"""Benchmark of the GrowthHub page's quarantine list (issue 12): one page of 50 rows out of 1M open.

Fills a fresh PostgreSQL schema with ``--rows`` open quarantine rows (plus a sixth as many
resolved ones) shaped like a bad week: two locations (80 % / 20 %), 3 % API rejections, reason
codes from common (email_invalid 40 %) to rare (country_invalid 0.1 %), 5 % without codes (rows
quarantined before codes existed). Then times what the page runs, the median of 7 after a warm-up:

- ``quarantine_page`` with no filter, deep in the list (a cursor), and each filter alone;
- the same first page without the page's index (location, stage, id) of open rows;
- ``open_counts`` (the runs page's "open quarantine rows" per location, capped at 10,000).

    python bench/bench_quarantine_page.py                 # 1M open rows, PostgreSQL 127.0.0.1/test
    python bench/bench_quarantine_page.py --rows 100000   # a quick run

The schema is dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, text

from growthhub_operator.queries import QuarantineFilter, open_counts, quarantine_page
from growthhub_sync.config import load_config
from growthhub_sync.state import ensure_state, state_tables

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
LOCATIONS = ["east", "west"]

FILL = """
INSERT INTO {table} (location, source_key, stage, http_status, errors, reason_codes, payload,
                     source_hash, dag_id, run_id, first_seen_at, last_seen_at, attempts, status)
SELECT CASE WHEN g % 5 = 0 THEN 'west' ELSE 'east' END,
       'k' || g,
       CASE WHEN g % 33 = 0 THEN 'api' ELSE 'quality' END,
       CASE WHEN g % 33 = 0 THEN 422 END,
       json_build_array('email: ''user' || g || '@example.com'' is not a valid address'),
       CASE WHEN g % 33 = 0 THEN 'api_422'
            WHEN g % 1000 = 0 THEN 'country_invalid'
            WHEN g % 1000 <= 50 THEN NULL
            WHEN g % 1000 <= 450 THEN 'email_invalid'
            WHEN g % 1000 <= 750 THEN 'phone_invalid,email_invalid'
            WHEN g % 1000 <= 900 THEN 'no_identity'
            ELSE 'dob_invalid' END,
       json_build_object('firstName', 'Name' || g, 'email', 'user' || g || '@example.com',
                         'phone', '+1415555' || lpad((g % 10000)::text, 4, '0'), 'locationId', 'loc'),
       md5(g::text),
       'growthhub_contact_sync',
       'scheduled__' || (g / 10000),
       now() - (:n - g) * interval '1 second',
       now() - (:n - g) * interval '1 second',
       1 + g % 3,
       CASE WHEN g % 7 = 0 THEN 'resolved' ELSE 'open' END
FROM generate_series(1, :n) AS g
"""


def median_ms(fn: Callable[[], Any], repeat: int = 7) -> float:
    fn()  # warm-up: plan and buffer cache
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="open quarantine rows (default 1M)")
    args = parser.parse_args()
    total = args.rows * 7 // 6  # every 7th row is resolved
    schema = f"bench_page_{uuid.uuid4().hex[:8]}"
    engine = create_engine(PG_URL)
    tables = state_tables(load_config().state.model_copy(update={"schema_": schema}))
    ensure_state(engine, tables)
    table = f'"{schema}".growthhub_quarantine'
    try:
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(text(FILL.format(table=table)), {"n": total})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"VACUUM ANALYZE {table}"))  # as autovacuum would after the big write
            open_rows = conn.execute(text(f"SELECT count(*) FROM {table} WHERE status = 'open'")).scalar_one()
        seconds = time.perf_counter() - started
        print(f"{open_rows:,} open rows (+{total - open_rows:,} resolved) written in {seconds:.0f} s")
        deep = total // 10  # a cursor 90 % down the newest-first list

        def page(where: QuarantineFilter, before: int | None = None) -> Callable[[], Any]:
            def run() -> Any:
                with engine.connect() as conn:
                    return quarantine_page(conn, tables, LOCATIONS, where, before=before, limit=50)

            return run

        cases: list[tuple[str, Callable[[], Any]]] = [
            ("first page, no filter", page(QuarantineFilter())),
            ("page 90 % deep (cursor), no filter", page(QuarantineFilter(), before=deep)),
            ("location=west", page(QuarantineFilter(location="west"))),
            ("location=west stage=api (1 row in 165)", page(QuarantineFilter(location="west", stage="api"))),
            ("code=email_invalid (70 %)", page(QuarantineFilter(code="email_invalid"))),
            ("code=unknown (5 %)", page(QuarantineFilter(code="unknown"))),
            ("code=country_invalid (0.1 %)", page(QuarantineFilter(code="country_invalid"))),
        ]
        print(f"\n{'one page of 50 rows':<42}{'median ms':>10}")
        for name, fn in cases:
            print(f"{name:<42}{median_ms(fn):>10.1f}")

        def counts() -> Any:
            with engine.connect() as conn:
                return open_counts(conn, tables, LOCATIONS)

        print(f"{'open_counts (runs page)':<42}{median_ms(counts, repeat=3):>10.1f}")
        with engine.begin() as conn:
            conn.execute(text(f'DROP INDEX "{schema}".ix_growthhub_quarantine_open_page'))
        print("\nwithout the index (location, stage, id) of open rows:")
        for name, fn in (cases[0], cases[3]):
            print(f"{name:<42}{median_ms(fn, repeat=3):>10.1f}")
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


if __name__ == "__main__":
    main()
