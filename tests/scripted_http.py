"""
A scripted HTTP server on 127.0.0.1 for the client's tests: real HTTP, answers chosen per test.

Each request is recorded and answered with the next :class:`Reply` of its key's script (by default
the key is ``"<METHOD> <path without query>"``; the last reply repeats). Replies can also misbehave
the ways a network does: a dropped connection, no answer in time, a body cut short.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, urlsplit

if TYPE_CHECKING:
    from collections.abc import Iterator

Fault = Literal["drop", "timeout", "broken-body"]


@dataclass(frozen=True)
class Reply:
    """
    One canned answer: ``body`` then ``pad`` bytes of ``x`` then ``suffix``, written in chunks.

    :param fault: ``drop`` closes the connection after half a status line; ``timeout`` waits
        ``delay_s`` (set it past the client's timeout) before answering; ``broken-body`` promises
        more body than it sends, then closes.
    """

    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json"
    pad: int = 0
    suffix: bytes = b""
    chunked: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    fault: Fault | None = None
    delay_s: float = 0.0
    hang_up: bool = False  # close the connection after answering, unannounced (an idle timeout)


def json_reply(status: int, data: Any, **headers: str) -> Reply:
    """A JSON answer with these headers."""
    return Reply(status, json.dumps(data).encode(), headers=headers)


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    method: str
    target: str  # as sent: a path, or an absolute URL through a proxy
    headers: Message
    body: bytes
    connection: int  # the client's connection it came on, numbered from 1 in order of arrival

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query))

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode()))


Script = list[Reply | Callable[[Recorded], Reply]]


def by_method_and_path(request: Recorded) -> str:
    return f"{request.method} {request.path}"


class ScriptedApi:
    """
    What the server answers, and what it was asked.

    :param key: which script answers a request (default ``"POST /contacts/upsert"`` style).
    :param default: the answer of a request whose key has no script: a 418, which the client
        treats as a rejection, so an unscripted request shows in the test's failure.
    """

    def __init__(
        self,
        base_url: str,
        key: Callable[[Recorded], str] = by_method_and_path,
        default: Reply | None = None,
    ) -> None:
        self.base_url = base_url
        self.key = key
        self.default = default or json_reply(418, {"message": "no script for this request"})
        self.scripts: dict[str, Script] = {}
        self.served: Counter[str] = Counter()
        self.requests: list[Recorded] = []
        self.hung_up: Counter[str] = Counter()  # the client closed before the body's end
        self.lock = threading.Lock()

    def post(self, path: str, *replies: Reply | Callable[[Recorded], Reply]) -> None:
        self.scripts[f"POST {path}"] = list(replies)

    def get(self, path: str, *replies: Reply | Callable[[Recorded], Reply]) -> None:
        self.scripts[f"GET {path}"] = list(replies)

    @property
    def last_request(self) -> Recorded:
        return self.requests[-1]

    @property
    def call_count(self) -> int:
        return len(self.requests)

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    def reply_for(self, request: Recorded) -> tuple[str, Reply]:
        """Record ``request``; the next reply of its key's script (its last one repeats)."""
        key = self.key(request)
        with self.lock:
            self.requests.append(request)
            self.served[key] += 1
            script = self.scripts.get(key) or [self.default]
            reply = script[min(self.served[key], len(script)) - 1]
        return key, reply if isinstance(reply, Reply) else reply(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the API does
    disable_nagle_algorithm = True  # headers and body are written apart: no 40 ms stall between
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test output is about the client."""

    def setup(self) -> None:
        super().setup()
        with self.server.api.lock:
            self.server.connections += 1
            self.connection_number = self.server.connections

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = Recorded(self.command, self.path, self.headers, body, self.connection_number)
        key, reply = self.server.api.reply_for(request)
        if reply.fault == "drop":
            self.wfile.write(b"HTTP/1.1 2")
            self.close_connection = True
            return
        time.sleep(reply.delay_s)
        try:
            self._write(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.server.api.hung_up[key] += 1
            self.close_connection = True

    def _write(self, reply: Reply) -> None:
        self.send_response(reply.status)
        if reply.content_type:
            self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        size = len(reply.body) + reply.pad + len(reply.suffix)
        if reply.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size + (10 if reply.fault == "broken-body" else 0)))
        self.end_headers()
        for chunk in self._chunks(reply):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if reply.chunked else chunk)
        if reply.fault == "broken-body" or reply.hang_up:
            self.close_connection = True
        elif reply.chunked:
            self.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def _chunks(reply: Reply) -> Iterator[bytes]:
        if reply.body:
            yield reply.body
        block = b"x" * 65_536
        for start in range(0, reply.pad, len(block)):
            yield block[: min(len(block), reply.pad - start)]
        if reply.suffix:
            yield reply.suffix

    do_GET = do_POST = do_PUT = do_DELETE = _answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: ScriptedApi
    connections = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: clients that hang up or refuse the certificate are what some tests script."""


def serve(
    key: Callable[[Recorded], str] = by_method_and_path,
    default: Reply | None = None,
    tls: ssl.SSLContext | None = None,
) -> Iterator[ScriptedApi]:
    """
    Run a scripted server on a free loopback port for the duration (a fixture's body).

    :param tls: serve HTTPS with this server context (its certificate must name 127.0.0.1).
    """
    server = _Server(("127.0.0.1", 0), _Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    host, port = server.server_address[:2]
    server.api = ScriptedApi(f"{'https' if tls else 'http'}://{host}:{port}", key, default)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
