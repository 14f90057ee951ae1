"""When the client checks its access token: after the wait for a rate-limit slot, not before it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from scripted_http import Recorded, Reply, ScriptedApi, json_reply

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
    tmp_path: Path, scripted_api: ScriptedApi
) -> None:
    seed = "rt-seed"
    url = scripted_api.base_url
    coordination = BusyLocation(url, "loc1", tmp_path / "tokens.json")
    # Another worker's token, valid for 0.1 s more: less than the wait for a slot.
    coordination.token_store("growthhub").save(
        seed, TokenState(refresh_token="rt-1", access_token="at-soon-expired", expires_at=time.time() + 0.1)
    )
    scripted_api.post(
        "/oauth/token",
        json_reply(200, {"access_token": "at-fresh", "refresh_token": "rt-2", "expires_in": 3600}),
    )

    def upsert(request: Recorded) -> Reply:
        status = 200 if request.headers["Authorization"] == "Bearer at-fresh" else 401
        return json_reply(status, {"new": True, "contact": {"id": "c1"}})

    scripted_api.post("/contacts/upsert", upsert)
    client = GrowthHubClient(
        ClientConfig(base_url=url, location_id="loc1", oauth=OAuthCredentials("cid", "secret", seed)),
        coordination=coordination,
    )
    assert client.upsert_contact({"email": "a@b.co"}).contact_id == "c1"
    sent = [r.headers.get("Authorization") for r in scripted_api.calls("/contacts/upsert")]
    assert sent == ["Bearer at-fresh"], "no request went out with the token that expired in the queue"
    assert scripted_api.requests[0].form()["refresh_token"] == "rt-1"
