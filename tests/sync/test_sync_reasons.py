"""Reason codes: stored with each quarantine row, migrated onto older tables, filtered in SQL,
counted by alerts and reports."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sync_support import Warehouse

from growthhub_sync import __main__ as cli
from growthhub_sync import state
from growthhub_sync.alerts import format_alert
from growthhub_sync.config import SyncConfig
from growthhub_sync.orchestration import summary_table, top_errors
from growthhub_sync.outcomes import QuarantineRow
from growthhub_sync.reasons import describe, join_codes

IDENTITY = "identity: neither a valid email nor a valid phone"  # the text an older release wrote
LEGACY: list[tuple[dict[str, Any], str]] = [
    ({"errors": [IDENTITY]}, "no_identity"),
    ({"errors": [IDENTITY, "email: There must be something after the @-sign."]}, "email_invalid"),
    (
        {
            "errors": [
                IDENTITY,
                "email: invalid",
                "phone: not a valid number (default region US)",
                "dateOfBirth: in the future",
            ]
        },
        "email_invalid,phone_invalid,dob_invalid",
    ),
    (
        {"errors": ["gender: 'robot' is not one of male, female, other", "country: invalid"]},
        "gender_invalid,country_invalid",
    ),
    ({"errors": ["dndSettings.SMS: 'maybe' is not one of active, inactive, permanent"]}, "dnd_invalid"),
    ({"errors": ["inboundDndSettings: 'x' is not one of active, inactive"]}, "dnd_invalid"),
    ({"errors": ["timezone: 'Mars/Olympus' is not an IANA time zone"]}, "timezone_invalid"),
    ({"errors": ["website: not an http(s) URL with a host name"]}, "website_invalid"),
    ({"errors": ["duplicate identity of C1"], "duplicate_of": "C1"}, "duplicate_identity"),
    ({"errors": ["email must be an email"], "stage": "api", "http_status": 422}, "api_422"),
    ({"errors": ["bad request"], "stage": "api", "http_status": 400}, "api_400"),
    ({"errors": ["conflict"], "stage": "api", "http_status": 409}, "api_409"),
    ({"errors": ["email: invalid"], "status": "resolved"}, "email_invalid"),
]


@pytest.fixture
def cfg(make_config: Callable[..., SyncConfig]) -> SyncConfig:
    return make_config()


def _old_table(wh: Warehouse, tables: state.StateTables) -> None:
    """The state tables as a release before reason codes left them."""
    state.ensure_state(wh.engine, tables)
    name = wh.engine.dialect.identifier_preparer.format_table(tables.quarantine)
    with wh.engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {name} DROP COLUMN reason_codes"))


def _insert_legacy(wh: Warehouse, tables: state.StateTables, rows: list[dict[str, Any]]) -> None:
    """Rows as an older release wrote them: its INSERT named no ``reason_codes``."""
    now = state.utcnow()
    base = {"location": "default", "stage": "quality", "http_status": None, "duplicate_of": None}
    base |= {"status": "open", "attempts": 1, "first_seen_at": now, "last_seen_at": now, "run_id": "old"}
    with wh.engine.begin() as conn:
        conn.execute(tables.quarantine.insert(), [{**base, **r} for r in rows])


def _codes(wh: Warehouse, tables: state.StateTables) -> dict[str, str | None]:
    q = tables.quarantine
    with wh.engine.connect() as conn:
        return dict(conn.execute(select(q.c.source_key, q.c.reason_codes)).all())


class TestMigration:
    def test_an_old_table_gets_the_column_and_every_row_its_codes(
        self, warehouse: Warehouse, cfg: SyncConfig
    ) -> None:
        tables = state.state_tables(cfg.state)
        _old_table(warehouse, tables)
        _insert_legacy(
            warehouse, tables, [{"source_key": f"K{i:02d}", **row} for i, (row, _) in enumerate(LEGACY)]
        )

        state.ensure_state(warehouse.engine, tables)

        assert _codes(warehouse, tables) == {f"K{i:02d}": codes for i, (_, codes) in enumerate(LEGACY)}

    def test_migrating_twice_changes_nothing_and_keeps_codes_written_since(
        self, warehouse: Warehouse, cfg: SyncConfig
    ) -> None:
        tables = state.state_tables(cfg.state)
        _old_table(warehouse, tables)
        _insert_legacy(warehouse, tables, [{"source_key": "K1", "errors": [IDENTITY]}])
        state.ensure_state(warehouse.engine, tables)
        with warehouse.engine.begin() as conn:
            store = state.StateStore(conn, tables, "default", run_id="new")
            store.quarantine([QuarantineRow("K1", "api", ["refused"], ("api_422",), None, None, 422)])

        state.ensure_state(warehouse.engine, tables)

        assert _codes(warehouse, tables) == {"K1": "api_422"}

    def test_parallel_tasks_migrate_an_old_table_together(
        self, warehouse: Warehouse, cfg: SyncConfig
    ) -> None:
        tables = state.state_tables(cfg.state)
        _old_table(warehouse, tables)
        rows = [{"source_key": f"K{i:05d}", "errors": [IDENTITY, "phone: invalid"]} for i in range(6000)]
        _insert_legacy(warehouse, tables, rows)  # more than one back-fill transaction
        errors: list[BaseException] = []

        def migrate() -> None:
            try:
                state.ensure_state(warehouse.engine, tables)
            except BaseException as e:  # reported by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=migrate) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert errors == []
        assert set(_codes(warehouse, tables).values()) == {"phone_invalid"}


def _quarantine(
    wh: Warehouse, tables: state.StateTables, rows: list[QuarantineRow], run_id: str = "r1"
) -> None:
    with wh.engine.begin() as conn:
        state.StateStore(conn, tables, "default", run_id=run_id).quarantine(rows)


ROWS = [
    QuarantineRow(
        "A", "quality", ["email: x", "dateOfBirth: y"], ("email_invalid", "dob_invalid"), None, None
    ),
    QuarantineRow("B", "quality", ["identity: ..."], ("no_identity",), None, None),
    QuarantineRow("C", "api", ["email must be an email"], ("api_422",), None, None, 422),
    QuarantineRow.duplicate("D", "A", None, None),
]


class TestStore:
    @pytest.mark.parametrize(
        ("filters", "keys"),
        [
            ({}, ["A", "B", "C", "D"]),
            ({"codes": ["dob_invalid"]}, ["A"]),
            ({"codes": ["no_identity", "api_422"]}, ["B", "C"]),
            ({"codes": ["api_422"], "stage": "quality"}, []),
            ({"codes": ["email", "invalid", "api_4"]}, []),  # whole codes only
            ({"keys": ["C", "D", "Z"]}, ["C", "D"]),
            ({"keys": ["A", "B"], "codes": ["no_identity"]}, ["B"]),
            ({"limit": 2}, ["A", "B"]),
        ],
    )
    def test_open_quarantine_filters(
        self, warehouse: Warehouse, cfg: SyncConfig, filters: dict[str, Any], keys: list[str]
    ) -> None:
        tables = state.state_tables(cfg.state)
        state.ensure_state(warehouse.engine, tables)
        for i, row in enumerate(ROWS):  # oldest first: A, B, C, D
            with warehouse.engine.begin() as conn:
                now = state.utcnow() + timedelta(seconds=i)
                state.StateStore(conn, tables, "default", run_id="r1", now=now).quarantine([row])
        with warehouse.engine.connect() as conn:
            found = state.StateStore(conn, tables, "default").open_quarantine(**filters)
        assert [r["source_key"] for r in found] == keys

    def test_run_progress_counts_the_codes_of_the_run(self, warehouse: Warehouse, cfg: SyncConfig) -> None:
        tables = state.state_tables(cfg.state)
        state.ensure_state(warehouse.engine, tables)
        _quarantine(warehouse, tables, ROWS)
        _quarantine(
            warehouse, tables, [QuarantineRow("E", "quality", ["x"], ("no_identity",), None, None)], "r2"
        )
        with warehouse.engine.connect() as conn:
            progress = state.run_progress(conn, tables, "r1")
        assert progress["quarantined"] == 4
        assert progress["reasons"] == {
            "email_invalid": 1, "dob_invalid": 1, "no_identity": 1, "api_422": 1, "duplicate_identity": 1,
        }  # fmt: skip


RESULTS = [
    {"location": "eu", "extracted": 10, "quarantined": 4, "reject_rate": 0.4,
     "reasons": {"email_invalid": 3, "no_identity": 1, "dob_invalid": 1, "api_422": 1}},
    {"location": "us", "extracted": 5, "unchanged": 5, "reject_rate": 0.0, "reasons": {}},
]  # fmt: skip


def test_top_errors_count_codes_across_locations() -> None:
    more = {"location": "x", "reasons": {"no_identity": 4}, "messages": {"email must be an email": 9}}
    assert top_errors([*RESULTS, more], 2) == [("no_identity", 5), ("email_invalid", 3)]


def test_summary_table_names_each_location_top_reasons() -> None:
    header, eu, us = summary_table(RESULTS).splitlines()
    assert header.endswith("  top reasons")
    assert eu.endswith("  email_invalid 3, no_identity 1, dob_invalid 1")
    assert us.endswith("  -")
    assert len(header) == len(eu) == len(us)


def test_alert_lists_codes_with_what_they_mean() -> None:
    alert = format_alert(
        headline="h", dag_id="d", run_id="r", locations=["eu"], counts={},
        top_errors=[("email_invalid", 3), ("api_409", 1)], run_url=None,
    )  # fmt: skip
    assert "  3 x email_invalid: email invalid" in alert.splitlines()
    assert "  1 x api_409: GrowthHub refused the row (409)" in alert.splitlines()
    assert describe("api_422") == "api_422: GrowthHub refused a field (422)"


def test_codes_are_stored_once_each_and_fit_the_column() -> None:
    assert join_codes(["email_invalid", "phone_invalid", "email_invalid"]) == "email_invalid,phone_invalid"
    stored = join_codes(f"api_{n}" for n in range(400, 500))
    assert len(stored) <= 255
    assert stored.startswith("api_400,api_401,")
    assert stored.split(",")[-1] in {f"api_{n}" for n in range(400, 500)}


def test_cli_replay_passes_reasons_and_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cli, "replay_quarantine", lambda *a, **kw: seen.update(kw) or {})
    url = f"sqlite:///{tmp_path / 'w.db'}"
    cli.main(
        [
            "--url",
            url,
            "replay",
            "--dry-run",
            "--reason",
            "email_invalid",
            "--reason",
            "api_409",
            "--key",
            "C1",
        ]
    )
    assert (seen["reason"], seen["keys"]) == (["email_invalid", "api_409"], ["C1"])


def test_cli_refuses_an_unknown_reason_naming_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["replay", "--reason", "email"])
    assert "unknown reason code 'email'; known: no_identity, email_invalid" in capsys.readouterr().err
