"""Fixtures of the DAG tests: sync configs written to files, and DAG files parsed through a DagBag.

The DAG files read their config from ``$GROWTHHUB_SYNC_CONFIG`` when they are imported, so every
parse here points that variable at a config written for the test.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from growthhub_sync.config import CONFIG_ENV, DEFAULT_CONFIG_PATH

ROOT = Path(__file__).resolve().parents[2]
DAGS_DIR = ROOT / "dags"


def deep_merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_data(**changes: Any) -> dict[str, Any]:
    """The shipped default config with ``changes`` merged in (``source={"url": ...}`` etc.)."""
    default = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    return deep_merge(default, changes)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write the default config with changes to a file in ``tmp_path``; returns its path."""
    counter = iter(range(1_000_000))

    def write(**changes: Any) -> Path:
        path = tmp_path / f"sync_config_{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(config_data(**changes)), encoding="utf-8")
        return path

    return write


@dataclass
class Parsed:
    """A DagBag of ``dags/`` and how long parsing it took."""

    bag: Any
    seconds: float

    @property
    def import_errors(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.bag.import_errors.items()}


def parse_dags(monkeypatch: pytest.MonkeyPatch, config: Path, env: Mapping[str, str] | None = None) -> Parsed:
    """Parse every file of ``dags/`` with ``config`` as the sync config and ``env`` set."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv(CONFIG_ENV, str(config))
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    bag = DagBag(dag_folder=str(DAGS_DIR))
    return Parsed(bag, time.monotonic() - started)


@pytest.fixture(scope="session")
def make_config_data() -> Callable[..., dict[str, Any]]:
    """:func:`config_data` as a fixture (test modules do not import conftest: names collide)."""
    return config_data


@pytest.fixture(scope="session")
def dag_parser() -> Callable[..., Parsed]:
    """:func:`parse_dags` as a fixture."""
    return parse_dags
