"""Read-back verification: a sample of the contacts a run sent is read back from the sandbox and
compared; fields GrowthHub answered 200 to but did not store are recorded and alerted on once.
SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import test_sync_sandbox
from sqlalchemy import select, text
from sync_support import DAY, T0, Warehouse

from growthhub_provider.hooks.growthhub import GrowthHubHook
from growthhub_sandbox.testing import SandboxAdmin
from growthhub_sync import orchestration, state
from growthhub_sync.config import ConfigError, SyncConfig, VerifyConfig
from growthhub_sync.demo import contacts_table, modify_contacts, seed_demo
from growthhub_sync.fleet import sync_all
from growthhub_sync.outcomes import RUN_COUNTS, VERIFY_COUNTS
from growthhub_sync.pipeline import SyncOptions, sync
from growthhub_sync.verify import differences, pick, sample_size, verify_run

NEXT_DAY = {"start": DAY["end"], "end": (T0 + timedelta(days=2)).isoformat()}
GET = "GET /contacts/{contactId}"
crm = test_sync_sandbox.crm  # the sandbox location loc1 and the connection to it


def _fleet(cfg: SyncConfig, wh: Warehouse, run_id: str, window: Any = DAY) -> dict[str, Any]:
    return sync_all(cfg, window, SyncOptions(run_id=run_id, dag_id="tests"), engine=wh.engine)


def _run_row(wh: Warehouse, cfg: SyncConfig, run_id: str) -> dict[str, Any]:
    runs = state.state_tables(cfg.state).runs
    with wh.engine.connect() as conn:
        return dict(conn.execute(select(runs).where(runs.c.run_id == run_id)).one()._mapping)


def _regendered(wh: Warehouse, cfg: SyncConfig, n: int) -> list[str]:
    """``n`` synced rows whose gender is ``male``, changed to ``female`` the next day."""
    led, tbl = state.state_tables(cfg.state).ledger, contacts_table(wh.schema)
    with wh.engine.connect() as conn:
        keys = (
            conn.execute(
                select(tbl.c.id)
                .join(led, led.c.source_key == tbl.c.id)
                .where(tbl.c.gender == "male")
                .order_by(tbl.c.id)
                .limit(n)
            )
            .scalars()
            .all()
        )
    assert len(keys) == n
    modify_contacts(wh.engine, keys, T0 + timedelta(days=1, hours=1), schema=wh.schema, gender="female")
    return list(keys)


def _alerts(config: SyncConfig, results: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The alerts the report task's verify check sends for ``results`` (texts, as the notifiers get them)."""
    sent: list[str] = []
    monkeypatch.setattr(orchestration, "send_alert", lambda _alerts, text, _context, **_: sent.append(text))
    context: dict[str, Any] = {"dag": SimpleNamespace(dag_id="sync"), "run_id": "r2"}
    orchestration.alert_verify_breach(config, context, results)
    return sent


@pytest.mark.integration
def test_a_field_ignored_on_update_is_recorded_with_masked_examples_and_alerts_once(
    seeded: Warehouse,
    make_config: Callable[..., SyncConfig],
    crm: SandboxAdmin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = make_config(verify={"sample": 1.0})
    first = _fleet(cfg, seeded, "r1")["results"][0]
    assert first["verify_checked"] == 200  # every sent contact, up to max_rows
    assert first["verify_mismatched"] == 0
    changed = _regendered(seeded, cfg, 12)
    crm.set_faults(ignore_fields={"update": ["gender"], "create": []})
    reads = sum(crm.stats()["requests"][GET].values())

    finalized = _fleet(cfg, seeded, "r2", NEXT_DAY)
    out = finalized["results"][0]

    assert out["status"] == "success"  # a mismatch does not fail the rows' sync
    assert out["updated"] == len(changed)
    assert (out["verify_checked"], out["verify_mismatched"], out["verify_breached"]) == (12, 12, True)
    row = _run_row(seeded, cfg, "r2")
    assert (row["verify_checked"], row["verify_mismatched"]) == (12, 12)
    found = row["details"]["verify"]
    assert found["sent"] == found["sample"] == 12
    assert list(found["fields"]) == ["gender"]
    gender = found["fields"]["gender"]
    assert gender["count"] == 12
    assert len(gender["examples"]) == 3
    assert {(e["sent"], e["found"]) for e in gender["examples"]} == {("female", "male")}
    assert {e["key"] for e in gender["examples"]} <= set(changed)
    # one read per checked contact, plus the plan's access check
    assert sum(crm.stats()["requests"][GET].values()) - reads == 12 + 1

    first_example = gender["examples"][0]["key"]
    assert (
        f"read back default: 12 of 12 contacts differ: gender 12 (e.g. {first_example} sent 'female', "
        "found 'male')"
    ) in orchestration.fleet_report(finalized).splitlines()
    (alert,) = _alerts(cfg, [out], monkeypatch)
    assert alert.splitlines()[0] == (
        "GrowthHub sync: read-back found contacts GrowthHub did not store as sent (default 12 of 12 "
        "checked); fields: gender 12; see the run row's details.verify"
    )
    assert "verify_mismatched=12" in alert


@pytest.mark.integration
def test_without_a_fault_the_sample_matches_and_nothing_alerts(
    seeded: Warehouse,
    make_config: Callable[..., SyncConfig],
    crm: SandboxAdmin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = make_config()  # the defaults: 0.5 % of the sent contacts, at least one
    first = test_sync_sandbox._run(cfg, seeded, "r1")  # the CLI's single-location path
    sent = first["created"] + first["updated"] - first["displaced"]
    assert first["verify"]["sent"] == sent
    assert first["verify_checked"] == first["verify"]["sample"] == sample_size(sent, cfg.verify) > 1
    _regendered(seeded, cfg, 12)

    out = _fleet(cfg, seeded, "r2", NEXT_DAY)["results"][0]

    assert (out["verify_checked"], out["verify_mismatched"], out["verify_breached"]) == (1, 0, False)
    assert out["verify"]["fields"] == {}
    assert out["verify"]["skipped"] == {}
    assert _alerts(cfg, [out], monkeypatch) == []


@pytest.mark.integration
def test_a_contact_ignored_on_create_or_gone_is_a_difference(
    seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: SandboxAdmin
) -> None:
    crm.set_faults(ignore_fields={"create": ["city"], "update": []})
    cfg = make_config(verify={"sample": 0.05, "max_rows": 10, "threshold": 0.5})

    out = _fleet(cfg, seeded, "r1")["results"][0]

    assert out["verify_checked"] == 10  # 5 % of ~900 sent, capped at 10
    assert out["verify"]["fields"]["city"]["count"] == out["verify_mismatched"] > 5
    examples = out["verify"]["fields"]["city"]["examples"]
    assert [e["sent"][1:] for e in examples] == ["***"] * 3  # a city is personal data: its first letter
    assert {e["found"] for e in examples} == {None}
    assert out["verify_breached"]  # more than half differ

    # read again (as a retried finalize would): the same sample; a contact deleted meanwhile differs
    led = state.state_tables(cfg.state).ledger
    with seeded.engine.connect() as conn:
        contact_id = conn.execute(
            select(led.c.contact_id).where(led.c.source_key == examples[0]["key"])
        ).scalar_one()
    assert GrowthHubHook(location_id="loc1").delete_contact(contact_id)
    again = verify_run(cfg, cfg.location("default"), seeded.engine, "r1")
    assert again is not None
    assert again.checked == 10
    assert again.fields["contact"] == {
        "count": 1, "examples": [{"key": examples[0]["key"], "sent": contact_id, "found": None}]
    }  # fmt: skip
    assert again.fields["city"]["count"] == out["verify"]["fields"]["city"]["count"] - 1

    # GrowthHub failing every read (after the client's retries): nothing compared, nothing raised
    crm.set_faults(error_rate=1.0, error_statuses=[503])
    quick = GrowthHubHook(location_id="loc1", max_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.01)
    failing = verify_run(cfg, cfg.location("default"), seeded.engine, "r1", quick)
    assert failing is not None
    assert (failing.checked, failing.mismatched, failing.skipped) == (0, 0, {"unreadable": 10})
    assert crm.stats()["requests"][GET]["503"] == 20, "each read tried twice"


def test_sample_size_rules() -> None:
    default = VerifyConfig()
    assert (default.sample, default.max_rows, default.threshold) == (0.005, 200, 0.0)
    assert [sample_size(n, default) for n in (0, 1, 199, 200, 201, 1000, 40_000, 40_001, 10**6)] == [
        0, 1, 1, 1, 2, 5, 200, 200, 200,
    ]  # fmt: skip
    assert sample_size(10**6, VerifyConfig(sample=0)) == 0
    assert sample_size(1000, VerifyConfig(sample=1.0, max_rows=50)) == 50


def test_the_sample_is_the_same_whatever_the_order_and_another_each_run() -> None:
    keys = [f"C{i:05d}" for i in range(10_000)]
    first = pick(keys, 20, "r1", str)
    assert pick(list(reversed(keys)), 20, "r1", str) == first
    assert pick(keys, 200, "r1", str)[:20] == first  # the cap's pick holds every smaller one
    assert len(set(pick(keys, 20, "r2", str)) & set(first)) < 5
    assert sorted(first) != keys[:20]


def test_verify_config_errors_name_the_key(make_config: Callable[..., SyncConfig]) -> None:
    with pytest.raises(ConfigError, match=r"verify\.sample: .*less than or equal to 1"):
        make_config(verify={"sample": 5})
    with pytest.raises(ConfigError, match=r"verify\.max_rows"):
        make_config(verify={"max_rows": 0})
    with pytest.raises(ConfigError, match=r"verify\.threshold"):
        make_config(verify={"threshold": 1})
    with pytest.raises(ConfigError, match=r"verify\.samples"):
        make_config(verify={"samples": 0.1})


def test_fields_are_compared_as_growthhub_echoes_them() -> None:
    sent = {
        "locationId": "loc1",
        "email": "ann@example.com",
        "phone": "+15555550123",
        "dateOfBirth": "1990-05-17",
        "tags": ["vip", "newsletter"],
        "customFields": [{"id": "cf-1", "field_value": 12.5}, {"key": "tier", "field_value": "gold"}],
        "dndSettings": {"SMS": {"status": "active"}},
        "country": "US",
        "dnd": False,
    }
    echoed = {
        "email": "Ann@Example.com",
        "phone": "+1 555-555-0123",
        "dateOfBirth": "1990-05-17T00:00:00.000Z",
        "tags": ["newsletter", "vip", "added-by-workflow"],
        "customFields": [{"id": "cf-1", "value": 12.5}, {"id": "cf-2", "value": "gold"}],
        "dndSettings": {"SMS": {"status": "active"}, "Email": {"status": "inactive"}},
        "country": "US",
        "dnd": None,
    }
    assert differences(sent, echoed) == []
    dropped = {**echoed, "tags": ["vip"], "customFields": [], "dndSettings": {}, "firstName": "Ann"}
    assert differences({**sent, "firstName": None}, dropped) == [
        ("tags", ["vip", "newsletter"], ["vip"]),
        ("customFields.cf-1", 12.5, None),
        ("customFields.tier", "gold", None),
        ("dndSettings.SMS", "active", None),
        ("firstName", None, "Ann"),
    ]


@pytest.mark.integration
def test_reads_go_through_the_locations_rate_limit(
    warehouse: Warehouse,
    make_config: Callable[..., SyncConfig],
    crm: SandboxAdmin,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    burst = 10
    crm.put_location(
        "loc1",
        duplicateCheckFields=["email", "phone"],
        customFields=[{"id": "cf-ltv", "key": "lifetime_value", "dataType": "MONETORY"}],
        rateLimit={"burst": burst, "intervalMs": 1000, "daily": 100_000},
    )
    conn = json.loads(os.environ["AIRFLOW_CONN_GROWTHHUB_DEFAULT"])
    conn["extra"].update(rate_limit_burst=burst, rate_limit_interval_ms=1000)
    monkeypatch.setenv("AIRFLOW_CONN_GROWTHHUB_DEFAULT", json.dumps(conn))
    seed_demo(warehouse.engine, 30, schema=warehouse.schema, start=T0, bad_share=0.0)
    cfg = make_config(verify={"sample": 1.0})

    out = sync(cfg, "default", DAY, SyncOptions(run_id="r1", dag_id="tests"), engine=warehouse.engine)

    assert out["verify_checked"] == out["created"] + out["updated"] - out["displaced"] > burst
    stats = crm.stats()["requests"]
    assert all("429" not in answers for answers in stats.values()), stats
    assert stats[GET]["200"] == out["verify_checked"]
    # any second holds at most `burst` requests of the location, reads and upserts together
    buckets = [(b["start"], sum(b["answers"].values())) for b in crm.timeline("loc1", bucket_ms=100)]
    busiest = max(sum(n for t, n in buckets if start <= t < start + 0.95) for start, _ in buckets)
    assert busiest <= burst


def test_an_older_runs_table_gets_the_verify_counts(
    warehouse: Warehouse, make_config: Callable[..., SyncConfig]
) -> None:
    tables = state.state_tables(make_config().state)
    state.ensure_state(warehouse.engine, tables)
    runs = tables.runs
    name = f'"{warehouse.schema}".{runs.name}' if warehouse.schema else runs.name
    with warehouse.engine.begin() as conn:
        for column in VERIFY_COUNTS:
            conn.execute(text(f"ALTER TABLE {name} DROP COLUMN {column}"))
        values = {"run_id": "old", "location": "default", "status": "success", "dry_run": False}
        values.update(full_refresh=False, **dict.fromkeys((*RUN_COUNTS, "warnings", "batches"), 0))
        conn.execute(text(f"INSERT INTO {name} ({', '.join(values)}) VALUES (:{', :'.join(values)})"), values)

    state.ensure_state(warehouse.engine, tables)

    with warehouse.engine.connect() as conn:
        assert conn.execute(select(runs.c.verify_checked, runs.c.verify_mismatched)).all() == [(0, 0)]
