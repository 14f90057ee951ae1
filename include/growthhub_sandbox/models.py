"""Pydantic shapes of the sandbox: the public API (for the OpenAPI document) and the admin API.

The public request model documents ``POST /contacts/upsert``; it is *not* used to validate
requests, because the real API answers with NestJS-style messages (see ``validation.py``) and
checks auth before the body. The admin models do validate ``/_sandbox`` bodies and the
``--config`` file, which share their shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_API_VERSIONS = ("2023-02-21",)
DEMO_LOCATION_ID = "demo-location"

UserType = Literal["Location", "Company"]
DndStatus = Literal["active", "inactive", "permanent"]
CustomFieldType = Literal[
    "TEXT",
    "LARGE_TEXT",
    "SINGLE_OPTIONS",
    "RADIO",
    "DATE",
    "NUMERICAL",
    "MONETORY",
    "MULTIPLE_OPTIONS",
    "CHECKBOX",
    "FILE_UPLOAD",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- public API ---------------------------------------------------------------------------


class DndChannel(_Strict):
    status: DndStatus
    message: str | None = None
    code: str | None = None


class DndSettings(_Strict):
    """Merged per channel on update: channels not sent are left alone."""

    Call: DndChannel | None = None
    Email: DndChannel | None = None
    SMS: DndChannel | None = None
    WhatsApp: DndChannel | None = None
    GMB: DndChannel | None = None
    FB: DndChannel | None = None


class InboundDndAll(_Strict):
    status: Literal["active", "inactive"]
    message: str | None = None


class InboundDndSettings(_Strict):
    all: InboundDndAll | None = None


class CustomFieldInput(_Strict):
    """A custom field of the location, named by ``id`` or ``key``; ``field_value: null`` removes it."""

    id: str | None = None
    key: str | None = None
    field_value: str | float | list[str] | dict[str, Any] | None = Field(
        description="text/option: string; NUMERICAL/MONETORY: number; MULTIPLE_OPTIONS/CHECKBOX: list of "
        "strings; FILE_UPLOAD: object"
    )


class UpsertContactRequest(_Strict):
    """Body of ``POST /contacts/upsert``. Unknown properties are rejected (422).

    ``null`` (and ``""`` for strings) clears a field of an existing contact; fields not sent are
    left alone; ``tags`` overwrites all tags; ``customFields`` merge per field.
    """

    locationId: str
    firstName: str | None = None
    lastName: str | None = None
    name: str | None = None
    email: str | None = Field(None, description="Matched case-insensitively for duplicates.")
    gender: str | None = None
    phone: str | None = Field(None, description="Stored in E.164; matched on the normalised number.")
    address1: str | None = None
    city: str | None = None
    state: str | None = None
    postalCode: str | None = None
    website: str | None = None
    timezone: str | None = Field(None, description="IANA time zone, case-insensitive.")
    dnd: bool | None = None
    dndSettings: DndSettings | None = None
    inboundDndSettings: InboundDndSettings | None = None
    tags: list[str] | None = Field(None, description="Overwrites all current tags (stored lower-case).")
    customFields: list[CustomFieldInput] | None = None
    source: str | None = None
    dateOfBirth: str | None = Field(
        None,
        description="YYYY/MM/DD, MM/DD/YYYY, YYYY-MM-DD, MM-DD-YYYY, YYYY.MM.DD, MM.DD.YYYY, YYYY_MM_DD or "
        "MM_DD_YYYY; stored as YYYY-MM-DD.",
    )
    country: str | None = Field(None, description="ISO 3166-1 alpha-2.")
    companyName: str | None = None
    assignedTo: str | None = Field(None, description="A user id of the location.")
    createNewIfDuplicateAllowed: bool = False


class CustomFieldValue(BaseModel):
    id: str
    value: Any


class Contact(BaseModel):
    """Every key is always present; unset fields are ``null``."""

    id: str
    locationId: str
    name: str | None
    firstName: str | None
    lastName: str | None
    firstNameLowerCase: str | None
    lastNameLowerCase: str | None
    fullNameLowerCase: str | None
    email: str | None
    emailLowerCase: str | None
    phone: str | None
    gender: str | None
    address1: str | None
    city: str | None
    state: str | None
    postalCode: str | None
    country: str | None
    website: str | None
    timezone: str | None
    companyName: str | None
    dnd: bool
    dndSettings: dict[str, DndChannel]
    inboundDndSettings: dict[str, InboundDndAll]
    type: str
    source: str | None
    assignedTo: str | None
    tags: list[str]
    customFields: list[CustomFieldValue]
    dateOfBirth: str | None
    dateAdded: str
    dateUpdated: str


class UpsertContactResponse(BaseModel):
    new: bool
    contact: Contact
    traceId: str


class GetContactResponse(BaseModel):
    contact: Contact


class ErrorBody(BaseModel):
    statusCode: int
    message: str
    error: str | None = None
    traceId: str | None = None


class ValidationErrorBody(BaseModel):
    statusCode: Literal[422]
    message: list[str]
    error: Literal["Unprocessable Entity"]
    traceId: str | None = None


class OAuthTokenResponse(BaseModel):
    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int
    refresh_token: str
    scope: str
    userType: UserType
    locationId: str | None = Field(None, description="Location tokens only.")
    companyId: str | None = Field(None, description="Company (agency) tokens only.")


class InstalledLocation(BaseModel):
    id: str = Field(alias="_id")
    name: str
    address: str
    isInstalled: bool


class InstalledLocationsResponse(BaseModel):
    locations: list[InstalledLocation]
    count: int = Field(description="All matching locations, not just this page.")


class LocationTokenResponse(BaseModel):
    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int
    scope: str
    locationId: str
    userType: Literal["Location"]
    companyId: str


class OAuthErrorBody(BaseModel):
    error: str
    error_description: str


# --- admin API and --config file ------------------------------------------------------------


class RateLimitConfig(_Strict):
    burst: int = Field(100, ge=1)
    intervalMs: int = Field(10_000, ge=1)
    daily: int = Field(200_000, ge=1)


class CustomFieldConfig(_Strict):
    id: str
    key: str
    dataType: CustomFieldType = "TEXT"
    options: list[str] | None = Field(None, description="Allowed values of option fields, if restricted.")


class LocationConfig(_Strict):
    allowDuplicateContact: bool = False
    duplicateCheckFields: list[Literal["email", "phone"]] = Field(
        default_factory=lambda: ["email", "phone"], description="Priority order of duplicate matching."
    )
    customFields: list[CustomFieldConfig] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)
    rateLimit: RateLimitConfig | None = Field(None, description="Defaults to the server's --burst etc.")
    country: str = Field("US", description="Default region for phone numbers without a + prefix.")
    companyId: str | None = Field(None, description="The agency owning it (``/oauth/installedLocations``).")
    isInstalled: bool = Field(True, description="Whether the company's app is installed here.")
    name: str | None = Field(None, description="Shown by /oauth/installedLocations; defaults to the id.")
    address: str = ""


class CompanyConfig(_Strict):
    """An agency with its one marketplace app; location tokens it mints live ``locationTokenExpiresIn``."""

    appId: str
    locationTokenExpiresIn: float = Field(86_399, gt=0, description="Lifetime of minted location tokens.")
    locationScopes: list[str] = Field(
        default_factory=lambda: ["contacts.write", "contacts.readonly"],
        description="Scopes of the location tokens the agency mints.",
    )


class BulkLocationsConfig(_Strict):
    """Many locations of one company at once, for tests and benchmarks with hundreds of locations."""

    count: int = Field(ge=1, le=10_000)
    idPrefix: str = Field("", description="Ids are prefix + zero-padded index; default: '<companyId>-loc-'.")
    uninstalled: list[int] = Field(
        default_factory=list, description="Indexes created with isInstalled false."
    )
    location: LocationConfig = Field(
        default_factory=LocationConfig,
        description="Settings of every location (rateLimit, customFields ...); companyId is set for you.",
    )


class TokenConfig(_Strict):
    """A Location token (``locationId``) or a Company (agency) token (``companyId``)."""

    token: str
    userType: UserType = "Location"
    locationId: str | None = None
    companyId: str | None = None
    scopes: list[str] = Field(default_factory=lambda: ["contacts.write", "contacts.readonly"])
    expiresIn: float | None = Field(None, description="Seconds from now; null = never expires.")
    refreshToken: str | None = None
    clientId: str | None = None
    clientSecret: str | None = None

    @model_validator(mode="after")
    def _owner_matches_user_type(self) -> TokenConfig:
        if self.userType == "Location" and not self.locationId:
            raise ValueError("a Location token needs locationId")
        if self.userType == "Company" and (not self.companyId or self.locationId):
            raise ValueError("a Company token needs companyId and no locationId")
        return self


class FaultConfig(_Strict):
    """Fault knobs for ``/contacts/*`` requests that passed auth and rate limiting.

    Every such request draws one number from a RNG seeded with ``seed``, so a sequential client
    sees the same faults on every run. ``phase`` says whether an upsert is applied before the
    fault ("after": the contact is written, then the client gets the error/timeout/drop) or not
    ("before").
    """

    seed: int | None = None
    error_rate: float = Field(0.0, ge=0, le=1)
    error_statuses: list[Literal[500, 502, 503]] = Field(default_factory=lambda: [500, 502, 503])
    timeout_rate: float = Field(0.0, ge=0, le=1)
    hang_seconds: float = Field(30.0, ge=0, description="How long a timeout holds the request.")
    drop_rate: float = Field(0.0, ge=0, le=1)
    phase: Literal["before", "after"] = "before"
    latency_ms: float = Field(0.0, ge=0)
    storm_every_n: int = Field(0, ge=0, description="Every n-th cycle of requests ends in a 429 storm.")
    storm_length: int = Field(0, ge=0)
    race_window_ms: float = Field(
        0.0, ge=0, description="Delay between duplicate lookup and insert, outside the lock (shows races)."
    )


class SandboxConfig(_Strict):
    """Shape of the ``--config`` file: what ``POST /_sandbox/reset`` restores."""

    companies: dict[str, CompanyConfig] = Field(default_factory=dict)
    locations: dict[str, LocationConfig] = Field(default_factory=dict)
    tokens: list[TokenConfig] = Field(default_factory=list)
    faults: FaultConfig = Field(default_factory=FaultConfig)


def demo_config() -> SandboxConfig:
    """The config used without ``--config``: one location and one fake token for demos."""
    return SandboxConfig(
        locations={
            DEMO_LOCATION_ID: LocationConfig(
                users=["demo-user"],
                customFields=[
                    CustomFieldConfig(id="cf-lifetime-value", key="lifetime_value", dataType="NUMERICAL")
                ],
            )
        },
        tokens=[
            TokenConfig(
                token="sandbox-demo-token",  # noqa: S106 - a documented fake token
                locationId=DEMO_LOCATION_ID,
                refreshToken="sandbox-demo-refresh",
                clientId="sandbox-demo-client",
                clientSecret="sandbox-demo-secret",
            )
        ],
    )


@dataclass(frozen=True)
class Settings:
    """Server-wide settings from the command line."""

    config: SandboxConfig = field(default_factory=demo_config)
    state_path: str | None = None
    api_versions: tuple[str, ...] = DEFAULT_API_VERSIONS
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    seed: int = 0
