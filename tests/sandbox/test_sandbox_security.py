"""
The sandbox is safe out of the box: it binds loopback unless told otherwise, and its startup
(demo) config demands a valid bearer token like the real API, so it is never an open write endpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import requests

from growthhub_sandbox import cli

if TYPE_CHECKING:
    from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess

pytestmark = pytest.mark.integration

DEMO_LOCATION = "demo-location"
DEMO_TOKEN = "sandbox-demo-token"  # the sandbox's documented fake token
VERSION = "2023-02-21"
WRONG_TOKEN = "pit-wrong-token-0001"
UNAUTHORIZED = {
    "statusCode": 401,
    "message": "Invalid token: access token is invalid",
    "error": "Unauthorized",
}


def upsert(base_url: str, authorization: str | None) -> requests.Response:
    headers = {"Version": VERSION}
    if authorization is not None:
        headers["Authorization"] = authorization
    body = {"locationId": DEMO_LOCATION, "email": "intruder@example.com"}
    return requests.post(f"{base_url}/contacts/upsert", json=body, headers=headers, timeout=10)


def test_cli_binds_loopback_by_default() -> None:
    assert cli.build_parser().parse_args([]).host == "127.0.0.1"


def test_cli_hands_the_default_host_to_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the server really binds, not just the parser's default: ``main`` without ``--host``."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(cli.uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    cli.main([])
    cli.main(["--host", "0.0.0.0"])  # binding everywhere must be asked for
    assert [call["host"] for call in calls] == ["127.0.0.1", "0.0.0.0"]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        f"Bearer {WRONG_TOKEN}",
        "Bearer ",
        "Bearer",
        DEMO_TOKEN,
        f"Basic {DEMO_TOKEN}",
        f"Bearer {DEMO_TOKEN}x",
    ],
    ids=["missing", "wrong", "empty", "scheme-only", "no-scheme", "basic", "near-miss"],
)
def test_upsert_without_a_valid_token_is_401_and_writes_nothing(
    sandbox_server: SandboxProcess, sandbox: SandboxAdmin, authorization: str | None
) -> None:
    response = upsert(sandbox_server.base_url, authorization)
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED
    assert WRONG_TOKEN not in response.text
    assert sandbox.contacts(DEMO_LOCATION) == []


def test_the_demo_token_is_accepted(sandbox_server: SandboxProcess, sandbox: SandboxAdmin) -> None:
    """The control for the 401s above: the same request with the demo token goes through."""
    assert upsert(sandbox_server.base_url, f"Bearer {DEMO_TOKEN}").status_code == 200
    assert len(sandbox.contacts(DEMO_LOCATION)) == 1


@pytest.mark.parametrize("authorization", [None, f"Bearer {WRONG_TOKEN}"], ids=["missing", "wrong"])
def test_reading_a_contact_without_a_valid_token_is_401(
    sandbox_server: SandboxProcess, sandbox: SandboxAdmin, authorization: str | None
) -> None:
    created = upsert(sandbox_server.base_url, f"Bearer {DEMO_TOKEN}").json()["contact"]["id"]
    headers = {"Version": VERSION} | ({"Authorization": authorization} if authorization else {})
    response = requests.get(f"{sandbox_server.base_url}/contacts/{created}", headers=headers, timeout=10)
    assert response.status_code == 401
    assert "intruder" not in response.text
