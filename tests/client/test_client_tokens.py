"""When the client checks its access token: after the wait for a rate-limit slot, not before it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from growthhub_provider.client import (
    ClientConfig,
    GrowthHubClient,
    LimitSettings,
    LocalCoordination,
    OAuthCredentials,
    TokenState,
)
from growthhub_provider.client.limiter import LocalRateLimiter

if TYPE_CHECKING:
    from pathlib import Path

    import requests_mock as rm

URL = "http://growthhub.test"


class SlowLimiter(LocalRateLimiter):
    """A location so busy that every slot takes ``wait_s`` to come."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(burst=100, interval_s=1.0)
        self.wait_s = wait_s

    def acquire(self, daily_reserve: int | None = None) -> bool:
        time.sleep(self.wait_s)
        return super().acquire(daily_reserve)


class BusyLocation(LocalCoordination):
    def limiter(self, settings: LimitSettings) -> LocalRateLimiter:
        return SlowLimiter(wait_s=0.3)


def test_a_token_that_expires_while_waiting_for_a_slot_is_refreshed_before_sending(
    tmp_path: Path, requests_mock: rm.Mocker
) -> None:
    seed = "rt-seed"
    coordination = BusyLocation(URL, "loc1", tmp_path / "tokens.json")
    # Another worker's token, valid for 0.1 s more: less than the wait for a slot.
    coordination.token_store("growthhub").save(
        seed, TokenState(refresh_token="rt-1", access_token="at-soon-expired", expires_at=time.time() + 0.1)
    )
    requests_mock.post(
        f"{URL}/oauth/token", json={"access_token": "at-fresh", "refresh_token": "rt-2", "expires_in": 3600}
    )

    def upsert(request: Any, context: Any) -> dict[str, Any]:
        context.status_code = 200 if request.headers["Authorization"] == "Bearer at-fresh" else 401
        return {"new": True, "contact": {"id": "c1"}}

    requests_mock.post(f"{URL}/contacts/upsert", json=upsert)
    client = GrowthHubClient(
        ClientConfig(base_url=URL, location_id="loc1", oauth=OAuthCredentials("cid", "secret", seed)),
        coordination=coordination,
    )
    assert client.upsert_contact({"email": "a@b.co"}).contact_id == "c1"
    sent = [
        r.headers.get("Authorization") for r in requests_mock.request_history if r.path == "/contacts/upsert"
    ]
    assert sent == ["Bearer at-fresh"], "no request went out with the token that expired in the queue"
    assert "refresh_token=rt-1" in requests_mock.request_history[0].text
