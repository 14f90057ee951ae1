"""
Agency connections against the sandbox: installed locations and minted location tokens.

An agency client lists where the app is installed and mints each location its token; a location
client of the agency gets its token by minting, shares it with every worker of the location
through the coordination (``local`` and ``redis``), and mints again when it expires or the API
stops accepting it.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from growthhub_provider.client import (
    AgencyClient,
    ClientConfig,
    GrowthHubAuthError,
    GrowthHubConfigError,
    InstalledLocation,
    LocalCoordination,
    OAuthCredentials,
    RetryPolicy,
)
from growthhub_provider.client.redis_coordination import RedisCoordination, redis_client_from_url

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from growthhub_provider.client import Coordination
    from growthhub_sandbox.testing import Agency, SandboxAdmin

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("GROWTHHUB_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
FAST = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05)
UNLIMITED = {"burst": 1_000_000, "intervalMs": 1000, "daily": 1_000_000}
MINT = "POST /oauth/locationToken"


def payloads(n: int, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{prefix}-{i}", {"email": f"{prefix}.{i}@example.com"}) for i in range(n)]


@pytest.fixture
def coordination_of(tmp_path: Path) -> Iterator[Callable[[str, str, str], Coordination]]:
    """``make(backend, base_url, key)``: the shared state of ``key`` as one worker builds it."""
    prefix = f"test-agency-{uuid.uuid4().hex[:8]}"
    clients = []

    def make(backend: str, base_url: str, key: str) -> Coordination:
        if backend == "local":
            name = "agency-tokens.json" if key.startswith("agency:") else "tokens.json"
            return LocalCoordination(base_url, key, tmp_path / name)
        client = redis_client_from_url(REDIS_URL)
        clients.append(client)
        return RedisCoordination(client, base_url, key, key_prefix=prefix, lock_ttl_s=15)

    yield make
    for client in clients[:1]:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


def agency_client(
    sandbox: SandboxAdmin,
    agency: Agency,
    coordination: Coordination,
    *,
    token: str | None = None,
    with_oauth: bool = True,
    on_secret: Callable[[str], None] | None = None,
) -> AgencyClient:
    oauth = None
    if with_oauth and agency.refresh_token:
        oauth = OAuthCredentials(agency.client_id, agency.client_secret, agency.refresh_token)
    config = ClientConfig(
        base_url=sandbox.base_url, name="agency_conn", token=token, oauth=oauth, timeout=5, retry=FAST
    )
    return AgencyClient(
        config, agency.company_id, agency.app_id, coordination=coordination, on_secret=on_secret
    )


def mints(sandbox: SandboxAdmin) -> dict[str, int]:
    return sandbox.stats()["requests"].get(MINT, {})


class TestInstalledLocations:
    def test_lists_every_page_and_only_installed_locations(
        self, sandbox: SandboxAdmin, tmp_path: Path
    ) -> None:
        agency = sandbox.create_agency("acme", locations=230, uninstalled=[7, 150])
        client = agency_client(
            sandbox,
            agency,
            LocalCoordination(sandbox.base_url, "agency:acme", tmp_path / "a.json"),
            token=agency.token,
        )
        installed = client.installed_locations()
        expected = [loc for i, loc in enumerate(agency.location_ids) if i not in (7, 150)]
        assert [loc.id for loc in installed] == expected
        assert all(isinstance(loc, InstalledLocation) and loc.installed and loc.name for loc in installed)
        everything = client.installed_locations(installed_only=False)
        assert [loc.id for loc in everything] == list(agency.location_ids)
        assert [loc.id for loc in everything if not loc.installed] == [
            agency.location_ids[7],
            agency.location_ids[150],
        ]
        assert sandbox.stats()["requests"]["GET /oauth/installedLocations"] == {"200": 3 + 3}

    def test_check_says_how_many_locations(self, sandbox: SandboxAdmin, tmp_path: Path) -> None:
        agency = sandbox.create_agency("acme", locations=3, uninstalled=[0])
        client = agency_client(
            sandbox,
            agency,
            LocalCoordination(sandbox.base_url, "agency:acme", tmp_path / "a.json"),
            token=agency.token,
        )
        ok, message = client.check()
        assert ok
        assert "installed in 2 locations" in message

    def test_a_private_integration_token_is_refused(self, sandbox: SandboxAdmin) -> None:
        config = ClientConfig(base_url=sandbox.base_url, name="agency_conn", token="pit-0001")
        with pytest.raises(GrowthHubConfigError, match="Private Integration Tokens"):
            AgencyClient(config, "acme", "acme-app")


class TestMintedTokens:
    @pytest.mark.parametrize("backend", ["local", "redis"])
    def test_one_mint_per_location_across_upserts_and_workers(
        self, sandbox: SandboxAdmin, coordination_of: Callable[[str, str, str], Coordination], backend: str
    ) -> None:
        agency = sandbox.create_agency("acme", locations=2, rateLimit=UNLIMITED)
        first, second = agency.location_ids
        workers = [
            agency_client(
                sandbox, agency, coordination_of(backend, sandbox.base_url, "agency:acme"), token=agency.token
            )
            for _ in range(2)
        ]
        for n, worker in enumerate(workers):
            for location_id in (first, second):
                client = worker.location_client(
                    location_id, coordination=coordination_of(backend, sandbox.base_url, location_id)
                )
                outcomes = list(client.upsert_contacts(payloads(20, f"w{n}")))
                assert {o.status for o in outcomes} <= {"created", "updated"}
        assert mints(sandbox) == {"201": 2}, "one mint per location, shared by both workers"
        assert len(sandbox.contacts(first)) == len(sandbox.contacts(second)) == 40

    def test_an_expired_token_is_minted_again_before_sending(
        self, sandbox: SandboxAdmin, tmp_path: Path
    ) -> None:
        agency = sandbox.create_agency(
            "acme", locations=1, location_token_expires_in=1.0, rateLimit=UNLIMITED
        )
        (location_id,) = agency.location_ids
        agency_side = agency_client(
            sandbox,
            agency,
            LocalCoordination(sandbox.base_url, "agency:acme", tmp_path / "a.json"),
            token=agency.token,
        )
        client = agency_side.location_client(
            location_id, coordination=LocalCoordination(sandbox.base_url, location_id, tmp_path / "t.json")
        )
        client.upsert_contact({"email": "before@example.com"})
        time.sleep(1.0)
        client.upsert_contact({"email": "after@example.com"})
        assert mints(sandbox) == {"201": 2}
        assert set(sandbox.stats()["requests"]["POST /contacts/upsert"]) == {"200"}, "no request sent expired"

    def test_a_token_the_api_no_longer_accepts_is_minted_again(
        self, sandbox: SandboxAdmin, tmp_path: Path
    ) -> None:
        agency = sandbox.create_agency("acme", locations=1, rateLimit=UNLIMITED)
        (location_id,) = agency.location_ids
        coordination = LocalCoordination(sandbox.base_url, location_id, tmp_path / "t.json")
        agency_side = agency_client(
            sandbox,
            agency,
            LocalCoordination(sandbox.base_url, "agency:acme", tmp_path / "a.json"),
            token=agency.token,
        )
        agency_side.location_client(location_id, coordination=coordination).upsert_contact(
            {"email": "a@example.com"}
        )
        # The sandbox forgets every token it issued (as if revoked); the stored minted one is stale.
        sandbox.reset()
        agency = sandbox.create_agency("acme", locations=1, rateLimit=UNLIMITED)
        worker = agency_client(
            sandbox,
            agency,
            LocalCoordination(sandbox.base_url, "agency:acme", tmp_path / "a.json"),
            token=agency.token,
        )
        result = worker.location_client(location_id, coordination=coordination).upsert_contact(
            {"email": "b@example.com"}
        )
        assert result.new
        assert sandbox.stats()["requests"]["POST /contacts/upsert"] == {"401": 1, "200": 1}
        assert mints(sandbox) == {"201": 1}

    def test_the_agency_token_refreshes_with_its_refresh_token(
        self, sandbox: SandboxAdmin, tmp_path: Path
    ) -> None:
        agency = sandbox.create_agency(
            "acme", locations=2, refresh_token="agency-rt-0001", rateLimit=UNLIMITED
        )
        coordination = LocalCoordination(sandbox.base_url, "agency:acme", tmp_path / "a.json")
        # No access token in the connection: the first call refreshes, as a Company grant.
        client = agency_client(sandbox, agency, coordination)
        assert len(client.installed_locations()) == 2
        location = client.location_client(
            agency.location_ids[0],
            coordination=LocalCoordination(sandbox.base_url, agency.location_ids[0], tmp_path / "t.json"),
        )
        assert location.upsert_contact({"email": "a@example.com"}).new
        assert sandbox.stats()["requests"]["POST /oauth/token"] == {"200": 1}
        assert mints(sandbox) == {"201": 1}

    def test_a_revoked_agency_token_is_refreshed_when_minting(
        self, sandbox: SandboxAdmin, tmp_path: Path
    ) -> None:
        agency = sandbox.create_agency(
            "acme", locations=1, refresh_token="agency-rt-0002", rateLimit=UNLIMITED
        )
        client = agency_client(
            sandbox,
            agency,
            LocalCoordination(sandbox.base_url, "agency:acme", tmp_path / "a.json"),
            token="at-revoked",
        )
        state = client.mint_location_token(agency.location_ids[0])
        assert state.access_token
        assert mints(sandbox) == {"401": 1, "201": 1}
        assert sandbox.stats()["requests"]["POST /oauth/token"] == {"200": 1}


class TestMintErrors:
    def test_a_location_without_the_app_is_named(self, sandbox: SandboxAdmin, tmp_path: Path) -> None:
        agency = sandbox.create_agency("acme", locations=2, uninstalled=[1])
        client = agency_client(
            sandbox,
            agency,
            LocalCoordination(sandbox.base_url, "agency:acme", tmp_path / "a.json"),
            token=agency.token,
        )
        missing = agency.location_ids[1]
        location = client.location_client(
            missing, coordination=LocalCoordination(sandbox.base_url, missing, tmp_path / "t.json")
        )
        with pytest.raises(GrowthHubAuthError, match=f"app 'acme-app' not installed in location '{missing}'"):
            location.upsert_contact({"email": "a@example.com"})
        assert "POST /contacts/upsert" not in sandbox.stats()["requests"]

    def test_a_bad_agency_token_fails_naming_the_location(
        self, sandbox: SandboxAdmin, tmp_path: Path
    ) -> None:
        agency = sandbox.create_agency("acme", locations=1)
        client = agency_client(
            sandbox,
            agency,
            LocalCoordination(sandbox.base_url, "agency:acme", tmp_path / "a.json"),
            token="at-bogus",
        )
        location_id = agency.location_ids[0]
        with pytest.raises(GrowthHubAuthError, match=f"location '{location_id}': 401") as raised:
            client.mint_location_token(location_id)
        assert "at-bogus" not in str(raised.value)

    def test_an_empty_location_id_is_a_config_error(self, sandbox: SandboxAdmin, tmp_path: Path) -> None:
        agency = sandbox.create_agency("acme", locations=1)
        client = agency_client(
            sandbox,
            agency,
            LocalCoordination(sandbox.base_url, "agency:acme", tmp_path / "a.json"),
            token=agency.token,
        )
        with pytest.raises(GrowthHubConfigError, match="422"):
            client.mint_location_token(" ")

    def test_a_location_sharing_the_agency_token_file_is_refused(self, tmp_path: Path) -> None:
        """Minting under the location's lock may refresh the agency's: one file would deadlock."""
        url = "http://growthhub.test"
        config = ClientConfig(base_url=url, name="agency_conn", token="agency-token")
        agency = AgencyClient(
            config,
            "acme",
            "acme-app",
            coordination=LocalCoordination(url, "agency:acme", tmp_path / "t.json"),
        )
        with pytest.raises(GrowthHubConfigError, match="give the agency a file of its own"):
            agency.location_client("loc1", coordination=LocalCoordination(url, "loc1", tmp_path / "t.json"))
        assert (
            agency.location_client(
                "loc1", coordination=LocalCoordination(url, "loc1", tmp_path / "other.json")
            ).location_id
            == "loc1"
        )


def test_no_token_reaches_the_logs(
    sandbox: SandboxAdmin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agency = sandbox.create_agency("acme", locations=1, refresh_token="agency-rt-0003", rateLimit=UNLIMITED)
    secrets: list[str] = []
    caplog.set_level(logging.DEBUG)
    client = agency_client(
        sandbox,
        agency,
        LocalCoordination(sandbox.base_url, "agency:acme", tmp_path / "a.json"),
        token="at-revoked",
        on_secret=secrets.append,
    )
    location_id = agency.location_ids[0]
    location = client.location_client(
        location_id, coordination=LocalCoordination(sandbox.base_url, location_id, tmp_path / "t.json")
    )
    list(location.upsert_contacts(payloads(5, "log")))
    minted = [s for s in secrets if s.startswith("sbx-lt")]
    assert minted, "the minted token was handed to on_secret for masking"
    assert "Minted an access token for location" in caplog.text
    for secret in {*secrets, agency.client_secret, "agency-rt-0003"}:
        assert secret not in caplog.text
