"""
Reading GrowthHub's answers: capped bodies, JSON checks, the API's error messages and what kind of
error a status is.

Bodies come from a server we do not control (or from a proxy in front of it), so nothing here
trusts their size, encoding or shape, and nothing quotes more than a short, one-line excerpt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from growthhub_provider.client.errors import (
    GrowthHubAuthError,
    GrowthHubBadResponse,
    GrowthHubConfigError,
    GrowthHubDailyQuotaSpent,
    GrowthHubNotFound,
    GrowthHubRejected,
    GrowthHubTransientError,
)
from growthhub_provider.client.limiter import int_header

# Re-exported: callers read the cap here, with the other limits on what a body may do.
from growthhub_provider.client.transport import MAX_RESPONSE_BYTES as MAX_RESPONSE_BYTES

if TYPE_CHECKING:
    from collections.abc import Callable

    from growthhub_provider.client.transport import Answer

# Bodies and API messages quoted in errors, outcomes and logs are cut to this many characters.
MAX_MESSAGE_CHARS = 500
MAX_MESSAGES = 20

_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s\"'<>,;]+")


def identity_keys(payload: dict[str, Any]) -> frozenset[str]:
    """
    The identities the CRM matches duplicates on: normalised email and phone digits.

    Two rows sharing any of these must not be in flight together, or the CRM can race into
    creating the same person twice.
    """
    keys = set()
    if email := str(payload.get("email") or "").strip().lower():
        keys.add(f"email:{email}")
    if phone := re.sub(r"\D", "", str(payload.get("phone") or "")):
        keys.add(f"phone:{phone}")
    return frozenset(keys)


def short(text: str) -> str:
    """One printable line of at most MAX_MESSAGE_CHARS, with bearer tokens out."""
    line = "".join(c if c.isprintable() else " " for c in " ".join(text[: 4 * MAX_MESSAGE_CHARS].split()))
    line = _BEARER_RE.sub(r"\1***", line)
    return line if len(line) <= MAX_MESSAGE_CHARS else f"{line[: MAX_MESSAGE_CHARS - 3]}..."


def excerpt(response: Answer) -> str:
    """The start of a body for an error message, decoded leniently (never the whole body)."""
    head = response.content[: 4 * MAX_MESSAGE_CHARS]
    try:
        text = head.decode(response.encoding or "utf-8", errors="replace")
    except LookupError:
        text = head.decode("utf-8", errors="replace")
    return short(text)


def body_kind(response: Answer) -> str:
    return f"{response.headers.get('Content-Type') or 'no Content-Type'}, {len(response.content)} bytes"


def _json(response: Answer) -> Any:
    """The body as JSON; ``ValueError`` when it is not (``RecursionError`` too: absurdly deep JSON)."""
    try:
        return response.json()
    except RecursionError as e:
        raise ValueError("JSON nested too deeply") from e


def api_messages(response: Answer) -> list[str]:
    """The messages of an error answer: the API's list, else the reason and the body's start."""
    fallback = response.reason or f"HTTP {response.status_code}"
    try:
        body = _json(response)
    except ValueError:
        start = excerpt(response)
        return [short(f"{fallback}: {start}") if start else fallback]
    # API errors carry "message"; OAuth errors (RFC 6749) carry "error" and "error_description".
    message = (
        body.get("message") or body.get("error_description") or body.get("error")
        if isinstance(body, dict)
        else None
    )
    if isinstance(message, list):
        messages = [short(str(m)) for m in message[:MAX_MESSAGES]]
        if len(message) > MAX_MESSAGES:
            messages.append(f"... and {len(message) - MAX_MESSAGES} more")
        return messages
    if message:
        return [short(str(message))]
    return [fallback]


def raise_for_status(response: Answer, scrub: Callable[[str], str]) -> None:
    """
    Raise the error class of an error answer (each maps to one outcome); an answer under 400 passes.

    :param scrub: takes the client's secrets out of the messages: bodies may echo what was sent.
    """
    status = response.status_code
    if status < 400:
        return
    messages = [scrub(m) for m in api_messages(response)]
    joined = short("; ".join(messages))
    if status in (401, 403):
        raise GrowthHubAuthError(f"{status}: {joined}")
    if status == 400 and any("version" in m.lower() for m in messages):
        raise GrowthHubConfigError(f"400: {joined} (check the connection's api_version)")
    if status == 404:
        raise GrowthHubNotFound(f"404: {joined}")
    if status == 429 and int_header(response.headers, "X-RateLimit-Daily-Remaining") == 0:
        raise GrowthHubDailyQuotaSpent(status, joined)
    if status == 429 or status >= 500:
        raise GrowthHubTransientError(status, joined)
    raise GrowthHubRejected(status, messages)


def json_object(response: Answer) -> dict[str, Any]:
    """The body of a 2xx answer as a JSON object, else :class:`GrowthHubBadResponse`."""
    status = response.status_code
    if not response.content:
        raise GrowthHubBadResponse(status, f"empty body ({body_kind(response)})")
    try:
        data = _json(response)
    except ValueError:
        raise GrowthHubBadResponse(
            status, f"body is not JSON ({body_kind(response)}): {excerpt(response)}"
        ) from None
    if not isinstance(data, dict):
        raise GrowthHubBadResponse(status, f"body is a JSON {type(data).__name__}, not an object")
    return data


def contact_in(data: dict[str, Any], status: int) -> dict[str, Any]:
    """``data["contact"]`` with a non-empty string ``id``; errors name keys only (values are PII)."""
    contact = data.get("contact")
    if not isinstance(contact, dict) or not isinstance(contact.get("id"), str) or not contact["id"]:
        keys = sorted(contact) if isinstance(contact, dict) else sorted(data)
        where = "contact" if isinstance(contact, dict) else "body"
        detail = f"no contact.id in the JSON ({where} keys: {', '.join(keys)})"
        raise GrowthHubBadResponse(status, short(detail))
    return contact


@dataclass(frozen=True)
class UpsertResult:
    """What one successful upsert returned."""

    contact_id: str
    new: bool
    trace_id: str | None


def upsert_result(response: Answer) -> UpsertResult:
    """The contact id, whether it is new and the trace id of a 2xx upsert answer."""
    data = json_object(response)
    trace_id = data.get("traceId")
    return UpsertResult(
        contact_id=contact_in(data, response.status_code)["id"],
        new=bool(data.get("new")),
        trace_id=trace_id if isinstance(trace_id, str) else None,
    )
