"""The GrowthHub hook on an agency connection: its form and extras, and against the sandbox."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
import redis

from growthhub_provider import get_provider_info
from growthhub_provider.client import GrowthHubConfigError, InstalledLocation
from growthhub_provider.hooks.growthhub import GrowthHubHook

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from growthhub_sandbox.testing import Agency, SandboxAdmin

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.1}
UNLIMITED = {"burst": 1_000_000, "intervalMs": 10_000, "daily": 1_000_000}
AGENCY_CONN = "growthhub_agency"


def agency_extras(agency: Agency) -> dict[str, str]:
    """An agency connection's extras: no location of its own, the company and app, its OAuth client."""
    return {
        "location_id": "",
        "company_id": agency.company_id,
        "app_id": agency.app_id,
        "client_id": agency.client_id,
        "client_secret": agency.client_secret,
        "refresh_token": agency.refresh_token or "",
    }


class TestAgencyConnectionForm:
    def test_declares_company_and_app_fields(self) -> None:
        fields = get_provider_info()["connection-types"][0]["conn-fields"]
        assert fields["company_id"]["schema"]["type"] == ["string", "null"]
        assert fields["app_id"]["schema"]["type"] == ["string", "null"]

    def test_a_location_connection_is_no_agency(self, growthhub_conn: Callable[..., None]) -> None:
        growthhub_conn()
        hook = GrowthHubHook()
        assert not hook.is_agency
        with pytest.raises(GrowthHubConfigError, match="not an agency connection"):
            hook.installed_locations()

    @pytest.mark.parametrize(("given", "missing"), [("company_id", "app_id"), ("app_id", "company_id")])
    def test_company_and_app_come_together(
        self, growthhub_conn: Callable[..., None], given: str, missing: str
    ) -> None:
        growthhub_conn(password="agency-token", location_id="", **{given: "x1"})
        hook = GrowthHubHook()
        with pytest.raises(GrowthHubConfigError, match=f"extra {given} is set but {missing} is not"):
            _ = hook.is_agency
        ok, message = hook.test_connection()
        assert not ok
        assert f"{missing} is not" in message

    def test_a_private_integration_token_is_refused(self, growthhub_conn: Callable[..., None]) -> None:
        growthhub_conn(password="pit-abc", location_id="", company_id="co", app_id="app")
        ok, message = GrowthHubHook().test_connection()
        assert not ok
        assert "Private Integration Tokens cannot mint location tokens" in message
        assert "pit-abc" not in message

    def test_sending_needs_a_location(self, growthhub_conn: Callable[..., None]) -> None:
        growthhub_conn(password="agency-token", location_id="", company_id="co", app_id="app")
        with pytest.raises(GrowthHubConfigError, match="agency connection: give the hook the location_id"):
            _ = GrowthHubHook().client


@pytest.mark.integration
class TestAgencyHookAgainstSandbox:
    @pytest.fixture
    def agency(self, sandbox: SandboxAdmin, growthhub_conn: Callable[..., None]) -> Agency:
        agency = sandbox.create_agency("acme", locations=120, uninstalled=[3], rateLimit=UNLIMITED)
        growthhub_conn(
            host=sandbox.base_url, password=agency.token, conn_id=AGENCY_CONN, **agency_extras(agency)
        )
        return agency

    def test_test_connection_counts_installed_locations(self, agency: Agency) -> None:
        hook = GrowthHubHook(AGENCY_CONN)
        assert hook.is_agency
        ok, message = hook.test_connection()
        assert ok, message
        assert "installed in 119 locations" in message

    def test_lists_installed_locations(self, agency: Agency) -> None:
        locations = GrowthHubHook(AGENCY_CONN).installed_locations()
        assert len(locations) == 119
        assert all(isinstance(loc, InstalledLocation) and loc.installed for loc in locations)
        assert agency.location_ids[3] not in {loc.id for loc in locations}

    def test_a_location_hook_upserts_with_one_minted_token(
        self, sandbox: SandboxAdmin, agency: Agency
    ) -> None:
        location_id = agency.location_ids[0]
        for task in range(2):  # two tasks: the second finds the first's minted token
            hook = GrowthHubHook(AGENCY_CONN, location_id=location_id, **FAST)
            hook.client.verify_access()
            rows = [(f"t{task}-{i}", {"email": f"t{task}.{i}@example.com"}) for i in range(10)]
            assert {o.status for o in hook.upsert_contacts(rows)} == {"created"}
            assert hook.location_id == location_id
        assert len(sandbox.contacts(location_id)) == 20
        assert sandbox.stats()["requests"]["POST /oauth/locationToken"] == {"201": 1}


@pytest.fixture
def shared_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Connection ``shared_state``: Redis db 9, whose GrowthHub keys go with the test."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_SHARED_STATE",
        json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": 6379, "extra": {"db": 9}}),
    )
    yield
    client = redis.Redis(db=9)
    for key in client.scan_iter("growthhub:{http://127.0.0.1:*"):
        client.delete(key)
    client.close()


@pytest.mark.integration
@pytest.mark.usefixtures("shared_state")
def test_redis_coordination_shares_minted_and_agency_tokens(
    sandbox: SandboxAdmin, growthhub_conn: Callable[..., None]
) -> None:
    """Two locations, two tasks each, Redis coordination: one agency refresh, one mint per location."""
    agency = sandbox.create_agency("acme", locations=2, refresh_token="agency-rt-hook", rateLimit=UNLIMITED)
    extras = agency_extras(agency) | {"coordination": "shared_state"}
    growthhub_conn(host=sandbox.base_url, password=None, conn_id=AGENCY_CONN, **extras)
    for task in range(2):
        for location_id in agency.location_ids:
            hook = GrowthHubHook(AGENCY_CONN, location_id=location_id, **FAST)
            assert hook.upsert_contact({"email": f"t{task}@example.com"}).contact_id
    requests = sandbox.stats()["requests"]
    assert requests["POST /oauth/token"] == {"200": 1}
    assert requests["POST /oauth/locationToken"] == {"201": 2}
