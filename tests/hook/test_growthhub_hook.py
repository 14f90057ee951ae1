"""Unit tests of the GrowthHub hook, against a scripted HTTP server on 127.0.0.1 (tests/scripted_http.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from scripted_http import Recorded, Reply, ScriptedApi, json_reply

from growthhub_provider import get_provider_info
from growthhub_provider.client import (
    FileTokenStore,
    GrowthHubAuthError,
    GrowthHubClient,
    GrowthHubConfigError,
    GrowthHubNotFound,
    GrowthHubRejected,
    GrowthHubTransientError,
    LocalCoordination,
    TokenState,
    UpsertOutcome,
    UpsertResult,
    identity_keys,
)
from growthhub_provider.client.redis_coordination import RedisCoordination, RedisRateLimiter
from growthhub_provider.client.settings import DEFAULT_API_VERSION
from growthhub_provider.hooks.growthhub import GrowthHubHook
from growthhub_provider.masking import mask_pii

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

UPSERT = "/contacts/upsert"
TOKEN = "/oauth/token"
FAST = {"backoff_initial_s": 0.001, "backoff_max_s": 0.01}
OAUTH = {"client_id": "client-1", "client_secret": "client-secret-xyz", "refresh_token": "refresh-seed-0"}


def ok(contact_id: str = "c1", new: bool = True, **headers: str) -> Reply:
    return json_reply(200, {"new": new, "contact": {"id": contact_id}, "traceId": "t1"}, **headers)


def error(status: int, message: str | list[str], **headers: str) -> Reply:
    return json_reply(status, {"statusCode": status, "message": message}, **headers)


@pytest.fixture
def hook(scripted_conn: Callable[..., None]) -> GrowthHubHook:
    scripted_conn()
    return GrowthHubHook(**FAST)


class TestGetProviderInfo:
    def test_declares_the_connection_type_and_its_fields(self) -> None:
        info = get_provider_info()
        assert info["package-name"] == "growthhub-sync"
        (conn_type,) = info["connection-types"]
        assert conn_type["connection-type"] == GrowthHubHook.conn_type
        assert conn_type["hook-class-name"] == "growthhub_provider.hooks.growthhub.GrowthHubHook"
        fields = conn_type["conn-fields"]
        assert {
            "location_id",
            "api_version",
            "client_id",
            "client_secret",
            "refresh_token",
            "coordination",
        } <= fields.keys()
        assert fields["coordination"]["schema"]["default"] == "local"
        assert fields["client_secret"]["schema"]["format"] == "password"
        assert fields["refresh_token"]["schema"]["format"] == "password"

    def test_airflow_discovers_the_hook_for_the_connection_type(self) -> None:
        from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

        hook_info = ProvidersManagerTaskRuntime().hooks["growthhub"]
        assert hook_info is not None
        assert hook_info.hook_class_name.endswith("GrowthHubHook")


class TestIdentityKeys:
    @pytest.mark.parametrize(
        ("payload", "expected"),
        [
            ({"email": "  Ann@Example.COM "}, {"email:ann@example.com"}),
            ({"phone": "+1 (888) 555-0101"}, {"phone:18885550101"}),
            ({"email": "a@b.co", "phone": "555 0101"}, {"email:a@b.co", "phone:5550101"}),
            ({"firstName": "x", "email": None, "phone": ""}, set()),
        ],
    )
    def test_normalises_email_and_phone(self, payload: dict[str, Any], expected: set[str]) -> None:
        assert identity_keys(payload) == expected


class TestMaskPii:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("email ann.lee@example.com is taken", "email a***@***.com is taken"),
            ("phone +1 888-555-0167 invalid", "phone ***67 invalid"),
            ("call 0612 345 678 now", "call ***78 now"),
            ("row 42 took 3 attempts", "row 42 took 3 attempts"),
            ("Version must be one of: 2023-02-21", "Version must be one of: 2023-02-21"),
        ],
    )
    def test_masks_emails_and_phones_only(self, text: str, expected: str) -> None:
        assert mask_pii(text) == expected


class TestFileTokenStore:
    def test_keeps_the_token_state_in_an_owner_only_file(self, tmp_path: Path) -> None:
        store = FileTokenStore(tmp_path / "t.json", "c")
        assert store.load("seed") is None
        state = TokenState(refresh_token="r1", access_token="a1", expires_at=1234.5)
        with store.refresh_lock():
            store.save("seed", state)
        assert store.load("seed") == state
        assert FileTokenStore(tmp_path / "t.json", "other").load("seed") is None
        assert stat.S_IMODE(os.stat(tmp_path / "t.json").st_mode) == 0o600

    def test_ignores_tokens_descended_from_a_replaced_seed(self, tmp_path: Path) -> None:
        store = FileTokenStore(tmp_path / "t.json", "c")
        store.save("old-seed", TokenState(refresh_token="r1"))
        assert store.load("new-seed") is None

    def test_reads_the_refresh_token_a_previous_release_stored(self, tmp_path: Path) -> None:
        """Files written before access tokens were shared hold only the refresh token."""
        path = tmp_path / "t.json"
        store = FileTokenStore(path, "c")
        store.save("seed", TokenState(refresh_token="r0"))
        path.write_text(path.read_text().replace(', "access_token": null, "expires_at": null', ""))
        assert store.load("seed") == TokenState(refresh_token="r0")


class TestGrowthHubHook:
    def test_session_carries_bearer_version_and_json_headers(
        self, hook: GrowthHubHook, scripted_api: ScriptedApi
    ) -> None:
        scripted_api.post(UPSERT, ok())
        hook.upsert_contact({"email": "a@b.co"})
        sent = scripted_api.last_request.headers
        assert sent["Authorization"] == "Bearer pit-test-token"
        assert sent["Version"] == DEFAULT_API_VERSION
        assert sent["Accept"] == sent["Content-Type"] == "application/json"
        assert hook.get_conn() is hook.get_conn()

    def test_version_and_workers_come_from_the_connection(
        self, scripted_conn: Callable[..., None], scripted_api: ScriptedApi
    ) -> None:
        scripted_conn(api_version="2021-07-28", max_workers=7, timeout=3)
        hook = GrowthHubHook()
        scripted_api.post(UPSERT, ok())
        hook.upsert_contact({"email": "a@b.co"})
        assert scripted_api.last_request.headers["Version"] == "2021-07-28"
        assert (hook.max_workers, hook.timeout) == (7, 3.0)
        assert hook.client.transport.timeout == 3.0

    def test_reads_prefixed_form_fields_like_plain_extras(
        self, scripted_conn: Callable[..., None], scripted_api: ScriptedApi
    ) -> None:
        scripted_conn(location_id="", extra__growthhub__location_id="loc9", extra__growthhub__api_version="")
        scripted_api.post(UPSERT, ok())
        GrowthHubHook().upsert_contact({"email": "a@b.co"})
        assert scripted_api.last_request.json()["locationId"] == "loc9"
        assert scripted_api.last_request.headers["Version"] == DEFAULT_API_VERSION

    def test_extras_never_become_headers(
        self, scripted_conn: Callable[..., None], scripted_api: ScriptedApi
    ) -> None:
        scripted_conn(password=None, **OAUTH)
        scripted_api.post(TOKEN, json_reply(200, {"access_token": "access-1", "refresh_token": "refresh-1"}))
        scripted_api.post(UPSERT, ok())
        GrowthHubHook().upsert_contact({"email": "a@b.co"})
        assert not {"client_secret", "refresh_token", "location_id"} & set(scripted_api.last_request.headers)

    @pytest.mark.parametrize(
        ("payload", "expected"),
        [({"email": "a@b.co"}, "loc1"), ({"email": "a@b.co", "locationId": "other"}, "other")],
        ids=["filled-in", "kept"],
    )
    def test_fills_location_id_when_payload_has_none(
        self, hook: GrowthHubHook, scripted_api: ScriptedApi, payload: dict[str, Any], expected: str
    ) -> None:
        scripted_api.post(UPSERT, ok())
        hook.upsert_contact(payload)
        assert scripted_api.last_request.json()["locationId"] == expected

    @pytest.mark.parametrize(("new", "status"), [(True, "created"), (False, "updated")])
    def test_upsert_returns_id_new_flag_and_trace(
        self, hook: GrowthHubHook, scripted_api: ScriptedApi, new: bool, status: str
    ) -> None:
        scripted_api.post(UPSERT, ok("c9", new=new))
        assert hook.upsert_contact({"email": "a@b.co"}) == UpsertResult("c9", new, "t1")
        (outcome,) = hook.upsert_contacts([("k1", {"email": "a@b.co"})])
        assert outcome == UpsertOutcome("k1", status, "c9", 200, [], "t1", attempts=1)

    @pytest.mark.parametrize(
        ("response", "raised", "messages"),
        [
            (error(400, "Bad Request"), GrowthHubRejected, ["Bad Request"]),
            (error(422, ["email must be an email", "country invalid"]), GrowthHubRejected, None),
            (error(401, "Invalid token: access token is invalid"), GrowthHubAuthError, None),
            (error(403, "The token does not have access to this location."), GrowthHubAuthError, None),
            (error(409, "Conflict"), GrowthHubRejected, ["Conflict"]),
        ],
        ids=["400", "422", "401", "403", "409"],
    )
    def test_client_errors_are_classified_and_not_retried(
        self,
        hook: GrowthHubHook,
        scripted_api: ScriptedApi,
        response: Reply,
        raised: type[Exception],
        messages: list[str] | None,
    ) -> None:
        scripted_api.post(UPSERT, response)
        with pytest.raises(raised) as excinfo:
            hook.upsert_contact({"email": "a@b.co"})
        assert scripted_api.call_count == 1
        if isinstance(excinfo.value, GrowthHubRejected):
            assert excinfo.value.status == response.status
            assert excinfo.value.messages == (messages or json.loads(response.body)["message"])

    def test_get_contact_raises_not_found_on_404(
        self, hook: GrowthHubHook, scripted_api: ScriptedApi
    ) -> None:
        scripted_api.get("/contacts/nope", error(404, "Contact not found"))
        with pytest.raises(GrowthHubNotFound):
            hook.get_contact("nope")
        assert scripted_api.call_count == 1

    @pytest.mark.parametrize(
        "first",
        [
            error(500, "Internal Server Error"),
            error(502, "Bad Gateway"),
            error(503, "Service Unavailable"),
            error(429, "Too many requests", **{"X-RateLimit-Interval-Milliseconds": "50"}),
            Reply(fault="drop"),
            Reply(fault="timeout", delay_s=0.6),
            Reply(200, b'{"new": true, "contact": ', fault="broken-body"),
        ],
        ids=["500", "502", "503", "429", "dropped", "timeout", "broken-body"],
    )
    def test_transient_errors_are_retried(
        self, scripted_conn: Callable[..., None], scripted_api: ScriptedApi, first: Reply
    ) -> None:
        scripted_conn(timeout=0.3)  # the "timeout" answer comes after 0.6 s
        hook = GrowthHubHook(**FAST)
        scripted_api.post(UPSERT, first, first, ok())
        (outcome,) = hook.upsert_contacts([("k", {"email": "a@b.co"})])
        assert (outcome.status, outcome.attempts) == ("created", 3)
        assert hook.last_batch_stats is not None
        assert hook.last_batch_stats.retried == 2
        assert hook.last_batch_stats.throttled == (2 if first.status == 429 else 0)

    def test_429_holds_the_next_send_back_for_the_header_interval(
        self, hook: GrowthHubHook, scripted_api: ScriptedApi
    ) -> None:
        throttled = error(
            429, "Too many", **{"X-RateLimit-Interval-Milliseconds": "300", "X-RateLimit-Max": "100"}
        )
        scripted_api.post(UPSERT, throttled, ok())
        started = time.monotonic()
        hook.upsert_contact({"email": "a@b.co"})
        assert time.monotonic() - started >= 0.29

    @pytest.mark.parametrize(
        ("attempts", "seconds", "expected_calls"), [(3, 60.0, 3), (50, 0.05, None)], ids=["attempts", "time"]
    )
    def test_retries_are_bounded_in_attempts_and_time(
        self,
        scripted_conn: Callable[..., None],
        scripted_api: ScriptedApi,
        attempts: int,
        seconds: float,
        expected_calls: int | None,
    ) -> None:
        scripted_conn()
        hook = GrowthHubHook(max_attempts=attempts, max_retry_seconds=seconds, backoff_initial_s=0.01)
        scripted_api.post(UPSERT, error(503, "Service Unavailable"))
        with pytest.raises(GrowthHubTransientError):
            hook.upsert_contact({"email": "a@b.co"})
        (outcome,) = hook.upsert_contacts([("k", {"email": "a@b.co"})])
        assert outcome.status == "failed"
        assert outcome.http_status == 503
        assert outcome.messages == ["503: Service Unavailable"]
        if expected_calls:
            assert outcome.attempts == expected_calls
        else:
            assert 1 < outcome.attempts < attempts

    def test_batch_reports_each_row_under_its_key(
        self, hook: GrowthHubHook, scripted_api: ScriptedApi
    ) -> None:
        def respond(request: Recorded) -> Reply:
            email = request.json()["email"]
            status = {"bad@x.io": 422, "down@x.io": 500}.get(email, 200)
            if status == 422:
                return json_reply(422, {"statusCode": 422, "message": ["email is invalid"]})
            return json_reply(
                status, {"new": email == "new@x.io", "contact": {"id": f"id-{email}"}, "traceId": "t"}
            )

        scripted_api.post(UPSERT, respond)
        rows = [("1", "new@x.io"), ("2", "old@x.io"), ("3", "bad@x.io"), ("4", "down@x.io")]
        outcomes = {o.key: o for o in hook.upsert_contacts((k, {"email": e}) for k, e in rows)}
        assert {k: o.status for k, o in outcomes.items()} == {
            "1": "created",
            "2": "updated",
            "3": "rejected",
            "4": "failed",
        }
        assert outcomes["3"].messages == ["email is invalid"]
        assert outcomes["3"].http_status == 422
        stats = hook.last_batch_stats
        assert stats is not None
        assert (stats.sent, stats.created, stats.updated, stats.rejected, stats.failed) == (4, 1, 1, 1, 1)

    @pytest.fixture
    def recorded_rows(self, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
        """Replace the HTTP part of a row by a 10 ms sleep that records what overlapped."""
        lock = threading.Lock()
        seen: dict[str, Any] = {"active": {}, "overlaps": [], "order": [], "peak": 0, "events": []}

        def fake_row(self: GrowthHubClient, row: Any, *_: Any) -> UpsertOutcome:
            with lock:
                seen["overlaps"].extend(
                    (row.key, key) for key, ids in seen["active"].items() if ids & row.identities
                )
                seen["active"][row.key] = row.identities
                seen["order"].append(row.key)
                seen["events"].append(("start", row.key))
                seen["peak"] = max(seen["peak"], len(seen["active"]))
            time.sleep(0.01)
            with lock:
                del seen["active"][row.key]
                seen["events"].append(("end", row.key))
            return UpsertOutcome(row.key, "updated")

        monkeypatch.setattr(GrowthHubClient, "_upsert_row", fake_row)
        return seen

    def test_same_identity_never_in_flight_twice_and_keeps_input_order(
        self, scripted_conn: Callable[..., None], recorded_rows: dict[str, Any]
    ) -> None:
        scripted_conn(max_workers=8)
        emails = ["Same@x.io", " same@X.io", "other@x.io", "+1 555 0101", "u{}@x.io"]
        rows = [(f"{i:03}", {"email": emails[i % 5].format(i)}) for i in range(100)]
        assert len(list(GrowthHubHook().upsert_contacts(rows))) == 100
        assert recorded_rows["overlaps"] == []
        same = [k for k in recorded_rows["order"] if int(k) % 5 in (0, 1)]
        assert same == sorted(same), "rows of one identity go out in input order"
        assert recorded_rows["peak"] > 2, "other identities still go out concurrently"

    def test_first_row_goes_out_alone_then_the_window_opens(
        self, scripted_conn: Callable[..., None], recorded_rows: dict[str, Any]
    ) -> None:
        scripted_conn(max_workers=8)
        rows = [(f"{i:03}", {"email": f"u{i}@x.io"}) for i in range(40)]
        assert len(list(GrowthHubHook().upsert_contacts(rows))) == 40
        assert recorded_rows["events"][:2] == [("start", "000"), ("end", "000")]
        assert recorded_rows["peak"] == 8, "after the first outcome: max_workers at once"

    def test_rows_linked_by_email_and_phone_wait_for_each_other(
        self, scripted_conn: Callable[..., None], recorded_rows: dict[str, Any]
    ) -> None:
        scripted_conn(max_workers=4)
        rows = [
            ("a", {"email": "p@x.io"}),
            ("b", {"email": "q@x.io", "phone": "555 0101"}),
            ("c", {"phone": "5550101", "email": "p@x.io"}),
        ]
        assert len(list(GrowthHubHook().upsert_contacts(rows))) == 3
        assert recorded_rows["overlaps"] == [], "c shares p@x.io with a and the phone with b"
        assert recorded_rows["order"].index("c") == 2

    def test_holds_a_bounded_window_of_a_huge_input(
        self, scripted_conn: Callable[..., None], scripted_api: ScriptedApi
    ) -> None:
        scripted_conn(max_workers=4)
        hook = GrowthHubHook()
        scripted_api.post(UPSERT, ok())
        pulled = 0

        def rows() -> Iterator[tuple[str, dict[str, Any]]]:
            nonlocal pulled
            for i in range(1_000_000):
                pulled += 1
                yield str(i), {"email": f"u{i}@x.io"}

        outcomes = hook.upsert_contacts(rows())
        for _ in range(10):
            next(outcomes)
        assert pulled <= 10 + 4 * 4
        outcomes.close()

    def test_rows_are_skipped_once_daily_quota_reaches_the_reserve(
        self, scripted_conn: Callable[..., None], scripted_api: ScriptedApi
    ) -> None:
        scripted_conn(max_workers=1)
        hook = GrowthHubHook()
        daily = iter(range(12, 0, -1))

        def respond(request: Recorded) -> Reply:
            return ok(**{"X-RateLimit-Daily-Remaining": str(next(daily))})

        scripted_api.post(UPSERT, respond)
        outcomes = list(
            hook.upsert_contacts(((str(i), {"email": f"u{i}@x.io"}) for i in range(10)), daily_reserve=10)
        )
        assert [o.status for o in outcomes] == ["created"] * 3 + ["skipped"] * 7
        assert scripted_api.call_count == 3
        assert hook.daily_remaining == 10
        assert hook.last_batch_stats is not None
        assert hook.last_batch_stats.skipped == 7

    @pytest.mark.parametrize(
        ("status", "message", "raised"),
        [
            (401, "Invalid token: access token is invalid", GrowthHubAuthError),
            (403, "The token is not authorized for this scope.", GrowthHubAuthError),
            (400, "Version header is not supported", GrowthHubConfigError),
        ],
    )
    def test_auth_or_version_error_escapes_the_batch_after_one_request(
        self,
        hook: GrowthHubHook,
        scripted_api: ScriptedApi,
        status: int,
        message: str,
        raised: type[Exception],
    ) -> None:
        scripted_api.post(UPSERT, error(status, message))
        with pytest.raises(raised, match=str(status)):
            list(hook.upsert_contacts((str(i), {"email": f"u{i}@x.io"}) for i in range(100)))
        assert scripted_api.call_count == 1, "the first request goes out alone"

    def test_hooks_of_one_location_share_a_limiter(self, scripted_conn: Callable[..., None]) -> None:
        scripted_conn()
        scripted_conn(conn_id="growthhub_other", location_id="loc2")
        assert GrowthHubHook().limiter is GrowthHubHook().limiter
        assert GrowthHubHook().limiter is not GrowthHubHook("growthhub_other").limiter

    def test_coordination_is_local_unless_the_connection_names_a_redis_connection(
        self, scripted_conn: Callable[..., None], monkeypatch: pytest.MonkeyPatch, token_file: Path
    ) -> None:
        scripted_conn()
        local = GrowthHubHook().coordination
        assert isinstance(local, LocalCoordination)
        assert local.token_file == token_file

        monkeypatch.setenv(
            "AIRFLOW_CONN_SHARED_STATE",
            json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": 6379, "extra": {"db": 9}}),
        )
        scripted_conn(coordination="shared_state")
        hook = GrowthHubHook()
        assert isinstance(hook.coordination, RedisCoordination)
        assert hook.coordination.description.startswith("redis 127.0.0.1:6379 db 9")
        assert isinstance(hook.limiter, RedisRateLimiter)

    @pytest.mark.parametrize(
        ("conn_type", "match"),
        [
            (None, "neither 'local' nor the id of a connection"),
            ("postgres", "of type 'postgres'; it must be of type 'redis'"),
        ],
    )
    def test_coordination_naming_no_redis_connection_fails_clearly(
        self,
        scripted_conn: Callable[..., None],
        monkeypatch: pytest.MonkeyPatch,
        conn_type: str | None,
        match: str,
    ) -> None:
        if conn_type:
            monkeypatch.setenv("AIRFLOW_CONN_SHARED_STATE", json.dumps({"conn_type": conn_type, "host": "h"}))
        scripted_conn(coordination="shared_state")
        with pytest.raises(GrowthHubConfigError, match=match):
            GrowthHubHook().upsert_contact({"email": "a@b.co"})
        ok, message = GrowthHubHook().test_connection()
        assert not ok
        assert "coordination='shared_state'" in message

    @pytest.mark.parametrize(
        ("response", "ok_expected"),
        [
            (error(404, "Contact not found"), True),
            (error(401, "Invalid token: access token is invalid"), False),
            (error(400, "Version header must be one of: 2023-02-21"), False),
        ],
        ids=["reachable", "bad-token", "bad-version"],
    )
    def test_test_connection_reports_ok_and_message(
        self, hook: GrowthHubHook, scripted_api: ScriptedApi, response: dict[str, Any], ok_expected: bool
    ) -> None:
        scripted_api.get("/contacts/growthhub-connection-test", response)
        success, message = hook.test_connection()
        assert success is ok_expected
        assert message

    def test_oauth_refreshes_on_401_and_stores_the_rotated_token(
        self, scripted_conn: Callable[..., None], scripted_api: ScriptedApi, token_file: Path
    ) -> None:
        scripted_conn(password="expired-access", **OAUTH)
        refresh_bodies: list[str] = []

        def token(request: Recorded) -> Reply:
            refresh_bodies.append(request.body.decode())
            n = len(refresh_bodies)
            return json_reply(
                200, {"access_token": f"access-{n}", "refresh_token": f"refresh-{n}", "expires_in": 86399}
            )

        def upsert(request: Recorded) -> Reply:
            status = 200 if request.headers["Authorization"].startswith("Bearer access-") else 401
            return json_reply(status, {"new": True, "contact": {"id": "c"}})

        scripted_api.post(TOKEN, token)
        scripted_api.post(UPSERT, upsert)
        rows = [(str(i), {"email": f"u{i}@x.io"}) for i in range(20)]
        assert {o.status for o in GrowthHubHook().upsert_contacts(rows)} == {"created"}
        assert len(refresh_bodies) == 1, "many threads saw the 401, one refresh happened"
        assert "refresh_token=refresh-seed-0" in refresh_bodies[0]
        assert "grant_type=refresh_token" in refresh_bodies[0]
        assert "user_type=Location" in refresh_bodies[0]
        token_request = next(r for r in scripted_api.requests if r.path == TOKEN)
        assert token_request.headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert "Authorization" not in token_request.headers

        # The next task (a new hook) starts from the stored access token: no refresh at all.
        store = FileTokenStore(token_file, "growthhub_default")
        GrowthHubHook().upsert_contact({"email": "a@b.co"})
        assert len(refresh_bodies) == 1
        assert scripted_api.last_request.headers["Authorization"] == "Bearer access-1"

        # Once that token has expired, a task spends the rotated refresh token, not the spent seed.
        stored = store.load("refresh-seed-0")
        store.save("refresh-seed-0", dataclasses.replace(stored, expires_at=time.time() - 1))
        GrowthHubHook().upsert_contact({"email": "a@b.co"})
        assert "refresh_token=refresh-1" in refresh_bodies[1]
        assert store.load("refresh-seed-0").refresh_token == "refresh-2"

    def test_oauth_refreshes_before_an_expired_token_is_used(
        self, scripted_conn: Callable[..., None], scripted_api: ScriptedApi
    ) -> None:
        scripted_conn(password=None, **OAUTH)
        scripted_api.post(
            TOKEN,
            json_reply(200, {"access_token": "access-1", "refresh_token": "r1", "expires_in": 0.05}),
            json_reply(200, {"access_token": "access-2", "refresh_token": "r2", "expires_in": 3600}),
        )
        scripted_api.post(UPSERT, ok())
        hook = GrowthHubHook()
        hook.upsert_contact({"email": "a@b.co"})
        time.sleep(0.06)
        hook.upsert_contact({"email": "a@b.co"})
        auth = [r.headers.get("Authorization") for r in scripted_api.requests if r.path == UPSERT]
        assert auth == ["Bearer access-1", "Bearer access-2"]

    @pytest.mark.parametrize(
        ("token_response", "match"),
        [
            (json_reply(200, {"access_token": "access-1", "refresh_token": "r1"}), "401"),
            (json_reply(400, {"error": "invalid_grant", "message": "spent"}), "OAuth refresh"),
        ],
        ids=["401-after-refresh", "refresh-refused"],
    )
    def test_oauth_fails_fast_when_refresh_does_not_help(
        self,
        scripted_conn: Callable[..., None],
        scripted_api: ScriptedApi,
        token_response: Reply,
        match: str,
    ) -> None:
        scripted_conn(password="old", max_workers=4, **OAUTH)
        scripted_api.post(TOKEN, token_response)
        scripted_api.post(UPSERT, error(401, "Invalid token: access token is invalid"))
        with pytest.raises(GrowthHubAuthError, match=match):
            list(GrowthHubHook(**FAST).upsert_contacts((str(i), {"email": f"u{i}@x.io"}) for i in range(50)))
        token_calls = sum(r.path == TOKEN for r in scripted_api.requests)
        assert token_calls == 1, "one refresh, however many rows saw the 401"
        assert scripted_api.call_count <= 2 * 4 + 1, "no retry storm: one resend per worker at most"

    def test_oauth_refresh_outage_is_retried_not_fatal(
        self, scripted_conn: Callable[..., None], scripted_api: ScriptedApi
    ) -> None:
        scripted_conn(password=None, **OAUTH)
        scripted_api.post(
            TOKEN,
            error(503, "Service Unavailable"),
            json_reply(200, {"access_token": "access-1", "refresh_token": "r1"}),
        )
        scripted_api.post(UPSERT, ok())
        (outcome,) = GrowthHubHook(**FAST).upsert_contacts([("k", {"email": "a@b.co"})])
        assert (outcome.status, outcome.attempts) == ("created", 2)

    @pytest.mark.parametrize(("log_pii", "shown"), [(False, "d***@***.io"), (True, "down@x.io")])
    def test_personal_data_is_masked_unless_the_connection_says_otherwise(
        self,
        scripted_conn: Callable[..., None],
        scripted_api: ScriptedApi,
        caplog: pytest.LogCaptureFixture,
        log_pii: bool,
        shown: str,
    ) -> None:
        scripted_conn(log_pii=log_pii)
        scripted_api.post(UPSERT, error(503, "down@x.io is unreachable"))
        hook = GrowthHubHook(max_attempts=1)
        hook._log = logging.getLogger("growthhub_provider.hooks.growthhub")  # DEBUG reaches caplog
        with caplog.at_level(logging.DEBUG):
            list(hook.upsert_contacts([("k", {"email": "down@x.io"})]))
        assert f"Row k failed (HTTP 503): 503: {shown} is unreachable" in caplog.text

    def test_retries_and_failed_rows_are_summarised_once_per_batch_by_cause(
        self,
        scripted_conn: Callable[..., None],
        scripted_api: ScriptedApi,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        scripted_conn(max_workers=1, timeout=0.3)  # one row at a time: the answers below go out in order
        scripted_api.post(
            UPSERT,
            error(500, "Internal Server Error"),
            error(503, "Service Unavailable"),
            ok(),
            Reply(fault="timeout", delay_s=0.6),
            ok(),
            *[error(502, "Bad Gateway")] * 3,
        )
        hook = GrowthHubHook(max_attempts=3, **FAST)
        hook._log = logging.getLogger("growthhub_provider.hooks.growthhub")
        with caplog.at_level(logging.DEBUG):
            outcomes = list(hook.upsert_contacts([(k, {"email": f"{k}@x.io"}) for k in "abc"]))
        assert [o.status for o in outcomes] == ["created", "created", "failed"]
        stats = hook.last_batch_stats
        assert stats is not None
        assert stats.retried_by_cause == {"502": 2, "500": 1, "503": 1, "timeout": 1}
        above_debug = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
        (line,) = [m for m in above_debug if m.startswith("GrowthHub batch: sent=")]
        assert line.endswith("; retried 5 requests: 502 x 2, 500 x 1, 503 x 1, timeout x 1")
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.startswith("GrowthHub batch: 1 rows failed after retries: 502 x 1")
        assert len(above_debug) == 2, above_debug

    def test_no_secret_reaches_logs_or_errors(
        self,
        scripted_conn: Callable[..., None],
        scripted_api: ScriptedApi,
        caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        caplog.set_level(logging.DEBUG)
        logging.getLogger("urllib3").setLevel(logging.DEBUG)
        scripted_conn(password="expired-access-token", **OAUTH)
        scripted_api.post(
            TOKEN, json_reply(200, {"access_token": "fresh-access-token", "refresh_token": "next-refresh"})
        )

        def upsert(request: Recorded) -> Reply:
            if request.headers["Authorization"] != "Bearer fresh-access-token":
                return json_reply(
                    401, {"statusCode": 401, "message": "Invalid token: access token is invalid"}
                )
            status = {"bad@x.io": 422, "down@x.io": 503}.get(request.json()["email"], 200)
            return json_reply(
                status, {"new": True, "contact": {"id": "c"}, "message": ["email bad@x.io is invalid"]}
            )

        scripted_api.post(UPSERT, upsert)
        hook = GrowthHubHook(**FAST)
        outcomes = list(hook.upsert_contacts([("1", {"email": "ok@x.io"}), ("2", {"email": "down@x.io"})]))
        with pytest.raises(GrowthHubRejected) as rejected:
            hook.upsert_contact({"email": "bad@x.io"})
        # stdlib records (http.client, urllib3) land in caplog; Airflow's structlog hook logger in stdout.
        logs = caplog.text + "".join(capsys.readouterr())
        secrets = (
            "expired-access-token",
            "fresh-access-token",
            "next-refresh",
            "client-secret-xyz",
            "refresh-seed-0",
        )
        for secret in secrets:
            assert secret not in logs + str(rejected.value) + repr(outcomes)
        assert "GrowthHub batch: sent=2" in logs
        assert "bad@x.io" not in logs
        assert "GrowthHub batch: 1 rows failed after retries: 503 x 1" in logs  # each row at debug

    def test_secrets_are_registered_with_the_masker(
        self, scripted_conn: Callable[..., None], scripted_api: ScriptedApi
    ) -> None:
        from airflow.sdk._shared.secrets_masker import redact

        scripted_conn(password="pit-secret-password", **OAUTH)
        scripted_api.post(
            TOKEN, json_reply(200, {"access_token": "fresh-access-token", "refresh_token": "next-refresh"})
        )
        scripted_api.post(UPSERT, error(401, "Invalid token"), ok())
        GrowthHubHook().upsert_contact({"email": "a@b.co"})
        for secret in ("pit-secret-password", "client-secret-xyz", "fresh-access-token", "next-refresh"):
            assert secret not in redact(f"value {secret} here")
