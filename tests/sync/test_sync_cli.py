"""``python -m growthhub_sync``: its help reads cleanly and a missing connection ends in one line."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from growthhub_sync.__main__ import build_parser


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, with no Airflow connection and no sync config from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "GROWTHHUB_SYNC"))}
    env["AIRFLOW_HOME"] = str(cwd / "airflow")  # an empty home: no metadata DB holds a connection
    return subprocess.run(
        [sys.executable, "-m", "growthhub_sync", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _parsers() -> dict[str, argparse.ArgumentParser]:
    root = build_parser()
    (sub,) = (a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return {"": root, **sub.choices}


def test_every_option_has_help() -> None:
    missing = [
        f"{name} {opt}".strip()
        for name, parser in _parsers().items()
        for action in parser._actions
        for opt in action.option_strings[-1:]
        if not action.help
    ]

    assert missing == []


def test_help_prints_plain_text(tmp_path: Path) -> None:
    result = _cli("--help", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "``" not in result.stdout
    assert "seed the demo table, run a sync or a replay" in result.stdout
    assert "AIRFLOW_CONN_GROWTHHUB_DEFAULT" in result.stdout


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_sync_without_url_or_warehouse_connection_says_what_to_do(tmp_path: Path) -> None:
    result = _cli("sync", cwd=tmp_path)

    assert result.returncode == 2
    line = _last_line(result)
    assert line.startswith("python -m growthhub_sync: error: no warehouse: pass --url or define")
    assert "'warehouse_default'" in line
    assert "AIRFLOW_CONN_WAREHOUSE_DEFAULT" in line


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sync", "replay"])
def test_missing_growthhub_connection_says_what_to_do(tmp_path: Path, command: str) -> None:
    result = _cli("--url", f"sqlite:///{tmp_path / 'warehouse.db'}", command, cwd=tmp_path)

    assert result.returncode == 2
    line = _last_line(result)
    assert line.startswith("python -m growthhub_sync: error: no GrowthHub connection: define")
    assert "'growthhub_default' (locations[default].conn_id)" in line
    assert "AIRFLOW_CONN_GROWTHHUB_DEFAULT" in line
    assert not (tmp_path / "warehouse.db").exists() or (tmp_path / "warehouse.db").stat().st_size == 0
