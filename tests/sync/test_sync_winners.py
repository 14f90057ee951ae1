"""Plan-time winners: on a first load with duplicates each winning row is sent once and a loser
never, whatever the order of the batches (or shards); later runs and races behave as before.

Real warehouses (SQLite and PostgreSQL), the fake CRM for the batch orders, the sandbox behind
the real hook for the request count.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sync_support import T0, FakeCRM, Warehouse

from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess
from growthhub_sync import state, winners
from growthhub_sync.config import SyncConfig
from growthhub_sync.demo import contacts_table, modify_contacts, seed_demo
from growthhub_sync.fleet import finalize_fleet, plan_fleet, sync_shard
from growthhub_sync.pipeline import SyncOptions, finalize_run, plan_sync, sync, sync_batch

SAME = "same@example.com"
TOKEN = "tok-winners"
UPSERT = "POST /contacts/upsert"


def _set(wh: Warehouse, key: str, hour: int, **values: Any) -> None:
    modify_contacts(wh.engine, [key], T0 + timedelta(hours=hour), schema=wh.schema, **values)


def _rows(wh: Warehouse, cfg: SyncConfig, table: str) -> list[dict[str, Any]]:
    t = getattr(state.state_tables(cfg.state), table)
    with wh.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(t))]


def _first_name(wh: Warehouse, key: str) -> str:
    tbl = contacts_table(wh.schema)
    with wh.engine.connect() as conn:
        return str(conn.execute(select(tbl.c.first_name).where(tbl.c.id == key)).scalar_one())


def _run_batches(
    cfg: SyncConfig, wh: Warehouse, crm: Any, run_id: str, *, reverse: bool, batch_rows: int
) -> dict[str, Any]:
    """A run as the DAG's mapped tasks would make it, with its batches in the given order."""
    opts = SyncOptions(run_id=run_id)
    plan = plan_sync(
        cfg, "default", None, engine=wh.engine, options=opts, batch_rows=batch_rows, check_connection=False
    )
    batches = plan["batches"][::-1] if reverse else plan["batches"]
    outs = [
        sync_batch(cfg, "default", plan["window"], b, opts, engine=wh.engine, upserter=crm) for b in batches
    ]
    return finalize_run(cfg, "default", plan["window"], outs, opts, engine=wh.engine, upserter=crm)


def _sent_for(out: dict[str, Any]) -> int:
    """Rows the run recorded as sent: its batches' and its leftovers' created + updated."""
    left = out.get("leftovers", {})
    return out["created"] + out["updated"] + left.get("created", 0) + left.get("updated", 0)


@pytest.mark.parametrize("newer", ["C00000000", "C00000002"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_a_duplicate_in_another_batch_is_never_sent_whatever_the_order(
    warehouse: Warehouse, make_config: Callable[..., SyncConfig], newer: str, reverse: bool
) -> None:
    seed_demo(warehouse.engine, 3, schema=warehouse.schema, start=T0, bad_share=0)
    older = "C00000002" if newer == "C00000000" else "C00000000"
    _set(warehouse, older, 1, email=SAME, first_name="Old")
    _set(warehouse, newer, 3, email=SAME.upper(), first_name="New")
    cfg, crm = make_config(), FakeCRM()
    out = _run_batches(cfg, warehouse, crm, "r1", reverse=reverse, batch_rows=1)
    sent = [k for k, _ in crm.sent]
    assert sorted(sent) == sorted(["C00000001", newer])  # each winner once, the loser never
    assert len(sent) == out["created"] + out["updated"] == 2
    assert (out["quarantined"], out["displaced"], out["reasons"]) == (1, 0, {"duplicate_identity": 1})
    assert "leftovers" not in out
    (contact,) = [c for c in crm.contacts.values() if c["email"].lower() == SAME]
    assert contact["firstName"] == "New"
    (q,) = _rows(warehouse, cfg, "quarantine")
    assert (q["source_key"], q["reason_codes"], q["duplicate_of"]) == (older, "duplicate_identity", newer)
    assert {r["source_key"] for r in _rows(warehouse, cfg, "ledger")} == {"C00000001", newer}
    assert _rows(warehouse, cfg, "pending") == []
    assert _losers_left(warehouse, cfg) == 0  # the run's losers go with its finalize


@pytest.mark.integration
def test_the_sandbox_gets_one_upsert_per_winning_row(
    warehouse: Warehouse,
    make_config: Callable[..., SyncConfig],
    sandbox: SandboxAdmin,
    sandbox_server: SandboxProcess,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Through the real hook: the requests the API answered are the rows recorded as sent."""
    sandbox.put_location(
        "loc1",
        duplicateCheckFields=["email", "phone"],
        customFields=[{"id": "cf-ltv", "key": "lifetime_value", "dataType": "MONETORY"}],
    )
    sandbox.add_token(token=TOKEN, locationId="loc1", scopes=["contacts.write", "contacts.readonly"])
    extra = {"location_id": "loc1", "max_workers": 4, "refresh_token_file": str(tmp_path / "rt.json")}
    conn = {"conn_type": "growthhub", "host": sandbox_server.base_url, "password": TOKEN, "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_GROWTHHUB_DEFAULT", json.dumps(conn))
    seed_demo(warehouse.engine, 300, schema=warehouse.schema, start=T0, bad_share=0.05)
    cfg = make_config(batch_size=30)  # chunks of 30 rows: duplicates land in other chunks
    out = sync(cfg, "default", None, SyncOptions(run_id="r1"), engine=warehouse.engine)
    assert out["reasons"]["duplicate_identity"] >= 3
    upserts = sum(sandbox.stats()["requests"][UPSERT].values())
    assert out["rejected"] == 0
    assert upserts == _sent_for(out) == len(_rows(warehouse, cfg, "ledger"))
    assert out["displaced"] == 0
    assert sandbox.stats()["locations"]["loc1"]["contacts"] == upserts


def _losers_left(wh: Warehouse, cfg: SyncConfig) -> int:
    t = winners.losers_table(state.state_tables(cfg.state))
    with wh.engine.connect() as conn:
        return len(list(conn.execute(select(t))))


def test_a_messy_first_load_sends_the_same_winners_once_in_either_batch_order(
    warehouse: Warehouse, make_config: Callable[..., SyncConfig]
) -> None:
    """The demo's data: bad rows and the same person under another key, older or newer."""
    seed_demo(warehouse.engine, 600, schema=warehouse.schema, start=T0, bad_share=0.05)
    cfg = make_config(batch_size=40)
    results = []
    for reverse in (False, True):
        crm = FakeCRM()
        out = _run_batches(cfg, warehouse, crm, f"r-{reverse}", reverse=reverse, batch_rows=40)
        sent = Counter(k for k, _ in crm.sent)
        duplicates = {q["source_key"] for q in _rows(warehouse, cfg, "quarantine")} & {
            q["source_key"] for q in _rows(warehouse, cfg, "quarantine") if q["duplicate_of"]
        }
        assert out["reasons"]["duplicate_identity"] >= 10  # the data has duplicates to decide
        assert max(sent.values()) == 1  # no row sent twice
        assert not duplicates & set(sent)  # no loser sent
        assert sum(sent.values()) == _sent_for(out)
        assert out["displaced"] == 0
        ledger = {r["source_key"] for r in _rows(warehouse, cfg, "ledger")}
        assert ledger == set(sent)
        results.append((ledger, sorted(duplicates), _sent_for(out)))
        state.state_tables(cfg.state).metadata.drop_all(warehouse.engine)  # a first load again
        winners.losers_table(state.state_tables(cfg.state)).drop(warehouse.engine, checkfirst=True)
    assert results[0] == results[1]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_shards_of_the_fleet_hold_a_duplicate_back_whatever_their_order(
    warehouse: Warehouse, make_config: Callable[..., SyncConfig], reverse: bool
) -> None:
    seed_demo(warehouse.engine, 6, schema=warehouse.schema, start=T0, bad_share=0)
    _set(warehouse, "C00000000", 1, email=SAME, first_name="Old")
    _set(warehouse, "C00000005", 3, email=SAME, first_name="New")
    cfg, crm = make_config(batch_size=2), FakeCRM()
    opts = SyncOptions(run_id="r1")
    plan = plan_fleet(cfg, None, opts, engine=warehouse.engine, max_shards=3)
    assert len(plan["shards"]) == 3
    shards = plan["shards"][::-1] if reverse else plan["shards"]
    done = [sync_shard(cfg, plan["window"], s, opts, engine=warehouse.engine, upserter=crm) for s in shards]
    out = finalize_fleet(cfg, plan, done, opts, engine=warehouse.engine, upserter=crm)
    (result,) = out["results"]
    assert "C00000000" not in dict(crm.sent)
    assert len(crm.sent) == result["created"] + result["updated"] == 5
    assert (result["quarantined"], result["displaced"]) == (1, 0)
    (contact,) = [c for c in crm.contacts.values() if c["email"] == SAME]
    assert contact["firstName"] == "New"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_a_winner_that_fails_a_check_holds_nothing_back(
    warehouse: Warehouse, make_config: Callable[..., SyncConfig], reverse: bool
) -> None:
    """The plan checks the winners that have losers: a newer row with a bad birth date will not be
    sent, so the older row is sent in its batch, once, as before."""
    seed_demo(warehouse.engine, 3, schema=warehouse.schema, start=T0, bad_share=0)
    _set(warehouse, "C00000000", 1, email=SAME)
    _set(warehouse, "C00000002", 3, email=SAME, date_of_birth="31/12/1990")
    cfg, crm = make_config(), FakeCRM()
    out = _run_batches(cfg, warehouse, crm, "r1", reverse=reverse, batch_rows=1)
    assert sorted(k for k, _ in crm.sent) == ["C00000000", "C00000001"]
    assert len(crm.sent) == out["created"] + out["updated"]
    assert "leftovers" not in out
    quarantined = {q["source_key"]: q["reason_codes"] for q in _rows(warehouse, cfg, "quarantine")}
    assert quarantined == {"C00000002": "dob_invalid"}
    assert _rows(warehouse, cfg, "pending") == []


def test_a_later_duplicate_of_a_synced_identity_still_displaces_its_owner(
    warehouse: Warehouse, make_config: Callable[..., SyncConfig]
) -> None:
    """Outside the first load's window the identities table decides, as before: a newer row in a
    later run takes the contact and the owner it displaced is quarantined as its duplicate."""
    seed_demo(warehouse.engine, 3, schema=warehouse.schema, start=T0, bad_share=0)
    cfg, crm = make_config(), FakeCRM()
    day = {"start": T0.isoformat(), "end": (T0 + timedelta(days=1)).isoformat()}
    sync(cfg, "default", day, SyncOptions(run_id="r1"), engine=warehouse.engine, upserter=crm)
    email = dict(crm.sent)["C00000000"]["email"]
    _set(warehouse, "C00000002", 30, email=email.upper(), first_name="New")
    later = {"start": (T0 + timedelta(hours=24)).isoformat(), "end": (T0 + timedelta(hours=48)).isoformat()}
    before = len(crm.sent)
    out = sync(cfg, "default", later, SyncOptions(run_id="r2"), engine=warehouse.engine, upserter=crm)
    assert (out["extracted"], out["updated"], out["displaced"]) == (1, 1, 1)
    assert {k for k, _ in crm.sent[before:]} == {"C00000002"}
    (contact,) = [c for c in crm.contacts.values() if c["email"].lower() == email.lower()]
    assert contact["firstName"] == "New"
    dup = {q["source_key"]: q["duplicate_of"] for q in _rows(warehouse, cfg, "quarantine")}
    assert dup == {"C00000000": "C00000002"}
    assert {r["source_key"] for r in _rows(warehouse, cfg, "ledger")} == {"C00000001", "C00000002"}
