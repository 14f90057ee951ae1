"""Fault injection: 5xx, latency, timeouts, dropped connections, 429 storms; seeded and reproducible."""

from __future__ import annotations

import time

import pytest
import requests

pytestmark = pytest.mark.integration


def statuses(api, n: int) -> list[int]:
    return [api.upsert({"email": f"f{i}@example.com"}).status_code for i in range(n)]


class TestErrors:
    def test_error_rate_one_answers_5xx_with_json_body_and_limit_headers(self, api, sandbox):
        sandbox.set_faults(error_rate=1.0, seed=1)
        responses = [api.upsert({"email": "e@example.com"}) for _ in range(12)]
        assert {r.status_code for r in responses} == {500, 502, 503}
        body = responses[0].json()
        assert body["statusCode"] == responses[0].status_code
        assert "X-RateLimit-Remaining" in responses[0].headers

    def test_same_seed_gives_the_same_sequence(self, api, sandbox):
        sandbox.set_faults(error_rate=0.5, seed=7)
        first = statuses(api, 20)
        sandbox.set_faults(error_rate=0.5, seed=7)
        second = statuses(api, 20)
        sandbox.set_faults(error_rate=0.5, seed=8)
        third = statuses(api, 20)
        assert first == second
        assert first != third
        assert 200 in first
        assert set(first) - {200}

    def test_stats_count_the_faults(self, api, sandbox):
        sandbox.set_faults(error_rate=1.0, error_statuses=[503])
        statuses(api, 3)
        stats = sandbox.stats()
        assert stats["faults"] == {"error": 3}
        assert stats["requests"]["POST /contacts/upsert"] == {"503": 3}

    def test_unauthenticated_requests_get_no_faults(self, api, sandbox):
        sandbox.set_faults(error_rate=1.0)
        assert api.upsert({"email": "e@example.com"}, token="bogus").status_code == 401


class TestLatencyAndTimeouts:
    def test_latency_is_added_to_each_request(self, api, sandbox):
        sandbox.set_faults(latency_ms=200)
        started = time.perf_counter()
        assert api.upsert({"email": "l@example.com"}).status_code == 200
        assert time.perf_counter() - started >= 0.2

    def test_timeout_holds_the_request_past_the_client_timeout(self, api, sandbox):
        sandbox.set_faults(timeout_rate=1.0, hang_seconds=2)
        with pytest.raises(requests.ReadTimeout):
            api.upsert({"email": "t@example.com"}, timeout=0.5)

    def test_drop_closes_the_connection_without_a_response(self, api, sandbox):
        sandbox.set_faults(drop_rate=1.0)
        with pytest.raises(requests.ConnectionError, match="without response"):
            api.upsert({"email": "d@example.com"})
        assert sandbox.stats()["requests"]["POST /contacts/upsert"] == {"dropped": 1}

    @pytest.mark.parametrize(
        ("faults", "expected"),
        [
            ({"error_rate": 1.0}, requests.HTTPError),
            ({"drop_rate": 1.0}, requests.ConnectionError),
            ({"timeout_rate": 1.0, "hang_seconds": 1.5}, requests.ReadTimeout),
        ],
        ids=["error", "drop", "timeout"],
    )
    @pytest.mark.parametrize(("phase", "applied"), [("before", 0), ("after", 1)])
    def test_phase_says_whether_the_upsert_was_applied(self, api, sandbox, faults, expected, phase, applied):
        sandbox.set_faults(phase=phase, **faults)
        with pytest.raises(expected):
            api.upsert({"email": "p@example.com"}, timeout=0.5).raise_for_status()
        assert len(sandbox.contacts(api.location)) == applied

    def test_faults_apply_to_get_contact(self, api, sandbox):
        sandbox.set_faults(error_rate=1.0, error_statuses=[502])
        assert api.contact("any").status_code == 502


class TestStorms:
    def test_storm_forces_429_with_headers_on_a_fixed_cycle(self, api, sandbox):
        sandbox.set_faults(storm_every_n=5, storm_length=2)
        responses = [api.upsert({"email": f"s{i}@example.com"}) for i in range(10)]
        assert [r.status_code for r in responses] == [200, 200, 200, 429, 429] * 2
        storm = responses[3]
        assert storm.json()["error"] == "Too Many Requests"
        assert storm.headers["X-RateLimit-Remaining"] == "0"
        assert int(storm.headers["X-RateLimit-Daily-Remaining"]) > 0
