"""Map and normalise: a warehouse row becomes an Upsert Contact payload plus check columns.

Normalisers run in Python (``phonenumbers``, ``email-validator``, ``zoneinfo``, ``pycountry``)
with cached parses; their verdicts land in columns of a DataFrame on which the GX suite of
:mod:`growthhub_sync.checks` asserts, so GX stays the place where checks are declared and
reported. Blank strings count as NULL, and NULL follows the null policy of the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import phonenumbers
from email_validator import EmailNotValidError, validate_email

if TYPE_CHECKING:
    import pandas as pd

    from growthhub_sync.config import SyncConfig

DND_STATUSES = ("active", "inactive", "permanent")
INBOUND_DND_STATUSES = ("active", "inactive")

_DATE_YMD = re.compile(r"^(\d{4})([/\-._])(\d{2})\2(\d{2})$")
_DATE_MDY = re.compile(r"^(\d{2})([/\-._])(\d{2})\2(\d{4})$")
_HOST = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$")
_CACHE = 1 << 14
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_GENDER_ALIASES = {"m": "male", "f": "female"}


def _text(raw: Any) -> str | None:
    if raw is None:
        return None
    value = str(raw).strip()
    return value or None


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


_NANP_DIGITS = re.compile(r"^\+?[0-9 ().-]+$")


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
    if not _NANP_DIGITS.match(raw) or (
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


def _json_value(raw: Any) -> Any:
    """Warehouse value → JSON value: numbers stay numbers, dates become ISO strings."""
    if isinstance(raw, Decimal):
        return int(raw) if raw == raw.to_integral_value() else float(raw)
    if isinstance(raw, datetime | date):
        return raw.isoformat()
    if isinstance(raw, str):
        return raw.strip() or None
    return raw


def _tags(raw: Any, fmt: str, delimiter: str) -> list[str] | None:
    items = (
        raw if isinstance(raw, list | tuple) else (str(raw).split(delimiter) if fmt == "delimited" else [raw])
    )
    tags = list(dict.fromkeys(t for t in (str(x).strip() for x in items if x is not None) if t))
    return tags or None


def _bool(raw: Any) -> bool | None:
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


@dataclass
class MappedBatch:
    """A batch after mapping: payloads, check columns (the GX input) and normaliser verdicts."""

    rows: Sequence[Sequence[Any]]
    keys: list[str]
    updated_at: list[Any]
    payloads: list[dict[str, Any]]
    frame: pd.DataFrame
    reasons: list[dict[str, str]]
    """Per row: check name → the normaliser's reason, for checks it already decided."""
    fields_of_check: dict[str, list[str]] = field(default_factory=dict)
    """Check name → payload keys to drop when the check only warns."""


_TEXT_FIELDS = (
    "firstName",
    "lastName",
    "name",
    "address1",
    "city",
    "state",
    "postalCode",
    "source",
    "companyName",
    "assignedTo",
)


class Mapper:
    """Maps rows (tuples in ``columns`` order) for one config; build once, reuse per batch."""

    def __init__(self, config: SyncConfig, columns: Sequence[str]) -> None:
        self.config = config
        self.idx = {c: i for i, c in enumerate(columns)}
        self.key_i = self.idx[config.source.key_column]
        self.upd_i = self.idx[config.source.updated_at_column]
        self.region = config.quality.default_region
        m = config.mapping
        self.policy = m.null_policy
        self.fields = {
            name: (self.idx[fm.column], fm.on_null or m.null_policy) for name, fm in m.fields.items()
        }
        self._email_i = self.fields["email"][0] if "email" in self.fields else None
        self._phone_i = self.fields["phone"][0] if "phone" in self.fields else None

    def contact(self, row: Sequence[Any]) -> tuple[Any, Any]:
        """The raw ``(email, phone)`` of a full row."""
        return (
            row[self._email_i] if self._email_i is not None else None,
            row[self._phone_i] if self._phone_i is not None else None,
        )

    def identities(self, contacts: Sequence[tuple[Any, Any]]) -> list[list[tuple[str, str]]]:
        """Normalised ``("email", ...)``/``("phone", ...)`` identities per raw ``(email, phone)``."""
        out = []
        for email, phone in contacts:
            ids = []
            if (v := _text(email)) and (n := normalise_email(v)[0]):
                ids.append(("email", n.lower()))
            if (v := _text(phone)) and (n := normalise_phone(v, self.region)[0]):
                ids.append(("phone", n))
            out.append(ids)
        return out

    @staticmethod
    def cheap_ids(email: Any, phone: Any) -> set[tuple[str, str]] | None:
        """Keys that are equal whenever two rows' identities are (``None``: no cheap key exists).

        An ASCII email's normalised form is its lower-cased self; a phone written with digits
        and punctuation only ends with its national number, so its last 4 digits must agree.
        """
        out: set[tuple[str, str]] = set()
        if email is not None:
            v = str(email).strip()
            if not v.isascii():
                return None
            out.add(("email", v.lower()))
        if phone is not None:
            v = str(phone).strip()
            tail = v[-4:]
            if not _NANP_DIGITS.match(v):
                return None
            out.add(("phone", tail if tail.isdigit() else "".join(ch for ch in v if "0" <= ch <= "9")[-4:]))
        return out

    def map(self, rows: Sequence[Sequence[Any]], location_id: str) -> MappedBatch:
        import pandas as pd

        m = self.config.mapping
        today = datetime.now(UTC).date()
        n = len(rows)
        cols: dict[str, list[Any]] = {}
        reasons: list[dict[str, str]] = [{} for _ in range(n)]
        payloads: list[dict[str, Any]] = [{"locationId": location_id} for _ in range(n)]
        nulls: list[list[str]] = [[] for _ in range(n)]  # payload keys to send as null ("clear" policy)

        def column(name: str) -> list[Any]:
            return cols.setdefault(name, [None] * n)

        def put(fname: str, values: list[Any], on_null: str) -> None:
            for i, v in enumerate(values):
                if v is not None:
                    payloads[i][fname] = v
                elif on_null == "clear":
                    nulls[i].append(fname)

        for fname, (ci, on_null) in self.fields.items():
            raw = [_text(r[ci]) if fname != "dnd" and fname != "dateOfBirth" else r[ci] for r in rows]
            if fname in _TEXT_FIELDS:
                put(fname, raw, on_null)
            elif fname == "dnd":
                put(fname, [_bool(v) for v in raw], on_null)
            elif fname in ("email", "phone", "website", "dateOfBirth", "country", "timezone"):
                norm: Callable[[Any], tuple[str | None, str | None]] = {
                    "email": normalise_email,
                    "phone": lambda v: normalise_phone(v, self.region),
                    "website": normalise_website,
                    "dateOfBirth": lambda v: normalise_date_of_birth(v, today),
                    "country": normalise_country,
                    "timezone": normalise_timezone,
                }[fname]
                values, oks = column(fname), column(f"{fname}_ok")
                for i, v in enumerate(raw):
                    if v is None or (isinstance(v, str) and not v.strip()):
                        continue
                    value, err = norm(v)
                    values[i], oks[i] = value, err is None
                    if err:
                        reasons[i][fname] = err
                put(fname, [v if ok else None for v, ok in zip(values, oks, strict=True)], on_null)
                for i, v in enumerate(raw):  # a bad value is never "null": don't clear the CRM for it
                    if v is not None and not oks[i] and fname in nulls[i]:
                        nulls[i].remove(fname)
            elif fname == "gender":  # a small enum: GX itself checks the values
                values = column(fname)
                values[:] = [
                    _GENDER_ALIASES.get(v.lower(), v.lower()) if v is not None else None for v in raw
                ]
                put(fname, values, on_null)

        for cf in m.custom_fields:
            ci = self.idx[cf.column]
            addr = {"key": cf.key} if cf.key else {"id": cf.id}
            on_null = cf.on_null or self.policy
            for i, r in enumerate(rows):
                v = _json_value(r[ci])
                if v is not None or on_null == "clear":
                    payloads[i].setdefault("customFields", []).append({**addr, "field_value": v})

        if m.tags:
            ci = self.idx[m.tags.column]
            on_null = m.tags.on_null or self.policy
            for i, r in enumerate(rows):
                tags = _tags(r[ci], m.tags.format, m.tags.delimiter) if r[ci] is not None else None
                if tags is not None:
                    payloads[i]["tags"] = tags
                elif on_null == "clear":
                    payloads[i]["tags"] = []

        for channel, col in m.dnd_settings.items():
            ci = self.idx[col]
            values = column(f"dnd_{channel}")
            for i, r in enumerate(rows):
                v = _text(r[ci])
                if v is not None:
                    values[i] = v.lower()
                    payloads[i].setdefault("dndSettings", {})[channel] = {"status": v.lower()}
        if m.inbound_dnd:
            ci = self.idx[m.inbound_dnd]
            values = column("dnd_inbound")
            for i, r in enumerate(rows):
                v = _text(r[ci])
                if v is not None:
                    values[i] = v.lower()
                    payloads[i]["inboundDndSettings"] = {"all": {"status": v.lower()}}

        ident = column("identity")
        emails, phones = cols.get("email"), cols.get("phone")
        for i in range(n):
            ident[i] = (emails[i] if emails else None) or (phones[i] if phones else None)
            for fname in nulls[i]:
                payloads[i][fname] = None

        dnd_fields = ["dndSettings", "inboundDndSettings"]
        return MappedBatch(
            rows=rows,
            keys=[str(r[self.key_i]) for r in rows],
            updated_at=[r[self.upd_i] for r in rows],
            payloads=payloads,
            frame=pd.DataFrame(cols, dtype=object),
            reasons=reasons,
            fields_of_check={
                "email": ["email"],
                "phone": ["phone"],
                "website": ["website"],
                "dateOfBirth": ["dateOfBirth"],
                "country": ["country"],
                "timezone": ["timezone"],
                "gender": ["gender"],
                "dnd": dnd_fields,
                "identity": [],
            },
        )
