"""Quarantine retention: purge by age, location and status, on SQLite and PostgreSQL (issue 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from reliability_support import Warehouse, make_config, quarantine
from sqlalchemy import update

from growthhub_sync import state
from growthhub_sync.config import SyncConfig
from growthhub_sync.outcomes import QuarantineRow
from growthhub_sync.retention import purge_quarantine

# (location, key, status, age in days)
ROWS = [
    ("default", "old-resolved", "resolved", 90),
    ("default", "old-ignored", "ignored", 90),
    ("default", "new-resolved", "resolved", 2),
    ("default", "old-open", "open", 90),
    ("default", "new-open", "open", 1),
    ("emea", "emea-old-resolved", "resolved", 90),
    ("emea", "emea-old-open", "open", 90),
]


def _fill(wh: Warehouse, cfg: SyncConfig) -> state.StateTables:
    tables = state.state_tables(cfg.state)
    state.ensure_state(wh.engine, tables)
    now = state.utcnow()
    q = tables.quarantine
    with wh.engine.begin() as conn:
        for loc, key, _, _ in ROWS:
            store = state.StateStore(conn, tables, loc, run_id="r", dag_id="t", now=now)
            store.quarantine(
                [
                    QuarantineRow(
                        key,
                        "quality",
                        ["email: bad"],
                        ("email_invalid",),
                        {"email": f"{key}@example.com"},
                        None,
                    )
                ]
            )
        for loc, key, status, age in ROWS:
            at = now - timedelta(days=age)
            values = {"first_seen_at": at, "last_seen_at": at, "status": status}
            if status != "open":
                values["resolved_at"] = at
            conn.execute(update(q).where(q.c.location == loc, q.c.source_key == key).values(**values))
    return tables


def _left(wh: Warehouse, cfg: SyncConfig) -> set[str]:
    return {r["source_key"] for r in quarantine(wh, cfg)}


ALL = {k for _, k, _, _ in ROWS}


@pytest.mark.parametrize(
    ("kwargs", "purged"),
    [
        ({"older_than": timedelta(days=30)}, {"old-resolved", "old-ignored", "emea-old-resolved"}),
        ({"older_than": timedelta(days=30), "location": "default"}, {"old-resolved", "old-ignored"}),
        ({"older_than": timedelta(days=30), "statuses": ("ignored",)}, {"old-ignored"}),
        (
            {"older_than": timedelta(days=30), "include_open": True},
            {"old-resolved", "old-ignored", "emea-old-resolved", "old-open", "emea-old-open"},
        ),
        ({"older_than": None}, {"old-resolved", "old-ignored", "new-resolved", "emea-old-resolved"}),
        ({"older_than": timedelta(days=365)}, set()),
        ({"older_than": timedelta(days=30), "statuses": ("open",)}, set()),
    ],
)
def test_purge_deletes_exactly_the_selected_rows(
    rel_warehouse: Warehouse, tmp_path: Path, kwargs: dict[str, object], purged: set[str]
) -> None:
    cfg = make_config(rel_warehouse, tmp_path)
    tables = _fill(rel_warehouse, cfg)
    assert purge_quarantine(rel_warehouse.engine, tables, dry_run=True, **kwargs) == len(purged)  # type: ignore[arg-type]
    assert _left(rel_warehouse, cfg) == ALL, "a dry run deletes nothing"
    assert purge_quarantine(rel_warehouse.engine, tables, **kwargs) == len(purged)  # type: ignore[arg-type]
    assert _left(rel_warehouse, cfg) == ALL - purged
    assert purge_quarantine(rel_warehouse.engine, tables, **kwargs) == 0, "purging again finds nothing"  # type: ignore[arg-type]


def test_purge_rejects_a_negative_age(sqlite_wh: Warehouse, tmp_path: Path) -> None:
    tables = _fill(sqlite_wh, make_config(sqlite_wh, tmp_path))
    with pytest.raises(ValueError, match="negative"):
        purge_quarantine(sqlite_wh.engine, tables, older_than=timedelta(days=-1))


def _cli(cfg: SyncConfig, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(by_alias=True, exclude_none=True, mode="json")))
    env = {**os.environ, "GROWTHHUB_SYNC_CONFIG": str(path)}
    return subprocess.run(
        [sys.executable, "-m", "growthhub_sync.retention", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_cli_dry_run_then_purge_by_age_and_location(rel_warehouse: Warehouse, tmp_path: Path) -> None:
    cfg = make_config(rel_warehouse, tmp_path)
    _fill(rel_warehouse, cfg)
    dry = _cli(cfg, tmp_path, "--older-than-days", "30", "--location", "default", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout.strip().splitlines()[-1]) == {"would_purge": 2}
    assert _left(rel_warehouse, cfg) == ALL
    real = _cli(cfg, tmp_path, "--older-than-days", "30", "--location", "default", "--include-open")
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout.strip().splitlines()[-1]) == {"purged": 3}
    assert _left(rel_warehouse, cfg) == ALL - {"old-resolved", "old-ignored", "old-open"}


def test_cli_unknown_location_fails_naming_it(sqlite_wh: Warehouse, tmp_path: Path) -> None:
    out = _cli(make_config(sqlite_wh, tmp_path), tmp_path, "--older-than-days", "30", "--location", "mars")
    assert out.returncode != 0
    assert "unknown location 'mars'" in out.stderr
