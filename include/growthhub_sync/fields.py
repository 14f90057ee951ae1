"""The field registry: each standard field of GrowthHub's Upsert Contact, declared once.

The config's ``mapping.fields`` model, the mapper's loop over a batch, the GX suite, the names
``quality.errors`` accepts and the reason codes of failed checks are all read from :data:`FIELDS`.
Adding a field is adding its :class:`FieldSpec` here (with a normaliser in
:mod:`growthhub_sync.normalise` if it has rules, and its code in :mod:`growthhub_sync.reasons`).
The dnd settings are not standard fields (they are objects keyed by channel); their channels and
statuses live here too, beside the fields they sit with in a payload.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal

from growthhub_sync.normalise import (
    canonical_gender,
    normalise_country,
    normalise_date_of_birth,
    normalise_email,
    normalise_phone,
    normalise_timezone,
    normalise_website,
)
from growthhub_sync.reasons import DND_INVALID, NO_IDENTITY

Verdict = tuple[str | None, str | None]
"""``(value, None)`` or ``(None, reason)``."""

DND_CHANNELS = ("Call", "Email", "SMS", "WhatsApp", "GMB", "FB")
DND_STATUSES = ("active", "inactive", "permanent")
INBOUND_DND_STATUSES = ("active", "inactive")


@dataclass(frozen=True)
class FieldSpec:
    """One standard field: how its value is read, normalised and checked."""

    key: str
    """Payload key, and the key under ``mapping.fields`` in the config."""
    read: Literal["text", "bool", "date"] = "text"
    """``text``: stripped, blank is NULL; ``bool``: yes/no-like values; ``date``: as the warehouse
    gives it (a date column, or text for the normaliser to parse)."""
    normalise: Callable[..., Verdict] | None = None
    """Decides validity: the verdict lands in a ``<key>_ok`` column that the GX suite asserts."""
    normalise_with: Literal["region", "today"] | None = None
    """Second argument of ``normalise``: ``quality.default_region``, or the day the batch is mapped."""
    canonical: Callable[[str], str] | None = None
    """A spelling fix only; ``choices`` then says which values GX accepts."""
    choices: str | None = None
    """The ``quality`` config list of the values GX accepts (e.g. ``genders``)."""
    check: str | None = None
    """The quality check (a name ``quality.errors`` accepts) a bad value fails."""
    code: str | None = None
    """The reason code (:mod:`growthhub_sync.reasons`) of a row that fails ``check``."""
    invalid: str = ""
    """Reason when the normaliser rejected a value without giving one."""
    shape: str | None = None
    """Regex the normalised value must match; a second line of defence behind the normaliser."""
    shape_reason: str = ""

    @property
    def drops(self) -> tuple[str, ...]:
        """Payload keys a row is sent without when its check only warns."""
        return (self.key,) if self.check else ()

    def normaliser(self, region: str, today: date) -> Callable[[Any], Verdict]:
        """``normalise`` (which this field has) for one batch, as a function of the value alone."""
        fn = self.normalise
        if self.normalise_with == "region":
            return lambda raw: fn(raw, region)
        if self.normalise_with == "today":
            return lambda raw: fn(raw, today)
        return fn


_E164 = r"^\+[1-9]\d{6,14}$"
_ISO_DATE = r"^\d{4}-\d{2}-\d{2}$"

FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("firstName"),
    FieldSpec("lastName"),
    FieldSpec("name"),
    FieldSpec(
        "email", normalise=normalise_email, check="email", code="email_invalid", invalid="email: invalid"
    ),
    FieldSpec(
        "phone",
        normalise=normalise_phone,
        normalise_with="region",
        check="phone",
        code="phone_invalid",
        invalid="phone: invalid",
        shape=_E164,
        shape_reason="phone: not E.164 after normalisation",
    ),
    FieldSpec("gender", canonical=canonical_gender, choices="genders", check="gender", code="gender_invalid"),
    FieldSpec("address1"),
    FieldSpec("city"),
    FieldSpec("state"),
    FieldSpec("postalCode"),
    FieldSpec(
        "website",
        normalise=normalise_website,
        check="website",
        code="website_invalid",
        invalid="website: invalid",
    ),
    FieldSpec(
        "timezone",
        normalise=normalise_timezone,
        check="timezone",
        code="timezone_invalid",
        invalid="timezone: invalid",
    ),
    FieldSpec("dnd", read="bool"),
    FieldSpec("source"),
    FieldSpec(
        "dateOfBirth",
        read="date",
        normalise=normalise_date_of_birth,
        normalise_with="today",
        check="dateOfBirth",
        code="dob_invalid",
        invalid="dateOfBirth: invalid",
        shape=_ISO_DATE,
        shape_reason="dateOfBirth: not YYYY-MM-DD after normalisation",
    ),
    FieldSpec(
        "country",
        normalise=normalise_country,
        check="country",
        code="country_invalid",
        invalid="country: invalid",
    ),
    FieldSpec("companyName"),
    FieldSpec("assignedTo"),
)
"""The order is the order of ``mapping.fields`` in a dumped config, so part of the config
fingerprint (reordering re-evaluates every row): a new field goes at the end."""


FIELD = {f.key: f for f in FIELDS}


def _released_first(names: Iterable[str], released: Sequence[str]) -> tuple[str, ...]:
    """``names`` in the ``released`` order; names it lacks follow, in registry order."""
    return tuple(sorted(names, key=lambda n: released.index(n) if n in released else len(released)))


# Two orders are recorded outside the code, so they stay as released: the default of
# ``quality.errors`` is part of the config fingerprint (another order would re-evaluate every row),
# and the order of the normalisers' checks in the suite is the order of a quarantined row's reasons.
CHECKS = (
    "identity",
    *_released_first(
        (f.check for f in FIELDS if f.check),
        ("email", "phone", "dateOfBirth", "country", "timezone", "website", "gender"),
    ),
    "dnd",
)
"""Quality checks a config may list as errors; ``identity`` (a valid email or phone) and ``dnd``
(the dnd settings' statuses) belong to no single field. ``duplicate`` identities are always errors."""

NORMALISED = tuple(
    FIELD[key]
    for key in _released_first(
        (f.key for f in FIELDS if f.normalise),
        ("email", "phone", "dateOfBirth", "website", "country", "timezone"),
    )
)
"""The fields with a normaliser, in the order the GX suite asserts their verdicts."""

PAYLOAD_KEYS_OF_CHECK: dict[str, tuple[str, ...]] = {
    **{f.check: f.drops for f in FIELDS if f.check},
    "dnd": ("dndSettings", "inboundDndSettings"),
    "identity": (),
}
"""Check → payload keys a row is sent without when the check only warns."""

CODE_OF_CHECK: dict[str, str] = {
    **{f.check: f.code for f in FIELDS if f.check and f.code},
    "dnd": DND_INVALID,
    "identity": NO_IDENTITY,
}
"""Check → the reason code of a row failing it; ``identity`` fails with :data:`NO_IDENTITY` only
when neither email nor phone was given (see :func:`reason_codes`)."""


def reason_codes(bad: Iterable[str], failed: Collection[str]) -> list[str]:
    """Reason codes of a row quarantined for the checks ``bad``, among all the checks it ``failed``.

    A row without identity is ``no_identity`` only when it gave neither email nor phone; when
    it gave invalid ones, their checks failed too and name it (``email_invalid``...), even
    where those checks only warn.
    """
    codes: list[str] = []
    for check in bad:
        if check == "identity":
            found = [CODE_OF_CHECK[c] for c in ("email", "phone") if c in failed] or [CODE_OF_CHECK[check]]
        else:
            found = [CODE_OF_CHECK[check]]
        codes += [c for c in found if c not in codes]
    return codes
