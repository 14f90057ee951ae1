"""Helpers of the reliability suite: warehouses, configs, sandbox connections, sandbox comparisons.

Kept out of ``conftest.py`` so test modules can import them by a name no other suite uses.
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Engine

from growthhub_provider.client import UpsertOutcome
from growthhub_sandbox.testing import SandboxAdmin
from growthhub_sync import state
from growthhub_sync.config import SyncConfig
from growthhub_sync.mapping import Mapper
from growthhub_sync.testing import Warehouse, config_for

PG_URL = os.environ.get("GROWTHHUB_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
SESSION = f"ghrel_{uuid.uuid4().hex[:8]}"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
LOCATION_ID = "rel-loc"
TOKEN = "pit-SECRET-5b1f0c9e-reliability-7d3a"  # a known token: tests scan for it everywhere


def new_pg_schema() -> str:
    return f"{SESSION}_{uuid.uuid4().hex[:6]}"


def drop_pg_schemas(engine: Engine, prefix: str = SESSION) -> None:
    with engine.begin() as conn:
        names = conn.execute(
            text("select nspname from pg_namespace where nspname like :p"), {"p": f"{prefix}%"}
        ).scalars()
        for name in list(names):
            conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))


def sqlite_warehouse(path: Path) -> Warehouse:
    url = f"sqlite:///{path}"
    return Warehouse("sqlite", url, create_engine(url, connect_args={"timeout": 60}), None)


def make_config(
    wh: Warehouse, tmp_path: Path, *, location_id: str = LOCATION_ID, **overrides: Any
) -> SyncConfig:
    """The shipped default config on ``wh``; ``section__key=value`` overrides one key of a section."""
    return config_for(wh.url, wh.schema, tmp_path, location_id=location_id, origin="reliability", **overrides)


def setup_sandbox_location(admin: SandboxAdmin, location_id: str = LOCATION_ID, token: str = TOKEN) -> None:
    admin.put_location(
        location_id,
        duplicateCheckFields=["email", "phone"],
        customFields=[{"id": "cf-ltv", "key": "lifetime_value", "dataType": "MONETORY"}],
        rateLimit={"burst": 1_000_000_000, "intervalMs": 1_000, "daily": 1_000_000_000},
    )
    admin.add_token(token=token, locationId=location_id, scopes=["contacts.write", "contacts.readonly"])


def growthhub_conn(base_url: str, tmp_path: Path, token: str = TOKEN, **extra: Any) -> str:
    """``AIRFLOW_CONN_GROWTHHUB_DEFAULT`` JSON for the sandbox location."""
    return json.dumps(
        {
            "conn_type": "growthhub",
            "host": base_url,
            "password": token,
            "extra": {
                "location_id": LOCATION_ID,
                "max_workers": 8,
                "refresh_token_file": str(tmp_path / "rt.json"),
                "rate_limit_burst": 1_000_000,
                **extra,
            },
        }
    )


def rows_of(engine: Engine, table: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table))]


def ledger(wh: Warehouse, cfg: SyncConfig) -> list[dict[str, Any]]:
    return rows_of(wh.engine, state.state_tables(cfg.state).ledger)


def quarantine(wh: Warehouse, cfg: SyncConfig) -> list[dict[str, Any]]:
    return rows_of(wh.engine, state.state_tables(cfg.state).quarantine)


def pending(wh: Warehouse, cfg: SyncConfig) -> list[dict[str, Any]]:
    return rows_of(wh.engine, state.state_tables(cfg.state).pending)


def runs(wh: Warehouse, cfg: SyncConfig) -> list[dict[str, Any]]:
    return rows_of(wh.engine, state.state_tables(cfg.state).runs)


def source_rows(wh: Warehouse, cfg: SyncConfig) -> tuple[list[str], list[tuple[Any, ...]]]:
    cols = cfg.source_columns()
    tbl = cfg.source.table if wh.schema is None else f'"{wh.schema}"."{cfg.source.table}"'
    with wh.engine.connect() as conn:
        rows = [tuple(r) for r in conn.exec_driver_sql(f"SELECT {', '.join(cols)} FROM {tbl}")]
    return cols, rows


def expected_payloads(wh: Warehouse, cfg: SyncConfig, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The library's own mapping of the warehouse rows of ``keys`` (the field-for-field reference)."""
    cols, rows = source_rows(wh, cfg)
    want = set(keys)
    chosen = [r for r in rows if str(r[cols.index(cfg.source.key_column)]) in want]
    batch = Mapper(cfg, cols).map(chosen, LOCATION_ID)
    return dict(zip(batch.keys, batch.payloads, strict=True))


def identity_duplicates(contacts: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Identities (lower-cased email, phone) held by more than one sandbox contact."""
    seen: dict[str, int] = {}
    for c in contacts:
        for ident in {f"email:{(c.get('email') or '').lower()}", f"phone:{c.get('phone') or ''}"}:
            if not ident.endswith(":"):
                seen[ident] = seen.get(ident, 0) + 1
    return {k: n for k, n in seen.items() if n > 1}


_IGNORED = {"locationId", "createNewIfDuplicateAllowed"}


def payload_mismatches(payload: dict[str, Any], contact: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields where the sandbox contact differs from the payload the library would send."""
    diffs: dict[str, tuple[Any, Any]] = {}
    for k, want in payload.items():
        if k in _IGNORED:
            continue
        if k == "customFields":
            have_cf = {
                str(cf.get("id") or cf.get("key")): cf.get("value", cf.get("field_value"))
                for cf in contact.get("customFields") or []
            }
            for cf in want or []:
                name = str(cf.get("key") or cf.get("id"))
                got = have_cf.get(name, have_cf.get("cf-ltv") if name == "lifetime_value" else None)
                if _norm(got) != _norm(cf.get("field_value", cf.get("value"))):
                    diffs[f"customFields.{name}"] = (cf, got)
            continue
        got = contact.get(k)
        if k == "tags":
            if sorted(want or []) != sorted(got or []):
                diffs[k] = (want, got)
        elif k == "email":
            if (want or "").lower() != (got or "").lower():
                diffs[k] = (want, got)
        elif _norm(want) != _norm(got):
            diffs[k] = (want, got)
    return diffs


def _norm(v: Any) -> Any:
    if isinstance(v, float | int) and not isinstance(v, bool):
        return round(float(v), 2)
    if isinstance(v, str):
        try:
            return round(float(v), 2)
        except ValueError:
            return v
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def sandbox_contacts(admin: SandboxAdmin, location_id: str = LOCATION_ID) -> list[dict[str, Any]]:
    return admin.contacts(location_id)


@dataclass
class StrictJsonCRM:
    """Creates one contact per row; rejects (422) a payload that is not strict JSON, as an API would."""

    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    ids: Iterator[int] = field(default_factory=itertools.count)

    def upsert_contacts(
        self, rows: Iterable[tuple[str, dict[str, Any]]], *, daily_reserve: int = 0
    ) -> Iterator[UpsertOutcome]:
        for key, payload in rows:
            self.sent.append((key, payload))
            try:
                json.dumps(payload, allow_nan=False)
            except (TypeError, ValueError) as exc:
                yield UpsertOutcome(key, "rejected", http_status=422, messages=[f"not JSON: {exc}"])
                continue
            yield UpsertOutcome(key, "created", contact_id=f"c{next(self.ids)}")
