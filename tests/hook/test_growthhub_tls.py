"""
TLS certificate verification stays on unless the connection explicitly turns it off.

requests_mock sits at the transport adapter, so ``request_history[i].verify`` is exactly the
``verify`` that ``Session.send`` handed the adapter for that request: what urllib3 would use.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest

from growthhub_provider.client import GrowthHubConfigError, tls_verify
from growthhub_provider.hooks.growthhub import GrowthHubHook

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import requests_mock as rm

HOST = "https://growthhub.test"
OK = {"json": {"new": True, "contact": {"id": "c1"}, "traceId": "t1"}}
OAUTH = {"client_id": "cid", "client_secret": "csecret-tls-0001", "refresh_token": "rt-tls-0001"}


@pytest.fixture(autouse=True)
def _no_ca_bundle_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook reads these once when trust_env is on; a developer's shell must not sway the tests."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest.fixture
def ca_bundle(tmp_path: Path) -> Path:
    path = tmp_path / "corp-ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n")
    return path


def sent_verify(requests_mock: rm.Mocker, **extra: Any) -> list[bool | str]:
    """``verify`` of every request one OAuth refresh plus one upsert sent, with these extras."""
    requests_mock.post(f"{HOST}/oauth/token", json={"access_token": "at-tls-0001", "expires_in": 3600})
    requests_mock.post(f"{HOST}/contacts/upsert", **OK)
    GrowthHubHook().upsert_contact({"email": "a@example.com"})
    return [request.verify for request in requests_mock.request_history]


@pytest.mark.parametrize(
    "extra", [{}, {"verify": True}, {"verify": "true"}, {"verify": "True"}, {"verify": "1"}]
)
def test_requests_verify_tls_by_default_and_when_the_extra_says_true(
    growthhub_conn: Callable[..., None], requests_mock: rm.Mocker, extra: dict[str, Any]
) -> None:
    growthhub_conn(host=HOST, password=None, **OAUTH, **extra)
    assert sent_verify(requests_mock) == [True, True], "OAuth refresh and upsert both verify"
    assert GrowthHubHook().get_conn().verify is True


def test_verification_stays_on_when_the_environment_is_not_trusted(
    growthhub_conn: Callable[..., None], requests_mock: rm.Mocker
) -> None:
    growthhub_conn(host=HOST, password=None, trust_env=False, **OAUTH)
    assert sent_verify(requests_mock) == [True, True]


@pytest.mark.parametrize("value", [False, "false", "False", "0", "off", "no"])
def test_only_an_explicit_false_turns_verification_off_and_says_so(
    growthhub_conn: Callable[..., None],
    requests_mock: rm.Mocker,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    value: bool | str,
) -> None:
    caplog.set_level(logging.WARNING)
    growthhub_conn(host=HOST, password=None, verify=value, **OAUTH)
    assert sent_verify(requests_mock) == [False, False]
    assert (
        "TLS certificate verification is off for growthhub_default" in capsys.readouterr().out + caplog.text
    )


def test_a_ca_bundle_path_keeps_verification_on_against_that_bundle(
    growthhub_conn: Callable[..., None], requests_mock: rm.Mocker, ca_bundle: Path
) -> None:
    growthhub_conn(host=HOST, password=None, verify=str(ca_bundle), **OAUTH)
    assert sent_verify(requests_mock) == [str(ca_bundle), str(ca_bundle)]


def test_the_environment_ca_bundle_is_used_when_the_extra_says_nothing(
    growthhub_conn: Callable[..., None],
    requests_mock: rm.Mocker,
    ca_bundle: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_bundle))
    growthhub_conn(host=HOST, password=None, **OAUTH)
    assert sent_verify(requests_mock) == [str(ca_bundle), str(ca_bundle)]


@pytest.mark.parametrize("value", ["flase", "/no/such/ca.pem", "disabled"])
def test_an_unreadable_verify_extra_fails_closed_with_a_clear_error(
    growthhub_conn: Callable[..., None], requests_mock: rm.Mocker, value: str
) -> None:
    growthhub_conn(host=HOST, verify=value)
    with pytest.raises(GrowthHubConfigError, match="neither true/false nor an existing CA bundle path"):
        GrowthHubHook().upsert_contact({"email": "a@example.com"})
    assert requests_mock.call_count == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, True), (True, True), ("yes", True), (" TRUE ", True), (False, False), ("off", False)],
)
def test_tls_verify_reads_booleans_and_their_spellings(value: object, expected: bool) -> None:
    assert tls_verify(value) is expected
