"""
What every worker sending to one GrowthHub location must agree on, and where it is kept.

GrowthHub limits requests per location (a burst window and a daily quota), and an OAuth refresh
spends the refresh token every other worker holds. So the limiter's state and the token state
belong to the location, not to a process. A :class:`Coordination` hands out both for one
``(API host, location)``:

- :class:`LocalCoordination`: in this process (a limiter shared by its threads and hooks) and a
  0600 file for tokens, locked with ``flock``. Right for one host.
- ``RedisCoordination`` (:mod:`growthhub_provider.client.redis_coordination`): in Redis, so Celery
  workers on several hosts share one window, one daily quota and one token.

No Airflow import here: the client and its state are usable (and tested) without Airflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from growthhub_provider.client.limiter import LocalRateLimiter

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping


@dataclass(frozen=True)
class LimitSettings:
    """
    The limits a limiter starts from, before the server's ``X-RateLimit-*`` headers say better.

    :param burst: requests allowed per ``interval_s``.
    :param interval_s: length of the burst window in seconds.
    :param burst_cap: explicit upper bound from the connection, kept even if the server allows more.
    :param daily: requests allowed per day: the estimate of what is left until a response says.
    """

    burst: int = 100
    interval_s: float = 10.0
    burst_cap: int | None = None
    daily: int | None = 200_000


class RateLimiter(Protocol):
    """
    A location's burst window and daily quota, as seen by one client.

    A request holds a slot from :meth:`acquire` until ``interval`` after :meth:`release`: the server
    counts it somewhere between the two, so no window it can draw sees more than ``burst``.
    """

    @property
    def daily_remaining(self) -> int | None:
        """Daily quota left: the server's last figure less what went out since (at first: the limit)."""

    def acquire(self, daily_reserve: int | None = None) -> bool:
        """
        Block until a request may be sent and take its slot.

        :param daily_reserve: refuse (return ``False``) once the known daily quota is down to this;
            ``None`` ignores the daily quota (retries of a row already sent).
        """

    def release(self, headers: Mapping[str, str] | None = None, *, throttled: bool = False) -> None:
        """
        Give back the slot once the response (or the error) is in.

        :param headers: response headers, to learn the server's limits and remaining quota.
        :param throttled: the server answered 429: nobody sends for a whole interval.
        """


@dataclass(frozen=True)
class TokenState:
    """
    The OAuth state of one location: the access token in use and the refresh token to spend next.

    :param refresh_token: the latest refresh token (GrowthHub spends the previous one at each refresh).
    :param access_token: the access token the last refresh returned.
    :param expires_at: when ``access_token`` stops working (Unix time, already less a safety margin).
    """

    refresh_token: str
    access_token: str | None = None
    expires_at: float | None = None

    def stored(self, seed: str) -> dict[str, object]:
        """How stores keep it: as JSON, with the fingerprint of the seed it descends from."""
        return {"seed_sha256": fingerprint(seed), **asdict(self)}

    @classmethod
    def from_stored(cls, stored: dict[str, object], seed: str) -> TokenState | None:
        """The state kept by :meth:`stored`, or ``None`` when it descends from another seed."""
        if stored.get("seed_sha256") != fingerprint(seed) or not stored.get("refresh_token"):
            return None
        expires_at = stored.get("expires_at")
        return cls(
            refresh_token=str(stored["refresh_token"]),
            access_token=str(stored["access_token"]) if stored.get("access_token") else None,
            expires_at=float(expires_at) if isinstance(expires_at, int | float) else None,
        )


def renewal_time(expires_in: object) -> float | None:
    """
    When a token issued for ``expires_in`` seconds must be renewed (Unix time): a tenth of its life,
    at most a minute, early, so no request leaves with a token that expires on the way.
    """
    if not expires_in:
        return None
    lifetime = float(str(expires_in))
    return time.time() + lifetime - min(60.0, lifetime / 10)


class TokenStore(Protocol):
    """
    Where the OAuth token state of one location lives between requests, tasks and workers.

    Airflow 3 tasks cannot write connections (the Task SDK only reads them through the Execution
    API; apache/airflow#53520), so the rotated refresh token cannot go back into the connection.
    The ``seed`` is the refresh token of the connection: when an admin re-authorises and puts a new
    one there, state descended from the old seed is ignored, so the admin's token wins.
    """

    def load(self, seed: str) -> TokenState | None:
        """The stored state descended from ``seed``, or ``None``."""

    def save(self, seed: str, state: TokenState) -> None:
        """Keep the state a refresh just produced."""

    def refresh_lock(self) -> contextlib.AbstractContextManager[None]:
        """
        Hold while spending the refresh token, so no two workers ever spend the same one.

        A holder that dies blocks the others no longer than the lock's lifetime (``flock`` is
        released by the kernel; a Redis lock expires).

        :raises CoordinationError: the lock could not be had in time, or its store is unreachable.
        """


class Coordination(Protocol):
    """The shared state of one ``(API host, location)``: its limiter and its token stores."""

    description: str
    """Where the state lives, for logs and errors (never a password)."""

    def limiter(self, settings: LimitSettings) -> RateLimiter:
        """The location's limiter; ``settings`` apply when nobody has learned better yet."""

    def token_store(self, grant: str) -> TokenStore:
        """
        The token state of one OAuth grant of this location.

        :param grant: names the grant; the client passes its connection id, as every worker of
            a deployment reads the same connection.
        """


def fingerprint(seed: str) -> str:
    """What stored token state remembers of its seed: enough to compare, useless to an attacker."""
    return hashlib.sha256(seed.encode()).hexdigest()


class FileTokenStore:
    """
    Token state in a JSON file readable by its owner only (0600), locked with ``flock``.

    One file may hold many entries (one per ``key``). It is shared only by processes that see the
    same file: one host, or a volume every worker mounts. For workers without a shared disk use
    Redis coordination.

    :param path: the file; ``<path>.lock`` serialises refreshes across processes.
    :param key: the entry of this store in the file.
    """

    def __init__(self, path: str | os.PathLike[str], key: str) -> None:
        self.path = Path(path)
        self.key = key

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def load(self, seed: str) -> TokenState | None:
        return TokenState.from_stored(self._read().get(self.key, {}), seed)

    def save(self, seed: str, state: TokenState) -> None:
        data = self._read()
        data[self.key] = state.stored(seed)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def refresh_lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


# One limiter per (API host, location) in this process: the server's quota is per location.
_LOCAL_LIMITERS: dict[tuple[str, str | None], LocalRateLimiter] = {}
_LOCAL_LIMITERS_LOCK = threading.Lock()


class LocalCoordination:
    """
    State shared within one host: a limiter per location in this process, tokens in a 0600 file.

    :param api_host: the API's base URL (limits of a sandbox and of the real API never mix).
    :param location_id: the location whose limits these are.
    :param token_file: the JSON file of :class:`FileTokenStore`.
    """

    def __init__(self, api_host: str, location_id: str | None, token_file: str | os.PathLike[str]) -> None:
        self.api_host = api_host
        self.location_id = location_id
        self.token_file = Path(token_file)
        self.description = f"local (this process; tokens in {self.token_file})"

    def limiter(self, settings: LimitSettings) -> LocalRateLimiter:
        key = (self.api_host, self.location_id)
        with _LOCAL_LIMITERS_LOCK:
            if key not in _LOCAL_LIMITERS:
                _LOCAL_LIMITERS[key] = LocalRateLimiter(
                    settings.burst, settings.interval_s, settings.burst_cap, settings.daily
                )
            return _LOCAL_LIMITERS[key]

    def token_store(self, grant: str) -> FileTokenStore:
        return FileTokenStore(self.token_file, grant)


def forget_local_limiters() -> None:
    """Drop this process's limiters (tests: a test must not inherit another's window)."""
    with _LOCAL_LIMITERS_LOCK:
        _LOCAL_LIMITERS.clear()
