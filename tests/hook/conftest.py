"""Fixtures of the GrowthHub hook tests: connections from ``AIRFLOW_CONN_*`` variables, no metadata DB."""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from scripted_http import ScriptedApi

FAKE_URL = "http://growthhub.test"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return tmp_path / "tokens" / "growthhub.json"


@pytest.fixture
def growthhub_conn(monkeypatch: pytest.MonkeyPatch, token_file: Path) -> Callable[..., None]:
    """Define a connection: ``growthhub_conn(host=..., password=..., conn_id=..., **extras)``."""

    def define(
        host: str = FAKE_URL,
        password: str | None = "pit-test-token",
        conn_id: str = "growthhub_default",
        **extra: Any,
    ) -> None:
        extra = {"location_id": "loc1", "refresh_token_file": str(token_file), **extra}
        conn = {"conn_type": "growthhub", "host": host, "password": password, "extra": extra}
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))

    return define


@pytest.fixture
def scripted_conn(growthhub_conn: Callable[..., None], scripted_api: ScriptedApi) -> Callable[..., None]:
    """``growthhub_conn``, pointed at :func:`scripted_api` unless a test names another host."""
    return functools.partial(growthhub_conn, host=scripted_api.base_url)
