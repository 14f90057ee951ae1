"""Fixtures of the GrowthHub hook tests: connections from ``AIRFLOW_CONN_*`` variables, no metadata DB."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

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
