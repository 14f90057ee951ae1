"""End to end: warehouse (SQLite / PostgreSQL) → pipeline → real GrowthHub hook → sandbox server."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sync_support import DAY, T0, Warehouse

from growthhub_provider.client import GrowthHubAuthError
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess
from growthhub_sync import state
from growthhub_sync.config import SyncConfig
from growthhub_sync.demo import modify_contacts, seed_demo
from growthhub_sync.pipeline import SyncOptions, sync

pytestmark = pytest.mark.integration
TOKEN = "tok-sync-tests"


@pytest.fixture
def crm(
    sandbox: SandboxAdmin, sandbox_server: SandboxProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> SandboxAdmin:
    """Location ``loc1`` (with the ``lifetime_value`` custom field) and a connection to it."""
    sandbox.put_location(
        "loc1",
        duplicateCheckFields=["email", "phone"],
        customFields=[{"id": "cf-ltv", "key": "lifetime_value", "dataType": "MONETORY"}],
    )
    sandbox.add_token(token=TOKEN, locationId="loc1", scopes=["contacts.write", "contacts.readonly"])
    conn = {
        "conn_type": "growthhub",
        "host": sandbox_server.base_url,
        "password": TOKEN,
        "extra": {"location_id": "loc1", "max_workers": 4, "refresh_token_file": str(tmp_path / "rt.json")},
    }
    monkeypatch.setenv("AIRFLOW_CONN_GROWTHHUB_DEFAULT", json.dumps(conn))
    return sandbox


def _run(cfg: SyncConfig, wh: Warehouse, run_id: str, window: Any = DAY) -> dict[str, Any]:
    return sync(cfg, "default", window, SyncOptions(run_id=run_id, dag_id="tests"), engine=wh.engine)


def _ledger(wh: Warehouse, cfg: SyncConfig) -> list[dict[str, Any]]:
    t = state.state_tables(cfg.state).ledger
    with wh.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(t))]


def test_sync_creates_one_contact_per_identity_and_reruns_send_nothing(
    seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: SandboxAdmin
) -> None:
    cfg = make_config()
    first = _run(cfg, seeded, "r1")
    assert first["invariant_ok"]
    assert first["rejected"] == first["deferred"] == 0
    contacts = crm.contacts("loc1")
    ledger = _ledger(seeded, cfg)
    # one ledger row per contact: the plan decided each identity's winner for the whole window,
    # so a row sharing its identity with a newer one in another chunk was never sent
    assert len(contacts) == first["created"] == len(ledger) == len({r["contact_id"] for r in ledger})
    assert first["reasons"]["duplicate_identity"] > 0, "the demo data has same-identity rows"
    assert (first["displaced"], first["updated"]) == (0, 0)
    assert {c["id"] for c in contacts} == {r["contact_id"] for r in ledger}
    upserts = crm.stats()["requests"]["POST /contacts/upsert"]
    assert sum(upserts.values()) == first["created"]
    second = _run(cfg, seeded, "r2")
    assert second["created"] == second["updated"] == second["displaced"] == 0
    assert second["unchanged"] == first["created"] + first["updated"] - first["displaced"]
    assert crm.stats()["requests"]["POST /contacts/upsert"] == upserts
    assert len(crm.contacts("loc1")) == len(contacts)


def test_api_rejection_lands_in_quarantine_with_the_api_messages(
    seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: SandboxAdmin
) -> None:
    cfg = make_config(
        mapping={
            **make_config().mapping.model_dump(by_alias=True, exclude_none=True),
            "custom_fields": [{"key": "not_a_field", "column": "lifetime_value"}],
        }
    )
    out = _run(cfg, seeded, "r1")
    assert out["rejected"] > 0
    assert out["invariant_ok"]
    q = state.state_tables(cfg.state).quarantine
    with seeded.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(q).where(q.c.stage == "api"))]
    # rows a rejected row had displaced are decided again when the run finalises, and fail alike
    assert len(rows) == out["rejected"] + out["leftovers"]["rejected"]
    assert {r["http_status"] for r in rows} == {422}
    assert all("unknown: not_a_field" in " ".join(r["errors"]) for r in rows)


@pytest.mark.parametrize(("policy", "expected_city"), [("omit", "Dolomite"), ("clear", None)])
def test_null_policy_decides_whether_a_null_wipes_the_crm_value(
    seeded: Warehouse,
    make_config: Callable[..., SyncConfig],
    crm: SandboxAdmin,
    policy: str,
    expected_city: str | None,
) -> None:
    cfg = make_config(
        mapping={**make_config().mapping.model_dump(by_alias=True, exclude_none=True), "null_policy": policy}
    )
    key = "C00000001"
    modify_contacts(seeded.engine, [key], T0, schema=seeded.schema, city="Dolomite")
    _run(cfg, seeded, "r1")
    modify_contacts(seeded.engine, [key], T0 + timedelta(days=1, hours=1), schema=seeded.schema, city=None)
    out = _run(cfg, seeded, "r2", {"start": DAY["end"], "end": (T0 + timedelta(days=2)).isoformat()})
    assert out["updated"] == 1
    (entry,) = [r for r in _ledger(seeded, cfg) if r["source_key"] == key]
    (contact,) = [c for c in crm.contacts("loc1") if c["id"] == entry["contact_id"]]
    assert contact.get("city") == expected_city


def test_auth_error_fails_the_sync(
    seeded: Warehouse,
    make_config: Callable[..., SyncConfig],
    crm: SandboxAdmin,
    sandbox_server: SandboxProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn = {
        "conn_type": "growthhub",
        "host": sandbox_server.base_url,
        "password": "wrong-token",
        "extra": {"location_id": "loc1"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_GROWTHHUB_DEFAULT", json.dumps(conn))
    with pytest.raises(GrowthHubAuthError):
        _run(make_config(), seeded, "r1")
    t = state.state_tables(make_config().state).ledger
    with seeded.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(t)).scalar_one() == 0


def test_run_summary_counts_the_clients_requests_retries_and_quota_left(
    warehouse: Warehouse, make_config: Callable[..., SyncConfig], crm: SandboxAdmin
) -> None:
    from growthhub_provider.hooks.growthhub import GrowthHubHook

    seed_demo(warehouse.engine, 40, schema=warehouse.schema, start=T0, bad_share=0)
    crm.set_faults(error_rate=0.3, error_statuses=[503], seed=5)
    # enough attempts that no row runs out of them (0.3 ** 20): every row ends created or updated
    hook = GrowthHubHook(location_id="loc1", max_attempts=20, backoff_initial_s=0.01, backoff_max_s=0.02)

    out = sync(
        make_config(), "default", DAY, SyncOptions(run_id="r1"), engine=warehouse.engine, upserter=hook
    )

    requests = crm.stats()["requests"]["POST /contacts/upsert"]
    assert out["deferred"] == 0
    assert out["upserts"] == requests["200"] == out["created"] + out["updated"]
    assert out["retried"] == requests["503"] > 0
    assert out["throttled"] == 0
    # the client's own figure: the server's last one less what went out since (the sandbox's --daily)
    assert out["daily_remaining"] == hook.daily_remaining <= 1_000_000_000 - sum(requests.values())
    assert out["duration_s"] > 0
