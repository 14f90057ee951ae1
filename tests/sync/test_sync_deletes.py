"""Deletions and erasure: rows deleted in the warehouse leave GrowthHub (the real sandbox) and our
state tables, within the mass-delete guard; SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import test_sync_sandbox
import yaml
from sqlalchemy import bindparam, func, select, text
from sync_support import DAY, T0, Warehouse

from growthhub_sandbox.testing import SandboxAdmin
from growthhub_sync import __main__ as cli
from growthhub_sync import state
from growthhub_sync.config import ConfigError, SyncConfig
from growthhub_sync.fleet import finalize_fleet, plan_fleet, sync_all
from growthhub_sync.outcomes import OUTCOMES, RUN_COUNTS, VERIFY_COUNTS, QuarantineRow
from growthhub_sync.pipeline import SyncOptions

pytestmark = pytest.mark.integration
NEXT_DAY = {"start": DAY["end"], "end": (T0 + timedelta(days=2)).isoformat()}
DELETE = "DELETE /contacts/{contactId}"
DELETES = {"mode": "delete", "detect": "column", "column": "is_deleted"}
_KEYS = bindparam("keys", expanding=True)
crm = test_sync_sandbox.crm  # the sandbox location loc1 and the connection to it


def _table(wh: Warehouse) -> str:
    return f'"{wh.schema}".crm_contacts' if wh.schema else "crm_contacts"


def _add_flag_column(wh: Warehouse) -> None:
    with wh.engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {_table(wh)} ADD COLUMN is_deleted BOOLEAN"))


def _flag(wh: Warehouse, keys: Sequence[str], at: datetime = T0 + timedelta(days=1, hours=1)) -> None:
    """Flag rows deleted (a soft delete bumps ``updated_at``)."""
    stmt = text(f"UPDATE {_table(wh)} SET is_deleted = :yes, updated_at = :at WHERE id IN :keys")
    with wh.engine.begin() as conn:
        conn.execute(
            stmt.bindparams(bindparam("keys", expanding=True)), {"yes": True, "at": at, "keys": keys}
        )


def _run(cfg: SyncConfig, wh: Warehouse, run_id: str, window: Any = DAY, **opts: Any) -> dict[str, Any]:
    options = SyncOptions(run_id=run_id, dag_id="tests", **opts)
    return sync_all(cfg, window, options, engine=wh.engine)


def _rows(wh: Warehouse, table: Any, *where: Any) -> list[dict[str, Any]]:
    with wh.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table).where(*where))]


def _ledger(wh: Warehouse, cfg: SyncConfig) -> dict[str, str]:
    led = state.state_tables(cfg.state).ledger
    return {r["source_key"]: r["contact_id"] for r in _rows(wh, led)}


def _deletes_sent(crm: SandboxAdmin) -> int:
    """DELETE requests the sandbox answered, whatever their status."""
    return sum(crm.stats()["requests"].get(DELETE, {}).values())


def _synced_then_flagged(
    wh: Warehouse, make_config: Callable[..., SyncConfig], fraction: float, **deletes: Any
) -> tuple[SyncConfig, dict[str, str], list[str]]:
    """A first sync with ``deletes`` configured, then a ``fraction`` of the synced rows flagged deleted."""
    _add_flag_column(wh)
    cfg = make_config(deletes={**DELETES, **deletes})
    first = _run(cfg, wh, "r1")["results"][0]
    assert first["invariant_ok"]
    assert first["deleted"] == 0
    ledger = _ledger(wh, cfg)
    doomed = sorted(ledger)[: round(fraction * len(ledger))]
    _flag(wh, doomed)
    return cfg, ledger, doomed


def test_flagged_rows_are_deleted_in_the_crm_and_leave_every_state_table(
    seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: SandboxAdmin
) -> None:
    cfg, ledger, doomed = _synced_then_flagged(seeded, make_config, 0.01)
    tables = state.state_tables(cfg.state)
    with seeded.engine.begin() as conn:  # a quarantine and a pending row of doomed keys
        store = state.StateStore(conn, tables, "default", "r1")
        store.quarantine(
            [QuarantineRow(doomed[0], "api", ["422: bad"], ("api_422",), {"email": "x@y.z"}, None)]
        )
        store.mark_pending({doomed[1]: "no outcome"})
    # a row that never synced (quarantined by the first run), flagged: its quarantine row goes too
    quarantined = [r["source_key"] for r in _rows(seeded, tables.quarantine)]
    never_synced = next(k for k in quarantined if k not in ledger)
    _flag(seeded, [never_synced])
    assert _hook().delete_contact(ledger[doomed[2]])  # deleted by hand: the run's DELETE answers 404
    contacts_before = len(crm.contacts("loc1"))

    out = _run(cfg, seeded, "r2", NEXT_DAY)["results"][0]

    assert out["status"] == "success"
    assert out["invariant_ok"]
    erased = [*doomed, never_synced]
    assert out["deleted"] == len(erased) == out["extracted"] - sum(out[o] for o in OUTCOMES if o != "deleted")
    assert {c["id"] for c in crm.contacts("loc1")}.isdisjoint(ledger[k] for k in doomed)
    assert len(crm.contacts("loc1")) == contacts_before - (len(doomed) - 1)
    assert set(_ledger(seeded, cfg)) == set(ledger) - set(doomed)
    for table in (tables.quarantine, tables.pending, tables.identities):
        assert _rows(seeded, table, table.c.source_key.in_(erased)) == []
    run = _rows(seeded, tables.runs, tables.runs.c.run_id == "r2")[0]
    assert run["deleted"] == len(erased)
    sent = _deletes_sent(crm)
    assert _run(cfg, seeded, "r3", NEXT_DAY)["results"] == []  # nothing more to delete: a quiet run
    assert _deletes_sent(crm) == sent


def _hook() -> Any:
    """The real client, through the hook of the test connection."""
    from growthhub_provider.hooks.growthhub import GrowthHubHook

    return GrowthHubHook(growthhub_conn_id="growthhub_default", location_id="loc1")


def test_delete_contact_answers_whether_it_deleted(crm: SandboxAdmin) -> None:
    hook = _hook()
    contact = hook.upsert_contact({"email": "erase.me@example.com"})
    assert hook.delete_contact(contact.contact_id) is True
    assert hook.delete_contact(contact.contact_id) is False  # 404: already gone, done
    assert crm.contacts("loc1") == []


def test_rows_missing_from_the_source_are_deleted_on_a_full_refresh_only(
    seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: SandboxAdmin
) -> None:
    cfg = make_config(deletes={"mode": "delete", "detect": "missing"})
    _run(cfg, seeded, "r1")
    ledger = _ledger(seeded, cfg)
    removed = sorted(ledger)[:5]
    stmt = text(f"DELETE FROM {_table(seeded)} WHERE id IN :keys").bindparams(
        bindparam("keys", expanding=True)
    )
    with seeded.engine.begin() as conn:
        conn.execute(stmt, {"keys": removed})

    incremental = _run(cfg, seeded, "r2", NEXT_DAY)["results"]
    assert sum(r["deleted"] for r in incremental) == 0
    assert _deletes_sent(crm) == 0
    full = _run(cfg, seeded, "r3", full_refresh=True)["results"][0]

    assert full["invariant_ok"]
    assert full["deleted"] == len(removed)
    assert _deletes_sent(crm) == len(removed)
    assert set(_ledger(seeded, cfg)) == set(ledger) - set(removed)
    assert {c["id"] for c in crm.contacts("loc1")}.isdisjoint(ledger[k] for k in removed)


def test_tag_mode_keeps_the_contact_and_its_tags_and_adds_the_tag(
    seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: SandboxAdmin
) -> None:
    cfg, ledger, doomed = _synced_then_flagged(seeded, make_config, 0.005, mode="tag", tag="gone-from-dwh")
    before = {c["id"]: c for c in crm.contacts("loc1")}

    out = _run(cfg, seeded, "r2", NEXT_DAY)["results"][0]

    assert out["invariant_ok"]
    assert out["deleted"] == len(doomed)
    assert _deletes_sent(crm) == 0
    after = {c["id"]: c for c in crm.contacts("loc1")}
    assert set(after) == set(before)
    for key in doomed:
        contact_id = ledger[key]
        assert after[contact_id]["tags"] == [*(before[contact_id].get("tags") or []), "gone-from-dwh"]
    untouched = next(k for k in ledger if k not in doomed)
    assert "gone-from-dwh" not in (after[ledger[untouched]].get("tags") or [])
    # no longer synced: a later run neither tags them again nor skips them if they come back
    assert set(_ledger(seeded, cfg)) == set(ledger) - set(doomed)


def test_tagging_missing_rows_happens_once_whatever_the_full_refreshes(
    seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: SandboxAdmin
) -> None:
    cfg = make_config(
        deletes={"mode": "tag", "detect": "missing", "tag": "gone", "max_fraction": 0.04},
        verify={"sample": 0},  # its reads would be GETs too
    )
    _run(cfg, seeded, "r1")
    ledger = _ledger(seeded, cfg)
    stmt = text(f"DELETE FROM {_table(seeded)} WHERE id IN :keys").bindparams(_KEYS)
    cut = int(0.04 * len(ledger))
    first, second = sorted(ledger)[:cut], sorted(ledger)[cut : cut + 1]  # each within 4 %, not together
    assert len(first) >= 1
    with seeded.engine.begin() as conn:
        conn.execute(stmt, {"keys": first})
    assert _run(cfg, seeded, "r2", full_refresh=True)["results"][0]["deleted"] == len(first)
    requests = crm.stats()["requests"]
    with seeded.engine.begin() as conn:
        conn.execute(stmt, {"keys": second})

    out = _run(cfg, seeded, "r3", full_refresh=True)

    assert out["failed"] == [], "the contacts tagged by r2 no longer count against the guard"
    assert out["results"][0]["deleted"] == len(second)
    reads = "GET /contacts/{contactId}"  # a tag reads the contact's tags first (the 404s: access checks)
    assert crm.stats()["requests"][reads]["200"] - requests[reads]["200"] == len(second)


def test_mass_delete_stops_before_sending_any_unless_allowed(
    seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: SandboxAdmin
) -> None:
    cfg, ledger, doomed = _synced_then_flagged(seeded, make_config, 0.1)  # over max_fraction 5 %
    upserts = crm.stats()["requests"]["POST /contacts/upsert"]

    out = _run(cfg, seeded, "r2", NEXT_DAY)

    assert out["failed"] == ["default"]
    assert out["results"][0]["status"] == "failed"
    assert "allow_mass_delete" in out["results"][0]["error"]
    assert "deletes" in out["results"][0]["error"]
    assert _deletes_sent(crm) == 0
    assert crm.stats()["requests"]["POST /contacts/upsert"] == upserts  # the location sent nothing
    assert _ledger(seeded, cfg) == ledger

    allowed = _run(cfg, seeded, "r3", NEXT_DAY, allow_mass_delete=True)["results"][0]
    assert allowed["status"] == "success"
    assert allowed["deleted"] == len(doomed)
    assert _deletes_sent(crm) == len(doomed)


def test_the_cli_sync_applies_deletes_too(
    seeded: Warehouse,
    make_config: Callable[..., SyncConfig],
    crm: SandboxAdmin,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg, ledger, doomed = _synced_then_flagged(seeded, make_config, 0.01)
    config_file = tmp_path / "sync.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True, exclude_none=True)))
    window = ["--start", NEXT_DAY["start"], "--end", NEXT_DAY["end"]]
    capsys.readouterr()  # what the first run printed

    cli.main(["--config", str(config_file), "--url", seeded.url, "sync", "--run-id", "r2", *window])

    printed = capsys.readouterr().out  # the run's log lines, then its summary
    out = json.loads(printed[[m.start() for m in re.finditer(r"(?m)^\{$", printed)][-1] :])
    assert (out["location"], out["deleted"], out["invariant_ok"]) == ("default", len(doomed), True)
    assert _deletes_sent(crm) == len(doomed)
    assert set(_ledger(seeded, cfg)) == set(ledger) - set(doomed)


def test_the_guard_holds_a_big_location_back_in_the_plan_before_any_shard_runs(
    seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: SandboxAdmin
) -> None:
    cfg, ledger, doomed = _synced_then_flagged(seeded, make_config, 0.1)
    touched = [k for k in sorted(ledger) if k not in doomed][:30]
    stmt = text(f"UPDATE {_table(seeded)} SET updated_at = :at WHERE id IN :keys").bindparams(_KEYS)
    with seeded.engine.begin() as conn:  # rows to sync in the same window: several work items
        conn.execute(stmt, {"at": T0 + timedelta(days=1, hours=2), "keys": touched})
    options = SyncOptions(run_id="r2", dag_id="tests")

    plan = plan_fleet(cfg, NEXT_DAY, options, engine=seeded.engine, batch_rows=10)

    assert plan["locations"] == {"default": len(touched)}
    assert plan["shards"] == [], "no work item of a held-back location reaches a shard"
    out = finalize_fleet(cfg, plan, [], options, engine=seeded.engine)
    assert out["failed"] == ["default"]
    assert out["results"][0]["error"].startswith("mass delete held back for location default: deletes: ")
    assert _deletes_sent(crm) == 0


def test_ignore_is_the_default_and_changes_nothing(
    seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: SandboxAdmin
) -> None:
    _add_flag_column(seeded)
    cfg = make_config()
    assert cfg.deletes.mode == "ignore"
    _run(cfg, seeded, "r1")
    ledger = _ledger(seeded, cfg)
    _flag(seeded, sorted(ledger)[:10])
    contacts = len(crm.contacts("loc1"))

    out = _run(cfg, seeded, "r2", NEXT_DAY)["results"][0]

    assert out["deleted"] == 0
    assert out["extracted"] == 10
    assert _deletes_sent(crm) == 0
    assert len(crm.contacts("loc1")) == contacts
    assert _ledger(seeded, cfg) == ledger


def test_deletes_config_errors_name_the_key(make_config: Callable[..., SyncConfig]) -> None:
    with pytest.raises(ConfigError, match=r"deletes: column: detect: column needs"):
        make_config(deletes={"mode": "delete"})
    with pytest.raises(ConfigError, match=r"deletes\.max_fraction"):
        make_config(deletes={"mode": "tag", "detect": "missing", "max_fraction": 2})


def test_an_older_runs_table_gets_the_deleted_count(
    warehouse: Warehouse, make_config: Callable[..., SyncConfig]
) -> None:
    tables = state.state_tables(make_config().state)
    state.ensure_state(warehouse.engine, tables)
    runs = tables.runs
    name = f'"{warehouse.schema}".{runs.name}' if warehouse.schema else runs.name
    with warehouse.engine.begin() as conn:
        for column in ("deleted", *VERIFY_COUNTS):  # the release before deletes had none of them
            conn.execute(text(f"ALTER TABLE {name} DROP COLUMN {column}"))
        counts = [c for c in (*RUN_COUNTS, "warnings", "batches") if c != "deleted"]
        values = {"run_id": "old", "location": "default", "status": "success", **dict.fromkeys(counts, 0)}
        values.update(dry_run=False, full_refresh=False)
        columns = ", ".join(values)
        conn.execute(text(f"INSERT INTO {name} ({columns}) VALUES (:{', :'.join(values)})"), values)

    state.ensure_state(warehouse.engine, tables)

    with warehouse.engine.connect() as conn:
        assert conn.execute(select(runs.c.deleted, func.count()).group_by(runs.c.deleted)).all() == [(0, 1)]
