"""Normalisers and readers: one warehouse value in, one Upsert Contact value (or a reason) out.

Rules come from the libraries that know them (``phonenumbers``, ``email-validator``,
``zoneinfo``, ``pycountry``); parses are cached, since a warehouse repeats its domains, phones
and zones. A normaliser returns ``(value, None)`` or ``(None, reason)``; the reason starts with
the field's payload key and ends up in the quarantine. Which field uses which normaliser is
declared in :mod:`growthhub_sync.fields`.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import phonenumbers
from email_validator import EmailNotValidError, validate_email

NANP_DIGITS = re.compile(r"^\+?[0-9 ().-]+$")
"""A phone written with digits and punctuation only (no letters, no extension)."""

_DATE_YMD = re.compile(r"^(\d{4})([/\-._])(\d{2})\2(\d{2})$")
_DATE_MDY = re.compile(r"^(\d{2})([/\-._])(\d{2})\2(\d{4})$")
_HOST = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$")
_CACHE = 1 << 14
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_GENDER_ALIASES = {"m": "male", "f": "female"}


def read_text(raw: Any) -> str | None:
    """Stripped text; blank counts as NULL."""
    if raw is None:
        return None
    value = str(raw).strip()
    return value or None


def read_bool(raw: Any) -> bool | None:
    """A boolean from a boolean, a number or yes/no-like text; anything else is NULL."""
    if raw is None or isinstance(raw, bool):
        return raw
    if isinstance(raw, int | float | Decimal):
        return bool(raw)
    value = str(raw).strip().lower()
    if value in ("true", "t", "yes", "y", "1"):
        return True
    if value in ("false", "f", "no", "n", "0"):
        return False
    return None


def json_value(raw: Any) -> Any:
    """Warehouse value → JSON value: numbers stay numbers, dates become ISO strings."""
    if isinstance(raw, Decimal):
        return int(raw) if raw == raw.to_integral_value() else float(raw)
    if isinstance(raw, datetime | date):
        return raw.isoformat()
    if isinstance(raw, str):
        return raw.strip() or None
    return raw


def split_tags(raw: Any, fmt: str, delimiter: str) -> list[str] | None:
    """Distinct non-blank tags, in order, from an array or a delimited text; none at all is NULL."""
    items = (
        raw if isinstance(raw, list | tuple) else (str(raw).split(delimiter) if fmt == "delimited" else [raw])
    )
    tags = list(dict.fromkeys(t for t in (str(x).strip() for x in items if x is not None) if t))
    return tags or None


@lru_cache(maxsize=_CACHE)
def _validate_email(raw: str) -> tuple[str | None, str | None]:
    try:
        return validate_email(raw, check_deliverability=False).normalized, None
    except EmailNotValidError as exc:
        return None, f"email: {exc}"


@lru_cache(maxsize=4096)
def _email_domain(domain: str) -> str | None:
    ok, _ = _validate_email(f"a@{domain}")
    return ok.rpartition("@")[2] if ok else None


def normalise_email(raw: str) -> tuple[str | None, str | None]:
    """``(normalised, None)`` or ``(None, reason)``, as ``email-validator`` judges (no DNS lookups).

    A plain ASCII dot-atom local part is always valid to email-validator, so only its domain
    needs judging, once per domain: that keeps a million distinct addresses cheap.
    """
    local, at, domain = raw.rpartition("@")
    if at and len(local) <= 64 and len(raw) <= 254 and _DOT_ATOM.match(local):
        normal_domain = _email_domain(domain)
        if normal_domain is not None:
            return f"{local}@{normal_domain}", None
    return _validate_email(raw)


@lru_cache(maxsize=_CACHE)
def normalise_phone(raw: str, region: str) -> tuple[str | None, str | None]:
    """``(E.164, None)`` or ``(None, reason)``; national numbers are read in ``region``."""
    number = _nanp(raw, region)
    if number is None:
        try:
            number = phonenumbers.parse(raw, region)
        except phonenumbers.NumberParseException as exc:
            return None, f"phone: not a phone number ({exc._msg})"
    if not phonenumbers.is_valid_number(number):
        return None, f"phone: not a valid number (default region {region})"
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), None


def _nanp(raw: str, region: str) -> phonenumbers.PhoneNumber | None:
    """The number ``phonenumbers.parse`` would return, built directly for plain NANP digits.

    Only ``[+]1`` + 10 digits with punctuation, or 10 digits in a +1 region; anything else
    (letters, extensions, other plans) goes through the full parser.
    """
    if not NANP_DIGITS.match(raw) or (
        phonenumbers.country_code_for_region(region) != 1 and not raw.startswith("+")
    ):
        return None
    digits = "".join(ch for ch in raw if "0" <= ch <= "9")
    plus = raw.startswith("+")
    if len(digits) == 11 and digits[0] == "1" and (plus or phonenumbers.country_code_for_region(region) == 1):
        digits = digits[1:]
    elif len(digits) != 10 or plus:
        return None
    if digits[0] in "01":
        return None
    return phonenumbers.PhoneNumber(country_code=1, national_number=int(digits))


@lru_cache(maxsize=_CACHE)
def _parse_date(raw: str) -> tuple[date | None, str | None]:
    m = _DATE_YMD.match(raw)
    if m:
        y, mo, d = m.group(1), m.group(3), m.group(4)
    else:
        m = _DATE_MDY.match(raw)
        if not m:
            return None, "dateOfBirth: not one of the accepted formats (YYYY-MM-DD, MM/DD/YYYY, ...)"
        mo, d, y = m.group(1), m.group(3), m.group(4)
    try:
        return date(int(y), int(mo), int(d)), None
    except ValueError:
        return None, "dateOfBirth: not a calendar date"


def normalise_date_of_birth(raw: Any, today: date) -> tuple[str | None, str | None]:
    """YYYY-MM-DD from any of the reference's 8 formats; other or ambiguous formats are rejected."""
    if isinstance(raw, datetime):
        raw = raw.date()
    if isinstance(raw, date):
        value, err = raw, None
    else:
        value, err = _parse_date(str(raw).strip())
    if value is None:
        return None, err
    if value > today:
        return None, "dateOfBirth: in the future"
    if value.year < 1900:
        return None, "dateOfBirth: before 1900"
    return value.isoformat(), None


@lru_cache(maxsize=_CACHE)
def normalise_website(raw: str) -> tuple[str | None, str | None]:
    """An http(s) URL with a real host name; a bare host gets ``https://``."""
    value = raw if "://" in raw else f"https://{raw}"
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
    except ValueError:
        return None, "website: not a URL"
    if parts.scheme not in ("http", "https") or not _HOST.match(host) or " " in value:
        return None, "website: not an http(s) URL with a host name"
    return value, None


@lru_cache(maxsize=1)
def _countries() -> frozenset[str]:
    import pycountry

    return frozenset(c.alpha_2 for c in pycountry.countries)


def normalise_country(raw: str) -> tuple[str | None, str | None]:
    """ISO 3166-1 alpha-2, upper case (pycountry's list)."""
    value = raw.upper()
    if value in _countries():
        return value, None
    return None, f"country: {raw!r} is not an ISO 3166-1 alpha-2 code"


def normalise_timezone(raw: str) -> tuple[str | None, str | None]:
    """An IANA zone in its canonical spelling (zoneinfo's list; case-insensitive)."""
    value = _timezones().get(raw.lower())
    return (value, None) if value else (None, f"timezone: {raw!r} is not an IANA time zone")


@lru_cache(maxsize=1)
def _timezones() -> dict[str, str]:
    from zoneinfo import available_timezones

    return {tz.lower(): tz for tz in available_timezones()}


def canonical_gender(raw: str) -> str:
    """Lower case, ``m``/``f`` spelt out; whether the result is allowed is the GX suite's call."""
    value = raw.lower()
    return _GENDER_ALIASES.get(value, value)
