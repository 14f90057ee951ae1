"""Sandbox state: locations, tokens, contacts with duplicate matching, OAuth grants, optional SQLite.

All state changes happen under one lock. The server calls the store from its event loop without
awaiting inside a locked section, so an upsert's duplicate lookup and insert are atomic per
location. ``plan_upsert``/``apply_upsert`` split them for the ``race_window_ms`` fault, which
shows what happens without that atomicity.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sqlite3
import string
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from growthhub_sandbox.models import (
    CompanyConfig,
    LocationConfig,
    RateLimitConfig,
    SandboxConfig,
    TokenConfig,
    UserType,
)

ACCESS_TOKEN_LIFETIME = 86_399  # seconds, like the real API ("about a day")
TICK_MS = 100
"""Resolution of the per-location answer timeline (``Store.record_answer``)."""
_ID_ALPHABET = string.ascii_letters + string.digits
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


def _now_iso() -> str:
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
        index = self.index[field_name]
        if old:
            ids = index.get(_identity(field_name, old), [])
            if contact["id"] in ids:
                ids.remove(contact["id"])
        if new:
            index.setdefault(_identity(field_name, new), []).append(contact["id"])

    def add(self, contact: dict[str, Any]) -> None:
        self.contacts[contact["id"]] = contact
        for name in ("email", "phone"):
            self._reindex(contact, name, None)


def _identity(field_name: str, value: str) -> str:
    # phones are stored normalised (E.164) already; emails match case-insensitively
    return value.lower() if field_name == "email" else value


@dataclass
class Token:
    token: str
    location_id: str | None  # None: a Company (agency) token
    scopes: frozenset[str]
    expires_at: float | None  # wall-clock epoch seconds
    client_id: str | None = None  # the OAuth app (client) it was issued to; None: a static token
    company_id: str | None = None  # a Company token's agency

    @property
    def user_type(self) -> UserType:
        return "Location" if self.location_id is not None else "Company"

    @property
    def rate_key(self) -> tuple[str, str]:
        """What the rate limit counts against: the app on this location, else the token itself.

        GrowthHub limits per app and location, so every access token of one OAuth client (each
        refresh issues a new one) shares one window; a static Private Integration token has its own.
        """
        app = f"app:{self.client_id}" if self.client_id else f"token:{self.token}"
        return self.location_id or f"company:{self.company_id}", app

    def as_record(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "locationId": self.location_id,
            "scopes": sorted(self.scopes),
            "expiresAt": self.expires_at,
            "clientId": self.client_id,
            "companyId": self.company_id,
        }


@dataclass
class RefreshGrant:
    """An unspent refresh token; using it spends it and issues a new access + refresh token."""

    refresh_token: str
    location_id: str | None  # None: the grant of a Company token
    scopes: tuple[str, ...]
    client_id: str | None
    client_secret: str | None
    access_lifetime: float
    company_id: str | None = None

    def as_record(self) -> dict[str, Any]:
        return {
            "refreshToken": self.refresh_token,
            "locationId": self.location_id,
            "scopes": list(self.scopes),
            "clientId": self.client_id,
            "clientSecret": self.client_secret,
            "accessLifetime": self.access_lifetime,
            "companyId": self.company_id,
        }


@dataclass
class UpsertPlan:
    """The outcome of duplicate matching: update ``contact_id`` (None: create), minus ``ignored`` fields."""

    location: Location
    payload: dict[str, Any]
    contact_id: str | None
    ignored: frozenset[str] = field(default_factory=frozenset)


class Store:
    """All mutable sandbox state; ``reset`` restores the startup config."""

    def __init__(self, config: SandboxConfig, *, seed: int = 0, state_path: str | None = None) -> None:
        self._config = config
        self._seed = seed
        self._lock = threading.RLock()
        self._db = _open_db(state_path) if state_path else None
        self.companies: dict[str, CompanyConfig] = {}
        self.locations: dict[str, Location] = {}
        self.tokens: dict[str, Token] = {}
        self.refresh_grants: dict[str, RefreshGrant] = {}
        self.requests: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.location_totals: defaultdict[str, Counter[str]] = defaultdict(Counter)
        # location -> tick (wall clock // TICK_MS) -> answers by (endpoint, status)
        self._timeline: defaultdict[str, defaultdict[int, Counter[tuple[str, str]]]] = defaultdict(
            lambda: defaultdict(Counter)
        )
        self._rng = random.Random(seed)
        if self._db is not None and self._load():
            return
        self.reset()

    # --- configuration ---------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.companies.clear()
            self.locations.clear()
            self.tokens.clear()
            self.refresh_grants.clear()
            self.requests.clear()
            self.location_totals.clear()
            self._timeline.clear()
            self._rng = random.Random(self._seed)
            if self._db is not None:
                self._db.execute("DELETE FROM state")
            for company_id, company in self._config.companies.items():
                self.put_company(company_id, company)
            for location_id, location in self._config.locations.items():
                self.put_location(location_id, location)
            for token in self._config.tokens:
                self.add_token(token)

    @property
    def config(self) -> SandboxConfig:
        return self._config

    def put_location(self, location_id: str, config: LocationConfig) -> None:
        """Create or reconfigure a location; its contacts are kept."""
        with self._lock:
            if location_id in self.locations:
                self.locations[location_id].configure(config)
            else:
                self.locations[location_id] = Location(location_id, config)
            self._persist("location", location_id, config.model_dump())

    def put_company(self, company_id: str, config: CompanyConfig) -> None:
        """Create or reconfigure an agency; its locations and tokens are kept."""
        with self._lock:
            self.companies[company_id] = config
            self._persist("company", company_id, config.model_dump())

    def put_locations(self, configs: dict[str, LocationConfig]) -> None:
        """``put_location`` for many, persisted in one SQLite transaction (hundreds in milliseconds)."""
        with self._lock:
            if self._db is not None:
                self._db.execute("BEGIN")
            try:
                for location_id, config in configs.items():
                    self.put_location(location_id, config)
            finally:
                if self._db is not None:
                    self._db.execute("COMMIT")

    def add_token(self, config: TokenConfig) -> Token:
        """Register a token (and its refresh grant); KeyError names an unknown location or company."""
        with self._lock:
            owner = config.locationId if config.userType == "Location" else config.companyId
            if owner not in (self.locations if config.userType == "Location" else self.companies):
                raise KeyError(owner)
            expires_at = time.time() + config.expiresIn if config.expiresIn is not None else None
            token = Token(
                config.token,
                config.locationId,
                frozenset(config.scopes),
                expires_at,
                config.clientId,
                config.companyId,
            )
            self.tokens[token.token] = token
            self._persist("token", token.token, token.as_record())
            if config.refreshToken:
                grant = RefreshGrant(
                    config.refreshToken,
                    config.locationId,
                    tuple(config.scopes),
                    config.clientId,
                    config.clientSecret,
                    config.expiresIn if config.expiresIn is not None else ACCESS_TOKEN_LIFETIME,
                    config.companyId,
                )
                self.refresh_grants[grant.refresh_token] = grant
                self._persist("refresh", grant.refresh_token, grant.as_record())
            return token

    # --- auth ------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Token | None:
        """The live token of an ``Authorization: Bearer`` header, or None (→ 401)."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        token = self.tokens.get(authorization[7:].strip())
        if token is None or (token.expires_at is not None and token.expires_at <= time.time()):
            return None
        return token

    def refresh(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """``POST /oauth/token`` with ``grant_type=refresh_token``: rotate the refresh token."""
        if form.get("grant_type") != "refresh_token":
            return 400, _oauth_error("unsupported_grant_type", "grant_type must be refresh_token")
        missing = [k for k in ("client_id", "client_secret", "refresh_token") if not form.get(k)]
        if missing:
            return 400, _oauth_error("invalid_request", f"missing parameter(s): {', '.join(missing)}")
        with self._lock:
            grant = self.refresh_grants.get(form["refresh_token"])
            if grant is None:
                return 400, _oauth_error("invalid_grant", "refresh token is invalid, expired or already used")
            user_type = "Location" if grant.location_id is not None else "Company"
            if form.get("user_type", "Location") != user_type:
                return 400, _oauth_error("invalid_request", f"user_type must be {user_type}")
            if (grant.client_id, grant.client_secret) != (form["client_id"], form["client_secret"]):
                return 401, _oauth_error("invalid_client", "client authentication failed")
            del self.refresh_grants[grant.refresh_token]
            self._unpersist("refresh", grant.refresh_token)
            access = self.new_secret("sbx-at")
            refresh = self.new_secret("sbx-rt")
            self.add_token(
                TokenConfig(
                    token=access,
                    userType=user_type,
                    locationId=grant.location_id,
                    companyId=grant.company_id,
                    scopes=list(grant.scopes),
                    expiresIn=grant.access_lifetime,
                    refreshToken=refresh,
                    clientId=grant.client_id,
                    clientSecret=grant.client_secret,
                )
            )
        owner = {"locationId": grant.location_id} if grant.location_id else {"companyId": grant.company_id}
        return 200, {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": int(grant.access_lifetime),
            "refresh_token": refresh,
            "scope": " ".join(grant.scopes),
            "userType": user_type,
            **owner,
        }

    def new_secret(self, prefix: str) -> str:
        """A fresh token value from the seeded generator (reproducible per server run)."""
        return f"{prefix}-{self._rng.getrandbits(128):032x}"

    def rate_limit_of(self, location_id: str | None) -> RateLimitConfig | None:
        location = self.locations.get(location_id)
        return location.rate_limit if location else None

    # --- contacts --------------------------------------------------------------------------

    def new_trace_id(self) -> str:
        h = f"{self._rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def plan_upsert(self, location: Location, payload: dict[str, Any], create_new: bool) -> UpsertPlan:
        """Duplicate matching as the reference describes it.

        ``createNewIfDuplicateAllowed`` creates without looking only when the location allows
        duplicates (scenario 1); otherwise (scenarios 2, 3) the check fields are tried in the
        location's priority order and the first match is updated. If a later check field of the
        request matches a *different* contact, that field is left out of the update so the two
        contacts do not end up sharing it.
        """
        if create_new and location.allow_duplicates:
            return UpsertPlan(location, payload, None)
        with self._lock:
            target = None
            for name in location.check_fields:
                ids = location.find(name, payload.get(name))
                if ids:
                    target = ids[0]  # the oldest when the location allows duplicates
                    break
            if target is None:
                return UpsertPlan(location, payload, None)
            ignored = frozenset(
                name
                for name in location.check_fields
                if (ids := location.find(name, payload.get(name))) and target not in ids
            )
            return UpsertPlan(location, payload, target, ignored)

    def apply_upsert(self, plan: UpsertPlan) -> tuple[dict[str, Any], bool]:
        """Write a plan; returns ``(rendered contact, new)``."""
        location = plan.location
        with self._lock:
            now = _now_iso()
            contact = location.contacts.get(plan.contact_id) if plan.contact_id else None
            new = contact is None
            if contact is None:
                contact = _blank_contact(self._new_id(), location.id, now)
            old = {"email": contact["email"], "phone": contact["phone"]}
            _merge(contact, plan.payload, plan.ignored)
            contact["dateUpdated"] = now
            if new:
                location.add(contact)
            else:
                for name in ("email", "phone"):
                    location._reindex(contact, name, old[name])
            totals = self.location_totals[location.id]
            totals["created" if new else "updated"] += 1
            self._persist("contact", contact["id"], contact)
            return render_contact(contact), new

    def upsert(
        self, location: Location, payload: dict[str, Any], create_new: bool
    ) -> tuple[dict[str, Any], bool]:
        """Match and write in one locked step, so concurrent same-identity upserts cannot both create."""
        with self._lock:
            return self.apply_upsert(self.plan_upsert(location, payload, create_new))

    def get_contact(self, location_id: str, contact_id: str) -> dict[str, Any] | None:
        location = self.locations.get(location_id)
        contact = location.contacts.get(contact_id) if location else None
        return render_contact(contact) if contact else None

    def contacts(self, location_id: str) -> list[dict[str, Any]] | None:
        with self._lock:
            location = self.locations.get(location_id)
            if location is None:
                return None
            return [render_contact(c) for c in location.contacts.values()]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": {endpoint: dict(c) for endpoint, c in sorted(self.requests.items())},
                "locations": {
                    loc_id: {
                        "contacts": len(loc.contacts),
                        **{k: self.location_totals[loc_id][k] for k in ("requests", "created", "updated")},
                    }
                    for loc_id, loc in self.locations.items()
                },
            }

    def record_answer(self, location_id: str, endpoint: str, status: str) -> None:
        """Count one answer to an authenticated request of the location, at the current time."""
        tick = int(time.time() * 1000) // TICK_MS
        self._timeline[location_id][tick][(endpoint, status)] += 1

    def timeline(self, location_id: str, ticks: int, endpoint: str | None = None) -> list[dict[str, Any]]:
        """Answers per ``ticks * TICK_MS`` ms bucket (only buckets with answers), oldest first.

        Each bucket is ``{"start": epoch seconds, "answers": {status: count}}``; ``endpoint``
        (``"POST /contacts/upsert"`` ...) keeps that endpoint's answers only.
        """
        with self._lock:
            per_tick = dict(self._timeline.get(location_id, {}))
        buckets: dict[int, Counter[str]] = defaultdict(Counter)
        for tick, answers in per_tick.items():
            for (answered, status), n in list(answers.items()):
                if endpoint is None or answered == endpoint:
                    buckets[tick // ticks][status] += n
        return [
            {"start": round(b * ticks * TICK_MS / 1000, 3), "answers": dict(buckets[b])}
            for b in sorted(buckets)
            if buckets[b]
        ]

    def _new_id(self) -> str:
        # the seeded generator restarts with the server: skip ids a --state file already holds
        while True:
            contact_id = "".join(self._rng.choices(_ID_ALPHABET, k=20))
            if not any(contact_id in location.contacts for location in self.locations.values()):
                return contact_id

    # --- persistence -----------------------------------------------------------------------

    def _persist(self, kind: str, key: str, record: dict[str, Any]) -> None:
        if self._db is not None:
            self._db.execute(
                "INSERT OR REPLACE INTO state (kind, key, body) VALUES (?, ?, ?)",
                (kind, key, json.dumps(record)),
            )

    def _unpersist(self, kind: str, key: str) -> None:
        if self._db is not None:
            self._db.execute("DELETE FROM state WHERE kind = ? AND key = ?", (kind, key))

    def _load(self) -> bool:
        """Restore a previous run's state; False when the file holds none yet."""
        assert self._db is not None
        rows = self._db.execute("SELECT kind, key, body FROM state ORDER BY rowid").fetchall()
        if not rows:
            return False
        for kind, key, body in rows:
            record = json.loads(body)
            if kind == "company":
                self.companies[key] = CompanyConfig.model_validate(record)
            elif kind == "location":
                self.locations[key] = Location(key, LocationConfig.model_validate(record))
            elif kind == "token":
                self.tokens[key] = Token(
                    key,
                    record["locationId"],
                    frozenset(record["scopes"]),
                    record["expiresAt"],
                    record.get("clientId"),  # absent in state files written before it was kept
                    record.get("companyId"),
                )
            elif kind == "refresh":
                self.refresh_grants[key] = RefreshGrant(
                    key,
                    record["locationId"],
                    tuple(record["scopes"]),
                    record["clientId"],
                    record["clientSecret"],
                    record["accessLifetime"],
                    record.get("companyId"),
                )
        for kind, _key, body in rows:
            if kind == "contact":
                contact = json.loads(body)
                location = self.locations.get(contact["locationId"])
                if location is not None:
                    location.add(contact)
        return True


def _open_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS state (kind TEXT, key TEXT, body TEXT, PRIMARY KEY (kind, key))")
    return db


def _oauth_error(error: str, description: str) -> dict[str, str]:
    return {"error": error, "error_description": description}


def _blank_contact(contact_id: str, location_id: str, now: str) -> dict[str, Any]:
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


def _merge(contact: dict[str, Any], payload: dict[str, Any], ignored: frozenset[str]) -> None:
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
