"""What the GrowthHub page tests share: state tables filled the way a sync fills them, and configs."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from growthhub_sync import state
from growthhub_sync.config import load_config, parse_config
from growthhub_sync.outcomes import QuarantineRow

PG_URL = os.environ.get("GROWTHHUB_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
SESSION = f"ui_{secrets.token_hex(3)}"
T0 = datetime(2026, 3, 3, tzinfo=UTC)
LOCATIONS = ("east", "west")


@dataclass
class StateDB:
    """A warehouse holding the state tables of a config with the locations ``east`` and ``west``."""

    url: str
    engine: Engine
    schema: str | None
    config_path: Path
    tables: state.StateTables = field(init=False)

    def __post_init__(self) -> None:
        self.tables = state.state_tables(load_config(self.config_path).state)
        state.ensure_state(self.engine, self.tables)

    def quarantine(
        self,
        location: str,
        key: str,
        *,
        stage: str = "quality",
        codes: str | None = "email_invalid",
        errors: Sequence[str] = ("email: not a valid address",),
        email: str | None = "jane.doe@example.com",
        phone: str | None = "+14155550123",
        at: datetime = T0,
        run_id: str = "scheduled__2026-03-03T00:00:00+00:00",
    ) -> int:
        """Open a quarantine row the way a sync does (``StateStore``), with its reason codes; its id."""
        payload = {"firstName": "Jane", "email": email, "phone": phone, "locationId": "loc"}
        http_status = 422 if stage == "api" else None
        row = QuarantineRow(key, stage, list(errors), (), payload, "hash", http_status)  # type: ignore[arg-type]
        q = self.tables.quarantine
        with self.engine.begin() as conn:
            state.StateStore(conn, self.tables, location, run_id=run_id, now=at).quarantine([row])
            # the codes as given, NULL included (a row an older release wrote)
            conn.execute(
                update(q).where(q.c.location == location, q.c.source_key == key).values(reason_codes=codes)
            )
            return conn.execute(
                select(q.c.id).where(q.c.location == location, q.c.source_key == key)
            ).scalar_one()

    def resolve(self, location: str, keys: Sequence[str]) -> None:
        with self.engine.begin() as conn:
            state.StateStore(conn, self.tables, location).resolve_quarantine(keys)

    def run(
        self,
        location: str,
        run_id: str,
        started: datetime,
        columns: Mapping[str, Any] | None = None,
        **counts: int,
    ) -> None:
        """A run row with these outcome counts (extracted: their sum) and other ``columns``."""
        extracted = sum(counts.values())
        row: dict[str, Any] = {
            "run_id": run_id,
            "location": location,
            "dag_id": "growthhub_contact_sync",
            "status": "success",
            "started_at": started,
            "finished_at": started + timedelta(minutes=2),
            "extracted": extracted,
            **counts,
            **(columns or {}),
        }
        with self.engine.begin() as conn:
            state.write_run(conn, self.tables, row)


def write_config(
    path: Path, *, url: str | None = None, schema: str | None = None, overrides: Sequence[str] | None = None
) -> Path:
    """The shipped default config with the locations ``east`` and ``west``, state in ``schema``;
    with ``overrides``, locations discovered by an agency (``locations.from_column``) instead,
    these ids listed as overrides."""
    data = load_config().model_dump(by_alias=True, exclude_none=True)
    data["source"] = {**data["source"], **({"url": url} if url else {})}
    data["locations"] = [
        {"name": n, "location_id": f"{n}-id", "conn_id": "growthhub_default"} for n in LOCATIONS
    ]
    if overrides is not None:
        data.pop("location_routing", None)
        listed = [{"location_id": i} for i in overrides]
        data["locations"] = {"from_column": "location_id", "conn_id": "growthhub_agency", "list": listed}
    data["state"] = {"schema": schema, "prefix": ""} if schema else {"prefix": ""}
    parse_config(data)  # fail here, not in the page, if the test's config is wrong
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path
