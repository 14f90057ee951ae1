"""How a :class:`~growthhub_provider.client.client.GrowthHubClient` is set up: one typed object."""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tenacity

from growthhub_provider.client.coordination import LimitSettings
from growthhub_provider.client.errors import (
    GrowthHubBrokenBody,
    GrowthHubConfigError,
    GrowthHubConnectionError,
    GrowthHubDailyQuotaSpent,
    GrowthHubTimeout,
    GrowthHubTransientError,
    GrowthHubTransportError,
)

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_API_VERSION = "2023-02-21"
# Tuned with bench/bench_hook.py: enough requests in flight to hide ~50 ms of latency.
DEFAULT_MAX_WORKERS = 64
SLOW_ANSWER_S = 1.0
"""The answer time a location client's workers hide at its full rate (see :func:`location_workers`)."""
MIN_LOCATION_WORKERS = 4

_TRUE = {"true", "t", "yes", "y", "on", "1"}
_FALSE = {"false", "f", "no", "n", "off", "0"}


def to_bool(value: Any, default: bool) -> bool:
    """A flag from a connection extra (``true``, ``"no"``, ``1``, ...); anything else fails closed."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise GrowthHubConfigError(f"{value!r} is not a true/false value")


def tls_verify(value: Any) -> bool | str:
    """
    The ``verify`` extra: ``True`` (the default), ``False``, or a CA bundle path.

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


@dataclass(frozen=True)
class OAuthCredentials:
    """
    An OAuth app's grant for one location, or for an agency (company).

    :param refresh_token: the refresh token an admin put in the connection: the *seed*. Rotated
        tokens are kept by the coordination's token store; a new seed makes them void.
    :param user_type: whose grant it is, as ``/oauth/token`` wants it: ``Location`` or ``Company``.
    """

    client_id: str
    client_secret: str = field(repr=False)
    refresh_token: str = field(repr=False)
    user_type: str = "Location"


def location_workers(limits: LimitSettings) -> int:
    """
    Workers enough to send at ``limits``' rate while each answer takes :data:`SLOW_ANSWER_S`.

    At GrowthHub's 100 requests per 10 s: 10, not :data:`DEFAULT_MAX_WORKERS`. A process driving
    many locations (an agency) pays for every idle thread in GIL and kernel hand-offs
    (bench/bench_fleet_client.py).
    """
    needed = math.ceil(limits.burst / limits.interval_s * SLOW_ANSWER_S)
    return max(MIN_LOCATION_WORKERS, min(DEFAULT_MAX_WORKERS, needed))


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


@dataclass(frozen=True)
class RetryPolicy:
    """
    How transient failures (429, 5xx, timeouts, dropped connections) of one row are retried.

    :param max_attempts: attempts per row.
    :param max_seconds: give up retrying a row after this long.
    :param backoff_initial_s: first backoff; doubles per attempt, plus jitter.
    :param backoff_max_s: longest single backoff.
    """

    max_attempts: int = 6
    max_seconds: float = 120.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0

    def retrying(
        self,
        abort: threading.Event | None = None,
        on_retry: Callable[[BaseException | None], None] | None = None,
    ) -> tenacity.Retrying:
        """
        A tenacity loop of this policy for one call or row.

        :param abort: once set, no further attempt starts (a batch that is being torn down).
        :param on_retry: called with the error of each attempt that is about to be retried, so
            the caller can summarise retries instead of logging each one.
        """
        stop = tenacity.stop_after_attempt(self.max_attempts) | tenacity.stop_after_delay(self.max_seconds)
        if abort is not None:
            stop = stop | (lambda _: abort.is_set())

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry is not None:
                on_retry(state.outcome.exception() if state.outcome else None)

        return tenacity.Retrying(
            before_sleep=before_sleep,
            retry=tenacity.retry_if_exception_type((GrowthHubTransientError, GrowthHubTransportError))
            & tenacity.retry_if_not_exception_type(GrowthHubDailyQuotaSpent),
            stop=stop,
            wait=_Backoff(self.backoff_initial_s, self.backoff_max_s),
            reraise=True,
        )


def retry_cause(error: BaseException | None) -> str:
    """A short name for why a request was retried: its status (``429``, ``503``) or ``timeout``."""
    if isinstance(error, GrowthHubTransientError):
        return str(error.status)
    if isinstance(error, GrowthHubTimeout):
        return "timeout"
    if isinstance(error, GrowthHubBrokenBody):
        return "broken body"
    if isinstance(error, GrowthHubConnectionError):
        return "connection error"
    return type(error).__name__


class RetryTally:
    """Retries of one batch by cause (:func:`retry_cause`), counted from every worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._causes: Counter[str] = Counter()

    def add(self, error: BaseException | None) -> None:
        with self._lock:
            self._causes[retry_cause(error)] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._causes.most_common())


@dataclass(frozen=True)
class ClientConfig:
    """
    Everything the client needs to talk to one location of GrowthHub.

    :param base_url: the API's base URL.
    :param name: names the credentials in logs, errors and the token store (the connection id).
    :param token: Private Integration Token or access token; with OAuth, the first access token.
    :param location_id: the location, filled into payloads that carry none; keys the limits.
    :param oauth: set to refresh access tokens (and rotate refresh tokens) with OAuth.
    :param limits: the limits to start from until the server's headers say better.
    :param max_workers: requests in flight at once in :meth:`upsert_contacts`.
    :param timeout: seconds to wait for the server (connect and each read).
    :param verify: TLS verification (see :func:`tls_verify`).
    :param proxies: proxies by scheme (read from the environment once, by the caller).
    :param log_pii: log emails and phones unmasked (debugging only).
    """

    base_url: str
    name: str = "growthhub"
    token: str | None = field(default=None, repr=False)
    location_id: str | None = None
    api_version: str = DEFAULT_API_VERSION
    oauth: OAuthCredentials | None = None
    limits: LimitSettings = field(default_factory=LimitSettings)
    max_workers: int = DEFAULT_MAX_WORKERS
    timeout: float = 30.0
    verify: bool | str = True
    proxies: dict[str, str] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    log_pii: bool = False

    @property
    def secrets(self) -> list[str]:
        """The configured secrets, to keep out of every message."""
        candidates = [self.token]
        if self.oauth:
            candidates += [self.oauth.client_secret, self.oauth.refresh_token]
        return [s for s in candidates if s]
