"""
TLS certificate verification stays on unless the connection explicitly turns it off.

The API is a scripted HTTPS server on 127.0.0.1 with a self-signed certificate: it is trusted only
through a CA bundle that holds it, or with verification off. The OAuth refresh and the upsert go
over the same transport, so each test sees both verify alike.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from typing import TYPE_CHECKING, Any

import certifi
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from scripted_http import ScriptedApi, json_reply, serve

from growthhub_provider.client import GrowthHubConfigError, GrowthHubConnectionError, tls_verify
from growthhub_provider.hooks.growthhub import GrowthHubHook

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

OAUTH = {"client_id": "cid", "client_secret": "csecret-tls-0001", "refresh_token": "rt-tls-0001"}


@pytest.fixture(autouse=True)
def _no_ca_bundle_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook reads these once when trust_env is on; a developer's shell must not sway the tests."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "growthhub-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "corp-ca.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@pytest.fixture
def ca_bundle(certificate: tuple[Path, Path]) -> Path:
    return certificate[0]


@pytest.fixture
def https_api(certificate: tuple[Path, Path]) -> Iterator[ScriptedApi]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    for server in serve(tls=context):
        server.post("/oauth/token", json_reply(200, {"access_token": "at-tls-0001", "expires_in": 3600}))
        server.post("/contacts/upsert", json_reply(200, {"new": True, "contact": {"id": "c1"}}))
        yield server


@pytest.fixture
def tls_conn(growthhub_conn: Callable[..., None], https_api: ScriptedApi) -> Callable[..., None]:
    """An OAuth connection to the HTTPS API with these extras."""

    def define(**extra: Any) -> None:
        growthhub_conn(host=https_api.base_url, password=None, **OAUTH, **extra)

    return define


def upsert_gets_through(https_api: ScriptedApi) -> bool:
    """Whether one upsert (after its OAuth refresh) got through TLS; both went out if it did."""
    try:
        GrowthHubHook(max_attempts=1).upsert_contact({"email": "a@example.com"})
    except GrowthHubConnectionError as e:
        refused = str(e)
    else:
        assert [r.path for r in https_api.requests] == ["/oauth/token", "/contacts/upsert"]
        return True
    assert "CERTIFICATE_VERIFY_FAILED" in refused
    assert https_api.call_count == 0, "the refresh already refused the certificate"
    return False


@pytest.mark.parametrize(
    "extra", [{}, {"verify": True}, {"verify": "true"}, {"verify": "True"}, {"verify": "1"}]
)
def test_requests_verify_tls_by_default_and_when_the_extra_says_true(
    tls_conn: Callable[..., None], https_api: ScriptedApi, extra: dict[str, Any]
) -> None:
    tls_conn(**extra)
    assert not upsert_gets_through(https_api), "a certificate no known CA signed is refused"
    assert GrowthHubHook().get_conn().verify is True


def test_verification_stays_on_when_the_environment_is_not_trusted(
    tls_conn: Callable[..., None], https_api: ScriptedApi, ca_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_bundle))
    tls_conn(trust_env=False)
    assert not upsert_gets_through(https_api), "the bundle of an untrusted environment is not used"


@pytest.mark.parametrize("value", [False, "false", "False", "0", "off", "no"])
def test_only_an_explicit_false_turns_verification_off_and_says_so(
    tls_conn: Callable[..., None],
    https_api: ScriptedApi,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    value: bool | str,
) -> None:
    caplog.set_level(logging.WARNING)
    tls_conn(verify=value)
    assert upsert_gets_through(https_api)
    assert (
        "TLS certificate verification is off for growthhub_default" in capsys.readouterr().out + caplog.text
    )


def test_a_ca_bundle_path_keeps_verification_on_against_that_bundle(
    tls_conn: Callable[..., None], https_api: ScriptedApi, ca_bundle: Path
) -> None:
    tls_conn(verify=str(ca_bundle))
    assert upsert_gets_through(https_api)


def test_a_ca_bundle_of_other_authorities_refuses_the_certificate(
    tls_conn: Callable[..., None], https_api: ScriptedApi
) -> None:
    tls_conn(verify=certifi.where())
    assert not upsert_gets_through(https_api)


def test_the_environment_ca_bundle_is_used_when_the_extra_says_nothing(
    tls_conn: Callable[..., None], https_api: ScriptedApi, ca_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_bundle))
    tls_conn()
    assert upsert_gets_through(https_api)


@pytest.mark.parametrize("value", ["flase", "/no/such/ca.pem", "disabled"])
def test_an_unreadable_verify_extra_fails_closed_with_a_clear_error(
    tls_conn: Callable[..., None], https_api: ScriptedApi, value: str
) -> None:
    tls_conn(verify=value)
    with pytest.raises(GrowthHubConfigError, match="neither true/false nor an existing CA bundle path"):
        GrowthHubHook().upsert_contact({"email": "a@example.com"})
    assert https_api.call_count == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, True), (True, True), ("yes", True), (" TRUE ", True), (False, False), ("off", False)],
)
def test_tls_verify_reads_booleans_and_their_spellings(value: object, expected: bool) -> None:
    assert tls_verify(value) is expected
