"""Agencies: ``GET /oauth/installedLocations``, ``POST /oauth/locationToken`` and their admin calls.

An agency (company) has one marketplace app. Its OAuth token (``userType: "Company"``, issued to
an app, so it has a ``clientId``; refreshed through ``POST /oauth/token`` with
``user_type=Company``) lists the company's locations and mints location tokens for those where
the app is installed. A minted token is an ordinary location token: it reaches ``/contacts/*``
of its location only, under that location's rate limits, and lives the company's
``locationTokenExpiresIn``.

Checks, in order (each answers before the next runs): ``Version`` header (400) → token missing,
unknown or expired (401) → not an OAuth Company token, or lacking the scope (403) → query / form
fields (422, one message per problem) → another company, another app, or a location that is
unknown, another company's or not installed (403). The last three location cases answer alike,
so an agency cannot probe other companies' location ids. These endpoints are not rate limited.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import Response

from growthhub_sandbox.models import (
    BulkLocationsConfig,
    CompanyConfig,
    ErrorBody,
    InstalledLocationsResponse,
    LocationTokenResponse,
    TokenConfig,
    ValidationErrorBody,
)
from growthhub_sandbox.replies import UNAUTHORIZED, Reply, error_reply, json_reply

if TYPE_CHECKING:
    from growthhub_sandbox.store import Store, Token

LIST_SCOPES = frozenset({"oauth.readonly", "oauth.write"})
MINT_SCOPES = frozenset({"oauth.write"})
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
NOT_AGENCY = "This authClass type is not allowed to access this scope."
PRIVATE_INTEGRATION = "Private integration tokens cannot be used here; use the agency's OAuth token."
NO_SCOPE = "The token is not authorized for this scope."
OTHER_COMPANY = "The token does not have access to this company."
OTHER_APP = "The app does not belong to this company."
NOT_INSTALLED = "The app is not installed for this location."
_FORM = "application/x-www-form-urlencoded"


def authorize_agency(store: Store, headers: Mapping[str, str], scopes: frozenset[str]) -> Reply | Token:
    """The live OAuth Company token of the request carrying one of ``scopes``, else the 401/403."""
    token = store.authenticate(headers.get("authorization"))
    if token is None:
        return json_reply(401, UNAUTHORIZED)
    if token.user_type != "Company":
        return error_reply(403, NOT_AGENCY)
    if token.client_id is None:
        return error_reply(403, PRIVATE_INTEGRATION)
    if not scopes & token.scopes:
        return error_reply(403, NO_SCOPE)
    return token


def _required(fields: Mapping[str, str], *names: str) -> list[str]:
    return [f"{name} should not be empty" for name in names if not fields.get(name, "").strip()]


def _int_param(
    query: Mapping[str, str], name: str, default: int, low: int, high: int
) -> tuple[int, list[str]]:
    raw = query.get(name)
    if raw is None:
        return default, []
    if not raw.strip().lstrip("-").isdigit():
        return default, [f"{name} must be an integer number"]
    value = int(raw)
    if value < low:
        return default, [f"{name} must not be less than {low}"]
    if value > high:
        return default, [f"{name} must not be greater than {high}"]
    return value, []


def _bool_param(query: Mapping[str, str], name: str) -> tuple[bool | None, list[str]]:
    raw = query.get(name)
    if raw is None:
        return None, []
    if raw not in ("true", "false"):
        return None, [f"{name} must be a boolean value"]
    return raw == "true", []


def list_installed_locations(store: Store, token: Token, query: Mapping[str, str]) -> Reply:
    """A page of the company's locations (all, or only installed / uninstalled ones) and the total."""
    skip, skip_errors = _int_param(query, "skip", 0, 0, 10**9)
    limit, limit_errors = _int_param(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    installed, installed_errors = _bool_param(query, "isInstalled")
    errors = _required(query, "companyId", "appId") + skip_errors + limit_errors + installed_errors
    if errors:
        return error_reply(422, errors)
    if query["companyId"] != token.company_id:
        return error_reply(403, OTHER_COMPANY)
    if store.companies[query["companyId"]].appId != query["appId"]:
        return error_reply(403, OTHER_APP)
    matching = [
        location
        for location in store.locations.values()
        if location.company_id == token.company_id and installed in (None, location.is_installed)
    ]
    page = [
        {"_id": loc.id, "name": loc.name, "address": loc.address, "isInstalled": loc.is_installed}
        for loc in matching[skip : skip + limit]
    ]
    return json_reply(200, {"locations": page, "count": len(matching)})


def mint_location_token(store: Store, token: Token, form: Mapping[str, str]) -> Reply:
    """A location token of an installed location of the agency's company, living the company's TTL."""
    errors = _required(form, "companyId", "locationId")
    if errors:
        return error_reply(422, errors)
    if form["companyId"] != token.company_id:
        return error_reply(403, OTHER_COMPANY)
    company = store.companies[form["companyId"]]
    location = store.locations.get(form["locationId"])
    if location is None or location.company_id != token.company_id or not location.is_installed:
        return error_reply(403, NOT_INSTALLED)
    minted = store.add_token(
        TokenConfig(
            token=store.new_secret("sbx-lt"),
            locationId=location.id,
            companyId=location.company_id,
            scopes=company.locationScopes,
            expiresIn=company.locationTokenExpiresIn,
            clientId=token.client_id,  # the app's tokens share the location's rate-limit window
        )
    )
    return json_reply(
        201,
        {
            "access_token": minted.token,
            "token_type": "Bearer",
            "expires_in": math.ceil(company.locationTokenExpiresIn),
            "scope": " ".join(company.locationScopes),
            "locationId": location.id,
            "userType": "Location",
            "companyId": location.company_id,
        },
    )


def add_locations(store: Store, company_id: str, bulk: BulkLocationsConfig) -> list[str]:
    """Create (or reconfigure) ``bulk.count`` locations of the company; returns their ids in order."""
    prefix = bulk.idPrefix or f"{company_id}-loc-"
    width = len(str(bulk.count - 1))
    uninstalled = set(bulk.uninstalled)
    configs = {
        f"{prefix}{index:0{width}d}": bulk.location.model_copy(
            update={
                "companyId": company_id,
                "isInstalled": bulk.location.isInstalled and index not in uninstalled,
            }
        )
        for index in range(bulk.count)
    }
    store.put_locations(configs)
    return list(configs)


def _error_responses(*described: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": ValidationErrorBody if status == 422 else ErrorBody, "description": text}
        for status, text in described
    }


_AGENCY_ERRORS = (
    (400, "Missing or unsupported Version header"),
    (401, "Missing, unknown or expired token"),
    (403, "Not an OAuth agency token, scope missing, another company, or app not installed there"),
    (422, "One message per missing or invalid field"),
)


_QUERY_PARAMETERS = [
    {"name": name, "in": "query", "required": required, "schema": schema}
    for name, required, schema in (
        ("companyId", True, {"type": "string"}),
        ("appId", True, {"type": "string"}),
        ("skip", False, {"type": "integer", "minimum": 0, "default": 0}),
        (
            "limit",
            False,
            {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
        ),
        ("isInstalled", False, {"type": "boolean"}),
    )
]


def add_agency_routes(
    app: FastAPI, store: Store, versions: tuple[str, ...], version_error: str, version_param: dict[str, Any]
) -> None:
    """Register the two public agency endpoints and the ``/_sandbox/companies`` admin calls."""

    def authorize(headers: Mapping[str, str], scopes: frozenset[str]) -> Reply | Token:
        if headers.get("version") not in versions:
            return error_reply(400, version_error)
        return authorize_agency(store, headers, scopes)

    @app.get(
        "/oauth/installedLocations",
        summary="Get locations where the app is installed",
        tags=["OAuth"],
        responses={
            200: {"model": InstalledLocationsResponse, "description": "A page of locations and the total"},
            **_error_responses(*_AGENCY_ERRORS),
        },
        openapi_extra={"security": [{"bearerAuth": []}], "parameters": [version_param, *_QUERY_PARAMETERS]},
    )
    async def installed_locations(request: Request) -> Response:
        """The company's locations with their ``isInstalled`` flag, paged with skip/limit."""
        auth = authorize(request.headers, LIST_SCOPES)
        if isinstance(auth, Reply):
            return auth.response()
        return list_installed_locations(store, auth, request.query_params).response()

    form_schema = {
        "type": "object",
        "required": ["companyId", "locationId"],
        "properties": {"companyId": {"type": "string"}, "locationId": {"type": "string"}},
    }

    @app.post(
        "/oauth/locationToken",
        summary="Get a location access token from an agency token",
        tags=["OAuth"],
        status_code=201,
        responses={
            201: {"model": LocationTokenResponse, "description": "A location token (no refresh token)"},
            **_error_responses(*_AGENCY_ERRORS),
        },
        openapi_extra={
            "security": [{"bearerAuth": []}],
            "parameters": [version_param],
            "requestBody": {"required": True, "content": {_FORM: {"schema": form_schema}}},
        },
    )
    async def location_token(request: Request) -> Response:
        """Mint a location token for an installed location of the agency's company."""
        auth = authorize(request.headers, MINT_SCOPES)
        if isinstance(auth, Reply):
            return auth.response()
        is_form = request.headers.get("content-type", "").startswith(_FORM)
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"))) if is_form else {}
        return mint_location_token(store, auth, form).response()

    _add_admin_routes(app, store)


def _add_admin_routes(app: FastAPI, store: Store) -> None:
    """``PUT /_sandbox/companies/{id}`` and the bulk ``POST /_sandbox/companies/{id}/locations``."""

    @app.put("/_sandbox/companies/{company_id}", include_in_schema=False)
    async def put_company(company_id: str, config: CompanyConfig) -> dict[str, Any]:
        store.put_company(company_id, config)
        return {"companyId": company_id, **config.model_dump()}

    @app.post("/_sandbox/companies/{company_id}/locations", status_code=201, include_in_schema=False)
    async def post_locations(company_id: str, bulk: BulkLocationsConfig) -> Response:
        if company_id not in store.companies:
            return error_reply(
                404, f"Unknown company {company_id}; PUT /_sandbox/companies/... first"
            ).response()
        return json_reply(
            201, {"companyId": company_id, "locationIds": add_locations(store, company_id, bulk)}
        ).response()
