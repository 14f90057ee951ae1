"""Shared helpers of the sync tests (a module, not conftest, so test files can import them)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection, Engine

from growthhub_provider.client import UpsertOutcome
from growthhub_sync.config import SyncConfig
from growthhub_sync.testing import Warehouse, config_for

PG_URL = os.environ.get("GROWTHHUB_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
SESSION = f"ghs_{uuid.uuid4().hex[:8]}"

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = {"start": T0.isoformat(), "end": (T0 + timedelta(days=1)).isoformat()}


def make_sync_config(wh: Warehouse, tmp_path: Path, **overrides: Any) -> SyncConfig:
    return config_for(wh.url, wh.schema, tmp_path, **overrides)


class AuthFailure(Exception):
    """Stands in for the hook's GrowthHubAuthError."""


@dataclass
class FakeCRM:
    """A CRM behind the hook's ``upsert_contacts`` contract: matches on email, then phone.

    ``reject``/``fail`` give per-key outcomes, ``quota`` sends that many rows then skips,
    ``auth_error_after`` raises after that many outcomes.
    """

    reject: dict[str, list[str]] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)
    quota: int | None = None
    auth_error_after: int | None = None
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def _match(self, payload: dict[str, Any]) -> str | None:
        for cid, c in self.contacts.items():
            if payload.get("email") and (c.get("email") or "").lower() == payload["email"].lower():
                return cid
        for cid, c in self.contacts.items():
            if payload.get("phone") and c.get("phone") == payload["phone"]:
                return cid
        return None

    def upsert_contacts(
        self, rows: Iterable[tuple[str, dict[str, Any]]], *, daily_reserve: int = 0
    ) -> Iterator[UpsertOutcome]:
        for n, (key, payload) in enumerate(rows):
            if self.auth_error_after is not None and n >= self.auth_error_after:
                raise AuthFailure("401 invalid token")
            if self.quota is not None and len(self.sent) >= self.quota:
                yield UpsertOutcome(key, "skipped", messages=["daily quota reserve reached"])
                continue
            self.sent.append((key, payload))
            if key in self.reject:
                yield UpsertOutcome(key, "rejected", http_status=422, messages=self.reject[key])
                continue
            if key in self.fail:
                yield UpsertOutcome(
                    key, "failed", http_status=503, messages=["503 Service Unavailable"], attempts=5
                )
                continue
            cid = self._match(payload)
            if cid is None:
                cid = f"c{len(self.contacts) + 1}"
                self.contacts[cid] = {k: v for k, v in payload.items() if v is not None}
                yield UpsertOutcome(key, "created", contact_id=cid)
            else:
                self.contacts[cid].update({k: v for k, v in payload.items() if v is not None})
                yield UpsertOutcome(key, "updated", contact_id=cid)


@dataclass
class InterleavingCRM(FakeCRM):
    """A :class:`FakeCRM` during whose first send another task writes ``meanwhile`` (a race)."""

    engine: Engine | None = None
    meanwhile: Callable[[Connection], None] | None = None

    def upsert_contacts(
        self, rows: Iterable[tuple[str, dict[str, Any]]], *, daily_reserve: int = 0
    ) -> Iterator[UpsertOutcome]:
        if self.meanwhile is not None and self.engine is not None:
            with self.engine.begin() as conn:
                self.meanwhile(conn)
            self.meanwhile = None
        return super().upsert_contacts(rows, daily_reserve=daily_reserve)
