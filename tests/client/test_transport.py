"""
The client's HTTP transport against a scripted server on 127.0.0.1: connections are kept and
reused, a connection the server closed is replaced without a failed request, compressed bodies are
decoded within the size cap, proxies get the request forms they expect, and every network failure
becomes one of the client's transient errors.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from typing import TYPE_CHECKING

import pytest
from scripted_http import Reply, ScriptedApi, json_reply, serve

from growthhub_provider.client import (
    GrowthHubBrokenBody,
    GrowthHubConfigError,
    GrowthHubConnectionError,
    GrowthHubTimeout,
)
from growthhub_provider.client import transport as transport_module
from growthhub_provider.client.transport import MAX_RESPONSE_BYTES, Transport

if TYPE_CHECKING:
    from collections.abc import Iterator

HEADERS = {"Accept": "application/json", "Accept-Encoding": "gzip, deflate"}


def new_transport(**settings: object) -> Transport:
    return Transport(**{"timeout": 5.0, "verify": True, "proxies": {}, **settings})  # type: ignore[arg-type]


def get(transport: Transport, api: ScriptedApi, path: str = "/ping") -> transport_module.Answer:
    return transport.request("GET", f"{api.base_url}{path}", HEADERS)


def test_one_connection_carries_request_after_request(scripted_api: ScriptedApi) -> None:
    scripted_api.get("/ping", json_reply(200, {"ok": True}))
    transport = new_transport()
    answers = [get(transport, scripted_api) for _ in range(5)]
    assert [a.json() for a in answers] == [{"ok": True}] * 5
    assert {r.connection for r in scripted_api.requests} == {1}


def test_threads_share_connections_instead_of_each_opening_its_own(scripted_api: ScriptedApi) -> None:
    """Worker threads come and go; the connections stay, at most one per request in flight."""
    scripted_api.get("/ping", json_reply(200, {}))
    transport = new_transport()
    for _ in range(10):  # ten short-lived threads, one after the other
        thread = threading.Thread(target=get, args=(transport, scripted_api))
        thread.start()
        thread.join()
    assert {r.connection for r in scripted_api.requests} == {1}


@pytest.mark.parametrize("poll_sees_it", [True, False], ids=["seen-before-sending", "closed-meanwhile"])
def test_a_connection_the_server_closed_is_replaced_without_a_failed_request(
    scripted_api: ScriptedApi, monkeypatch: pytest.MonkeyPatch, poll_sees_it: bool
) -> None:
    scripted_api.get("/ping", Reply(200, b"{}", hang_up=True), json_reply(200, {"second": True}))
    transport = new_transport()
    get(transport, scripted_api)
    if poll_sees_it:  # a connection idle for a while is checked before it is used
        monkeypatch.setattr(transport_module, "_FRESH_S", 0.0)
    else:  # the server closes between the check and the send: the send finds out
        monkeypatch.setattr(transport_module, "_dropped", lambda connection: False)
    assert get(transport, scripted_api).json() == {"second": True}
    assert [r.connection for r in scripted_api.requests] == [1, 2], "each request was answered once"


def test_a_fresh_connection_dropped_before_the_answer_is_a_connection_error(
    scripted_api: ScriptedApi,
) -> None:
    scripted_api.get("/ping", Reply(fault="drop"))
    with pytest.raises(GrowthHubConnectionError):
        get(new_transport(), scripted_api)
    assert scripted_api.call_count == 1, "not sent twice: only a reused connection is retried"


def test_no_answer_within_the_timeout_is_a_timeout(scripted_api: ScriptedApi) -> None:
    scripted_api.get("/ping", Reply(200, b"{}", delay_s=0.5))
    with pytest.raises(GrowthHubTimeout):
        get(new_transport(timeout=0.1), scripted_api)


def test_a_body_cut_short_is_a_broken_body(scripted_api: ScriptedApi) -> None:
    scripted_api.get("/ping", Reply(200, b'{"contact": ', fault="broken-body"))
    with pytest.raises(GrowthHubBrokenBody):
        get(new_transport(), scripted_api)


def test_nothing_listening_is_a_connection_error() -> None:
    for api in serve():
        url = api.base_url
    with pytest.raises(GrowthHubConnectionError, match="ConnectionRefusedError"):
        new_transport().request("GET", f"{url}/ping", HEADERS)


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),
    ],
    ids=["gzip", "deflate", "raw-deflate"],
)
def test_compressed_bodies_are_decoded(scripted_api: ScriptedApi, encoding: str, compress: object) -> None:
    body = b'{"contact": {"id": "c1"}}'
    scripted_api.get("/ping", Reply(200, compress(body), headers={"Content-Encoding": encoding}))  # type: ignore[operator]
    answer = get(new_transport(), scripted_api)
    assert (answer.content, answer.problem) == (body, None)
    assert scripted_api.last_request.headers["Accept-Encoding"] == "gzip, deflate"


def test_a_body_that_inflates_past_the_cap_is_cut_and_its_connection_dropped(
    scripted_api: ScriptedApi,
) -> None:
    bomb = gzip.compress(b"x" * (8 * MAX_RESPONSE_BYTES))  # 8 MB from a few KB
    scripted_api.get("/ping", Reply(200, bomb, headers={"Content-Encoding": "gzip"}), json_reply(200, {}))
    transport = new_transport()
    answer = get(transport, scripted_api)
    assert answer.problem == f"body is over the {MAX_RESPONSE_BYTES}-byte limit"
    assert len(answer.content) == MAX_RESPONSE_BYTES
    get(transport, scripted_api)
    assert [r.connection for r in scripted_api.requests] == [1, 2]


def test_headers_of_the_answer_are_case_insensitive(scripted_api: ScriptedApi) -> None:
    scripted_api.get("/ping", json_reply(200, {}, **{"X-RateLimit-Remaining": "7"}))
    answer = get(new_transport(), scripted_api)
    assert answer.headers.get("x-ratelimit-remaining") == answer.headers["X-RATELIMIT-REMAINING"] == "7"


def test_header_lines_repeated_or_folded_read_as_http_client_read_them() -> None:
    lines = [
        b"Content-Type: application/json\r\n",
        b"Cache-Control: no-cache\r\n",
        b"cache-control: no-store\r\n",
        b"X-Note: first part\r\n",
        b"\tsecond part\r\n",
        b"no colon here\r\n",
        b"X-Empty:\r\n",
    ]
    headers = transport_module._parse_headers(lines)
    assert dict(headers) == {
        "content-type": "application/json",
        "cache-control": "no-cache, no-store",
        "x-note": "first part second part",
        "x-empty": "",
    }
    assert "CONTENT-TYPE" in headers
    assert headers.get_all("Cache-Control") == ["no-cache, no-store"]
    assert headers.get_all("Missing", []) == []


def test_redirects_are_answers_not_followed(scripted_api: ScriptedApi) -> None:
    scripted_api.get("/ping", Reply(302, b"", None, headers={"Location": "/elsewhere"}))
    answer = get(new_transport(), scripted_api)
    assert (answer.status_code, answer.headers["Location"]) == (302, "/elsewhere")
    assert scripted_api.call_count == 1


@pytest.fixture
def proxy() -> Iterator[ScriptedApi]:
    """A scripted server standing in for an HTTP proxy: it records the absolute-form targets."""
    yield from serve(lambda request: "any", default=json_reply(200, {"via": "proxy"}))


def test_http_goes_through_the_proxy_in_absolute_form_with_its_credentials(proxy: ScriptedApi) -> None:
    address = proxy.base_url.removeprefix("http://")
    transport = new_transport(proxies={"http": f"http://us%40corp:p%3Ass@{address}"})
    answer = transport.request("GET", "http://growthhub.invalid/contacts/c1?x=1", HEADERS)
    assert answer.json() == {"via": "proxy"}
    sent = proxy.last_request
    assert sent.target == "http://growthhub.invalid/contacts/c1?x=1"
    assert sent.headers["Host"] == "growthhub.invalid"
    assert sent.headers["Proxy-Authorization"] == "Basic dXNAY29ycDpwOnNz"  # us@corp:p:ss


def test_the_most_specific_proxy_wins_and_other_schemes_go_direct(
    proxy: ScriptedApi, scripted_api: ScriptedApi
) -> None:
    scripted_api.get("/ping", json_reply(200, {"via": "direct"}))
    host = scripted_api.base_url.removeprefix("http://").split(":")[0]
    transport = new_transport(proxies={"https": "http://127.0.0.1:9", f"http://{host}": proxy.base_url})
    assert get(transport, scripted_api).json() == {"via": "proxy"}
    assert new_transport(proxies={"https": proxy.base_url}).request(
        "GET", f"{scripted_api.base_url}/ping", HEADERS
    ).json() == {"via": "direct"}


def test_a_proxy_other_than_http_is_refused_clearly() -> None:
    transport = new_transport(proxies={"https": "socks5://127.0.0.1:1080"})
    with pytest.raises(GrowthHubConfigError, match="not supported"):
        transport.request("GET", "https://growthhub.invalid/ping", HEADERS)
