"""
``redis`` coordination: the limiter window, daily quota and OAuth token state of a location in Redis.

Not the ``limits`` library: its moving window counts a hit at acquire time, so it cannot hold a slot
from the request until ``interval`` after its response, adapt to ``X-RateLimit-*`` headers, book the
server's ``Remaining`` as used, or stop everyone for an interval after a 429. The scripts below do,
atomically, on Redis server time (hosts with skewed clocks still agree on one window).

Keys are ``<prefix>:{<api host>|<location>}:...``: the braces are a Redis Cluster hash tag, so all
keys of a location share a slot and one Lua script may touch them all. Every key has a TTL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from growthhub_provider.client.coordination import LimitSettings, TokenState
from growthhub_provider.client.errors import CoordinationError
from growthhub_provider.client.limiter import int_header

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from redis.commands.core import Script

log = logging.getLogger(__name__)

MAX_WAIT_S: Final = 0.25
"""Longest sleep between two tries of :meth:`RedisRateLimiter.acquire`: a slot freed elsewhere shows soon."""
LOCK_POLL_S: Final = 0.05
TOKEN_TTL_S: Final = 30 * 86_400
"""Token state unused for a month expires (refreshed at every save)."""

# What the acquire script answers, with a wait in ms: refused (daily quota), wait (1), slot taken.
_STATUS_REFUSED, _STATUS_OK = 0, 2

# Shared by both limiter scripts. KEYS: leases, done, limits, blocked_until, daily.
# ARGV[2..4]: default burst, default interval (ms), burst cap ('' = none).
# Times are server milliseconds (with microsecond fractions). ``limits`` holds what the server said;
# the cap of the connection applies on reading, so changing it takes effect at once.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local day = math.floor(tonumber(t[1]) / 86400)
local function limits()
  local burst = tonumber(redis.call('HGET', KEYS[3], 'burst')) or tonumber(ARGV[2])
  local cap = tonumber(ARGV[4])
  if cap and cap > 0 and cap < burst then burst = cap end
  local interval = tonumber(redis.call('HGET', KEYS[3], 'interval_ms')) or tonumber(ARGV[3])
  return burst, interval
end
local function expire(interval)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - interval)
  return redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
end
local function daily_today()
  if tonumber(redis.call('HGET', KEYS[5], 'day')) == day then
    return tonumber(redis.call('HGET', KEYS[5], 'remaining'))
  end
  return nil
end
"""

# ARGV: lease id, burst, interval_ms, cap, default daily ('' = unknown), reserve ('' = ignore), lease_ms.
# Returns {status, wait_ms}.
_ACQUIRE = (
    _PRELUDE
    + """
local remaining = daily_today() or tonumber(ARGV[5])
local reserve = tonumber(ARGV[6])
if reserve and remaining and remaining <= reserve then return {0, 0} end
local blocked = tonumber(redis.call('GET', KEYS[4]))
if blocked and blocked > now then return {1, math.ceil(blocked - now)} end
local burst, interval = limits()
if expire(interval) < burst then
  local lease_ms = tonumber(ARGV[7])
  redis.call('ZADD', KEYS[1], now + lease_ms, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease_ms) + 1000)
  if remaining then
    redis.call('HSET', KEYS[5], 'day', day, 'remaining', math.max(remaining - 1, 0))
    redis.call('EXPIRE', KEYS[5], 172800)
  end
  return {2, 0}
end
local wait = interval
local done = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if done[2] then wait = tonumber(done[2]) + interval - now end
local lease = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if lease[2] then wait = math.min(wait, tonumber(lease[2]) - now) end
return {1, math.ceil(math.max(wait, 1))}
"""
)

# ARGV: lease id, burst, interval_ms, cap, throttled ('1'/'0'), and the headers ('' = absent):
# X-RateLimit-Max, -Interval-Milliseconds, -Remaining, -Daily-Remaining.
_RELEASE = (
    _PRELUDE
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
local server_max, server_interval = tonumber(ARGV[6]), tonumber(ARGV[7])
if server_max and server_max > 0 then redis.call('HSET', KEYS[3], 'burst', server_max) end
if server_interval and server_interval > 0 then
  redis.call('HSET', KEYS[3], 'interval_ms', server_interval)
end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], 86400) end
local burst, interval = limits()
redis.call('ZADD', KEYS[2], now, ARGV[1])
local used = expire(interval)
local server_remaining = tonumber(ARGV[8])
if server_remaining and server_max then
  -- someone else spends this quota: book the difference, never more than one window's worth
  local unseen = math.min(server_max - server_remaining, burst) - used
  local batch = {}
  for i = 1, unseen do
    batch[#batch + 1] = now
    batch[#batch + 1] = ARGV[1] .. '#' .. i
    if #batch >= 1000 or i == unseen then
      redis.call('ZADD', KEYS[2], unpack(batch))
      batch = {}
    end
  end
end
redis.call('PEXPIRE', KEYS[2], math.ceil(interval * 3))
local server_daily = tonumber(ARGV[9])
if server_daily then
  -- requests in flight may not be in the figure yet; answers overtake each other, so within
  -- a UTC day the estimate only goes down
  local estimate = math.max(server_daily - redis.call('ZCARD', KEYS[1]), 0)
  local known = daily_today()
  if not known or estimate < known then
    redis.call('HSET', KEYS[5], 'day', day, 'remaining', estimate)
  end
  redis.call('EXPIRE', KEYS[5], 172800)
end
if ARGV[5] == '1' then
  local block_end = math.max(tonumber(redis.call('GET', KEYS[4])) or 0, now + interval)
  redis.call('SET', KEYS[4], block_end, 'PX', math.ceil(block_end - now))
end
return 0
"""
)

# Deletes the lock only if it is still ours: after our TTL ran out it may be someone else's.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def redis_client_from_url(url: str, *, timeout_s: float = 5.0, retries: int = 2) -> redis.Redis:
    """
    A client for coordination: bounded socket timeouts (a silent Redis must not hang a worker
    forever) and a few quick retries of connection blips, after which :class:`CoordinationError`.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
    )


def _where(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix:{kwargs['path']} db {kwargs.get('db', 0)}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)} db {kwargs.get('db', 0)}"


class _RedisAccess:
    """Turns every Redis failure into :class:`CoordinationError`: never send as if alone."""

    def __init__(self, client: redis.Redis, description: str) -> None:
        self.client = client
        self.description = description
        password = client.connection_pool.connection_kwargs.get("password")
        self._password = str(password) if password else None

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except RedisError as exc:
            detail = f"{type(exc).__name__}: {exc}"
            if self._password:
                detail = detail.replace(self._password, "***")
            raise CoordinationError(
                f"GrowthHub coordination in {self.description} failed while {doing}: {detail}"
            ) from exc


class RedisRateLimiter:
    """
    :class:`~growthhub_provider.client.limiter.LocalRateLimiter` with its state in Redis, shared by
    every process and host sending to one location.

    A sorted set of leases (in-flight requests, scored by lease expiry so the slot of a killed
    worker frees after ``lease_s``) and one of done requests (scored by release time, counted until
    ``interval`` later). Thread-safe: the state is in Redis, each script runs atomically. Each
    request's random lease id names its entries, so a script retried after a lost reply (redis-py's
    ``Retry``) still holds one slot per request.

    :param lease_s: longest a request may hold its slot unreleased; keep it above the request timeout.
    """

    def __init__(self, access: _RedisAccess, key_base: str, settings: LimitSettings, lease_s: float) -> None:
        self._redis = access
        self.settings = settings
        self._keys = [
            f"{key_base}:limiter:{name}" for name in ("leases", "done", "limits", "blocked_until", "daily")
        ]
        self._limit_args: list[Any] = [
            settings.burst,
            settings.interval_s * 1000,
            "" if settings.burst_cap is None else settings.burst_cap,
        ]
        self._lease_ms = lease_s * 1000
        self._acquire: Script = access.client.register_script(_ACQUIRE)
        self._release: Script = access.client.register_script(_RELEASE)
        # Which leases this instance holds; release() gives back the oldest (any lease counts the same).
        self._leases: deque[str] = deque()
        self._leases_lock = threading.Lock()
        # One thread of this process asks Redis for a slot at a time; the others queue here. When the
        # window is full, 64 threads polling would all wake at the same instant for the one slot
        # that frees (measured: 26 Redis calls per request with one process, 84 with four).
        self._turn = threading.Lock()

    @property
    def daily_remaining(self) -> int | None:
        """The location's daily quota left, as the last response said less what went out since."""
        with self._redis.errors("reading the daily quota"):
            pipe = self._redis.client.pipeline(transaction=False)
            pipe.time()
            pipe.hmget(self._keys[4], ["day", "remaining"])
            (seconds, _), (day, remaining) = pipe.execute()
        if day is not None and remaining is not None and int(day) == seconds // 86_400:
            return int(remaining)
        return self.settings.daily

    def acquire(self, daily_reserve: int | None = None) -> bool:
        """
        Block until a request may be sent and take its slot.

        :param daily_reserve: refuse (return ``False``) once the known daily quota is down to this;
            ``None`` ignores the daily quota (retries of a row already sent).
        :raises CoordinationError: Redis cannot be reached.
        """
        lease = secrets.token_hex(16)
        args = [
            lease,
            *self._limit_args,
            "" if self.settings.daily is None else self.settings.daily,
            "" if daily_reserve is None else daily_reserve,
            self._lease_ms,
        ]
        with self._turn:
            while True:
                with self._redis.errors("taking a request slot"):
                    status, wait_ms = self._acquire(keys=self._keys, args=args)
                if status == _STATUS_OK:
                    with self._leases_lock:
                        self._leases.append(lease)
                    return True
                if status == _STATUS_REFUSED:
                    return False
                time.sleep(min(int(wait_ms) / 1000, MAX_WAIT_S))

    def release(self, headers: Mapping[str, str] | None = None, *, throttled: bool = False) -> None:
        """
        Give back the slot once the response (or the error) is in, and learn from its headers.

        :param throttled: the server answered 429: nobody of the location sends for an interval.
        :raises CoordinationError: Redis cannot be reached.
        """
        with self._leases_lock:
            lease = self._leases.popleft() if self._leases else secrets.token_hex(16)
        values = [
            int_header(headers or {}, name)
            for name in (
                "X-RateLimit-Max",
                "X-RateLimit-Interval-Milliseconds",
                "X-RateLimit-Remaining",
                "X-RateLimit-Daily-Remaining",
            )
        ]
        flag = "1" if throttled else "0"
        args = [lease, *self._limit_args, flag, *("" if v is None else v for v in values)]
        with self._redis.errors("releasing a request slot"):
            self._release(keys=self._keys, args=args)


class RedisTokenStore:
    """
    The OAuth token state of one grant as a JSON string, and a lock serialising its refreshes.

    The lock is ``SET NX PX``: a holder killed mid-refresh blocks the others at most ``lock_ttl_s``,
    so keep ``lock_ttl_s`` above the timeout of the refresh request.
    """

    def __init__(self, access: _RedisAccess, key: str, lock_ttl_s: float) -> None:
        self._redis = access
        self.key = key
        self.lock_key = f"{key}:lock"
        self.lock_ttl_s = lock_ttl_s
        self._unlock: Script = access.client.register_script(_UNLOCK)

    def load(self, seed: str) -> TokenState | None:
        """The stored state descended from ``seed``, or ``None`` (none yet, or an admin re-authorised)."""
        with self._redis.errors("loading the OAuth token state"):
            raw = self._redis.client.get(self.key)
        return None if raw is None else TokenState.from_stored(json.loads(raw), seed)

    def save(self, seed: str, state: TokenState) -> None:
        """Keep the state a refresh just produced (the previous refresh token is spent)."""
        value = json.dumps(state.stored(seed))
        with self._redis.errors("saving the OAuth token state"):
            self._redis.client.set(self.key, value, ex=TOKEN_TTL_S)

    @contextlib.contextmanager
    def refresh_lock(self) -> Iterator[None]:
        """
        Hold while spending the refresh token, so no two workers spend the same one.

        :raises CoordinationError: Redis cannot be reached, or another holder kept the lock for
            twice ``lock_ttl_s`` (longer than a holder can, so something is wrong).
        """
        token = secrets.token_hex(16)
        ttl_ms = max(int(self.lock_ttl_s * 1000), 1)
        deadline = time.monotonic() + 2 * self.lock_ttl_s
        while True:
            with self._redis.errors("taking the OAuth refresh lock"):
                if self._redis.client.set(self.lock_key, token, nx=True, px=ttl_ms):
                    break
            if time.monotonic() >= deadline:
                raise CoordinationError(
                    f"GrowthHub coordination in {self._redis.description}: the OAuth refresh lock "
                    f"{self.lock_key} was held by another worker for over {2 * self.lock_ttl_s:g} s"
                )
            time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            try:
                self._unlock(keys=[self.lock_key], args=[token])
            except RedisError as exc:
                # Not raised: the work under the lock is done, and the lock expires by itself.
                log.warning(
                    "Could not release the OAuth refresh lock in %s (expires within %g s): %s",
                    self._redis.description,
                    self.lock_ttl_s,
                    type(exc).__name__,
                )


class RedisCoordination:
    """
    The shared state of one ``(API host, location)`` in Redis: workers on every host share one window,
    one daily quota and one OAuth token state.

    :param client: a Redis client; give it socket timeouts (see :func:`redis_client_from_url`),
        or a Redis that stops answering hangs the workers.
    :param api_host: the API's base URL (limits of a sandbox and of the real API never mix).
    :param location_id: the location whose limits these are.
    :param key_prefix: first part of every key, to keep deployments sharing one Redis apart.
    :param lock_ttl_s: lifetime of the OAuth refresh lock: the longest a killed holder blocks others.
    :param lease_s: the longest a request holds its slot unreleased (a killed worker's slot frees then).
    """

    def __init__(
        self,
        client: redis.Redis,
        api_host: str,
        location_id: str | None,
        *,
        key_prefix: str = "growthhub",
        lock_ttl_s: float = 60.0,
        lease_s: float = 60.0,
    ) -> None:
        self.key_base = f"{key_prefix}:{{{api_host}|{location_id or ''}}}"
        self.description = f"redis {_where(client)} (keys {self.key_base}:*)"
        self.lock_ttl_s = lock_ttl_s
        self.lease_s = lease_s
        self._redis = _RedisAccess(client, self.description)

    def limiter(self, settings: LimitSettings) -> RedisRateLimiter:
        return RedisRateLimiter(self._redis, self.key_base, settings, self.lease_s)

    def token_store(self, grant: str) -> RedisTokenStore:
        return RedisTokenStore(self._redis, f"{self.key_base}:token:{grant}", self.lock_ttl_s)
