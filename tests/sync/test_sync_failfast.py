"""Fail fast, alert the cause: a refused token or a config error fails the task at once (no
Airflow retry), stops the location's other batches of the run, and names itself in the alert."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException
from sync_support import DAY, T0, Warehouse

from growthhub_provider.client import GrowthHubAuthError, GrowthHubTransientError
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess
from growthhub_sync import failures, orchestration, state
from growthhub_sync.config import ConfigError, SyncConfig
from growthhub_sync.demo import seed_demo
from growthhub_sync.failures import RunFailure
from growthhub_sync.orchestration import failing_fast
from growthhub_sync.pipeline import SyncOptions, plan_sync, sync_batch

TOKEN = "tok-failfast"
UPSERT = "POST /contacts/upsert"
REJECTED_401 = (
    r"^GrowthHub rejected the token \(401\) for location default: "
    r"fix connection growthhub_default, then clear the run$"
)


@pytest.fixture
def connect(
    sandbox: SandboxAdmin, sandbox_server: SandboxProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[[str], None]:
    """Location ``loc1`` knows ``TOKEN``; calling the result points ``growthhub_default`` at a token."""
    sandbox.put_location(
        "loc1",
        duplicateCheckFields=["email", "phone"],
        customFields=[{"id": "cf-ltv", "key": "lifetime_value", "dataType": "MONETORY"}],
    )
    sandbox.add_token(token=TOKEN, locationId="loc1", scopes=["contacts.write", "contacts.readonly"])

    def use(token: str) -> None:
        extra = {"location_id": "loc1", "max_workers": 8, "refresh_token_file": str(tmp_path / "rt.json")}
        conn = {"conn_type": "growthhub", "host": sandbox_server.base_url, "password": token, "extra": extra}
        monkeypatch.setenv("AIRFLOW_CONN_GROWTHHUB_DEFAULT", json.dumps(conn))

    return use


@pytest.fixture
def config(warehouse: Warehouse, make_config: Callable[..., SyncConfig]) -> SyncConfig:
    """60 demo rows in key ranges of 20: three mapped batches."""
    seed_demo(warehouse.engine, 60, schema=warehouse.schema, start=T0, bad_share=0)
    return make_config(batch_size=20)


def _requests(sandbox: SandboxAdmin, endpoint: str) -> dict[str, int]:
    return dict(sandbox.stats()["requests"].get(endpoint, {}))


def _failures(config: SyncConfig, warehouse: Warehouse, run_id: str) -> list[RunFailure]:
    with warehouse.engine.connect() as conn:
        return failures.recorded_failures(conn, state.state_tables(config.state), run_id)


@pytest.mark.integration
def test_plan_finds_a_bad_token_with_one_request_before_any_batch_sends(
    config: SyncConfig, warehouse: Warehouse, connect: Callable[[str], None], sandbox: SandboxAdmin
) -> None:
    connect("not-the-token")
    with pytest.raises(AirflowFailException, match=REJECTED_401), failing_fast(config, "default", "r1"):
        plan_sync(config, "default", DAY, engine=warehouse.engine, options=SyncOptions(run_id="r1"))
    assert _requests(sandbox, "GET /contacts/{contactId}") == {"401": 1}
    assert _requests(sandbox, UPSERT) == {}
    (failure,) = _failures(config, warehouse, "r1")
    assert (failure.kind, failure.location, failure.conn_id) == ("connection", "default", "growthhub_default")
    assert failure.credentials == failures.credentials_fingerprint("growthhub_default", "loc1")
    assert "not-the-token" not in json.dumps(failure.__dict__)


@pytest.mark.integration
@pytest.mark.parametrize("warehouse", ["postgresql"], indirect=True)  # GX runs: one dialect will do
def test_a_token_refused_in_one_batch_stops_the_others_until_the_connection_changes(
    config: SyncConfig, warehouse: Warehouse, connect: Callable[[str], None], sandbox: SandboxAdmin
) -> None:
    connect(TOKEN)
    options = SyncOptions(run_id="r1", dag_id="tests")
    plan = plan_sync(config, "default", DAY, engine=warehouse.engine, options=options)
    first, second, *_ = plan["batches"]
    connect("revoked-meanwhile")

    with pytest.raises(AirflowFailException, match=REJECTED_401), failing_fast(config, "default", "r1"):
        sync_batch(config, "default", DAY, first, options, engine=warehouse.engine)
    assert _requests(sandbox, UPSERT) == {"401": 1}, "the batch's first request went out alone"
    with pytest.raises(GrowthHubAuthError, match="401"):
        sync_batch(config, "default", DAY, second, options, engine=warehouse.engine)
    assert _requests(sandbox, UPSERT) == {"401": 1}, "the second batch sent nothing"

    connect(TOKEN)  # the operator fixes the connection and clears the failed tasks
    done = sync_batch(config, "default", DAY, second, options, engine=warehouse.engine)
    assert done["created"] == 20
    assert _requests(sandbox, UPSERT) == {"401": 1, "200": 20}
    assert _failures(config, warehouse, "r1") == []


def test_config_error_at_plan_fails_at_once_naming_it(
    warehouse: Warehouse, make_config: Callable[..., SyncConfig]
) -> None:
    seed_demo(warehouse.engine, 5, schema=warehouse.schema, start=T0)
    config = make_config(mapping__fields={"email": "email_address"})
    with pytest.raises(AirflowFailException) as failed, failing_fast(config, "default", "r1"):
        plan_sync(config, "default", DAY, engine=warehouse.engine, options=SyncOptions(run_id="r1"))
    headline = str(failed.value)
    assert headline.startswith("config error for location default: ")
    assert "mapping.fields.email.column: column 'email_address' not in crm_contacts" in headline
    assert headline.endswith("; fix the config, then clear the run")
    assert [f.kind for f in _failures(config, warehouse, "r1")] == ["config"]


@pytest.mark.parametrize("error", [GrowthHubTransientError(503, "unavailable"), OSError("disk full")])
def test_transient_errors_keep_their_retries(
    warehouse: Warehouse, make_config: Callable[..., SyncConfig], error: Exception
) -> None:
    config = make_config()
    with pytest.raises(type(error)), failing_fast(config, "default", "r1"):
        raise error
    with warehouse.engine.connect() as conn:
        assert not conn.dialect.has_table(conn, state.state_tables(config.state).runs.name, warehouse.schema)


def test_failure_alert_names_the_recorded_cause_not_the_data(
    warehouse: Warehouse,
    make_config: Callable[..., SyncConfig],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config()
    tables = state.state_tables(config.state)
    state.ensure_state(warehouse.engine, tables)
    failure = RunFailure("connection", "default", "401: Invalid JWT", "growthhub_default", "abc")
    failures.record_failure(warehouse.engine, tables, "r1", failure)
    monkeypatch.setattr(orchestration, "load_config", lambda: config)
    context: dict[str, Any] = {"dag": SimpleNamespace(dag_id="sync"), "run_id": "r1", "reason": "failed"}

    with caplog.at_level(logging.ERROR, logger="growthhub_sync.alerts"):
        orchestration.on_run_failure(context)

    (alert,) = [r.getMessage() for r in caplog.records if r.name == "growthhub_sync.alerts"]
    first, *rest = alert.splitlines()
    assert first == (
        "GrowthHub sync: GrowthHub rejected the token (401) for location default: "
        "fix connection growthhub_default, then clear the run"
    )
    assert "top errors:" not in rest


def test_failed_run_alerts_at_error_a_successful_run_over_the_threshold_at_warning(
    warehouse: Warehouse,
    make_config: Callable[..., SyncConfig],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config()
    state.ensure_state(warehouse.engine, state.state_tables(config.state))
    monkeypatch.setattr(orchestration, "load_config", lambda: config)
    context: dict[str, Any] = {"dag": SimpleNamespace(dag_id="sync"), "run_id": "r1", "reason": "failed"}
    breached = {"location": "default", "threshold_breached": True, "reject_rate": 0.5, "extracted": 2}

    with caplog.at_level(logging.INFO, logger="growthhub_sync.alerts"):
        orchestration.on_run_failure(context)
        assert orchestration.alert_threshold_breach(config, context, [breached])

    levels = [(r.levelname, r.getMessage().splitlines()[0]) for r in caplog.records]
    assert levels == [
        ("ERROR", "GrowthHub sync: run failed (failed); see the task log"),
        ("WARNING", "GrowthHub sync: reject rate over 5.0% (default 50.0%); see the quarantine table"),
    ]


def test_a_new_plan_forgets_the_failure_it_recorded(
    warehouse: Warehouse, make_config: Callable[..., SyncConfig]
) -> None:
    seed_demo(warehouse.engine, 5, schema=warehouse.schema, start=T0)
    config = make_config()
    tables = state.state_tables(config.state)
    state.ensure_state(warehouse.engine, tables)
    failures.record_failure(warehouse.engine, tables, "r1", RunFailure("config", "default", "column gone"))
    options = SyncOptions(run_id="r1")
    plan_sync(config, "default", DAY, engine=warehouse.engine, options=options, check_connection=False)
    assert _failures(config, warehouse, "r1") == []
    with warehouse.engine.connect() as conn:
        assert state.get_run(conn, tables, "r1", "default")["details"] == {}


def test_a_config_error_is_not_a_connection_failure() -> None:
    location = SimpleNamespace(name="emea", conn_id="growthhub_emea")
    failure = failures.failure_of(ConfigError("quality.errors: unknown check"), location)  # type: ignore[arg-type]
    assert failure == RunFailure("config", "emea", "quality.errors: unknown check")
    assert failures.failure_of(RuntimeError("boom"), location) is None  # type: ignore[arg-type]
