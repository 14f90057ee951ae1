"""Quota planning: a backlog bigger than the daily quota drains over the following days, oldest
first, never failing a run, each run forecasting when it is done; SQLite and PostgreSQL.

The sandbox (daily limit 500) plays GrowthHub; ``POST /_sandbox/day`` starts its next day and the
test moves the client's quota day (:func:`growthhub_provider.client.limiter.quota_day`) with it,
so four days pass in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sync_support import DAY, T0, FakeCRM, Warehouse

from growthhub_provider.client import limiter
from growthhub_provider.client.coordination import forget_local_limiters
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess
from growthhub_sync import quota, state
from growthhub_sync.config import SyncConfig
from growthhub_sync.demo import seed_demo
from growthhub_sync.fleet import sync_all
from growthhub_sync.operator_view import run_note
from growthhub_sync.orchestration import fleet_report
from growthhub_sync.pipeline import SyncOptions, sync
from growthhub_sync.upsert import growthhub_upserter

ROWS, DAILY = 2000, 500
UPSERT = "POST /contacts/upsert"


@pytest.fixture
def days(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The client's quota day, moved by the test (``days[0] += 1``) when the sandbox's moves."""
    today = limiter.quota_day()
    offset = [0]
    monkeypatch.setattr(limiter, "quota_day", lambda: today + offset[0])
    forget_local_limiters()  # no limiter of an earlier test's loc1
    yield offset
    forget_local_limiters()


@pytest.fixture
def small_quota(
    sandbox: SandboxAdmin, sandbox_server: SandboxProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> SandboxAdmin:
    """Location ``loc1`` allowing 500 requests a day (and no burst limit to wait on), its connection."""
    limits = {"burst": 100_000, "intervalMs": 10_000, "daily": DAILY}
    ltv = {"id": "cf-ltv", "key": "lifetime_value", "dataType": "MONETORY"}  # the default mapping's
    sandbox.put_location(
        "loc1", duplicateCheckFields=["email", "phone"], customFields=[ltv], rateLimit=limits
    )
    sandbox.add_token(token="tok-quota", locationId="loc1", scopes=["contacts.write", "contacts.readonly"])
    extra = {
        "location_id": "loc1",
        "max_workers": 1,  # rows leave in order: the day's 500 are exactly the 500 oldest
        "rate_limit_burst": 100_000,
        "rate_limit_daily": DAILY,
        "refresh_token_file": str(tmp_path / "rt.json"),
    }
    conn = {
        "conn_type": "growthhub",
        "host": sandbox_server.base_url,
        "password": "tok-quota",
        "extra": extra,
    }
    monkeypatch.setenv("AIRFLOW_CONN_GROWTHHUB_DEFAULT", json.dumps(conn))
    return sandbox


def _window(day: int) -> dict[str, str]:
    return {
        "start": (T0 + timedelta(days=day)).isoformat(),
        "end": (T0 + timedelta(days=day + 1)).isoformat(),
    }


def _run_row(wh: Warehouse, cfg: SyncConfig, run_id: str) -> dict[str, Any]:
    runs = state.state_tables(cfg.state).runs
    with wh.engine.connect() as conn:
        return dict(conn.execute(select(runs).where(runs.c.run_id == run_id)).one()._mapping)


@pytest.mark.integration
def test_a_backlog_of_four_days_drains_oldest_first_and_each_run_says_when_it_is_done(
    warehouse: Warehouse,
    make_config: Callable[..., SyncConfig],
    small_quota: SandboxAdmin,
    days: list[int],
) -> None:
    seed_demo(warehouse.engine, ROWS, schema=warehouse.schema, start=T0, bad_share=0.0)
    cfg = make_config(batch_size=200)  # ten key ranges, were the location not deferring
    first_day = quota.today()
    keys = sorted(str(k) for k in _source_keys(warehouse))
    sent_before: set[str] = set()
    for day in range(4):
        if day:
            assert small_quota.new_day()["dayOffset"] == day
            days[0] = day
        # the real client and limiter, without the plan's access check: its GET would spend one
        # of the day's 500 requests
        out = sync_all(
            cfg, _window(day), SyncOptions(run_id=f"day{day}", dag_id="tests"),
            engine=warehouse.engine, upserter=growthhub_upserter,
        )  # fmt: skip
        (result,) = out["results"]
        left = ROWS - DAILY * (day + 1)
        assert (result["status"], out["failed"]) == ("success", [])
        assert (result["created"], result["deferred"], result["backlog"]) == (DAILY, left, left)
        # a deferring location is one work item (its backlog first); the last day's fits: key ranges
        assert result["batches"] == (1 if left else DAILY // 200 + 1)
        forecast = result["quota"]
        assert (forecast["to_send"], forecast["quota_left"], forecast["deferred"]) == (
            left + DAILY,
            DAILY,
            left,
        )
        # the ETA: the backlog's last rows go out on the fourth day, in its run
        assert forecast["eta_days"] == 3 - day
        assert forecast["eta"] == (first_day + timedelta(days=3)).isoformat()
        assert forecast["slipped"] == (day == 0), "the backlog alerts when it appears, not while it drains"
        row = _run_row(warehouse, cfg, f"day{day}")
        assert (row["to_send"], row["quota_left"], row["quota_deferred"]) == (left + DAILY, DAILY, left)
        assert (row["backlog"], row["daily_remaining"]) == (left, 0)
        # verification's reads spend the quota too: none left after sending, none read into a 429
        verified = row["details"]["verify"]
        assert verified["skipped"] == {"daily_quota_spent": verified["sample"]}
        assert str(row["eta"])[:10] == forecast["eta"]
        # oldest first: each day sends the rows deferred longest, here the next 500 keys
        sent_now = set(_ledger_keys(warehouse, cfg)) - sent_before
        assert sorted(sent_now) == keys[DAILY * day : DAILY * (day + 1)]
        sent_before |= sent_now
        if left:
            assert f"{left:,} deferred to tomorrow" in fleet_report(out)
            assert f"on {forecast['eta']} (UTC)" in run_note(out["results"], dry_run=False)

    contacts = small_quota.contacts("loc1")
    assert len(contacts) == ROWS == len({c["id"] for c in contacts})
    requests = small_quota.stats()["requests"]
    assert requests[UPSERT] == {"200": ROWS}, "each row sent once, no 429"
    assert "GET /contacts/{contactId}" not in requests, "no read past the day's quota"
    assert sorted(_ledger_keys(warehouse, cfg)) == keys


@pytest.mark.integration
def test_runs_after_the_quota_is_spent_defer_without_failing_until_the_next_day(
    warehouse: Warehouse,
    make_config: Callable[..., SyncConfig],
    small_quota: SandboxAdmin,
    days: list[int],
) -> None:
    """The DAG's path (a fresh client per run, the plan's access check): an hourly schedule's
    second run on a spent day learns it from the check's 429 and defers its rows, no retries."""
    seed_demo(warehouse.engine, DAILY + 20, schema=warehouse.schema, start=T0, bad_share=0.0)
    cfg = make_config(batch_size=200)

    def run(run_id: str) -> dict[str, Any]:
        forget_local_limiters()  # another task process: the limiter starts from the configured quota
        out = sync_all(cfg, _window(0), SyncOptions(run_id=run_id, dag_id="tests"), engine=warehouse.engine)
        (result,) = out["results"]
        assert (result["status"], out["failed"]) == ("success", [])
        return result

    first = run("first")  # the access check spends one of the day's requests
    assert (first["created"], first["deferred"]) == (DAILY - 1, 21)
    again = run("same-day")
    assert (again["created"], again["deferred"], again["rejected"]) == (0, 21, 0)
    requests = small_quota.stats()["requests"]
    assert requests["GET /contacts/{contactId}"] == {"404": 1, "429": 1}, "one check each, not retried"
    assert requests[UPSERT] == {"200": DAILY - 1}, "no upsert sent into the spent quota"
    assert small_quota.new_day()["dayOffset"] == 1
    days[0] = 1
    assert run("next-day")["created"] == 21


@pytest.mark.integration
def test_the_daily_reserve_is_left_for_other_traffic(
    warehouse: Warehouse,
    make_config: Callable[..., SyncConfig],
    small_quota: SandboxAdmin,
    days: list[int],
) -> None:
    seed_demo(warehouse.engine, DAILY, schema=warehouse.schema, start=T0, bad_share=0.0)
    cfg = make_config(quota={"daily_reserve": 100})
    out = sync_all(
        cfg, _window(0), SyncOptions(run_id="reserved", dag_id="tests"),
        engine=warehouse.engine, upserter=growthhub_upserter,
    )  # fmt: skip
    (result,) = out["results"]
    assert (result["status"], result["created"], result["deferred"]) == ("success", DAILY - 100, 100)
    forecast = result["quota"]
    assert (forecast["quota_left"], forecast["deferred"]) == (DAILY, 100), "left today, less the reserve"
    assert result["daily_remaining"] == 100, "the reserve is not spent, on reads either"
    assert small_quota.stats()["requests"][UPSERT] == {"200": DAILY - 100}
    with pytest.raises(ValueError, match="daily_reserve"):
        make_config(quota={"daily_reserve": -1})


def _source_keys(wh: Warehouse) -> list[str]:
    from growthhub_sync.demo import contacts_table

    tbl = contacts_table(wh.schema)
    with wh.engine.connect() as conn:
        return list(conn.execute(select(tbl.c.id)).scalars())


def _ledger_keys(wh: Warehouse, cfg: SyncConfig) -> list[str]:
    led = state.state_tables(cfg.state).ledger
    with wh.engine.connect() as conn:
        return list(conn.execute(select(led.c.source_key)).scalars())


def test_rows_deferred_longest_go_out_first_whatever_their_keys(
    warehouse: Warehouse, make_config: Callable[..., SyncConfig]
) -> None:
    seed_demo(warehouse.engine, 20, schema=warehouse.schema, start=T0, bad_share=0.0)
    cfg = make_config()
    keys = sorted(_source_keys(warehouse))
    tables = state.state_tables(cfg.state)
    state.ensure_state(warehouse.engine, tables)
    with warehouse.engine.begin() as conn:  # the higher the key, the longer it has waited
        for age, key in enumerate(keys):
            store = state.StateStore(
                conn, tables, "default", run_id="earlier", now=T0 - timedelta(minutes=age)
            )
            store.mark_pending({key: "skipped: daily quota reserve reached"})
    crm = FakeCRM(quota=5)
    after = {"start": DAY["end"], "end": (T0 + timedelta(days=2)).isoformat()}  # no row changed: backlog only
    out = sync(cfg, "default", after, SyncOptions(run_id="r1"), engine=warehouse.engine, upserter=crm)
    assert [key for key, _ in crm.sent] == keys[::-1][:5]
    assert (out["created"], out["deferred"], out["backlog"]) == (5, 15, 15)
