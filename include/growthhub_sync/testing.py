"""Test helpers: a warehouse under test, and the shipped default config pointed at it (for tests
and benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from growthhub_sync.config import SyncConfig, load_config, parse_config

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine


@dataclass
class Warehouse:
    """A warehouse a test syncs from: backend name, URL, engine and the schema of its tables."""

    name: str
    url: str
    engine: Engine
    schema: str | None


def config_for(
    url: str,
    schema: str | None,
    work_dir: Path,
    *,
    location_id: str = "loc1",
    origin: str = "test",
    **overrides: Any,
) -> SyncConfig:
    """The shipped default config on ``url``/``schema``, state in the same schema, GX output in
    ``work_dir``; ``section__key=value`` overrides one key of a section, ``key=value`` a whole one."""
    data = load_config().model_dump(by_alias=True, exclude_none=True)
    data["source"].update(url=url, schema=schema)
    data["state"] = {"schema": schema, "prefix": ""}
    data["locations"] = [{"name": "default", "location_id": location_id, "conn_id": "growthhub_default"}]
    data["quality"].update(
        results_dir=str(work_dir / "gx" / "results"), data_docs_dir=str(work_dir / "gx" / "docs")
    )
    data["batch_size"] = 500
    for key, value in overrides.items():
        section, _, sub = key.partition("__")
        data[section] = {**data.get(section, {}), sub: value} if sub else value
    return parse_config(data, origin)
