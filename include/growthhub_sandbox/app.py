"""The FastAPI app: public GrowthHub endpoints plus the ``/_sandbox`` admin API.

Checks on a public request, in this order (each one answers before the next runs):

1. ``Version`` header missing or not accepted → 400 naming the accepted versions.
2. Bearer token missing, unknown or expired → 401 (the real API's exact body).
3. Token lacks the scope → 403; for an upsert, a body whose ``locationId`` is another
   location's → 403. 403s carry the rate-limit headers but do not count against the limit.
4. Rate limit of (location, app) → 429, the app being the token's OAuth client, else the token
   itself (``Token.rate_key``). From here on every response carries the ``X-RateLimit-*``
   headers and counts against the limit.
5. Injected faults (``PUT /_sandbox/faults``; ``/contacts/*`` only): forced 429 storm,
   latency, then with ``phase="before"`` a 5xx / timeout / dropped connection *instead of*
   the request.
6. Body not JSON or not an object → 400; validation → 422 with one message per field.
7. The upsert (or delete) is applied, leaving out the fields ``ignore_fields`` names; with
   ``phase="after"`` the fault now replaces the 200, so the client sees an error although the
   change was made (tests the client's idempotency).

``POST /oauth/token`` needs no Version header or token, like the real one, and gets no faults.
Upserts answer 200 whether created or updated (``new`` tells which), as the reference documents.

Handlers are ``async`` and never await while holding the store lock; JSON is rendered by hand
so the hot path stays cheap (see ``bench/bench_sandbox.py``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from growthhub_sandbox.agency import add_agency_routes
from growthhub_sandbox.models import (
    DeleteContactResponse,
    ErrorBody,
    FaultConfig,
    GetContactResponse,
    LocationConfig,
    OAuthErrorBody,
    OAuthTokenResponse,
    Settings,
    TokenConfig,
    UpsertContactRequest,
    UpsertContactResponse,
    ValidationErrorBody,
)
from growthhub_sandbox.replies import DROP_FLAG as _DROP
from growthhub_sandbox.replies import REASONS, UNAUTHORIZED, Reply
from growthhub_sandbox.replies import error_reply as _error
from growthhub_sandbox.replies import json_reply as _json
from growthhub_sandbox.store import TICK_MS, Store
from growthhub_sandbox.traffic import Fault, FaultInjector, RateLimiter, storm_headers
from growthhub_sandbox.validation import validate_upsert

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

    from growthhub_sandbox.models import RateLimitConfig
    from growthhub_sandbox.store import Token

WRITE_SCOPES = frozenset({"contacts.write"})
READ_SCOPES = frozenset({"contacts.readonly", "contacts.write"})
TOO_MANY = "Too many requests, please retry after the rate-limit window."
UPSERT_PATH = "/contacts/upsert"
UPSERT = f"POST {UPSERT_PATH}"
GET_CONTACT = "GET /contacts/{contactId}"
DELETE_CONTACT = "DELETE /contacts/{contactId}"
TIMELINE_ENDPOINTS = (UPSERT, GET_CONTACT, DELETE_CONTACT)
_NOT_JSON = object()

_RATE_LIMIT_HEADERS = {
    name: {"schema": {"type": "integer"}, "description": description}
    for name, description in (
        ("X-RateLimit-Max", "Requests allowed per burst window"),
        ("X-RateLimit-Remaining", "Requests left in the current burst window"),
        ("X-RateLimit-Interval-Milliseconds", "Length of the burst window"),
        ("X-RateLimit-Limit-Daily", "Requests allowed per UTC day"),
        ("X-RateLimit-Daily-Remaining", "Requests left today"),
    )
}


def _responses(ok_model: type, *statuses: int) -> dict[int | str, dict[str, Any]]:
    described: dict[int | str, dict[str, Any]] = {
        200: {"model": ok_model, "description": "Successful response", "headers": _RATE_LIMIT_HEADERS},
        400: {
            "model": ErrorBody,
            "description": "Missing/unsupported Version header, or body not a JSON object",
        },
        401: {"model": ErrorBody, "description": "Missing, unknown or expired token"},
        403: {"model": ErrorBody, "description": "Token lacks the scope or belongs to another location"},
        404: {"model": ErrorBody, "description": "No such contact in the token's location"},
        422: {"model": ValidationErrorBody, "description": "One message per failing field"},
        429: {"model": ErrorBody, "description": "Rate limited", "headers": _RATE_LIMIT_HEADERS},
    }
    return {s: described[s] for s in (200, *statuses)}


def _version_parameter(versions: tuple[str, ...]) -> dict[str, Any]:
    return {
        "name": "Version",
        "in": "header",
        "required": True,
        "description": "API version",
        "schema": {"type": "string", "enum": list(versions)},
    }


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


class SandboxApp(FastAPI):
    """FastAPI plus the outermost ASGI layer: a fast path, status counts and dropped connections.

    ``fast_routes`` (the upsert) are answered here, before FastAPI's middleware, router and
    request objects, which cost several times the handler itself; their FastAPI declarations
    call the same handler and give the OpenAPI document.

    A drop (``Reply.drop``) swallows the response and closes the socket, so the client sees the
    connection end without any response (with uvicorn, whose ``send`` is a method of the request
    cycle that owns the transport). Elsewhere it falls back to an incomplete response, which also
    makes the server close the connection.
    """

    store: Store
    fast_routes: dict[tuple[str, str], Callable[[Mapping[str, str], bytes], Awaitable[Reply]]]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Counts are taken before the client can see the answer, so a test reading /_sandbox/stats
        # right after a response (or a drop) finds it counted.
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        handler = self.fast_routes.get((scope["method"], scope["path"]))
        if handler is not None:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            reply = await handler(headers, await _read_body(receive))
            endpoint = f"{scope['method']} {scope['path']}"
            self.store.requests[endpoint]["dropped" if reply.drop else str(reply.status)] += 1
            if reply.drop:
                await _close_connection(send)
            else:
                await reply.send(send)
            return

        def endpoint_of() -> str:
            route = scope.get("route")
            return f"{scope['method']} {getattr(route, 'path', scope['path'])}"

        async def send_unless_dropped(message: Message) -> None:
            if scope.get(_DROP):
                return
            if message["type"] == "http.response.start":
                self.store.requests[endpoint_of()][str(message["status"])] += 1
            await send(message)

        await super().__call__(scope, receive, send_unless_dropped)
        if scope.get(_DROP):
            self.store.requests[endpoint_of()]["dropped"] += 1
            await _close_connection(send)


async def _close_connection(send: Send) -> None:
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-length", b"1")]})
        return
    transport.close()
    # let the server notice the closed socket before the app returns, so it writes no 500
    for _ in range(3):
        await asyncio.sleep(0)


def create_app(settings: Settings | None = None) -> SandboxApp:
    """Build a sandbox app with its own state; ``Settings()`` gives the demo config."""
    settings = settings or Settings()
    store = Store(settings.config, seed=settings.seed, state_path=settings.state_path)
    limiter = RateLimiter()
    faults = FaultInjector(settings.seed)
    faults.configure(settings.config.faults)
    versions = settings.api_versions
    version_error = f"Version header must be one of: {', '.join(versions)}"
    version_param = _version_parameter(versions)

    app = SandboxApp(
        title="GrowthHub API (sandbox)",
        version="2023-02-21",
        description="Local stand-in for the GrowthHub (LeadConnector v2) contacts API. "
        "The /_sandbox admin API is not part of this document.",
    )
    app.store = store

    @app.exception_handler(StarletteHTTPException)
    async def nest_style_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = (
            f"Cannot {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        )
        return _error(exc.status_code if exc.status_code in REASONS else 400, message).response(request.scope)

    def authorize(
        headers: Mapping[str, str], scopes: frozenset[str]
    ) -> Reply | tuple[Token, RateLimitConfig]:
        """Steps 1-3 of the module docstring (without the body's locationId check)."""
        if headers.get("version") not in versions:
            return _error(400, version_error)
        token = store.authenticate(headers.get("authorization"))
        if token is None:
            return _json(401, UNAUTHORIZED)
        limits = store.rate_limit_of(token.location_id) or settings.rate_limit
        if token.location_id is None or not scopes & token.scopes:  # an agency token has no contacts
            peeked = limiter.peek(token.rate_key, limits)
            return _error(403, "The token is not authorized for this scope.", peeked)
        return token, limits

    async def admit(token: Token, limits: RateLimitConfig) -> Reply | tuple[Fault | None, dict[str, str]]:
        """Steps 4-5: rate limit, then storm / latency / fault decision."""
        allowed, headers = limiter.hit(token.rate_key, limits)
        if not allowed:
            return _error(429, TOO_MANY, headers)
        store.location_totals[token.location_id]["requests"] += 1
        if not faults.active:
            return None, headers
        fault = faults.decide()
        if fault is not None and fault.kind == "storm":
            return _error(429, TOO_MANY, storm_headers(headers))
        if faults.config.latency_ms:
            await asyncio.sleep(faults.config.latency_ms / 1000)
        return fault, headers

    async def inject(fault: Fault, headers: dict[str, str]) -> Reply:
        if fault.kind == "error":
            return _error(fault.status, REASONS[fault.status], headers)
        if fault.kind == "timeout":
            await asyncio.sleep(faults.config.hang_seconds)
        return Reply(0, drop=True)

    async def upsert(headers: Mapping[str, str], raw_body: bytes) -> Reply:
        """Create or update a contact, following the location's duplicate settings."""
        auth = authorize(headers, WRITE_SCOPES)
        if isinstance(auth, Reply):
            return auth
        token, limits = auth
        reply = await upsert_as(token, limits, raw_body)
        store.record_answer(token.location_id, UPSERT, "dropped" if reply.drop else str(reply.status))
        return reply

    async def upsert_as(token: Token, limits: RateLimitConfig, raw_body: bytes) -> Reply:
        try:
            body: Any = json.loads(raw_body)
        except ValueError:
            body = _NOT_JSON
        location_id = body.get("locationId") if isinstance(body, dict) else None
        if isinstance(location_id, str) and location_id and location_id != token.location_id:
            peeked = limiter.peek(token.rate_key, limits)
            return _error(403, "The token does not have access to this location.", peeked)
        admitted = await admit(token, limits)
        if isinstance(admitted, Reply):
            return admitted
        fault, limit_headers = admitted
        if fault is not None and faults.config.phase == "before":
            return await inject(fault, limit_headers)
        if not isinstance(body, dict):
            return _error(400, "Request body must be a JSON object.", limit_headers)
        location = store.locations[token.location_id]
        payload, errors = validate_upsert(body, location)
        if errors:
            return _error(422, errors, limit_headers)
        create_new = body.get("createNewIfDuplicateAllowed") is True
        ignored = faults.config.ignore_fields
        if faults.config.race_window_ms:
            plan = store.plan_upsert(location, payload, create_new, ignored)
            await asyncio.sleep(faults.config.race_window_ms / 1000)
            contact, new = store.apply_upsert(plan)
        else:
            contact, new = store.upsert(location, payload, create_new, ignored)
        faults.count_ignored(payload, new)
        if fault is not None:
            return await inject(fault, limit_headers)
        return _json(200, {"new": new, "contact": contact, "traceId": store.new_trace_id()}, limit_headers)

    app.fast_routes = {("POST", UPSERT_PATH): upsert}

    def public(summary: str, ok_model: type, *statuses: int, **extra: Any) -> dict[str, Any]:
        openapi_extra = {"security": [{"bearerAuth": []}], "parameters": [version_param], **extra}
        return {
            "summary": summary,
            "responses": _responses(ok_model, *statuses),
            "openapi_extra": openapi_extra,
        }

    @app.post(
        "/contacts/upsert",
        **public(
            "Upsert Contact",
            UpsertContactResponse,
            400,
            401,
            403,
            422,
            429,
            requestBody={
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/UpsertContactRequest"}}
                },
            },
        ),
        tags=["Contacts"],
    )
    async def upsert_contact(request: Request) -> Response:
        """Create or update a contact, following the location's duplicate settings."""
        # Requests normally take SandboxApp's fast path to the same handler.
        return (await upsert(request.headers, await request.body())).response(request.scope)

    def contact_route(summary: str, ok_model: type) -> dict[str, Any]:
        """The OpenAPI description of a ``/contacts/{contactId}`` endpoint."""
        contact_id = {"name": "contactId", "in": "path", "required": True, "schema": {"type": "string"}}
        return {
            **public(summary, ok_model, 400, 401, 403, 404, 429, parameters=[version_param, contact_id]),
            "tags": ["Contacts"],
        }

    async def on_contact(
        request: Request,
        scopes: frozenset[str],
        endpoint: str,
        answer: Callable[[Token, RateLimitConfig, str], Awaitable[Reply]],
    ) -> Response:
        """Authorise, answer about the path's contact, record the answer for the location's timeline."""
        auth = authorize(request.headers, scopes)
        if isinstance(auth, Reply):
            return auth.response(request.scope)
        token, limits = auth
        reply = await answer(token, limits, request.path_params["contactId"])
        store.record_answer(token.location_id, endpoint, "dropped" if reply.drop else str(reply.status))
        return reply.response(request.scope)

    @app.get("/contacts/{contactId}", **contact_route("Get Contact", GetContactResponse))
    async def get_contact(request: Request) -> Response:
        """A contact of the token's location; another location's id is 404 like an unknown one."""
        return await on_contact(request, READ_SCOPES, GET_CONTACT, read_contact)

    async def read_contact(token: Token, limits: RateLimitConfig, contact_id: str) -> Reply:
        admitted = await admit(token, limits)
        if isinstance(admitted, Reply):
            return admitted
        fault, headers = admitted
        if fault is not None:
            return await inject(fault, headers)
        contact = store.get_contact(token.location_id, contact_id)
        if contact is None:
            return _error(404, "Contact not found", headers)
        return _json(200, {"contact": contact}, headers)

    @app.delete("/contacts/{contactId}", **contact_route("Delete Contact", DeleteContactResponse))
    async def delete_contact(request: Request) -> Response:
        """Delete a contact of the token's location; another location's id is 404 like an unknown one."""
        return await on_contact(request, WRITE_SCOPES, DELETE_CONTACT, remove_contact)

    async def remove_contact(token: Token, limits: RateLimitConfig, contact_id: str) -> Reply:
        admitted = await admit(token, limits)
        if isinstance(admitted, Reply):
            return admitted
        fault, headers = admitted
        if fault is not None and faults.config.phase == "before":
            return await inject(fault, headers)
        deleted = store.delete_contact(token.location_id, contact_id)
        if fault is not None:
            return await inject(fault, headers)
        if not deleted:
            return _error(404, "Contact not found", headers)
        return _json(200, {"succeded": True}, headers)

    @app.post(
        "/oauth/token",
        summary="Refresh an access token",
        tags=["OAuth"],
        responses={
            200: {"model": OAuthTokenResponse, "description": "New access token and refresh token"},
            400: {
                "model": OAuthErrorBody,
                "description": "invalid_request, invalid_grant (spent or unknown "
                "refresh token) or unsupported_grant_type",
            },
            401: {"model": OAuthErrorBody, "description": "invalid_client"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "required": ["grant_type", "client_id", "client_secret", "refresh_token"],
                            "properties": {
                                "grant_type": {"type": "string", "enum": ["refresh_token"]},
                                "client_id": {"type": "string"},
                                "client_secret": {"type": "string"},
                                "refresh_token": {"type": "string"},
                                "user_type": {"type": "string", "enum": ["Location", "Company"]},
                            },
                        }
                    }
                },
            }
        },
    )
    async def oauth_token(request: Request) -> Response:
        """Spend a refresh token for a new access token and a new refresh token."""
        if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            error = {"error": "invalid_request", "error_description": "body must be form-encoded"}
            return _json(400, error).response()
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
        status, body = store.refresh(form)
        return _json(status, body).response()

    # --- admin API (not in the OpenAPI document) ----------------------------------------------

    @app.get("/_sandbox/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/_sandbox/reset", include_in_schema=False)
    async def reset() -> dict[str, str]:
        """Back to the startup config: contacts, extra tokens, limits, faults and stats cleared."""
        store.reset()
        limiter.reset()
        faults.configure(store.config.faults)
        return {"status": "reset"}

    @app.put("/_sandbox/locations/{location_id}", include_in_schema=False)
    async def put_location(location_id: str, config: LocationConfig) -> dict[str, Any]:
        store.put_location(location_id, config)
        return {"locationId": location_id, **config.model_dump()}

    @app.post("/_sandbox/tokens", status_code=201, include_in_schema=False)
    async def add_token(config: TokenConfig) -> Response:
        try:
            token = store.add_token(config)
        except KeyError as unknown:
            kind, path = (
                ("location", "locations") if config.userType == "Location" else ("company", "companies")
            )
            message = f"Unknown {kind} {unknown.args[0]}; PUT /_sandbox/{path}/... first"
            return _error(404, message).response()
        return _json(201, {**config.model_dump(), "expiresAt": token.expires_at}).response()

    add_agency_routes(app, store, versions, version_error, version_param)

    @app.post("/_sandbox/day", include_in_schema=False)
    async def new_day() -> dict[str, Any]:
        """Start the next day now: every location's daily quota is full again, as after UTC midnight."""
        offset = limiter.new_day()
        today = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=offset)
        return {"dayOffset": offset, "day": today.isoformat()}

    @app.put("/_sandbox/faults", include_in_schema=False)
    async def put_faults(config: FaultConfig) -> dict[str, Any]:
        faults.configure(config)
        return config.model_dump()

    @app.get("/_sandbox/locations/{location_id}/contacts", include_in_schema=False)
    async def location_contacts(location_id: str) -> Response:
        contacts = store.contacts(location_id)
        if contacts is None:
            return _error(404, f"Unknown location {location_id}").response()
        return _json(200, {"contacts": contacts}).response()

    @app.get("/_sandbox/stats", include_in_schema=False)
    async def stats() -> dict[str, Any]:
        return {**store.stats(), "faults": dict(faults.counts)}

    @app.get("/_sandbox/locations/{location_id}/timeline", include_in_schema=False)
    async def location_timeline(
        location_id: str,
        bucket_ms: int = Query(1000, alias="bucketMs"),
        endpoint: str | None = None,
    ) -> Response:
        """Answers to the location's authenticated requests per time bucket, by status."""
        if bucket_ms < TICK_MS or bucket_ms % TICK_MS:
            return _error(400, f"bucketMs must be a positive multiple of {TICK_MS}").response()
        if endpoint is not None and endpoint not in TIMELINE_ENDPOINTS:
            return _error(400, f"endpoint must be one of {', '.join(TIMELINE_ENDPOINTS)}").response()
        buckets = store.timeline(location_id, bucket_ms // TICK_MS, endpoint)
        return _json(200, {"locationId": location_id, "bucketMs": bucket_ms, "buckets": buckets}).response()

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {})
            request_schema = UpsertContactRequest.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components.setdefault("schemas", {}).update(request_schema.pop("$defs", {}))
            components["schemas"]["UpsertContactRequest"] = request_schema
            components["securitySchemes"] = {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
