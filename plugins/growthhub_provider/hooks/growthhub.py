"""
GrowthHub hook: the project's only way to talk to the GrowthHub (HighLevel / LeadConnector) API.

It owns the HTTP contract: bearer auth (Private Integration Token, access token or OAuth with
refresh-token rotation), the ``Version`` header, client-side rate limiting, tenacity retries,
error classification and concurrent, identity-serialised upserts. It knows nothing of warehouses.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import quote

import requests
import tenacity
from airflow.providers.common.compat.sdk import AirflowException
from airflow.providers.http.hooks.http import HttpHook
from airflow.sdk.log import mask_secret, redact
from airflow.utils.strings import to_boolean
from requests_toolbelt.adapters.socket_options import TCPKeepAliveAdapter

from growthhub_provider.hooks._ratelimit import RateLimiter
from growthhub_provider.masking import mask_pii

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from concurrent.futures import Future

    from airflow.sdk import Connection

DEFAULT_API_VERSION = "2023-02-21"
# Tuned with bench/bench_hook.py: enough requests in flight to hide ~50 ms of latency.
DEFAULT_MAX_WORKERS = 64
UPSERT_ENDPOINT = "/contacts/upsert"
OAUTH_ENDPOINT = "/oauth/token"
_CONNECTION_TEST_CONTACT = "growthhub-connection-test"
# An upsert answer is a few KB; a body past this comes from something broken (a proxy, a bug) and
# is cut, its connection dropped, rather than read into a worker's memory.
MAX_RESPONSE_BYTES = 1024 * 1024
# Bodies and API messages quoted in errors, outcomes and logs are cut to this many characters.
MAX_MESSAGE_CHARS = 500
MAX_MESSAGES = 20

OutcomeStatus = Literal["created", "updated", "rejected", "failed", "skipped"]

# One limiter per (base URL, location) in this process: the server's quota is per location.
_LIMITERS: dict[tuple[str, str | None], RateLimiter] = {}
_LIMITERS_LOCK = threading.Lock()


class GrowthHubError(AirflowException):
    """Base of the errors the GrowthHub hook raises."""


class GrowthHubAuthError(GrowthHubError):
    """401 after a refresh attempt, or 403: retrying cannot help, the task must fail."""


class GrowthHubConfigError(GrowthHubAuthError):
    """
    400 about the request rather than the payload (the ``Version`` header): every row would fail.

    A subclass of :class:`GrowthHubAuthError` so callers treat it alike: fail the task, fix the
    connection, instead of quarantining a whole batch of good rows.
    """


class GrowthHubNotFound(GrowthHubError):
    """404: the contact does not exist (or belongs to another location)."""


class GrowthHubRejected(GrowthHubError):
    """
    400/422: the API refused this payload; sending it again would be refused again.

    :param status: HTTP status code.
    :param messages: the API's messages, one per failing field for 422.
    """

    def __init__(self, status: int, messages: list[str]) -> None:
        super().__init__(f"{status}: {mask_pii('; '.join(messages))}")
        self.status = status
        self.messages = messages


class GrowthHubTransientError(GrowthHubError):
    """429 or 5xx: worth retrying after a pause."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {mask_pii(message)}")
        self.status = status
        self.message = message
        self.throttled = status == 429


class GrowthHubBadResponse(GrowthHubError):
    """
    A 2xx answer whose body is unusable: not JSON, not an object, no ``contact.id``, empty or huge.

    Whether the write happened is unknown, so it is not retried within the batch: the row comes
    back ``failed`` and a later run's (idempotent) upsert settles it.

    :param status: HTTP status code.
    :param message: what was wrong, with at most :data:`MAX_MESSAGE_CHARS` of the body.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: unusable response: {mask_pii(message)}")
        self.status = status
        self.message = message


class _DailyQuotaReached(Exception):
    """The known daily quota fell to the caller's reserve: the row is not sent."""


@dataclass(frozen=True)
class UpsertResult:
    """What one successful upsert returned."""

    contact_id: str
    new: bool
    trace_id: str | None


@dataclass(frozen=True)
class UpsertOutcome:
    """
    The fate of one row of :meth:`GrowthHubHook.upsert_contacts`, carrying the caller's key.

    ``messages`` holds the API's list for ``rejected`` and the last error for ``failed``.
    """

    key: str
    status: OutcomeStatus
    contact_id: str | None = None
    http_status: int | None = None
    messages: list[str] = field(default_factory=list)
    trace_id: str | None = None
    attempts: int = 0


@dataclass(frozen=True)
class BatchStats:
    """Counters of one :meth:`GrowthHubHook.upsert_contacts` call (also logged as one line)."""

    sent: int
    created: int
    updated: int
    rejected: int
    failed: int
    skipped: int
    retried: int
    throttled: int
    elapsed_s: float

    @property
    def rows_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


def identity_keys(payload: dict[str, Any]) -> frozenset[str]:
    """
    The identities the CRM matches duplicates on: normalised email and phone digits.

    Two rows sharing any of these must not be in flight together, or the CRM can race into
    creating the same person twice.
    """
    keys = set()
    if email := str(payload.get("email") or "").strip().lower():
        keys.add(f"email:{email}")
    if phone := re.sub(r"\D", "", str(payload.get("phone") or "")):
        keys.add(f"phone:{phone}")
    return frozenset(keys)


_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s\"'<>,;]+")


def _short(text: str) -> str:
    """One printable line of at most MAX_MESSAGE_CHARS, with registered secrets and bearer tokens out."""
    line = "".join(c if c.isprintable() else " " for c in " ".join(text[: 4 * MAX_MESSAGE_CHARS].split()))
    line = _BEARER_RE.sub(r"\1***", str(redact(line)))
    return line if len(line) <= MAX_MESSAGE_CHARS else f"{line[: MAX_MESSAGE_CHARS - 3]}..."


def _excerpt(response: requests.Response) -> str:
    """The start of a body for an error message, decoded leniently (never the whole body)."""
    head = response.content[: 4 * MAX_MESSAGE_CHARS]
    try:
        text = head.decode(response.encoding or "utf-8", errors="replace")
    except LookupError:
        text = head.decode("utf-8", errors="replace")
    return _short(text)


def _body_kind(response: requests.Response) -> str:
    return f"{response.headers.get('Content-Type') or 'no Content-Type'}, {len(response.content)} bytes"


def _json(response: requests.Response) -> Any:
    """The body as JSON; ``ValueError`` when it is not (``RecursionError`` too: absurdly deep JSON)."""
    try:
        return response.json()
    except RecursionError as e:
        raise ValueError("JSON nested too deeply") from e


def _api_messages(response: requests.Response) -> list[str]:
    """The messages of an error answer: the API's list, else the reason and the body's start."""
    fallback = response.reason or f"HTTP {response.status_code}"
    try:
        body = _json(response)
    except ValueError:
        excerpt = _excerpt(response)
        return [_short(f"{fallback}: {excerpt}") if excerpt else fallback]
    # API errors carry "message"; OAuth errors (RFC 6749) carry "error" and "error_description".
    message = (
        body.get("message") or body.get("error_description") or body.get("error")
        if isinstance(body, dict)
        else None
    )
    if isinstance(message, list):
        messages = [_short(str(m)) for m in message[:MAX_MESSAGES]]
        if len(message) > MAX_MESSAGES:
            messages.append(f"... and {len(message) - MAX_MESSAGES} more")
        return messages
    if message:
        return [_short(str(message))]
    return [fallback]


def _read_body(response: requests.Response) -> str | None:
    """
    Read a streamed body into ``response.content``, at most :data:`MAX_RESPONSE_BYTES` (decoded).

    Past the limit, or when the body cannot be decompressed, the connection is dropped instead of
    drained. Returns what was wrong with the body, or ``None``.
    """
    chunks: list[bytes] = []
    size = 0
    problem = None
    declared = response.headers.get("Content-Length", "")
    try:
        if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            problem = f"body of {int(declared)} bytes is over the {MAX_RESPONSE_BYTES}-byte limit"
        else:
            for chunk in response.iter_content(chunk_size=64 * 1024):
                chunks.append(chunk[: MAX_RESPONSE_BYTES - size])
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    problem = f"body is over the {MAX_RESPONSE_BYTES}-byte limit"
                    break
    except requests.exceptions.ContentDecodingError:
        problem = f"body could not be decoded (Content-Encoding {response.headers.get('Content-Encoding')})"
    if problem:
        response.close()
    # What requests itself does when it reads a body (stream=False): later .json()/.text use it.
    response._content = b"".join(chunks)
    response._content_consumed = True
    return problem


def _json_object(response: requests.Response) -> dict[str, Any]:
    """The body of a 2xx answer as a JSON object, else :class:`GrowthHubBadResponse`."""
    status = response.status_code
    if not response.content:
        raise GrowthHubBadResponse(status, f"empty body ({_body_kind(response)})")
    try:
        data = _json(response)
    except ValueError:
        raise GrowthHubBadResponse(
            status, f"body is not JSON ({_body_kind(response)}): {_excerpt(response)}"
        ) from None
    if not isinstance(data, dict):
        raise GrowthHubBadResponse(status, f"body is a JSON {type(data).__name__}, not an object")
    return data


def _contact_in(data: dict[str, Any], status: int) -> dict[str, Any]:
    """``data["contact"]`` with a non-empty string ``id``; errors name keys only (values are PII)."""
    contact = data.get("contact")
    if not isinstance(contact, dict) or not isinstance(contact.get("id"), str) or not contact["id"]:
        keys = sorted(contact) if isinstance(contact, dict) else sorted(data)
        where = "contact" if isinstance(contact, dict) else "body"
        detail = f"no contact.id in the JSON ({where} keys: {', '.join(keys)})"
        raise GrowthHubBadResponse(status, _short(detail))
    return contact


class RefreshTokenStore(Protocol):
    """
    Where rotated OAuth refresh tokens live between tasks (each refresh spends the previous one).

    Airflow 3 tasks cannot write connections (the Task SDK only reads them through the Execution
    API; apache/airflow#53520), so the token cannot go back into the connection from a task. Pass
    your own store to :class:`GrowthHubHook` to keep it elsewhere (e.g. a secrets manager).
    The ``seed`` is the refresh token of the connection: when an admin re-authorises and puts
    a new one there, stored descendants of the old seed are ignored.
    """

    def current(self, conn_id: str, seed: str) -> str:
        """Return the refresh token to spend next."""

    def save(self, conn_id: str, seed: str, refresh_token: str) -> None:
        """Keep the refresh token the server just issued."""

    def locked(self, conn_id: str) -> contextlib.AbstractContextManager[None]:
        """Hold while spending a token, so two processes never spend the same one."""


class FileRefreshTokenStore:
    """
    Refresh tokens in a JSON file readable by its owner only (0600), locked with ``flock``.

    Put the file on a volume every worker shares (connection extra ``refresh_token_file``).

    :param path: the file; ``<path>.lock`` serialises refreshes across processes.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @staticmethod
    def _fingerprint(seed: str) -> str:
        return hashlib.sha256(seed.encode()).hexdigest()

    def current(self, conn_id: str, seed: str) -> str:
        try:
            stored = json.loads(self.path.read_text()).get(conn_id, {})
        except FileNotFoundError:
            return seed
        if stored.get("seed_sha256") == self._fingerprint(seed) and stored.get("refresh_token"):
            return str(stored["refresh_token"])
        return seed

    def save(self, conn_id: str, seed: str, refresh_token: str) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            data = {}
        data[conn_id] = {"seed_sha256": self._fingerprint(seed), "refresh_token": refresh_token}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def locked(self, conn_id: str) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


_TRUE = {"true", "t", "yes", "y", "on", "1"}
_FALSE = {"false", "f", "no", "n", "off", "0"}


def tls_verify(value: Any) -> bool | str:
    """
    The ``verify`` extra as requests takes it: ``True`` (the default), ``False``, or a CA bundle path.

    A path keeps verification on against that bundle. Anything else fails here, closed, rather
    than quietly turning verification off.
    """
    if value is None or isinstance(value, bool):
        return value is not False
    text = str(value).strip()
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    path = Path(text).expanduser()
    if not path.exists():
        raise GrowthHubConfigError(
            f"Connection extra verify={text!r} is neither true/false nor an existing CA bundle path"
        )
    return str(path)


class _BearerAuth(requests.auth.AuthBase):
    """Reads the hook's current access token per request, so a refresh needs no new session."""

    def __init__(self, hook: GrowthHubHook) -> None:
        self._hook = hook

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._hook._access_token or ''}"
        return request


def _no_auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request


class _Backoff:
    """Exponential backoff with jitter, except after a 429: the limiter already holds sends back."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._exponential = tenacity.wait_exponential_jitter(
            multiplier=initial_s, max=max_s, jitter=initial_s
        )

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, GrowthHubTransientError) and error.throttled:
            return 0.0
        return self._exponential(retry_state)


@dataclass
class _Row:
    key: str
    payload: dict[str, Any]
    identities: frozenset[str]


class GrowthHubHook(HttpHook):
    """
    Upsert contacts into GrowthHub, fast and within the API's limits.

    Connection (``conn_type`` ``growthhub``): host is the base URL, password the Private
    Integration Token or access token; extras ``location_id``, ``api_version``, ``client_id``,
    ``client_secret``, ``refresh_token`` (OAuth), ``refresh_token_file``, ``rate_limit_burst``,
    ``rate_limit_interval_ms``, ``rate_limit_daily``, ``max_workers``, ``timeout``, ``verify``,
    ``log_pii``. ``verify`` is true unless the extra says false; a path keeps it on against that
    CA bundle (see :func:`tls_verify`).

    Bad answers, and what they become (``upsert_contacts`` outcome in brackets):

    - 429, 5xx, whatever the body (JSON, a proxy's HTML page, empty, huge), timeouts, dropped
      connections: :class:`GrowthHubTransientError` etc., retried (``failed`` once retries run out).
    - 2xx whose body is empty, not JSON (e.g. a 200 ``text/html`` page), JSON but not an object,
      without a string ``contact.id``, undecodable (``Content-Encoding``) or over
      :data:`MAX_RESPONSE_BYTES`: :class:`GrowthHubBadResponse`, not retried (``failed``): the
      write may or may not have happened; the caller defers the row and a later idempotent upsert
      settles it. Never ``rejected``: nothing says the payload is wrong.
    - 400/422 with a non-JSON body: :class:`GrowthHubRejected` (``rejected``) with the reason and
      the start of the body as its message; 401/403 with any body: :class:`GrowthHubAuthError`.
    - An unusable 200 from ``/oauth/token``: :class:`GrowthHubAuthError` (the task fails once
      instead of every row spending a refresh); its message never quotes that body.

    Bodies are read at most :data:`MAX_RESPONSE_BYTES` (the connection is dropped past that);
    messages quote at most :data:`MAX_MESSAGE_CHARS` characters of a body and
    :data:`MAX_MESSAGES` API messages, with registered secrets and bearer tokens redacted, and
    emails/phones masked in logs and exception text (unless ``log_pii``).

    :param growthhub_conn_id: the connection to use.
    :param max_workers: concurrent requests of :meth:`upsert_contacts` (default: connection extra,
        else ``DEFAULT_MAX_WORKERS``).
    :param max_attempts: attempts per row for transient errors (429, 5xx, timeouts, dropped connections).
    :param max_retry_seconds: give up retrying a row after this long.
    :param backoff_initial_s: first backoff; doubles per attempt, plus jitter.
    :param backoff_max_s: longest single backoff.
    :param token_store: where rotated refresh tokens go (default: a 0600 file, see ``refresh_token_file``).
    """

    conn_name_attr = "growthhub_conn_id"
    default_conn_name = "growthhub_default"
    conn_type = "growthhub"
    hook_name = "GrowthHub"

    def __init__(
        self,
        growthhub_conn_id: str = default_conn_name,
        *,
        max_workers: int | None = None,
        max_attempts: int = 6,
        max_retry_seconds: float = 120.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        token_store: RefreshTokenStore | None = None,
    ) -> None:
        super().__init__(method="POST", http_conn_id=growthhub_conn_id)
        self.growthhub_conn_id = growthhub_conn_id
        self._max_workers = max_workers
        self.max_attempts = max_attempts
        self.max_retry_seconds = max_retry_seconds
        self._backoff = _Backoff(backoff_initial_s, backoff_max_s)
        self._token_store = token_store
        self.last_batch_stats: BatchStats | None = None
        self._session: requests.Session | None = None
        self._session_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._access_token: str | None = None
        self._access_expires_at: float | None = None
        self._auth_failure: str | None = None
        self._limiter: RateLimiter
        self._throttled = 0
        self._throttled_lock = threading.Lock()

    # -- configuration from the connection ------------------------------------------------------

    @cached_property
    def connection(self) -> Connection:
        return self.get_connection(self.growthhub_conn_id)

    @cached_property
    def extras(self) -> dict[str, Any]:
        """Connection extras; form fields saved as ``extra__growthhub__<name>`` read as ``<name>``."""
        prefix = f"extra__{self.conn_type}__"
        return {k.removeprefix(prefix): v for k, v in self.connection.extra_dejson.items() if v != ""}

    @property
    def location_id(self) -> str | None:
        """The connection's location, filled into payloads that carry none."""
        return self.extras.get("location_id")

    @property
    def api_version(self) -> str:
        return str(self.extras.get("api_version") or DEFAULT_API_VERSION)

    @property
    def max_workers(self) -> int:
        return int(self._max_workers or self.extras.get("max_workers") or DEFAULT_MAX_WORKERS)

    @property
    def timeout(self) -> float:
        return float(self.extras.get("timeout") or 30)

    @property
    def uses_oauth(self) -> bool:
        return all(self.extras.get(k) for k in ("client_id", "client_secret", "refresh_token"))

    @property
    def daily_remaining(self) -> int | None:
        """Daily quota left: the server's last figure less what went out since (at first: the limit)."""
        return self.limiter.daily_remaining

    @property
    def limiter(self) -> RateLimiter:
        """The limiter shared by all hooks of this process that send to the same location."""
        self.get_conn()
        return self._limiter

    @cached_property
    def token_store(self) -> RefreshTokenStore:
        if self._token_store is not None:
            return self._token_store
        default = Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "growthhub-tokens.json"
        return FileRefreshTokenStore(self.extras.get("refresh_token_file") or default)

    def _log_text(self, text: str) -> str:
        return text if to_boolean(str(self.extras.get("log_pii", False))) else mask_pii(text)

    # -- session ----------------------------------------------------------------------------------

    def get_conn(
        self, headers: dict[Any, Any] | None = None, extra_options: dict[str, Any] | None = None
    ) -> requests.Session:
        """
        Build once and cache the session every request and worker thread shares.

        Unlike ``HttpHook.get_conn``, connection extras never become headers: they hold secrets.
        The session streams (``stream=True``) so the hook can cap how much of a body it reads;
        callers using the session directly get lazily read bodies, which ``.json()`` still reads.

        :param headers: extra headers for every later request of this hook.
        :param extra_options: ignored; options come from the connection extras.
        """
        with self._session_lock:
            if self._session is None:
                conn = self.connection
                self._set_base_url(conn)
                for secret in (
                    conn.password,
                    self.extras.get("client_secret"),
                    self.extras.get("refresh_token"),
                ):
                    if secret:
                        mask_secret(secret)
                self._access_token = conn.password or None
                self.adapter = TCPKeepAliveAdapter(
                    idle=120, count=20, interval=30, pool_connections=2, pool_maxsize=self.max_workers
                )
                session = requests.Session()
                session.auth = _BearerAuth(self)
                session.verify = tls_verify(self.extras.get("verify"))
                if session.verify is False:
                    self.log.warning(
                        "TLS certificate verification is off for %s (extra verify=false)",
                        self.growthhub_conn_id,
                    )
                # Bodies are read by _read_body, which caps their size.
                session.stream = True
                if to_boolean(str(self.extras.get("trust_env", True))):
                    # Read proxy and CA settings from the environment once: requests would scan
                    # os.environ twice per request, a fifth of the client's CPU per upsert.
                    session.proxies.update(requests.utils.get_environ_proxies(self.base_url))
                    if session.verify is True:
                        session.verify = (
                            os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
                        )
                session.trust_env = False
                session.headers.update(
                    {
                        "Accept": "application/json",
                        "Content-Type": "application/json",
                        "Version": self.api_version,
                    }
                )
                self._configure_session_from_mount_adapters(session)
                self.merged_extra = {"timeout": self.timeout}
                self._limiter = self._shared_limiter()
                self._session = session
            if headers:
                self._session.headers.update(headers)
            return self._session

    def _shared_limiter(self) -> RateLimiter:
        explicit = self.extras.get("rate_limit_burst")
        with _LIMITERS_LOCK:
            key = (self.base_url, self.location_id)
            if key not in _LIMITERS:
                _LIMITERS[key] = RateLimiter(
                    burst=int(explicit or 100),
                    interval_s=int(self.extras.get("rate_limit_interval_ms") or 10_000) / 1000,
                    burst_cap=int(explicit) if explicit else None,
                    daily=int(self.extras.get("rate_limit_daily") or 200_000),
                )
            return _LIMITERS[key]

    # -- auth -------------------------------------------------------------------------------------

    def _ensure_access_token(self) -> None:
        token = self._access_token
        expired = self._access_expires_at is not None and time.monotonic() >= self._access_expires_at
        if self.uses_oauth and (token is None or expired):
            self._refresh_access_token(stale=token)
        elif not self.uses_oauth and token is None:
            raise GrowthHubAuthError(
                f"Connection {self.growthhub_conn_id!r} has neither a token nor an OAuth client"
            )

    def _refresh_access_token(self, stale: str | None) -> None:
        """Trade the stored refresh token for a new pair; once, however many threads saw it stale."""
        self.get_conn()
        with self._refresh_lock:
            if self._auth_failure:
                raise GrowthHubAuthError(self._auth_failure)
            if self._access_token != stale:
                return
            seed = str(self.extras["refresh_token"])
            with self.token_store.locked(self.growthhub_conn_id):
                refresh_token = self.token_store.current(self.growthhub_conn_id, seed)
                response = self.get_conn().post(
                    self.url_from_endpoint(OAUTH_ENDPOINT),
                    data={
                        "grant_type": "refresh_token",
                        "client_id": self.extras["client_id"],
                        "client_secret": self.extras["client_secret"],
                        "refresh_token": refresh_token,
                        "user_type": "Location",
                    },
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                    auth=_no_auth,
                    timeout=self.timeout,
                )
                problem = _read_body(response)
                if response.status_code == 429 or response.status_code >= 500:
                    # The token was not spent: the row's retry will try the refresh again.
                    raise GrowthHubTransientError(response.status_code, "OAuth refresh failed")
                if response.status_code != 200:
                    self._auth_failure = (
                        f"OAuth refresh for {self.growthhub_conn_id!r} failed: {response.status_code} "
                        f"{'; '.join(_api_messages(response))}"
                    )
                    raise GrowthHubAuthError(self._auth_failure)
                body = self._oauth_body(response, problem)
                mask_secret(body["access_token"])
                if new_refresh_token := body.get("refresh_token"):
                    mask_secret(new_refresh_token)
                    self.token_store.save(self.growthhub_conn_id, seed, new_refresh_token)
            if expires_in := body.get("expires_in"):
                expires_in = float(expires_in)
                self._access_expires_at = time.monotonic() + expires_in - min(60.0, expires_in / 10)
            self._access_token = body["access_token"]
            self.log.info("Refreshed the OAuth access token of %s", self.growthhub_conn_id)

    def _oauth_body(self, response: requests.Response, problem: str | None) -> dict[str, Any]:
        """
        The token pair of a 200 refresh answer; an unusable one fails the task (auth error).

        The server may have spent the refresh token, and every row would try again: so fail once,
        clearly. The message never quotes this body: it would hold the new tokens.
        """
        try:
            if problem:
                raise GrowthHubBadResponse(response.status_code, problem)
            body = _json_object(response)
        except GrowthHubBadResponse:
            detail = problem or f"not a JSON object ({_body_kind(response)})"
        else:
            token = body.get("access_token")
            if isinstance(token, str) and token:
                return body
            detail = f"no access_token in the JSON ({_body_kind(response)})"
        self._auth_failure = (
            f"OAuth refresh for {self.growthhub_conn_id!r} answered {response.status_code} with an "
            f"unusable body: {detail}. The refresh token may be spent: if the next try says "
            "invalid_grant, re-authorise the connection"
        )
        raise GrowthHubAuthError(self._auth_failure)

    # -- one request ------------------------------------------------------------------------------

    def _send(
        self, method: str, endpoint: str, body: dict[str, Any] | None, daily_reserve: int | None
    ) -> requests.Response:
        session = self.get_conn()
        if not self.limiter.acquire(daily_reserve):
            raise _DailyQuotaReached
        try:
            request = session.prepare_request(
                requests.Request(method, self.url_from_endpoint(endpoint), json=body)
            )
            response = self.run_and_check(session, request, {"check_response": False, **self.merged_extra})
            problem = _read_body(response)
        except BaseException:
            self.limiter.release()
            raise
        throttled = response.status_code == 429
        if throttled:
            with self._throttled_lock:
                self._throttled += 1
        self.limiter.release(response.headers, throttled=throttled)
        if problem and response.status_code < 400:
            raise GrowthHubBadResponse(response.status_code, problem)
        return response

    def _call(
        self, method: str, endpoint: str, body: dict[str, Any] | None = None, daily_reserve: int | None = None
    ) -> requests.Response:
        """
        Send one request; on a 401 with OAuth, refresh once and send again.

        The first auth failure is remembered, so the other worker threads fail at once instead
        of each spending a request (and a refresh) to learn the same thing.
        """
        self.get_conn()
        if self._auth_failure:
            raise GrowthHubAuthError(self._auth_failure)
        try:
            self._ensure_access_token()
            response = self._send(method, endpoint, body, daily_reserve)
            if response.status_code == 401 and self.uses_oauth:
                used = str(response.request.headers.get("Authorization", "")).removeprefix("Bearer ")
                self._refresh_access_token(stale=used)
                if self._auth_failure:
                    raise GrowthHubAuthError(self._auth_failure)
                response = self._send(method, endpoint, body, None)
            self._raise_for_status(response)
        except GrowthHubAuthError as e:
            self._auth_failure = str(e)
            raise
        return response

    @staticmethod
    def _raise_for_status(response: requests.Response) -> None:
        status = response.status_code
        if status < 400:
            return
        messages = _api_messages(response)
        joined = _short("; ".join(messages))
        if status in (401, 403):
            raise GrowthHubAuthError(f"{status}: {joined}")
        if status == 400 and any("version" in m.lower() for m in messages):
            raise GrowthHubConfigError(f"400: {joined} (check the connection's api_version)")
        if status == 404:
            raise GrowthHubNotFound(f"404: {joined}")
        if status == 429 or status >= 500:
            raise GrowthHubTransientError(status, joined)
        raise GrowthHubRejected(status, messages)

    def _retrying(self, abort: threading.Event | None = None) -> tenacity.Retrying:
        stop = tenacity.stop_after_attempt(self.max_attempts) | tenacity.stop_after_delay(
            self.max_retry_seconds
        )
        if abort is not None:
            stop = stop | (lambda _: abort.is_set())
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(
                (
                    GrowthHubTransientError,
                    requests.ConnectionError,
                    requests.Timeout,
                    requests.exceptions.ChunkedEncodingError,
                )
            ),
            stop=stop,
            wait=self._backoff,
            reraise=True,
        )

    def _with_location(self, payload: dict[str, Any]) -> dict[str, Any]:
        if payload.get("locationId") or not self.location_id:
            return payload
        return {**payload, "locationId": self.location_id}

    # -- public API -------------------------------------------------------------------------------

    def upsert_contact(self, payload: dict[str, Any]) -> UpsertResult:
        """
        Create or update one contact, retrying transient errors.

        :raises GrowthHubRejected: 400/422, with the API's messages.
        :raises GrowthHubAuthError: 401 after one refresh attempt, or 403.
        :raises GrowthHubTransientError: 429/5xx still failing after the retries.
        :raises GrowthHubBadResponse: a 2xx whose body is unusable (see the class docstring).
        """
        body = self._with_location(payload)
        response = self._retrying()(self._call, "POST", UPSERT_ENDPOINT, body)
        return self._upsert_result(response)

    @staticmethod
    def _upsert_result(response: requests.Response) -> UpsertResult:
        data = _json_object(response)
        trace_id = data.get("traceId")
        return UpsertResult(
            contact_id=_contact_in(data, response.status_code)["id"],
            new=bool(data.get("new")),
            trace_id=trace_id if isinstance(trace_id, str) else None,
        )

    def get_contact(self, contact_id: str) -> dict[str, Any]:
        """
        Fetch one contact.

        :raises GrowthHubNotFound: unknown id, or a contact of another location.
        """
        response = self._retrying()(self._call, "GET", f"/contacts/{quote(contact_id, safe='')}")
        return _contact_in(_json_object(response), response.status_code)

    def test_connection(self) -> tuple[bool, str]:
        """Check base URL, token and Version by fetching a contact that does not exist (404 = fine)."""
        try:
            self._call("GET", f"/contacts/{_CONNECTION_TEST_CONTACT}")
        except GrowthHubNotFound:
            pass
        except (GrowthHubError, requests.RequestException) as e:
            return False, str(e)
        return True, f"Connected to {self.base_url} (API version {self.api_version})"

    def _upsert_row(self, row: _Row, daily_reserve: int, abort: threading.Event) -> UpsertOutcome:
        attempts = 0

        def attempt() -> requests.Response:
            nonlocal attempts
            attempts += 1
            # The reserve only gates a row's first send; a retry finishes what was started.
            return self._call("POST", UPSERT_ENDPOINT, row.payload, daily_reserve if attempts == 1 else None)

        try:
            result = self._upsert_result(self._retrying(abort)(attempt))
        except _DailyQuotaReached:
            return UpsertOutcome(row.key, "skipped")
        except GrowthHubRejected as e:
            return UpsertOutcome(
                row.key, "rejected", http_status=e.status, messages=e.messages, attempts=attempts
            )
        except GrowthHubTransientError as e:
            return UpsertOutcome(
                row.key,
                "failed",
                http_status=e.status,
                messages=[f"{e.status}: {e.message}"],
                attempts=attempts,
            )
        except GrowthHubBadResponse as e:
            return UpsertOutcome(
                row.key,
                "failed",
                http_status=e.status,
                messages=[f"{e.status}: unusable response: {e.message}"],
                attempts=attempts,
            )
        except (requests.RequestException, GrowthHubNotFound) as e:
            return UpsertOutcome(
                row.key, "failed", messages=[_short(f"{type(e).__name__}: {e}")], attempts=attempts
            )
        status: OutcomeStatus = "created" if result.new else "updated"
        return UpsertOutcome(row.key, status, result.contact_id, 200, [], result.trace_id, attempts)

    def upsert_contacts(
        self, rows: Iterable[tuple[str, dict[str, Any]]], *, daily_reserve: int = 0
    ) -> Iterator[UpsertOutcome]:
        """
        Upsert many contacts concurrently; yield one outcome per row as soon as it is known.

        Rows sharing an identity (normalised email or phone) go out one at a time in input order,
        so the CRM cannot race into duplicates. At most ``4 * max_workers`` rows are held in
        memory, whatever the size of ``rows``. Stats of the batch land in :attr:`last_batch_stats`.

        :param rows: ``(caller's row key, payload)`` pairs.
        :param daily_reserve: once the known daily quota is down to this, the remaining rows come
            back ``skipped`` without being sent, so a later run can resume.
        :raises GrowthHubAuthError: out of the iterator: the task must fail, not quarantine every row.
        """
        self.get_conn()
        self._auth_failure = None
        started = time.monotonic()
        throttled_before = self._throttled
        counts: Counter[str] = Counter()
        source = iter(rows)
        exhausted = False
        waiting: list[_Row] = []
        busy: set[str] = set()
        in_flight: dict[Future[UpsertOutcome], _Row] = {}
        # Completed futures arrive here: O(1) per row, where wait() re-scans the whole window.
        finished: queue.SimpleQueue[Future[UpsertOutcome]] = queue.SimpleQueue()
        abort = threading.Event()
        window = 4 * self.max_workers
        executor = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="growthhub")

        def start_ready() -> None:
            held: set[str] = set()  # identities of earlier waiting rows keep their place in line
            still_waiting = []
            for row in waiting:
                if row.identities & busy or row.identities & held:
                    held |= row.identities
                    still_waiting.append(row)
                    continue
                busy.update(row.identities)
                future = executor.submit(self._upsert_row, row, daily_reserve, abort)
                in_flight[future] = row
                future.add_done_callback(finished.put)
            waiting[:] = still_waiting

        try:
            while True:
                while not exhausted and len(in_flight) + len(waiting) < window:
                    try:
                        key, payload = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    waiting.append(_Row(key, self._with_location(payload), identity_keys(payload)))
                start_ready()
                if not in_flight:
                    break
                done = [finished.get()]
                with contextlib.suppress(queue.Empty):
                    while True:
                        done.append(finished.get_nowait())
                for future in done:
                    busy.difference_update(in_flight.pop(future).identities)
                    outcome = future.result()
                    counts[outcome.status] += 1
                    counts["retried"] += max(outcome.attempts - 1, 0)
                    if outcome.status in ("rejected", "failed"):
                        self.log.log(
                            logging.WARNING if outcome.status == "failed" else logging.DEBUG,
                            "Row %s %s (HTTP %s): %s",
                            outcome.key,
                            outcome.status,
                            outcome.http_status,
                            self._log_text("; ".join(outcome.messages)),
                        )
                    yield outcome
        finally:
            abort.set()
            executor.shutdown(wait=True, cancel_futures=True)
            self._finish_batch(counts, self._throttled - throttled_before, time.monotonic() - started)

    def _finish_batch(self, counts: Counter[str], throttled: int, elapsed_s: float) -> None:
        stats = BatchStats(
            sent=sum(counts[s] for s in ("created", "updated", "rejected", "failed")),
            created=counts["created"],
            updated=counts["updated"],
            rejected=counts["rejected"],
            failed=counts["failed"],
            skipped=counts["skipped"],
            retried=counts["retried"],
            throttled=throttled,
            elapsed_s=elapsed_s,
        )
        self.last_batch_stats = stats
        self.log.info(
            "GrowthHub batch: sent=%d created=%d updated=%d rejected=%d failed=%d skipped=%d "
            "retried=%d 429s=%d elapsed=%.1fs rows/s=%.1f daily_remaining=%s",
            stats.sent,
            stats.created,
            stats.updated,
            stats.rejected,
            stats.failed,
            stats.skipped,
            stats.retried,
            stats.throttled,
            stats.elapsed_s,
            stats.rows_per_s,
            self.daily_remaining,
        )
