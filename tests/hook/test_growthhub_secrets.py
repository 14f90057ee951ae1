"""
No secret reaches a log record, and personal data reaches logs only masked, even at DEBUG.

A real batch against the sandbox walks every path that talks or logs about credentials and
errors: an expired token (401) traded through the OAuth refresh, a 429 storm, injected 500s
(retried) and a 422 whose messages quote an email and a phone. Root, ``urllib3`` and
``requests`` log at DEBUG into caplog; the hook's own logger is swapped for a stdlib one so its
DEBUG lines (Airflow's structlog logger drops them below INFO) are captured as records too.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest

from growthhub_provider.client import FileTokenStore
from growthhub_provider.hooks.growthhub import GrowthHubHook

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from growthhub_sandbox.testing import SandboxAdmin

pytestmark = pytest.mark.integration

EXPIRED_ACCESS = "at-expired-secrets-0001"
SEED_REFRESH = "rt-seed-secrets-0001"
CLIENT_ID = "cid-secrets"
CLIENT_SECRET = "csecret-secrets-0001"
ISSUED_ACCESS = "at-issued-secrets-0001"  # the sandbox's grant for the seed, unknown to the hook

ROWS: list[tuple[str, dict[str, Any]]] = [
    (f"row-{i}", {"email": f"person.{i}@example.com", "phone": f"+1 888 555 01{i:02d}", "firstName": f"P{i}"})
    for i in range(12)
]
# 422: one message quotes an email, the other a phone.
REJECTED_ROW = (
    "row-bad",
    {
        "email": "zoe.park@example.com",
        "phone": "+1 888 555 0199",
        "assignedTo": "boss.person@example.com",
        "customFields": [{"key": "+1 888 555 0142", "field_value": "x"}],
    },
)
PERSONAL = [
    *(row["email"] for _, row in ROWS),
    *(row["phone"] for _, row in ROWS),
    "zoe.park@example.com",
    "boss.person@example.com",
    "+1 888 555 0142",
]


@pytest.fixture
def hook(sandbox: SandboxAdmin, growthhub_conn: Callable[..., None]) -> GrowthHubHook:
    """An OAuth connection whose access token has expired, against a flaky, throttling sandbox."""
    sandbox.put_location(
        "loc1",
        duplicateCheckFields=["email", "phone"],
        users=["user-1"],
        rateLimit={"burst": 1_000_000, "intervalMs": 200, "daily": 1_000_000},
    )
    sandbox.add_token(
        token=ISSUED_ACCESS,
        locationId="loc1",
        scopes=["contacts.write", "contacts.readonly"],
        expiresIn=3600,
        refreshToken=SEED_REFRESH,
        clientId=CLIENT_ID,
        clientSecret=CLIENT_SECRET,
    )
    sandbox.set_faults(seed=7, error_rate=0.2, error_statuses=[500], storm_every_n=6, storm_length=1)
    growthhub_conn(
        host=sandbox.base_url,
        password=EXPIRED_ACCESS,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        refresh_token=SEED_REFRESH,
    )
    hook = GrowthHubHook(max_workers=2, max_attempts=10, backoff_initial_s=0.01, backoff_max_s=0.05)
    hook._log = logging.getLogger("growthhub_provider.hooks.growthhub")
    return hook


def record_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Everything a handler could write for each record: message, raw msg, args, exception text."""
    formatter = logging.Formatter()
    texts = []
    for record in caplog.records:
        exc_text = record.exc_text or (formatter.formatException(record.exc_info) if record.exc_info else "")
        texts.append(f"{record.getMessage()}\n{record.msg!r}\n{record.args!r}\n{exc_text}")
    return texts


def test_batch_logs_carry_no_secret_and_only_masked_personal_data(
    hook: GrowthHubHook,
    sandbox: SandboxAdmin,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    token_file: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "requests", "growthhub_provider"):
        caplog.set_level(logging.DEBUG, logger=name)

    outcomes = {o.key: o for o in hook.upsert_contacts([*ROWS, REJECTED_ROW])}

    # The batch went through every path this test is about.
    assert {k: o.status for k, o in outcomes.items() if o.status != "created"} == {"row-bad": "rejected"}
    stats = sandbox.stats()["requests"]
    assert stats["POST /oauth/token"] == {"200": 1}
    assert {"200", "401", "422", "429", "500"} <= stats["POST /contacts/upsert"].keys()
    new_access = hook.client._access_token
    new_refresh = FileTokenStore(token_file, "growthhub_default").load(SEED_REFRESH).refresh_token
    assert new_access not in (None, EXPIRED_ACCESS)
    assert new_refresh != SEED_REFRESH

    texts = record_texts(caplog)
    logs = "\n".join(texts) + caplog.text + "".join(capsys.readouterr())
    assert any("GET" in t or "POST /contacts/upsert" in t for t in texts), "urllib3 DEBUG was captured"
    assert "Row row-bad rejected (HTTP 422)" in logs, "the hook's DEBUG was captured"
    for secret in (EXPIRED_ACCESS, SEED_REFRESH, CLIENT_SECRET, ISSUED_ACCESS, new_access, new_refresh):
        assert secret is not None
        assert secret not in logs
    for personal in PERSONAL:
        assert personal not in logs
    assert "b***@***.com" in logs
    assert "***42" in logs
