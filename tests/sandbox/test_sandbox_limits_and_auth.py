"""Rate limits (headers, 429, windows) and OAuth (refresh rotation, expiry)."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration

LIMIT_HEADERS = (
    "X-RateLimit-Max",
    "X-RateLimit-Remaining",
    "X-RateLimit-Interval-Milliseconds",
    "X-RateLimit-Limit-Daily",
    "X-RateLimit-Daily-Remaining",
)


def limit(sandbox, api, burst: int = 3, interval_ms: int = 60_000, daily: int = 1000) -> None:
    sandbox.put_location(api.location, rateLimit={"burst": burst, "intervalMs": interval_ms, "daily": daily})


def headers_of(response) -> dict[str, int]:
    return {name: int(response.headers[name]) for name in LIMIT_HEADERS}


class TestRateLimits:
    def test_every_counted_response_carries_the_limit_headers(self, api, sandbox):
        limit(sandbox, api, burst=5, interval_ms=10_000, daily=100)
        ok = api.upsert({"email": "a@example.com"})
        invalid = api.upsert({"email": "bad"})
        not_json = api.upsert(data="{")
        assert headers_of(ok) == {
            "X-RateLimit-Max": 5,
            "X-RateLimit-Remaining": 4,
            "X-RateLimit-Interval-Milliseconds": 10_000,
            "X-RateLimit-Limit-Daily": 100,
            "X-RateLimit-Daily-Remaining": 99,
        }
        assert headers_of(invalid)["X-RateLimit-Remaining"] == 3
        assert headers_of(not_json)["X-RateLimit-Daily-Remaining"] == 97

    def test_over_the_burst_is_429_with_json_body_and_headers(self, api, sandbox):
        limit(sandbox, api, burst=3)
        statuses = [api.upsert({"email": f"{i}@example.com"}).status_code for i in range(3)]
        response = api.upsert({"email": "late@example.com"})
        assert statuses == [200, 200, 200]
        assert response.status_code == 429
        assert response.json()["statusCode"] == 429
        assert response.json()["error"] == "Too Many Requests"
        assert headers_of(response)["X-RateLimit-Remaining"] == 0
        assert len(sandbox.contacts(api.location)) == 3

    def test_burst_window_refills_after_the_interval(self, api, sandbox):
        limit(sandbox, api, burst=2, interval_ms=300)
        for _ in range(2):
            api.upsert({"email": "a@example.com"})
        assert api.upsert({"email": "a@example.com"}).status_code == 429
        time.sleep(0.35)
        assert api.upsert({"email": "a@example.com"}).status_code == 200

    def test_daily_limit_is_429_even_with_room_in_the_burst(self, api, sandbox):
        limit(sandbox, api, burst=100, interval_ms=100, daily=2)
        for _ in range(2):
            api.upsert({"email": "a@example.com"})
        response = api.upsert({"email": "a@example.com"})
        assert response.status_code == 429
        assert headers_of(response)["X-RateLimit-Daily-Remaining"] == 0

    def test_limits_are_per_token(self, api, sandbox):
        limit(sandbox, api, burst=1)
        sandbox.add_token(token="tok-second", locationId=api.location)
        assert api.upsert({"email": "a@example.com"}).status_code == 200
        assert api.upsert({"email": "a@example.com"}).status_code == 429
        assert api.upsert({"email": "a@example.com"}, token="tok-second").status_code == 200

    def test_get_contact_counts_too(self, api, sandbox):
        limit(sandbox, api, burst=1)
        api.contact("nope")
        assert api.contact("nope").status_code == 429


class TestOAuth:
    @pytest.fixture
    def grant(self, api, sandbox) -> dict[str, str]:
        sandbox.add_token(
            token="tok-oauth",
            locationId=api.location,
            scopes=["contacts.write"],
            refreshToken="rt-1",
            clientId="client-1",
            clientSecret="secret-1",
        )
        return {
            "grant_type": "refresh_token",
            "client_id": "client-1",
            "client_secret": "secret-1",
            "refresh_token": "rt-1",
            "user_type": "Location",
        }

    def test_refresh_returns_a_new_access_and_refresh_token(self, api, grant):
        response = api.oauth(**grant)
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {
            "access_token",
            "token_type",
            "expires_in",
            "refresh_token",
            "scope",
            "userType",
            "locationId",
        }
        assert (body["token_type"], body["userType"], body["locationId"]) == (
            "Bearer",
            "Location",
            api.location,
        )
        assert body["expires_in"] == 86_399
        assert body["scope"] == "contacts.write"
        assert body["refresh_token"] != "rt-1"
        assert api.upsert({"email": "o@example.com"}, token=body["access_token"]).status_code == 200

    def test_a_refresh_token_is_spent_by_its_use(self, api, grant):
        assert api.oauth(**grant).status_code == 200
        again = api.oauth(**grant)
        assert again.status_code == 400
        assert again.json()["error"] == "invalid_grant"

    def test_the_new_refresh_token_works_once(self, api, grant):
        second = api.oauth(**grant).json()["refresh_token"]
        third = api.oauth(**{**grant, "refresh_token": second})
        assert third.status_code == 200
        assert api.oauth(**{**grant, "refresh_token": second}).status_code == 400

    @pytest.mark.parametrize(
        ("change", "status", "error"),
        [
            ({"client_secret": "wrong"}, 401, "invalid_client"),
            ({"grant_type": "authorization_code"}, 400, "unsupported_grant_type"),
            ({"refresh_token": ""}, 400, "invalid_request"),
            ({"user_type": "Company"}, 400, "invalid_request"),
            ({"refresh_token": "never-issued"}, 400, "invalid_grant"),
        ],
    )
    def test_bad_refresh_requests(self, api, grant, change, status, error):
        response = api.oauth(**{**grant, **change})
        assert response.status_code == status
        assert response.json()["error"] == error

    def test_json_body_is_rejected(self, api, grant):
        response = api.session.post(f"{api.base_url}/oauth/token", json=grant, timeout=10)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_request")

    def test_access_token_expires_after_expires_in(self, api, sandbox):
        sandbox.add_token(token="tok-short", locationId=api.location, expiresIn=0.5)
        assert api.upsert({"email": "e@example.com"}, token="tok-short").status_code == 200
        time.sleep(0.6)
        assert api.upsert({"email": "e@example.com"}, token="tok-short").status_code == 401

    def test_refreshed_token_gets_the_grants_lifetime(self, api, sandbox, grant):
        sandbox.add_token(
            token="tok-brief",
            locationId=api.location,
            expiresIn=1,
            refreshToken="rt-brief",
            clientId="client-1",
            clientSecret="secret-1",
        )
        body = api.oauth(**{**grant, "refresh_token": "rt-brief"}).json()
        assert body["expires_in"] == 1
        time.sleep(1.1)
        assert api.upsert({"email": "e@example.com"}, token=body["access_token"]).status_code == 401
