"""Contract tests of the GrowthHub hook against the running sandbox (real HTTP on loopback)."""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
import requests

from growthhub_provider.client import (
    FileTokenStore,
    GrowthHubAuthError,
    GrowthHubConfigError,
    GrowthHubNotFound,
    GrowthHubRejected,
)
from growthhub_provider.hooks.growthhub import GrowthHubHook

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from growthhub_sandbox.testing import SandboxAdmin

pytestmark = pytest.mark.integration

TOKEN = "pit-sandbox-token-0001"
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.1}
UNLIMITED = {"burst": 1_000_000, "intervalMs": 10_000, "daily": 1_000_000}


@pytest.fixture
def api(sandbox: SandboxAdmin, growthhub_conn: Callable[..., None]) -> SandboxAdmin:
    """Location ``loc1`` (duplicates matched on email, then phone), a token, and the connection."""
    sandbox.put_location("loc1", duplicateCheckFields=["email", "phone"], rateLimit=UNLIMITED)
    sandbox.add_token(token=TOKEN, locationId="loc1", scopes=["contacts.write", "contacts.readonly"])
    growthhub_conn(host=sandbox.base_url, password=TOKEN)
    return sandbox


def rows(n: int, email: str = "user{}@example.com", **extra: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(f"row-{i}", {"email": email.format(i), "firstName": f"N{i}", **extra}) for i in range(n)]


class TestGrowthHubHookAgainstSandbox:
    def test_creates_then_updates_the_same_contact(self, api: SandboxAdmin) -> None:
        hook = GrowthHubHook()
        first = hook.upsert_contact({"email": "Ann@Example.com", "firstName": "Ann"})
        second = hook.upsert_contact({"email": "ann@example.com", "lastName": "Lee"})
        assert (first.new, second.new) == (True, False)
        assert first.contact_id == second.contact_id
        assert first.trace_id
        contact = hook.get_contact(first.contact_id)
        assert (contact["firstName"], contact["lastName"], contact["locationId"]) == ("Ann", "Lee", "loc1")

    def test_batch_streams_created_updated_and_rejected(self, api: SandboxAdmin) -> None:
        hook = GrowthHubHook()
        hook.upsert_contact({"email": "old@example.com"})
        batch = [
            ("new", {"email": "new@example.com"}),
            ("old", {"email": "old@example.com"}),
            ("bad", {"email": "not-an-email", "country": "XX"}),
        ]
        outcomes = {o.key: o for o in hook.upsert_contacts(batch)}
        assert {k: o.status for k, o in outcomes.items()} == {
            "new": "created",
            "old": "updated",
            "bad": "rejected",
        }
        assert outcomes["bad"].http_status == 422
        assert len(outcomes["bad"].messages) == 2, "one message per failing field"
        assert hook.daily_remaining is not None

    @pytest.mark.parametrize(
        ("setup", "raised", "match"),
        [
            ({"password": "pit-unknown"}, GrowthHubAuthError, "401"),
            ({"scopes": ["contacts.readonly"]}, GrowthHubAuthError, "403"),
            ({"payload": {"locationId": "loc2"}}, GrowthHubAuthError, "403"),
            ({"payload": {"email": "x@example.com", "dateOfBirth": "1990-02-30"}}, GrowthHubRejected, "422"),
            ({"api_version": "2021-04-15"}, GrowthHubConfigError, "400: .*2023-02-21"),
        ],
        ids=["401-unknown-token", "403-scope", "403-other-location", "422-impossible-date", "400-version"],
    )
    def test_errors_are_classified_without_retries(
        self,
        api: SandboxAdmin,
        growthhub_conn: Callable[..., None],
        setup: dict[str, Any],
        raised: type[Exception],
        match: str,
    ) -> None:
        api.put_location("loc2", rateLimit=UNLIMITED)
        if "scopes" in setup:
            api.add_token(token="pit-read-only-0001", locationId="loc1", scopes=setup["scopes"])
            growthhub_conn(host=api.base_url, password="pit-read-only-0001")
        else:
            growthhub_conn(
                host=api.base_url,
                password=setup.get("password", TOKEN),
                **({"api_version": setup["api_version"]} if "api_version" in setup else {}),
            )
        with pytest.raises(raised, match=match):
            GrowthHubHook(**FAST).upsert_contact(setup.get("payload", {"email": "x@example.com"}))
        assert sum(api.stats()["requests"]["POST /contacts/upsert"].values()) == 1

    def test_unaccepted_api_version_fails_the_batch_instead_of_rejecting_every_row(
        self, api: SandboxAdmin, growthhub_conn: Callable[..., None]
    ) -> None:
        growthhub_conn(host=api.base_url, password=TOKEN, api_version="2021-04-15")
        rows = [(str(i), {"email": f"v{i}@example.com"}) for i in range(20)]
        with pytest.raises(GrowthHubConfigError, match="api_version"):
            list(GrowthHubHook(**FAST).upsert_contacts(rows))
        assert api.contacts("loc1") == []

    def test_422_carries_the_api_message_list(self, api: SandboxAdmin) -> None:
        with pytest.raises(GrowthHubRejected) as excinfo:
            GrowthHubHook().upsert_contact({"email": "nope", "phone": "12"})
        assert excinfo.value.status == 422
        assert len(excinfo.value.messages) == 2

    def test_get_of_an_unknown_contact_is_not_found(self, api: SandboxAdmin) -> None:
        with pytest.raises(GrowthHubNotFound):
            GrowthHubHook().get_contact("does-not-exist")

    @pytest.mark.parametrize(("password", "ok"), [(TOKEN, True), ("pit-unknown", False)])
    def test_test_connection(
        self, api: SandboxAdmin, growthhub_conn: Callable[..., None], password: str, ok: bool
    ) -> None:
        growthhub_conn(host=api.base_url, password=password)
        assert GrowthHubHook().test_connection()[0] is ok

    def test_oauth_refreshes_and_rotation_survives_into_the_next_hook(
        self, api: SandboxAdmin, growthhub_conn: Callable[..., None], token_file: Path
    ) -> None:
        oauth = {"client_id": "cid-1", "client_secret": "csecret-0001", "refresh_token": "rt-seed-0001"}
        api.add_token(
            token="at-unknown-to-the-hook-0001",
            locationId="loc1",
            expiresIn=3600,
            refreshToken=oauth["refresh_token"],
            clientId=oauth["client_id"],
            clientSecret=oauth["client_secret"],
        )
        growthhub_conn(host=api.base_url, password=None, **oauth)
        first = GrowthHubHook()
        assert {o.status for o in first.upsert_contacts(rows(20))} == {"created"}
        rotated = FileTokenStore(token_file, "growthhub_default").load(oauth["refresh_token"]).refresh_token
        assert rotated != oauth["refresh_token"]

        # The next task starts from the stored access token: no refresh, no 401.
        store = FileTokenStore(token_file, "growthhub_default")
        stored = store.load(oauth["refresh_token"])
        second = GrowthHubHook()
        assert second.upsert_contact({"email": "next@example.com"}).new
        assert second.client._access_token == stored.access_token
        assert api.stats()["requests"]["POST /oauth/token"] == {"200": 1}

        # Once that token has expired, the seed is spent: only the stored rotation lets a task in.
        store.save(oauth["refresh_token"], dataclasses.replace(stored, expires_at=time.time() - 1))
        third = GrowthHubHook()
        assert third.upsert_contact({"email": "third@example.com"}).new
        assert store.load(oauth["refresh_token"]).refresh_token not in (rotated, oauth["refresh_token"])
        spent = requests.post(
            f"{api.base_url}/oauth/token",
            data={"grant_type": "refresh_token", "client_id": "cid-1", "client_secret": "csecret-0001"}
            | {"refresh_token": oauth["refresh_token"]},
            timeout=5,
        )
        assert spent.status_code == 400
        assert api.stats()["requests"]["POST /oauth/token"] == {"200": 2, "400": 1}

    def test_oauth_refreshes_when_a_401_says_the_token_expired(
        self, api: SandboxAdmin, growthhub_conn: Callable[..., None]
    ) -> None:
        oauth = {"client_id": "cid-2", "client_secret": "csecret-0002", "refresh_token": "rt-seed-0002"}
        growthhub_conn(host=api.base_url, password="at-short-0002", **oauth)
        hook = GrowthHubHook()
        hook.get_conn()
        api.add_token(
            token="at-short-0002",
            locationId="loc1",
            expiresIn=1.5,
            refreshToken=oauth["refresh_token"],
            clientId=oauth["client_id"],
            clientSecret=oauth["client_secret"],
        )
        hook.upsert_contact({"email": "a@example.com"})
        time.sleep(1.6)
        assert not hook.upsert_contact({"email": "a@example.com"}).new
        assert api.stats()["requests"]["POST /oauth/token"] == {"200": 1}
        assert api.stats()["requests"]["POST /contacts/upsert"] == {"200": 2, "401": 1}

    def test_oauth_with_a_spent_refresh_token_fails_fast(
        self, api: SandboxAdmin, growthhub_conn: Callable[..., None]
    ) -> None:
        growthhub_conn(
            host=api.base_url,
            password=None,
            client_id="cid-3",
            client_secret="csecret-0003",
            refresh_token="rt-never-issued",
        )
        with pytest.raises(GrowthHubAuthError, match="invalid"):
            list(GrowthHubHook().upsert_contacts(rows(200)))
        assert api.stats()["requests"]["POST /oauth/token"] == {"400": 1}

    def test_backs_off_from_429_headers_and_loses_no_row(
        self, api: SandboxAdmin, growthhub_conn: Callable[..., None]
    ) -> None:
        # a window long enough that a loaded machine cannot let it pass before the hook sends
        api.put_location("loc1", rateLimit={"burst": 10, "intervalMs": 2000, "daily": 100_000})
        # Another client empties the window: the hook's first answer is a 429.
        for _ in range(10):
            requests.post(
                f"{api.base_url}/contacts/upsert",
                json={"locationId": "loc1", "email": "other@example.com"},
                headers={"Authorization": f"Bearer {TOKEN}", "Version": "2023-02-21"},
                timeout=5,
            )
        hook = GrowthHubHook(**FAST)
        started = time.monotonic()
        outcomes = list(hook.upsert_contacts(rows(25)))
        elapsed = time.monotonic() - started
        assert [o.status for o in outcomes].count("created") == 25
        stats = hook.last_batch_stats
        assert stats is not None
        assert 1 <= stats.throttled <= 10
        assert elapsed >= 4.0, "26 requests at 10 per 2 s need two more windows"
        assert len(api.contacts("loc1")) == 26

    def test_rides_out_a_forced_429_storm(self, api: SandboxAdmin) -> None:
        api.put_location("loc1", rateLimit={"burst": 1_000_000, "intervalMs": 200, "daily": 1_000_000})
        api.set_faults(storm_every_n=20, storm_length=5)
        hook = GrowthHubHook(**FAST)
        outcomes = list(hook.upsert_contacts(rows(60)))
        assert {o.status for o in outcomes} == {"created"}
        assert hook.last_batch_stats is not None
        assert hook.last_batch_stats.throttled >= 5
        assert len(api.contacts("loc1")) == 60

    @pytest.mark.parametrize("phase", ["before", "after"])
    def test_recovers_from_5xx_timeouts_and_drops_without_losing_or_duplicating(
        self, api: SandboxAdmin, growthhub_conn: Callable[..., None], phase: str
    ) -> None:
        growthhub_conn(host=api.base_url, password=TOKEN, timeout=0.5, max_workers=16)
        api.set_faults(
            seed=7, error_rate=0.15, timeout_rate=0.05, hang_seconds=2, drop_rate=0.05, phase=phase
        )
        hook = GrowthHubHook(max_attempts=10, **FAST)
        batch = rows(120)
        outcomes = list(hook.upsert_contacts(batch))
        assert sorted(o.key for o in outcomes) == sorted(k for k, _ in batch)
        assert {o.status for o in outcomes} <= {"created", "updated"}
        stats = hook.last_batch_stats
        assert stats is not None
        assert stats.retried > 0
        contacts = api.contacts("loc1")
        assert sorted(c["email"] for c in contacts) == sorted(p["email"] for _, p in batch)
        faults = api.stats()["faults"]
        assert {"error", "timeout", "drop"} <= faults.keys(), "every fault kind was injected"

    def test_concurrent_rows_for_one_person_create_one_contact(self, api: SandboxAdmin) -> None:
        api.set_faults(race_window_ms=30)
        hook = GrowthHubHook()
        batch = [
            (f"r{i}", {"email": "Same@Example.com" if i % 2 else " same@example.com", "tags": [f"t{i}"]})
            for i in range(20)
        ]
        outcomes = list(hook.upsert_contacts(batch + rows(20)))
        assert [o.status for o in outcomes].count("created") == 21
        (same,) = [c for c in api.contacts("loc1") if c["email"].lower() == "same@example.com"]
        assert same["tags"] == ["t19"], "rows of one person are applied in input order"

    def test_the_race_window_does_create_duplicates_without_serialisation(self, api: SandboxAdmin) -> None:
        """Control for the test above: the sandbox's race is real, so the hook's queueing matters."""
        api.set_faults(race_window_ms=30)
        hook = GrowthHubHook()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: hook.upsert_contact({"email": "same@example.com"}), range(8)))
        assert len(api.contacts("loc1")) > 1

    def test_skips_rows_once_the_daily_quota_reaches_the_reserve(self, api: SandboxAdmin) -> None:
        api.put_location("loc1", rateLimit={"burst": 1_000_000, "intervalMs": 10_000, "daily": 30})
        hook = GrowthHubHook(max_workers=4)
        outcomes = list(hook.upsert_contacts(rows(50), daily_reserve=10))
        statuses = [o.status for o in outcomes]
        sent = statuses.count("created")
        assert 20 - 4 <= sent <= 20
        assert statuses.count("skipped") == 50 - sent
        assert "POST /contacts/upsert" in api.stats()["requests"]
        assert "429" not in api.stats()["requests"]["POST /contacts/upsert"]

    def test_no_token_in_logs(
        self,
        api: SandboxAdmin,
        growthhub_conn: Callable[..., None],
        caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        caplog.set_level(logging.DEBUG)
        oauth = {"client_id": "cid-4", "client_secret": "csecret-0004", "refresh_token": "rt-seed-0004"}
        api.add_token(
            token="at-expired-0004",
            locationId="loc1",
            expiresIn=1.5,
            refreshToken=oauth["refresh_token"],
            clientId=oauth["client_id"],
            clientSecret=oauth["client_secret"],
        )
        growthhub_conn(host=api.base_url, password="at-expired-0004", timeout=0.5, **oauth)
        time.sleep(1.55)  # expired: the first answers are 401s, then the hook refreshes
        api.set_faults(seed=3, error_rate=0.2, drop_rate=0.1, timeout_rate=0.05, hang_seconds=1)
        hook = GrowthHubHook(**FAST)
        outcomes = list(hook.upsert_contacts([*rows(30), ("bad", {"email": "bad-email"})]))
        assert hook.client._access_token
        logs = caplog.text + "".join(capsys.readouterr())
        assert "GrowthHub batch: sent=31" in logs
        assert "401" in api.stats()["requests"]["POST /contacts/upsert"]
        secrets = [hook.client._access_token, "at-expired-0004", "csecret-0004", "rt-seed-0004", TOKEN]
        secrets.append(
            FileTokenStore(hook.extras["refresh_token_file"], "growthhub_default")
            .load("rt-seed-0004")
            .refresh_token
        )
        for secret in secrets:
            assert secret not in logs
            assert secret not in repr(outcomes)
        assert "user1@example.com" not in logs
