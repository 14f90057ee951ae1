"""Reason codes: why a row sits in quarantine, as stable names beside the human text.

Summaries, alerts, replay filters, metrics and the UI count these codes; a row's ``errors`` keep
the human text (with the offending value, or GrowthHub's own messages). A quarantine row stores
its codes comma-separated, the most telling first (``email_invalid,dob_invalid``). The quality
checks of :mod:`growthhub_sync.fields` each name their code there; this is the list of them all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement

NO_IDENTITY = "no_identity"
DND_INVALID = "dnd_invalid"
DUPLICATE_IDENTITY = "duplicate_identity"
LOCATION_NOT_INSTALLED = "location_not_installed"
LOCATION_UNKNOWN = "location_unknown"
LOCATION_MISSING = "location_missing"

REASONS: dict[str, str] = {
    NO_IDENTITY: "neither an email nor a phone given",
    "email_invalid": "email invalid",
    "phone_invalid": "phone invalid",
    "dob_invalid": "date of birth invalid or in the future",
    "country_invalid": "country not an ISO 3166-1 alpha-2 code",
    "timezone_invalid": "time zone not an IANA name",
    "website_invalid": "website not an http(s) URL",
    "gender_invalid": "gender not one of quality.genders",
    DND_INVALID: "dnd status not one GrowthHub accepts",
    DUPLICATE_IDENTITY: "email or phone taken by a newer row",
    LOCATION_NOT_INSTALLED: "the row's location is not installed for the agency",
    LOCATION_UNKNOWN: "the row's location id is none of the agency's locations",
    LOCATION_MISSING: "the row names no location (NULL or blank)",
    "api_400": "GrowthHub refused the request (400)",
    "api_422": "GrowthHub refused a field (422)",
}
"""Code → short description. Any other rejection status ``s`` is ``api_<s>``."""

_API_CODE = re.compile(r"^api_(\d{3})$")
_MAX_LENGTH = 255  # the quarantine table's reason_codes column


def api_code(http_status: int) -> str:
    """The code of a row GrowthHub rejected with ``http_status``."""
    return f"api_{http_status}"


def is_code(name: str) -> bool:
    """A known code, or ``api_<status>``."""
    return name in REASONS or bool(_API_CODE.match(name))


def describe(code: str) -> str:
    """``code: description``, or the code alone if it has none."""
    if code in REASONS:
        return f"{code}: {REASONS[code]}"
    if match := _API_CODE.match(code):
        return f"{code}: GrowthHub refused the row ({match.group(1)})"
    return code


def join_codes(codes: Iterable[str]) -> str:
    """The column value of a row's codes: each once, in order, cut to whole codes that fit."""
    out: list[str] = []
    for code in codes:
        if code not in out and len(",".join([*out, code])) <= _MAX_LENGTH:
            out.append(code)
    return ",".join(out)


def split_codes(value: str | None) -> list[str]:
    """A row's codes from the column value."""
    return [c for c in (value or "").split(",") if c]


def having_any(column: ColumnElement[str | None], codes: Iterable[str]) -> ColumnElement[bool]:
    """SQL: the codes in ``column`` (a ``reason_codes`` column) include one of ``codes``."""
    from sqlalchemy import literal, or_

    listed = literal(",") + column + literal(",")
    return or_(*(listed.contains(f",{code},", autoescape=True) for code in codes))
