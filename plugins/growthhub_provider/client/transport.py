"""
The client's HTTP: keep-alive HTTP/1.1 over the standard library's ``http.client``.

Why not requests: at 1,000 upserts/s over 100 locations its per-request machinery (session
merging, adapters, urllib3 pools, hooks, cookie jars) cost more client CPU than everything else
together, and the API needs none of it. Each worker thread keeps one connection per origin, so
nothing is pooled or locked per request. No redirects are followed (a 3xx is an unusable answer,
not a POST silently turned GET) and no cookies are kept (the API sets none).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import select
import socket
import ssl
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import certifi

from growthhub_provider.client.errors import (
    GrowthHubBrokenBody,
    GrowthHubConfigError,
    GrowthHubConnectionError,
    GrowthHubTimeout,
    GrowthHubTransportError,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

_log = logging.getLogger(__name__)
# An upsert answer is a few KB; a body past this comes from something broken (a proxy, a bug) and
# is cut, its connection dropped, rather than read into a worker's memory.
MAX_RESPONSE_BYTES = 1024 * 1024
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# A connection idle for less than this is reused unchecked (servers keep idle ones for seconds);
# one the server closed even so is caught by the send, and replaced.
_FRESH_S = 1.0
# Send on a reused connection that the server had closed meanwhile: these, before any answer byte.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


@dataclass
class Answer:
    """
    One HTTP answer, its body already read (capped and decoded).

    :param headers: looked up case-insensitively (:class:`Headers`).
    :param problem: what was wrong with the body (over the cap, undecodable), else ``None``.
    :param request_headers: the headers it answers, so a 401 tells which token it refused.
    """

    status_code: int
    reason: str
    headers: Mapping[str, str]
    content: bytes
    problem: str | None = None
    request_headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def encoding(self) -> str | None:
        """The ``charset`` of ``Content-Type``, if it names one."""
        for part in (self.headers.get("Content-Type") or "").split(";")[1:]:
            name, _, value = part.strip().partition("=")
            if name.lower() == "charset" and value:
                return value.strip("\"'")
        return None

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` when it is not."""
        return json.loads(self.content)


@dataclass(frozen=True)
class _Route:
    """Where a URL's requests go: the connection's key, whom to dial, the request target, headers."""

    key: tuple[str, str, int]
    target: str
    proxy: tuple[str, int] | None
    proxy_headers: dict[str, str]


def _keep_alive(sock: socket.socket) -> None:
    """TCP keepalive, so a NAT or firewall does not silently drop a connection idle between batches."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 120), ("TCP_KEEPINTVL", 30), ("TCP_KEEPCNT", 20)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class Headers(dict[str, str]):
    """
    Response headers by lower-cased name, looked up case-insensitively; repeated ones joined by
    ``", "`` (RFC 9110 5.3), which is what ``getheader`` answered too.
    """

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get_all(self, name: str, failobj: Any = None) -> Any:
        """What ``http.client.HTTPResponse.getheader`` asks of its message."""
        value = self.get(name)
        return failobj if value is None else [value]


def _parse_headers(lines: list[bytes]) -> Headers:
    """The header block's lines (as ``http.client`` read and bounded them) as :class:`Headers`;
    a line starting with white space continues the one before (obsolete line folding)."""
    headers = Headers()
    name = ""
    for raw in lines:
        line = raw.decode("iso-8859-1").rstrip("\r\n")
        if line[:1] in (" ", "\t"):
            if name:
                dict.__setitem__(headers, name, f"{dict.__getitem__(headers, name)} {line.strip()}")
            continue
        field, colon, value = line.partition(":")
        name = field.strip().lower()
        if not colon or not name:
            name = ""
            continue
        value = value.strip()
        if name in headers:
            value = f"{dict.__getitem__(headers, name)}, {value}"
        dict.__setitem__(headers, name, value)
    return headers


class _Response(http.client.HTTPResponse):
    """
    ``http.client``'s response, its headers read into :class:`Headers` instead of an
    ``email.message.Message``: the email parser cost ~40 µs an answer, an eighth of the client's
    CPU per upsert. The rest is ``HTTPResponse.begin`` as the standard library has it.
    """

    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()  # type: ignore[attr-defined]
            if status != http.client.CONTINUE:
                break
            http.client._read_headers(self.fp)  # type: ignore[attr-defined]  # a 100's headers
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = _parse_headers(http.client._read_headers(self.fp))  # type: ignore[assignment,attr-defined]
        self.chunked = (self.headers.get("transfer-encoding") or "").lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()  # type: ignore[attr-defined]
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            with contextlib.suppress(ValueError):
                self.length = int(length) if int(length) >= 0 else None
        if status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) or 100 <= status < 200:
            self.length = 0
        if self._method == "HEAD":  # type: ignore[attr-defined]
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


class _OneSend:
    """
    Connection behaviour shared by http and https: TCP keepalive, a request in one ``send``.

    ``http.client`` sends the headers and the body apart: two system calls, each letting go of the
    GIL, which among a hundred busy worker threads is what costs. ``idle_since`` tells
    :class:`Transport` when the connection last finished an answer.
    """

    sock: socket.socket
    _buffer: list[bytes]
    idle_since = 0.0
    response_class = _Response

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _keep_alive(self.sock)

    def _send_output(self, message_body: bytes | None = None, encode_chunked: bool = False) -> None:
        self._buffer.extend((b"", message_body or b""))
        message = b"\r\n".join(self._buffer)
        del self._buffer[:]
        self.send(message)  # type: ignore[attr-defined]


class _HTTPConnection(_OneSend, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_OneSend, http.client.HTTPSConnection):
    pass


_Connection = _HTTPConnection | _HTTPSConnection


def tls_context(verify: bool | str) -> ssl.SSLContext:
    """
    TLS as the ``verify`` setting says: ``True`` the certifi bundle (as requests used), a path that
    CA bundle (file) or directory, ``False`` no verification at all.
    """
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if verify is True:
        return ssl.create_default_context(cafile=certifi.where())
    if Path(verify).is_dir():
        return ssl.create_default_context(capath=verify)
    return ssl.create_default_context(cafile=verify)


@lru_cache(maxsize=64)
def _route(url: str, proxy_url: str | None) -> _Route:
    """
    How to send to ``url``: straight, through an HTTP proxy in absolute form (http), or through a
    CONNECT tunnel (https). Cached: the client sends to a handful of URLs, thousands of times.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise GrowthHubConfigError(f"Cannot send to {url!r}: not an http(s) URL")
    port = parts.port or (443 if scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    key = (scheme, parts.hostname, port)
    if proxy_url is None:
        return _Route(key, target, None, {})
    proxy = urlsplit(proxy_url if "://" in proxy_url else f"http://{proxy_url}")
    if proxy.scheme.lower() != "http" or not proxy.hostname:
        raise GrowthHubConfigError(
            f"Proxy {proxy.scheme}://{proxy.hostname} is not supported: use an http:// proxy"
        )
    headers = {}
    if proxy.username is not None:
        credentials = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
        headers["Proxy-Authorization"] = f"Basic {base64.b64encode(credentials.encode()).decode()}"
    return _Route(key, url if scheme == "http" else target, (proxy.hostname, proxy.port or 80), headers)


def _decoded(answer: Answer, encoding: str) -> None:
    """Decompress ``answer.content`` in place, at most MAX_RESPONSE_BYTES; else say why not."""
    decoder = zlib.decompressobj(_DECODERS[encoding])
    try:
        content = decoder.decompress(answer.content, MAX_RESPONSE_BYTES + 1)
    except zlib.error:
        if encoding != "deflate":
            answer.problem = f"body could not be decoded (Content-Encoding {encoding})"
            return
        try:  # some servers send raw deflate, without the zlib header: requests reads both
            decoder = zlib.decompressobj(-zlib.MAX_WBITS)
            content = decoder.decompress(answer.content, MAX_RESPONSE_BYTES + 1)
        except zlib.error:
            answer.problem = f"body could not be decoded (Content-Encoding {encoding})"
            return
    if len(content) > MAX_RESPONSE_BYTES or decoder.unconsumed_tail:
        answer.problem = f"body is over the {MAX_RESPONSE_BYTES}-byte limit"
        content = content[:MAX_RESPONSE_BYTES]
    answer.content = content


def _dropped(connection: _Connection) -> bool:
    """
    Whether the server closed an idle keep-alive connection: nothing is owed on it, so anything
    readable is its EOF (or a stray byte, as bad). One poll, instead of a wasted send.
    """
    poller = select.poll()
    poller.register(connection.sock, select.POLLIN)
    return bool(poller.poll(0))


class Transport:
    """
    Sends requests over keep-alive connections: one per request in flight, reused by any thread.

    A request takes the most recently used idle connection of its origin (so the few that stay
    busy stay warm and the rest age out at the server) and gives it back once the body is read.
    Idle connections sit in a deque per origin, whose ``append``/``pop`` are atomic: no lock per
    request, and worker threads may come and go without costing a connection each.

    :param timeout: seconds to connect, and to wait for each read.
    :param verify: TLS verification (see :func:`tls_context`).
    :param proxies: proxy URLs by scheme (``https``, ``http``, ``all``, or ``scheme://host``), as
        requests takes them; the caller read them from the environment once.
    """

    def __init__(self, *, timeout: float, verify: bool | str, proxies: Mapping[str, str]) -> None:
        self.timeout = timeout
        self.verify = verify
        self.proxies = dict(proxies)
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._tls_lock = threading.Lock()

    def _proxy_for(self, url: str) -> str | None:
        """The proxy of ``url``, chosen as requests' ``select_proxy`` does (most specific first)."""
        if not self.proxies:
            return None
        parts = urlsplit(url)
        for key in (f"{parts.scheme}://{parts.hostname}", parts.scheme, f"all://{parts.hostname}", "all"):
            if proxy := self.proxies.get(key):
                return proxy
        return None

    def _tls_context(self) -> ssl.SSLContext:
        """Built once, on the first https request (loading a CA bundle takes milliseconds)."""
        with self._tls_lock:
            if self._tls is None:
                self._tls = tls_context(self.verify)
            return self._tls

    def _checkout(self, route: _Route) -> _Connection:
        """An idle connection of the route's origin that the server has not closed, else a new one."""
        idle = self._idle.get(route.key)
        while idle:
            try:
                connection = idle.pop()
            except IndexError:  # another thread took the last one
                break
            if connection.sock is not None and (
                time.monotonic() - connection.idle_since < _FRESH_S or not _dropped(connection)
            ):
                return connection
            connection.close()
        return self._new_connection(route)

    def _checkin(self, route: _Route, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.setdefault(route.key, deque()).append(connection)

    def _new_connection(self, route: _Route) -> _Connection:
        scheme, host, port = route.key
        dial_host, dial_port = route.proxy or (host, port)
        if scheme == "http":
            return _HTTPConnection(dial_host, dial_port, timeout=self.timeout)
        connection = _HTTPSConnection(dial_host, dial_port, timeout=self.timeout, context=self._tls_context())
        if route.proxy is not None:
            connection.set_tunnel(host, port, headers=route.proxy_headers)
        return connection

    def request(self, method: str, url: str, headers: dict[str, str], body: bytes | None = None) -> Answer:
        """
        Send one request and read its answer (body capped at MAX_RESPONSE_BYTES, then decoded).

        A reused connection that the server closed meanwhile is replaced once, transparently.

        :raises GrowthHubTimeout: no connection or no answer within the timeout.
        :raises GrowthHubConnectionError: refused, reset, TLS failure, a garbled answer.
        :raises GrowthHubBrokenBody: the connection broke in the middle of the body.
        """
        route = _route(url, self._proxy_for(url))
        if route.proxy is not None and route.key[0] == "http" and route.proxy_headers:
            headers = {**headers, **route.proxy_headers}
        connection = self._checkout(route)
        response = None
        try:
            connection, response = self._exchange(route, connection, method, headers, body)
            answer = self._read(response, headers)
        except BaseException as e:
            connection.close()
            if isinstance(e, (OSError, http.client.HTTPException)):
                raise _transport_error(e, in_body=response is not None) from e
            raise
        if answer.problem:  # the rest of a huge or broken body is not drained: the connection goes
            connection.close()
        else:
            self._checkin(route, connection)
        if _log.isEnabledFor(logging.DEBUG):  # the request line only: headers and bodies hold secrets
            _log.debug('"%s %s" %s, %d bytes', method, route.target, answer.status_code, len(answer.content))
        return answer

    def _exchange(
        self,
        route: _Route,
        connection: _Connection,
        method: str,
        headers: dict[str, str],
        body: bytes | None,
    ) -> tuple[_Connection, http.client.HTTPResponse]:
        """Request and status line; once more on a new connection if a reused one was stale."""
        reused = connection.sock is not None
        try:
            connection.request(method, route.target, body, headers)
            return connection, connection.getresponse()
        except _STALE:
            if not reused:
                raise
        connection.close()
        connection = self._new_connection(route)
        connection.request(method, route.target, body, headers)
        return connection, connection.getresponse()

    @staticmethod
    def _read(response: http.client.HTTPResponse, headers: Mapping[str, str]) -> Answer:
        """The answer with its body: at most MAX_RESPONSE_BYTES read, decoded if compressed."""
        answer = Answer(response.status, response.reason, response.msg, b"", request_headers=headers)
        declared = response.getheader("Content-Length", "")
        if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            answer.problem = f"body of {int(declared)} bytes is over the {MAX_RESPONSE_BYTES}-byte limit"
            return answer
        # A declared length is read whole, so a body cut short raises (read(n) would return it short).
        content = response.read() if declared.isdigit() else response.read(MAX_RESPONSE_BYTES + 1)
        if len(content) > MAX_RESPONSE_BYTES:
            answer.problem = f"body is over the {MAX_RESPONSE_BYTES}-byte limit"
            content = content[:MAX_RESPONSE_BYTES]
        answer.content = content
        encoding = (response.getheader("Content-Encoding") or "").strip().lower()
        if encoding in _DECODERS and content and not answer.problem:
            _decoded(answer, encoding)
        return answer

    def close(self) -> None:
        """Close the idle connections (a later request opens new ones)."""
        for idle in list(self._idle.values()):
            while idle:
                with contextlib.suppress(IndexError):
                    idle.pop().close()


def _transport_error(error: OSError | http.client.HTTPException, *, in_body: bool) -> GrowthHubTransportError:
    """The client's own error for what ``http.client``, ``ssl`` or the socket raised."""
    if isinstance(error, TimeoutError):
        return GrowthHubTimeout(f"no answer within the timeout ({error})")
    if in_body:
        return GrowthHubBrokenBody(f"connection broken in the body ({type(error).__name__}: {error})")
    return GrowthHubConnectionError(f"{type(error).__name__}: {error}")
