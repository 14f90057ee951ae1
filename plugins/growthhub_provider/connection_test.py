"""
Make the UI's *Test* button work for connections without a port (Airflow 3.3's API refuses it).

The connections list builds its test request with ``port: Number(connection.port)``, and
``Number(null)`` is ``0``. ``POST /api/v2/connections/test`` compares that port with the stored one,
treats only ``""`` as blank, finds ``0 != NULL`` and answers 400 "The host or port to test differs
from the stored connection" unless the body carries a real password, which the UI never sends for
a stored secret (it sends ``***``). So every connection whose form hides the port, GrowthHub's
included, failed its test before any hook ran.

Upstream fixed it in the API (apache/airflow#73298: a port of 0 compares as blank). Until the
installed Airflow has that fix, this root middleware does the same before the route sees the body:
a test request's ``port: 0`` becomes ``null``. Nothing listens on port 0, so no destination changes;
a stored port other than blank still differs from it, so stored credentials are never sent to a
port the caller chose. Registered by the project's ``airflow.plugins`` entry point; delete it once
Airflow ships the fix.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.plugins_manager import AirflowPlugin

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

TEST_PATH_SUFFIX = "/api/v2/connections/test"


def _blank_zero_port(body: bytes) -> bytes | None:
    """The body with ``"port": 0`` made ``null``; ``None`` when there is nothing to change."""
    try:
        data = json.loads(body)
    except ValueError:
        return None  # not JSON: the route answers 422 itself
    if not isinstance(data, dict) or data.get("port") != 0 or isinstance(data.get("port"), bool):
        return None
    data["port"] = None
    return json.dumps(data).encode()


class ZeroPortIsBlankMiddleware:
    """ASGI middleware: a connection test's ``port: 0`` reaches the route as ``null``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].rstrip("/").endswith(TEST_PATH_SUFFIX)
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to test
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        changed = _blank_zero_port(body)
        if changed is not None:
            body = changed
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # after the body: disconnect notices
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class GrowthHubConnectionTestPlugin(AirflowPlugin):
    """Registers :class:`ZeroPortIsBlankMiddleware` on the API server."""

    name = "growthhub_connection_test"
    fastapi_root_middlewares: ClassVar[list[dict[str, Any]]] = [
        {"middleware": ZeroPortIsBlankMiddleware, "args": [], "kwargs": {}, "name": "zero port is blank"}
    ]
