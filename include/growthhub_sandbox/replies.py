"""The sandbox's answers: the ``Reply`` value handlers return and NestJS-style error bodies.

Shared by the contacts endpoints (``app.py``) and the agency endpoints (``agency.py``) so every
error has the real API's ``{"statusCode", "message", "error"}`` shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi.responses import Response

if TYPE_CHECKING:
    from starlette.types import Scope, Send

UNAUTHORIZED = {
    "statusCode": 401,
    "message": "Invalid token: access token is invalid",
    "error": "Unauthorized",
}
REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
DROP_FLAG = "growthhub_sandbox.drop"
"""Set in a request's scope when its reply is a drop, so ``SandboxApp`` closes the connection."""
JSON_TYPE = "application/json"


@dataclass(frozen=True)
class Reply:
    """A handler's answer, independent of the framework; ``drop`` closes the connection instead."""

    status: int
    body: bytes = b""
    headers: dict[str, str] | None = None
    drop: bool = False

    def response(self, scope: Scope | None = None) -> Response:
        """As a FastAPI response; a drop needs the request's ``scope`` to tell ``SandboxApp``."""
        if self.drop and scope is not None:
            scope[DROP_FLAG] = True
        return Response(self.body, status_code=self.status, headers=self.headers, media_type=JSON_TYPE)

    async def send(self, send: Send) -> None:
        headers = [(b"content-type", JSON_TYPE.encode()), (b"content-length", str(len(self.body)).encode())]
        headers.extend((k.lower().encode(), v.encode()) for k, v in (self.headers or {}).items())
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def json_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(body, separators=(",", ":")).encode(), headers)


def error_reply(status: int, message: Any, headers: dict[str, str] | None = None) -> Reply:
    return json_reply(status, {"statusCode": status, "message": message, "error": REASONS[status]}, headers)
