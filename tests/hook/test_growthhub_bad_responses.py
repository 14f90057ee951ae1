"""
Bad answers from the API (or a proxy in front of it) become clear errors, never crashes.

The scripted server on 127.0.0.1 serves each bad answer over real HTTP, so the hook's whole
path runs: the transport, the body size cap, decoding, classification, outcomes and logs.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import pytest
from scripted_http import Recorded, Reply, ScriptedApi, serve

from growthhub_provider.client import GrowthHubAuthError, GrowthHubBadResponse, GrowthHubRejected
from growthhub_provider.client.responses import MAX_MESSAGE_CHARS, MAX_RESPONSE_BYTES
from growthhub_provider.hooks.growthhub import GrowthHubHook

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

TOKEN = "pit-bad-responses-token-0001"
FAST = {"backoff_initial_s": 0.001, "backoff_max_s": 0.01, "max_attempts": 3, "max_workers": 2}
BAD, GOOD = "bad@example.com", "good@example.com"
BIG = 3 * MAX_RESPONSE_BYTES  # "multi-MB"
# Longest outcome message: "<status>: unusable response: " + a capped detail.
MAX_OUTCOME_MESSAGE = MAX_MESSAGE_CHARS + 100


def good(contact_id: str = "c-good") -> Reply:
    return Reply(200, json.dumps({"new": True, "contact": {"id": contact_id}, "traceId": "t1"}).encode())


HTML_502 = (
    b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1>"
    b"</center><hr><center>nginx</center></body></html>"
)
CAPTIVE_PORTAL = b"<!DOCTYPE html><html><body><h1>Sign in</h1><p>Ask it@corp.example</p></body></html>"
HUGE_CONTACT = b'{"new": true, "contact": {"id": "c1", "notes": "'  # + pad + suffix: valid JSON

# Every 2xx answer the hook cannot use, and a phrase its error must contain.
UNUSABLE_2XX = {
    "plain-text": (Reply(200, b"OK", "text/plain"), "body is not JSON (text/plain"),
    "html-page": (Reply(200, CAPTIVE_PORTAL, "text/html"), "body is not JSON (text/html"),
    "empty": (Reply(200, b""), "empty body"),
    "empty-204": (Reply(204, b"", None), "empty body"),
    "truncated-json": (Reply(200, b'{"new": true, "contact": {"id"'), "body is not JSON"),
    "json-list": (Reply(200, b'[{"contact": {"id": "c1"}}]'), "JSON list, not an object"),
    "json-null": (Reply(200, b"null"), "JSON NoneType, not an object"),
    "deeply-nested": (Reply(200, b"[" * 100_000), "body is not JSON"),
    "no-contact": (Reply(200, b'{"new": true, "traceId": "t"}'), "no contact.id in the JSON (body keys"),
    "contact-not-object": (Reply(200, b'{"contact": "c1"}'), "no contact.id"),
    "contact-without-id": (
        Reply(200, b'{"contact": {"email": "ann.lee@example.com", "phone": "+18885550167"}}'),
        "no contact.id in the JSON (contact keys: email, phone)",
    ),
    "null-id": (Reply(200, b'{"contact": {"id": null}}'), "no contact.id"),
    "empty-id": (Reply(200, b'{"contact": {"id": ""}}'), "no contact.id"),
    "huge-chunked": (
        Reply(200, HUGE_CONTACT, pad=BIG, suffix=b'"}}', chunked=True),
        f"over the {MAX_RESPONSE_BYTES}-byte limit",
    ),
    "huge-content-length": (
        Reply(200, HUGE_CONTACT, pad=BIG, suffix=b'"}}'),
        f"body of {len(HUGE_CONTACT) + BIG + 3} bytes is over",
    ),
    "bad-gzip": (
        Reply(200, b"this is not gzip", headers={"Content-Encoding": "gzip"}),
        "could not be decoded (Content-Encoding gzip)",
    ),
}

# Bodies of 5xx answers that are not the API's JSON: still transient.
ODD_5XX = {
    "proxy-html-502": Reply(502, HTML_502, "text/html"),
    "empty-503": Reply(503, b"", None),
    "plain-504": Reply(504, b"upstream request timeout", "text/plain"),
    "json-list-500": Reply(500, b"[1, 2]"),
    "huge-500": Reply(500, b"<html>", "text/html", pad=BIG, chunked=True),
}


def _key(request: Recorded) -> str:
    """Which script answers: the row's email for an upsert, ``oauth`` for a refresh, else the path."""
    if request.path == "/contacts/upsert":
        return str(request.json().get("email"))
    return "oauth" if request.path == "/oauth/token" else request.path


@pytest.fixture
def api(growthhub_conn: Callable[..., None]) -> Iterator[ScriptedApi]:
    """A scripted API on a free loopback port (good answers unless scripted), and the connection."""
    for server in serve(_key, default=good()):
        growthhub_conn(host=server.base_url, password=TOKEN)
        yield server


def batch(hook: GrowthHubHook) -> dict[str, Any]:
    outcomes = list(hook.upsert_contacts([("bad", {"email": BAD}), ("good", {"email": GOOD})]))
    return {o.key: o for o in outcomes}


@pytest.mark.parametrize(("reply", "phrase"), UNUSABLE_2XX.values(), ids=UNUSABLE_2XX.keys())
def test_unusable_2xx_fails_only_its_row_and_is_not_retried(
    api: ScriptedApi, reply: Reply, phrase: str
) -> None:
    api.scripts[BAD] = [reply]
    hook = GrowthHubHook(**FAST)
    outcomes = batch(hook)
    bad = outcomes["bad"]
    assert (bad.status, bad.http_status, bad.attempts, bad.contact_id) == ("failed", reply.status, 1, None)
    (message,) = bad.messages
    assert message.startswith(f"{reply.status}: unusable response: ")
    assert phrase in message
    assert len(message) <= MAX_OUTCOME_MESSAGE
    assert outcomes["good"].status == "created", "the rest of the batch goes on"
    assert api.served[BAD] == 1
    assert hook.last_batch_stats is not None
    assert (hook.last_batch_stats.failed, hook.last_batch_stats.created) == (1, 1)


@pytest.mark.parametrize(("reply", "phrase"), UNUSABLE_2XX.values(), ids=UNUSABLE_2XX.keys())
def test_unusable_2xx_raises_bad_response_from_upsert_contact(
    api: ScriptedApi, reply: Reply, phrase: str
) -> None:
    api.scripts[BAD] = [reply]
    with pytest.raises(GrowthHubBadResponse) as raised:
        GrowthHubHook(**FAST).upsert_contact({"email": BAD})
    assert raised.value.status == reply.status
    assert phrase in str(raised.value)
    assert len(str(raised.value)) <= MAX_OUTCOME_MESSAGE


@pytest.mark.parametrize("reply", ODD_5XX.values(), ids=ODD_5XX.keys())
def test_5xx_with_any_body_is_transient_and_retried(api: ScriptedApi, reply: Reply) -> None:
    api.scripts[BAD] = [reply, good("c-bad")]
    outcomes = batch(GrowthHubHook(**FAST))
    assert (outcomes["bad"].status, outcomes["bad"].contact_id, outcomes["bad"].attempts) == (
        "created",
        "c-bad",
        2,
    )


@pytest.mark.parametrize("reply", ODD_5XX.values(), ids=ODD_5XX.keys())
def test_5xx_with_any_body_fails_the_row_with_a_short_message_once_retries_run_out(
    api: ScriptedApi, reply: Reply
) -> None:
    api.scripts[BAD] = [reply]
    bad = batch(GrowthHubHook(**FAST))["bad"]
    assert (bad.status, bad.http_status, bad.attempts) == ("failed", reply.status, FAST["max_attempts"])
    (message,) = bad.messages
    assert message.startswith(f"{reply.status}: ")
    assert len(message) <= MAX_OUTCOME_MESSAGE


def test_proxy_html_error_page_is_quoted_short_and_on_one_line(api: ScriptedApi) -> None:
    api.scripts[BAD] = [Reply(502, HTML_502 + b"\n\t<!-- padding -->" * 1000, "text/html")]
    (message,) = batch(GrowthHubHook(**FAST))["bad"].messages
    assert message.startswith("502: Bad Gateway: <html><head><title>502 Bad Gateway</title>")
    assert "\n" not in message
    assert "\t" not in message
    assert message.endswith("...")
    assert len(message) <= MAX_OUTCOME_MESSAGE


def test_4xx_html_page_is_a_rejection_with_the_reason_and_start_of_the_page(api: ScriptedApi) -> None:
    page = b"<html><body><h1>400 Bad Request</h1>Request Header Or Cookie Too Large</body></html>"
    api.scripts[BAD] = [Reply(400, page, "text/html")]
    with pytest.raises(GrowthHubRejected) as raised:
        GrowthHubHook(**FAST).upsert_contact({"email": BAD})
    (message,) = raised.value.messages
    assert message.startswith("Bad Request: <html><body><h1>400 Bad Request</h1>")
    assert api.served[BAD] == 1


def test_huge_api_message_lists_are_capped(api: ScriptedApi) -> None:
    body = {"statusCode": 422, "message": [f"field{i} {'x' * 1000} is bad" for i in range(500)]}
    api.scripts[BAD] = [Reply(422, json.dumps(body).encode())]
    rejected = batch(GrowthHubHook(**FAST))["bad"]
    assert rejected.status == "rejected"
    assert len(rejected.messages) == 21
    assert rejected.messages[-1] == "... and 480 more"
    assert all(len(m) <= MAX_MESSAGE_CHARS for m in rejected.messages)


def test_huge_body_is_not_read_to_its_end(api: ScriptedApi) -> None:
    """The hook drops the connection past the cap: the server sees the client hang up."""
    api.scripts[BAD] = [Reply(200, HUGE_CONTACT, pad=20 * MAX_RESPONSE_BYTES, suffix=b'"}}', chunked=True)]
    assert batch(GrowthHubHook(**FAST))["bad"].status == "failed"
    deadline = time.monotonic() + 10
    while not api.hung_up[BAD] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert api.hung_up[BAD] == 1


def test_quoted_bodies_never_carry_the_token_and_are_masked_in_logs(
    api: ScriptedApi, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Outcome messages keep personal data (they feed the quarantine); logs mask it, the per-row
    lines at debug level too; no token anywhere."""
    page = (
        b"<html><body>Upstream said: contact ann.lee@example.com or +1 888-555-0167. "
        b"Request headers: Authorization: Bearer " + TOKEN.encode() + b", Authorization: Bearer "
        b"some-other-bearer-token</body></html>"
    )
    api.scripts[BAD] = [Reply(502, page, "text/html")]
    api.scripts[GOOD] = [Reply(200, page, "text/html")]
    hook = GrowthHubHook(**FAST)
    hook._log = logging.getLogger("growthhub_provider.hooks.growthhub")  # DEBUG reaches caplog
    with caplog.at_level(logging.DEBUG):
        outcomes = batch(hook)
    with pytest.raises(GrowthHubBadResponse) as raised:
        GrowthHubHook(**FAST).upsert_contact({"email": GOOD})
    logs = capsys.readouterr().out + caplog.text
    assert "2 rows failed after retries: 502 x 1, unusable 200 x 1" in logs
    assert "Row bad failed (HTTP 502)" in logs
    assert "Row good failed (HTTP 200)" in logs
    for secret in (TOKEN, "some-other-bearer-token"):
        assert secret not in logs + repr(outcomes) + str(raised.value)
    for personal in ("ann.lee@example.com", "888-555-0167"):
        assert personal not in logs + str(raised.value)
    assert "a***@***.com" in logs
    assert "***67" in logs
    assert "Bearer ***" in logs


def test_get_contact_with_an_unusable_body_raises_bad_response(api: ScriptedApi) -> None:
    api.scripts["/contacts/c1"] = [Reply(200, b'{"contact": []}')]
    with pytest.raises(GrowthHubBadResponse, match=r"no contact\.id"):
        GrowthHubHook(**FAST).get_contact("c1")


@pytest.mark.parametrize(
    "reply",
    [
        Reply(200, CAPTIVE_PORTAL, "text/html"),
        Reply(200, b'{"token": "at-leak-0001", "refresh_token": "rt-leak-0001"}'),
        Reply(200, b'{"access_token": null, "refresh_token": "rt-leak-0001"}'),
        Reply(200, b'["at-leak-0001"]'),
        Reply(200, b'{"access_token": "at-leak-0001"', pad=BIG, chunked=True),
    ],
    ids=["html", "renamed-field", "null-token", "json-list", "huge"],
)
def test_unusable_oauth_answer_fails_the_batch_once_without_quoting_it(
    api: ScriptedApi, growthhub_conn: Callable[..., None], reply: Reply
) -> None:
    growthhub_conn(
        host=api.base_url,
        password=None,
        client_id="cid",
        client_secret="csecret-bad-0001",
        refresh_token="rt-seed",
    )
    api.scripts["oauth"] = [reply]
    hook = GrowthHubHook(**FAST)
    rows = [(f"r{i}", {"email": f"r{i}@example.com"}) for i in range(8)]
    with pytest.raises(GrowthHubAuthError, match=r"OAuth refresh .* unusable body") as raised:
        list(hook.upsert_contacts(rows))
    assert "leak" not in str(raised.value)
    assert "csecret" not in str(raised.value)
    assert api.served["oauth"] == 1, "the other rows fail fast instead of refreshing again"
    assert sum(api.served[f"r{i}@example.com"] for i in range(8)) == 0
