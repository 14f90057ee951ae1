"""Contact records of one location: their stored shape, merging an upsert, and the email/phone index.

Split from ``store.py``, which holds the state around them (locking, tokens, persistence).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from growthhub_sandbox.models import LocationConfig

_CONTACT_FIELDS = (
    "name",
    "firstName",
    "lastName",
    "firstNameLowerCase",
    "lastNameLowerCase",
    "fullNameLowerCase",
    "email",
    "emailLowerCase",
    "phone",
    "gender",
    "address1",
    "city",
    "state",
    "postalCode",
    "country",
    "website",
    "timezone",
    "companyName",
    "source",
    "assignedTo",
    "dateOfBirth",
)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class CustomField:
    id: str
    key: str
    data_type: str
    options: tuple[str, ...] | None


class Location:
    """One sub-account: its settings, contacts and the email/phone indexes used for matching."""

    def __init__(self, location_id: str, config: LocationConfig) -> None:
        self.id = location_id
        self.contacts: dict[str, dict[str, Any]] = {}
        # identity value -> contact ids in creation order (several when duplicates are allowed)
        self.index: dict[str, dict[str, list[str]]] = {"email": {}, "phone": {}}
        self.configure(config)

    def configure(self, config: LocationConfig) -> None:
        self.allow_duplicates = config.allowDuplicateContact
        self.check_fields = tuple(dict.fromkeys(config.duplicateCheckFields))
        self.custom_fields = {
            f.id: CustomField(f.id, f.key, f.dataType, tuple(f.options) if f.options is not None else None)
            for f in config.customFields
        }
        self.custom_fields_by_key = {f.key: f for f in self.custom_fields.values()}
        self.users = frozenset(config.users)
        self.rate_limit = config.rateLimit
        self.country = config.country.upper()
        self.company_id = config.companyId
        self.is_installed = config.isInstalled
        self.name = config.name or self.id
        self.address = config.address

    def find(self, field_name: str, value: str | None) -> list[str]:
        if not value:
            return []
        return self.index[field_name].get(_identity(field_name, value), [])

    def _reindex(self, contact: dict[str, Any], field_name: str, old: str | None) -> None:
        new = contact[field_name]
        if old == new:
            return
        self._unindex(contact["id"], field_name, old)
        if new:
            self.index[field_name].setdefault(_identity(field_name, new), []).append(contact["id"])

    def _unindex(self, contact_id: str, field_name: str, value: str | None) -> None:
        ids = self.index[field_name].get(_identity(field_name, value), []) if value else []
        if contact_id in ids:
            ids.remove(contact_id)

    def add(self, contact: dict[str, Any]) -> None:
        self.contacts[contact["id"]] = contact
        for name in ("email", "phone"):
            self._reindex(contact, name, None)

    def remove(self, contact_id: str) -> bool:
        """Forget a contact and free its email and phone for later matching; False if unknown."""
        contact = self.contacts.pop(contact_id, None)
        if contact is None:
            return False
        for name in ("email", "phone"):
            self._unindex(contact_id, name, contact[name])
        return True


def _identity(field_name: str, value: str) -> str:
    # phones are stored normalised (E.164) already; emails match case-insensitively
    return value.lower() if field_name == "email" else value


def blank_contact(contact_id: str, location_id: str, now: str) -> dict[str, Any]:
    contact: dict[str, Any] = {"id": contact_id, "locationId": location_id}
    contact.update(dict.fromkeys(_CONTACT_FIELDS))
    contact.update(
        dnd=False,
        dndSettings={},
        inboundDndSettings={},
        type="lead",
        tags=[],
        customFields={},
        dateAdded=now,
        dateUpdated=now,
    )
    return contact


def merge(contact: dict[str, Any], payload: dict[str, Any], ignored: frozenset[str]) -> None:
    """Fields not sent stay; tags overwrite; customFields and dndSettings merge per entry."""
    for key, value in payload.items():
        if key in ignored:
            continue
        if key == "customFields":
            for field_id, field_value in value.items():
                if field_value is None:
                    contact["customFields"].pop(field_id, None)
                else:
                    contact["customFields"][field_id] = field_value
        elif key in ("dndSettings", "inboundDndSettings"):
            contact[key] = {**contact[key], **value}
        else:
            contact[key] = value
    if "name" not in payload and ("firstName" in payload or "lastName" in payload):
        contact["name"] = " ".join(p for p in (contact["firstName"], contact["lastName"]) if p) or None
    for source, target in (
        ("firstName", "firstNameLowerCase"),
        ("lastName", "lastNameLowerCase"),
        ("name", "fullNameLowerCase"),
        ("email", "emailLowerCase"),
    ):
        contact[target] = contact[source].lower() if contact[source] else None


def render_contact(contact: dict[str, Any]) -> dict[str, Any]:
    """The API shape of a stored contact: custom fields as ``[{"id", "value"}]``."""
    out = dict(contact)
    out["customFields"] = [{"id": k, "value": v} for k, v in contact["customFields"].items()]
    out["tags"] = list(contact["tags"])
    return out
