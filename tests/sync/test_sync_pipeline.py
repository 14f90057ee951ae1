"""The pipeline on a real warehouse (SQLite and PostgreSQL) against a fake CRM.

The fake stands in for the hook's ``upsert_contacts`` contract; the sandbox + hook run in
``test_sync_sandbox.py``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Connection, Engine
from sync_support import (
    DAY,
    PG_URL,
    SESSION,
    T0,
    AuthFailure,
    FakeCRM,
    InterleavingCRM,
    Warehouse,
    make_sync_config,
)

from growthhub_sync import state
from growthhub_sync.config import ConfigError, SyncConfig
from growthhub_sync.demo import contacts_table, modify_contacts, seed_demo, touch_contacts
from growthhub_sync.extract import Window
from growthhub_sync.outcomes import OUTCOMES, OVERWRITTEN, SyncedRow
from growthhub_sync.pipeline import (
    SyncInvariantError,
    SyncOptions,
    finalize_run,
    plan_sync,
    replay_quarantine,
    sync,
    sync_batch,
)
from growthhub_sync.reasons import REASONS

NEXT_DAY = {"start": DAY["end"], "end": (T0 + timedelta(days=2)).isoformat()}


def _run(
    cfg: SyncConfig, wh: Warehouse, crm: FakeCRM, run_id: str, window: Any = DAY, **opts: Any
) -> dict[str, Any]:
    return sync(cfg, "default", window, SyncOptions(run_id=run_id, **opts), engine=wh.engine, upserter=crm)


def _rows(wh: Warehouse, cfg: SyncConfig, table: str, **where: Any) -> list[dict[str, Any]]:
    t = getattr(state.state_tables(cfg.state), table)
    stmt = select(t).where(*(t.c[k] == v for k, v in where.items()))
    with wh.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]


def _counts(summary: dict[str, Any]) -> dict[str, int]:
    return {k: summary[k] for k in ("extracted", *OUTCOMES)}


def _set(wh: Warehouse, key: str, **values: Any) -> None:
    modify_contacts(wh.engine, [key], T0 + timedelta(hours=30), schema=wh.schema, **values)


def seed_row_email(wh: Warehouse, key: str) -> str:
    tbl = contacts_table(wh.schema)
    with wh.engine.connect() as conn:
        return conn.execute(select(tbl.c.email).where(tbl.c.id == key)).scalar_one().lower()


def _key_with(wh: Warehouse, cfg: SyncConfig, code: str) -> str:
    rows = [q for q in _rows(wh, cfg, "quarantine", status="open") if code in q["reason_codes"].split(",")]
    return sorted(q["source_key"] for q in rows)[0]


@pytest.fixture
def cfg(seeded: Warehouse, make_config: Callable[..., SyncConfig]) -> SyncConfig:
    return make_config()


class TestOutcomes:
    def test_every_row_gets_one_outcome_and_the_run_row_says_so(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        out = _run(cfg, seeded, crm, "r1")
        counts = _counts(out)
        assert counts["extracted"] == 1000
        assert sum(counts[o] for o in OUTCOMES) == 1000
        assert out["created"] > 800
        assert out["quarantined"] > 50
        assert out["invariant_ok"]
        run = _rows(seeded, cfg, "runs", run_id="r1")[0]
        assert {k: run[k] for k in counts} == counts
        assert run["status"] == "success"
        assert run["invariant_ok"] is True

    def test_quality_failures_are_quarantined_with_reasons(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        out = _run(cfg, seeded, crm, "r1")
        rows = _rows(seeded, cfg, "quarantine")
        assert len(rows) == out["quarantined"] + out["displaced"]
        assert {r["stage"] for r in rows} == {"quality"}
        assert set(out["reasons"]) >= {
            "email_invalid", "phone_invalid", "dob_invalid", "no_identity", "duplicate_identity",
        }  # fmt: skip
        assert set(out["reasons"]) <= set(REASONS)
        assert all(r["errors"] and r["status"] == "open" and r["attempts"] == 1 for r in rows)
        # each row's codes, counted once per row and code
        counted = Counter(c for r in rows if r["reason_codes"] for c in r["reason_codes"].split(","))
        assert counted == out["reasons"]

    def test_a_row_without_identity_says_whether_it_gave_an_email_or_phone(
        self, warehouse: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        seed_demo(warehouse.engine, 5, schema=warehouse.schema, start=T0, bad_share=0)
        _set(warehouse, "C00000000", email=None, phone=None)
        _set(warehouse, "C00000001", email="ann@", phone=None)
        _set(warehouse, "C00000002", email=None, phone="12345")
        _set(warehouse, "C00000003", email="ann@", phone="12345", date_of_birth="31/12/1990")
        _set(warehouse, "C00000004", email="ann@")  # with a valid phone
        cfg = make_config()
        out = sync(cfg, "default", None, SyncOptions(run_id="r1"), engine=warehouse.engine, upserter=crm)
        rows = {q["source_key"]: q for q in _rows(warehouse, cfg, "quarantine")}
        assert {k: q["reason_codes"] for k, q in rows.items()} == {
            "C00000000": "no_identity",
            "C00000001": "email_invalid",
            "C00000002": "phone_invalid",
            "C00000003": "email_invalid,phone_invalid,dob_invalid",
            "C00000004": "email_invalid",
        }
        assert rows["C00000000"]["errors"] == ["identity: neither an email nor a phone given"]
        assert rows["C00000001"]["errors"][0] == "identity: email invalid and no phone given"
        assert out["reasons"] == {"no_identity": 1, "email_invalid": 3, "phone_invalid": 2, "dob_invalid": 1}

    def test_api_rejection_is_quarantined_with_the_api_messages(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        crm.reject["C00000001"] = ["email must be an email"]
        out = _run(cfg, seeded, crm, "r1")
        assert out["rejected"] == 1
        assert out["messages"] == {"email must be an email": 1}
        assert out["reasons"]["api_422"] == 1
        (row,) = _rows(seeded, cfg, "quarantine", source_key="C00000001")
        assert (row["stage"], row["http_status"], row["errors"]) == ("api", 422, ["email must be an email"])
        assert row["reason_codes"] == "api_422"
        assert row["payload"]["locationId"] == "loc1"

    def test_duplicates_in_a_batch_latest_wins(
        self, warehouse: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        seed_demo(warehouse.engine, 3, schema=warehouse.schema, start=T0, bad_share=0)
        for key, hour in (("C00000000", 1), ("C00000001", 3), ("C00000002", 2)):
            _set(warehouse, key, email="same@example.com", updated_at=T0 + timedelta(hours=hour))
        cfg = make_config()
        out = sync(cfg, "default", None, SyncOptions(run_id="r1"), engine=warehouse.engine, upserter=crm)
        assert (out["created"], out["quarantined"]) == (1, 2)
        assert [k for k, _ in crm.sent] == ["C00000001"]
        errors = {q["source_key"]: q["errors"] for q in _rows(warehouse, cfg, "quarantine")}
        assert errors == {k: ["duplicate identity of C00000001"] for k in ("C00000000", "C00000002")}
        assert out["reasons"] == {"duplicate_identity": 2}
        assert {q["reason_codes"] for q in _rows(warehouse, cfg, "quarantine")} == {"duplicate_identity"}

    def test_duplicates_in_different_chunks_latest_wins(
        self, warehouse: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        seed_demo(warehouse.engine, 3, schema=warehouse.schema, start=T0, bad_share=0)
        for key, hour in (("C00000000", 1), ("C00000002", 3)):
            _set(warehouse, key, email="same@example.com", updated_at=T0 + timedelta(hours=hour))
        cfg = make_config(batch_size=1)
        out = sync(cfg, "default", None, SyncOptions(run_id="r1"), engine=warehouse.engine, upserter=crm)
        # the older row's chunk goes first (key order), but the plan decided the winner for the
        # whole window: the older row is held back, never sent, and the newer one creates the contact
        assert (out["created"], out["updated"], out["displaced"], out["quarantined"]) == (2, 0, 0, 1)
        assert [k for k, _ in crm.sent] == ["C00000001", "C00000002"]
        assert {r["source_key"] for r in _rows(warehouse, cfg, "ledger")} == {"C00000001", "C00000002"}
        (q,) = _rows(warehouse, cfg, "quarantine")
        assert (q["source_key"], q["errors"], q["duplicate_of"]) == (
            "C00000000",
            ["duplicate identity of C00000002"],
            "C00000002",
        )
        (contact,) = [c for c in crm.contacts.values() if c["email"] == "same@example.com"]
        assert contact.items() >= dict(crm.sent)["C00000002"].items()  # upserts leave other fields
        again = sync(cfg, "default", None, SyncOptions(run_id="r2"), engine=warehouse.engine, upserter=crm)
        assert (again["unchanged"], again["quarantined"], again["displaced"]) == (2, 1, 0)
        assert (again["reasons"], again["still_quarantined"]) == ({}, 1)
        assert len(crm.sent) == 2

    def test_an_older_row_in_a_later_chunk_is_quarantined_and_never_sent(
        self, warehouse: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        seed_demo(warehouse.engine, 3, schema=warehouse.schema, start=T0, bad_share=0)
        for key, hour in (("C00000000", 3), ("C00000002", 1)):
            _set(warehouse, key, email="same@example.com", updated_at=T0 + timedelta(hours=hour))
        cfg = make_config(batch_size=1)
        out = sync(cfg, "default", None, SyncOptions(run_id="r1"), engine=warehouse.engine, upserter=crm)
        assert (out["created"], out["quarantined"], out["displaced"]) == (2, 1, 0)
        assert "C00000002" not in dict(crm.sent)
        assert _rows(warehouse, cfg, "quarantine")[0]["errors"] == ["duplicate identity of C00000000"]

    def test_a_newer_row_in_a_later_run_takes_the_identity_and_the_loser_can_win_it_back(
        self, warehouse: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        seed_demo(warehouse.engine, 3, schema=warehouse.schema, start=T0, bad_share=0)
        cfg = make_config()
        sync(cfg, "default", None, SyncOptions(run_id="r1"), engine=warehouse.engine, upserter=crm)
        email = dict(crm.sent)["C00000000"]["email"]
        _set(warehouse, "C00000002", email=email.upper(), updated_at=T0 + timedelta(hours=40))
        out = sync(cfg, "default", None, SyncOptions(run_id="r2"), engine=warehouse.engine, upserter=crm)
        assert (out["updated"], out["displaced"]) == (1, 1)
        assert "C00000000" not in {r["source_key"] for r in _rows(warehouse, cfg, "ledger")}
        # the winner moves to another email: its old identity is free, and the loser (outside the
        # run's window) is decided again when the run finalises
        _set(warehouse, "C00000002", email="elsewhere@example.com", updated_at=T0 + timedelta(hours=41))
        later = {
            "start": (T0 + timedelta(hours=41)).isoformat(),
            "end": (T0 + timedelta(hours=42)).isoformat(),
        }
        out = sync(cfg, "default", later, SyncOptions(run_id="r3"), engine=warehouse.engine, upserter=crm)
        assert (out["extracted"], out["updated"]) == (1, 1)
        assert out["leftovers"]["extracted"] == 1
        assert out["leftovers"]["created"] + out["leftovers"]["updated"] == 1
        assert {r["source_key"] for r in _rows(warehouse, cfg, "ledger")} == {
            f"C0000000{i}" for i in range(3)
        }
        assert _rows(warehouse, cfg, "quarantine", status="open") == []
        assert _rows(warehouse, cfg, "pending") == []

    def test_a_row_the_api_rejects_gives_its_identity_back(
        self, warehouse: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        seed_demo(warehouse.engine, 3, schema=warehouse.schema, start=T0, bad_share=0)
        for key, hour in (("C00000000", 1), ("C00000002", 3)):
            _set(warehouse, key, email="same@example.com", updated_at=T0 + timedelta(hours=hour))
        crm.reject["C00000002"] = ["assignedTo: unknown user"]
        cfg = make_config(batch_size=1)
        out = sync(cfg, "default", None, SyncOptions(run_id="r1"), engine=warehouse.engine, upserter=crm)
        assert (out["rejected"], out["displaced"]) == (1, 0)  # the older row was held back, never sent
        assert out["leftovers"]["created"] == 1  # decided again at the end of the run: it wins now
        assert sorted(k for k, _ in crm.sent) == ["C00000000", "C00000001", "C00000002"]
        assert _rows(warehouse, cfg, "pending") == []
        assert {r["source_key"] for r in _rows(warehouse, cfg, "ledger")} == {"C00000000", "C00000001"}
        (q,) = _rows(warehouse, cfg, "quarantine", status="open")
        assert (q["source_key"], q["stage"]) == ("C00000002", "api")

    def test_a_row_sent_while_another_task_took_its_identity_is_quarantined_and_the_owner_resent(
        self, warehouse: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        """Two mapped tasks, one identity: the loser's write may reach the CRM last."""
        seed_demo(warehouse.engine, 2, schema=warehouse.schema, start=T0, bad_share=0)
        cfg = make_config()
        tables = state.state_tables(cfg.state)
        identity = f"email:{seed_row_email(warehouse, 'C00000000')}"

        def other_task_claims(conn: Connection) -> None:
            store = state.StateStore(conn, tables, "default", run_id="r1")
            store.owners_of([identity])
            store.claim_identities({identity: "C99"})
            store.record_synced([SyncedRow("C99", "c-other", "h", "s")])

        crm = InterleavingCRM(engine=warehouse.engine, meanwhile=other_task_claims)
        out = sync(cfg, "default", None, SyncOptions(run_id="r1"), engine=warehouse.engine, upserter=crm)
        assert out["invariant_ok"]
        assert (out["created"], out["quarantined"]) == (1, 1)
        (q,) = _rows(warehouse, cfg, "quarantine")
        assert (q["source_key"], q["duplicate_of"]) == ("C00000000", "C99")
        # C99 is not in the source: the run cannot settle it, so the next run will send it
        (p,) = _rows(warehouse, cfg, "pending")
        assert (p["source_key"], p["reason"]) == ("C99", OVERWRITTEN)
        assert _rows(warehouse, cfg, "ledger", source_key="C99")[0]["payload_hash"] == ""

    def test_a_row_whose_identity_was_freed_while_sending_is_decided_again_at_the_end(
        self, warehouse: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        seed_demo(warehouse.engine, 1, schema=warehouse.schema, start=T0, bad_share=0)
        cfg = make_config()
        tables = state.state_tables(cfg.state)

        crm = InterleavingCRM(  # another task displaced this row, then gave the identity up
            engine=warehouse.engine,
            meanwhile=lambda conn: state.StateStore(conn, tables, "default").release_owned(["C00000000"]),
        )
        out = sync(cfg, "default", None, SyncOptions(run_id="r1"), engine=warehouse.engine, upserter=crm)
        assert (out["created"], out["deferred"]) == (0, 1)
        assert (out["leftovers"]["extracted"], out["leftovers"]["updated"]) == (1, 1)
        assert [k for k, _ in crm.sent] == ["C00000000", "C00000000"]
        assert [r["source_key"] for r in _rows(warehouse, cfg, "ledger")] == ["C00000000"]
        assert _rows(warehouse, cfg, "pending") == []

    def test_a_row_displacing_an_owner_the_run_never_recorded_is_sent_again_at_the_end(
        self, warehouse: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        """The owner's task sent it and was killed before recording it: its write may land last."""
        seed_demo(warehouse.engine, 3, schema=warehouse.schema, start=T0, bad_share=0)
        for key, hour in (("C00000000", 1), ("C00000002", 3)):
            _set(warehouse, key, email="same@example.com", updated_at=T0 + timedelta(hours=hour))
        cfg = make_config()
        opts = SyncOptions(run_id="r1")
        plan = plan_sync(cfg, "default", None, engine=warehouse.engine, options=opts, check_connection=False)
        with warehouse.engine.begin() as conn:  # what the killed try left: a claim, no ledger row
            store = state.StateStore(conn, state.state_tables(cfg.state), "default", run_id="r1")
            store.claim_free_identities({"email:same@example.com": "C00000000"})
        only_c2 = {"lo": "C00000001", "hi": None}
        out = sync_batch(cfg, "default", plan["window"], only_c2, opts, engine=warehouse.engine, upserter=crm)
        assert (out["created"], out["displaced"]) == (1, 1)
        final = finalize_run(
            cfg, "default", plan["window"], [out], opts, engine=warehouse.engine, upserter=crm
        )
        assert final["leftovers"]["extracted"] == 1
        assert [k for k, _ in crm.sent] == ["C00000002", "C00000002"]
        assert _rows(warehouse, cfg, "pending") == []

    def test_the_owner_of_a_raced_identity_is_sent_again_when_the_run_finalises(
        self, warehouse: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        """The loser's flush came first: the owner's own flush cannot tell whose write was last."""
        seed_demo(warehouse.engine, 2, schema=warehouse.schema, start=T0, bad_share=0)
        cfg = make_config()
        tables = state.state_tables(cfg.state)

        crm = InterleavingCRM(  # the other task flushed its loser while this batch was being sent
            engine=warehouse.engine,
            meanwhile=lambda conn: state.StateStore(conn, tables, "default", run_id="r1").mark_pending(
                {"C00000001": OVERWRITTEN}
            ),
        )
        out = sync(cfg, "default", None, SyncOptions(run_id="r1"), engine=warehouse.engine, upserter=crm)
        assert out["created"] == 2
        assert out["leftovers"]["extracted"] == 1
        assert [k for k, _ in crm.sent] == ["C00000000", "C00000001", "C00000001"]
        assert _rows(warehouse, cfg, "pending") == []
        assert _rows(warehouse, cfg, "ledger", source_key="C00000001")[0]["payload_hash"] != ""

    def test_warning_check_drops_the_field_and_sends_the_row(
        self, seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        cfg = make_config(quality__errors=["identity", "email", "phone", "dateOfBirth"])
        _set(seeded, "C00000001", website="ftp://x", country="XX", updated_at=T0 + timedelta(hours=1))
        out = _run(cfg, seeded, crm, "r1")
        assert out["warnings"] >= 1
        payload = dict(crm.sent)["C00000001"]
        assert "website" not in payload
        assert "country" not in payload
        assert payload["email"]

    def test_auth_error_fails_the_run_after_recording_what_was_sent(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        crm.auth_error_after = 10
        with pytest.raises(AuthFailure):
            _run(cfg, seeded, crm, "r1")
        assert len(_rows(seeded, cfg, "ledger")) == 10


class TestIdempotency:
    def test_same_window_twice_sends_nothing_and_duplicates_nothing(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        first = _run(cfg, seeded, crm, "r1")
        synced = first["created"] + first["updated"] - first["displaced"]
        sent = len(crm.sent)
        second = _run(cfg, seeded, crm, "r2")
        assert len(crm.sent) == sent
        assert second["unchanged"] == synced
        assert second["quarantined"] == first["quarantined"] + first["displaced"]
        assert second["created"] == second["updated"] == second["displaced"] == 0
        assert (second["reasons"], second["still_quarantined"]) == ({}, second["quarantined"])
        assert second["reject_rate"] == 0
        _run(cfg, seeded, crm, "r2")  # a retried run
        assert len(_rows(seeded, cfg, "ledger")) == synced
        assert len(_rows(seeded, cfg, "quarantine")) == first["quarantined"] + first["displaced"]
        assert len(_rows(seeded, cfg, "runs")) == 2

    def test_a_pending_row_inside_the_window_is_extracted_once(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        _run(cfg, seeded, crm, "r1")
        with seeded.engine.begin() as conn:
            store = state.StateStore(conn, state.state_tables(cfg.state), "default", run_id="r1")
            store.mark_pending({"C00000003": "test"})
        again = _run(cfg, seeded, crm, "r2")
        assert again["extracted"] == 1000
        assert _rows(seeded, cfg, "pending") == []

    def test_touched_but_unchanged_rows_are_not_sent(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        _run(cfg, seeded, crm, "r1")
        sent = len(crm.sent)
        touch_contacts(seeded.engine, T0 + timedelta(hours=30), schema=seeded.schema)
        out = _run(cfg, seeded, crm, "r2", NEXT_DAY)
        assert out["extracted"] == 1000
        assert len(crm.sent) == sent

    def test_only_changed_rows_are_sent(self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM) -> None:
        _run(cfg, seeded, crm, "r1")
        crm.sent.clear()
        modify_contacts(
            seeded.engine, ["C00000002", "C00000003"], T0 + timedelta(hours=30), schema=seeded.schema
        )
        touch_contacts(seeded.engine, T0 + timedelta(hours=30), schema=seeded.schema, keys=["C00000004"])
        out = _run(cfg, seeded, crm, "r2", NEXT_DAY)
        assert sorted(k for k, _ in crm.sent) == ["C00000002", "C00000003"]
        assert (out["extracted"], out["updated"], out["unchanged"]) == (3, 2, 1)

    def test_full_refresh_ignores_window_and_ledger(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        first = _run(cfg, seeded, crm, "r1")
        out = _run(cfg, seeded, crm, "r2", NEXT_DAY, full_refresh=True)
        assert out["extracted"] == 1000
        assert out["updated"] == first["created"] + first["updated"] - first["displaced"]


class TestQuarantine:
    def test_failing_again_updates_the_open_row(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        _run(cfg, seeded, crm, "r1")
        key = _key_with(seeded, cfg, "email_invalid")
        _run(cfg, seeded, crm, "r1")  # the same run retried: not a new attempt
        _run(cfg, seeded, crm, "r2")
        (row,) = _rows(seeded, cfg, "quarantine", source_key=key)
        assert (row["attempts"], row["run_id"], row["status"]) == (2, "r2", "open")

    def test_fixed_row_is_resolved_by_the_next_run(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        _run(cfg, seeded, crm, "r1")
        key = _key_with(seeded, cfg, "email_invalid")
        _set(seeded, key, email="fixed@example.com")
        out = _run(cfg, seeded, crm, "r2", NEXT_DAY)
        assert out["created"] == 1
        (row,) = _rows(seeded, cfg, "quarantine", source_key=key)
        assert row["status"] == "resolved"
        assert row["resolved_at"] is not None
        assert _rows(seeded, cfg, "ledger", source_key=key)

    def test_reverted_row_is_resolved_without_sending(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        _run(cfg, seeded, crm, "r1")
        _set(seeded, "C00000001", email="broken@")
        _run(cfg, seeded, crm, "r2", NEXT_DAY)
        original = dict(crm.sent)["C00000001"]["email"]
        crm.sent.clear()
        modify_contacts(
            seeded.engine,
            ["C00000001"],
            T0 + timedelta(hours=40),
            schema=seeded.schema,
            email=original,
            city="Dolomite",
        )
        _set(seeded, "C00000001", email=original)
        _run(
            cfg, seeded, crm, "r3", {"start": NEXT_DAY["start"], "end": (T0 + timedelta(days=3)).isoformat()}
        )
        (row,) = _rows(seeded, cfg, "quarantine", source_key="C00000001")
        assert row["status"] == "resolved"

    def test_replay_resolves_fixed_rows_and_counts_still_bad_ones(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        first = _run(cfg, seeded, crm, "r1")
        fixed = _key_with(seeded, cfg, "phone_invalid")
        _set(seeded, fixed, phone="+1 202 555 0100", email=None)
        gone = _key_with(seeded, cfg, "email_invalid")
        with seeded.engine.begin() as conn:
            tbl = contacts_table(seeded.schema)
            conn.execute(tbl.delete().where(tbl.c.id == gone))
        out = replay_quarantine(
            cfg, "default", SyncOptions(run_id="replay1"), engine=seeded.engine, upserter=crm
        )
        assert out["selected"] == first["quarantined"] + first["displaced"]
        assert out["gone_from_source"] == 1
        assert out["created"] + out["updated"] == 1
        assert _rows(seeded, cfg, "quarantine", source_key=fixed)[0]["status"] == "resolved"
        assert _rows(seeded, cfg, "quarantine", source_key=gone)[0]["status"] == "ignored"
        still = _rows(seeded, cfg, "quarantine", status="open")
        assert len(still) == out["selected"] - 2
        assert all(r["attempts"] == 2 for r in still)

    def test_replay_filters_by_stage_and_reason_code(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        _run(cfg, seeded, crm, "r1")
        out = replay_quarantine(
            cfg,
            "default",
            SyncOptions(run_id="replay1"),
            reason=["dob_invalid"],
            stage="quality",
            max_rows=3,
            engine=seeded.engine,
            upserter=crm,
        )
        assert out["selected"] == 3
        assert out["quarantined"] == 3
        replayed = _rows(seeded, cfg, "quarantine", run_id="replay1")
        assert len(replayed) == 3
        assert all("dob_invalid" in q["reason_codes"].split(",") for q in replayed)

    def test_replay_of_chosen_keys_sends_only_those(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        _run(cfg, seeded, crm, "r1")
        keys = sorted(q["source_key"] for q in _rows(seeded, cfg, "quarantine", status="open"))[:2]
        for key in keys:
            _set(seeded, key, email=f"fixed.{key.lower()}@example.com", phone=None, date_of_birth=None)
        sent = len(crm.sent)
        out = replay_quarantine(
            cfg, "default", SyncOptions(run_id="replay1"), keys=keys, engine=seeded.engine, upserter=crm
        )
        assert (out["selected"], out["created"] + out["updated"]) == (2, 2)
        assert sorted(k for k, _ in crm.sent[sent:]) == keys


class TestDeferred:
    @pytest.mark.parametrize("cause", ["failed", "skipped"])
    def test_deferred_rows_are_picked_up_by_the_next_run(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM, cause: str
    ) -> None:
        if cause == "failed":
            crm.fail = {"C00000001", "C00000002"}
        else:
            crm.quota = 5
        first = _run(cfg, seeded, crm, "r1")
        pending = {r["source_key"] for r in _rows(seeded, cfg, "pending")}
        assert first["deferred"] == len(pending) > 0
        crm.fail, crm.quota = set(), None
        crm.sent.clear()
        out = _run(cfg, seeded, crm, "r2", NEXT_DAY)  # nothing in this window: only pending rows
        assert out["extracted"] == len(pending)
        assert out["deferred"] == 0
        assert {k for k, _ in crm.sent} <= pending
        assert _rows(seeded, cfg, "pending") == []


class TestBatches:
    def test_key_ranges_tile_the_window(self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM) -> None:
        opts = SyncOptions(run_id="r1", dag_id="growthhub_contact_sync")
        plan = plan_sync(
            cfg, "default", DAY, engine=seeded.engine, batch_rows=300, options=opts, check_connection=False
        )
        assert plan["total"] == 1000
        assert len(plan["batches"]) == 4
        assert _rows(seeded, cfg, "runs", run_id="r1")[0]["status"] == "running"
        results = [
            sync_batch(cfg, "default", plan["window"], b, opts, engine=seeded.engine, upserter=crm)
            for b in plan["batches"]
        ]
        assert [r["extracted"] for r in results] == [300, 300, 300, 100]
        out = finalize_run(cfg, "default", plan["window"], results, opts, engine=seeded.engine, upserter=crm)
        assert out["extracted"] == 1000
        assert out["batches"] == 4
        assert out["status"] == "success"
        assert len({k for k, _ in crm.sent}) == len(crm.sent)

    def test_batch_size_cuts_the_mapped_tasks_and_chunk_size_each_task(
        self, warehouse: Warehouse, make_config: Callable[..., SyncConfig]
    ) -> None:
        """One knob per meaning: key ranges of ``batch_size`` rows, sent in chunks of ``chunk_size``."""
        seed_demo(warehouse.engine, 10, schema=warehouse.schema, start=T0, bad_share=0)
        cfg = make_config(batch_size=4, chunk_size=3)
        opts = SyncOptions(run_id="r1")
        plan = plan_sync(cfg, "default", None, engine=warehouse.engine, options=opts, check_connection=False)
        assert len(plan["batches"]) == 3  # 4 + 4 + 2 rows

        class ChunkCountingCRM(FakeCRM):
            def upsert_contacts(self, rows: Any, **kwargs: Any) -> Any:
                rows = list(rows)
                calls.append(len(rows))
                return super().upsert_contacts(rows, **kwargs)

        calls: list[int] = []
        crm = ChunkCountingCRM()
        done = [
            sync_batch(cfg, "default", plan["window"], b, opts, engine=warehouse.engine, upserter=crm)
            for b in plan["batches"]
        ]
        assert calls == [3, 1, 3, 1, 2]
        assert sum(d["created"] for d in done) == 10

    def test_finalize_flags_the_reject_rate_threshold(
        self, seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        out = _run(make_config(quality__reject_rate_threshold=0.01), seeded, crm, "r1")
        assert out["threshold_breached"]
        assert out["reject_rate"] > 0.01

    def test_rows_already_in_quarantine_do_not_breach_the_threshold_again(
        self, seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        config = make_config(quality__reject_rate_threshold=0.01)
        assert _run(config, seeded, crm, "r1")["threshold_breached"]
        again = _run(config, seeded, crm, "r2")
        assert again["quarantined"] > 0, "the bad rows are still counted as quarantined"
        assert again["reject_rate"] == 0
        assert not again["threshold_breached"]

    def test_location_filter_routes_rows(
        self, seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        cfg = make_config(locations=[{"name": "ny", "location_id": "loc-ny", "filter": {"state": "NY"}}])
        out = sync(cfg, "ny", DAY, SyncOptions(run_id="r1"), engine=seeded.engine, upserter=crm)
        with seeded.engine.connect() as conn:
            tbl = contacts_table(seeded.schema)
            ny = conn.execute(select(func.count()).where(tbl.c.state == "NY")).scalar_one()
        assert out["extracted"] == ny
        assert all(p["state"] == "NY" for _, p in crm.sent)

    def test_lookback_widens_the_window(self) -> None:
        w = Window.of(DAY["start"], DAY["end"], lookback_minutes=15)
        assert w.start == T0 - timedelta(minutes=15)

    def test_unknown_column_fails_at_plan_time(
        self, seeded: Warehouse, make_config: Callable[..., SyncConfig]
    ) -> None:
        cfg = make_config(
            mapping={
                **make_config().mapping.model_dump(by_alias=True, exclude_none=True),
                "tags": {"column": "labels"},
            }
        )
        with pytest.raises(ConfigError, match=r"mapping\.tags\.column"):
            plan_sync(cfg, "default", DAY, engine=seeded.engine)


class TestDryRun:
    def test_dry_run_counts_and_samples_but_writes_nothing(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        out = _run(cfg, seeded, crm, "r1", dry_run=True)
        assert out["dry_run"]
        assert out["created"] > 800
        assert out["quarantined"] > 50
        assert sum(out[o] for o in OUTCOMES) == out["extracted"] == 1000
        assert crm.sent == []
        assert _rows(seeded, cfg, "ledger") == []
        assert _rows(seeded, cfg, "quarantine") == []
        sample = out["samples"][0]["payload"]
        assert "***" in sample.get("email", sample.get("phone", "***"))


class TestRunRecord:
    def test_counts_that_do_not_add_up_fail_the_run_and_are_recorded(
        self, seeded: Warehouse, cfg: SyncConfig
    ) -> None:
        opts = SyncOptions(run_id="r1")
        broken = {"extracted": 10, "created": 9}
        with pytest.raises(SyncInvariantError):
            finalize_run(cfg, "default", DAY, [broken], opts, engine=seeded.engine)
        (run,) = _rows(seeded, cfg, "runs", run_id="r1")
        assert (run["status"], run["invariant_ok"], run["extracted"]) == ("failed", False, 10)

    def test_run_renders_data_docs_and_keeps_validation_json(
        self, seeded: Warehouse, cfg: SyncConfig, crm: FakeCRM
    ) -> None:
        out = _run(cfg, seeded, crm, "r1")
        docs = Path(cfg.quality.data_docs_dir)
        assert out["data_docs"] == (docs / "index.html").resolve().as_uri()
        assert list((docs / "validations").rglob("*.html"))
        assert list(Path(cfg.quality.results_dir).rglob("*.json"))

    def test_data_docs_index_links_every_validation_by_name_and_loads_nothing_remote(
        self, seeded: Warehouse, make_config: Callable[..., SyncConfig], crm: FakeCRM
    ) -> None:
        cfg = make_config(chunk_size=400)  # 1,000 new rows: 3 chunks, 3 validations
        _run(cfg, seeded, crm, "manual__2026-03-01T00:00:00+00:00")
        docs = Path(cfg.quality.data_docs_dir)
        results = sorted(Path(cfg.quality.results_dir).rglob("*.json"))
        index = (docs / "index.html").read_text()

        links = re.findall(
            r'<a href="(validations/[^"]+)">([^<]+)</a></td><td>([^<]*)</td><td>([^<]*)</td>', index
        )
        assert len(links) == len(results) == 3
        for page, run, location, batch in links:
            assert (docs / page).is_file()
            assert (run, location) == ("manual__2026-03-01T00_00_00_00_00", "default")
            assert re.fullmatch(r"chunk \d+, from key \S+", batch)
        assert len({batch for *_, batch in links}) == 3
        # assets only: a hyperlink to greatexpectations.io loads nothing
        remote = re.compile(
            r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*["']?(?:https?:)?//"""
            r"""|url\(\s*['"]?(?:https?:)?//""",
            re.IGNORECASE,
        )
        pages = list(docs.rglob("*.html"))
        assert [p for p in pages if remote.search(p.read_text())] == []


@pytest.mark.integration
def test_psycopg3_warehouse_syncs_idempotently(tmp_path: Path, pg_engine: Engine, crm: FakeCRM) -> None:
    """``PostgresHook.sqlalchemy_url`` (the Airflow connection) names the psycopg 3 driver."""
    url = PG_URL.replace("+psycopg2", "+psycopg")
    engine = create_engine(url)
    wh = Warehouse("psycopg3", url, engine, f"{SESSION}_psycopg3")
    seed_demo(engine, 300, schema=wh.schema, start=T0)
    cfg = make_sync_config(wh, tmp_path)
    first = _run(cfg, wh, crm, "r1")
    second = _run(cfg, wh, crm, "r2")
    engine.dispose()
    assert first["created"] > 200
    assert second["unchanged"] == first["created"] + first["updated"]
    assert second["created"] == second["updated"] == 0
