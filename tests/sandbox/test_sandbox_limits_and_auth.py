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

    def test_static_tokens_have_a_window_each(self, api, sandbox):
        limit(sandbox, api, burst=1)
        sandbox.add_token(token="tok-second", locationId=api.location)
        assert api.upsert({"email": "a@example.com"}).status_code == 200
        assert api.upsert({"email": "a@example.com"}).status_code == 429
        assert api.upsert({"email": "a@example.com"}, token="tok-second").status_code == 200

    def test_access_tokens_of_one_oauth_client_share_the_locations_window(self, api, sandbox):
        """GrowthHub limits per app and location: a refresh (a new access token) starts no new window."""
        limit(sandbox, api, burst=2)
        for token in ("tok-app-1", "tok-app-2"):
            sandbox.add_token(token=token, locationId=api.location, clientId="client-a", clientSecret="s")
        sandbox.add_token(
            token="tok-other-app", locationId=api.location, clientId="client-b", clientSecret="s"
        )
        assert api.upsert({"email": "a@example.com"}, token="tok-app-1").status_code == 200
        second = api.upsert({"email": "a@example.com"}, token="tok-app-2")
        assert (second.status_code, headers_of(second)["X-RateLimit-Remaining"]) == (200, 0)
        assert api.upsert({"email": "a@example.com"}, token="tok-app-1").status_code == 429
        assert api.upsert({"email": "a@example.com"}, token="tok-app-2").status_code == 429
        # another app, and a static token, on the same location: windows of their own
        assert api.upsert({"email": "a@example.com"}, token="tok-other-app").status_code == 200
        assert api.upsert({"email": "a@example.com"}).status_code == 200
        # and the same app on another location
        sandbox.put_location(api.other_location, rateLimit={"burst": 2, "intervalMs": 60_000, "daily": 1000})
        sandbox.add_token(token="tok-app-elsewhere", locationId=api.other_location, clientId="client-a")
        other = {"email": "a@example.com", "locationId": api.other_location}
        assert api.upsert(other, token="tok-app-elsewhere").status_code == 200

    def test_a_refreshed_access_token_keeps_its_grants_window(self, api, sandbox):
        limit(sandbox, api, burst=2)
        sandbox.add_token(
            token="tok-before",
            locationId=api.location,
            refreshToken="rt-window",
            clientId="client-w",
            clientSecret="secret-w",
        )
        assert api.upsert({"email": "a@example.com"}, token="tok-before").status_code == 200
        form = {"client_id": "client-w", "client_secret": "secret-w", "refresh_token": "rt-window"}
        body = api.oauth(grant_type="refresh_token", user_type="Location", **form).json()
        assert api.upsert({"email": "a@example.com"}, token=body["access_token"]).status_code == 200
        assert api.upsert({"email": "a@example.com"}, token=body["access_token"]).status_code == 429
        assert api.upsert({"email": "a@example.com"}, token="tok-before").status_code == 429

    def test_timeline_counts_answers_per_location_and_bucket(self, api, sandbox):
        # locations of their own: a request of an earlier test still hanging on a fault would
        # be answered (and counted) on the shared test locations after the reset
        here, there = "loc-timeline", "loc-timeline-other"
        sandbox.put_location(here, rateLimit={"burst": 2, "intervalMs": 60_000, "daily": 1000})
        sandbox.add_token(token="tok-timeline", locationId=here)
        sandbox.put_location(there)
        sandbox.add_token(token="tok-timeline-other", locationId=there)
        body = {"locationId": here}
        before = time.time()
        statuses = [
            api.upsert({**body, "email": f"{i}@example.com"}, token="tok-timeline").status_code
            for i in range(3)
        ]
        api.contact("nope", token="tok-timeline")
        assert api.upsert({**body, "email": "a@example.com"}, token="tok-timeline-other").status_code == 403
        after = time.time()
        assert statuses == [200, 200, 429]
        upserts = sandbox.timeline(here, bucket_ms=100, endpoint="POST /contacts/upsert")
        assert all(before - 0.1 <= b["start"] <= after for b in upserts)
        total: dict[str, int] = {}
        for bucket in upserts:
            for status, n in bucket["answers"].items():
                total[status] = total.get(status, 0) + n
        assert total == {"200": 2, "429": 1}
        everything = sandbox.timeline(here, bucket_ms=60_000)
        assert sum(sum(b["answers"].values()) for b in everything) == 4  # the GET's 429 too
        assert sandbox.timeline(there) == [{"start": pytest.approx(before, abs=60), "answers": {"403": 1}}]
        sandbox.reset()
        assert sandbox.timeline(here) == []

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
