"""Validate and normalise an upsert body the way the real (NestJS) API does: one message per field.

Hand-written rather than a pydantic model because the messages must read like class-validator's
("property foo should not exist", "email must be an email") and because this runs on every
request of the benchmark: the checks are dictionary look-ups plus cached parsers.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import phonenumbers
import pycountry
from email_validator import EmailNotValidError, validate_email

if TYPE_CHECKING:
    from collections.abc import Callable

    from growthhub_sandbox.store import Location

STRING_FIELDS = (
    "firstName",
    "lastName",
    "name",
    "gender",
    "address1",
    "city",
    "state",
    "postalCode",
    "website",
    "source",
    "companyName",
)
KNOWN_FIELDS = frozenset(
    (
        *STRING_FIELDS,
        "locationId",
        "email",
        "phone",
        "timezone",
        "dnd",
        "dndSettings",
        "inboundDndSettings",
        "tags",
        "customFields",
        "dateOfBirth",
        "country",
        "assignedTo",
        "createNewIfDuplicateAllowed",
    )
)
DND_CHANNELS = ("Call", "Email", "SMS", "WhatsApp", "GMB", "FB")
DND_STATUSES = ("active", "inactive", "permanent")
INBOUND_DND_STATUSES = ("active", "inactive")
DOB_FORMATS = "YYYY/MM/DD, MM/DD/YYYY, YYYY-MM-DD, MM-DD-YYYY, YYYY.MM.DD, MM.DD.YYYY, YYYY_MM_DD, MM_DD_YYYY"

_DOB_YEAR_FIRST = re.compile(r"(\d{4})([/\-._])(\d{2})\2(\d{2})")
_DOB_YEAR_LAST = re.compile(r"(\d{2})([/\-._])(\d{2})\2(\d{4})")
_TIMEZONES = {name.lower(): name for name in zoneinfo.available_timezones()}
_COUNTRIES = frozenset(c.alpha_2 for c in pycountry.countries)
_TEXT_TYPES = frozenset(("TEXT", "LARGE_TEXT", "SINGLE_OPTIONS", "RADIO", "DATE"))
_NUMBER_TYPES = frozenset(("NUMERICAL", "MONETORY"))
_LIST_TYPES = frozenset(("MULTIPLE_OPTIONS", "CHECKBOX"))


@lru_cache(maxsize=65_536)
def _email_ok(email: str) -> bool:
    try:
        # test_environment: accept RFC 2606 ``.test`` domains, as the real API (class-validator) does
        validate_email(email, check_deliverability=False, test_environment=True)
    except EmailNotValidError:
        return False
    return True


@lru_cache(maxsize=65_536)
def normalise_phone(phone: str, region: str) -> str | None:
    """E.164 form of a valid number, else None; ``region`` applies to numbers without ``+``."""
    try:
        parsed = phonenumbers.parse(phone, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


@lru_cache(maxsize=4_096)
def normalise_date_of_birth(value: str) -> str | None:
    """``YYYY-MM-DD`` for one of the 8 documented formats and a real calendar date, else None."""
    if m := _DOB_YEAR_FIRST.fullmatch(value):
        year, month, day = m.group(1), m.group(3), m.group(4)
    elif m := _DOB_YEAR_LAST.fullmatch(value):
        month, day, year = m.group(1), m.group(3), m.group(4)
    else:
        return None
    try:
        return dt.date(int(year), int(month), int(day)).isoformat()
    except ValueError:
        return None


def _is_str_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _check_object(value: Any, path: str, allowed: tuple[str, ...], errors: list[str]) -> bool:
    if not isinstance(value, dict):
        errors.append(f"{path} must be an object")
        return False
    errors.extend(f"{path}.property {k} should not exist" for k in value if k not in allowed)
    return True


def _dnd_channel(
    value: Any, path: str, statuses: tuple[str, ...], keys: tuple[str, ...], errors: list[str]
) -> dict[str, Any] | None:
    if not _check_object(value, path, keys, errors):
        return None
    if value.get("status") not in statuses:
        errors.append(f"{path}.status must be one of the following values: {', '.join(statuses)}")
    for key in keys[1:]:
        if not _is_str_or_none(value.get(key)):
            errors.append(f"{path}.{key} must be a string")
    return {k: value[k] for k in keys if k in value}


def _custom_value_error(field: Any, value: Any) -> str | None:
    data_type = field.data_type
    if data_type in _TEXT_TYPES:
        ok = isinstance(value, str)
        expected = "a string"
    elif data_type in _NUMBER_TYPES:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        expected = "a number"
    elif data_type in _LIST_TYPES:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        expected = "an array of strings"
    else:
        ok = isinstance(value, dict)
        expected = "an object"
    if not ok:
        return f"must be {expected} for a {data_type} field"
    if field.options is not None:
        chosen = value if isinstance(value, list) else [value]
        if any(v not in field.options for v in chosen):
            return f"must be one of the options of field {field.key}"
    return None


def _custom_fields(value: Any, location: Location, errors: list[str]) -> dict[str, Any] | None:
    if not isinstance(value, list):
        errors.append("customFields must be an array")
        return None
    out: dict[str, Any] = {}
    for i, item in enumerate(value):
        path = f"customFields.{i}"
        if not _check_object(item, path, ("id", "key", "field_value"), errors):
            continue
        ref = item.get("id") or item.get("key")
        field = location.custom_fields.get(item["id"]) if item.get("id") else None
        if field is None and item.get("key"):
            field = location.custom_fields_by_key.get(item["key"])
        if field is None:
            errors.append(f"{path} must name a custom field of the location (unknown: {ref})")
            continue
        if "field_value" not in item:
            errors.append(f"{path}.field_value should not be empty")
            continue
        fv = item["field_value"]
        if fv is not None and (problem := _custom_value_error(field, fv)):
            errors.append(f"{path}.field_value {problem}")
            continue
        out[field.id] = fv
    return out


def validate_upsert(body: dict[str, Any], location: Location) -> tuple[dict[str, Any], list[str]]:
    """Return ``(normalised fields that were sent, error messages)``.

    ``location`` is the token's (a different ``locationId`` was refused with 403 before), so
    custom fields, users and the default phone region are checked against it even when the
    body's ``locationId`` is missing. Fields are checked in the API's order: its messages come
    in that order.
    """
    errors = [f"property {k} should not exist" for k in body if k not in KNOWN_FIELDS]
    out: dict[str, Any] = {}
    location_id = body.get("locationId")
    if location_id is None or location_id == "":
        errors.append("locationId should not be empty")
    elif not isinstance(location_id, str):
        errors.append("locationId must be a string")
    _check_strings(body, out, errors)
    _check_contact_details(body, location.country, out, errors)
    _check_flags_and_dnd(body, out, errors)
    _check_tags(body, out, errors)
    if body.get("customFields") is not None:
        custom = _custom_fields(body["customFields"], location, errors)
        if custom is not None:
            out["customFields"] = custom
    _check_assigned_to(body, location, out, errors)
    return out, errors


def _check_strings(body: dict[str, Any], out: dict[str, Any], errors: list[str]) -> None:
    for key in STRING_FIELDS:
        if key in body:
            value = body[key]
            if value is None:
                out[key] = None
            elif isinstance(value, str):
                out[key] = value.strip() or None
            else:
                errors.append(f"{key} must be a string")


def _check_clearable(
    body: dict[str, Any],
    key: str,
    normalise: Callable[[Any], Any],
    message: str,
    out: dict[str, Any],
    errors: list[str],
) -> None:
    """A field that ``None`` or ``""`` clears; else ``normalise`` gives its value or ``None`` (invalid)."""
    if key not in body:
        return
    value = body[key]
    if value is None or value == "":
        out[key] = None
    elif (normalised := normalise(value)) is not None:
        out[key] = normalised
    else:
        errors.append(message)


def _country(value: Any) -> str | None:
    return value.upper() if isinstance(value, str) and value.upper() in _COUNTRIES else None


def _email(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and _email_ok(value.strip()) else None


def _timezone(value: Any) -> str | None:
    return _TIMEZONES.get(value.lower()) if isinstance(value, str) else None


def _date_of_birth(value: Any) -> str | None:
    return normalise_date_of_birth(value.strip()) if isinstance(value, str) else None


def _check_contact_details(
    body: dict[str, Any], default_region: str, out: dict[str, Any], errors: list[str]
) -> None:
    """Country, email, phone, time zone and date of birth; the phone's region is the body's country."""
    _check_clearable(body, "country", _country, "country must be a valid ISO31661 Alpha2 code", out, errors)
    _check_clearable(body, "email", _email, "email must be an email", out, errors)
    region = out.get("country") or default_region

    def phone(value: Any) -> str | None:
        return normalise_phone(value, region) if isinstance(value, str) else None

    _check_clearable(body, "phone", phone, "phone must be a valid phone number", out, errors)
    _check_clearable(body, "timezone", _timezone, "timezone must be a valid IANA time zone", out, errors)
    dob_message = f"dateOfBirth must be a valid date in one of the formats {DOB_FORMATS}"
    _check_clearable(body, "dateOfBirth", _date_of_birth, dob_message, out, errors)


def _check_flags_and_dnd(body: dict[str, Any], out: dict[str, Any], errors: list[str]) -> None:
    for key in ("dnd", "createNewIfDuplicateAllowed"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            errors.append(f"{key} must be a boolean value")
    if isinstance(body.get("dnd"), bool):
        out["dnd"] = body["dnd"]

    if body.get("dndSettings") is not None:
        settings = body["dndSettings"]
        if _check_object(settings, "dndSettings", DND_CHANNELS, errors):
            out["dndSettings"] = {
                ch: _dnd_channel(v, f"dndSettings.{ch}", DND_STATUSES, ("status", "message", "code"), errors)
                for ch, v in settings.items()
                if ch in DND_CHANNELS
            }

    if body.get("inboundDndSettings") is not None:
        inbound = body["inboundDndSettings"]
        if _check_object(inbound, "inboundDndSettings", ("all",), errors) and "all" in inbound:
            out["inboundDndSettings"] = {
                "all": _dnd_channel(
                    inbound["all"],
                    "inboundDndSettings.all",
                    INBOUND_DND_STATUSES,
                    ("status", "message"),
                    errors,
                )
            }


def _check_tags(body: dict[str, Any], out: dict[str, Any], errors: list[str]) -> None:
    if "tags" not in body:
        return
    tags = body["tags"]
    if tags is None:
        out["tags"] = []
    elif not isinstance(tags, list):
        errors.append("tags must be an array")
    elif not all(isinstance(t, str) for t in tags):
        errors.append("each value in tags must be a string")
    else:
        # The real CRM stores tags lower-case and once each.
        out["tags"] = list(dict.fromkeys(t.strip().lower() for t in tags if t.strip()))


def _check_assigned_to(
    body: dict[str, Any], location: Location, out: dict[str, Any], errors: list[str]
) -> None:
    if "assignedTo" not in body:
        return
    user = body["assignedTo"]
    if user is None or user == "":
        out["assignedTo"] = None
    elif not isinstance(user, str):
        errors.append("assignedTo must be a string")
    elif user not in location.users:
        errors.append(f"assignedTo must be a user of the location (unknown: {user})")
    else:
        out["assignedTo"] = user
